"""``bec dev``: a local stack (moto for S3/SQS, PostgreSQL) for trying every command."""
from __future__ import annotations

import shlex

import click

from bec.cli.context import out
from bec.devstack import stack


@click.group("dev")
def command() -> None:
    """Run BEC against a local stack: `eval "$(bec dev env)"` after `bec dev up`."""


@command.command("up")
def up() -> None:
    """Start (or reuse) moto and PostgreSQL; create the database, schema and buckets."""
    state = stack.up()
    for name, text in stack.status(state).items():
        out.print(f"✓ {name}: {text}")
    out.print(f"✓ buckets: {stack.SOURCE_BUCKET} (archive), {stack.DEST_BUCKET} (artifacts)")
    out.print('Point your shell at it:  eval "$(bec dev env)"')


@command.command("env")
def env() -> None:
    """Print the export lines for the running stack."""
    state = stack.load()
    if state is None:
        raise click.ClickException("the local stack is not up: run `bec dev up`")
    for key, value in state.env().items():
        out.print(f"export {key}={shlex.quote(value)}", markup=False)


@command.command("status")
def status() -> None:
    """Is this checkout's local stack up? (The shared PostgreSQL on 5432 is reported either way.)"""
    for name, text in stack.status().items():
        out.print(f"{name}: {text}")


@command.command("down")
def down() -> None:
    """Stop what this checkout's `bec dev up` started (a shared local PostgreSQL is left alone)."""
    done = stack.down()
    out.print("\n".join(done) if done else "nothing was running")
