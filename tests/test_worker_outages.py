"""The DLQ holds only real faults (issue 20): permissions, outages and lost replies that used to
send healthy work there. Real `bec worker` processes, real PostgreSQL and moto; what moto
cannot do (403 on a missing key, expired credentials, a reset connection, a lost reply) is
injected by the proxies of ``faultproxy``."""
from __future__ import annotations

import pytest

from faultproxy import DENY_MISSING, S3FaultProxy
from workerkit import (no_shm_leak,  # noqa: F401 - fixture
                       add_volumes, enqueue, queue_counts, setup_job, start_worker, tasks)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_shm_leak")]


@pytest.fixture
def s3_proxy(stack):
    proxy = S3FaultProxy(stack.moto.url)
    yield proxy
    proxy.close()


@pytest.mark.parametrize("deny_head_bucket", [True, False], ids=["head-bucket-denied", "get-only-denied"])
def test_without_list_bucket_the_worker_refuses_to_start(stack, s3_proxy, deny_head_bucket):
    """Without s3:ListBucket, S3 answers a GET of a missing key with 403 AccessDenied (moto does
    not; the proxy does). Every first-time volume then failed its success.json check and went
    to the DLQ after 3 receives. The worker now proves at start that a missing key reads 404,
    and refuses, in one line, before it registers or receives."""
    q = setup_job(stack)
    enqueue(stack, q["queue"], add_volumes(stack, 1, pages=2))
    s3_proxy.mode, s3_proxy.deny_head_bucket = DENY_MISSING, deny_head_bucket
    run = start_worker(stack, env={"AWS_ENDPOINT_URL_S3": s3_proxy.url})
    assert run.wait(60) == 1, run.output
    errors = [line for line in run.lines if line.startswith("Error:")]
    assert len(errors) == 1 and "s3:ListBucket" in errors[0], run.output
    assert "archive.tbrc.org" in errors[0] and "Traceback" not in run.output
    assert "Starting BEC Worker" not in run.output
    assert queue_counts(stack, q["queue"]) == (1, 0) and queue_counts(stack, q["dlq"]) == (0, 0)
    assert tasks(stack) == [] and stack.db.row("SELECT count(*) AS n FROM workers")["n"] == 0
