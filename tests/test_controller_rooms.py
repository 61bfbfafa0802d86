"""The controller's rooms (``bec/pipeline/controller/``), each one alone: no worker, no
database, no moto. The slot dispatcher runs on a real shared-memory slot table with a plain
queue as the fetch process' queue; the receiver on a fake SQS client; the rest on what each
room is handed. The worker scenarios (test_worker*.py, the fault tests) run them together."""
from __future__ import annotations

import collections
import importlib
import io
import itertools
import logging
import queue
import threading
import time
from typing import Any

import botocore.exceptions
import numpy as np
import pyarrow.parquet as pq
import pytest

from bec.control import jobkinds, lifecycle
from bec.edges.archive import Manifest, ManifestEntry
from bec.edges.artifacts import PageOutcome
from bec.errors import BecError
from bec.control.lifecycle import Admission, Received, Verdict
from bec.pipeline import slots as S
from bec.pipeline import supervisor
from bec.pipeline.backoff import BackoffWatch
from bec.pipeline.controller import dispatch, holds as holds_room
from bec.pipeline.controller.admission import Admitter
from bec.pipeline.controller.dispatch import CRASH_BUDGET, SlotDispatcher
from bec.pipeline.controller.extender import Extender
from bec.pipeline.controller.finish import Finisher
from bec.pipeline.controller.holds import Holds
from bec.pipeline.controller.receiver import Receiver
from bec.pipeline.controller.volumes import Counters, VolumeBook, VolumeRun
from bec.pipeline.messages import Fetch, Gone, PageDone, PageFailed, Stop, Track
from bec.pipeline.slots import SlotPool, encode_result

KIND = jobkinds.kind_of("ldv1")
FETCH_PID = 4_000_001  # the fetch process, as the supervisor's pid table names it
QUEUE_URL = "http://sqs.local/123/tasks"


# -- helpers ---------------------------------------------------------------------------------------
def received(n: int) -> Received:
    return Received(f"m{n}", f"r{n}", f'{{"w_id": "W{n}", "i_id": "I{n}"}}', 1)


def admitted(pages: int, n: int = 1, problems: dict[int, str] | None = None) -> Admission:
    problems = problems or {}
    entries = tuple(ManifestEntry(f"p{i}.jpg", 100, 50, problems.get(i)) for i in range(pages))
    manifest = Manifest(f"W{n}", f"I{n}", f"W{n}/I{n}/images/", '"0123456789"', entries)
    return Admission(Verdict.ADMITTED, received(n), w_id=f"W{n}", i_id=f"I{n}", manifest=manifest,
                     attempt=1, claimed_at=time.time())


def new_book(completed: list[VolumeRun] | None = None) -> VolumeBook:
    done = completed if completed is not None else []
    return VolumeBook(KIND, itertools.count(1).__next__, on_complete=done.append)


def failed(page: int, kind: str = "corrupt_image") -> PageOutcome:
    return PageOutcome.failed(f"p{page}.jpg", "decode", kind, f"page {page} is broken")


class Fetches:
    """The fetch process' queue: a plain ``queue.Queue`` (bounded when asked)."""

    def __init__(self, maxsize: int = 0) -> None:
        self.q: queue.Queue[Fetch] = queue.Queue(maxsize)
        self.gone = False

    def send(self, role: str, msg: Fetch) -> bool:
        assert role == "fetch-0"
        if self.gone:
            raise Gone(role)
        try:
            self.q.put_nowait(msg)
        except queue.Full:
            return False
        return True

    def take(self) -> list[Fetch]:
        got = []
        while not self.q.empty():
            got.append(self.q.get_nowait())
        return got


@pytest.fixture
def pool():
    pool = SlotPool.create(2, 4096, roles=4)
    pool.pids[0] = FETCH_PID
    yield pool
    pool.close()


@pytest.fixture
def fast_scan(monkeypatch):
    monkeypatch.setattr(dispatch, "SCAN_EVERY_S", 0.0)


