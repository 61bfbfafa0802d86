"""boto3 clients and the translation of AWS trouble into BEC's error kinds.

Credentials come from boto3's standard chain; the endpoint from the standard
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``/``_SQS``) so moto, LocalStack or MinIO work
unchanged. Retries are botocore's ``adaptive`` mode (exponential back-off with jitter and
client-side rate limiting): no hand-written retry loops around single calls.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterable, Iterator

import boto3
import botocore.config
import botocore.exceptions

from bec.config import number_setting
from bec.errors import BadInput, BecError, PageError, RetryableError, StorageUnavailable, Unavailable

DEFAULT_RETRIES = 6  # botocore's ``max_attempts``: retries after the first try


def retries() -> dict[str, Any]:
    """botocore's retry settings: adaptive mode, 6 retries, or what botocore's own
    ``AWS_MAX_ATTEMPTS`` says (total tries, the first included). A ``Config`` that sets its
    retries overrides that variable, so BEC reads it here rather than let it be ignored."""
    raw = os.environ.get("AWS_MAX_ATTEMPTS")
    if not raw:
        return {"mode": "adaptive", "max_attempts": DEFAULT_RETRIES}
    return {"mode": "adaptive", "total_max_attempts": int(number_setting("AWS_MAX_ATTEMPTS", raw, whole=True))}


def client_config(max_attempts: int | None = None, pool: int = 32,
                  read_timeout: float = 60) -> botocore.config.Config:
    return botocore.config.Config(
        retries={"mode": "adaptive", "max_attempts": max_attempts} if max_attempts is not None else retries(),
        max_pool_connections=pool,
        connect_timeout=5,
        read_timeout=read_timeout,
    )


def session(region: str) -> boto3.session.Session:
    return boto3.session.Session(region_name=region)


def client(service: str, region: str, *, max_attempts: int | None = None, pool: int = 32,
           read_timeout: float = 60) -> Any:
    return session(region).client(service, config=client_config(max_attempts, pool, read_timeout))


def endpoint_of(service_client: Any) -> str:
    return service_client.meta.endpoint_url


def error_code(exc: BaseException) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return type(exc).__name__


@contextlib.contextmanager
def cli_errors(what: str, endpoint: str | None = None) -> Iterator[None]:
    """For CLI commands: AWS failures become one clear line (``Unavailable``/``BadInput``)."""
    try:
        yield
    except (botocore.exceptions.EndpointConnectionError,
            botocore.exceptions.ConnectTimeoutError,
            botocore.exceptions.ReadTimeoutError) as exc:
        where = endpoint or getattr(exc, "kwargs", {}).get("endpoint_url") or "AWS"
        raise Unavailable(f"{what}: cannot reach {where} ({type(exc).__name__})") from None
    except botocore.exceptions.NoCredentialsError:
        raise Unavailable(f"{what}: no AWS credentials found (environment, ~/.aws, or "
                          "instance profile)") from None
    except botocore.exceptions.NoRegionError:
        raise BadInput(f"{what}: no AWS region: set BEC_REGION or pass --region") from None
    except botocore.exceptions.ClientError as exc:
        err = exc.response.get("Error", {})
        raise Unavailable(f"{what}: {err.get('Code', 'error')}: {err.get('Message', '')}".rstrip(": ")) from None
    except botocore.exceptions.BotoCoreError as exc:
        raise Unavailable(f"{what}: {exc}") from None


def is_not_found(exc: BaseException) -> bool:
    """The *object* is not there. A missing bucket is not a missing object: it says nothing
    about the volume and everything about the worker's settings (see ``check_bucket``)."""
    return error_code(exc) in {"404", "NoSuchKey", "NotFound"}


#: A key no archive or artifact ever has: a GET of it must answer 404 (see ``probe``).
PROBE_KEY = "bec-probe/no-object-has-this-key"
_DENIED = {"403", "AccessDenied", "Forbidden"}


