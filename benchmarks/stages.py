"""Each stage of the pipeline measured alone on the same corpus (pages/s, per-page ms)."""
from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import corpus as C
from benchmarks import pagework as W


@dataclass
class StageResult:
    name: str
    pages: int
    seconds: float
    per_page_ms: list[float] = field(default_factory=list, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)
    cpu_s: float | None = None  # CPU seconds spent (all threads and processes of the stage); None: not measured

    @property
    def pages_per_s(self) -> float:
        return self.pages / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        """Figures a stage did not measure (no per-page times, no CPU time) are None, not 0."""
        ms = np.array(self.per_page_ms) if self.per_page_ms else None
        return {"name": self.name, "pages": self.pages, "seconds": round(self.seconds, 4),
                "pages_per_s": round(self.pages_per_s, 2),
                "median_ms": None if ms is None else round(float(np.median(ms)), 3),
                "p95_ms": None if ms is None else round(float(np.percentile(ms, 95)), 3),
                "cpu_ms_per_page": round(1000 * self.cpu_s / self.pages, 3)
                if self.cpu_s is not None and self.pages else None,
                **self.extra}


# -- fetch (S3 GET or folder read, threads inside each process) --------------------------------
_state: dict[str, Any] = {}


def _init_fetch(source: str, region: str, threads: int, env: dict[str, str]) -> None:
    os.environ.update(env)
    from bec.edges.localarchive import source_client

    _state["client"] = source_client(source, region, pool=threads + 2)
    _state["source"] = source
    _state["threads"] = threads


def _fetch_chunk(keys: list[str]) -> tuple[list[float], float]:
    client, bucket = _state["client"], _state["source"]
    cpu = time.process_time()

    def one(key: str) -> float:
        t = time.perf_counter()
        client.get_object(Bucket=bucket, Key=key)["Body"].read()
        return (time.perf_counter() - t) * 1000

    with ThreadPoolExecutor(_state["threads"]) as pool:
        return list(pool.map(one, keys)), time.process_time() - cpu


def fetch(keys: list[str], source: str, region: str, procs: int, threads: int) -> StageResult:
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    chunks = [keys[i::procs] for i in range(procs)]
    with ProcessPoolExecutor(procs, initializer=_init_fetch, initargs=(source, region, threads, env)) as ex:
        list(ex.map(_fetch_chunk, [[k] for k in keys[:procs]]))  # warm connections
        started = time.perf_counter()
        parts = list(ex.map(_fetch_chunk, chunks))
        seconds = time.perf_counter() - started
    lat = [ms for part, _ in parts for ms in part]
    return StageResult(f"fetch ({procs}p×{threads}t)", len(keys), seconds, lat, cpu_s=sum(cpu for _, cpu in parts))


# -- decode (+ resize to the frame + threshold: the fetch process' CPU work) --------------------
def _corpus_bytes(pages: int, volumes: int, cache: str) -> list[bytes]:
    """The corpus' page bytes in corpus order, from the cache the parent process built."""
    return [p.data for *_, p in C.build(pages, volumes, cache_dir=Path(cache)).items()]


def _init_decode(pages: int, volumes: int, cache: str, force_pillow: bool) -> None:
    _state["items"] = _corpus_bytes(pages, volumes, cache)
    _state["cfg"] = W.config()
    _state["pillow"] = force_pillow


def _decode_one(i: int) -> float:
    t = time.perf_counter()
    W.decode_frame(_state["items"][i], _state["cfg"], _state["pillow"])
    return (time.perf_counter() - t) * 1000


def _decode_chunk(indices: list[int], threads: int) -> tuple[list[float], float]:
    cpu = time.process_time()
    if threads == 1:
        out = [_decode_one(i) for i in indices]
    else:
        with ThreadPoolExecutor(threads) as pool:
            out = list(pool.map(_decode_one, indices))
    return out, time.process_time() - cpu


def decode(n: int, pages: int, volumes: int, cache: Path, procs: int, threads: int = 1,
           force_pillow: bool = False) -> StageResult:
    """Decode (+ resize + threshold) alone in ``procs`` processes of ``threads`` threads each.

    With the fetch process' thread count this is the decode-only rate of the pipeline's
    fetch processes (each decodes in its fetch threads: libjpeg-turbo and OpenCV release
    the GIL); with one thread it is the per-page latency of a decode on an idle core."""
    chunks = [list(range(i, n, procs)) for i in range(procs)]
    with ProcessPoolExecutor(procs, initializer=_init_decode,
                             initargs=(pages, volumes, str(cache), force_pillow)) as ex:
        list(ex.map(_decode_chunk, [[0]] * procs, [threads] * procs))  # imports and caches warm
        started = time.perf_counter()
        parts = list(ex.map(_decode_chunk, chunks, [threads] * procs))
        seconds = time.perf_counter() - started
    times = [ms for part, _ in parts for ms in part]
    label = "Pillow (pillow-simd)" if force_pillow else "pipeline (turbojpeg for JPEG, Pillow for TIFF)"
    return StageResult(f"decode {procs}p×{threads}t [{label}]", n, seconds, times,
                       cpu_s=sum(cpu for _, cpu in parts), extra={"procs": procs, "threads": threads})