def dispatcher(pool: SlotPool, book: VolumeBook, fetches: Fetches) -> SlotDispatcher:
    return SlotDispatcher(pool, book, KIND, fetch_roles=["fetch-0"], fetch_depth=100,
                          pid_of=lambda role: int(pool.pids[0]), send=fetches.send, source_bucket="src")


def one_volume(pool: SlotPool, pages: int,
               **kwargs: Any) -> tuple[VolumeBook, Fetches, SlotDispatcher, VolumeRun]:
    """A dispatcher over ``pool`` with one volume of ``pages`` pages to do."""
    book, fetches = new_book(), Fetches(**kwargs)
    slots = dispatcher(pool, book, fetches)
    return book, fetches, slots, book.open(admitted(pages), {}, time.monotonic() + 30)


def page_of(msg: Fetch) -> int:
    return int(msg.key.rsplit("/p", 1)[1].split(".")[0])


def finish(pool: SlotPool, slots: SlotDispatcher, msg: Fetch) -> None:
    """The pipeline hands the slot back finished (post-processing's result in it)."""
    result = {"rotation_angle": None, "skew": 0.5, "contours": [np.array([[1, 2], [3, 4]], np.int32)],
              "boxes": np.array([[1, 2, 2, 2]], np.int32), "line_index": np.zeros(1, np.int16),
              "tps_points": None, "tps_alpha": None}
    pool.write_result(msg.slot, encode_result(result))
    row = pool.table[msg.slot]
    row["state"], row["owner"], row["orig_w"], row["orig_h"] = S.DONE, 0, 100, 50
    slots.page_done(PageDone(msg.slot, msg.gen))


# -- the volume book -------------------------------------------------------------------------------
def test_volume_book_writes_outcomes_in_manifest_order_and_completes_once():
    completed: list[VolumeRun] = []
    book = new_book(completed)
    vol = book.open(admitted(4), {}, visible_until=time.monotonic() + 30)
    assert list(vol.todo) == [0, 1, 2, 3] and len(book) == 1 and book.has_label(("W1", "I1"))
    assert book.queued_pages() == 4 and book.running() == [vol]
    for page in (2, 0, 3):
        vol.todo.remove(page)
        book.record(vol, page, failed(page))
        assert not vol.complete and completed == []
    assert vol.out.next_row == 1  # page 0 is written, 2 and 3 wait for page 1
    book.record(vol, 1, PageOutcome("p1.jpg", True, "etag", width=100, height=50))
    assert vol.complete and vol.finishing and completed == [vol]
    book.record(vol, 1, failed(1))  # a second outcome for a page changes nothing
    assert completed == [vol] and book.counters.pages == 4 and book.counters.page_errors == 3
    assert book.running() == [] and book.any_finishing()
    file, _size = vol.out.close()
    table = pq.read_table(io.BytesIO(file.read()))
    assert table.column("img_file_name").to_pylist() == ["p0.jpg", "p1.jpg", "p2.jpg", "p3.jpg"]
    assert table.column("ok").to_pylist() == [False, True, False, False]
    vol.out.discard()
    assert book.pop(vol.key) is vol and len(book) == 0 and not book.has_label(("W1", "I1"))


def test_volume_book_counts_what_became_of_volumes(caplog):
    book = new_book()
    caplog.set_level(logging.INFO, "bec.controller")
    book.count_outcome(admitted(3, 1), Verdict.ADMITTED, 3, 1)
    book.count_outcome(admitted(3, 2), Verdict.RETRY, 3, 2)
    book.count_outcome(admitted(3, 3), Verdict.RELEASED, 3, 0)
    assert (book.counters.volumes_done, book.counters.volumes_retry) == (1, 1)
    assert "Successfully processed message: m1" in caplog.text
    assert "volume W2/I2 v012345 not done (3 pages, 2 errors, 0 transient): will be retried" in caplog.text
    assert "Released volume W3/I3 (message m3 handed back unspent)" in caplog.text


