"""The messages between the worker's processes, and the mailboxes that carry them.

Every process owns one mailbox: a Unix datagram socket in the abstract namespace,
named after the worker and the process' role (``fetch-0``, ``infer-0``…). Why not
``multiprocessing.Queue``: a queue's reader holds a shared lock while it waits, so a
reader killed with ``kill -9`` leaves the lock taken and every other reader blocked for
ever. A datagram is delivered whole or not at all, there is no shared lock, and a dead
receiver only makes ``send`` fail. Messages lost with a dead process are recovered from
slot ownership (see ``slots``).

Messages are small JSON objects (never pickles: a mailbox is reachable by local
processes, so nothing received may execute code), and each datagram's sender must run
as our own uid (checked with SO_PASSCRED).
"""
from __future__ import annotations

import errno
import json
import os
import queue
import select
import socket
import struct
import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

MAX_DATAGRAM = 64 * 1024
_UCRED = struct.Struct("3i")


# -- the messages ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Message:
    kind: ClassVar[str] = ""


@dataclass(frozen=True)
class Fetch(Message):
    """controller → fetch: get this object and decode it into the slot."""
    kind: ClassVar[str] = "fetch"
    slot: int
    gen: int
    bucket: str
    key: str
    size: int = 0  # the object's bytes as the manifest lists them (0: not listed)
    not_after: float = 0.0  # epoch s: refuse an object modified since (its manifest's read)
    alone: bool = False     # a page whose decoder crashed before: decoded with no other page


@dataclass(frozen=True)
class FrameReady(Message):
    """fetch/post → inference: the slot holds a frame to segment."""
    kind: ClassVar[str] = "frame"
    slot: int
    gen: int


@dataclass(frozen=True)
class MaskReady(Message):
    """inference → post: the slot holds the line mask."""
    kind: ClassVar[str] = "mask"
    slot: int
    gen: int


@dataclass(frozen=True)
class PageDone(Message):
    """post → controller: the slot holds the page's pickled result."""
    kind: ClassVar[str] = "done"
    slot: int
    gen: int


#: ``PageFailed.error`` values that are not the page's fault: the controller gives the volume
#: back (unspent) instead of writing an error row.
PAGE_S3_UNAVAILABLE = "s3_unavailable"          # S3 as a whole fails (outage, credentials)
PAGE_CHANGED = "changed_after_manifest"         # the volume is being rewritten under us


@dataclass(frozen=True)
class PageFailed(Message):
    """any stage → controller: the page failed for good (a per-page error)."""
    kind: ClassVar[str] = "failed"
    slot: int
    gen: int
    stage: str
    error: str
    message: str


@dataclass(frozen=True)
class Ready(Message):
    """child → supervisor: initialised (model loaded and warmed up, mailbox bound)."""
    kind: ClassVar[str] = "ready"
    role: str
    pid: int


@dataclass(frozen=True)
class PipelineReady(Message):
    """supervisor → controller: every process is ready; start taking volumes from SQS.

    Until then the controller receives nothing: a volume taken while the model still loads
    would wait on this host instead of going to a ready one, and empty polls counted during
    a slow start would end the worker (``--shutdown-after-empty``) before it ever worked."""
    kind: ClassVar[str] = "pipeline_ready"


@dataclass(frozen=True)
class Fatal(Message):
    """child → supervisor: cannot work at all (e.g. the model does not load); stop the worker."""
    kind: ClassVar[str] = "fatal"
    role: str
    reason: str


@dataclass(frozen=True)
class Stop(Message):
    """supervisor → child: finish what you hold and exit."""
    kind: ClassVar[str] = "stop"


@dataclass(frozen=True)
class Drain(Message):
    """supervisor → controller: stop receiving; finish in-flight volumes within ``grace`` s."""
    kind: ClassVar[str] = "drain"
    grace: float


@dataclass(frozen=True)
class ReleaseNow(Message):
    """supervisor → controller: release every in-flight volume now and finish."""
    kind: ClassVar[str] = "release"


@dataclass(frozen=True)
class Track(Message):
    """controller → supervisor: a received message to release if the controller dies."""
    kind: ClassVar[str] = "track"
    receipt: str


@dataclass(frozen=True)
class Untrack(Message):
    kind: ClassVar[str] = "untrack"
    receipt: str


@dataclass(frozen=True)
class Finished(Message):
    """controller → supervisor: nothing left to do (empty polls, or drained)."""
    kind: ClassVar[str] = "finished"
    reason: str


