"""ocr as a job kind (:class:`bec.control.jobkinds.JobKind`): jobs named ``ocr`` or ``ocr…``.

fetch (the page at the original's size, gray, not thresholded: Tesseract binarises it itself)
→ infer role = :mod:`bec.ocr.engine` (one single-threaded Tesseract per core) → controller. No
post stage. With ``lines_from``, the volume's line-detection rows are read once at the claim
(:mod:`bec.ocr.ldv1lines`) and each page's share rides in its slot. Heavy imports wait for
the method that needs them: the CLI validates configs through here.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from bec.errors import BadInput
from bec.control.jobkinds import JobKind, WorkerPlan, module_missing


class OcrKind(JobKind):
    name = "ocr"
    stage_modules = {"fetch": "bec.pipeline.fetch", "infer": "bec.ocr.engine"}
    stage_names = ("fetch", "decode", "ocr", "cut")

    def validate(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        from bec.ocr.config import OcrConfig

        return OcrConfig.from_mapping(raw).to_dict()

    def check_installed(self) -> None:
        from bec.ocr.tesseract import require_tesserocr

        require_tesserocr()
        missing = [name for module, name in (("cv2", "opencv-python-headless"), ("numpy", "numpy"),
                                             ("PIL", "Pillow"), ("pyarrow", "pyarrow"))
                   if module_missing(module)]
        if missing:
            raise BadInput(f"bec worker needs the ocr extras, and {', '.join(missing)} "
                           f"{'is' if len(missing) == 1 else 'are'} not installed: pip install -e '.[ocr]'")

    def plan(self, settings: Any, options: Mapping[str, Any], config: dict[str, Any],
             cores: int, gpus: int) -> WorkerPlan:
        from bec.ocr.tesseract import engine_identity, find_language_data

        if options.get("device") == "cuda":
            raise BadInput("ocr jobs run Tesseract on CPU cores: leave --device at auto or cpu")
        folder = find_language_data(config["lang"], config["tessdata"])
        if config["lines_from"]:
            missing = [name for module, name in (("tps", "thin-plate-spline"), ("scipy", "scipy"))
                       if module_missing(module)]
            if missing:
                raise BadInput(f"lines_from rebuilds the corrected page with {', '.join(missing)}, "
                               f"not installed: pip install -e '.[ocr]'")
        identity = engine_identity(folder, config["lang"])
        n = options.get("infer_procs") or cores
        how = (f"lines from {config['lines_from']} (line_psm {config['line_psm']}, margin {config['line_margin']})"
               if config["lines_from"] else f"page-level (psm {config['psm']})")
        return WorkerPlan(
            config=config, identity=identity, model_path=str(folder / identity["name"]), device="cpu",
            n_infer=n, infer_threads=1, n_post=0, threshold_in_fetch=False,
            frame_area=int(config["max_frame_pixels"]), batch_pages=2,
            lines=[f"OCR engine: {identity['engine']}, {identity['name']} (sha256 {identity['sha256'][:12]}) "
                   f"from {folder}, lang {config['lang']}, {how}; {n} processes × 1 thread"])

    def frame_rule(self, config: Mapping[str, Any], area_bytes: int) -> Callable[[int, int], tuple[int, int]]:
        """The original's size: Tesseract reads best at full resolution. Only a page larger
        than a slot (``max_frame_pixels``) is scaled down, and its boxes scaled back."""
        def rule(width: int, height: int) -> tuple[int, int]:
            if width * height <= area_bytes:
                return width, height
            scale = (area_bytes / (width * height)) ** 0.5
            return max(1, int(width * scale)), max(1, int(height * scale))

        return rule

    def outcome(self, filename: str, result: dict[str, Any], *, etag: str | None,
                size: tuple[int, int], frame: tuple[int, int],
                timings: tuple[float, float, float, float]) -> Any:
        from bec.ocr.artifacts import OcrOutcome

        return OcrOutcome.from_result(filename, result, etag=etag, size=size, timings=timings)

    def table_schema(self) -> Any:
        from bec.ocr.artifacts import SCHEMA

        return SCHEMA

    def build_table(self, pages: list[Any]) -> Any:
        from bec.ocr.artifacts import build_table

        return build_table(pages)

    def summary(self, parquet: Any) -> dict[str, Any]:
        """Lines read and their confidence over the volume, for success.json (read back from
        the volume's file, one row group at a time: resumed rows count too)."""
        import pyarrow.parquet as pq

        from bec.ocr.tesseract import mean_confidence

        start = parquet.tell()
        lines: list[tuple[str, float]] = []
        reader = pq.ParquetFile(parquet)
        for group in range(reader.num_row_groups):
            for page in reader.read_row_group(group, columns=["lines"]).column("lines").to_pylist():
                lines += [(line["text"], line["confidence"]) for line in page or []]
        parquet.seek(start)
        confidence = mean_confidence(lines)
        return {"nb_lines": len(lines), "mean_confidence": round(confidence, 2) if lines else None}

    def volume_inputs(self, svc: Any, adm: Any) -> Any:
        job = svc.config.get("lines_from")
        if not job:
            return None
        from bec.ocr.ldv1lines import read_volume_lines

        return read_volume_lines(svc.s3, svc.dest_bucket, job, adm.w_id, adm.i_id, adm.manifest.version,
                                 [e.filename for e in adm.manifest.entries])

    def page_input(self, inputs: Any, page: int) -> bytes | None:
        return None if inputs is None else inputs.page_bytes(page)


KIND = OcrKind()
