"""A bad page never costs a volume its good pages (issue 19).

Deterministic page errors (the page itself: missing, truncated, too large…) are rows of a
done volume; only transient ones (S3 5xx, throttling, timeouts, resets, once botocore's
retries are spent) count toward ``max_transient_error_ratio`` and send a volume back, and
then its finished pages are kept under ``_partial/`` so the next attempt redoes only the
others. S3's 500s come from a fault-injecting proxy in front of moto (``faultproxy``).
"""
from __future__ import annotations

import signal

import botocore.exceptions
import pytest

from bec.edges import artifacts
from bec.edges.archive import volume_prefix
from bec.devstack.volumes import put_manifest
from conftest import DEST_BUCKET, SOURCE_BUCKET
from faultproxy import FaultProxy
from workerkit import (JOB, add_volumes, enqueue, manifest, queue_counts, read_parquet, read_success,
                       run_worker, start_worker, setup_job, tasks)


def version_of(stack, w: str, i: str) -> str:
    return stack.db.row("SELECT last_s3_etag FROM volumes WHERE bdrc_w_id=%s AND bdrc_i_id=%s", (w, i))["last_s3_etag"]


def dest_keys(stack) -> set[str]:
    return {o["Key"] for o in stack.s3.list_objects_v2(Bucket=DEST_BUCKET).get("Contents", [])}


@pytest.fixture
def proxy(stack):
    """S3 through the fault proxy; botocore tries twice (1 retry) so that spent retries come fast."""
    p = FaultProxy(stack.moto.url)
    yield p
    p.close()


def proxied(proxy: FaultProxy) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL_S3": proxy.url, "AWS_MAX_ATTEMPTS": "2"}


