"""A volume's Parquet is written while its pages complete (issue 20 item 8): rows in manifest
order, one row group at a time, held results bounded by how far ahead pages finish; and a
resumed volume copies its earlier attempt's finished rows in their place."""
from __future__ import annotations

import io
import random
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from bec.edges import artifacts
from bec.edges.volumefile import Resume, VolumeFile

META = {"bec.model.sha256": "abc", "bec.model.name": "m", "bec.config.sha256": "cfg"}


def page(n: int) -> artifacts.PageOutcome:
    """A page with n % 4 + 1 lines of 200 points (failed every 7th, transient every 11th)."""
    if n % 11 == 0:
        return artifacts.PageOutcome.failed(f"p{n}.jpg", "fetch", "s3_error", "GET …: InternalError (HTTP 500)")
    if n % 7 == 0:
        return artifacts.PageOutcome.failed(f"p{n}.jpg", "decode", "corrupt_image", "JPEG data is corrupt")
    lines = [np.full((200, 2), n, np.int32) for _ in range(n % 4 + 1)]
    return artifacts.PageOutcome(f"p{n}.jpg", True, "etag", width=100, height=50, contours=lines,
                                 boxes=np.tile([n, n, 3, 4], (len(lines), 1)), timings=(1.0, 2.0, 3.0, 4.0))


def completion_order(n: int, window: int, seed: int = 1) -> list[int]:
    """Pages completing out of order, none more than ``window`` ahead of the first one missing
    (what the controller's dispatch window guarantees)."""
    rng = random.Random(seed)
    order, pending, nxt = [], [], 0
    while len(order) < n:
        while nxt < n and nxt < (min(pending) if pending else nxt) + window:
            pending.append(nxt)
            nxt += 1
        # the oldest page in flight is often the slowest
        pick = pending.pop(rng.randrange(1, len(pending)) if len(pending) > 1 and rng.random() < 0.8 else 0)
        order.append(pick)
    return order


def read(file) -> pq.ParquetFile:
    return pq.ParquetFile(io.BytesIO(file.read()))


