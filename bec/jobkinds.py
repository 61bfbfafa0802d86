"""Which worker implementation a job runs, and how its config is validated.

A job's kind follows its name: ``ldv1`` and names starting with ``ldv1`` (``ldv1-test``,
``ldv1_fast``) are line-detection jobs whose config is validated key by key; other jobs
(``ocr``…) have no worker implementation yet and accept any JSON object as config.
"""
from __future__ import annotations

from typing import Any

LDV1 = "ldv1"


def kind_of(job_name: str) -> str | None:
    return LDV1 if job_name.startswith(LDV1) else None


def validate_config(job_name: str, config: dict[str, Any],
                    notes: list[str] | None = None) -> dict[str, Any]:
    """Reject unknown keys and wrong types for jobs of a known kind (``BadInput``); returns
    the config to store, with renamed keys under their new names (said in ``notes``)."""
    if kind_of(job_name) == LDV1:
        from bec.ldv1.config import Ldv1Config, rename_old_keys

        Ldv1Config.from_mapping(config)
        config, said = rename_old_keys(config)
        if notes is not None:
            notes.extend(said)
    return config
