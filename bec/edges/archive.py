"""The image archive on S3 (DESIGN §2): volume folders, the gzip'd manifest, versions."""
from __future__ import annotations

import email.utils
import gzip
import hashlib
import io
import json
import time
import zlib
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

import botocore.exceptions

from bec.edges import aws
from bec.observe import metrics
from bec.errors import TerminalError
from bec.control.ids import check_i_id, check_w_id

MANIFEST = "dimensions.json"
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_FILENAME = 255


def volume_prefix(w_id: str, i_id: str) -> str:
    """``Works/{md5(W)[:2]}/{W}/images/{W}-{suffix}/`` where suffix drops the I of I+4 digits."""
    check_w_id(w_id)
    check_i_id(i_id)
    suffix = i_id[1:] if len(i_id) == 5 and i_id[1:].isdigit() else i_id
    shard = hashlib.md5(w_id.encode()).hexdigest()[:2]
    return f"Works/{shard}/{w_id}/images/{w_id}-{suffix}/"


def version_of(etag: str) -> str:
    """A volume's version: the first six hex digits of its manifest's ETag."""
    return etag.strip('"')[:6]


@dataclass(frozen=True)
class ManifestEntry:
    filename: str
    width: int | None
    height: int | None
    problem: str | None = None  # set when the entry cannot be fetched (bad file name…)
    size: int | None = None     # bytes, where the manifest says (it does for files over 2 MB)


@dataclass(frozen=True)
class Manifest:
    w_id: str
    i_id: str
    prefix: str
    etag: str
    entries: tuple[ManifestEntry, ...]
    # When it was read (epoch seconds, S3's clock where it says): pages modified after this
    # belong to a newer version of the volume (see ``Fetcher._get``).
    read_at: float = 0.0

    @property
    def version(self) -> str:
        return version_of(self.etag)

    def key(self, entry: ManifestEntry) -> str:
        return self.prefix + entry.filename


def _entry(raw: Any, index: int) -> ManifestEntry:
    if not isinstance(raw, dict):
        return ManifestEntry(f"#{index}", None, None, f"manifest entry {index} is not an object")
    name = raw.get("filename")
    if not isinstance(name, str) or not name:
        return ManifestEntry(f"#{index}", None, None, f"manifest entry {index} has no filename")
    if ("/" in name or "\\" in name or name in (".", "..") or len(name) > MAX_FILENAME
            or any(ord(c) < 32 for c in name) or not _fits_a_key(name)):
        # kept for the error row, escaped where it is not valid UTF-8 (Parquet needs it)
        shown = name.encode("utf-8", "backslashreplace").decode("utf-8")[:MAX_FILENAME]
        return ManifestEntry(shown, None, None, f"unsafe file name {name[:60]!r} in manifest")

    def dim(key: str) -> int | None:
        value = raw.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    return ManifestEntry(name, dim("width"), dim("height"), size=dim("size"))


def _fits_a_key(name: str) -> bool:
    """UTF-8 encodable (no lone surrogates from a JSON escape) and at most 255 bytes."""
    try:
        return len(name.encode("utf-8")) <= MAX_FILENAME
    except UnicodeEncodeError:
        return False


def _gunzip(body: bytes) -> bytes:
    """Decompress, refusing more than MAX_MANIFEST_BYTES of output (a gzip bomb)."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(body)) as stream:
            data = stream.read(MAX_MANIFEST_BYTES + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise TerminalError(f"invalid manifest: gzip data is corrupt ({exc})") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise TerminalError(f"invalid manifest: larger than {MAX_MANIFEST_BYTES} bytes once "
                            f"decompressed ({len(body):,} bytes compressed)")
    return data


def parse_manifest(body: bytes, w_id: str, i_id: str, prefix: str, etag: str) -> Manifest:
    """Decode ``dimensions.json`` (gzip'd JSON list; plain JSON tolerated).

    Raises ``TerminalError`` (and nothing else) when the manifest is unusable: corrupt gzip,
    more than MAX_MANIFEST_BYTES decompressed, not JSON, nested too deeply, not a list, an
    empty list, or a list none of whose entries names a file that can be fetched. Single
    bad entries are kept, with their ``problem``, and become error rows.
    """
    if body[:2] == b"\x1f\x8b":
        body = _gunzip(body)
    try:
        entries = json.loads(body)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4,300 digits
        raise TerminalError("invalid manifest: not JSON (nor gzip'd JSON)") from None
    except RecursionError:
        raise TerminalError("invalid manifest: JSON nested too deeply") from None
    if not isinstance(entries, list):
        raise TerminalError(f"invalid manifest: expected a list of images, got {type(entries).__name__}")
    if not entries:
        raise TerminalError("invalid manifest: it lists no images")
    parsed = tuple(_entry(e, i) for i, e in enumerate(entries))
    if all(e.problem for e in parsed):
        raise TerminalError(f"invalid manifest: none of its {len(parsed)} entries is usable "
                            f"(first: {parsed[0].problem})")
    return Manifest(w_id, i_id, prefix, etag, parsed)


def read_manifest(s3: Any, bucket: str, w_id: str, i_id: str,
                  probes: Iterable[Callable[[], str | None]] = ()) -> Manifest:
    """Fetch and parse a volume's manifest; missing → terminal, S3 trouble → retryable, or
    ``StorageUnavailable`` when ``probes`` find S3 itself failing (see ``aws.storage_failure``)."""
    prefix = volume_prefix(w_id, i_id)
    try:
        obj = s3.get_object(Bucket=bucket, Key=prefix + MANIFEST)
        if obj.get("ContentLength", 0) > MAX_MANIFEST_BYTES:
            raise TerminalError(f"invalid manifest: larger than {MAX_MANIFEST_BYTES} bytes")
        body = obj["Body"].read()
        metrics.S3_READ.inc(len(body))
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError, OSError) as exc:
        if aws.is_not_found(exc):
            raise TerminalError(f"manifest missing: s3://{bucket}/{prefix}{MANIFEST}") from None
        raise aws.storage_failure("reading manifest", exc, probes) from None
    manifest = parse_manifest(body, w_id, i_id, prefix, obj["ETag"])
    return replace(manifest, read_at=_server_time(obj))


def _server_time(response: dict[str, Any]) -> float:
    """When S3 answered (its Date header: the clock it compares modification times with), or
    this host's time where there is none (a folder archive)."""
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if date:
        try:
            return email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            pass
    return time.time()
