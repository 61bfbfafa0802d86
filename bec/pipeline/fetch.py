"""Fetch/decode process: S3 GET → decode → grayscale frame in a slot → inference.

Each process runs a small thread pool so that several GETs are in flight at once (S3
latency dominates a single GET); decoding and resizing release the GIL (libjpeg-turbo,
OpenCV), so the same threads decode. The frame is resized straight into the slot's
shared memory and, on CPU hosts, thresholded there too (cheapest where there are many
processes). Per-page failures become ``PageFailed`` for the controller.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import botocore.exceptions

from bec import aws, imaging, jobkinds
from bec.errors import PageError
from bec.localarchive import source_client
from bec.ldv1.preprocess import adaptive_threshold_into
from bec.pipeline import slots as S
from bec.pipeline.child import ChildContext
from bec.pipeline.messages import Fetch, FrameReady


class Fetcher:
    def __init__(self, ctx: ChildContext) -> None:
        self.ctx = ctx
        p = ctx.pipeline
        self.s3 = source_client(p.source_bucket, p.region, pool=p.fetch_threads + 2)
        # The frame a page is decoded to is the job kind's (ldv1: the model's frame rule; ocr:
        # the original's size, only what a slot cannot hold is scaled down).
        self.rule = jobkinds.kind_of(p.job_name).frame_rule(  # type: ignore[union-attr]
            p.config, ctx.slots.layout.area_bytes)
        self.max_pixels = int(p.config["max_image_pixels"])
        self.threshold_here = p.threshold_in_fetch
        self.index = int(ctx.spec.role.rsplit("-", 1)[1])

    def _still_ours(self, msg: Fetch) -> bool:
        row = self.ctx.slots.table[msg.slot]
        return int(row["gen"]) == msg.gen and int(row["state"]) == S.FETCH

    def handle(self, msg: Fetch) -> None:
        if not self._still_ours(msg):
            return  # stale: the slot was recovered and reassigned
        try:
            self._process(msg)
        except PageError as exc:
            self.ctx.fail_page(msg.slot, msg.gen, exc.stage, exc.kind, str(exc))
        except Exception as exc:  # an unexpected bug must not take the process down
            self.ctx.log.exception("fetch of %s failed unexpectedly", msg.key)
            self.ctx.fail_page(msg.slot, msg.gen, "decode", "internal_error", f"{type(exc).__name__}: {exc}")

    def _process(self, msg: Fetch) -> None:
        pool, slot = self.ctx.slots, msg.slot
        t0 = time.perf_counter()
        data, etag = self._get(msg.bucket, msg.key)
        t1 = time.perf_counter()
        decoded = imaging.decode(data, self.max_pixels, self.rule)
        if not self._still_ours(msg):
            return  # a GET can outlast a slot's rest (a restarted controller retired it): write nothing
        fw, fh = self.rule(decoded.width, decoded.height)
        frame = pool.frame(slot, fh, fw)
        imaging.resize_into(decoded.gray, frame)
        if self.threshold_here:
            adaptive_threshold_into(frame, pool.mask(slot, fh, fw))
        t2 = time.perf_counter()
        row = pool.table[slot]
        if int(row["gen"]) != msg.gen:
            return
        row["orig_w"], row["orig_h"] = decoded.width, decoded.height
        row["frame_w"], row["frame_h"] = fw, fh
        row["binary_ready"] = int(self.threshold_here)
        row["fetch_ms"], row["decode_ms"] = (t1 - t0) * 1000, (t2 - t1) * 1000
        row["nbytes"] = len(data)
        row["etag"] = etag.encode()[:S.ETAG_BYTES]
        role = self.ctx.least_busy_infer(msg.slot)
        self.ctx.hand_over(slot, msg.gen, S.INFER, role, FrameReady(slot, msg.gen))

    def _get(self, bucket: str, key: str) -> tuple[bytes, str]:
        try:
            obj = self.s3.get_object(Bucket=bucket, Key=key)
            return obj["Body"].read(), obj.get("ETag", "").strip('"')
        except botocore.exceptions.ClientError as exc:
            if aws.is_not_found(exc):
                raise PageError("fetch", "missing_object", f"s3://{bucket}/{key} does not exist") from None
            raise PageError("fetch", "s3_error", f"GET s3://{bucket}/{key}: {aws.error_code(exc)}") from None
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise PageError("fetch", "s3_error", f"GET s3://{bucket}/{key}: {type(exc).__name__}: {exc}") from None


def run(ctx: ChildContext) -> None:
    fetcher = Fetcher(ctx)
    ctx.ready()
    with ThreadPoolExecutor(max_workers=ctx.pipeline.fetch_threads,
                            thread_name_prefix=ctx.spec.role) as threads:
        for msg in ctx.inbox():
            if isinstance(msg, Fetch):
                threads.submit(fetcher.handle, msg)
