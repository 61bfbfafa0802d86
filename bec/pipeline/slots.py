"""Shared-memory slots: where pixels, masks and page results live while a page is in flight.

One anonymous memory file (``memfd_create``) holds a table of slot descriptors and, per
slot, a *frame* area (the page's grayscale frame) and a *mask* area (the thresholded
frame, then the line mask, then the pickled page result). Processes receive the file
descriptor when they are spawned and map it; queues carry only ``(slot, generation)``.

Why memfd and not ``/dev/shm``: the memory has no name, so it is freed by the kernel when
the last process holding it exits, whatever the exit path (``kill -9`` of any process,
the supervisor included). Nothing can leak.

Ownership: a slot is written only by its current owner (``owner`` = a pid). A sender
sets ``owner`` to the receiver's pid *before* sending, so when a process dies the
controller finds every slot it held, queued messages included, and redoes those pages.
``gen`` increases each time a slot is (re)assigned; every message carries the generation
it was sent for, and a stale one is dropped on arrival.
"""
from __future__ import annotations

import mmap
import os
import pickle
from dataclasses import dataclass
from multiprocessing import reduction
from typing import Any

import numpy as np

FREE, FETCH, INFER, POST, DONE, RETIRED = range(6)
STATE_NAMES = ("free", "fetch", "infer", "post", "done", "retired")

ETAG_BYTES = 48
#: Room for a page's thin-plate spline control points between its two passes (the dewarp
#: planner keeps at most 30 lines × 5 points, plus 4 corners).
MAX_TPS_POINTS = 160

SLOT_DTYPE = np.dtype([
    ("state", np.int32),
    ("owner", np.int32),        # pid of the process holding (or about to receive) the slot
    ("gen", np.int64),
    ("volume", np.int64),       # controller's key of the volume
    ("page", np.int32),         # index in the manifest
    ("pass_no", np.int32),      # 1, or 2 for the corrected (rotated and/or dewarped) pass
    ("orig_w", np.int32), ("orig_h", np.int32),
    ("frame_w", np.int32), ("frame_h", np.int32),
    ("binary_ready", np.int32),  # 1: the mask area holds the thresholded frame
    ("rotation", np.float32),   # contract rotation_angle applied to the frame; NaN: none
    ("skew", np.float32),       # skew the first pass measured (degrees, rising right > 0)
    ("tps_n", np.int32),        # control points in use (0: not dewarped)
    ("tps_alpha", np.float32),
    ("tps", np.float32, (MAX_TPS_POINTS, 4)),  # [in_y, in_x, out_y, out_x], original px
    ("result_len", np.int64),   # bytes of the pickled result in the mask area
    ("fetch_ms", np.float32), ("decode_ms", np.float32),
    ("infer_ms", np.float32), ("post_ms", np.float32),
    ("nbytes", np.int64),       # size of the fetched object
    ("busy", np.int32),         # 1 while its holder decodes or post-processes it (a crash then is its doing)
    ("etag", f"S{ETAG_BYTES}"),
], align=True)


class SharedFd:
    """A file descriptor that travels to a spawned child (duplicated for it at spawn)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_fd, (reduction.DupFd(self.fd),))


def _rebuild_fd(dup: Any) -> SharedFd:
    return SharedFd(dup.detach())


@dataclass(frozen=True)
class SlotLayout:
    count: int
    area_bytes: int  # bytes of one frame area (= one mask area)
    roles: int = 64  # entries of the pid table (one per process role)

    @property
    def table_bytes(self) -> int:
        raw = self.count * SLOT_DTYPE.itemsize + self.roles * 4
        return (raw + 4095) // 4096 * 4096

    @property
    def total_bytes(self) -> int:
        return self.table_bytes + self.count * 2 * self.area_bytes


class SlotPool:
    """A process' view of the slots. Create once in the supervisor, ``attach`` in children."""

    def __init__(self, layout: SlotLayout, shared: SharedFd) -> None:
        self.layout = layout
        self.shared = shared
        self._map = mmap.mmap(shared.fd, layout.total_bytes)
        self.table = np.ndarray((layout.count,), dtype=SLOT_DTYPE, buffer=self._map, offset=0)
        #: pid of the live process of each role (0 while none): written by the process
        #: itself once its mailbox is bound, cleared by the supervisor when it dies.
        self.pids = np.ndarray((layout.roles,), dtype=np.int32, buffer=self._map,
                               offset=layout.count * SLOT_DTYPE.itemsize)

    @classmethod
    def create(cls, count: int, area_bytes: int, roles: int = 64) -> "SlotPool":
        layout = SlotLayout(count, (area_bytes + 4095) // 4096 * 4096, roles)
        fd = os.memfd_create("bec-slots", os.MFD_CLOEXEC)
        os.ftruncate(fd, layout.total_bytes)  # sparse: pages cost memory only once touched
        pool = cls(layout, SharedFd(fd))
        pool.table[:] = np.zeros(count, SLOT_DTYPE)
        return pool

    def handle(self) -> tuple[SlotLayout, SharedFd]:
        """What a child needs to attach (picklable at spawn time)."""
        return self.layout, self.shared

    @classmethod
    def attach(cls, handle: tuple[SlotLayout, SharedFd]) -> "SlotPool":
        return cls(*handle)

    def _area(self, slot: int, which: int, nbytes: int) -> memoryview:
        if nbytes > self.layout.area_bytes:
            raise ValueError(f"{nbytes} bytes do not fit a slot area of {self.layout.area_bytes}")
        start = self.layout.table_bytes + (slot * 2 + which) * self.layout.area_bytes
        return memoryview(self._map)[start:start + nbytes]

    def frame(self, slot: int, height: int, width: int) -> np.ndarray:
        """The slot's grayscale frame area as an H×W uint8 array (no copy)."""
        return np.ndarray((height, width), np.uint8, self._area(slot, 0, height * width))

    def mask(self, slot: int, height: int, width: int) -> np.ndarray:
        """The slot's mask area as an H×W uint8 array (no copy)."""
        return np.ndarray((height, width), np.uint8, self._area(slot, 1, height * width))

    def write_result(self, slot: int, payload: bytes) -> None:
        self._area(slot, 1, len(payload))[:] = payload
        self.table[slot]["result_len"] = len(payload)

    def read_result(self, slot: int) -> bytes:
        return bytes(self._area(slot, 1, int(self.table[slot]["result_len"])))

    def close(self) -> None:
        self.table = None  # type: ignore[assignment]
        self.pids = None  # type: ignore[assignment]
        try:
            self._map.close()
        except BufferError:  # a view is still alive somewhere; the exit frees it anyway
            pass


def encode_result(result: dict[str, Any]) -> bytes:
    """A page's result as written into its slot by post-processing (read by the controller):
    plain values and numpy arrays (contours, boxes, line_index, skew, the correction)."""
    return pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)


def decode_result(payload: bytes) -> dict:
    # Safe to unpickle: written by our own post process into our own (unnamed) memory.
    return pickle.loads(payload)  # noqa: S301