@dataclass(frozen=True)
class Stats(Message):
    """controller → supervisor: counters for the closing summary."""
    kind: ClassVar[str] = "stats"
    volumes_done: int
    volumes_failed: int
    pages: int


_TYPES: dict[str, type[Message]] = {
    cls.kind: cls for cls in (Fetch, FrameReady, MaskReady, PageDone, PageFailed, Ready, PipelineReady, Fatal, Stop,
                              Drain, ReleaseNow, Track, Untrack, Finished, Stats)}


def encode(msg: Message) -> bytes:
    return json.dumps({"t": msg.kind, **asdict(msg)}, separators=(",", ":")).encode()


def decode(data: bytes) -> Message | None:
    try:
        raw = json.loads(data)
        cls = _TYPES[raw.pop("t")]
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


# -- mailboxes -------------------------------------------------------------------------------
def address(namespace: str, role: str) -> bytes:
    return f"\0bec-{namespace}-{role}".encode()


class Gone(Exception):
    """The receiver's mailbox does not exist (its process is dead or not started yet)."""


class Mailbox:
    """A process' inbound datagram socket, also used to send to other mailboxes."""

    def __init__(self, namespace: str, role: str) -> None:
        self.namespace = namespace
        self.role = role
        self._inbox: queue.SimpleQueue[Message] | None = None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind(address(namespace, role))
        self.sock.setblocking(False)
        self._uid = os.getuid()

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    # receiving
    def start_reader(self) -> None:
        """Empty the socket continuously from a thread into an unbounded in-process queue.

        The kernel queues only a handful of datagrams per socket (net.unix.max_dgram_qlen,
        often 10): a process busy for seconds (a model batch) would make its senders wait.
        Back-pressure belongs to the slot pool, not to the socket, so the socket is kept
        empty; the number of messages in flight is bounded by the slots anyway.
        """
        if self._inbox is not None:
            return
        self._inbox = queue.SimpleQueue()
        threading.Thread(target=self._read_forever, name=f"mailbox-{self.role}", daemon=True).start()

    def _read_forever(self) -> None:
        assert self._inbox is not None
        while True:
            try:
                msg = self._recv_socket(None)
            except OSError:  # closed at exit
                return
            if msg is not None:
                self._inbox.put(msg)

    def recv(self, timeout: float | None = None) -> Message | None:
        """The next message, or None after ``timeout`` seconds (None = wait for ever)."""
        if self._inbox is not None:
            try:
                return self._inbox.get(timeout=timeout) if timeout != 0 else self._inbox.get_nowait()
            except queue.Empty:
                return None
        return self._recv_socket(timeout)

    def _recv_socket(self, timeout: float | None) -> Message | None:
        while True:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(MAX_DATAGRAM, socket.CMSG_SPACE(_UCRED.size))
            except BlockingIOError:
                ready, _, _ = select.select([self.sock], [], [], timeout)
                if not ready:
                    return None
                continue
            if not self._from_our_uid(ancdata):
                continue
            msg = decode(data)
            if msg is not None:
                return msg

    def waiting(self) -> bool:
        """Whether a message is already here (a peek: nothing is taken), in the reader's queue
        or still in the socket (the reader thread may not have run since it arrived)."""
        if self._inbox is not None and not self._inbox.empty():
            return True
        ready, _, _ = select.select([self.sock], [], [], 0)
        return bool(ready)

    def drain(self) -> list[Message]:
        """Every message already waiting, without blocking."""
        got = []
        while (msg := self.recv(0)) is not None:
            got.append(msg)
        return got

    def _from_our_uid(self, ancdata: list[tuple[int, int, bytes]]) -> bool:
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= _UCRED.size:
                _pid, uid, _gid = _UCRED.unpack(data[:_UCRED.size])
                return uid == self._uid or self._uid == 0 and uid == 0
        return False

    # sending
    def try_send(self, role: str, msg: Message) -> bool:
        """Send without waiting: False when the receiver's queue is full. Raises Gone."""
        try:
            self.sock.sendto(encode(msg), address(self.namespace, role))
            return True
        except BlockingIOError:
            return False
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            raise Gone(role) from exc
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                raise Gone(role) from exc
            if exc.errno in (errno.EAGAIN, errno.ENOBUFS):
                return False
            raise

    def send(self, role: str, msg: Message, timeout: float | None = None) -> bool:
        """Send, waiting while the receiver's queue is full; False if it is gone.

        Without a ``timeout`` it waits as long as the receiver lives: a message dropped
        here would leave its slot with a live owner that never heard of it.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.0005
        while True:
            try:
                if self.try_send(role, msg):
                    return True
            except Gone:
                return False
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