# -- the slot dispatcher ---------------------------------------------------------------------------
def test_dispatch_stays_within_the_reorder_window(pool):
    book, fetches, slots, vol = one_volume(pool, 10)
    assert slots.reorder_window == 4  # 2 × slots
    slots.dispatch()
    first = fetches.take()
    assert [page_of(m) for m in first] == [0, 1]
    assert [m.key for m in first] == ["W1/I1/images/p0.jpg", "W1/I1/images/p1.jpg"]
    assert all((pool.table[m.slot]["owner"], pool.table[m.slot]["state"]) == (FETCH_PID, S.FETCH) for m in first)
    slow, ahead = first  # page 0 takes long; the pages after it finish one by one
    for expected in (2, 3):
        finish(pool, slots, ahead)
        slots.dispatch()
        (ahead,) = fetches.take()
        assert page_of(ahead) == expected
    finish(pool, slots, ahead)  # page 3: pages 1–3 wait in memory for page 0
    slots.dispatch()
    assert fetches.take() == [] and len(slots.free) == 1 and vol.todo[0] == 4  # 4 ≥ 0 + window
    assert vol.out.next_row == 0 and vol.out.held == 3
    finish(pool, slots, slow)
    assert vol.out.next_row == 4 and vol.out.failure is None
    slots.dispatch()
    assert [page_of(m) for m in fetches.take()] == [4, 5] and not slots.free


def test_a_full_or_gone_fetch_queue_keeps_the_page_and_the_slot(pool):
    _book, fetches, slots, vol = one_volume(pool, 3, maxsize=1)
    slots.dispatch()
    assert [page_of(m) for m in fetches.take()] == [0]
    assert list(vol.todo) == [1, 2] and len(slots.free) == 1
    assert pool.table[slots.free[0]]["state"] == S.FREE and pool.table[slots.free[0]]["owner"] == 0
    fetches.gone = True
    slots.dispatch()
    assert list(vol.todo) == [1, 2] and len(slots.free) == 1


def test_manifest_problems_become_error_rows_without_a_fetch(pool):
    book, fetches = new_book(), Fetches()
    slots = dispatcher(pool, book, fetches)
    vol = book.open(admitted(3, problems={1: "unsafe file name"}), {}, time.monotonic() + 30)
    slots.dispatch()
    assert [page_of(m) for m in fetches.take()] == [0, 2]
    assert vol.out.has(1) and book.counters.page_errors == 1 and vol.remaining == 2
    outcome = vol.out.waiting[1]  # written once page 0 is
    assert (outcome.error_stage, outcome.error_type, outcome.error_message) == (
        "manifest", "invalid_entry", "unsafe file name")


def test_a_dead_holders_page_is_redone_and_its_slot_rests_before_reuse(pool, fast_scan, monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "RETIRE_S", 0.5)
    caplog.set_level(logging.INFO, "bec.controller")
    book, fetches, slots, vol = one_volume(pool, 3)
    slots.dispatch()
    sent = fetches.take()
    assert [page_of(m) for m in sent] == [0, 1]
    slots.scan()  # its holder lives: nothing happens
    assert list(vol.todo) == [2] and book.counters.pages_redone == 0
    pool.pids[0] = 0  # the fetch process died (the supervisor clears its pid)
    slots.scan()
    assert sorted(vol.todo) == [0, 1, 2] and book.counters.pages_redone == 2
    assert all(pool.table[m.slot]["state"] == S.RETIRED for m in sent)
    assert "redoing page 0 of W1/I1 (holder died)" in caplog.text
    pool.pids[0] = FETCH_PID + 1  # its replacement
    slots.scan()
    slots.dispatch()
    assert fetches.take() == []  # both slots rest: none is reused yet
    # the dead holder's late report is stale (its generation was bumped): nothing recorded
    row = pool.table[sent[0].slot]
    row["state"] = S.DONE
    slots.page_done(PageDone(sent[0].slot, sent[0].gen))
    assert not vol.out.has(0) and book.counters.pages == 0
    row["state"] = S.RETIRED
    time.sleep(0.55)
    slots.scan()
    slots.dispatch()
    again = fetches.take()
    assert sorted(page_of(m) for m in again) == [0, 1]
    assert {m.slot for m in again} == {m.slot for m in sent}
    assert all(m.gen > old.gen for m, old in zip(sorted(again, key=lambda m: m.slot),
                                                 sorted(sent, key=lambda m: m.slot)))
    assert all(pool.table[m.slot]["owner"] == FETCH_PID + 1 for m in again)
    assert not any(m.alone for m in again)  # it died fetching, not while working on the page


