"""What a user would otherwise write, on the same data with the same model and post-processing:
a sequential loop, and a ``torch.utils.data.DataLoader`` with worker processes."""
from __future__ import annotations

import os
import time
from typing import Any

from benchmarks import pagework as W
from bec.edges.archive import volume_prefix


def _client(source: str, region: str) -> Any:
    from bec.edges.localarchive import source_client

    return source_client(source, region)


def sequential(items: list[tuple[str, str, str, Any]], source: str, region: str, segmenter: Any,
               cfg: dict[str, Any]) -> dict[str, Any]:
    """fetch → decode → infer → post, one page after the other; Parquet per volume."""
    from bec.edges import artifacts

    client = _client(source, region)
    started = time.perf_counter()
    volume, outcomes = None, []
    for w, i, name, _page in items:
        if volume is not None and volume != (w, i):
            artifacts.parquet_bytes(outcomes)
            outcomes = []
        volume = (w, i)
        data = client.get_object(Bucket=source, Key=volume_prefix(w, i) + name)["Body"].read()
        frame = W.decode_frame(data, cfg)
        outcomes.extend(W.process_pages(segmenter, [frame], cfg))
    if outcomes:
        artifacts.parquet_bytes(outcomes)
    seconds = time.perf_counter() - started
    return {"name": "sequential loop", "pages": len(items), "seconds": round(seconds, 3),
            "pages_per_s": round(len(items) / seconds, 2)}


class PageDataset:
    """A map-style dataset: item n = the decoded, thresholded frame of page n."""

    def __init__(self, items: list[tuple[str, str, str, Any]], source: str, region: str,
                 cfg: dict[str, Any]) -> None:
        self.keys = [(w, i, volume_prefix(w, i) + name) for w, i, name, _ in items]
        self.source, self.region, self.cfg = source, region, cfg
        self._client = None

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, n: int) -> tuple[str, str, W.Frame]:
        if self._client is None:
            self._client = _client(self.source, self.region)
        w, i, key = self.keys[n]
        data = self._client.get_object(Bucket=self.source, Key=key)["Body"].read()
        return w, i, W.decode_frame(data, self.cfg)


def dataloader(items: list[tuple[str, str, str, Any]], source: str, region: str, segmenter: Any,
               cfg: dict[str, Any], workers: int, batch_pages: int = 8) -> dict[str, Any]:
    import torch.utils.data

    from bec.edges import artifacts

    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    os.environ.update(env)
    loader = torch.utils.data.DataLoader(PageDataset(items, source, region, cfg), batch_size=batch_pages,
                                         num_workers=workers, collate_fn=list, prefetch_factor=2,
                                         persistent_workers=False)
    started = time.perf_counter()
    by_volume: dict[tuple[str, str], list] = {}
    for batch in loader:
        outcomes = W.process_pages(segmenter, [f for _, _, f in batch], cfg)
        for (w, i, _), outcome in zip(batch, outcomes):
            by_volume.setdefault((w, i), []).append(outcome)
    for outcomes in by_volume.values():
        artifacts.parquet_bytes(outcomes)
    seconds = time.perf_counter() - started
    return {"name": f"DataLoader ({workers} workers, batches of {batch_pages} pages)", "pages": len(items),
            "seconds": round(seconds, 3), "pages_per_s": round(len(items) / seconds, 2)}
