"""The bad input zoo: task message bodies, manifests and images — through the parsers
(unit and property-based tests) and through a real worker.

Verdicts (see tests/README.md for the whole table):

* a message body that can never succeed → the DLQ at once, with a ``bec_reason`` attribute;
  nothing is created for it (no volume/task row, no S3 object);
* an unusable manifest → ``terminal_failed`` and the DLQ; a manifest with *some* bad entries
  → one ``manifest/invalid_entry`` error row per bad entry, the rest is processed;
* a manifest of 100,000 entries is a legitimate (huge) volume: parsed in well under a
  second, accepted by the worker, streamed through the bounded slot pool and released
  cleanly on shutdown;
* an image that cannot be decoded → one error row (stage, type, message); the others are
  decoded, whatever their extension says.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import signal
import string
import struct
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bec.edges import archive, imaging
from bec.edges.archive import MAX_FILENAME, parse_manifest, volume_prefix
from bec.errors import BadInput, PageError, PoisonMessage, RetryableError, TerminalError
from bec.control.ids import (I_ID, JOB_NAME, MAX_ID_LENGTH, MAX_JOB_NAME_LENGTH, W_ID, check_i_id, check_job_name,
                     check_w_id, queue_names)
from bec.control.lifecycle import MAX_BODY, parse_body
from bec.control.volume_list import parse_lines, parse_volume

MAX_PIXELS = 120_000_000
# BEC_HYPOTHESIS_EXAMPLES=5000 for a long shake-out; 150 keeps CI quick
FAST = settings(max_examples=int(os.environ.get("BEC_HYPOTHESIS_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


# ============================================================================================
# 1. message bodies
# ============================================================================================
def body(**fields: object) -> str:
    return json.dumps(fields)


# (body, a piece of the expected reason); test_worker.py already sends: not JSON, a list,
# a missing key, an extra key, '../etc', an SQL quote, a 5,000-byte body.
POISON = [
    ('{"w_id": "W一", "i_id": "I1"}', "invalid work id 'W一'"),
    (body(w_id="W1", i_id="I\u00e9"), "invalid image-group id 'Ié'"),
    ('{"w_id": "W\\"1", "i_id": "I1"}', "invalid work id 'W\"1'"),
    ("{'w_id': 'W1', 'i_id': 'I1'}", "message body is not JSON"),
    ('{"w_id": 22084, "i_id": 886}', "work id must be a string like W22084, got int"),
    ('{"w_id": "W1", "i_id": 0.5}', "image-group id must be a string like I0886, got float"),
    ('{"w_id": {"w": "W1"}, "i_id": "I1"}', "work id must be a string like W22084, got dict"),
    ('{"w_id": "W1", "i_id": ["I1"]}', "image-group id must be a string like I0886, got list"),
    ('{"w_id": null, "i_id": "I1"}', "got NoneType"),
    ('{"w_id": true, "i_id": "I1"}', "got bool"),
    (" ", "message body is not JSON"),
    ("null", "message body must be a JSON object, got NoneType"),
    ('"W1,I1"', "message body must be a JSON object, got str"),
    ("{}", "message body lacks i_id, w_id"),
    ('{"W_ID": "W1", "I_ID": "I1"}', "message body lacks i_id, w_id"),
    ('{"w_id": "W1", "i_id": "I1", "\\ud800": 1}', "message body has unexpected keys: '\\ud800'"),
    ('{"w_id": "W1", "i_id": "I1", "\\u0000": 1}', "message body has unexpected keys: '\\x00'"),
    ("[" * 2000, "message body is not JSON (nested too deeply)"),
    ('{"w_id": "W1", "i_id": ' + "[" * 1500 + "]" * 1500 + "}", "nested too deeply"),
    (body(w_id="W" + "1" * MAX_ID_LENGTH, i_id="I1"), f"at most {MAX_ID_LENGTH} characters"),
    (body(w_id="W1\n", i_id="I1"), "invalid work id 'W1\\n'"),
    (body(w_id="W1/../W2", i_id="I1"), "invalid work id 'W1/../W2'"),
    (body(w_id="W1", i_id=".."), "invalid image-group id '..'"),
    ('{"w_id": "W1", "i_id": "I1", "w_id": "../x"}', "invalid work id '../x'"),  # last key wins
    (body(w_id="W1", i_id="I1") + " trailing", "message body is not JSON"),
    ("\ufeff" + body(w_id="W1", i_id="I1"), "message body is not JSON"),
    (body(w_id="W1", i_id="I1; DELETE FROM jobs"), "invalid image-group id"),
]


@pytest.mark.parametrize("text, reason", POISON + [("", "message body is not JSON")])
def test_parse_body_rejects_with_a_clear_reason(text, reason):
    with pytest.raises(PoisonMessage) as caught:
        parse_body(text)
    assert reason in str(caught.value)
    str(caught.value).encode("utf-8")  # printable anywhere: an SQS attribute, a log, the DB


def test_dlq_reason_keeps_only_characters_sqs_accepts():
    from bec.control.lifecycle import sqs_text

    assert sqs_text("ok é 一 \t\n\U0001F600") == "ok é 一 \t\n\U0001F600"
    assert sqs_text("a\x00b\ud800c\ufffed\x1f") == "a\ufffdb\ufffdc\ufffdd\ufffd"


def test_parse_body_size_limit_is_exact():
    padded = '{"w_id": "W1", "i_id": "I1"}'
    assert parse_body(padded + " " * (MAX_BODY - len(padded))) == ("W1", "I1")
    with pytest.raises(PoisonMessage, match="too large"):
        parse_body(padded + " " * (MAX_BODY - len(padded) + 1))


# ============================================================================================
# 2. manifests
# ============================================================================================
def manifest_of(body_bytes: bytes) -> archive.Manifest:
    return parse_manifest(body_bytes, "W1", "I1", "Works/x/W1/images/W1-I1/", '"abcdef0123"')


def gzipped(data: bytes) -> bytes:
    """gzip with a fixed header time: these bytes are test ids, and parallel pytest processes
    (xdist) must collect the same ids."""
    return gzip.compress(data, mtime=0)


def gz(value: object) -> bytes:
    return gzipped(json.dumps(value).encode())


@pytest.mark.parametrize("raw, reason", [
    (b"\x1f\x8bnot gzip at all", "gzip data is corrupt"),
    (gzipped(b"[{\"filename\": \"a.jpg\"}")[:-6], "gzip data is corrupt"),   # truncated gzip
    (gzipped(b"not json"), "not JSON (nor gzip'd JSON)"),
    (gzipped(b"\xff\xfe\x00garbage"), "not JSON"),
    (b"PK\x03\x04 a zip file", "not JSON (nor gzip'd JSON)"),
    (b"", "not JSON"),
    (gz({"filename": "a.jpg"}), "expected a list of images, got dict"),
    (gz("a.jpg"), "expected a list of images, got str"),
    (gz([]), "it lists no images"),
    (gz([{"width": 10}, {"filename": ""}, {"filename": None}, 7]), "none of its 4 entries is usable"),
    (gz([{"filename": "../x.jpg"}, {"filename": "a/b.jpg"}]), "none of its 2 entries is usable"),
    (gzipped(b"[" * 100_000), "JSON nested too deeply"),
    (gzipped(b'[{"filename": "a.jpg", "width": ' + b"9" * 5000 + b"}]"), "not JSON"),
])
def test_unusable_manifests_are_terminal(raw, reason):
    with pytest.raises(TerminalError) as caught:
        manifest_of(raw)
    assert reason in str(caught.value) and str(caught.value).startswith("invalid manifest: ")


def test_a_missing_bucket_is_not_a_missing_manifest(stack):
    """A missing *object* is terminal for the volume; a missing *bucket* says nothing about the
    volume (it is the worker's settings, or an outage), so the volume is only retried."""
    from bec.devstack.volumes import ensure_bucket
    from conftest import SOURCE_BUCKET

    ensure_bucket(stack.s3, SOURCE_BUCKET)
    with pytest.raises(TerminalError, match="manifest missing"):
        archive.read_manifest(stack.s3, SOURCE_BUCKET, "W404", "I404")
    with pytest.raises(RetryableError, match="NoSuchBucket"):
        archive.read_manifest(stack.s3, "no-such-archive", "W1", "I1")


def test_gzip_bomb_manifest_is_refused_without_inflating_it(monkeypatch):
    monkeypatch.setattr(archive, "MAX_MANIFEST_BYTES", 1 << 20)
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = packer.compress(b"[" + b" " * (200 << 20)) + packer.flush()  # 200 MiB in ~200 kB
    assert len(bomb) < 400_000
    started = time.perf_counter()
    with pytest.raises(TerminalError, match="larger than 1048576 bytes once decompressed"):
        manifest_of(bomb)
    assert time.perf_counter() - started < 1.0


def test_bad_entries_are_kept_with_their_problem_and_duplicates_are_kept():
    entries = [
        {"filename": "a.jpg", "width": 2000, "height": 700},
        {"filename": "a.jpg", "width": 2000, "height": 700},            # duplicate: two rows
        {"filename": "b.tif", "width": "2000", "height": -1, "size": 5},  # bad dims → unknown
        {"filename": "../up.jpg"}, {"filename": "x/y.jpg"}, {"filename": "x\\y.jpg"},
        {"filename": "."}, {"filename": ".."}, {"filename": "tab\there.jpg"},
        {"filename": "\ud800.jpg"}, {"filename": "é" * 128 + ".jpg"}, {"filename": "x" * 256},
        {"filename": 12}, {"width": 5}, "a.jpg", None,
        {"filename": "ok é 一.jpg", "width": True},
    ]
    m = manifest_of(gz(entries))
    assert len(m.entries) == len(entries)
    got = [(e.filename, e.width, e.height, bool(e.problem)) for e in m.entries]
    assert got[:3] == [("a.jpg", 2000, 700, False), ("a.jpg", 2000, 700, False), ("b.tif", None, None, False)]
    assert all(bad for *_, bad in got[3:-1]), got
    assert got[-1] == ("ok é 一.jpg", None, None, False)
    assert m.entries[3].problem == "unsafe file name '../up.jpg' in manifest"
    assert m.entries[9].filename == "\\ud800.jpg"           # escaped: a Parquet string needs UTF-8
    assert m.entries[13].problem == "manifest entry 13 has no filename" and m.entries[13].filename == "#13"
    assert m.key(m.entries[0]) == "Works/x/W1/images/W1-I1/a.jpg"
    assert m.version == "abcdef"
    for e in m.entries:
        e.filename.encode("utf-8")


def test_plain_json_manifest_is_accepted():
    m = manifest_of(json.dumps([{"filename": "a.jpg", "width": 10, "height": 20}]).encode())
    assert [(e.filename, e.width, e.height, e.problem) for e in m.entries] == [("a.jpg", 10, 20, None)]


def test_100k_entry_manifest_parses_quickly():
    entries = [{"filename": f"I0886{n:06d}.jpg", "width": 2000, "height": 700} for n in range(100_000)]
    raw = gz(entries)
    started = time.perf_counter()
    m = manifest_of(raw)
    elapsed = time.perf_counter() - started
    assert len(m.entries) == 100_000 and not any(e.problem for e in m.entries)
    assert m.entries[-1].filename == "I0886099999.jpg"
    assert elapsed < 3.0, f"parsing 100k entries took {elapsed:.1f}s"


# ============================================================================================
# 3. images
# ============================================================================================
def page(width: int = 300, height: int = 120) -> np.ndarray:
    gray = np.full((height, width), 235, np.uint8)
    for top in range(15, height - 15, 30):
        gray[top:top + 8, 10:width - 10] = 25
    return gray


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims ``width × height``."""
    data = bytearray(encode(Image.new("L", (16, 16), 200), "JPEG"))
    i = 2
    while data[i + 1] not in (0xC0, 0xC1, 0xC2):
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    data[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def raw_tiff(width: int, height: int, pixels: bytes) -> bytes:
    """An uncompressed 8-bit TIFF with its directory first (so truncation hits the pixels)."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0),
            (277, 3, 1), (278, 4, height), (279, 4, width * height)]
    data_at = 8 + 2 + 12 * len(tags) + 4
    out = bytearray(b"II*\x00" + struct.pack("<IH", 8, len(tags)))
    for tag, kind, value in tags:
        value = data_at if tag == 273 else value
        out += struct.pack("<HHI", tag, kind, 1)
        out += struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
    return bytes(out) + b"\x00\x00\x00\x00" + pixels


