"""Observability: what a worker and a job say about themselves.

``logs`` (plain or JSON lines, never secrets), ``metrics`` (the worker's Prometheus
series, shared by its processes), ``telemetry`` (serving them and per-process memory) and
``exporter`` (the job-level endpoint: queues and task counts).
"""
