"""The worker's metrics folder: a supervisor killed with -9 leaves one, the next start removes it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ENABLE = "from bec.observe import telemetry; print(telemetry.enable(), flush=True); "


def python(code: str, tmp: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE, text=True, **kw)


def test_a_killed_owners_metrics_folder_is_removed_by_the_next_start(tmp_path):
    killed = python(ENABLE + "import os, signal; os.kill(os.getpid(), signal.SIGKILL)", tmp_path)
    orphan = Path(killed.stdout.readline().strip())
    killed.wait(30)
    assert killed.returncode == -9 and orphan.is_dir() and orphan.name.startswith("bec-metrics-")
    (orphan / "counter_123.db").write_bytes(b"\0" * 4096)  # what its processes had written
    # a live owner's folder is left alone (it waits on stdin, holding its lock)
    alive = python(ENABLE + "import sys; sys.stdin.read()", tmp_path)
    live = Path(alive.stdout.readline().strip())
    try:
        assert not orphan.exists()                 # the second start removed the orphan
        nxt = python("from bec.observe import telemetry; f = telemetry.enable(); print(f, flush=True); "
                     "telemetry.cleanup(f)", tmp_path)
        mine = Path(nxt.stdout.readline().strip())
        assert nxt.wait(30) == 0
        assert live.is_dir() and not mine.exists()  # the live one kept; the third cleaned up its own
    finally:
        alive.communicate("", timeout=30)
    assert alive.returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir() if "metrics" in p.name) == [live.name]


def test_a_folder_of_an_older_bec_is_removed_only_once_its_pid_is_gone(tmp_path):
    from bec.observe import telemetry

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    old_dead = tmp_path / f"bec-metrics-{dead}-abc123"
    old_live = tmp_path / f"bec-metrics-{os.getpid()}-def456"
    for folder in (old_dead, old_live):
        folder.mkdir()
    assert telemetry.remove_orphans(tmp_path) == [old_dead]
    assert old_live.is_dir() and not old_dead.exists()
