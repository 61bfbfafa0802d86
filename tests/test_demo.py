"""`bec demo` end to end (what `make demo` runs) and the `bec dev` local stack."""
from __future__ import annotations

import io
import os
from html import escape
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

pytestmark = pytest.mark.slow
BEC = str(Path(sys.executable).with_name("bec"))


def drop_stack_database(home: Path) -> None:
    """Tests make their own database on the shared server (named after their data folder)."""
    from bec.devstack import postgres as pgstack
    from bec.devstack.stack import SHARED_PG, database_name

    shared = pgstack.Server(*SHARED_PG)
    if shared.answers():
        pgstack.drop_database(shared, database_name(home))


@pytest.fixture
def dev_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BEC_", "AWS_"))}
    env["BEC_DEV_HOME"] = str(tmp_path / "devhome")
    yield env
    subprocess.run([BEC, "dev", "down"], env=env, capture_output=True)
    drop_stack_database(tmp_path / "devhome")


def test_dev_stack_up_env_status_down(dev_env, tmp_path):
    up = subprocess.run([BEC, "dev", "up"], env=dev_env, capture_output=True, text=True)
    assert up.returncode == 0, up.stderr
    again = subprocess.run([BEC, "dev", "up"], env=dev_env, capture_output=True, text=True)
    assert again.returncode == 0
    url = re.search(r"moto: up at (\S+)", up.stdout).group(1)
    assert f"moto: up at {url}" in again.stdout  # reused, not restarted
    exports = subprocess.run([BEC, "dev", "env"], env=dev_env, capture_output=True, text=True).stdout
    env = dict(dev_env)
    for line in exports.splitlines():
        key, value = line.removeprefix("export ").split("=", 1)
        env[key] = value.strip("'")
    # the tests' own database, never the developer's demo database
    from bec.devstack.stack import database_name
    assert env["AWS_ENDPOINT_URL"] == url and env["BEC_SQL_DATABASE"] == database_name(tmp_path / "devhome")
    assert env["BEC_SQL_DATABASE"].startswith("bec_dev_")
    # every command of the guide works against it as written
    created = subprocess.run([BEC, "jobs", "create", "--name", "devcheck"], env=env, capture_output=True, text=True)
    assert created.returncode == 0, created.stderr
    assert "devcheck" in subprocess.run([BEC, "jobs", "list"], env=env, capture_output=True, text=True).stdout
    subprocess.run([BEC, "jobs", "delete", "devcheck", "--yes", "--delete-queues"], env=env, check=True,
                   capture_output=True)
    status = subprocess.run([BEC, "dev", "status"], env=dev_env, capture_output=True, text=True).stdout
    assert "moto: up" in status and "postgres: up" in status
    down = subprocess.run([BEC, "dev", "down"], env=dev_env, capture_output=True, text=True)
    assert "stopped moto" in down.stdout
    assert "moto: down" in subprocess.run([BEC, "dev", "status"], env=dev_env, capture_output=True, text=True).stdout


