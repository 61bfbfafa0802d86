"""Settings from ``BEC_*`` environment variables and a ``.env`` file.

An exported variable always wins over ``.env`` (the operator's shell is the most recent
intent). Values are read lazily: a command only fails on the variables it really needs,
and the error names the missing variable.
"""
from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from dotenv import dotenv_values

from bec.errors import ConfigError

DEFAULT_DATABASE = "pipeline_v1"
DEFAULT_SOURCE_BUCKET = "archive.tbrc.org"


def load_env(env_file: str | os.PathLike[str] | None = None,
             environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Merge ``.env`` (or ``BEC_ENV_FILE``) under the process environment."""
    environ = os.environ if environ is None else environ
    path = Path(env_file or environ.get("BEC_ENV_FILE") or ".env")
    merged: dict[str, str] = {}
    if path.is_file():
        _warn_if_readable_by_others(path)
        merged.update({k: v for k, v in dotenv_values(path).items() if v is not None})
    merged.update(environ)
    return merged


def _warn_if_readable_by_others(path: Path) -> None:
    """``.env`` holds the database password: readable by its group (a shared ``staff`` or
    ``users`` group is common) is as much a leak as readable by everyone."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & stat.S_IROTH:
        who = "every user"
    elif mode & stat.S_IRGRP:
        who = "its group"
    else:
        return
    print(f"Warning: {path} is readable by {who}; it may hold secrets "
          f"(chmod 600 {path})", file=sys.stderr)


@dataclass(frozen=True)
class Settings:
    """A snapshot of the configuration; ``require`` names what is missing."""

    values: Mapping[str, str]

    @classmethod
    def from_env(cls, env_file: str | None = None) -> "Settings":
        return cls(load_env(env_file))

    def get(self, name: str, default: str | None = None) -> str | None:
        value = self.values.get(name)
        return value if value not in (None, "") else default

    def require(self, name: str, hint: str = "") -> str:
        value = self.get(name)
        if value is None:
            extra = f" ({hint})" if hint else ""
            raise ConfigError(f"missing required setting {name}: export it or put it in .env{extra}")
        return value

    # -- typed accessors -------------------------------------------------------------------
    def region(self, override: str | None = None) -> str:
        return override or self.require("BEC_REGION", "or pass --region")

    def dest_bucket(self, override: str | None = None) -> str:
        return override or self.require("BEC_DEST_S3_BUCKET", "or pass --s3-dest-bucket")

    def source_bucket(self, override: str | None = None) -> str:
        return override or self.get("BEC_SOURCE_S3_BUCKET", DEFAULT_SOURCE_BUCKET)  # type: ignore[return-value]

    def model_path(self, override: str | None = None) -> str:
        return override or self.require("BEC_LD_MODEL_PATH", "or pass --model-path")

    def db_params(self) -> "DbParams":
        port_text = self.get("BEC_SQL_PORT", "5432")
        try:
            port = int(port_text)  # type: ignore[arg-type]
        except ValueError:
            raise ConfigError(f"BEC_SQL_PORT must be a number, got {port_text!r}") from None
        return DbParams(
            host=self.require("BEC_SQL_HOST"),
            port=port,
            user=self.require("BEC_SQL_USER"),
            password=self.get("BEC_SQL_PASSWORD"),
            database=self.get("BEC_SQL_DATABASE", DEFAULT_DATABASE),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class DbParams:
    host: str
    port: int
    user: str
    password: str | None
    database: str

    def describe(self) -> str:
        """Where we connect, for error messages: never the password."""
        return f"{self.user}@{self.host}:{self.port}/{self.database}"

    def __repr__(self) -> str:  # keep the password out of logs and tracebacks
        return f"DbParams({self.describe()})"


def number_setting(name: str, raw: str, *, whole: bool = False, minimum: float = 1,
                   unit: str = "") -> float:
    """A numeric setting read from the environment, or one clear line naming it (BadInput)."""
    from bec.errors import BadInput

    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        what = "a whole number" if whole else f"a number{' of ' + unit + 's' if unit else ''}"
        raise BadInput(f"{name} must be {what}, got {raw!r}") from None
    if value < minimum:
        raise BadInput(f"{name} must be at least {minimum:g}{' ' + unit if unit else ''}, got {raw!r}")
    return value
