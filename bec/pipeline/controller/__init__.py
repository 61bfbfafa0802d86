"""The controller process: SQS in, pages out to the pipeline, artifacts and verdicts back.

The supervisor starts it as ``bec.pipeline.controller`` and calls ``run(ctx)``; the body is
in ``loop``.
"""
from __future__ import annotations

from bec.pipeline.controller.loop import Controller, run

__all__ = ["Controller", "run"]
