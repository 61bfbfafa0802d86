"""Fetch/decode process: S3 GET → decode → grayscale frame in a slot → inference.

Each process runs a small thread pool so that several GETs are in flight at once (S3
latency dominates a single GET); decoding and resizing release the GIL (libjpeg-turbo,
OpenCV), so the same threads decode. The frame is resized straight into the slot's
shared memory and, on CPU hosts, thresholded there too (cheapest where there are many
processes). Per-page failures become ``PageFailed`` for the controller.
"""
from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Iterator

import botocore.exceptions

from bec.control import jobkinds
from bec.edges import aws, imaging
from bec.errors import PageError
from bec.edges.localarchive import probe_client, source_client
from bec.pipeline import slots as S
from bec.pipeline.child import ChildContext
from bec.pipeline.messages import PAGE_CHANGED as CHANGED, PAGE_S3_UNAVAILABLE as UNAVAILABLE, Fetch, FrameReady


class Fetcher:
    def __init__(self, ctx: ChildContext) -> None:
        self.ctx = ctx
        p = ctx.pipeline
        self.probe_client = probe_client(p.source_bucket, p.region)
        # The frame a page is decoded to is the job kind's (ldv1: the model's frame rule; ocr:
        # the original's size, only what a slot cannot hold is scaled down).
        kind = jobkinds.kind_of(p.job_name)
        assert kind is not None, p.job_name  # the worker refuses a job of no kind
        self.rule = kind.frame_rule(p.config, ctx.slots.layout.area_bytes)
        # The kind's own work on the frame, where the plan puts it here (ldv1 on CPU: threshold).
        self.prepare = kind.fetch_preparation() if p.threshold_in_fetch else None
        self.max_pixels = int(p.config["max_image_pixels"])
        self.max_bytes = int(p.config["max_image_bytes"])
        self.s3 = source_client(p.source_bucket, p.region, max_bytes=self.max_bytes, pool=p.fetch_threads + 2)
        self.index = int(ctx.spec.role.rsplit("-", 1)[1])
        # Decodes run side by side, except a suspect's (``Fetch.alone``), which runs with no
        # other: if it crashes the process again, it alone is blamed (see ``Controller.scan``).
        self.gate = threading.Condition()
        self.decoding = 0
        self.exclusive = False

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
        except MemoryError:  # the host's trouble (the pixel limit was checked): transient
            self.ctx.fail_page(msg.slot, msg.gen, "decode", "out_of_memory",
                               f"out of memory while decoding {msg.key}")
        except Exception as exc:  # an unexpected bug must not take the process down
            self.ctx.log.exception("fetch of %s failed unexpectedly", msg.key)
            self.ctx.fail_page(msg.slot, msg.gen, "decode", "internal_error", f"{type(exc).__name__}: {exc}")

    def _process(self, msg: Fetch) -> None:
        pool, slot = self.ctx.slots, msg.slot
        t0 = time.perf_counter()
        data, etag = self._get(msg.bucket, msg.key, msg.size, msg.not_after)
        t1 = time.perf_counter()
        with self._decoding(msg):
            decoded = imaging.decode(data, self.max_pixels, self.rule)
        if not self._still_ours(msg):
            return  # a GET can outlast a slot's rest (a restarted controller retired it): write nothing
        fw, fh = self.rule(decoded.width, decoded.height)
        frame = pool.frame(slot, fh, fw)
        imaging.resize_into(decoded.gray, frame)
        if self.prepare is not None:
            self.prepare(frame, pool.mask(slot, fh, fw))
        t2 = time.perf_counter()
        row = pool.table[slot]
        if int(row["gen"]) != msg.gen:
            return
        row["orig_w"], row["orig_h"] = decoded.width, decoded.height
        row["frame_w"], row["frame_h"] = fw, fh
        row["binary_ready"] = int(self.prepare is not None)
        row["fetch_ms"], row["decode_ms"] = (t1 - t0) * 1000, (t2 - t1) * 1000
        row["nbytes"] = len(data)
        row["etag"] = etag.encode()[:S.ETAG_BYTES]
        role = self.ctx.least_busy_infer(msg.slot)
        self.ctx.hand_over(slot, msg.gen, S.INFER, role, FrameReady(slot, msg.gen))

    def _too_large(self, bucket: str, key: str, size: int, said_by: str) -> PageError:
        return PageError("fetch", "too_large", f"s3://{bucket}/{key} is {size:,} bytes ({said_by}), over "
                                               f"the limit of {self.max_bytes:,} (max_image_bytes)")

    @contextlib.contextmanager
    def _decoding(self, msg: Fetch) -> Iterator[None]:
        """Marks the slot ``busy`` while its page decodes: a decoder that crashes the process
        (libtiff, libjpeg on a malformed file) is charged to the pages being decoded, not to
        every page the process held."""
        with self.gate:
            self.gate.wait_for(lambda: not self.exclusive and (not msg.alone or self.decoding == 0))
            self.decoding += 1
            self.exclusive = msg.alone
        row = self.ctx.slots.table[msg.slot]
        row["busy"] = 1
        try:
            yield
        finally:
            if int(row["gen"]) == msg.gen:
                row["busy"] = 0
            with self.gate:
                self.decoding -= 1
                if msg.alone:
                    self.exclusive = False
                self.gate.notify_all()

    def _get(self, bucket: str, key: str, listed_size: int = 0, not_after: float = 0.0) -> tuple[bytes, str]:
        """The object's bytes and ETag, never more than ``max_image_bytes`` of them in memory:
        refused by the manifest's size before any GET, by the GET's Content-Length before the
        body is read, and by what the body really holds (a length can be missing or wrong).

        With ``not_after`` (the time its manifest was read), an object modified since belongs
        to a newer version of the volume: the page is refused (``changed_after_manifest``)
        instead of mixing two versions in one volume's result. A transient failure is checked
        against S3 as a whole: when S3 itself is down (``s3_unavailable``) the controller
        pauses and gives the volume back instead of recording the page."""
        if listed_size > self.max_bytes:
            raise self._too_large(bucket, key, listed_size, "by the manifest")
        pin = {"IfUnmodifiedSince": datetime.fromtimestamp(not_after, timezone.utc)} if not_after else {}
        try:
            obj = self.s3.get_object(Bucket=bucket, Key=key, **pin)
            length = int(obj.get("ContentLength") or 0)
            if length > self.max_bytes:
                obj["Body"].close()  # the connection goes, unread
                raise self._too_large(bucket, key, length, "its Content-Length")
            data = obj["Body"].read(self.max_bytes + 1)
            if len(data) > self.max_bytes:
                obj["Body"].close()
                raise self._too_large(bucket, key, len(data), "at least, read")
            return data, obj.get("ETag", "").strip('"')
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError, OSError) as exc:
            where = f"s3://{bucket}/{key}"
            if aws.error_code(exc) in {"PreconditionFailed", "412"}:
                raise PageError("fetch", CHANGED, f"{where} was modified after its manifest was read") from None
            error = aws.page_get_error(exc, bucket, key)
            if error.transient:
                down = aws.probe(self.probe_client, bucket)
                if down:  # S3 itself, not this object: the controller pauses and gives the volume back
                    raise PageError("fetch", UNAVAILABLE, f"GET {where}: {aws.error_code(exc)} (S3 is "
                                                          f"unavailable: {down})") from None
            raise error from None


def run(ctx: ChildContext) -> None:
    fetcher = Fetcher(ctx)
    ctx.ready()
    with ThreadPoolExecutor(max_workers=ctx.pipeline.fetch_threads,
                            thread_name_prefix=ctx.spec.role) as threads:
        for msg in ctx.inbox():
            if isinstance(msg, Fetch):
                threads.submit(fetcher.handle, msg)
