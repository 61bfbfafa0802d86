"""``bec db``: the database schema."""
from __future__ import annotations

import click

from bec.cli.context import AppContext, out, pass_app
from bec.control.db import Database


@click.group()
def db() -> None:
    """Database administration."""


@db.command("init")
@pass_app
def init(app: AppContext) -> None:
    """Create or complete the schema (idempotent; same as `psql -f schema.sql`)."""
    params = app.settings.db_params()
    with Database(params, max_size=1, application_name="bec-cli") as database:
        database.apply_schema()
    out.print(f"✓ Schema applied to {params.describe()}")
