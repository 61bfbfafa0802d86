"""A reproducible corpus shaped like the archive, for benchmarks.

About 70 % JPEG (RGB and grayscale, a few hundred kB, long side up to ~4,000 px, mostly
wide pecha pages, the rest book pages) and 30 % Group 4 bilevel TIFF (tens of kB). One
page in ten is bent and one in ten skewed by 4–5° (photographed folios), so the second
pass and the dewarp cost what they cost on the archive. Generating a page costs
tens of milliseconds, so a pool of distinct pages (seeded) is rendered once, cached on
disk, and volumes draw from it: decode and inference costs are those of real distinct
pages, while a 5,000-page corpus is ready in seconds.
"""
from __future__ import annotations

import gzip
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bec.edges.archive import MANIFEST, volume_prefix

KIND_WEIGHTS = {"jpeg_rgb": 0.35, "jpeg_gray": 0.35, "tiff_g4": 0.30}
GEOMETRY_WEIGHTS = {"straight": 0.8, "bent": 0.1, "skewed": 0.1}
#: Part of the cache's name: a pool drawn by older code is not reused (3: the font-rendered
#: generator, with bent and skewed pages).
POOL_VERSION = 3
JPEG_QUALITY = 93  # the archive's JPEGs are large (~300–800 kB)


@dataclass(frozen=True)
class Page:
    kind: str
    data: bytes
    width: int
    height: int
    n_lines: int
    geometry: str = "straight"


@dataclass
class Corpus:
    pool: list[Page]
    volumes: list[tuple[str, str, list[int]]]  # (W, I, indices into pool)

    @property
    def pages(self) -> int:
        return sum(len(ix) for _, _, ix in self.volumes)

    def items(self) -> list[tuple[str, str, str, Page]]:
        """(W, I, filename, page) in manifest order."""
        out = []
        for w, i, ix in self.volumes:
            for n, k in enumerate(ix):
                page = self.pool[k]
                ext = "tif" if page.kind == "tiff_g4" else "jpg"
                out.append((w, i, f"{i}{n + 1:05d}.{ext}", page))
        return out

    def bytes_total(self) -> int:
        return sum(p.data.__len__() for *_, p in self.items())


def _render(kind: str, geometry: str, rng: np.random.Generator) -> Page:
    from bec.devstack.volumes import geometry_args
    from bec.tools.synth import encode_jpeg, encode_tiff_g4, generate_page

    capture = {"jpeg_rgb": "photo", "jpeg_gray": "scan", "tiff_g4": "bilevel"}[kind]
    synth = generate_page(rng, capture=capture, **geometry_args(geometry, rng))
    data = (encode_tiff_g4(synth.image, synth.dpi) if kind == "tiff_g4"
            else encode_jpeg(synth.image, rgb=kind == "jpeg_rgb", quality=JPEG_QUALITY))
    h, w = synth.image.shape
    return Page(kind, data, w, h, synth.n_lines, geometry)


def page_pool(size: int, seed: int, cache_dir: Path | None) -> list[Page]:
    cache = cache_dir / f"pool-v{POOL_VERSION}-{seed}-{size}.pkl" if cache_dir else None
    if cache and cache.exists():
        return pickle.loads(cache.read_bytes())  # noqa: S301 - our own cache file
    rng = np.random.default_rng(seed)
    kinds = list(KIND_WEIGHTS)
    picks = rng.choice(len(kinds), size=size, p=list(KIND_WEIGHTS.values()))
    geometries = list(GEOMETRY_WEIGHTS)
    shapes = rng.choice(len(geometries), size=size, p=list(GEOMETRY_WEIGHTS.values()))
    pool = [_render(kinds[k], geometries[g], rng) for k, g in zip(picks, shapes)]
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_bytes(pickle.dumps(pool))
    return pool


def build(pages: int, volumes: int, seed: int = 2026, pool_size: int = 120,
          cache_dir: Path | None = None) -> Corpus:
    pool = page_pool(min(pool_size, pages), seed, cache_dir)
    rng = np.random.default_rng(seed + 1)
    per = [pages // volumes + (1 if v < pages % volumes else 0) for v in range(volumes)]
    vols = [(f"W{9000 + v}", f"I{9000 + v}", list(rng.integers(0, len(pool), size=n)))
            for v, n in enumerate(per)]
    return Corpus(pool, vols)


def publish(corpus: Corpus, put: Callable[[str, bytes], Any]) -> None:
    """Write images and gzip'd manifests through ``put(key, data)`` (S3 or a folder)."""
    manifests: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for w, i, name, page in corpus.items():
        put(volume_prefix(w, i) + name, page.data)
        manifests.setdefault((w, i), []).append({"filename": name, "width": page.width,
                                                 "height": page.height})
    for (w, i), entries in manifests.items():
        put(volume_prefix(w, i) + MANIFEST, gzip.compress(json.dumps(entries).encode()))


def folder_writer(root: Path) -> Callable[[str, bytes], None]:
    def put(key: str, data: bytes) -> None:
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return put


def s3_writer(s3: Any, bucket: str) -> Callable[[str, bytes], None]:
    def put(key: str, data: bytes) -> None:
        s3.put_object(Bucket=bucket, Key=key, Body=data)
    return put
