"""Job kinds: what a job's name makes its workers do, declared by one package per kind.

A job's kind follows its name: ``ldv1`` and names starting with ``ldv1`` (``ldv1-test``,
``ldv1_fast``) are line detection (:mod:`bec.ldv1.kind`); ``ocr`` and ``ocr…`` are text
recognition (:mod:`bec.ocr.kind`). Other jobs have no worker implementation and accept any
JSON object as config.

Why an interface: the supervisor, the controller and the lifecycle run every kind the same
way (claims, slots, visibility, Parquet then ``success.json``). What differs — the config,
the processes after fetch, the result a page leaves in its slot, the Parquet schema, and what
a volume needs besides its images — is asked of the kind through :class:`JobKind`, so a third
kind is a new package and one line in :data:`KINDS`, and touches no pipeline module.

Kind modules are imported only when a kind is asked for: the CLI's commands must not load
numpy or pyarrow to validate a name (a test holds them free of it).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

#: Kind name → the module whose ``KIND`` implements it. A job named ``<kind>`` or
#: ``<kind><anything>`` is of that kind (the longest matching name wins).
KINDS = {"ldv1": "bec.ldv1.kind", "ocr": "bec.ocr.kind"}
LDV1 = "ldv1"
OCR = "ocr"

#: The four per-page timings a slot carries (``fetch_ms``, ``decode_ms``, ``infer_ms``,
#: ``post_ms``), named by each kind for its metrics, Parquet columns and ``success.json``.
StageNames = tuple[str, str, str, str]


@dataclass
class WorkerPlan:
    """What a kind decides when a worker starts (``bec worker`` asks its kind)."""

    config: dict[str, Any]              # the validated job config, defaults filled in
    identity: dict[str, str]            # the model or engine: name, sha256 (success.json "model")
    model_path: str = "null"
    device: str = "cpu"
    n_infer: int = 1                    # processes of the kind's model stage (role "infer-N")
    infer_threads: int = 1
    n_post: int = 0                     # processes of its post stage (role "post-N"), 0 = none
    threshold_in_fetch: bool = False    # fetch thresholds the frame into the slot's mask area
    frame_area: int = 4096 * 2048       # bytes of one slot area (the largest frame)
    batch_pages: int = 1                # pages one model process gathers at once (slot count)
    lines: list[str] = field(default_factory=list)  # start-up lines the worker logs


class JobKind:
    """The interface a kind implements. Methods raise ``BadInput`` (config, missing engine)
    or ``RetryableError`` (a volume's inputs are not there yet), decided here, at the edge."""

    name: str = ""
    #: Role prefix → module whose ``run(ctx)`` is that process' body ("fetch", "infer",
    #: optionally "post"; the controller is every kind's).
    stage_modules: Mapping[str, str] = {}
    stage_names: StageNames = ("fetch", "decode", "infer", "post")

    def validate(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """The config with its defaults; unknown keys and wrong types are ``ConfigError``."""
        raise NotImplementedError

    def rename_old_keys(self, raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The config to store, with keys an older release named otherwise under their new
        names, and a note for each (none by default)."""
        return dict(raw), []

    def check_installed(self) -> None:
        """``BadInput`` naming what to install when the kind's stack is missing: checked before
        the worker registers, so a bare host refuses in one line instead of crash-looping."""

    def plan(self, settings: Any, options: Mapping[str, Any], config: dict[str, Any],
             cores: int, gpus: int) -> WorkerPlan:
        """Lay out the kind's processes for this host (``options``: the worker's command line)."""
        raise NotImplementedError

    def frame_rule(self, config: Mapping[str, Any], area_bytes: int) -> Callable[[int, int], tuple[int, int]]:
        """(width, height) of an original → (width, height) of its frame in a slot."""
        raise NotImplementedError

    def fetch_preparation(self) -> Callable[[Any, Any], None] | None:
        """Work a fetch process does on a decoded frame, into the slot's mask area, when the
        plan says so (``WorkerPlan.threshold_in_fetch``): ldv1 thresholds there on CPU hosts,
        where fetch processes are many. None: nothing."""
        return None

    def outcome(self, filename: str, result: dict[str, Any], *, etag: str | None,
                size: tuple[int, int], frame: tuple[int, int],
                timings: tuple[float, float, float, float]) -> Any:
        """A finished page from the result its last stage wrote into the slot."""
        raise NotImplementedError

    def table_schema(self) -> Any:
        """The Arrow schema of the kind's Parquet (``bec.edges.volumefile`` writes it)."""
        raise NotImplementedError

    def build_table(self, pages: list[Any]) -> Any:
        """An Arrow table of ``pages`` in that schema (failed ones are ``artifacts.PageOutcome``):
        one row group of a volume's file, built as its pages complete."""
        raise NotImplementedError

    def summary(self, parquet: Any) -> dict[str, Any]:
        """The kind's own totals for the volume's ``success.json`` (beside the common ones),
        read from the finished file (a binary file object at its start, left there)."""
        return {}

    def volume_inputs(self, svc: Any, adm: Any) -> Any:
        """What the volume's pages need besides their images, read once when it is claimed
        (None: nothing). ``RetryableError`` retries the volume later with its reason."""
        return None

    def page_input(self, inputs: Any, page: int) -> bytes | None:
        """Bytes for page ``page``'s slot (its mask area), written before it is fetched."""
        return None


def module_missing(module: str) -> bool:
    """Whether ``module`` cannot be imported here (found without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # e.g. a module set to None in sys.modules
        return True


def kind_name(job_name: str) -> str | None:
    """The kind of a job name, or None when no worker implements it."""
    matches = [k for k in KINDS if job_name.startswith(k)]
    return max(matches, key=len) if matches else None


def kind_of(job_name: str) -> JobKind | None:
    name = kind_name(job_name)
    return importlib.import_module(KINDS[name]).KIND if name else None


def validate_config(job_name: str, config: dict[str, Any],
                    notes: list[str] | None = None) -> dict[str, Any]:
    """Reject unknown keys and wrong types for jobs of a known kind (``BadInput``); returns
    the config to store, with renamed keys under their new names (said in ``notes``)."""
    kind = kind_of(job_name)
    if kind is not None:
        kind.validate(config)
        config, said = kind.rename_old_keys(config)
        if notes is not None:
            notes.extend(said)
    return config