def check_bucket(s3: Any, bucket: str, role: str, setting: str) -> None:
    """Before a worker takes any volume: does the ``role`` ("source"/"destination") bucket,
    named by ``setting`` (the option or variable to fix), exist, and may this worker tell a
    missing object from a forbidden one? A typo in a bucket name would otherwise send every
    volume of the queue to the DLQ as "manifest missing", or process every volume and fail at
    the upload.

    Without ``s3:ListBucket``, S3 answers a GET of a missing key with 403 AccessDenied, not 404
    (documented GetObject behaviour): every first-time volume then failed at its
    ``success.json`` check and reached the DLQ, a missing manifest read as retryable and a
    missing page as an S3 error. A worker therefore requires ``s3:ListBucket`` and proves it
    here. Both problems are ``BadInput`` (one line, the worker does not start)."""
    try:
        s3.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        code = error_code(exc)
        if is_not_found(exc) or code == "NoSuchBucket":
            raise BadInput(f"the {role} bucket {bucket!r} does not exist"
                           f"{f' at {endpoint_of(s3)}' if configured_endpoint('s3') else ''}: "
                           f"check {setting}") from None
        if code not in _DENIED:
            raise
        raise BadInput(_needs_list_bucket(role, bucket, "HeadBucket is denied")) from None
    try:
        s3.get_object(Bucket=bucket, Key=PROBE_KEY)
    except botocore.exceptions.ClientError as exc:
        if is_not_found(exc):
            return
        if error_code(exc) not in _DENIED:
            raise
        raise BadInput(_needs_list_bucket(role, bucket, f"a GET of the missing key {PROBE_KEY} "
                                                        f"answers {error_code(exc)}, not 404")) from None


def _needs_list_bucket(role: str, bucket: str, seen: str) -> str:
    return (f"the {role} bucket {bucket!r} does not let this worker tell a missing object from a "
            f"forbidden one ({seen}): grant s3:ListBucket and s3:GetObject on it (see README: "
            f"without s3:ListBucket S3 reports every missing object as AccessDenied)")


def probe(s3: Any, bucket: str) -> str | None:
    """Can S3 serve this bucket's objects now? None when a GET of ``PROBE_KEY`` answers 404
    (reachable, credentials valid, permissions intact); otherwise what it answered instead.

    This decides, at the edge, whether a failed S3 call was the object's trouble or the whole
    service's (a refused connection, expired credentials, revoked permissions): error codes
    alone cannot say, AccessDenied in particular. ``s3`` should make a single attempt: the
    question is "now", and botocore's retries took 23–29 s against a refused connection."""
    try:
        s3.get_object(Bucket=bucket, Key=PROBE_KEY)
    except botocore.exceptions.ClientError as exc:
        if is_not_found(exc):
            return None
        return f"s3://{bucket}: {error_code(exc)}: {_short(exc, 200)}"
    except (botocore.exceptions.BotoCoreError, OSError) as exc:
        return f"s3://{bucket}: {type(exc).__name__}: {_short(exc, 200)}"
    return None


def storage_failure(what: str, exc: BaseException, probes: Iterable[Callable[[], str | None]]) -> BecError:
    """The verdict on an S3 failure other than "no such key": ``StorageUnavailable`` when a
    probe fails too (the worker pauses and spends no receive), otherwise ``RetryableError``
    (this object's trouble)."""
    for check in probes:
        down = check()
        if down:
            return StorageUnavailable(f"{what}: {error_code(exc)}: {_short(exc)} "
                                      f"(S3 is unavailable: {down})")
    return as_retryable(what, exc)


def single_try_client(service: str, region: str) -> Any:
    """A client for probes: one attempt, short timeouts."""
    return session(region).client(service, config=botocore.config.Config(
        retries={"mode": "standard", "max_attempts": 1}, connect_timeout=3, read_timeout=10))


def as_retryable(what: str, exc: BaseException) -> RetryableError:
    """For the worker: infrastructure trouble that retries did not cure."""
    return RetryableError(f"{what}: {error_code(exc)}: {_short(exc)}")


def page_get_error(exc: BaseException, bucket: str, key: str) -> PageError:
    """A page's GET failed once botocore's retries were spent: the page error of the right
    class (``bec.errors.TRANSIENT_PAGE_ERRORS``), decided here and nowhere else.

    Deterministic: the object is not there, or is archived (the same answer on every try).
    Transient: anything else S3 says (5xx, throttling, a 403 of credentials or policy: the
    worker's trouble, not the page's) and no answer at all (refused, reset, timed out).
    """
    where = f"s3://{bucket}/{key}"
    if isinstance(exc, botocore.exceptions.ClientError):
        code = error_code(exc)
        if is_not_found(exc):
            return PageError("fetch", "missing_object", f"{where} does not exist")
        if code == "InvalidObjectState":
            return PageError("fetch", "archived_object",
                             f"{where} is in an archive storage class: restore it to process it")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        return PageError("fetch", "s3_error", f"GET {where}: {code or 'error'} (HTTP {status}), "
                                              f"after botocore's retries")
    return PageError("fetch", "s3_unreachable", f"GET {where}: {type(exc).__name__}: {_short(exc)}")


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:limit]


def configured_endpoint(service: str) -> str | None:
    """The endpoint override in force for a service, if any (for start-up lines)."""
    return (os.environ.get(f"AWS_ENDPOINT_URL_{service.upper()}")
            or os.environ.get("AWS_ENDPOINT_URL"))
