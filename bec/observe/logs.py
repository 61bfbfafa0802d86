"""Logging for every BEC process: plain lines by default, JSON lines on request.

JSON lines suit CloudWatch and other collectors (one object per line with the time,
level, process role and message, plus any ``extra`` fields). Secrets never reach a log
line: settings objects print without passwords, and the formatter masks anything that
looks like a credential assignment as a last line of defence.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import time

_SECRET = re.compile(r"(?i)(password|secret|aws_secret_access_key|token)(\s*[=:]\s*)(\S+)")
_STANDARD = set(vars(logging.makeLogRecord({})))


def _scrub(text: str) -> str:
    return _SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)


class PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _scrub(super().format(record))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": _scrub(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = _scrub(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exception"] = _scrub(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def setup_logging(json_lines: bool = False, level: str | None = None) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if json_lines else PlainFormatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or os.environ.get("BEC_LOG_LEVEL", "INFO"))
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "psycopg.pool"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
