"""What every child process of the worker shares: its spec, start-up and exit rules.

A child is spawned (never forked: CUDA and threads survive only a fresh interpreter)
with a ``ChildSpec``. At start it binds its mailbox *first* (so messages sent to its
role queue up while it loads heavy things), asks the kernel to kill it when the
supervisor dies (``PR_SET_PDEATHSIG``: no orphans, whatever kills the supervisor), ignores
SIGINT (Ctrl-C reaches the whole process group; the supervisor alone decides), and
publishes its pid in the shared pid table. It ends without the interpreter's teardown
once its work is handed on (``_exit_now``).
"""
from __future__ import annotations

import ctypes
import importlib
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NoReturn

from bec.errors import BadInput
from bec.pipeline import heap
from bec.pipeline.messages import Fatal, Mailbox, Message, PageFailed, Ready, Stop
from bec.pipeline.slots import DONE, INFER, SharedFd, SlotLayout, SlotPool

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15


@dataclass
class PipelineSpec:
    """Everything the worker's processes need to know, fixed at start (picklable)."""

    namespace: str
    roles: list[str]
    slots: tuple[SlotLayout, SharedFd]
    job_name: str
    job_id: int
    worker_id: int
    config: dict[str, Any]               # the validated job config (its kind's keys, defaults filled)
    model_path: str
    model_identity: dict[str, str]
    region: str
    source_bucket: str
    dest_bucket: str
    queue_url: str
    dlq_url: str
    db: Any                              # DbParams
    device: str = "cpu"                  # inference device ("cpu", "cuda")
    threshold_in_fetch: bool = True      # CPU: threshold in the (many) fetch processes
    fetch_threads: int = 4
    n_fetch: int = 1
    n_infer: int = 1
    n_post: int = 1
    infer_threads: int = 1
    cpu_nice: int = 19  # niceness of the fetch and post processes on CPU hosts
    poll_wait: int = 20
    visibility_timeout: int = 300
    shutdown_after_empty: int = 6
    max_volumes_in_flight: int = 3
    retry_delay: int = 30
    stale_after_s: float = 60.0          # a silent worker's running tasks may be taken over
    max_receive_count: int = 0           # the tasks queue's redrive limit (0: none)
    log_json: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def role_index(self, role: str) -> int:
        return self.roles.index(role)

    def pid_of(self, pool: SlotPool, role: str) -> int:
        return int(pool.pids[self.role_index(role)])


@dataclass
class ChildSpec:
    role: str           # "fetch-0", "infer-0", "post-0", "controller"
    module: str         # bec.pipeline.fetch, the job kind's stage modules …: ``run(ctx)`` is the body
    pipeline: PipelineSpec
    parent_pid: int


@dataclass
class ChildContext:
    """A running child's handles: spec, mailbox, slots, logger."""

    spec: ChildSpec
    mailbox: Mailbox
    slots: SlotPool
    log: logging.Logger

    @property
    def pipeline(self) -> PipelineSpec:
        return self.spec.pipeline

    def pid_of(self, role: str) -> int:
        return self.pipeline.pid_of(self.slots, role)

    def parent_alive(self) -> bool:
        return os.getppid() == self.spec.parent_pid

    def hand_over(self, slot: int, gen: int, state: int, role: str, msg: Message) -> bool:
        """Pass a slot to the process of ``role``: ownership first, then the message.

        Ownership is written before sending so that, if either process dies in between,
        the controller finds the slot's holder dead and redoes the page. Returns False
        (and does nothing) when the slot was taken back meanwhile (stale generation).
        """
        row = self.slots.table[slot]
        if int(row["gen"]) != gen:
            return False
        row["owner"] = self.pid_of(role)
        row["state"] = state
        self.mailbox.send(role, msg)
        return True

    def least_busy_infer(self, slot: int) -> str:
        """The model process ("infer-N") holding the fewest pages (queued or being read); ties go
        to slot modulo processes. Why not slot modulo alone: pages take very different times
        (an OCR page 0.2–3 s), and routing by slot number alone left one OCR process idle while
        its sibling had pages queued."""
        n = self.pipeline.n_infer
        if n == 1:
            return "infer-0"
        table = self.slots.table
        held = table["owner"][table["state"] == INFER]
        loads = []
        for k in range(n):
            pid = self.pid_of(f"infer-{k}")
            loads.append((int((held == pid).sum()) if pid else 1 << 30, (k - slot) % n, k))
        return f"infer-{min(loads)[2]}"

    def fail_page(self, slot: int, gen: int, stage: str, error: str, text: str) -> None:
        """A per-page error: the slot goes back to the controller with the reason."""
        self.hand_over(slot, gen, DONE, "controller", PageFailed(slot, gen, stage, error, text[:1000]))

    def inbox(self, timeout: float = 1.0, on_idle: Callable[[], None] | None = None) -> Iterator[Message]:
        """Messages until ``Stop`` arrives or the supervisor is gone."""
        while True:
            msg = self.mailbox.recv(timeout=timeout)
            if msg is None:
                if on_idle is not None:
                    on_idle()
                if not self.parent_alive():
                    return
                continue
            if isinstance(msg, Stop):
                return
            yield msg

    def ready(self) -> None:
        """Tell the supervisor this process is initialised (model loaded, warmed up…)."""
        self.mailbox.send("supervisor", Ready(self.spec.role, os.getpid()), timeout=5)


def _die_with_parent(parent_pid: int, role: str) -> None:
    """Die with the supervisor; name the process ``bec-<role>`` for ps/top (and tests)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(f"bec-{role}"[:15].encode()), 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def child_main(spec: ChildSpec) -> None:
    """Entry point of every child process (the target given to multiprocessing)."""
    _die_with_parent(spec.parent_pid, spec.role)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if spec.pipeline.device == "cpu" and spec.role.startswith(("fetch", "post")) and spec.pipeline.cpu_nice:
        # On a CPU host the model's threads are the pipeline's bottleneck and synchronise with
        # each other: a helper process preempting one of them stalls all of them. Lower
        # priority lets decoding fill the gaps instead. The controller keeps its priority: its
        # heartbeats and visibility extensions must never wait behind the model.
        os.nice(spec.pipeline.cpu_nice)
    heap.keep_freed_memory()  # big buffers are reused, not faulted in again for every page
    mailbox = Mailbox(spec.pipeline.namespace, spec.role)
    mailbox.start_reader()
    slots = SlotPool.attach(spec.pipeline.slots)
    from bec.observe.logs import setup_logging

    setup_logging(json_lines=spec.pipeline.log_json)
    log = logging.getLogger(f"bec.{spec.role}")
    slots.pids[spec.pipeline.role_index(spec.role)] = os.getpid()
    ctx = ChildContext(spec, mailbox, slots, log)
    code = 0
    try:
        importlib.import_module(spec.module).run(ctx)
    except BadInput as exc:  # cannot work at all (model, config): the whole worker stops
        mailbox.send("supervisor", Fatal(spec.role, str(exc)), timeout=5)
        code = 2
    except Exception:
        log.exception("%s crashed", spec.role)
        code = 1
    finally:
        mailbox.close()
    _exit_now(code)


def _exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's teardown.

    When ``run`` returns, everything the process owed is handed on (slots, messages, uploads;
    its thread pools are shut down). What is left is freeing memory the kernel frees at once,
    yet tearing down the interpreter took 0.7 s in an inference process (torch's modules)
    and 0.6 s in the controller (boto3, psycopg), during which the supervisor waits: every
    worker stop (and every test) paid it."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(code)
