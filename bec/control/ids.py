"""Validation of every name that ends up in an SQS queue name, an S3 key or a query.

Ids are checked before use, never escaped after: a value that does not match is bad
input, whatever it came from (CLI, file, queue message).
"""
from __future__ import annotations

import re

from bec.errors import BadInput

W_ID = re.compile(r"W[A-Za-z0-9_]+")
I_ID = re.compile(r"I[A-Za-z0-9_]+")
MAX_ID_LENGTH = 32

JOB_NAME = re.compile(r"[A-Za-z0-9_-]+")
# SQS queue names are at most 80 characters; the longer of ours is bec_{name}_tasks.
MAX_JOB_NAME_LENGTH = 80 - len("bec__tasks")


def check_w_id(value: object) -> str:
    return _check_id(value, W_ID, "work id", "W22084")


def check_i_id(value: object) -> str:
    return _check_id(value, I_ID, "image-group id", "I0886")


def _check_id(value: object, pattern: re.Pattern[str], what: str, example: str) -> str:
    if not isinstance(value, str):
        raise BadInput(f"{what} must be a string like {example}, got {type(value).__name__}")
    if len(value) > MAX_ID_LENGTH or not pattern.fullmatch(value):
        raise BadInput(f"invalid {what} {_show(value)}: expected {pattern.pattern} "
                       f"(at most {MAX_ID_LENGTH} characters), e.g. {example}")
    return value


def check_job_name(value: object) -> str:
    if not isinstance(value, str):
        raise BadInput(f"job name must be a string, got {type(value).__name__}")
    if not JOB_NAME.fullmatch(value):
        raise BadInput(f"invalid job name {_show(value)}: use letters, digits, '-' and '_' only")
    if len(value) > MAX_JOB_NAME_LENGTH:
        raise BadInput(f"job name {_show(value)} is too long: at most {MAX_JOB_NAME_LENGTH} "
                       f"characters so that bec_{{name}}_tasks fits SQS's 80")
    return value


def queue_names(job_name: str) -> tuple[str, str]:
    """The tasks queue and its DLQ for a job (DESIGN §1)."""
    check_job_name(job_name)
    return f"bec_{job_name}_tasks", f"bec_{job_name}_dlq"


def _show(value: str, limit: int = 40) -> str:
    """Quote an untrusted value for a message, shortened so a huge input stays one line."""
    text = value if len(value) <= limit else value[:limit] + "…"
    return repr(text)
