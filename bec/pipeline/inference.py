"""Inference process: tiles from many pages (and volumes) → batched model → line masks.

One process per accelerator; on a CPU host, single-threaded model replicas, one per core
(``supervisor.cpu_inference_layout``). It gathers ``FrameReady`` slots until a batch
holds ``max_tiles_per_batch`` tiles or ``batch_size`` pages (or nothing more is waiting),
runs the segmenter once, stitches each page's mask back into its slot and hands the slot
to a post-processing process. On a GPU the threshold and the tiling run on the device
(one uint8 upload per page); on CPU the fetch processes have thresholded already.

On a GPU two batches are in flight (``batches_in_flight``): batch k+1 is submitted (pages
staged into pinned memory, uploaded, model launched, masks copied back asynchronously)
before batch k is waited for, stitched and handed on, so the accelerator does not idle
while the host does its serial part. A batch is waited for at once when no more frames
are waiting: overlap is for a busy accelerator, never a delay for a lone volume.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from bec.observe import metrics
from bec.ldv1 import preprocess as P
from bec.ldv1.config import precision_on
from bec.ldv1 import preprocess_torch as PT
from bec.ldv1.segmenter import Segmenter, load_segmenter, warm_up
from bec.pipeline import slots as S
from bec.pipeline.child import ChildContext
from bec.pipeline.messages import FrameReady, MaskReady, Stop

GATHER_WAIT_S = 0.002  # how long to wait for more pages once a batch has started
#: On CPU a forward call over many tiles is slower per tile (activations leave the
#: caches). Measured on the small model, 2 threads, 512² tiles, CPU ms/tile (wall tiles/s):
#: 1 tile 18.9 (105), 2 tiles 16.5 (120), 3 tiles 15.9 (125), 8 tiles 21.9 (90), 16 tiles
#: 24.4 (80). Batches are still gathered across pages; the forward calls are cut into
#: chunks of this size. (On CUDA the whole batch goes in one call.)
CPU_FORWARD_TILES = 3


def forward_tiles(device_type: str, max_tiles: int) -> int:
    """Tiles per forward call: the job's max_tiles_per_batch, capped on CPU."""
    return max_tiles if device_type == "cuda" else min(max_tiles, CPU_FORWARD_TILES)


def bucket(n: int, limit: int) -> int:
    """The batch size a batch of ``n`` tiles is padded to: 8, 16, 32… capped at ``limit``."""
    size = 8
    while size < n:
        size *= 2
    return max(n, min(size, limit))


@dataclass
class Page:
    slot: int
    gen: int
    height: int
    width: int
    rows: int
    cols: int
    first_tile: int = 0


@dataclass
class Batch:
    """A submitted batch. On a GPU its masks are still being computed and copied back until
    ``done`` fires; on CPU they are ready when ``submit`` returns."""
    pages: list[Page]
    masks: torch.Tensor                 # uint8 tiles on the host (pinned on a GPU)
    n_tiles: int
    started: float                      # perf_counter at submit
    began: Any = None                   # torch.cuda.Event before the first upload
    done: Any = None                    # torch.cuda.Event after the copy back


def batches_in_flight(configured: int, on_gpu: bool) -> int:
    """0 is auto: two on a GPU (compute overlaps the host's part), one on CPU (the host *is*
    the device: a deferred batch would only hold its pages back from post-processing)."""
    return configured or (2 if on_gpu else 1)


