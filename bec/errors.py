"""The error taxonomy, decided once at the edge where trouble happens.

Every failure BEC handles falls in one of a few kinds, and the kind alone decides what
happens next:

* ``BadInput``     – the operator gave something unusable (CLI argument, file, config).
                     One clear line on stderr, non-zero exit, nothing created.
* ``Unavailable``  – a service (PostgreSQL, S3/SQS endpoint) cannot be reached or refused
                     us. For the CLI it is one line naming the host. A worker pauses
                     receiving until the service answers again, and spends no receive on it.
* ``RetryableError`` – the task may succeed later (network, throttling, DB trouble, too many
                     page errors): the task is marked ``retryable_failed`` and the message
                     becomes visible again.
* ``TerminalError`` – the task can never succeed as it is (missing or invalid manifest): the
                     task is ``terminal_failed`` and the message goes to the DLQ.
* ``PoisonMessage`` – the SQS message itself is unusable (not JSON, bad ids): straight to the
                     DLQ with the reason; no task row, no retries burnt.
* ``PageError``    – one image failed (missing object, corrupt data, too large…): a Parquet
                     row with ``ok = false`` and its stage/type/message; the volume goes on.
                     Its kind says whether it is *deterministic* (the page itself: the same
                     on every try) or *transient* (the infrastructure: S3 5xx, throttling,
                     timeouts, resets once botocore's retries are spent). Only transient
                     page errors can send a volume back for a retry (``TRANSIENT_PAGE_ERRORS``).

Messages are written for operators and never contain secrets.
"""
from __future__ import annotations


class BecError(Exception):
    """Base class: ``str(err)`` is a complete, operator-facing sentence."""


class BadInput(BecError):
    """Unusable input from the operator."""


class ConfigError(BadInput):
    """Missing or invalid configuration (environment, .env, job config)."""


class Unavailable(BecError):
    """A required service cannot be reached or refused the request."""


class DatabaseUnavailable(Unavailable):
    """PostgreSQL cannot serve us now: unreachable, out of connections, read-only, timed out."""


class StorageUnavailable(Unavailable):
    """S3 as a whole cannot serve us now (not one object): unreachable, expired or wrong
    credentials, permissions gone. A worker pauses instead of failing volumes on it."""


class RetryableError(BecError):
    """The task may succeed if tried again later."""


class TerminalError(BecError):
    """The task can never succeed as it stands."""


class PoisonMessage(TerminalError):
    """The queue message itself can never be processed."""


class ModelError(BadInput):
    """A model checkpoint is missing, corrupt or of the wrong architecture."""


class PageError(BecError):
    """One page failed; recorded in the volume's Parquet, the volume carries on.

    ``stage`` is where it failed (fetch, decode, infer, post) and ``kind`` a short stable
    name for the failure (``missing_object``, ``corrupt_image``, ``too_large``…), used for
    counting and for the ``error_type`` column.
    """

    def __init__(self, stage: str, kind: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.kind = kind

    @property
    def transient(self) -> bool:
        return is_transient_page_error(self.kind)


#: Page error kinds caused by the infrastructure, not by the page: another try may succeed.
#: Every other kind (``missing_object``, ``corrupt_image``, ``empty_file``, ``too_large``,
#: ``unsupported_format``, ``invalid_entry``, ``postprocess_error``, ``internal_error``…) is
#: deterministic: trying again gives the same answer, so it is recorded and the volume
#: finishes. The edge that raises a page error picks its kind, and so its class, once.
TRANSIENT_PAGE_ERRORS = frozenset({
    "s3_error",         # S3 answered with an error that is not about the object (5xx, throttling, 403…)
    "s3_unreachable",   # no answer: connection refused or reset, timeout
    "inference_error",  # a whole batch failed (device out of memory, CUDA error): not the page's fault
    "out_of_memory",    # the host ran short while decoding a page within the pixel limit
    "s3_unavailable",   # S3 as a whole failed (outage, credentials): the worker pauses, the volume goes back
    "changed_after_manifest",  # the volume is being rewritten: processed again at its new version
})


def is_transient_page_error(kind: str | None) -> bool:
    return kind in TRANSIENT_PAGE_ERRORS


def page_error_class(kind: str | None) -> str:
    """``transient`` or ``deterministic``: the label operators see in metrics and ``jobs errors``."""
    return "transient" if is_transient_page_error(kind) else "deterministic"
