"""Inference process: tiles from many pages (and volumes) → batched model → line masks.

One process per accelerator; on a CPU host, single-threaded model replicas, one per core
(``supervisor.cpu_inference_layout``). It gathers ``FrameReady`` slots until a batch
holds ``max_tiles_per_batch`` tiles or ``batch_size`` pages (or nothing more is waiting),
runs the segmenter once, stitches each page's mask back into its slot and hands the slot
to a post-processing process. On a GPU the threshold and the tiling run on the device
(one uint8 upload per page); on CPU the fetch processes have thresholded already.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from bec import metrics
from bec.ldv1 import preprocess as P
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
        self.busy_s = 0.0
        # CPU replicas share the device "cpu": each reports its own busy ratio as cpu:<replica>.
        replica = ctx.spec.role.rsplit("-", 1)[1]
        self.device_label = str(segmenter.device) if self.on_gpu else f"cpu:{replica}"
        self._window = (time.perf_counter(), 0.0)  # (start, busy seconds at start)

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
    def _page_tiles(self, page: Page) -> torch.Tensor:
        pool = self.ctx.slots
        row = pool.table[page.slot]
        if int(row["binary_ready"]):
            binary = torch.from_numpy(pool.mask(page.slot, page.height, page.width))
            binary = binary.to(self.seg.device, non_blocking=True)
        else:
            gray = torch.from_numpy(pool.frame(page.slot, page.height, page.width))
            binary = PT.adaptive_threshold_torch(gray.to(self.seg.device, non_blocking=True))
        return PT.tile_frame_torch(binary, self.tile)

    def run_batch(self, pages: list[Page]) -> None:
        started = time.perf_counter()
        try:
            tiles = torch.cat([self._page_tiles(p) for p in pages])
            masks = torch.cat([self._segment(chunk) for chunk in torch.split(tiles, self.forward_tiles)])
            if masks.device.type != "cpu":
                masks = masks.cpu()
        except Exception as exc:  # a failed batch fails its pages, not the process
            self.ctx.log.exception("inference batch of %d pages failed", len(pages))
            for page in pages:
                self.ctx.fail_page(page.slot, page.gen, "infer", "inference_error", f"{type(exc).__name__}: {exc}")
            return
        elapsed = time.perf_counter() - started
        self.busy_s += elapsed
        n_tiles = tiles.shape[0]
        metrics.BATCHES.inc()
        metrics.INFER_BUSY.inc(elapsed)
        metrics.TILES.inc(n_tiles)
        metrics.BATCH_FILL.observe(min(1.0, n_tiles / self.max_tiles))
        self.report_busy()
        for page in pages:
            row = self.ctx.slots.table[page.slot]
            if int(row["gen"]) != page.gen:
                continue
            count = page.rows * page.cols
            page_masks = masks[page.first_tile:page.first_tile + count].numpy()
            P.stitch_into(page_masks, page.rows, page.cols, self.ctx.slots.mask(page.slot, page.height, page.width))
            row["infer_ms"] = row["infer_ms"] + elapsed * 1000 * count / n_tiles
            role = f"post-{page.slot % self.ctx.pipeline.n_post}"
            self.ctx.hand_over(page.slot, page.gen, S.POST, role, MaskReady(page.slot, page.gen))

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

    def report_busy(self, every_s: float = 2.0) -> None:
        """Busy ratio over the last window of a few seconds (and device memory)."""
        now = time.perf_counter()
        start, busy_at_start = self._window
        if now - start < every_s:
            return
        metrics.ACCEL_BUSY.labels(self.device_label).set((self.busy_s - busy_at_start) / (now - start))
        if self.on_gpu:
            metrics.ACCEL_MEMORY.labels(self.device_label).set(torch.cuda.memory_allocated(self.seg.device))
        self._window = (now, self.busy_s)


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
    return load_segmenter(p.model_path, device, cfg["precision"], compile_model=cfg["compile_model"],
                          channels_last=cfg["channels_last"], threshold=cfg["line_threshold"],
                          tile=int(cfg["tile_size"]))


def run(ctx: ChildContext) -> None:
    segmenter = build_segmenter(ctx)
    warm_up(segmenter)
    ctx.log.debug("%s ready on %s", ctx.spec.role, segmenter.device)
    engine = Inference(ctx, segmenter)
    ctx.ready()
    idle_since = time.perf_counter()
    for msg in ctx.inbox(on_idle=engine.report_busy):
        metrics.INFER_WAIT.observe(time.perf_counter() - idle_since)
        if not isinstance(msg, FrameReady):
            continue
        pages, stop = engine.gather(msg)
        if pages:
            engine.run_batch(pages)
        idle_since = time.perf_counter()
        if stop:
            return
