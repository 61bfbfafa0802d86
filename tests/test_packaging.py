"""Files operators deploy: the systemd unit, the schema file, the README's commands."""
from __future__ import annotations

import configparser
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_systemd_unit_stops_after_the_grace_period():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(ROOT / "bec-worker.service")
    service = unit["Service"]
    assert service["Restart"] == "on-failure"
    assert service["EnvironmentFile"].startswith("/etc/")
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    grace = float(re.search(r"--grace (\d+)", service["ExecStart"]).group(1))
    assert float(service["TimeoutStopSec"]) > grace
    assert "bec worker --job-name" in service["ExecStart"]


def test_readme_opens_with_demo_and_test_commands():
    text = (ROOT / "README.md").read_text()
    head = text[:1500]
    assert "make demo" in head and "make test" in head
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")


def test_schema_file_at_top_level_is_the_packaged_one():
    assert (ROOT / "schema.sql").read_text() == (ROOT / "bec" / "control" / "schema.sql").read_text()
