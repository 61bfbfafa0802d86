"""The ocr kind's own Prometheus series (the worker's registry: every process's samples are
aggregated by the supervisor, see ``bec.observe.metrics``). Pages, page errors by stage and type
(``ocr``, ``lines``…) and per-stage latency (``ocr``, ``cut``) are the worker's common ones."""
from __future__ import annotations

from prometheus_client import Counter, Histogram

LINES = Counter("bec_ocr_lines_total", "Text lines recognised", ["source"])  # source: ldv1, page
CHARACTERS = Counter("bec_ocr_characters_total", "Characters recognised (whitespace excluded)")
CONFIDENCE = Histogram("bec_ocr_page_confidence", "Pages' mean line confidence (0-100, weighted by characters)",
                       buckets=(10, 20, 30, 40, 50, 60, 70, 80, 85, 90, 95, 100))
DROPPED = Counter("bec_ocr_lines_dropped_total", "Lines read but left out: empty or under min_confidence")


def start_series() -> None:
    """Series at 0 before the first page, so panels read 0 rather than "No data"."""
    for source in ("ldv1", "page"):
        LINES.labels(source)
