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