def decoders_side_by_side(datas: list[bytes], kinds: list[str]) -> dict[str, Any]:
    """Per-JPEG decode ms of each library, single thread, full size and scaled."""
    import io

    from PIL import Image

    out: dict[str, Any] = {}
    jpegs = [d for d, k in zip(datas, kinds) if k.startswith("jpeg")][:40]
    if not jpegs:
        return out

    def timed(fn) -> float:
        t = time.perf_counter()
        for d in jpegs:
            fn(d)
        return (time.perf_counter() - t) * 1000 / len(jpegs)

    from bec.edges import imaging

    if imaging._TURBO is not None:
        tj = imaging._TURBO
        out["turbojpeg_gray_ms"] = round(timed(lambda d: tj.decode(d, pixel_format=imaging.TJPF_GRAY)), 2)
        out["turbojpeg_gray_scaled_half_ms"] = round(
            timed(lambda d: tj.decode(d, pixel_format=imaging.TJPF_GRAY, scaling_factor=(1, 2))), 2)
    out["pillow_gray_ms"] = round(timed(lambda d: Image.open(io.BytesIO(d)).convert("L").load()), 2)

    def pillow_draft(d: bytes) -> None:
        im = Image.open(io.BytesIO(d))
        im.draft("L", (im.width // 2, im.height // 2))
        im.convert("L").load()

    out["pillow_draft_half_ms"] = round(timed(pillow_draft), 2)
    import PIL

    out["pillow_version"] = PIL.__version__ + (" (pillow-simd)" if ".post" in PIL.__version__ else "")
    return out


# -- inference and post-processing -------------------------------------------------------------
@dataclass
class InferPostPart:
    """One process' share of the inference and post-processing stages.

    The model phases are timed between barriers (``sync``) so that replicas running side by
    side are measured over the same wall-clock window: ``infer_spans`` holds each model phase's
    (start, end) on the host's monotonic clock."""
    infer_spans: list[tuple[float, float]]
    infer_cpu: float
    tiles: int
    post_s: float
    post_cpu: float
    post_ms: list[float]
    redo: int
    outcomes: list


def _infer_post_part(segmenter: Any, frames: list[W.Frame], cfg: dict[str, Any], sync=lambda: None) -> InferPostPart:
    tile, max_tiles = int(cfg["tile_size"]), int(cfg["max_tiles_per_batch"])
    W.segment_frames(segmenter, frames[:2], tile, max_tiles)  # warm-up
    masks = [np.full_like(f.binary, 1) for f in frames]  # touched: the pipeline's slots exist already
    sync()
    t, c = time.monotonic(), time.process_time()
    W.segment_frames(segmenter, frames, tile, max_tiles, into=masks)
    spans, infer_cpu = [(t, time.monotonic())], time.process_time() - c
    tiles = sum(W.tiles_of(f, tile) for f in frames)
    post_ms, results = [], []
    t, c = time.perf_counter(), time.process_time()
    for m, f in zip(masks, frames):
        p0 = time.perf_counter()
        results.append(W.post(m, f))
        post_ms.append((time.perf_counter() - p0) * 1000)
    redo = []
    for i, (_, plan) in enumerate(results):  # correcting the frame is the post process' work too
        if not plan.identity:
            p0 = time.perf_counter()
            redo.append((i, W.corrected(frames[i], plan), plan))
            post_ms[i] += (time.perf_counter() - p0) * 1000
    post_s, post_cpu = time.perf_counter() - t, time.process_time() - c
    outcomes = [o for o, _ in results]
    sync()  # every replica's second passes, side by side
    t, c = time.monotonic(), time.process_time()
    masks2 = W.segment_frames(segmenter, [f for _, f, _ in redo], tile, max_tiles,  # into their first masks
                              into=[masks[i] for i, _, _ in redo]) if redo else []
    spans.append((t, time.monotonic()))
    infer_cpu += time.process_time() - c
    tiles += sum(W.tiles_of(f, tile) for _, f, _ in redo)
    t, c = time.perf_counter(), time.process_time()
    for (i, f, plan), m in zip(redo, masks2):
        p0 = time.perf_counter()
        outcomes[i] = W.post(m, f, correction=plan, skew=outcomes[i].skew_angle)[0]
        post_ms[i] += (time.perf_counter() - p0) * 1000
    post_s, post_cpu = post_s + time.perf_counter() - t, post_cpu + time.process_time() - c
    return InferPostPart(spans, infer_cpu, tiles, post_s, post_cpu, post_ms, len(redo), outcomes)


def _merge(parts: list[InferPostPart], layout: tuple[int, int]) -> tuple[StageResult, StageResult, list]:
    """Inference over the replicas' common window; post-processing as one process would do it."""
    infer_s = sum(max(p.infer_spans[k][1] for p in parts) - min(p.infer_spans[k][0] for p in parts)
                  for k in range(2))
    n = sum(len(p.outcomes) for p in parts)
    tiles = sum(p.tiles for p in parts)
    procs, threads = layout
    infer = StageResult("infer (tiling, model, stitching; second passes included)", n, infer_s,
                        extra={"tiles": tiles, "tiles_per_s": round(tiles / infer_s, 2) if infer_s else 0,
                               "second_pass_pages": sum(p.redo for p in parts), "procs": procs,
                               "threads": threads},
                        cpu_s=sum(p.infer_cpu for p in parts))
    outcomes: list = [None] * n
    post_ms: list = [0.0] * n
    for k, p in enumerate(parts):  # replica k had pages k, k + procs, k + 2·procs…
        outcomes[k::len(parts)] = p.outcomes
        post_ms[k::len(parts)] = p.post_ms
    postr = StageResult("post (contours, skew, bend, line groups, second-pass correction)", n,
                        sum(p.post_s for p in parts), post_ms, cpu_s=sum(p.post_cpu for p in parts),
                        extra=correction_costs(outcomes, post_ms))
    return infer, postr, outcomes


def correction_costs(outcomes: list, post_ms: list[float]) -> dict[str, Any]:
    """What dewarping costs: the share of pages that took a second pass, and post ms/page
    (both passes' post-processing and the frame's correction) by what was done to the page."""
    kinds = {"dewarped": [], "rotated": [], "straight": []}
    for outcome, ms in zip(outcomes, post_ms):
        kind = ("dewarped" if outcome.tps_points is not None
                else "rotated" if outcome.rotation_angle is not None else "straight")
        kinds[kind].append(ms)
    n = max(1, len(outcomes))
    out: dict[str, Any] = {"second_pass_share": round((len(kinds["dewarped"]) + len(kinds["rotated"])) / n, 3),
                           "dewarped_pages": len(kinds["dewarped"]), "rotated_pages": len(kinds["rotated"])}
    for kind, values in kinds.items():
        out[f"post_ms_{kind}"] = round(float(np.median(values)), 2) if values else None
    return out


def infer_and_post(segmenter: Any, frames: list[W.Frame], cfg: dict[str, Any]) -> tuple[StageResult, StageResult, list]:
    """Inference and post-processing in this process (its torch threads as they are set)."""
    import torch

    return _merge([_infer_post_part(segmenter, frames, cfg)], (1, torch.get_num_threads()))


def _init_replica(barrier: Any, model_path: str, device: str, precision: str, cfg: dict[str, Any],
                  threads: int, pages: int, volumes: int, cache: str) -> None:
    from bec.pipeline import heap

    heap.keep_freed_memory()  # as every worker process does
    import torch

    from bec.ldv1.segmenter import load_segmenter

    torch.set_num_threads(threads)
    _state["barrier"] = barrier
    _state["cfg"] = cfg
    _state["segmenter"] = load_segmenter(model_path, torch.device(device), precision,
                                         threshold=cfg["line_threshold"], tile=cfg["tile_size"])
    _state["items"] = _corpus_bytes(pages, volumes, cache)


def _replica_share(indices: list[int]) -> InferPostPart:
    frames = [W.decode_frame(_state["items"][i], _state["cfg"]) for i in indices]
    return _infer_post_part(_state["segmenter"], frames, _state["cfg"], sync=_state["barrier"].wait)


def infer_and_post_replicas(model_path: str, device: str, precision: str, cfg: dict[str, Any], layout: tuple[int, int],
                            n: int, pages: int, volumes: int, cache: Path) -> tuple[StageResult, StageResult, list]:
    """Inference as the worker lays it out on a CPU host: ``procs`` model replicas of ``threads``
    torch threads, running side by side on their shares of the corpus (page k to replica k mod
    procs). Frames are decoded before the clock starts; the model phases of all replicas are
    timed over one window, so the figure is what the replicas deliver together."""
    import multiprocessing

    procs, threads = layout
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(procs)
        with ProcessPoolExecutor(procs, mp_context=ctx, initializer=_init_replica,
                                 initargs=(barrier, model_path, device, precision, cfg, threads, pages,
                                           volumes, str(cache))) as ex:
            parts = list(ex.map(_replica_share, [list(range(k, n, procs)) for k in range(procs)]))
    return _merge(parts, layout)


def model_alone(segmenter: Any, datas: list[bytes], cfg: dict[str, Any], batches: int = 4) -> StageResult:
    """The model by itself: full batches of tiles already on the device, no host work between
    them. This is the rate the inference process is held against (tiles/s); every host-side
    step of the pipeline (staging, upload, copy back, stitching, hand-overs) must hide behind it.
    Tiles come from the corpus' first pages, as many as ``batches`` + 1 (a warm-up) need."""
    import torch

    from bec.pipeline.inference import forward_tiles

    tile, max_tiles = int(cfg["tile_size"]), int(cfg["max_tiles_per_batch"])
    size = forward_tiles(segmenter.device.type, max_tiles)
    frames: list[W.Frame] = []
    n_tiles = 0
    for data in datas:
        frames.append(W.decode_frame(data, cfg))
        n_tiles += W.tiles_of(frames[-1], tile)
        if n_tiles >= size * (batches + 1):
            break
    flat = torch.from_numpy(np.concatenate([W.tile_frame(f.binary, tile) for f in frames]))
    flat = flat[:size * (batches + 1)].to(segmenter.device)
    chunks = list(torch.split(flat, size))
    if len(chunks) > 1 and chunks[-1].shape[0] < size:
        chunks.pop()  # full batches only

    def sync() -> None:
        if segmenter.device.type == "cuda":
            torch.cuda.synchronize(segmenter.device)

    segmenter.segment(chunks[0])  # warm-up (kernel selection)
    sync()
    measured = chunks[1:] or chunks
    t, c = time.perf_counter(), time.process_time()
    for chunk in measured:
        segmenter.segment(chunk)
    sync()
    seconds = time.perf_counter() - t
    n = sum(int(x.shape[0]) for x in measured)
    per_tile_pages = len(frames) / n_tiles  # pages per tile of this corpus
    return StageResult("model alone (device-resident tiles, full batches)", round(n * per_tile_pages), seconds,
                       extra={"tiles": n, "tiles_per_s": round(n / seconds, 2) if seconds else 0,
                              "batch_tiles": size},
                       cpu_s=time.process_time() - c)


def host_to_device(frames: list[W.Frame], device: str) -> list[StageResult]:
    """Host → accelerator copy of each page's frame (uint8): from pageable memory, from memory
    already pinned, and staged through a fresh pinned buffer as the inference process does it
    (``Inference._staged``: memcpy into pinned memory, then an asynchronous upload). CUDA only."""
    import torch

    if not device.startswith("cuda") or not frames:
        return []
    dev = torch.device(device)
    out = []
    for how in ("pageable", "pinned", "staged through pinned memory, as the pipeline copies"):
        hosts = [torch.from_numpy(f.binary) for f in frames]
        if how == "pinned":
            hosts = [h.pin_memory() for h in hosts]

        def upload(h: torch.Tensor) -> None:
            if how.startswith("staged"):
                h = torch.empty(h.shape, dtype=torch.uint8, pin_memory=True).copy_(h)
            h.to(dev, non_blocking=True)
            torch.cuda.synchronize(dev)

        upload(hosts[0])
        times = []
        started = time.perf_counter()
        for h in hosts:
            t = time.perf_counter()
            upload(h)
            times.append((time.perf_counter() - t) * 1000)
        seconds = time.perf_counter() - started
        nbytes = sum(h.numel() for h in hosts)
        out.append(StageResult(f"host→device copy ({how})", len(hosts), seconds, times,
                               extra={"gb_per_s": round(nbytes / seconds / 1e9, 2)}))
    return out


def parquet(outcomes: list, per_volume: int) -> StageResult:
    from bec.edges import artifacts

    t, c = time.perf_counter(), time.process_time()
    size = 0
    for start in range(0, len(outcomes), per_volume):
        size += len(artifacts.parquet_bytes(outcomes[start:start + per_volume]))
    return StageResult("parquet (build + write)", len(outcomes), time.perf_counter() - t,
                       extra={"bytes_per_page": round(size / max(1, len(outcomes)), 1)},
                       cpu_s=time.process_time() - c)


def as_dict(result: StageResult) -> dict[str, Any]:
    d = asdict(result)
    d.pop("per_page_ms", None)
    return {**d, **result.summary()}
