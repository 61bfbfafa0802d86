"""One volume's Parquet, written while its pages complete.

The controller used to keep every page's result until the volume ended, then build the
whole table: 5,000 pages × 25 lines × 250 points is ~330 MiB held, and three times that at
the peak of the write; a 100,000-page manifest twenty times more. Here each row goes out in
manifest order as soon as every page before it is accounted for, one row group at a time
(the job kind's ``build_table`` per group), into a spooled temporary file (in memory up to
``SPOOL_BYTES``, then on disk under ``TMPDIR``) that is uploaded when the volume ends.

What stays in memory is the results that arrived ahead of an earlier page still in flight,
which the controller bounds (it dispatches no page more than a window ahead of the first
row not yet written), plus one row group. ``held_max`` records the most held at once.

A volume retried for transient page errors may *resume*: the file of its last attempt, kept
as a partial artifact (``bec.control.partial``), supplies the rows of the pages it finished (``ok``
or a deterministic error); those pages are not dispatched again, and their rows are copied
in their place, one stored row group at a time.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bec.edges import artifacts
from bec.errors import is_transient_page_error

ROW_GROUP_PAGES = 128          # rows per Parquet row group (and most results gathered for one)
SPOOL_BYTES = 16 * 1024 * 1024  # a volume's file stays in memory up to this size, then on disk
ERRORS_LISTED = 100            # failed pages named one by one in success.json (all are in the Parquet)
MESSAGE_CHARS = 300
STAGES = ("fetch", "decode", "infer", "post")


def config_digest(config: dict[str, Any]) -> str:
    """The fingerprint of what a job config makes of a page: rows computed under another are
    not reused. Keys that only change speed or the retry threshold are left out."""
    from bec.ldv1.config import OPERATIONAL_KEYS

    kept = {k: v for k, v in config.items() if k not in OPERATIONAL_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Tally:
    """What success.json, the retry decision and the logs need, kept as rows go by."""

    pages: int = 0
    resumed: int = 0                                    # rows copied from a partial artifact
    errors_by_type: Counter = field(default_factory=Counter)
    example: dict[str, str] = field(default_factory=dict)  # error type → its first message
    listed: list[dict[str, Any]] = field(default_factory=list)  # the first ERRORS_LISTED failed pages
    stage_ms: list[float] = field(default_factory=lambda: [0.0] * len(STAGES))

    @property
    def nb_errors(self) -> int:
        return sum(self.errors_by_type.values())

    @property
    def transient_by_type(self) -> Counter:
        return Counter({k: n for k, n in self.errors_by_type.items() if is_transient_page_error(k)})

    @property
    def transient_errors(self) -> int:
        return sum(self.transient_by_type.values())

    def error(self, index: int, filename: str, stage: str | None, kind: str | None, message: str | None) -> None:
        kind = kind or "unknown"
        self.errors_by_type[kind] += 1
        self.example.setdefault(kind, (message or "")[:MESSAGE_CHARS])
        if len(self.listed) < ERRORS_LISTED:
            self.listed.append({"index": index, "file": filename, "stage": stage, "type": kind,
                                "message": (message or "")[:MESSAGE_CHARS]})

    def summary(self, kinds: Counter, examples: int = 3) -> str:
        """``3× s3_error (e.g. GET s3://…: InternalError (HTTP 500)…), 1× s3_unreachable (…)``."""
        return ", ".join(f"{n}× {kind}" + (f" (e.g. {self.example[kind]})" if self.example.get(kind) else "")
                         for kind, n in kinds.most_common(examples))


class Resume:
    """The rows of an earlier attempt's file that are kept: its finished pages.

    Read lazily and in order, one stored row group at a time; ``kept`` says, per manifest
    entry, whether its row is reused (``ok``, or a deterministic error) or redone.
    """

    def __init__(self, source: IO[bytes], filenames: list[str], metadata: dict[str, str],
                 schema: pa.Schema = artifacts.SCHEMA) -> None:
        """Raises ``ValueError`` saying why the file cannot be resumed from."""
        self._source = source
        try:
            self.file = pq.ParquetFile(source)
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"unreadable ({exc})") from None
        stored = {k.decode(): v.decode() for k, v in (self.file.schema_arrow.metadata or {}).items()}
        if not self.file.schema_arrow.equals(schema, check_metadata=False):
            raise ValueError("written with another Parquet schema")
        for key, value in metadata.items():
            if stored.get(key) != value:
                raise ValueError(f"computed with another {key.rsplit('.', 2)[-2]}")
        if self.file.metadata.num_rows != len(filenames):
            raise ValueError(f"{self.file.metadata.num_rows} rows for a manifest of {len(filenames)} images")
        head = self.file.read(columns=["img_file_name", "ok", "error_type"])
        if head.column("img_file_name").to_pylist() != filenames:
            raise ValueError("its rows do not name the manifest's images")
        ok = head.column("ok").to_numpy(zero_copy_only=False).astype(bool)
        transient = np.array([is_transient_page_error(k) for k in head.column("error_type").to_pylist()],
                             dtype=bool)
        self.kept = ok | ~transient
        self._group = -1
        self._group_start = 0
        self._rows: pa.Table | None = None

    @property
    def kept_count(self) -> int:
        return int(self.kept.sum())

    def take(self, start: int, limit: int) -> pa.Table:
        """The kept rows from ``start`` (kept itself) on: as many consecutive ones as the stored
        row group holding ``start`` has, at most ``limit``. Calls come in increasing order."""
        while self._rows is None or start >= self._group_start + self._rows.num_rows:
            if self._rows is not None:
                self._group_start += self._rows.num_rows
            self._group += 1
            self._rows = self.file.read_row_group(self._group).replace_schema_metadata(None)
        offset = start - self._group_start
        end = min(self._rows.num_rows, offset + limit)
        gaps = np.flatnonzero(~self.kept[start:start + end - offset])
        count = int(gaps[0]) if len(gaps) else end - offset
        return self._rows.slice(offset, count)

    def release(self) -> None:
        self._rows = None
        self._source.close()


