"""`python -m benchmarks.ldv1`'s options and tables, without running a benchmark."""
from __future__ import annotations

import argparse

import pytest

from benchmarks import ldv1
from benchmarks.stages import StageResult, as_dict


def test_every_option_has_help_and_its_default_shown(capsys):
    ap = ldv1.parser()
    options = [a for a in ap._actions if not isinstance(a, argparse._HelpAction)]
    assert options and all(a.help for a in options), [a.dest for a in options if not a.help]
    with pytest.raises(SystemExit) as done:
        ldv1.main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for action in options:
        assert f"(default: {action.default})" in text or f"(default: {action.default!s})" in text, action.dest
    assert "(default: 720)" in text and "(default: small)" in text and "(default: bench-out)" in text


def result(stages: list[dict], pipeline: list[dict] | None = None) -> dict:
    return {"stages": stages, "pipeline": pipeline or [], "baselines": [], "memory": [], "decoders": {}}


def test_unmeasured_figures_are_dashes_not_zeros():
    """The model alone has no per-page times and the host→device copies no CPU time: the
    table printed 0.0 ms for them, as if measured."""
    alone = as_dict(StageResult("model alone (device-resident tiles, full batches)", 40, 2.0, cpu_s=1.5))
    copy = as_dict(StageResult("host→device copy (pinned)", 40, 0.5, [1.0, 2.0, 3.0]))
    assert alone["median_ms"] is None and alone["p95_ms"] is None and alone["cpu_ms_per_page"] == 37.5
    assert copy["cpu_ms_per_page"] is None and copy["median_ms"] == 2.0
    with ldv1.console.capture() as seen:
        ldv1.report(result([alone, copy]))
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in seen.get().splitlines() if line.startswith("│")}
    assert rows["model alone (device-resident tiles, full batches)"][:4] == ["20.0", "—", "—", "37.5"]
    assert rows["host→device copy (pinned)"][:4] == ["80.0", "2.0", "2.9", "—"]


def test_the_pipeline_table_names_the_slowest_stage():
    run = {"procs": 2, "pages_per_s": 20.0, "ceiling_pages_per_s": 25.0, "ceiling_stage": "cpu budget",
           "efficiency": 0.8, "slowest_stage": "decode", "slowest_stage_pages_per_s": 31.5,
           "cpu_budget_pages_per_s": 25.0, "decode_only_ratio": 0.63, "tiles_per_s": 300.0,
           "inference_busy_ratio": 0.9, "peak_pss_mb": 900.0}
    with ldv1.console.capture() as seen:
        ldv1.report(result([], [run]))
    assert "decode (31.50)" in seen.get()
