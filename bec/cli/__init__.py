"""The ``bec`` command: one module per command group, errors turned into one clear line."""
from __future__ import annotations

import os
from typing import Any

import click

from bec import __version__
from bec.cli.context import AppContext, fit_consoles_to_streams
from bec.errors import BecError


class CommandFailed(click.ClickException):
    """A BecError surfaced to the operator: ``Error: <sentence>`` on stderr, exit 1."""


class BecGroup(click.Group):
    """Root group deciding, once, how any failure below it reaches the operator."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BecError as exc:
            raise CommandFailed(str(exc)) from None
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort,
                KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # a bug: say so plainly; the traceback only on request
            if os.environ.get("BEC_DEBUG"):
                raise
            raise CommandFailed(f"internal error: {type(exc).__name__}: {exc} "
                                "(set BEC_DEBUG=1 for the traceback)") from None


@click.group(cls=BecGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="bec")
@click.option("--env-file", type=click.Path(dir_okay=False), default=None,
              help="Read settings from this file instead of ./.env (exported variables win).")
@click.option("--region", default=None, help="AWS region (default: BEC_REGION).")
@click.pass_context
def cli(ctx: click.Context, env_file: str | None, region: str | None) -> None:
    """BEC: batch line detection over a scanned-book archive (S3 + SQS + PostgreSQL)."""
    fit_consoles_to_streams()
    app = AppContext(env_file=env_file, region_override=region)
    ctx.obj = app
    ctx.call_on_close(app.close)


def _register() -> None:
    from bec.cli import db, jobs, queue, workers

    for group in (jobs.jobs, queue.queue, workers.workers, db.db):
        cli.add_command(group)
    for optional in ("worker", "dev", "demo", "exporter"):
        try:
            module = __import__(f"bec.cli.{optional}", fromlist=["command"])
        except ModuleNotFoundError as exc:
            if exc.name != f"bec.cli.{optional}":
                raise
            continue
        cli.add_command(module.command)


_register()


def main() -> None:
    cli(prog_name="bec")
