"""Driving the ``bec`` CLI in-process, as an operator would type it."""
from __future__ import annotations

from click.testing import CliRunner, Result

from bec.cli import cli


def bec(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input, prog_name="bec")


def ok(*args: str, input: str | None = None) -> str:
    result = bec(*args, input=input)
    assert result.exit_code == 0, f"bec {' '.join(args)} failed ({result.exit_code}):\n{result.output}"
    return result.stdout


def fails(*args: str, input: str | None = None) -> str:
    """Run a command that must be rejected cleanly: exit 1, one 'Error:' line, no traceback."""
    result = bec(*args, input=input)
    assert result.exit_code != 0, f"bec {' '.join(args)} unexpectedly succeeded:\n{result.output}"
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.stderr