class VolumeFile:
    """Rows of one volume in manifest order → row groups in a spooled file, as pages complete.

    ``kind`` (a ``bec.control.jobkinds.JobKind``) gives the schema, the row builder and the timing
    columns; without one, ldv1's (``bec.edges.artifacts``)."""

    def __init__(self, n_pages: int, metadata: dict[str, str], resume: Resume | None = None,
                 row_group_pages: int = ROW_GROUP_PAGES, kind: Any = None) -> None:
        self.n = n_pages
        self.build = kind.build_table if kind is not None else artifacts.build_table
        stages = kind.stage_names if kind is not None else STAGES
        self.timing_columns = tuple(f"{stage}_ms" for stage in stages)
        self.resume = resume
        self.row_group_pages = row_group_pages
        self.next_row = 0                          # the first row not yet gathered for writing
        self.waiting: dict[int, artifacts.PageOutcome] = {}  # finished ahead of an earlier page
        self._run: list[artifacts.PageOutcome] = []           # in order, not yet built into a piece
        self._pieces: list[pa.Table] = []
        self._piece_rows = 0
        self.rows_written = 0
        self.row_groups = 0
        self.held_max = 0
        self.tally = Tally()
        # Why rows could not be written (disk full; a row that cannot be built): said when the
        # volume finishes, and it is retried. Never raised into the controller's main loop.
        self.failure: Exception | None = None
        self._file: Any = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        schema = (kind.table_schema() if kind is not None else artifacts.SCHEMA).with_metadata(metadata)
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(self._file, schema, compression="zstd")
        self._advance()  # resumed rows at the start go out at once

    # -- what the controller asks ----------------------------------------------------------------
    def has(self, index: int) -> bool:
        """Is this page accounted for (written, waiting, or taken from the earlier attempt)?"""
        return (index < self.next_row or index in self.waiting
                or (self.resume is not None and bool(self.resume.kept[index])))

    def to_do(self) -> list[int]:
        """The pages to process: all of them, or those the earlier attempt did not finish."""
        if self.resume is None:
            return list(range(self.n))
        return [int(i) for i in np.flatnonzero(~self.resume.kept)]

    @property
    def held(self) -> int:
        """Page results in memory: waiting for an earlier page, or gathered for the row group."""
        return len(self.waiting) + len(self._run) + self._piece_rows

    def add(self, index: int, outcome: artifacts.PageOutcome) -> bool:
        """Record a page's result; False when it already had one (nothing changes)."""
        if self.has(index):
            return False
        self.waiting[index] = outcome
        self.held_max = max(self.held_max, self.held)
        self._advance()
        return True

    # -- the end -----------------------------------------------------------------------------------
    def close(self) -> tuple[IO[bytes], int]:
        """Write the last row group and the footer; the file, at its start, and its size.
        Raises what kept rows from being written (``failure``)."""
        assert self.next_row == self.n, f"closing at row {self.next_row} of {self.n}"
        self._write_group()
        if self.failure is None and self._writer is not None:
            try:
                self._writer.close()
            except (OSError, pa.ArrowException) as exc:
                self.failure = exc
            self._writer = None
        if self.failure is not None:
            raise self.failure
        size = self._file.tell()
        self._file.seek(0)
        return self._file, size

    def discard(self) -> None:
        """Drop the file (after its upload, or when the volume is let go)."""
        self.waiting.clear()
        self._run, self._pieces = [], []
        if self.resume is not None:
            self.resume.release()
        if self._writer is not None:
            try:
                self._writer.close()
            except (OSError, pa.ArrowException):
                pass
            self._writer = None
        self._file.close()

    # -- writing -----------------------------------------------------------------------------------
    def _advance(self) -> None:
        while self.next_row < self.n:
            i = self.next_row
            if self.resume is not None and self.resume.kept[i]:
                self._build_run()
                piece = self.resume.take(i, self.row_group_pages - self._piece_rows)
                self._tally_rows(i, piece)
                self._pieces.append(piece)
                self._piece_rows += piece.num_rows
                self.next_row += piece.num_rows
            elif i in self.waiting:
                outcome = self.waiting.pop(i)
                self._tally_outcome(i, outcome)
                self._run.append(outcome)
                self.next_row += 1
            else:
                return
            if self._piece_rows + len(self._run) >= self.row_group_pages:
                self._write_group()

    def _build_run(self) -> None:
        if self._run:
            if self.failure is None:
                try:
                    self._pieces.append(self.build(self._run))
                except Exception as exc:  # a bug or a row Arrow refuses: the volume is retried, saying so
                    self.failure = exc
            self._piece_rows += len(self._run)
            self._run = []

    def _write_group(self) -> None:
        self._build_run()
        if not self._piece_rows:
            return
        pieces = self._pieces
        self._pieces, self._piece_rows = [], 0
        if self.failure is not None or self._writer is None:
            return  # rows are dropped: finishing says why, and the volume is retried
        try:
            table = pieces[0] if len(pieces) == 1 else pa.concat_tables(pieces)
            self._writer.write_table(table, row_group_size=table.num_rows)
        except (OSError, pa.ArrowException) as exc:
            self.failure = exc
            return
        self.rows_written += table.num_rows
        self.row_groups += 1

    def _tally_outcome(self, index: int, outcome: artifacts.PageOutcome) -> None:
        self.tally.pages += 1
        for n, ms in enumerate(outcome.timings):
            self.tally.stage_ms[n] += ms
        if not outcome.ok:
            self.tally.error(index, outcome.filename, outcome.error_stage, outcome.error_type,
                             outcome.error_message)

    def _tally_rows(self, start: int, rows: pa.Table) -> None:
        self.tally.pages += rows.num_rows
        self.tally.resumed += rows.num_rows
        for n, name in enumerate(self.timing_columns):
            self.tally.stage_ms[n] += float(pc.sum(rows.column(name)).as_py() or 0.0)
        ok = rows.column("ok").to_numpy(zero_copy_only=False).astype(bool)
        for k in np.flatnonzero(~ok):
            row = rows.slice(int(k), 1).select(["img_file_name", "error_stage", "error_type",
                                                "error_message"]).to_pylist()[0]
            self.tally.error(start + int(k), row["img_file_name"], row["error_stage"], row["error_type"],
                             row["error_message"])