def test_rows_go_out_in_manifest_order_as_pages_complete_with_bounded_results_held():
    n, window, group = 1000, 40, 64
    out = VolumeFile(n, META, row_group_pages=group)
    written_while_running = []
    for k, index in enumerate(completion_order(n, window)):
        assert out.add(index, page(index))
        assert out.held <= window + group  # never the whole volume
        if k in (250, 500, 750):
            written_while_running.append(out.rows_written)
    assert out.held_max <= window + group
    # rows were written long before the volume ended, in growing numbers
    assert written_while_running[0] > 0 and written_while_running == sorted(written_while_running)
    assert written_while_running[-1] >= 600
    assert not out.add(5, page(5))  # a late duplicate changes nothing
    file, size = out.close()
    parquet = read(file)
    assert size > 0 and parquet.metadata.num_rows == n
    assert parquet.metadata.num_row_groups == -(-n // group)
    table = parquet.read()
    assert table.column("img_file_name").to_pylist() == [f"p{i}.jpg" for i in range(n)]  # manifest order
    rows = table.to_pylist()
    for i in (0, 7, 11, 12, 999):
        expected = page(i)
        assert rows[i]["ok"] == expected.ok and rows[i]["error_type"] == expected.error_type
        assert rows[i]["nb_contours"] == len(expected.contours)
    assert {k: v for k, v in (parquet.schema_arrow.metadata or {}).items()}[b"bec.config.sha256"] == b"cfg"
    errors = {t: sum(1 for i in range(n) if page(i).error_type == t) for t in ("s3_error", "corrupt_image")}
    assert dict(out.tally.errors_by_type) == errors
    assert out.tally.transient_errors == errors["s3_error"]
    assert out.tally.pages == n and out.tally.stage_ms[0] == pytest.approx(1.0 * (n - sum(errors.values())))
    assert [e["index"] for e in out.tally.listed] == sorted(e["index"] for e in out.tally.listed)[:100]
    out.discard()


def test_a_resumed_volume_copies_its_finished_rows_and_redoes_only_the_transient_ones():
    n = 300
    first = VolumeFile(n, META, row_group_pages=50)
    for i in range(n):
        first.add(i, page(i))
    earlier, _ = first.close()
    resume = Resume(io.BytesIO(earlier.read()), [f"p{i}.jpg" for i in range(n)], META)
    transient = [i for i in range(n) if i % 11 == 0]
    second = VolumeFile(n, META, resume, row_group_pages=64)
    assert second.to_do() == transient
    assert all(second.has(i) for i in range(n) if i not in transient)
    for i in reversed(transient):  # they come back healthy, in any order
        assert second.add(i, artifacts.PageOutcome(f"p{i}.jpg", True, "etag", width=1, height=1))
    file, _ = second.close()
    table = read(file).read()
    assert table.column("img_file_name").to_pylist() == [f"p{i}.jpg" for i in range(n)]
    rows = table.to_pylist()
    assert all(rows[i]["ok"] for i in transient)
    assert rows[7]["error_type"] == "corrupt_image" and rows[13]["nb_contours"] == 2  # copied as they were
    assert second.tally.resumed == n - len(transient)
    assert second.tally.transient_errors == 0 and second.tally.nb_errors == first.tally.nb_errors - len(transient)
    first.discard()
    second.discard()


@pytest.mark.parametrize("change, why", [
    ({"bec.model.sha256": "other"}, "computed with another model"),
    ({"bec.config.sha256": "other"}, "computed with another config"),
])
def test_rows_of_another_model_or_config_are_not_resumed(change, why):
    out = VolumeFile(3, META)
    for i in range(3):
        out.add(i, page(i + 1))
    file, _ = out.close()
    data = file.read()
    with pytest.raises(ValueError, match=why):
        Resume(io.BytesIO(data), ["p1.jpg", "p2.jpg", "p3.jpg"], {**META, **change})
    with pytest.raises(ValueError, match="do not name the manifest's images"):
        Resume(io.BytesIO(data), ["p1.jpg", "x.jpg", "p3.jpg"], META)
    with pytest.raises(ValueError, match="3 rows for a manifest of 2 images"):
        Resume(io.BytesIO(data), ["p1.jpg", "p2.jpg"], META)
    with pytest.raises(ValueError, match="unreadable"):
        Resume(io.BytesIO(b"not parquet"), ["p1.jpg"], META)
    out.discard()


@pytest.mark.slow
def test_a_long_volume_is_written_in_row_groups_with_bounded_results_held(stack, tmp_path):
    """A real worker on a 700-page volume (a folder archive: no uploads) with error rows along
    the way: the controller holds at most 2 × slots + one row group of results, never the
    volume, and the Parquet is one file in manifest order, error rows in place."""
    from bec.edges.archive import MANIFEST, volume_prefix
    from bec.devstack.volumes import manifest_bytes
    from bec.edges.volumefile import ROW_GROUP_PAGES
    from workerkit import add_repeated_folder_volume, enqueue, read_parquet, run_worker, setup_job, tasks

    n = 700
    root = tmp_path / "archive"
    add_repeated_folder_volume(root, "W1", "I1", n)
    folder = root / volume_prefix("W1", "I1")
    entries = [{"filename": f"p{k:05d}.jpg", "width": 10, "height": 10} for k in range(n)]
    missing = {13, 200, 201, 555, 699}
    for k in missing:
        entries[k]["filename"] = f"gone{k}.jpg"
    (folder / MANIFEST).write_bytes(manifest_bytes(entries))
    q = setup_job(stack, {"batch_size": 2})
    enqueue(stack, q["queue"], [("W1", "I1")])
    run = run_worker(stack, "--s3-source-bucket", f"file://{root}", "--fetch-threads", "2")
    slots = int(re.search(r"(\d+) slots of", run.output).group(1))
    done = re.search(r"volume W1/I1 \S+ done: 700 pages, 5 errors .*; (\d+) row groups, at most (\d+) page "
                     r"results held", run.output)
    assert done, run.output
    row_groups, held = int(done.group(1)), int(done.group(2))
    assert held <= 2 * slots + ROW_GROUP_PAGES < n, (held, slots)
    assert row_groups == -(-n // ROW_GROUP_PAGES)
    row, = tasks(stack)
    assert (row["status"], row["nb_errors"], row["total_images"]) == ("done", 5, n)
    pages = read_parquet(stack, "W1", "I1", row["s3_etag"])
    assert [p["img_file_name"] for p in pages] == [e["filename"] for e in entries]
    assert [k for k, p in enumerate(pages) if not p["ok"]] == sorted(missing)
    assert {p["error_type"] for p in pages if not p["ok"]} == {"missing_object"}


def test_a_row_that_cannot_be_built_never_reaches_the_main_loop():
    """build_table runs in the controller's main loop now: whatever it raises is kept and
    raised by close(), in the finishing thread, where the volume is retried with the reason."""
    out = VolumeFile(3, META, row_group_pages=2)
    assert out.add(0, page(1))
    assert out.add(1, artifacts.PageOutcome("bad.jpg", True, contours=[np.zeros((3, 3), np.int32)],
                                            boxes=np.zeros((1, 4), np.int32)))
    assert out.add(2, page(2))  # the group with the bad row was written (and failed) before this
    with pytest.raises(ValueError):
        out.close()
    out.discard()
