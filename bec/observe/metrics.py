"""The worker's Prometheus metrics (DESIGN §8), shared by every process of a worker.

prometheus_client's multiprocess mode: each process writes its samples to memory-mapped
files in ``PROMETHEUS_MULTIPROC_DIR`` (set by the supervisor before any child starts), and
the supervisor's endpoint aggregates them. A restarted child's counters are kept (its
files stay), its live gauges are dropped (``mark_process_dead``). Labels never carry page
or volume ids: their cardinality is fixed by the code.

The supervisor calls ``bec.observe.telemetry.enable`` before anything imports prometheus_client (the library
picks its storage at import); in processes without the variable (CLI, unit tests) the
same metrics simply live in that process' memory.
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

PAGES = Counter("bec_pages_total", "Pages finished, by outcome (ok or error)", ["outcome"])
PAGE_ERRORS = Counter("bec_page_errors_total", "Failed pages by stage, error type and class "
                      "(deterministic: the page itself, the same on every try; transient: S3, network "
                      "or device trouble, which alone can send a volume back for a retry)",
                      ["stage", "error_type", "class"])
PAGES_RESUMED = Counter("bec_pages_resumed_total",
                        "Pages of retried volumes whose rows were taken from the earlier attempt's partial results")
PAGES_REDONE = Counter("bec_pages_redone_total", "Pages redone after their holder died or stalled")
VOLUMES = Counter("bec_volumes_total", "Volumes by outcome",
                  ["outcome"])  # done, retry, terminal, poison, already_done, not_claimable, released, taken_over
STAGE_SECONDS = Histogram("bec_stage_seconds", "Per-page time in each stage (write: per volume)",
                          ["stage"], buckets=STAGE_BUCKETS)
VOLUME_SECONDS = Histogram("bec_volume_seconds", "Claim to done, per volume",
                           buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 3600))
VOLUMES_IN_FLIGHT = Gauge("bec_volumes_in_flight", "Volumes claimed and not finished",
                          multiprocess_mode="livesum")
PAGES_WAITING = Gauge("bec_pages_waiting", "Pages of claimed volumes not yet dispatched",
                      multiprocess_mode="livesum")

BATCH_FILL = Histogram("bec_inference_batch_fill_ratio", "Tiles in a batch / max_tiles_per_batch",
                       buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
TILES = Counter("bec_inference_tiles_total", "Tiles run through the model")
BATCHES = Counter("bec_inference_batches_total", "Model forward calls")
INFER_BUSY = Counter("bec_inference_busy_seconds_total", "Time spent computing batches: the device's own time on a GPU, the model replica's on CPU")
OVERLAPPED = Counter("bec_inference_overlapped_batches_total",
                     "Batches submitted while the batch before was still being computed or copied back")
INFER_WAIT = Histogram("bec_inference_wait_seconds", "Time the inference process waited for its next page",
                       buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
ACCEL_BUSY = Gauge("bec_accelerator_busy_ratio", "Share of wall time the inference process computes",
                   ["device"], multiprocess_mode="livemax")
ACCEL_MEMORY = Gauge("bec_accelerator_memory_bytes", "Memory allocated on the accelerator",
                     ["device"], multiprocess_mode="livemax")

S3_READ = Counter("bec_s3_read_bytes_total", "Bytes read from S3 (images, manifests, success.json)")
S3_WRITTEN = Counter("bec_s3_written_bytes_total", "Bytes written to S3 (Parquet, success.json)")
SQS_RECEIVES = Counter("bec_sqs_receive_calls_total", "ReceiveMessage calls")
SQS_MESSAGES = Counter("bec_sqs_messages_received_total", "Messages received")
SQS_DELETES = Counter("bec_sqs_deletes_total", "Messages deleted (done or skipped)")
SQS_EXTENSIONS = Counter("bec_sqs_visibility_extensions_total", "Visibility timeouts extended")
SQS_DLQ = Counter("bec_sqs_dlq_sends_total", "Messages sent to the DLQ by the worker", ["reason"])
SQS_REQUEUES = Counter("bec_sqs_requeues_total",
                       "Messages handed back as fresh copies, spending no receive (running elsewhere, drain, outage)")
DB_ERRORS = Counter("bec_db_errors_total", "Database operations that failed")
DB_POOL_WAIT = Histogram("bec_db_pool_wait_seconds", "Time waiting for a pooled DB connection",
                         buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30))

RESTARTS = Counter("bec_child_restarts_total", "Child processes restarted", ["kind"])
INFO = Gauge("bec_worker_info", "Constant 1, labelled with what this worker runs",
             ["version", "job", "model_sha256", "device"], multiprocess_mode="livemax")
HEARTBEAT = Gauge("bec_worker_last_heartbeat_timestamp_seconds", "Last successful DB heartbeat",
                  multiprocess_mode="livemax")


def start_series() -> None:
    """Create the labelled series a healthy worker may never touch (restarts, DLQ sends,
    failures), at 0: a Grafana panel of "restarts" then reads 0, not "No data", and a rate()
    over a counter's first increment is not lost."""
    for kind in ("controller", "fetch", "infer", "post"):
        RESTARTS.labels(kind)
    for reason in ("poison", "terminal", "retries"):
        SQS_DLQ.labels(reason)
    for outcome in ("ok", "error"):
        PAGES.labels(outcome)
    for outcome in ("done", "retry", "terminal", "poison", "already_done", "not_claimable", "released",
                    "taken_over"):
        VOLUMES.labels(outcome)


class BusyWindow:
    """The share of wall time a model process spends working, set on ``ACCEL_BUSY`` over
    windows of a few seconds (a ratio since start would hide an idle minute in an hour)."""

    def __init__(self, device_label: str, every_s: float = 2.0) -> None:
        import time

        self._clock = time.perf_counter
        self.device_label = device_label
        self.every_s = every_s
        self.busy_s = 0.0
        self._window = (self._clock(), 0.0)  # (start, busy seconds at start)

    def add(self, seconds: float) -> None:
        self.busy_s += seconds

    def report(self) -> bool:
        """Set the gauge when a window has passed; True when it did."""
        now = self._clock()
        start, busy_at_start = self._window
        if now - start < self.every_s:
            return False
        ACCEL_BUSY.labels(self.device_label).set((self.busy_s - busy_at_start) / (now - start))
        self._window = (now, self.busy_s)
        return True