class Inference:
    def __init__(self, ctx: ChildContext, segmenter: Segmenter) -> None:
        self.ctx = ctx
        self.seg = segmenter
        cfg = ctx.pipeline.config
        self.tile = int(cfg["tile_size"])
        self.max_tiles = int(cfg["max_tiles_per_batch"])
        self.max_pages = int(cfg["batch_size"])
        self.on_gpu = segmenter.device.type == "cuda"
        self.forward_tiles = forward_tiles(segmenter.device.type, self.max_tiles)
        self.in_flight = batches_in_flight(int(cfg.get("batches_in_flight", 0)), self.on_gpu)
        # CPU replicas share the device "cpu": each reports its own busy ratio as cpu:<replica>.
        replica = ctx.spec.role.rsplit("-", 1)[1]
        self.device_label = str(segmenter.device) if self.on_gpu else f"cpu:{replica}"
        self.busy = metrics.BusyWindow(self.device_label)

    # gathering ---------------------------------------------------------------------------
    def _accept(self, msg: FrameReady) -> Page | None:
        row = self.ctx.slots.table[msg.slot]
        if int(row["gen"]) != msg.gen or int(row["state"]) != S.INFER:
            return None
        h, w = int(row["frame_h"]), int(row["frame_w"])
        rows, cols = P.tile_count(h, w, self.tile)
        return Page(msg.slot, msg.gen, h, w, rows, cols)

    def gather(self, first: FrameReady) -> tuple[list[Page], bool]:
        """Pages for one batch, starting with ``first``; True in the flag means Stop arrived."""
        pages: list[Page] = []
        tiles = 0
        pending: list[object] = [first]
        stop = False
        while True:
            for msg in pending:
                if isinstance(msg, Stop):
                    stop = True
                elif isinstance(msg, FrameReady) and (page := self._accept(msg)):
                    page.first_tile = tiles
                    pages.append(page)
                    tiles += page.rows * page.cols
            pending = []
            if stop or tiles >= self.max_tiles or len(pages) >= self.max_pages:
                return pages, stop
            msg = self.ctx.mailbox.recv(timeout=GATHER_WAIT_S)
            if msg is None:
                return pages, stop
            pending.append(msg)

    # running -----------------------------------------------------------------------------
    def _staged(self, page: Page) -> tuple[torch.Tensor, bool]:
        """The page's pixels on the host, and whether they are thresholded already.

        On a GPU they are copied into pinned memory: an upload from pageable memory may wait
        for the stream (the batch before) and is staged through a pinned buffer anyway. The
        caching host allocator keeps each buffer until its upload is done."""
        pool = self.ctx.slots
        binary_ready = bool(int(pool.table[page.slot]["binary_ready"]))
        host = torch.from_numpy((pool.mask if binary_ready else pool.frame)(page.slot, page.height, page.width))
        if self.on_gpu:
            staged = torch.empty(host.shape, dtype=torch.uint8, pin_memory=True)
            host = staged.copy_(host)
        return host, binary_ready

    def _tiles(self, host: torch.Tensor, binary_ready: bool) -> torch.Tensor:
        pixels = host.to(self.seg.device, non_blocking=True)
        return PT.tile_frame_torch(pixels if binary_ready else PT.adaptive_threshold_torch(pixels), self.tile)

    def submit(self, pages: list[Page]) -> Batch | None:
        """Start a batch: tiles, model, copy back. None when it failed (its pages failed)."""
        started = time.perf_counter()
        began = done = None
        try:
            staged = [self._staged(p) for p in pages]  # host work first: the device's span starts below
            if self.on_gpu:
                began = torch.cuda.Event(enable_timing=True)
                began.record()
            tiles = torch.cat([self._tiles(host, ready) for host, ready in staged])
            masks = torch.cat([self._segment(chunk) for chunk in torch.split(tiles, self.forward_tiles)])
            if self.on_gpu:
                masks = masks.to("cpu", non_blocking=True)  # into pinned memory, asynchronously
                done = torch.cuda.Event(enable_timing=True)
                done.record()
        except Exception as exc:  # a failed batch fails its pages, not the process
            self._fail(pages, exc)
            return None
        return Batch(pages, masks, int(tiles.shape[0]), started, began, done)

    def finish(self, batch: Batch) -> None:
        """Wait for a batch's masks, stitch each page's into its slot, hand the slots on."""
        try:
            if batch.done is not None:
                batch.done.synchronize()  # a device error of the batch surfaces here
        except Exception as exc:
            self._fail(batch.pages, exc)
            return
        if batch.done is not None:  # the device's own time: submitted batches overlap on the host
            elapsed = batch.began.elapsed_time(batch.done) / 1000
        else:
            elapsed = time.perf_counter() - batch.started
        self.busy.add(elapsed)
        n_tiles = batch.n_tiles
        metrics.BATCHES.inc()
        metrics.INFER_BUSY.inc(elapsed)
        metrics.TILES.inc(n_tiles)
        metrics.BATCH_FILL.observe(min(1.0, n_tiles / self.max_tiles))
        self.report_busy()
        masks = batch.masks.numpy()
        for page in batch.pages:
            row = self.ctx.slots.table[page.slot]
            if int(row["gen"]) != page.gen:
                continue
            count = page.rows * page.cols
            P.stitch_into(masks[page.first_tile:page.first_tile + count], page.rows, page.cols,
                          self.ctx.slots.mask(page.slot, page.height, page.width))
            row["infer_ms"] = row["infer_ms"] + elapsed * 1000 * count / n_tiles
            role = f"post-{page.slot % self.ctx.pipeline.n_post}"
            self.ctx.hand_over(page.slot, page.gen, S.POST, role, MaskReady(page.slot, page.gen))

    def _fail(self, pages: list[Page], exc: Exception) -> None:
        self.ctx.log.exception("inference batch of %d pages failed", len(pages))
        for page in pages:
            self.ctx.fail_page(page.slot, page.gen, "infer", "inference_error", f"{type(exc).__name__}: {exc}")

    def _segment(self, chunk: torch.Tensor) -> torch.Tensor:
        """On a GPU, pad the batch to a few fixed sizes (white tiles) so cuDNN's plans and
        compiled graphs are reused instead of re-planned for every tile count."""
        n = chunk.shape[0]
        if not self.on_gpu:
            return self.seg.segment(chunk)
        size = bucket(n, self.max_tiles)
        if size > n:
            pad = chunk.new_full((size - n, *chunk.shape[1:]), 255)
            chunk = torch.cat([chunk, pad])
        return self.seg.segment(chunk)[:n]

    def report_busy(self) -> None:
        """Busy ratio over the last window of a few seconds (and device memory)."""
        if self.busy.report() and self.on_gpu:
            metrics.ACCEL_MEMORY.labels(self.device_label).set(torch.cuda.memory_allocated(self.seg.device))


