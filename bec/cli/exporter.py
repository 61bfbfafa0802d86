"""``bec exporter``: the job-level Prometheus endpoint (queues, task counts; see bec.observe.exporter)."""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import click

from bec.cli.context import AppContext, pass_app, stale_after_setting
from bec.errors import BadInput

log = logging.getLogger("bec.exporter")


@click.command("exporter")
@click.option("--port", type=click.IntRange(0, 65535), default=9109, show_default=True,
              help="Port of the /metrics endpoint (0 = any free port).")
@click.option("--addr", default="127.0.0.1", show_default=True,
              help="Address the endpoint listens on: 127.0.0.1 is this host only; 0.0.0.0 (or the "
                   "host's address) for a Prometheus on another host.")
@click.option("--interval", type=click.FloatRange(0.1), default=15.0, show_default=True,
              help="Seconds a refresh of the values is reused (scrapes within it cost nothing).")
@click.option("--stale-after", type=click.FloatRange(1), default=None,
              help="Seconds without a heartbeat after which a worker counts as dead: its running "
                   "tasks are exported as stalled [default: 60, as the worker's; env BEC_STALE_AFTER].")
@click.option("--log-json", is_flag=True, help="Log JSON lines (for CloudWatch).")
@pass_app
def command(app: AppContext, port: int, addr: str, interval: float, stale_after: float | None,
            log_json: bool) -> None:
    """Export every job's queue depth, DLQ and task counts for Prometheus."""
    from prometheus_client import CollectorRegistry, start_http_server

    from bec.edges import aws
    from bec.observe.exporter import JobExporter
    from bec.observe.logs import setup_logging

    setup_logging(json_lines=log_json)
    # the pool logs every failed reconnection; the exporter's own warning says it once per refresh
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    settings = app.settings
    db_params = settings.db_params()  # a missing setting is an operator error: say it now
    region = app.region
    collector = JobExporter(db_params, lambda: aws.client("sqs", region, max_attempts=2, read_timeout=10),
                            interval=interval, connect_timeout=3.0,
                            stale_after_s=stale_after_setting(app, stale_after))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    try:
        server, _thread = start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise BadInput(f"cannot listen on {addr}:{port}: {exc.strerror or exc}") from None
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    log.info(f"Exporter: http://{addr}:{server.server_port}/metrics "
             f"(database {db_params.describe()}, region {region}, refresh every {interval:g}s)")
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.shutdown()
        collector.close()
        log.info("Exporter stopped")
