"""boto3 clients and the translation of AWS trouble into BEC's error kinds.

Credentials come from boto3's standard chain; the endpoint from the standard
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``/``_SQS``) so moto, LocalStack or MinIO work
unchanged. Retries are botocore's ``adaptive`` mode (exponential back-off with jitter and
client-side rate limiting): no hand-written retry loops around single calls.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import boto3
import botocore.config
import botocore.exceptions

from bec.errors import BadInput, PageError, RetryableError, Unavailable

# Codes that mean "the request itself is wrong" rather than "try again".
_CLIENT_FAULTS = {
    "AccessDenied", "AccessDeniedException", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist", "NoSuchBucket",
    "InvalidParameterValue", "InvalidAttributeName", "UnrecognizedClientException",
}


DEFAULT_RETRIES = 6  # botocore's ``max_attempts``: retries after the first try


def retries() -> dict[str, Any]:
    """botocore's retry settings: adaptive mode, 6 retries, or what botocore's own
    ``AWS_MAX_ATTEMPTS`` says (total tries, the first included). A ``Config`` that sets its
    retries overrides that variable, so BEC reads it here rather than let it be ignored."""
    raw = os.environ.get("AWS_MAX_ATTEMPTS")
    if not raw:
        return {"mode": "adaptive", "max_attempts": DEFAULT_RETRIES}
    try:
        value = int(raw)
    except ValueError:
        raise BadInput(f"AWS_MAX_ATTEMPTS must be a whole number, got {raw!r}") from None
    if value < 1:
        raise BadInput(f"AWS_MAX_ATTEMPTS must be at least 1, got {value}")
    return {"mode": "adaptive", "total_max_attempts": value}


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


def check_bucket(s3: Any, bucket: str, role: str, setting: str) -> bool:
    """Before a worker takes any volume: does the ``role`` ("source"/"destination") bucket,
    named by ``setting`` (the option or variable to fix), exist? A typo in a bucket name
    would otherwise send every volume of the queue to the DLQ as "manifest missing", or
    process every volume and fail at the upload.

    False when S3 does not let us look (HeadBucket needs s3:ListBucket, which a worker's
    role may lack): the caller says so and goes on. A missing bucket is ``BadInput``."""
    try:
        s3.head_bucket(Bucket=bucket)
        return True
    except botocore.exceptions.ClientError as exc:
        code = error_code(exc)
        if is_not_found(exc) or code == "NoSuchBucket":
            raise BadInput(f"the {role} bucket {bucket!r} does not exist"
                           f"{f' at {endpoint_of(s3)}' if configured_endpoint('s3') else ''}: "
                           f"check {setting}") from None
        if code in {"403", "AccessDenied", "Forbidden"}:
            return False
        raise


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


def is_client_fault(exc: BaseException) -> bool:
    return error_code(exc) in _CLIENT_FAULTS


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:limit]


def configured_endpoint(service: str) -> str | None:
    """The endpoint override in force for a service, if any (for start-up lines)."""
    return (os.environ.get(f"AWS_ENDPOINT_URL_{service.upper()}")
            or os.environ.get("AWS_ENDPOINT_URL"))