def test_the_crash_budget_turns_a_page_into_an_error_row(pool, fast_scan, monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "RETIRE_S", 0.0)
    caplog.set_level(logging.INFO, "bec.controller")
    _book, fetches, slots, vol = one_volume(pool, 1)
    alone = []
    for crash in range(1, CRASH_BUDGET + 1):
        pool.pids[0] = FETCH_PID + crash
        slots.scan()  # the slots retired by the last crash are free again
        slots.dispatch()
        (msg,) = fetches.take()
        alone.append(msg.alone)
        row = pool.table[msg.slot]
        row["state"], row["busy"] = S.POST, 1  # post-processing it…
        pool.pids[0] = 0  # … when its process died
        slots.scan()
        assert vol.crashes[0] == crash
    assert alone == [False] + [True] * (CRASH_BUDGET - 1)  # redone alone after a crash
    assert "redoing page 0 of W1/I1 (holder died while working on it: redone alone)" in caplog.text
    assert vol.out.has(0) and vol.complete and vol.finishing
    assert vol.out.tally.errors_by_type == {"crashed_postprocess": 1}
    assert f"crashed its post process {CRASH_BUDGET} times: recorded as an error" in caplog.text
    pool.pids[0] = FETCH_PID
    slots.scan()
    slots.dispatch()
    assert fetches.take() == [] and list(vol.todo) == []


def test_a_failed_page_frees_its_slot_and_says_what_it_was(pool):
    _book, fetches, slots, vol = one_volume(pool, 2)
    slots.dispatch()
    msg = fetches.take()[0]
    row = pool.table[msg.slot]
    row["state"], row["etag"], row["fetch_ms"] = S.DONE, b"abc", 12.0
    assert slots.page_failed(PageFailed(msg.slot, msg.gen + 1, "decode", "x", "y")) is None  # stale
    assert slots.page_failed(PageFailed(msg.slot, msg.gen, "decode", "x", "y")) == (vol, 0, "abc",
                                                                                   (12.0, 0.0, 0.0, 0.0))
    assert msg.slot in slots.free and pool.table[msg.slot]["state"] == S.FREE


# -- the receiver ----------------------------------------------------------------------------------
class FakeSQS:
    """What the receiver calls of an SQS client: ``receive_message`` (each call takes
    ``delay`` seconds and returns the next batch), and ``change_message_visibility``."""

    def __init__(self, batches: list[list[int]], delay: float = 0.0, fail_first: bool = False) -> None:
        self.batches = collections.deque(batches)
        self.delay = delay
        self.fail_first = fail_first
        self.receives: list[dict[str, Any]] = []
        self.hidden: list[dict[str, Any]] = []

    def receive_message(self, **kwargs: Any) -> dict[str, Any]:
        self.receives.append(kwargs)
        if self.fail_first:
            self.fail_first = False
            raise botocore.exceptions.ClientError({"Error": {"Code": "ServiceUnavailable"}}, "ReceiveMessage")
        time.sleep(self.delay)
        batch = self.batches.popleft() if self.batches else []
        return {"Messages": [{"MessageId": f"m{n}", "ReceiptHandle": f"r{n}", "Body": "{}",
                              "Attributes": {"ApproximateReceiveCount": "2"}} for n in batch]}

    def change_message_visibility(self, **kwargs: Any) -> dict[str, Any]:
        self.hidden.append(kwargs)
        return {}