def build_segmenter(ctx: ChildContext) -> Segmenter:
    p = ctx.pipeline
    cfg = p.config
    device = torch.device(p.device)
    if device.type == "cuda":
        index = int(ctx.spec.role.rsplit("-", 1)[1])
        device = torch.device("cuda", index % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(max(1, p.infer_threads))
    precision = precision_on(device.type, cfg["precision"])  # the start-up lines said so already
    return load_segmenter(p.model_path, device, precision, compile_model=cfg["compile_model"],
                          channels_last=cfg["channels_last"], threshold=cfg["line_threshold"],
                          tile=int(cfg["tile_size"]))


def run(ctx: ChildContext) -> None:
    segmenter = build_segmenter(ctx)
    warm_up(segmenter)
    ctx.log.debug("%s ready on %s", ctx.spec.role, segmenter.device)
    engine = Inference(ctx, segmenter)
    ctx.ready()
    idle_since = time.perf_counter()
    submitted: Batch | None = None  # the batch computing while the one before is finished
    for msg in ctx.inbox(on_idle=engine.report_busy):
        metrics.INFER_WAIT.observe(time.perf_counter() - idle_since)
        batch, stop = None, False
        if isinstance(msg, FrameReady):
            pages, stop = engine.gather(msg)
            batch = engine.submit(pages) if pages else None
        if submitted is not None:  # the next batch is on its way (or what came was no frame)
            engine.finish(submitted)
            submitted = None
        if batch is not None:
            if engine.in_flight > 1 and not stop and ctx.mailbox.waiting():
                submitted = batch  # more frames wait: finish this one after submitting the next
                metrics.OVERLAPPED.inc()
            else:
                engine.finish(batch)
        idle_since = time.perf_counter()
        if stop:
            return
    if submitted is not None:  # Stop, or the supervisor is gone: what was computed goes on
        engine.finish(submitted)
