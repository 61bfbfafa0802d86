"""ldv1 as a job kind (:class:`bec.control.jobkinds.JobKind`): its config, processes and Parquet.

fetch (decode, frame for the model, threshold on CPU) → infer (tiles, batched model, line
mask) → post (contours, skew, bend, second pass) → controller. The pipeline modules of its
stages stay where they are (``bec.pipeline.inference``, ``bec.pipeline.post``); this module
is what ties them to the job's name. Heavy imports wait for the method that needs them: the
CLI validates configs through here.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from bec.errors import BadInput
from bec.control.jobkinds import JobKind, WorkerPlan, module_missing


def frame_for(config: Mapping[str, Any], area_bytes: int) -> Callable[[int, int], tuple[int, int]]:
    """The frame rule of DESIGN §7, bounded by what one slot can hold."""
    from bec.ldv1.preprocess import frame_size

    tile = config["tile_size"]
    max_w, max_h = config["max_frame_width"], config["max_frame_height"]

    def rule(width: int, height: int) -> tuple[int, int]:
        fw, fh = frame_size(width, height, tile, max_w, max_h)
        if fw * fh > area_bytes:  # an extreme strip: shrink until it fits a slot
            scale = (area_bytes / (fw * fh)) ** 0.5
            fw, fh = max(1, int(fw * scale)), max(1, int(fh * scale))
        return fw, fh

    return rule


class Ldv1Kind(JobKind):
    name = "ldv1"
    stage_modules = {"fetch": "bec.pipeline.fetch", "infer": "bec.pipeline.inference",
                     "post": "bec.pipeline.post"}
    stage_names = ("fetch", "decode", "infer", "post")

    def fetch_preparation(self) -> Callable[[Any, Any], None]:
        from bec.ldv1.preprocess import adaptive_threshold_into

        return adaptive_threshold_into

    def validate(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        from bec.ldv1.config import Ldv1Config

        return Ldv1Config.from_mapping(raw).to_dict()

    def rename_old_keys(self, raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        from bec.ldv1.config import rename_old_keys

        return rename_old_keys(raw)

    def check_installed(self) -> None:
        """The worker's image and model stack is an extra (``bec[ldv1]``); without it every child
        would crash at import and be restarted until the supervisor gives up."""
        missing = [name for module, name in (("torch", "torch"), ("cv2", "opencv-python-headless"),
                                             ("numpy", "numpy"), ("PIL", "Pillow"),
                                             ("tps", "thin-plate-spline"), ("scipy", "scipy"))
                   if module_missing(module)]
        if missing:
            raise BadInput(f"bec worker needs the ldv1 extras, and {', '.join(missing)} "
                           f"{'is' if len(missing) == 1 else 'are'} not installed: "
                           "pip install -e '.[ldv1]' (torch separately, see README)")

    def plan(self, settings: Any, options: Mapping[str, Any], config: dict[str, Any],
             cores: int, gpus: int) -> WorkerPlan:
        from bec.ldv1.config import precision_on
        from bec.pipeline.supervisor import cpu_inference_layout, model_identity

        model_path = settings.model_path(options.get("model_path"))
        identity = model_identity(model_path)
        device = options.get("device") or "auto"
        if device == "auto":
            device = "cuda" if config["use_gpu"] and gpus else "cpu"
        n_infer, infer_threads = options.get("infer_procs"), options.get("infer_threads")
        if device == "cuda":
            n_infer, infer_threads = n_infer or max(1, gpus), infer_threads or 1
        else:
            n_infer, infer_threads = cpu_inference_layout(model_path, cores, n_infer, infer_threads)
        procs = int(options["procs"])
        runs_in = precision_on(device, config["precision"])
        line = (f"Model: {identity['name']} (sha256 {identity['sha256'][:12] or '-'}) on {device}, "
                f"precision {config['precision']}"
                + (f" (runs in {runs_in}: no fast {config['precision']} path on this device)"
                   if runs_in != config["precision"] else ""))
        return WorkerPlan(config=config, identity=identity, model_path=model_path, device=device,
                          n_infer=n_infer, infer_threads=infer_threads,
                          n_post=options.get("post_procs") or max(1, procs // 4),
                          threshold_in_fetch=device != "cuda",
                          frame_area=config["max_frame_width"] * config["max_frame_height"],
                          batch_pages=int(config["batch_size"]), lines=[line])

    def frame_rule(self, config: Mapping[str, Any], area_bytes: int) -> Callable[[int, int], tuple[int, int]]:
        return frame_for(config, area_bytes)

    def outcome(self, filename: str, result: dict[str, Any], *, etag: str | None,
                size: tuple[int, int], frame: tuple[int, int],
                timings: tuple[float, float, float, float]) -> Any:
        from bec.edges.artifacts import PageOutcome

        return PageOutcome.from_result(filename, result, etag=etag, size=size, frame=frame, timings=timings)

    def table_schema(self) -> Any:
        from bec.edges.artifacts import SCHEMA

        return SCHEMA

    def build_table(self, pages: list[Any]) -> Any:
        from bec.edges.artifacts import build_table

        return build_table(pages)


KIND = Ldv1Kind()