# -- deterministic errors: the volume is done, on its first attempt ------------------------------------
@pytest.mark.slow
def test_a_truncated_and_a_missing_page_leave_a_done_volume_with_its_good_pages(stack):
    """The issue's volume: 6 pages, one truncated JPEG, one listed but not on S3. Before, its 33 %
    of errors was over max_error_ratio (0.1): retried three times, then the DLQ, the 4 good pages
    thrown away each time. Default job config."""
    q = setup_job(stack)
    (w, i), = add_volumes(stack, 1, pages=5)
    prefix = volume_prefix(w, i)
    entries = manifest(stack, w, i)
    first = stack.s3.get_object(Bucket=SOURCE_BUCKET, Key=prefix + entries[1]["filename"])["Body"].read()
    stack.s3.put_object(Bucket=SOURCE_BUCKET, Key=prefix + entries[1]["filename"], Body=first[: len(first) // 3])
    entries.insert(3, {"filename": "gone.jpg", "width": 10, "height": 10})
    put_manifest(stack.s3, SOURCE_BUCKET, w, i, entries)
    enqueue(stack, q["queue"], [(w, i)])
    run = run_worker(stack)

    row, = tasks(stack)
    assert (row["status"], row["attempt"], row["total_images"], row["nb_errors"]) == ("done", 1, 6, 2)
    assert "will be retried" not in run.output
    version = version_of(stack, w, i)
    pages = read_parquet(stack, w, i, version)
    assert [p["img_file_name"] for p in pages] == [e["filename"] for e in entries]
    bad = {p["img_file_name"]: (p["error_stage"], p["error_type"], p["error_message"]) for p in pages if not p["ok"]}
    assert bad.keys() == {entries[1]["filename"], "gone.jpg"} and sum(p["ok"] for p in pages) == 4
    assert bad[entries[1]["filename"]][:2] == ("decode", "corrupt_image") and "corrupt" in bad[entries[1]["filename"]][2]
    assert bad["gone.jpg"][:2] == ("fetch", "missing_object") and "does not exist" in bad["gone.jpg"][2]
    marker = read_success(stack, w, i, version)
    assert marker["nb_errors"] == 2 and marker["errors_by_type"] == {"corrupt_image": 1, "missing_object": 1}
    assert marker["errors_by_class"] == {"deterministic": 2, "transient": 0}
    assert [(e["index"], e["file"], e["type"]) for e in marker["errors"]] == [
        (1, entries[1]["filename"], "corrupt_image"), (3, "gone.jpg", "missing_object")]
    assert queue_counts(stack, q["queue"]) == (0, 0) and queue_counts(stack, q["dlq"]) == (0, 0)
    assert not any("/_partial/" in k for k in dest_keys(stack))


@pytest.mark.slow
def test_a_volume_whose_pages_are_all_missing_is_done(stack):
    """Every page deterministic: the volume is done (all rows errors) and never retried, where
    it used to go round to the DLQ."""
    q = setup_job(stack)
    put_manifest(stack.s3, SOURCE_BUCKET, "W9", "I9", [{"filename": f"p{n}.jpg"} for n in range(3)])
    enqueue(stack, q["queue"], [("W9", "I9")])
    run_worker(stack)
    row, = tasks(stack)
    assert (row["status"], row["attempt"], row["nb_errors"]) == ("done", 1, 3)
    pages = read_parquet(stack, "W9", "I9", row["s3_etag"])
    assert [p["error_type"] for p in pages] == ["missing_object"] * 3
    assert queue_counts(stack, q["queue"]) == (0, 0) and queue_counts(stack, q["dlq"]) == (0, 0)


# -- transient errors ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_pages_that_all_hit_s3_500s_send_the_volume_back_saying_why(stack, proxy):
    q = setup_job(stack)
    (w, i), = add_volumes(stack, 1, pages=3)
    for entry in manifest(stack, w, i):  # every image of the volume, not its manifest
        proxy.fail("GET", volume_prefix(w, i) + entry["filename"])
    enqueue(stack, q["queue"], [(w, i)])
    run = start_worker(stack, "--shutdown-after-empty", "0", env=proxied(proxy))
    try:
        run.wait_for("will be retried", timeout=60)
    finally:
        run.signal(signal.SIGTERM)
        assert run.wait(60) == 0, run.output
    row = tasks(stack)[0]
    assert row["status"] == "retryable_failed"
    reason = row["error_reason"]
    assert reason.startswith("3 of 3 pages hit transient errors (100% > max_transient_error_ratio 0.1): "
                             "3× s3_error (e.g. GET s3://archive.tbrc.org/"), reason
    assert "InternalError (HTTP 500), after botocore's retries" in reason
    assert reason.endswith("no page finished, so the next attempt redoes all of them"), reason
    for entry in manifest(stack, w, i):  # botocore's retries were spent (AWS_MAX_ATTEMPTS=2) on each
        assert proxy.count("GET", volume_prefix(w, i) + entry["filename"], status=500) >= 2
    visible, in_flight = queue_counts(stack, q["queue"])
    assert visible + in_flight == 1 and queue_counts(stack, q["dlq"]) == (0, 0)
    assert dest_keys(stack) == set()  # no output, and nothing finished to keep


@pytest.mark.slow
def test_a_retry_redoes_only_the_pages_that_failed(stack, proxy):
    """Two of six pages get 500s during the first attempt (both of botocore's tries), then S3
    heals: the first attempt keeps its 4 finished pages under _partial/, the second fetches
    only the 2 others, and the volume's Parquet is whole, in manifest order."""
    q = setup_job(stack)
    (w, i), = add_volumes(stack, 1, pages=6)
    prefix = volume_prefix(w, i)
    entries = manifest(stack, w, i)
    flaky = {entries[1]["filename"], entries[4]["filename"]}
    for name in flaky:
        proxy.fail("GET", prefix + name, times=2)
    enqueue(stack, q["queue"], [(w, i)])
    run = run_worker(stack, env=proxied(proxy))

    out = run.output
    assert "2 of 6 pages hit transient errors (33% > max_transient_error_ratio 0.1): 2× s3_error" in out
    version = version_of(stack, w, i)
    key = artifacts.partial_key(JOB, w, i, version)
    assert (f"its 4 finished pages are kept in s3://{DEST_BUCKET}/{key}: the next attempt redoes only the 2 "
            "others") in out
    assert f"volume {w}/{i} resumes: 4 of 6 pages were finished by an earlier attempt; 2 are redone" in out
    row, = tasks(stack)
    assert (row["status"], row["attempt"], row["nb_errors"]) == ("done", 2, 0)
    for entry in entries:  # the good pages were fetched once, the flaky ones 2 × 500 then once more
        name = entry["filename"]
        assert proxy.count("GET", prefix + name) == (3 if name in flaky else 1), name
    pages = read_parquet(stack, w, i, version)
    assert [p["img_file_name"] for p in pages] == [e["filename"] for e in entries]
    assert all(p["ok"] for p in pages) and all(p["width"] == e["width"] for p, e in zip(pages, entries))
    marker = read_success(stack, w, i, version)
    assert (marker["attempt"], marker["resumed_pages"], marker["nb_errors"]) == (2, 4, 0)
    assert key not in dest_keys(stack)  # deleted once the volume is done
    assert queue_counts(stack, q["queue"]) == (0, 0) and queue_counts(stack, q["dlq"]) == (0, 0)


@pytest.mark.slow
def test_one_transient_error_under_the_threshold_finishes_with_its_row(stack, proxy):
    """And the metrics tell the classes apart (one missing page beside it: deterministic)."""
    from bec.devstack.moto import free_port
    from test_worker_metrics import scrape, value

    q = setup_job(stack)
    (w, i), = add_volumes(stack, 1, pages=12)
    entries = manifest(stack, w, i) + [{"filename": "gone.jpg", "width": 10, "height": 10}]
    put_manifest(stack.s3, SOURCE_BUCKET, w, i, entries)
    proxy.fail("GET", volume_prefix(w, i) + entries[7]["filename"])  # 1 of 13 = 8 % ≤ 10 %
    enqueue(stack, q["queue"], [(w, i)])
    port = free_port()
    run = start_worker(stack, "--metrics-port", str(port), "--metrics-addr", "127.0.0.1",
                       "--shutdown-after-empty", "0", env=proxied(proxy))
    try:
        run.wait_for("Successfully processed", timeout=90)
        samples = scrape(port)
    finally:
        run.signal(signal.SIGTERM)
        assert run.wait(60) == 0, run.output
    row, = tasks(stack)
    assert (row["status"], row["attempt"], row["nb_errors"]) == ("done", 1, 2)
    pages = read_parquet(stack, w, i, row["s3_etag"])
    bad = [(n, p["error_stage"], p["error_type"]) for n, p in enumerate(pages) if not p["ok"]]
    assert bad == [(7, "fetch", "s3_error"), (12, "fetch", "missing_object")]
    assert "InternalError (HTTP 500)" in pages[7]["error_message"]
    marker = read_success(stack, w, i, row["s3_etag"])
    assert marker["errors_by_class"] == {"deterministic": 1, "transient": 1}
    assert value(samples, "bec_page_errors_total", stage="fetch", error_type="s3_error", **{"class": "transient"}) == 1
    assert value(samples, "bec_page_errors_total", stage="fetch", error_type="missing_object",
                 **{"class": "deterministic"}) == 1


# -- the classification, once, at the edge (pure unit tests) -------------------------------------------
def client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError({"Error": {"Code": code, "Message": "m"},
                                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


@pytest.mark.parametrize("exc, kind, transient", [
    (client_error("NoSuchKey", 404), "missing_object", False),
    (client_error("404", 404), "missing_object", False),
    (client_error("InvalidObjectState", 403), "archived_object", False),
    (client_error("InternalError", 500), "s3_error", True),
    (client_error("ServiceUnavailable", 503), "s3_error", True),
    (client_error("SlowDown", 503), "s3_error", True),
    (client_error("AccessDenied", 403), "s3_error", True),      # the worker's credentials, not the page
    (client_error("ExpiredToken", 400), "s3_error", True),
    (botocore.exceptions.ReadTimeoutError(endpoint_url="http://s3"), "s3_unreachable", True),
    (botocore.exceptions.EndpointConnectionError(endpoint_url="http://s3"), "s3_unreachable", True),
    (ConnectionResetError(104, "Connection reset by peer"), "s3_unreachable", True),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_page_get_failure_is_classified_once(exc, kind, transient):
    from bec.edges.aws import page_get_error

    error = page_get_error(exc, "archive.tbrc.org", "Works/x/p1.jpg")
    assert (error.stage, error.kind, error.transient) == ("fetch", kind, transient)
    assert "s3://archive.tbrc.org/Works/x/p1.jpg" in str(error)


def test_page_error_kinds_of_the_pipeline_are_classified():
    from bec.errors import is_transient_page_error, page_error_class

    for kind in ("missing_object", "archived_object", "empty_file", "corrupt_image", "unsupported_format",
                 "too_large", "invalid_entry", "postprocess_error", "internal_error"):
        assert not is_transient_page_error(kind) and page_error_class(kind) == "deterministic", kind
    for kind in ("s3_error", "s3_unreachable", "inference_error", "out_of_memory"):
        assert is_transient_page_error(kind) and page_error_class(kind) == "transient", kind


# -- the knob's new name ---------------------------------------------------------------------------------
def test_the_retry_threshold_is_max_transient_error_ratio():
    from bec.errors import ConfigError
    from bec.control.jobkinds import validate_config
    from bec.ldv1.config import Ldv1Config

    assert Ldv1Config().max_transient_error_ratio == 0.1
    assert Ldv1Config.from_mapping({"max_transient_error_ratio": 0.25}).max_transient_error_ratio == 0.25
    # a stored config with the old name still works, and is stored under the new one
    assert Ldv1Config.from_mapping({"max_error_ratio": 0.3}).max_transient_error_ratio == 0.3
    notes: list[str] = []
    assert validate_config("ldv1", {"max_error_ratio": 0.3}, notes) == {"max_transient_error_ratio": 0.3}
    assert notes and "'max_error_ratio' is now 'max_transient_error_ratio'" in notes[0]
    with pytest.raises(ConfigError, match="same setting"):
        Ldv1Config.from_mapping({"max_error_ratio": 0.3, "max_transient_error_ratio": 0.2})
    with pytest.raises(ConfigError, match="between 0 and 1"):
        Ldv1Config.from_mapping({"max_transient_error_ratio": 1.5})
    with pytest.raises(ConfigError, match="must be a number"):
        Ldv1Config.from_mapping({"max_transient_error_ratio": "high"})


def test_jobs_create_stores_the_new_name_and_says_so(stack):
    from clihelp import bec

    result = bec("jobs", "create", "--name", "ldv1", "--config-text", '{"max_error_ratio": 0.3}')
    assert result.exit_code == 0, result.output
    assert "Note: ldv1 config key 'max_error_ratio' is now 'max_transient_error_ratio'" in result.stderr
    assert stack.db.row("SELECT config FROM jobs")["config"] == {"max_transient_error_ratio": 0.3}