def test_demo_end_to_end(dev_env, tmp_path):
    out = tmp_path / "demo-out"
    run = subprocess.run([BEC, "demo", "--out", str(out)], env=dev_env, capture_output=True, text=True,
                         cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    text = run.stdout
    assert "Job Statistics: ldv1" in text and "Total Tasks: 3" in text and "Total Images: 12" in text
    assert re.search(r"│ done\s+│\s+3 │\s+12 │", text)
    index = (out / "index.html").read_text()
    volumes = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(volumes) == 3 and all(v.name in index for v in volumes)

    # the overlays show lines where the Parquet says they are
    import boto3

    env = dict(dev_env)
    for line in subprocess.run([BEC, "dev", "env"], env=dev_env, capture_output=True, text=True).stdout.splitlines():
        key, value = line.removeprefix("export ").split("=", 1)
        env[key] = value.strip("'")
    s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=env["AWS_ENDPOINT_URL"],
                      aws_access_key_id="bec-dev", aws_secret_access_key="bec-dev")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="bec-dev-artifacts", Prefix="ldv1/")["Contents"]]
    parquets = [k for k in keys if k.endswith(".parquet")]
    assert len(parquets) == 3 and sum(k.endswith("success.json") for k in keys) == 3
    checked = 0
    for key in parquets:
        _, w, i, _version, _ = key.split("/")
        rows = pq.read_table(io.BytesIO(s3.get_object(Bucket="bec-dev-artifacts", Key=key)["Body"].read())).to_pylist()
        assert len(rows) == 4 and all(r["ok"] for r in rows)
        assert sum(r["nb_contours"] for r in rows) > 0
        html = (out / f"{w}-{i}" / "index.html").read_text()
        for row in rows:
            assert row["img_file_name"] in html
            png = out / f"{w}-{i}" / (Path(row["img_file_name"]).stem + ".png")
            picture = np.asarray(Image.open(png).convert("RGB")).astype(int)
            scale = picture.shape[1] / row["width"]
            for contour in row["contours"]:
                p = contour[0]
                x, y = int(p["x"] * scale), int(p["y"] * scale)
                patch = picture[max(0, y - 2):y + 3, max(0, x - 2):x + 3]
                coloured = np.abs(patch[..., 0] - patch[..., 1]) + np.abs(patch[..., 1] - patch[..., 2])
                assert coloured.max() > 60, f"no drawn line at {x},{y} in {png.name}"
                checked += 1
    assert checked > 0
    # then ocr read the text on ldv1's lines, and the gallery shows it beside each page
    assert "Job Statistics: ocr" in text and re.search(r"CER \d+\.\d% against the generated text", text)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="bec-dev-artifacts", Prefix="ocr/")["Contents"]]
    ocr_parquets = [k for k in keys if k.endswith(".parquet")]
    assert len(ocr_parquets) == 3 and sum(k.endswith("success.json") for k in keys) == 3
    for key in ocr_parquets:
        _, w, i, _version, _ = key.split("/")
        rows = pq.read_table(io.BytesIO(s3.get_object(Bucket="bec-dev-artifacts", Key=key)["Body"].read())).to_pylist()
        assert len(rows) == 4 and all(r["ok"] and r["line_source"] == "ldv1" for r in rows)
        html = (out / f"{w}-{i}" / "index.html").read_text()
        for row in rows:
            first = row["text"].splitlines()[0] if row["text"] else ""
            assert escape(first) in html
        assert "lines from ldv1" in html and "CER " in html
    # re-running works
    again = subprocess.run([BEC, "demo", "--out", str(out), "--volumes", "1", "--pages", "2"], env=dev_env,
                           capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Total Tasks: 1" in again.stdout


def test_two_checkouts_have_their_own_stacks(tmp_path):
    """The stack was per user (~/.cache/bec/dev): a second clone's `make demo` reused the first
    one's moto and replaced its job and task rows, and its `bec dev down` would have stopped the
    first one's server. Each checkout has its own now; `dev status` reports the shared
    PostgreSQL on 5432 even where this checkout has no stack."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    checkouts = []
    for name in ("clone-a", "clone-b"):
        clone = tmp_path / name
        shutil.copytree(root / "bec", clone / "bec", ignore=shutil.ignore_patterns("__pycache__", "weights"))
        shutil.copy(root / "pyproject.toml", clone / "pyproject.toml")
        checkouts.append(clone)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BEC_", "AWS_"))}
    base["HOME"] = str(tmp_path / "home")  # one user for both clones

    def dev(clone: Path, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "bec", "dev", *args], capture_output=True, text=True,
                              env={**base, "PYTHONPATH": str(clone)}, cwd=clone, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    a, b = checkouts
    try:
        assert "moto: down (not started by this checkout)" in dev(b, "status")
        assert re.search(r"postgres: up at 127\.0\.0\.1:5432 \(the shared local server", dev(b, "status"))
        url_a = re.search(r"moto: up at (\S+)", dev(a, "up")).group(1)
        url_b = re.search(r"moto: up at (\S+)", dev(b, "up")).group(1)
        assert url_a != url_b
        env_a, env_b = dev(a, "env"), dev(b, "env")
        db_a = re.search(r"BEC_SQL_DATABASE=(\S+)", env_a).group(1)
        db_b = re.search(r"BEC_SQL_DATABASE=(\S+)", env_b).group(1)
        assert db_a != db_b
        assert (a / ".bec-dev" / "state.json").is_file() and (b / ".bec-dev" / "state.json").is_file()
        assert not (tmp_path / "home" / ".cache" / "bec").exists()
        # b's down stops b's server only
        assert "stopped moto" in dev(b, "down")
        assert f"moto: up at {url_a}" in dev(a, "status")
        assert "moto: down" in dev(b, "status")
    finally:
        for clone in checkouts:
            subprocess.run([sys.executable, "-m", "bec", "dev", "down"], capture_output=True,
                           env={**base, "PYTHONPATH": str(clone)}, cwd=clone, timeout=60)
            drop_stack_database(clone / ".bec-dev")
