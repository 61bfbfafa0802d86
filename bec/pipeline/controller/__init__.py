"""The controller process: SQS in, pages out to the pipeline, artifacts and verdicts back.

A package of rooms, each with one concern (``loop``'s docstring maps them): the receiver,
admission, the volume book, the slot dispatcher, the finisher, holds and the extender, wired
together by the main loop. The supervisor starts the process as ``bec.pipeline.controller``
(``supervisor.CONTROLLER``) and calls ``run(ctx)``: that is ``loop.run``.
"""
from __future__ import annotations

from bec.pipeline.controller.loop import Controller, run

__all__ = ["Controller", "run"]
