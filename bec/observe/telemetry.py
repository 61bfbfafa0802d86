"""Serving the worker's metrics: the multiprocess folder and the supervisor's endpoint.

Kept apart from ``bec.observe.metrics`` because the folder must be chosen before
prometheus_client is imported (the library decides its storage at import time).
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

log = logging.getLogger("bec.telemetry")
ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Where metrics endpoints listen unless told otherwise: this host only. The metrics name
#: the job, the model's hash and the host's memory; exposing them to every network the
#: host is on is the operator's decision (--metrics-addr 0.0.0.0), not a default.
LOCAL_ONLY = "127.0.0.1"


PREFIX = "bec-metrics-"
_CREATING = ".bec-metrics-creating-"
OWNER_LOCK = ".owner.lock"
_owner_lock: int | None = None  # fd of this worker's held lock (closed by cleanup or death)


def enable() -> Path:
    """Create this worker's metrics folder and point this process (and its children) at it.

    Call before ``bec.observe.metrics`` is imported: metric objects pick their storage when created.

    The folder's owner holds an exclusive lock on a file in it for as long as it lives: the
    kernel drops the lock when the process dies, however it dies. A supervisor killed with
    -9 cannot remove its folder, so every start first removes the folders nobody holds
    (before, each kill -9 left one in /tmp for good). A folder is locked before it gets
    its searchable name, so a start never takes another's new folder for an orphan.
    """
    global _owner_lock
    base = Path(tempfile.gettempdir())
    remove_orphans(base)
    creating = Path(tempfile.mkdtemp(prefix=_CREATING, dir=base))
    fd = os.open(creating / OWNER_LOCK, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    folder = creating.with_name(f"{PREFIX}{os.getpid()}-{creating.name[len(_CREATING):]}")
    creating.rename(folder)
    _owner_lock = fd
    os.environ[ENV] = str(folder)
    values = sys.modules.get("prometheus_client.values")
    if values is not None:  # imported already (by a library): switch its storage too
        values.ValueClass = values.get_value_class()
    return folder


def remove_orphans(base: Path) -> list[Path]:
    """Remove the metrics folders under ``base`` whose owner is gone; returns them."""
    removed = []
    for folder in base.glob(f"{PREFIX}*"):
        if not folder.is_dir() or folder.is_symlink():
            continue
        try:
            fd = os.open(folder / OWNER_LOCK, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            if _pid_alive(_pid_in_name(folder)):
                continue  # an older BEC's folder (no lock file): its owner still runs
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
            continue
        except OSError:
            continue  # not ours to judge (another user's, unreadable)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: its worker is alive
        else:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            os.close(fd)
    if removed:
        log.info("Removed %d metrics folder(s) of workers that died without cleaning up", len(removed))
    return removed


def _pid_in_name(folder: Path) -> int:
    try:
        return int(folder.name[len(PREFIX):].split("-", 1)[0])
    except ValueError:
        return 0


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup(folder: Path | None) -> None:
    global _owner_lock
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    if _owner_lock is not None:
        os.close(_owner_lock)
        _owner_lock = None


def mark_dead(pid: int) -> None:
    """A child died: drop its live gauges (its counters stay counted)."""
    if os.environ.get(ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def resident_memory(pid: int) -> dict[str, int]:
    """Bytes of a process' resident memory by kind, from ``/proc/<pid>/status``: ``anon``
    (its own heap), ``file`` (mapped libraries), ``shmem`` (the slot pool). Raises OSError
    when the process is gone."""
    parts: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                key, value = line.split(":")
                parts[key[3:].lower()] = int(value.split()[0]) * 1024
    return parts


class CallbackCollector:
    """Metrics computed at scrape time (e.g. slot occupancy read from shared memory)."""

    def __init__(self, collect: Callable[[], Iterable[Any]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Any]:
        return self._collect()


def serve(port: int, addr: str, extra: Callable[[], Iterable[Any]] | None = None) -> Any | None:
    """Start the endpoint; a port already taken is a warning, not a reason to stop working."""
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    if extra is not None:
        registry.register(CallbackCollector(extra))
    try:
        server, _thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        log.warning("metrics endpoint not started on %s:%d: %s", addr, port, exc.strerror or exc)
        return None
    log.info(f"Metrics: http://{addr}:{server.server_port}/metrics")
    return server
