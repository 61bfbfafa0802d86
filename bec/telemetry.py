"""Serving the worker's metrics: the multiprocess folder and the supervisor's endpoint.

Kept apart from ``bec.metrics`` because the folder must be chosen before
prometheus_client is imported (the library decides its storage at import time).
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

log = logging.getLogger("bec.telemetry")
ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Where metrics endpoints listen unless told otherwise: this host only. The metrics name
#: the job, the model's hash and the host's memory; exposing them to every network the
#: host is on is the operator's decision (--metrics-addr 0.0.0.0), not a default.
LOCAL_ONLY = "127.0.0.1"


def enable() -> Path:
    """Create this worker's metrics folder and point this process (and its children) at it.

    Call before ``bec.metrics`` is imported: metric objects pick their storage when created.
    """
    folder = Path(tempfile.mkdtemp(prefix=f"bec-metrics-{os.getpid()}-"))
    os.environ[ENV] = str(folder)
    values = sys.modules.get("prometheus_client.values")
    if values is not None:  # imported already (by a library): switch its storage too
        values.ValueClass = values.get_value_class()
    return folder


def cleanup(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def mark_dead(pid: int) -> None:
    """A child died: drop its live gauges (its counters stay counted)."""
    if os.environ.get(ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def resident_memory(pid: int) -> dict[str, int]:
    """Bytes of a process' resident memory by kind, from ``/proc/<pid>/status``: ``anon``
    (its own heap), ``file`` (mapped libraries), ``shmem`` (the slot pool). Raises OSError
    when the process is gone."""
    parts: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                key, value = line.split(":")
                parts[key[3:].lower()] = int(value.split()[0]) * 1024
    return parts


class CallbackCollector:
    """Metrics computed at scrape time (e.g. slot occupancy read from shared memory)."""

    def __init__(self, collect: Callable[[], Iterable[Any]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Any]:
        return self._collect()


def serve(port: int, addr: str, extra: Callable[[], Iterable[Any]] | None = None) -> Any | None:
    """Start the endpoint; a port already taken is a warning, not a reason to stop working."""
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    if extra is not None:
        registry.register(CallbackCollector(extra))
    try:
        server, _thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        log.warning("metrics endpoint not started on %s:%d: %s", addr, port, exc.strerror or exc)
        return None
    log.info(f"Metrics: http://{addr}:{server.server_port}/metrics")
    return server
