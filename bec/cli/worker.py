"""``bec worker``: run the multiprocess pipeline for a job until the queue stays empty."""
from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

import click

from bec.control import jobs as jobstore, queues, tasks
from bec.edges import aws
from bec.cli.context import AppContext, pass_app, valid_job_name
from bec.errors import BadInput
from bec.control.ids import check_job_name
from bec.control.jobkinds import KINDS, kind_of
from bec.observe.telemetry import LOCAL_ONLY

log = logging.getLogger("bec.worker")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def count_gpus() -> int:
    """NVIDIA GPUs visible to this process, without importing torch in the supervisor."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


def _setting(app: AppContext, value: Any, env: str, default: Any, cast: type = str) -> Any:
    if value is not None:
        return value
    raw = app.settings.get(env)
    if raw is None:
        return default
    try:
        return cast(raw)
    except ValueError:
        raise BadInput(f"{env} must be {cast.__name__}, got {raw!r}") from None


@click.command("worker")
@click.option("--job-name", required=True, callback=valid_job_name, help="Job name (required).")
@click.option("--poll-wait", type=click.IntRange(0, 20), default=None,
              help="SQS long-poll wait in seconds [default: 20; env BEC_POLL_WAIT].")
@click.option("--visibility-timeout", type=click.IntRange(1, 43200), default=None,
              help="SQS visibility timeout in seconds [default: 300; env BEC_VISIBILITY_TIMEOUT].")
@click.option("--shutdown-after-empty", type=click.IntRange(0), default=None,
              help="Exit after N empty polls with nothing in flight; 0 = never "
                   "[default: 6; env BEC_SHUTDOWN_AFTER_EMPTY].")
@click.option("--s3-source-bucket", default=None,
              help="Bucket of the image archive [default: archive.tbrc.org; env BEC_SOURCE_S3_BUCKET].")
@click.option("--s3-dest-bucket", default=None, help="Bucket for artifacts [env BEC_DEST_S3_BUCKET].")
@click.option("--region", default=None, help="AWS region [env BEC_REGION].")
@click.option("--model-path", default=None,
              help="Model checkpoint (.pth), or 'null' for no model [env BEC_LD_MODEL_PATH].")
@click.option("--procs", type=click.IntRange(1, 64), default=None,
              help="Fetch/decode processes [default: usable cores − 1, at least 1; env BEC_PROCS].")
@click.option("--post-procs", type=click.IntRange(1, 16), default=None,
              help="Post-processing processes [default: 1 per 4 fetch processes, at least 1].")
@click.option("--fetch-threads", type=click.IntRange(1, 64), default=None,
              help="Concurrent S3 GETs per fetch process [default: 4].")
@click.option("--infer-threads", type=click.IntRange(1, 256), default=None,
              help="torch threads of each CPU inference process [default: usable cores ÷ inference processes, "
                   "1 for the null model; env BEC_INFER_THREADS].")
@click.option("--infer-procs", type=click.IntRange(1, 64), default=None,
              help="Inference processes [default: one per GPU; on CPU one per usable core (at most 8), 1 for the "
                   "null model; env BEC_INFER_PROCS].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Inference device; auto = CUDA when the job config's use_gpu and a GPU are present.")
@click.option("--grace", type=click.FloatRange(0), default=None,
              help="On SIGTERM, seconds to finish in-flight volumes before releasing them [default: 120].")
@click.option("--max-volumes-in-flight", type=click.IntRange(1, 64), default=None,
              help="Volumes received and claimed ahead [default: 3].")
@click.option("--retry-delay", type=click.IntRange(0, 900), default=None,
              help="Seconds before a retryable volume is visible again, doubling per receive [default: 30].")
@click.option("--stale-after", type=click.FloatRange(1), default=None,
              help="Seconds without heartbeat after which another worker's running task may be "
                   "taken over [default: 60; env BEC_STALE_AFTER].")
@click.option("--worker-name", default=None, help="Name shown in `bec workers list` [default: host name].")
@click.option("--log-json", is_flag=True, default=None, help="Log JSON lines (for CloudWatch).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Prometheus endpoint port, 0 = none [default: 9108; env BEC_METRICS_PORT].")
@click.option("--metrics-addr", default=None,
              help="Address the metrics endpoint listens on: 0.0.0.0 (or the host's address) for a "
                   "Prometheus on another host [default: 127.0.0.1, this host only; env BEC_METRICS_ADDR].")
@pass_app
def command(app: AppContext, job_name: str, **opts: Any) -> None:
    """Run a worker for a job: poll its queue, process volumes, write artifacts."""
    from bec.observe import telemetry

    folder = telemetry.enable()  # before anything creates a metric
    try:
        _run_worker(app, job_name, opts)
    finally:
        telemetry.cleanup(folder)


def _check_buckets(region: str, source_bucket: str, dest_bucket: str) -> None:
    """Both buckets exist, and a missing object reads as missing, before the first volume is
    taken (see ``aws.check_bucket``)."""
    from bec.edges.localarchive import is_local, local_root

    s3 = aws.client("s3", region, max_attempts=2)
    checks = [(dest_bucket, "destination", "--s3-dest-bucket / BEC_DEST_S3_BUCKET")]
    if is_local(source_bucket):
        root = local_root(source_bucket)
        if not root.is_dir():
            raise BadInput(f"the source folder {str(root)!r} does not exist or is not a folder: "
                           "check --s3-source-bucket / BEC_SOURCE_S3_BUCKET")
    else:
        checks.insert(0, (source_bucket, "source", "--s3-source-bucket / BEC_SOURCE_S3_BUCKET"))
    for bucket, role, setting in checks:
        with aws.cli_errors(f"S3 {role} bucket {bucket}", aws.endpoint_of(s3)):
            aws.check_bucket(s3, bucket, role, setting)


def _run_worker(app: AppContext, job_name: str, opts: dict[str, Any]) -> None:
    from bec.observe.logs import setup_logging
    from bec.pipeline.child import PipelineSpec
    from bec.pipeline.slots import SlotPool
    from bec.pipeline.supervisor import Supervisor, new_namespace, slot_count

    log_json = bool(_setting(app, opts["log_json"], "BEC_LOG_JSON", False, lambda v: v.lower() in ("1", "true", "yes")))
    setup_logging(json_lines=log_json)
    check_job_name(job_name)
    kind = kind_of(job_name)
    if kind is None:
        raise BadInput(f"job {job_name!r} has no worker implementation "
                       f"(known: {', '.join(f'{k}, {k}-*' for k in KINDS)})")
    kind.check_installed()
    settings = app.settings
    region = settings.region(opts["region"])
    dest_bucket = settings.dest_bucket(opts["s3_dest_bucket"])
    source_bucket = settings.source_bucket(opts["s3_source_bucket"])
    db = app.db
    job = jobstore.get(db, job_name)
    config = kind.validate(job.config)

    cores = usable_cores()
    procs = _setting(app, opts["procs"], "BEC_PROCS", max(1, cores - 1), int)
    plan = kind.plan(settings, {
        "model_path": opts["model_path"], "device": opts["device"], "procs": procs,
        "infer_procs": _setting(app, opts["infer_procs"], "BEC_INFER_PROCS", None, int),
        "infer_threads": _setting(app, opts["infer_threads"], "BEC_INFER_THREADS", None, int),
        "post_procs": _setting(app, opts["post_procs"], "BEC_POST_PROCS", None, int),
    }, config, cores, count_gpus())
    identity, device = plan.identity, plan.device
    sqs = app.sqs
    with aws.cli_errors(f"SQS queue {queues.queue_name_of(job.queue_url)}", aws.endpoint_of(sqs)):
        # the queue exists, the endpoint answers, and its redrive says when to give up
        max_receives = queues.max_receive_count(sqs, job.queue_url)
    _check_buckets(region, source_bucket, dest_bucket)
    worker_name = opts["worker_name"] or settings.get("BEC_WORKER_NAME") or socket.gethostname()
    worker_id = tasks.register_worker(db, worker_name, job.id, {"procs": procs, "device": device,
                                                                "model": identity})
    say = log.info
    say("Starting BEC Worker")
    say(f"Job: {job.name}")
    say(f"Region: {region}")
    say(f"Source bucket: {source_bucket}")
    say(f"Dest bucket: {dest_bucket}")
    say(f"Worker initialized: worker_id={worker_id}, job_id={job.id}")
    say(f"Queue: {job.queue_url}")
    say(f"DLQ: {job.dlq_url}")
    for line in plan.lines:
        say(line)

    pipeline = PipelineSpec(
        namespace=new_namespace(worker_id), roles=[], slots=None,  # type: ignore[arg-type]
        job_name=job.name, job_id=job.id, worker_id=worker_id, config=plan.config,
        model_path=plan.model_path, model_identity=identity, region=region,
        source_bucket=source_bucket, dest_bucket=dest_bucket, queue_url=job.queue_url,
        dlq_url=job.dlq_url, db=settings.db_params(), device=device,
        threshold_in_fetch=plan.threshold_in_fetch,
        fetch_threads=_setting(app, opts["fetch_threads"], "BEC_FETCH_THREADS", PipelineSpec.fetch_threads, int),
        n_fetch=procs, n_infer=plan.n_infer, n_post=plan.n_post, infer_threads=plan.infer_threads,
        cpu_nice=_setting(app, None, "BEC_CPU_NICE", PipelineSpec.cpu_nice, int),
        poll_wait=_setting(app, opts["poll_wait"], "BEC_POLL_WAIT", 20, int),
        visibility_timeout=_setting(app, opts["visibility_timeout"], "BEC_VISIBILITY_TIMEOUT", 300, int),
        shutdown_after_empty=_setting(app, opts["shutdown_after_empty"], "BEC_SHUTDOWN_AFTER_EMPTY", 6, int),
        max_volumes_in_flight=_setting(app, opts["max_volumes_in_flight"], "BEC_MAX_VOLUMES_IN_FLIGHT", 3, int),
        retry_delay=_setting(app, opts["retry_delay"], "BEC_RETRY_DELAY", 30, int),
        stale_after_s=_setting(app, opts["stale_after"], "BEC_STALE_AFTER", 60.0, float),
        max_receive_count=max_receives,
        log_json=log_json, extra={"worker_name": worker_name})
    pipeline.roles = (["controller"] + [f"infer-{i}" for i in range(pipeline.n_infer)]
                      + [f"post-{i}" for i in range(pipeline.n_post)]
                      + [f"fetch-{i}" for i in range(pipeline.n_fetch)])
    slots = SlotPool.create(slot_count(pipeline, plan.batch_pages), plan.frame_area, roles=len(pipeline.roles) + 1)
    pipeline.slots = slots.handle()
    say(f"Pipeline: {pipeline.n_fetch} fetch × {pipeline.fetch_threads} threads, "
        f"{pipeline.n_infer} {'inference' if kind.name == 'ldv1' else kind.name} ({device}"
        f"{'' if device == 'cuda' else f' × {pipeline.infer_threads} threads'}), {pipeline.n_post} post, "
        f"{slots.layout.count} slots of {2 * slots.layout.area_bytes >> 20} MiB")
    grace = _setting(app, opts["grace"], "BEC_GRACE", 120.0, float)
    metrics_port = _setting(app, opts["metrics_port"], "BEC_METRICS_PORT", 9108, int)
    metrics_addr = _setting(app, opts["metrics_addr"], "BEC_METRICS_ADDR", LOCAL_ONLY)
    code = Supervisor(pipeline, db, slots).run(grace, metrics_port, metrics_addr)
    slots.close()
    say("Worker shutdown complete")
    sys.stdout.flush()
    if code:
        sys.exit(code)