def png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def good_images() -> dict[str, tuple[bytes, str, np.ndarray, int]]:
    """name → (bytes, codec, expected gray, tolerance)."""
    g = page()
    g16 = g.astype(np.uint16) * 257
    rgba = np.dstack([g, g, g, np.where(g > 100, 0, 255).astype(np.uint8)])  # light = transparent
    i32 = g.astype(np.int32) * (1 << 22)
    gray = Image.fromarray(g)
    return {
        "progressive.jpg": (encode(gray.convert("RGB"), "JPEG", progressive=True, quality=92), "turbojpeg", g, 16),
        "baseline_gray.jpg": (encode(gray, "JPEG", quality=92), "turbojpeg", g, 16),
        "cmyk.jpg": (encode(gray.convert("CMYK"), "JPEG", quality=92), "pillow", g, 16),
        "gray16.tif": (encode(Image.fromarray(g16), "TIFF"), "pillow", g, 0),
        "int32.tif": (encode(Image.fromarray(i32, "I"), "TIFF"), "pillow", (g.astype(np.int64) * 255 // 235).astype(np.uint8), 1),
        "lzw.tif": (encode(gray, "TIFF", compression="tiff_lzw"), "pillow", g, 0),
        "zip.tif": (encode(gray, "TIFF", compression="tiff_adobe_deflate"), "pillow", g, 0),
        "jpeg_in.tif": (encode(gray, "TIFF", compression="jpeg"), "pillow", g, 40),
        "g4.tif": (encode(gray.point(lambda v: 255 if v > 128 else 0).convert("1"), "TIFF", compression="group4"),
                   "pillow", np.where(g > 128, 255, 0).astype(np.uint8), 0),
        "page.png": (encode(gray, "PNG"), "pillow", g, 0),
        "gray16.png": (encode(Image.fromarray(g16), "PNG"), "pillow", g, 1),
        "alpha.png": (encode(Image.fromarray(rgba), "PNG"), "pillow", np.where(g > 100, 255, g).astype(np.uint8), 0),
        "tiff_named.jpg": (encode(gray, "TIFF", compression="tiff_lzw"), "pillow", g, 0),
        "jpeg_named.tif": (encode(gray, "JPEG", quality=92), "turbojpeg", g, 16),
        "page.bmp": (encode(gray, "BMP"), "pillow", g, 0),
    }


def bad_images() -> dict[str, tuple[bytes, str, str]]:
    """name → (bytes, error type, piece of the message); all fail at stage 'decode'."""
    g = Image.fromarray(page())
    jpeg = encode(g.convert("RGB"), "JPEG", progressive=True)
    png, lzw = encode(g, "PNG"), encode(g, "TIFF", compression="tiff_lzw")
    return {
        "empty.jpg": (b"", "empty_file", "empty (0 bytes)"),
        "truncated_progressive.jpg": (jpeg[: len(jpeg) // 2], "corrupt_image", "JPEG data is corrupt"),
        "header_only.jpg": (jpeg[:200], "corrupt_image", "JPEG"),
        "truncated.png": (png[: len(png) // 2], "corrupt_image", "PNG data is corrupt"),
        "truncated_dir.tif": (lzw[: len(lzw) // 2], "corrupt_image", "TIFF data is corrupt"),
        "truncated_pixels.tif": (raw_tiff(300, 120, bytes(300 * 60)), "corrupt_image", "TIFF data is corrupt"),
        "bomb.jpg": (jpeg_claiming(50_000, 50_000), "too_large", "50000×50000 = 2,500,000,000 pixels"),
        "bomb.tif": (raw_tiff(50_000, 50_000, b""), "too_large", "50000×50000"),
        "bomb.png": (png_claiming(50_000, 50_000), "too_large", "50000×50000"),
        # within the pixel limit, but its coordinates would not fit the Parquet's int16
        "long_strip.jpg": (jpeg_claiming(40_000, 300), "too_large", "does not fit the output's int16"),
        "long_strip.tif": (raw_tiff(300, 33_000, b""), "too_large", "300×33000: a side over 32,767"),
        "zero_size.jpg": (jpeg_claiming(0, 16), "corrupt_image", "JPEG header unreadable"),
        "text.jpg": (b"%PDF-1.4 not an image", "unsupported_format", "not a recognised image format"),
    }


@pytest.mark.parametrize("name", sorted(good_images()))
def test_decode_good_images(name):
    data, codec, expected, tolerance = good_images()[name]
    decoded = imaging.decode(data, MAX_PIXELS)
    assert decoded.codec == codec
    assert (decoded.width, decoded.height) == (300, 120)
    assert decoded.gray.dtype == np.uint8 and decoded.gray.shape == (120, 300)
    diff = np.abs(decoded.gray.astype(int) - expected.astype(int))
    assert diff.max() <= tolerance, (name, diff.max())


def wide_page(name: str) -> bytes:
    """A 12 Mpx page in a mode that needs arithmetic wider than a byte (or plain gray)."""
    g = np.random.default_rng(0).integers(0, 255, (3000, 4000)).astype(np.uint8)
    if name == "gray16.tif":
        return encode(Image.fromarray(g.astype(np.uint16) * 257), "TIFF")
    if name == "int32.tif":
        return encode(Image.fromarray(g.astype(np.int32) << 22, "I"), "TIFF")
    if name == "float.tif":
        return encode(Image.fromarray(g.astype(np.float32), "F"), "TIFF")
    if name == "rgba.png":
        return encode(Image.fromarray(np.dstack([g, g, g, g])), "PNG", compress_level=1)
    return encode(Image.fromarray(g), "TIFF")


@pytest.mark.parametrize("name", ["gray16.tif", "int32.tif", "float.tif", "rgba.png", "gray.tif"])
def test_decode_memory_per_pixel_is_bounded(name):
    """Besides Pillow's own image, decoding costs the result (1 byte a pixel) and one strip.
    A 16-bit TIFF went through whole-page int64 arrays (and Pillow's whole-page tobytes):
    about 22 bytes a pixel at the peak (measured RSS), 2.6 GB for a page the pixel limit allows.
    (tracemalloc sees numpy's and Python's allocations, not Pillow's C buffers.)"""
    import tracemalloc

    data = wide_page(name)
    tracemalloc.start()
    try:
        decoded = imaging.decode(data, MAX_PIXELS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    pixels = decoded.width * decoded.height
    assert decoded.gray.shape == (3000, 4000) and decoded.gray.dtype == np.uint8
    assert peak / pixels < 2.5, f"{name}: {peak / pixels:.1f} bytes a pixel"


@pytest.mark.parametrize("name", sorted(bad_images()))
def test_decode_bad_images(name):
    data, kind, text = bad_images()[name]
    started = time.perf_counter()
    with pytest.raises(PageError) as caught:
        imaging.decode(data, MAX_PIXELS)
    assert (caught.value.stage, caught.value.kind) == ("decode", kind)
    assert text in str(caught.value), str(caught.value)
    assert time.perf_counter() - started < 1.0  # nothing was inflated


def test_scaled_jpeg_decode_keeps_the_original_size():
    data = encode(Image.fromarray(page(1600, 800)), "JPEG", quality=90)
    decoded = imaging.decode(data, MAX_PIXELS, lambda w, h: (w // 4, h // 4))
    assert (decoded.width, decoded.height) == (1600, 800)
    assert decoded.gray.shape[0] >= 200 and decoded.gray.shape[0] < 800


# ============================================================================================
# 4. property-based: the parsers raise only their documented errors
# ============================================================================================
ID_TAIL = st.text(alphabet=string.ascii_letters + string.digits + "_", min_size=1, max_size=MAX_ID_LENGTH - 1)
W_IDS = ID_TAIL.map(lambda s: "W" + s)
I_IDS = ID_TAIL.map(lambda s: "I" + s)
NEAR_IDS = st.one_of(st.text(max_size=40), st.from_regex(r"[WI][A-Za-z0-9_]{0,34}.{0,2}", fullmatch=True),
                     W_IDS.map(lambda s: s + "\n"), W_IDS.map(lambda s: " " + s))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@FAST
@given(st.one_of(NEAR_IDS, st.integers(), st.none(), st.binary(max_size=10), st.lists(st.text(), max_size=2)))
def test_ids_accept_only_the_documented_shape(value):
    for check, pattern in ((check_w_id, W_ID), (check_i_id, I_ID)):
        try:
            got = check(value)
        except BadInput as exc:
            assert str(exc)
            continue
        assert got == value and isinstance(got, str)
        assert pattern.fullmatch(got) and len(got) <= MAX_ID_LENGTH and got.isascii()


@FAST
@given(W_IDS, I_IDS)
def test_valid_ids_are_accepted_and_make_safe_keys(w, i):
    assert check_w_id(w) == w and check_i_id(i) == i
    prefix = volume_prefix(w, i)
    assert prefix.startswith("Works/") and ".." not in prefix.split("/") and "//" not in prefix


@FAST
@given(st.one_of(st.text(max_size=90), st.from_regex(r"[A-Za-z0-9_-]{1,80}", fullmatch=True),
                 st.none(), st.integers()))
def test_job_names_accept_only_the_documented_shape(value):
    try:
        got = check_job_name(value)
    except BadInput:
        return
    assert got == value and JOB_NAME.fullmatch(got) and len(got) <= MAX_JOB_NAME_LENGTH
    assert all(len(q) <= 80 for q in queue_names(got))


@FAST
@given(st.one_of(st.text(max_size=MAX_BODY + 10), JSON_VALUES.map(json.dumps),
                 st.fixed_dictionaries({"w_id": NEAR_IDS | W_IDS, "i_id": NEAR_IDS | I_IDS}).map(json.dumps)))
def test_parse_body_raises_only_poison(text):
    try:
        w, i = parse_body(text)
    except PoisonMessage as exc:
        assert str(exc)
        str(exc).encode("utf-8")
        return
    assert W_ID.fullmatch(w) and I_ID.fullmatch(i) and len(w) <= MAX_ID_LENGTH and len(i) <= MAX_ID_LENGTH


@FAST
@given(W_IDS, I_IDS, st.booleans(), st.integers(0, 2))
def test_parse_body_round_trip(w, i, swap, indent):
    fields = {"i_id": i, "w_id": w} if swap else {"w_id": w, "i_id": i}
    assert parse_body(json.dumps(fields, indent=indent or None)) == (w, i)


SEPARATORS = st.sampled_from([",", " ", "\t", ", ", " , ", ",,", "  "])


@FAST
@given(st.lists(st.tuples(W_IDS, I_IDS, SEPARATORS, st.sampled_from(["", "  # note", "#", " \t"])), max_size=8),
       st.lists(st.sampled_from(["", "   ", "# comment", "#W1,I1"]), max_size=3))
def test_volume_list_round_trip(volumes, noise):
    lines = list(noise) + [f"  {w}{sep}{i}{tail}" for w, i, sep, tail in volumes]
    assert parse_lines(lines, "vols.txt") == [(w, i) for w, i, _, _ in volumes]
    for w, i, sep, _ in volumes:
        assert parse_volume(f"{w}{sep}{i}", "--volume #1") == (w, i)


@FAST
@given(st.lists(st.text(max_size=60), max_size=6))
def test_volume_list_raises_only_bad_input_naming_the_line(lines):
    try:
        found = parse_lines(lines, "vols.txt")
    except BadInput as exc:
        assert str(exc).startswith("vols.txt line ")
        return
    for w, i in found:
        assert W_ID.fullmatch(w) and I_ID.fullmatch(i) and len(w) <= MAX_ID_LENGTH and len(i) <= MAX_ID_LENGTH


def assert_entries_safe(m: archive.Manifest) -> None:
    for e in m.entries:
        e.filename.encode("utf-8")
        if e.problem is None:
            name = e.filename
            assert name and "/" not in name and "\\" not in name and name not in (".", "..")
            assert not any(ord(c) < 32 for c in name) and len(name.encode("utf-8")) <= MAX_FILENAME
        for dim in (e.width, e.height):
            assert dim is None or (type(dim) is int and dim > 0)


@FAST
@given(st.one_of(st.binary(max_size=200), st.binary(max_size=200).map(gzip.compress),
                 JSON_VALUES.map(lambda v: json.dumps(v).encode()), JSON_VALUES.map(gz)))
def test_parse_manifest_raises_only_terminal(raw):
    try:
        m = manifest_of(raw)
    except TerminalError as exc:
        assert str(exc).startswith("invalid manifest: ")
        return
    assert m.entries and any(e.problem is None for e in m.entries)
    assert_entries_safe(m)


ENTRY = st.fixed_dictionaries(
    {"filename": st.one_of(st.text(max_size=30), st.sampled_from(["..", ".", "a/b", "a\\b", "\ud800", "x" * 300])),
     "width": st.one_of(st.integers(-5, 10**6), st.none(), st.text(max_size=3), st.booleans(), st.floats()),
     "height": st.integers(-5, 10**6)},
    optional={"size": st.integers(0, 10**9)})


@FAST
@given(st.lists(ENTRY, min_size=1, max_size=20), st.booleans())
def test_parse_manifest_keeps_every_entry_in_order(entries, compressed):
    raw = gz(entries) if compressed else json.dumps(entries).encode()
    try:
        m = manifest_of(raw)
    except TerminalError as exc:
        assert "none of its" in str(exc)
        return
    assert len(m.entries) == len(entries)
    assert_entries_safe(m)
    for raw_entry, e in zip(entries, m.entries):
        if e.problem is None:
            assert e.filename == raw_entry["filename"]
            assert e.height == (raw_entry["height"] if raw_entry["height"] > 0 else None)


@FAST
@given(st.lists(st.tuples(st.text(alphabet=string.ascii_letters + string.digits + "._-é", min_size=1, max_size=40),
                          st.integers(1, 10**5), st.integers(1, 10**5)), min_size=1, max_size=30))
def test_parse_manifest_round_trip(items):
    items = [(n, w, h) for n, w, h in items if n not in (".", "..")] or [("a.jpg", 1, 1)]
    m = manifest_of(gz([{"filename": n, "width": w, "height": h} for n, w, h in items]))
    assert [(e.filename, e.width, e.height, e.problem) for e in m.entries] == [(n, w, h, None) for n, w, h in items]


# ============================================================================================
# 5. through a real worker
# ============================================================================================
def drain_dlq(stack, url: str) -> dict[str, str]:
    got = {}
    while batch := stack.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                             MessageAttributeNames=["All"]).get("Messages", []):
        for m in batch:
            got[m["Body"]] = m["MessageAttributes"]["bec_reason"]["StringValue"]
            stack.sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    return got


@pytest.mark.slow
def test_the_zoo_through_a_worker(stack):
    """Poison bodies, bad manifests and every image kind in one worker run."""
    from conftest import DEST_BUCKET, SOURCE_BUCKET
    from bec.devstack.volumes import put_manifest
    from workerkit import read_parquet, run_worker, send, setup_job, tasks

    q = setup_job(stack)
    s3 = stack.s3

    def put(w: str, i: str, files: dict[str, bytes]) -> None:
        for name, data in files.items():
            s3.put_object(Bucket=SOURCE_BUCKET, Key=volume_prefix(w, i) + name, Body=data)

    # W1/I1: every image kind, good and bad
    good, bad = good_images(), bad_images()
    put("W1", "I1", {n: v[0] for n, v in good.items()} | {n: v[0] for n, v in bad.items()})
    names = sorted(good) + sorted(bad)
    put_manifest(s3, SOURCE_BUCKET, "W1", "I1", [{"filename": n, "width": 300, "height": 120} for n in names])
    # W1/I2: a plain JSON manifest with duplicates and unsafe names
    png = good["page.png"][0]
    put("W1", "I2", {"a.png": png, "b.png": png})
    dup = [{"filename": "a.png"}, {"filename": "b.png"}, {"filename": "a.png"}, {"filename": "x/y.png"},
           {"filename": "..\\b.png"}, {"filename": ".."}, {"width": 3}]
    put_manifest(s3, SOURCE_BUCKET, "W1", "I2", [], raw=json.dumps(dup).encode())
    # W1/I3…I6: manifests that can never work
    terminal = {"I3": (gzip.compress(b"<html>not json</html>"), "not JSON"),
                "I4": (gz({"filename": "a.jpg"}), "expected a list of images, got dict"),
                "I5": (gzip.compress(b"[" * 50_000), "nested too deeply"),
                "I6": (gz([{"name": "a.jpg"}, {"filename": "../../x"}]), "none of its 2 entries is usable")}
    for i, (raw, _) in terminal.items():
        put_manifest(s3, SOURCE_BUCKET, "W1", i, [], raw=raw)

    poison = [text for text, _ in POISON]
    volumes = [json.dumps({"w_id": "W1", "i_id": i}) for i in ("I1", "I2", *terminal)]
    send(stack, q["queue"], poison[:10] + volumes[:3] + poison[10:] + volumes[3:])
    run = run_worker(stack)
    assert " died " not in run.output and "Traceback" not in run.output, run.output
    assert run.output.count("Poison message") == len(POISON), run.output

    # every poison body in the DLQ, unchanged, with its reason; the terminal volumes too
    reasons = drain_dlq(stack, q["dlq"])
    for text, reason in POISON:
        assert text in reasons, (text, sorted(reasons))
        assert reason in reasons[text], (text, reasons[text])
    for i, (_, reason) in terminal.items():
        assert reason in reasons[json.dumps({"w_id": "W1", "i_id": i})]
    assert len(reasons) == len(POISON) + len(terminal)

    rows = {r["i_id"]: r for r in tasks(stack)}
    assert sorted(rows) == ["I1", "I2", "I3", "I4", "I5", "I6"]
    for i, (_, reason) in terminal.items():
        assert rows[i]["status"] == "terminal_failed" and reason in rows[i]["error_reason"]

    # images: one row each, in manifest order, with the right verdict
    assert rows["I1"]["status"] == "done" and rows["I1"]["nb_errors"] == len(bad)
    pages = read_parquet(stack, "W1", "I1", rows["I1"]["s3_etag"])
    assert [p["img_file_name"] for p in pages] == names
    for p in pages:
        name = p["img_file_name"]
        if name in good:
            assert p["ok"] and (p["width"], p["height"]) == (300, 120) and p["frame_width"] > 0, p
            assert p["error_type"] is None
        else:
            kind, text = bad[name][1], bad[name][2]
            assert not p["ok"] and (p["error_stage"], p["error_type"]) == ("decode", kind), p
            assert text in p["error_message"]

    # duplicates: one row per entry; unsafe names: error rows, never fetched
    assert rows["I2"]["status"] == "done" and rows["I2"]["nb_errors"] == 4
    pages = read_parquet(stack, "W1", "I2", rows["I2"]["s3_etag"])
    assert [(p["img_file_name"], p["ok"], p["error_stage"]) for p in pages] == [
        ("a.png", True, None), ("b.png", True, None), ("a.png", True, None), ("x/y.png", False, "manifest"),
        ("..\\b.png", False, "manifest"), ("..", False, "manifest"), ("#6", False, "manifest")]

    # nothing was created for a poison message: no volume row, no object outside ldv1/W1/I*
    volumes_rows = stack.db.rows("SELECT bdrc_w_id, bdrc_i_id FROM volumes ORDER BY bdrc_i_id")
    assert [(v["bdrc_w_id"], v["bdrc_i_id"]) for v in volumes_rows] == [("W1", f"I{n}") for n in range(1, 7)]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=DEST_BUCKET).get("Contents", [])]
    assert len(keys) == 4 and all(k.startswith(("ldv1/W1/I1/", "ldv1/W1/I2/")) for k in keys), keys


@pytest.mark.slow
def test_a_100k_page_volume_is_accepted_streamed_and_released(stack):
    """Verdict for a 100,000-entry manifest: a legitimate (huge) volume. The worker admits it,
    streams its pages through the bounded slot pool (memory does not grow with the manifest),
    extends its visibility, and on shutdown releases it for another worker."""
    from conftest import SOURCE_BUCKET
    from bec.devstack.volumes import put_manifest
    from workerkit import queue_counts, setup_job, start_worker, tasks, enqueue

    q = setup_job(stack)
    entries = [{"filename": f"p{n:06d}.jpg", "width": 2000, "height": 700} for n in range(100_000)]
    put_manifest(stack.s3, SOURCE_BUCKET, "W1", "I100K", entries)
    enqueue(stack, q["queue"], [("W1", "I100K")])
    run = start_worker(stack, "--shutdown-after-empty", "0", "--grace", "0", "--visibility-timeout", "4")
    try:
        run.wait_for("(100000 pages", timeout=60)
        controller = run.wait_children(["controller"])["controller"]
        time.sleep(5)  # > a visibility timeout: it must be extended, the pages flowing
        assert controller.memory_info().rss < 1 << 30
        row = stack.db.row("SELECT nb_images FROM volumes WHERE bdrc_i_id = 'I100K'")
        assert row["nb_images"] == 100_000
        assert tasks(stack)[0]["status"] == "running"
        assert queue_counts(stack, q["queue"]) == (0, 1)  # still ours: visibility was extended
    finally:
        run.signal(signal.SIGTERM)
    assert run.wait(60) == 0, run.output
    assert "Released volume W1/I100K" in run.output and " died " not in run.output
    row = tasks(stack)[0]
    assert row["status"] == "retryable_failed" and "released" in row["error_reason"]
    assert queue_counts(stack, q["queue"]) == (1, 0)  # visible again at once for another worker


def test_a_folder_source_does_not_read_a_file_over_its_limit(tmp_path):
    """As S3's answer: the length first, for the fetch to refuse before anything is read."""
    from bec.edges.localarchive import DirectoryS3

    (tmp_path / "big.tif").write_bytes(bytes(1000))
    (tmp_path / "small.tif").write_bytes(b"II*\x00")
    folder = DirectoryS3(f"file://{tmp_path}", max_bytes=100)
    big = folder.get_object(Bucket="x", Key="big.tif")
    assert big["ContentLength"] == 1000 and big["Body"].read() == b""
    small = folder.get_object(Bucket="x", Key="small.tif")
    assert small["Body"].read() == b"II*\x00"
    assert small["ETag"] == '"' + __import__("hashlib").md5(b"II*\x00").hexdigest() + '"'   # as S3's