def new_receiver(sqs: FakeSQS, told: list, want: int = 5,
                 shutdown_after_empty: int = 2) -> tuple[Receiver, queue.Queue]:
    events: queue.Queue = queue.Queue()
    receiver = Receiver(sqs, BackoffWatch(sqs, QUEUE_URL), events, queue_url=QUEUE_URL, poll_wait=1,
                        visibility_timeout=30, shutdown_after_empty=shutdown_after_empty,
                        want=lambda: want, tell_supervisor=told.append)
    return receiver, events


def wait_for(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_receiver_waits_for_the_pipeline_and_for_each_receive_to_be_taken_in():
    sqs, told = FakeSQS([[1, 2], [3]]), []
    receiver, events = new_receiver(sqs, told)
    receiver.start()
    try:
        time.sleep(0.3)
        assert sqs.receives == []  # nothing before the pipeline is ready
        receiver.pipeline_ready.set()
        kind, messages, _at = events.get(timeout=5)
        assert kind == "received" and [m.message_id for m in messages] == ["m1", "m2"]
        assert messages[0].receive_count == 2
        assert told == [Track("r1"), Track("r2")] and receiver.unseen == 2
        assert sqs.receives[0]["MaxNumberOfMessages"] == 5 and sqs.receives[0]["QueueUrl"] == QUEUE_URL
        time.sleep(0.3)
        assert len(sqs.receives) == 1  # not taken in yet: no other receive
        with receiver.taking_in(messages):
            pass
        assert receiver.unseen == 0
        kind, messages, _at = events.get(timeout=5)
        assert [m.message_id for m in messages] == ["m3"]
    finally:
        receiver.stop()
        receiver.thread.join(5)
    assert not receiver.thread.is_alive()


def test_receiver_retries_a_failed_receive_after_a_pause(caplog):
    sqs, told = FakeSQS([[7]], fail_first=True), []
    receiver, events = new_receiver(sqs, told)
    receiver.pipeline_ready.set()
    receiver.start()
    try:
        started = time.monotonic()
        _kind, messages, _at = events.get(timeout=5)
        assert [m.message_id for m in messages] == ["m7"] and time.monotonic() - started >= 0.9
        assert "SQS receive failed (ServiceUnavailable); retrying in 1s" in caplog.text
    finally:
        receiver.stop()


def test_hand_back_waits_for_the_last_receive_and_hands_its_messages_back():
    sqs, told = FakeSQS([[5]], delay=0.6), []
    receiver, events = new_receiver(sqs, told)
    receiver.pipeline_ready.set()
    receiver.start()
    wait_for(lambda: sqs.receives)  # a receive is in flight…
    receiver.stop()  # … when the run ends
    handed: list[list[str]] = []

    def take_in(messages: list[Received], at: float) -> None:
        with receiver.taking_in(messages):
            handed.append([m.message_id for m in messages])

    events.put(("finished", 1, Verdict.ADMITTED))  # nobody is left to act on other events
    receiver.hand_back(lambda: True, lambda timeout: time.sleep(timeout), take_in)
    assert handed == [["m5"]] and not receiver.thread.is_alive() and events.empty()
    assert told == [Track("r5")] and receiver.unseen == 0


def test_hand_back_waits_for_nothing_when_told_to_stop_at_once_or_by_a_stop():
    for how in ("at once", "stop message"):
        sqs, told = FakeSQS([[5]], delay=3.0), []
        receiver, _events = new_receiver(sqs, told)
        receiver.pipeline_ready.set()
        receiver.start()
        wait_for(lambda: sqs.receives)
        receiver.stop()
        if how == "at once":
            receiver.no_wait_at_the_end()
        handed: list = []
        started = time.monotonic()
        receiver.hand_back(lambda: True, lambda timeout: Stop(), lambda *args: handed.append(args))
        assert time.monotonic() - started < 1.0 and handed == [] and receiver.thread.is_alive(), how


def test_the_hand_back_wait_is_brief_when_the_supervisor_stops_the_run():
    receiver, _events = new_receiver(FakeSQS([]), [])
    assert receiver.last_receive_wait_s == 1 + 2.0  # the long poll's wait and a grace
    receiver.brief_wait_at_the_end()
    assert receiver.last_receive_wait_s == 3.0
    receiver = Receiver(FakeSQS([]), BackoffWatch(FakeSQS([]), QUEUE_URL), queue.Queue(), queue_url=QUEUE_URL,
                        poll_wait=20, visibility_timeout=30, shutdown_after_empty=0, want=lambda: 1,
                        tell_supervisor=print)
    receiver.brief_wait_at_the_end()
    assert receiver.last_receive_wait_s == 5.0


def test_empty_polls_end_an_idle_run_but_not_while_a_hidden_message_comes_back(caplog):
    caplog.set_level(logging.INFO, "bec.controller")
    sqs = FakeSQS([])
    receiver, _events = new_receiver(sqs, [], shutdown_after_empty=2)
    receiver.count_poll(0, idle=False)  # a volume runs: not idle
    assert receiver.empty_polls == 0
    receiver.backoffs.change_message_visibility(QueueUrl=QUEUE_URL, ReceiptHandle="r1", VisibilityTimeout=30)
    receiver.count_poll(0, idle=True)
    receiver.count_poll(0, idle=True)
    assert receiver.empty_polls == 0 and not receiver.ran_dry
    assert caplog.text.count("Empty poll, but a message this worker delayed is visible again in 32 s") == 1
    receiver.backoffs = BackoffWatch(sqs, QUEUE_URL)  # nothing hidden any more
    receiver.count_poll(0, idle=True)
    assert receiver.empty_polls == 1 and not receiver.ran_dry
    receiver.count_poll(1, idle=True)
    assert receiver.empty_polls == 0
    receiver.count_poll(0, idle=True)
    receiver.count_poll(0, idle=True)
    assert receiver.ran_dry


# -- holds -----------------------------------------------------------------------------------------
def test_a_held_message_pauses_receiving_until_it_is_settled(caplog):
    events: queue.Queue = queue.Queue()
    holds = Holds(lambda: None, (), events, itertools.count(1).__next__)
    adm = admitted(2)
    adm.reason = "the database did not answer (test)"
    holds.hold(adm, ("W1", "I1"), visible_until=123.0, pages=2, errors=1)
    assert holds.paused and holds.database_down and holds.has_label(("W1", "I1")) and len(holds) == 1
    assert "PostgreSQL is unavailable (the database did not answer (test))" in caplog.text
    assert holds.service_back("storage") == []  # storage was not down
    (key, held), = holds.service_back("database")
    assert held.busy and held.adm is adm and not holds.database_down
    assert holds.service_back("database") == []  # asked once
    assert holds.settled(key, Verdict.HELD) is None  # still no database
    assert holds.database_down and not held.busy and len(holds) == 1
    assert holds.settled(key, Verdict.ADMITTED) is held
    assert len(holds) == 0 and not holds.has_label(("W1", "I1"))
    holds.service_back("database")
    assert not holds.paused


def test_the_end_of_the_run_leaves_held_messages_hidden(caplog):
    holds = Holds(lambda: None, (), queue.Queue(), itertools.count(1).__next__)
    adm = admitted(1)
    holds.hold(adm, ("W1", "I1"), 0.0)
    holds.abandon()
    assert adm.message.settled.is_set() and len(holds) == 0
    assert "Volume W1/I1: message m1 left hidden until its visibility timeout" in caplog.text


def test_the_probe_says_when_the_database_and_storage_answer_again(monkeypatch):
    monkeypatch.setattr(holds_room, "PROBE_EVERY_S", 0.01)
    answers = {"db": False, "bucket": "unreachable"}

    def writable() -> None:
        if not answers["db"]:
            raise BecError("read-only")

    events: queue.Queue = queue.Queue()
    holds = Holds(writable, (lambda: answers["bucket"],), events, itertools.count(1).__next__)
    holds.database_outage("test")
    assert holds.storage_outage("expired token", in_flight=2) is True
    assert holds.storage_outage("expired token", in_flight=2) is False  # said once
    holds.start()
    try:
        time.sleep(0.2)
        assert events.empty()
        answers["db"] = True
        assert events.get(timeout=2) == ("service_back", "database")
        holds.service_back("database")  # the probe asks the database no more…
        time.sleep(0.1)
        while not events.empty():  # … once the loop has heard it (asked again meanwhile)
            assert events.get_nowait() == ("service_back", "database")
        time.sleep(0.1)
        assert events.empty()
        answers["bucket"] = None
        assert events.get(timeout=2) == ("service_back", "storage")
        holds.service_back("storage")
        assert not holds.paused
    finally:
        holds.stop()
    holds.thread.join(2)
    assert not holds.thread.is_alive()


# -- extender, finisher, admission -----------------------------------------------------------------
def test_the_extender_extends_only_what_is_due():
    book = new_book()
    due = book.open(admitted(1, 1), {}, visible_until=time.monotonic() + 1)
    later = book.open(admitted(1, 2), {}, visible_until=time.monotonic() + 100)
    calls = []

    def extend(messages: list[Received], seconds: int) -> list[tuple[Received, int]]:
        calls.append(([m.message_id for m in messages], seconds))
        return [(m, seconds) for m in messages]

    extender = Extender(30, book.runs, extend)
    before = time.monotonic()
    extender.extend_due(30, 15.0)
    assert calls == [(["m1"], 30)]
    assert due.visible_until >= before + 30 and later.visible_until < before + 101
    extender.start()
    extender.stop()
    extender.thread.join(3)
    assert not extender.thread.is_alive()


def test_the_finisher_always_reports_back(monkeypatch, caplog):
    def broken(*args: Any, **kwargs: Any) -> Verdict:
        raise RuntimeError("a bug")

    monkeypatch.setattr(lifecycle, "finish", broken)
    monkeypatch.setattr(lifecycle, "retry_later", broken)
    events: queue.Queue = queue.Queue()
    finisher = Finisher(svc=None, events=events)
    vol = new_book().open(admitted(1), {}, 0.0)
    finisher.finish(vol)
    finisher.close()
    assert vol.finishing and events.get_nowait() == ("finished", vol.key, Verdict.RETRY)
    assert vol.adm.message.settled.is_set()  # its message comes back after its timeout
    assert "finishing W1/I1 failed" in caplog.text


def test_admission_remembers_labels_and_reports_each_verdict(monkeypatch, caplog):
    caplog.set_level(logging.INFO, "bec.controller")
    go = threading.Event()

    def admit(svc: Any, message: Received) -> Admission:
        go.wait(5)
        return Admission(Verdict.POISON, message, reason="message body is not JSON")

    monkeypatch.setattr(lifecycle, "admit", admit)
    events: queue.Queue = queue.Queue()
    counters = Counters()
    admitter = Admitter(svc=None, events=events, counters=counters)
    admitter.admit(received(1), ("W1", "I1"), 1.5)
    assert len(admitter) == 1 and admitter.has_label(("W1", "I1"))
    go.set()
    kind, adm, label, at = events.get(timeout=5)
    assert (kind, adm.verdict, label, at) == ("admitted", Verdict.POISON, ("W1", "I1"), 1.5)
    admitter.landed(adm, label)
    admitter.report(adm)
    assert len(admitter) == 0 and counters.poison == 1 and counters.by_verdict == {"poison": 1}
    assert "Poison message m1 sent to the DLQ: message body is not JSON" in caplog.text
    admitter.close()


def test_the_supervisor_still_finds_the_controller_entry_point():
    module = importlib.import_module(supervisor.CONTROLLER)
    assert module.__name__ == "bec.pipeline.controller" and callable(module.run)
