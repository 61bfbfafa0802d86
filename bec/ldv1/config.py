"""The ldv1 job config: every key with its default, validated before use.

The config lives in ``jobs.config`` (JSON). It is checked at ``jobs create/update`` and
again at worker start, so a typo (``"batchsize"``) or a wrong type is reported with the
key's name instead of being silently ignored.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from bec.errors import ConfigError

PRECISIONS = ("fp32", "fp16", "bf16")


def precision_on(device_type: str, precision: str) -> str:
    """The precision a model really computes in on a device: fp16 on a CPU runs in fp32
    (few CPU kernels have an fp16 path, and those are slower than fp32). The worker decides
    this once and says so in its start-up lines; ``precision.resolve_dtype`` follows it."""
    return "fp32" if precision == "fp16" and device_type == "cpu" else precision


#: Keys renamed in a release → their new name. A stored job config that still uses an old
#: name keeps working (the value moves to the new key); giving both is an error.
RENAMED = {"max_error_ratio": "max_transient_error_ratio"}


#: Keys that change how a volume is processed (speed, batching, when to retry), never what a
#: page's row holds: rows computed before such a key changed are still reused by a resumed
#: volume (``bec.edges.volumefile.config_digest``).
OPERATIONAL_KEYS = frozenset({"batch_size", "compile_model", "max_tiles_per_batch", "channels_last",
                              "batches_in_flight", "max_transient_error_ratio"})


def rename_old_keys(raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The config with renamed keys under their new names, and a note per key renamed."""
    config, notes = dict(raw), []
    for old, new in RENAMED.items():
        if old not in config:
            continue
        if new in config:
            raise ConfigError(f"ldv1 config keys {old!r} and {new!r} are the same setting "
                              f"({old!r} is the old name): give {new!r} only")
        config[new] = config.pop(old)
        notes.append(f"ldv1 config key {old!r} is now {new!r} (only transient page errors count "
                     "toward a volume retry); stored under the new name")
    return config, notes


@dataclass(frozen=True)
class Ldv1Config:
    use_gpu: bool = True
    precision: str = "fp16"
    batch_size: int = 16             # pages gathered into one inference round
    compile_model: bool = False
    max_tiles_per_batch: int = 80    # tiles per forward call
    tile_size: int = 512
    max_frame_width: int = 4096
    max_frame_height: int = 2048
    wide_page_ratio: float = 2.5     # width > ratio × height: a pecha, scaled to one tile row
    line_threshold: float = 0.85     # sigmoid probability for the line mask
    second_pass_angle: float = 3.0   # |skew| from which the rotated page is run again
    dewarp: bool = True              # bent pages are straightened (thin-plate spline) and run again
    tps_alpha: float = 0.5           # the spline's smoothing, written to each row's tps_alpha
    # Share of a volume's pages with *transient* errors (S3 5xx, throttling, timeouts…) above
    # which the volume is retried instead of finished. Deterministic page errors (missing,
    # corrupt, too large…) never count: they are the same on every try (bec.errors).
    max_transient_error_ratio: float = 0.1
    max_image_pixels: int = 120_000_000  # larger images are refused (decompression bombs)
    # Larger image files are refused before they are read (by the manifest's "size" where it
    # has one, else by the GET's Content-Length): a fetch thread holds a whole file in memory.
    max_image_bytes: int = 128 * 1024 * 1024
    channels_last: bool = True
    # Batches the inference process keeps submitted at once. 2: the accelerator computes one
    # batch while the host copies the last one back, stitches it and hands it on; 1: one at a
    # time. 0 (auto): 2 on a GPU, 1 on CPU (where the model's work is the host's own).
    batches_in_flight: int = 0

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> "Ldv1Config":
        raw, _notes = rename_old_keys(raw)
        known = {f.name: f for f in fields(cls)}
        for key in raw:
            if key not in known:
                raise ConfigError(f"unknown ldv1 config key {key!r} "
                                  f"(known: {', '.join(sorted(known))})")
        values: dict[str, Any] = {}
        for key, value in raw.items():
            values[key] = _check_type(key, value, type(getattr(cls, key)))
        config = cls(**values)
        config._check_ranges()
        return config

    def _check_ranges(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"ldv1 config key 'precision' must be one of "
                              f"{', '.join(PRECISIONS)}, got {self.precision!r}")
        positive = ("batch_size", "max_tiles_per_batch", "tile_size", "max_frame_width",
                    "max_frame_height", "max_image_pixels", "max_image_bytes")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"ldv1 config key {key!r} must be positive")
        if self.tile_size % 32:
            raise ConfigError("ldv1 config key 'tile_size' must be a multiple of 32")
        for key in ("line_threshold", "max_transient_error_ratio"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"ldv1 config key {key!r} must be between 0 and 1")
        if not 0 <= self.batches_in_flight <= 2:
            raise ConfigError("ldv1 config key 'batches_in_flight' must be 0 (auto), 1 or 2")
        if self.tps_alpha < 0:
            raise ConfigError("ldv1 config key 'tps_alpha' must not be negative")
        if self.wide_page_ratio <= 0:
            raise ConfigError("ldv1 config key 'wide_page_ratio' must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_type(key: str, value: Any, expected: type) -> Any:
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ConfigError(f"ldv1 config key {key!r} must be {_type_word(expected)}, "
                          f"got {type(value).__name__} {value!r}")
    return value


def _type_word(expected: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        expected, expected.__name__)
