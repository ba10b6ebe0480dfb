"""QueueMover against a real PostgreSQL with PgQ: exactly once, field for field,
through crashes, races, lost positions and bounded drains.

Every comparison is event by event: tests.helpers.queue_events gives the multiset
of (type, data, extra1..4, time) rows of a queue, so a lost, doubled or altered
event (NULL turned into '', a shifted time, a mangled character) fails the test.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg2
import pytest

from airflow_provider_pgq.core import faults, pgq
from airflow_provider_pgq.core.errors import (
    ConsumerNotRegistered,
    PgqExtMissing,
    PgqNotInstalled,
    PositionMismatch,
    QueueDisabled,
    QueueNotFound,
    TickerNotRunning,
    TrackingKeyConflict,
)
from airflow_provider_pgq.core.mover import BatchResult, DrainBounds, MoveReport, MoverOptions, QueueMover
from airflow_provider_pgq.core.pending import PendingStatus
from tests.helpers import (
    Event,
    Server,
    has_pgq_ext,
    is_registered,
    mark_of,
    produce,
    queue_events,
    register,
    run_mover,
    simple_events,
    spawn_mover,
    tick,
    tick_plain,
    tick_time,
    wait_mover,
)

MakeDb = Callable[..., Server]
UTC = dt.timezone.utc


# -- helpers ------------------------------------------------------------------------


def options(consumer: str = "mover", **kw: Any) -> MoverOptions:
    return MoverOptions(
        source_queue=kw.pop("source_queue", "src_q"),
        target_queue=kw.pop("target_queue", "dst_q"),
        consumer=consumer,
        **kw,
    )


@contextmanager
def open_mover(
    source: Server,
    target: Server,
    fault: faults.FaultHook | None = None,
    on_batch: Callable[[BatchResult], None] | None = None,
    **kw: Any,
) -> Iterator[QueueMover]:
    """A QueueMover on fresh connections, closed afterwards."""
    s, t = source.connect(), target.connect()
    try:
        yield QueueMover(s, t, options(**kw), fault=fault, on_batch=on_batch)
    finally:
        s.close()
        t.close()


def assert_idle(mover: QueueMover) -> None:
    """No transaction left open on either side: an open source transaction would hold
    back PgQ's table rotation, an open target one would hold the key lock."""
    idle = psycopg2.extensions.TRANSACTION_STATUS_IDLE
    assert mover.source.get_transaction_status() == idle
    assert mover.target.get_transaction_status() == idle


def rounds(source: Server, sizes: Sequence[int], prefix: str = "r") -> tuple[list[int], list[list[Event]]]:
    """One produce + tick per size: that many pending batches; returns (ticks, events per tick)."""
    ticks: list[int] = []
    produced: list[list[Event]] = []
    start = 0
    for i, n in enumerate(sizes):
        events = simple_events(n, start=start, prefix=f"{prefix}{i}")
        start += n
        produce(source, "src_q", events)
        produced.append(events)
        ticks.append(tick(source, "src_q"))
    return ticks, produced


def bag(*groups: Sequence[Event]) -> Counter[Event]:
    out: Counter[Event] = Counter()
    for g in groups:
        out.update(tuple(e) for e in g)
    return out


def consumer_position(server: Server, queue: str = "src_q", consumer: str = "mover") -> tuple[Any, ...]:
    """(last_tick, current_batch) of a consumer on the source."""
    rows = server.execute(
        "select last_tick, current_batch from pgq.get_consumer_info(%s, %s)", (queue, consumer)
    )
    return tuple(rows[0]) if rows else ()


def db_now(server: Server) -> dt.datetime:
    return server.execute("select now()")[0][0]  # type: ignore[no-any-return]


def special_events() -> list[Event]:
    """Values that break naive transports: NULL next to '', non-ASCII, control and
    COPY-text characters, 1 MB of data, odd time zones and microseconds, duplicates."""
    t0 = dt.datetime(2025, 6, 30, 23, 59, 59, 999999, tzinfo=UTC)
    nepal = dt.timezone(dt.timedelta(hours=5, minutes=45))
    megabyte = "0123456789abcdef" * 65536 + "é€𝄞"
    return [
        ("empty", "", "", None, "", None, t0),
        ("nulls", None, None, "", None, "", t0 + dt.timedelta(microseconds=1)),
        (None, "null type", None, None, None, None, t0 + dt.timedelta(microseconds=2)),
        ("ü.typ€", "日本語 ✓ 🚀 ﬁ e\u0301 Ωmega", "Ω", "שלום", "Привет", "😀", t0 + dt.timedelta(seconds=1)),
        ("copy-text", "\\N", "tab\there", "line\nbreak\r\n", "back\\slash", "quote ' \" ;", t0),
        ("spaces", " ", "  ", "\u00a0", "\u200b", "\ufeff", dt.datetime(1970, 1, 1, tzinfo=UTC)),
        ("tz", "nepal time", None, None, None, None, dt.datetime(2024, 2, 29, 12, 0, 0, 123456, tzinfo=nepal)),
        ("big", megabyte, "x" * 10000, None, "", None, t0 + dt.timedelta(days=1)),
        ("dup", "same", "same", None, None, None, t0),
        ("dup", "same", "same", None, None, None, t0),
    ]


def take_batch_retrying(source: Server, consumer: str, pick: Callable[[str], bool]) -> tuple[int, list[Event]]:
    """Plays a consumer by hand: takes the next batch, sends the events whose ev_data
    pick() selects to the retry queue (due now) and finishes the batch. Returns the
    batch's end tick and the retried events as the batch yielded them."""
    conn = source.connect()
    try:
        batch = pgq.next_batch_info(conn, "src_q", consumer)
        assert batch is not None
        retried: list[Event] = []
        with conn.cursor() as cur:
            cur.execute(
                "select ev_id, ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4, ev_time"
                " from pgq.get_batch_events(%s)",
                (batch.batch_id,),
            )
            for ev_id, *fields in cur.fetchall():
                if pick(fields[1]):
                    cur.execute("select pgq.event_retry(%s, %s, 0)", (batch.batch_id, ev_id))
                    retried.append(tuple(fields))
        assert pgq.finish_batch(conn, batch.batch_id)
        conn.commit()
        return batch.cur_tick_id, retried
    finally:
        conn.close()


def run_retry_maintenance(source: Server) -> int:
    """pgq.maint_retry_events() until the retry queue is empty (pgqd's maintenance)."""
    moved = 0
    while True:
        n = int(source.execute("select pgq.maint_retry_events()")[0][0])
        if n == 0:
            return moved
        moved += n


def moved_ticks(*reports: MoveReport | dict[str, Any]) -> list[int]:
    """End ticks of the batches the reports moved (not skipped), sorted."""
    out: list[int] = []
    for r in reports:
        results = r.batch_results if isinstance(r, MoveReport) else r["batch_results"]
        for b in results:
            d = b if isinstance(b, dict) else {"outcome": b.outcome, "cur_tick_id": b.cur_tick_id}
            if d["outcome"] == "moved":
                out.append(int(d["cur_tick_id"]))
    return sorted(out)


# -- volume and fidelity --------------------------------------------------------------


def test_bulk_move_keeps_every_field_and_delivers_retried_events(source: Server, target: Server) -> None:
    """20,000+ events over several ticks arrive field for field; events a consumer put
    into the retry queue reach the target when PgQ hands them out again; a second
    drain right after moves nothing."""
    register(source, "src_q", "mover")

    # A batch the mover never moves: taken by hand as the mover's consumer, every
    # tenth event sent to the retry queue, the batch finished.
    early = simple_events(200, prefix="early")
    produce(source, "src_q", early)
    tick(source, "src_q")
    early_tick, retried = take_batch_retrying(source, "mover", lambda data: int(data.rsplit("-", 1)[1]) % 10 == 0)
    assert len(retried) == 20

    specials = special_events()
    produce(source, "src_q", specials)
    bulk: list[Event] = []
    ticks: list[int] = []
    for i in range(4):
        chunk = simple_events(5000, start=i * 5000, prefix="bulk")
        produce(source, "src_q", chunk)
        bulk += chunk
        ticks.append(tick(source, "src_q"))
    assert run_retry_maintenance(source) == 20
    ticks.append(tick(source, "src_q"))
    tail = simple_events(10, prefix="tail")
    produce(source, "src_q", tail)
    ticks.append(tick(source, "src_q"))

    expected = bag(specials, bulk, retried, tail)
    assert sum(expected.values()) == 10 + 20000 + 20 + 10
    # The source holds every early event once, plus the retried ones a second time.
    assert queue_events(source, "src_q") == bag(early) + expected
    assert retried == [e for e in early if int(e[1].rsplit("-", 1)[1]) % 10 == 0]

    with open_mover(source, target) as mover:
        report = mover.drain()
        assert_idle(mover)
        assert queue_events(target, "dst_q") == expected
        assert report.events == sum(expected.values())
        assert report.batches == len(ticks) and report.skipped == 0 and report.stale == 0
        assert report.first_tick == early_tick and report.last_tick == ticks[-1]
        assert [b.cur_tick_id for b in report.batch_results] == ticks
        assert [b.events for b in report.batch_results] == [5010, 5000, 5000, 5000, 20, 10]
        assert report.stop_reason == "drained"
        assert mark_of(target, "mover") == ticks[-1]

        again = mover.drain()  # the same mover and connections, right after
    assert (again.batches, again.skipped, again.events, again.stop_reason) == (0, 0, 0, "drained")
    assert again.first_tick is None and again.last_tick is None
    assert queue_events(target, "dst_q") == expected
    assert mark_of(target, "mover") == ticks[-1]


def test_moved_events_are_delivered_to_target_consumers(source: Server, target: Server) -> None:
    """Rows written straight into the event table carry the target's own txid, so a
    consumer of the target queue receives them in its next batch, fields intact."""
    register(source, "src_q", "mover")
    register(target, "dst_q", "reader")
    events = simple_events(50) + special_events()[:4]
    produce(source, "src_q", events)
    tick(source, "src_q")
    assert run_mover(source, target).events == len(events)
    tick(target, "dst_q")
    conn = target.connect()
    try:
        batch = pgq.next_batch_info(conn, "dst_q", "reader")
        assert batch is not None
        with conn.cursor() as cur:
            cur.execute(
                "select ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4, ev_time"
                " from pgq.get_batch_events(%s)",
                (batch.batch_id,),
            )
            delivered = Counter(tuple(r) for r in cur.fetchall())
        conn.rollback()
    finally:
        conn.close()
    assert delivered == bag(events)


# -- crashes between the steps ----------------------------------------------------------

#: Points after which the target holds the batch and its mark: the retry skips it.
APPLIED_POINTS = (faults.AFTER_TARGET_COMMIT, faults.BEFORE_SOURCE_COMMIT)
#: Points before the target commit: the retry applies the batch.
UNAPPLIED_POINTS = (faults.AFTER_NEXT_BATCH, faults.MID_STREAM, faults.BEFORE_TARGET_COMMIT)


class InjectedFault(Exception):
    pass


def raise_once_at(point: str, nth: int) -> faults.FaultHook:
    """A fault hook raising InjectedFault the nth time `point` is reached, never again."""
    seen = [0]

    def hook(reached: str) -> None:
        if reached == point:
            seen[0] += 1
            if seen[0] == nth:
                raise InjectedFault(point)

    return hook


def exception_chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def three_pending_batches(source: Server) -> tuple[list[int], list[list[Event]]]:
    """Three ticks; the middle batch is big enough (about 1.5 MB) to span many COPY
    chunks, so MID_STREAM really is in the middle of the stream."""
    register(source, "src_q", "mover")
    ticks, produced = rounds(source, [100, 3000, 100])
    return ticks, produced


def assert_state_after_fault(
    source: Server, target: Server, point: str, ticks: list[int], produced: list[list[Event]]
) -> None:
    """What the dead mover left: batch 1 done; batch 2 either fully applied on the
    target (and still open on the source) or not at all. Never a part of it."""
    if point in APPLIED_POINTS:
        assert queue_events(target, "dst_q") == bag(produced[0], produced[1])
        assert mark_of(target, "mover") == ticks[1]
    else:
        assert queue_events(target, "dst_q") == bag(produced[0])
        assert mark_of(target, "mover") == ticks[0]
    last_tick, open_batch = consumer_position(source)
    assert last_tick == ticks[0] and open_batch is not None


def assert_recovered(
    source: Server, target: Server, point: str, report: MoveReport | dict[str, Any], ticks: list[int]
) -> None:
    d = report.to_dict() if isinstance(report, MoveReport) else report
    if point in APPLIED_POINTS:
        assert d["skipped"] == 1 and d["batches"] == 1 and d["events"] == 100
        assert moved_ticks(report) == [ticks[2]]
    else:
        assert d["skipped"] == 0 and d["batches"] == 2 and d["events"] == 3100
        assert moved_ticks(report) == ticks[1:]
    assert d["first_tick"] == ticks[0] and d["last_tick"] == ticks[2]
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")
    assert sum(queue_events(target, "dst_q").values()) == 3200
    assert mark_of(target, "mover") == ticks[2]
    assert consumer_position(source) == (ticks[2], None)


@pytest.mark.parametrize("point", faults.POINTS)
def test_exception_at_fault_point_then_retry_is_exactly_once(source: Server, target: Server, point: str) -> None:
    """An exception at each step (second batch) leaves a consistent state; draining
    again with the same mover and connections skips or applies the batch, once."""
    ticks, produced = three_pending_batches(source)
    with open_mover(source, target, fault=raise_once_at(point, 2)) as mover:
        # MID_STREAM fires inside COPY FROM's read(): psycopg2 turns the exception into
        # the server's QueryCanceled ("error in .read() call: InjectedFault ..."), and the
        # transfer may surface the source side's broken pipe with that as its context.
        with pytest.raises(Exception) as info:
            mover.drain()
        assert any("InjectedFault" in repr(e) and point in str(e) for e in exception_chain(info.value))
        assert_idle(mover)
        assert_state_after_fault(source, target, point, ticks, produced)
        report = mover.drain()
        assert_idle(mover)
    assert_recovered(source, target, point, report, ticks)


@pytest.mark.parametrize("point", faults.POINTS)
def test_process_killed_at_fault_point_then_retry_is_exactly_once(
    source: Server, target: Server, point: str
) -> None:
    """A mover process that dies with os._exit (no cleanup, no rollback sent) at each
    step of the second batch; a new process drains: skipped or applied, once."""
    ticks, produced = three_pending_batches(source)
    rc, report, err = wait_mover(spawn_mover(source, target, fault=f"{point}:2"))
    assert rc == faults.FAULT_EXIT_CODE, err
    assert report is None
    assert_state_after_fault(source, target, point, ticks, produced)
    rc, report, err = wait_mover(spawn_mover(source, target))
    assert rc == 0, err
    assert report is not None
    assert_recovered(source, target, point, report, ticks)


# -- two movers on one key ------------------------------------------------------------


def race_two_threads(source: Server, target: Server) -> list[MoveReport]:
    """Two drains on the same key, own connections each, released together."""
    barrier = threading.Barrier(2)
    reports: list[MoveReport] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with open_mover(source, target) as mover:
                mover.prepare()
                barrier.wait(timeout=30)
                reports.append(mover.drain())
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(reports) == 2
    return reports


def test_two_mover_threads_racing_move_each_batch_once(source: Server, target: Server) -> None:
    """Two movers on the same key, each with its own connections, started together on
    several pending batches, three times over: every batch moved by exactly one."""
    register(source, "src_q", "mover")
    all_ticks: list[int] = []
    for round_no in range(3):
        ticks, _ = rounds(source, [200] * 6, prefix=f"race{round_no}-")
        all_ticks += ticks
        reports = race_two_threads(source, target)
        assert moved_ticks(*reports) == ticks
        assert sum(r.events for r in reports) == 1200
        assert queue_events(target, "dst_q") == queue_events(source, "src_q")
        assert mark_of(target, "mover") == ticks[-1]
    assert sum(queue_events(target, "dst_q").values()) == 3600
    assert consumer_position(source) == (all_ticks[-1], None)


def test_second_mover_between_target_commit_and_finish_skips_the_batch(source: Server, target: Server) -> None:
    """Deterministic interleaving: mover B runs a whole drain while mover A sits
    between its target commit and finish_batch. B sees the mark, skips A's batch,
    moves the rest; A's finish then finds the batch gone and A stops cleanly."""
    register(source, "src_q", "mover")
    ticks, _ = rounds(source, [100, 100, 100])
    inner: list[MoveReport] = []

    def hook(point: str) -> None:
        if point == faults.AFTER_TARGET_COMMIT and not inner:
            with open_mover(source, target) as other:
                inner.append(other.drain())

    with open_mover(source, target, fault=hook) as mover:
        outer = mover.drain()
    (b,) = inner
    assert (b.skipped, b.batches, b.events) == (1, 2, 200)
    assert moved_ticks(b) == ticks[1:]
    assert (outer.batches, outer.events, outer.skipped) == (1, 100, 0)
    assert moved_ticks(outer) == ticks[:1]
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")
    assert mark_of(target, "mover") == ticks[-1]
    assert consumer_position(source) == (ticks[-1], None)


def test_batch_finished_by_another_mover_meanwhile_is_stale(source: Server, target: Server) -> None:
    """Deterministic interleaving: mover A has taken a batch; mover B drains everything
    (that batch included) before A gets to the target. A then finds a mark past its
    batch and the batch no longer open: "stale", nothing written, no error."""
    register(source, "src_q", "mover")
    ticks, _ = rounds(source, [100, 100])
    inner: list[MoveReport] = []

    def hook(point: str) -> None:
        if point == faults.AFTER_NEXT_BATCH and not inner:
            with open_mover(source, target) as other:
                inner.append(other.drain())

    with open_mover(source, target, fault=hook) as mover:
        outer = mover.drain()
    (b,) = inner
    assert (b.batches, b.events, b.skipped) == (2, 200, 0)
    assert (outer.stale, outer.batches, outer.skipped, outer.events) == (1, 0, 0, 0)
    assert [r.outcome for r in outer.batch_results] == ["stale"]
    assert outer.first_tick is None and outer.last_tick is None
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")
    assert sum(queue_events(target, "dst_q").values()) == 200
    assert mark_of(target, "mover") == ticks[-1]


def test_second_mover_waits_on_the_key_lock_then_skips(source: Server, target: Server) -> None:
    """Deterministic interleaving: while mover A holds the key lock with the batch
    written but not committed, mover B on the same batch blocks on the lock (seen in
    pg_locks), then finds the mark and skips instead of writing the batch again."""
    register(source, "src_q", "mover")
    ticks, _ = rounds(source, [300])
    inner: list[MoveReport] = []
    errors: list[BaseException] = []

    def other_drain() -> None:
        try:
            with open_mover(source, target) as other:
                inner.append(other.drain())
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    def waiting_on_the_key_lock() -> bool:
        rows = target.execute(
            "select count(*) from pg_locks l join pg_stat_activity a on a.pid = l.pid"
            " where not l.granted and a.datname = current_database()"
        )
        return int(rows[0][0]) > 0

    thread = threading.Thread(target=other_drain)

    def hook(point: str) -> None:
        if point == faults.BEFORE_TARGET_COMMIT and not thread.is_alive() and not inner:
            thread.start()
            deadline = time.monotonic() + 30
            while not waiting_on_the_key_lock():
                assert time.monotonic() < deadline, "the second mover never reached the key lock"
                time.sleep(0.02)

    with open_mover(source, target, fault=hook) as mover:
        outer = mover.drain()
    thread.join(timeout=60)
    assert not errors, errors
    (b,) = inner
    assert (outer.batches, outer.events) == (1, 300)
    assert (b.batches, b.events, b.skipped) == (0, 0, 1)
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")
    assert sum(queue_events(target, "dst_q").values()) == 300
    assert mark_of(target, "mover") == ticks[-1]


def test_two_mover_processes_racing_move_each_batch_once(source: Server, target: Server) -> None:
    register(source, "src_q", "mover")
    ticks, _ = rounds(source, [250] * 8)
    procs = [spawn_mover(source, target) for _ in range(2)]
    outcomes = [wait_mover(p) for p in procs]
    for rc, _, err in outcomes:
        assert rc == 0, err
    reports = [r for _, r, _ in outcomes if r is not None]
    assert len(reports) == 2
    assert moved_ticks(*reports) == ticks
    assert sum(int(r["events"]) for r in reports) == 2000
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")
    assert mark_of(target, "mover") == ticks[-1]
    assert consumer_position(source) == (ticks[-1], None)


# -- lost position --------------------------------------------------------------------


def lose_position(source: Server, target: Server) -> tuple[list[int], list[list[Event]]]:
    """E1 moved (mark t1); the consumer unregistered; E2 + t2; registered again (at
    t2); E3 + t3. The source now offers t2..t3 while the target's mark is t1."""
    register(source, "src_q", "mover")
    e1, e2, e3 = (simple_events(40, start=i * 40, prefix=f"e{i + 1}") for i in range(3))
    produce(source, "src_q", e1)
    t1 = tick(source, "src_q")
    assert run_mover(source, target).events == 40
    source.execute("select pgq.unregister_consumer('src_q', 'mover')")
    produce(source, "src_q", e2)
    t2 = tick(source, "src_q")
    register(source, "src_q", "mover")
    produce(source, "src_q", e3)
    t3 = tick(source, "src_q")
    return [t1, t2, t3], [e1, e2, e3]


def assert_mismatch(source: Server, target: Server, mark: int, prev: int, cur: int, before: Counter[Event]) -> None:
    with pytest.raises(PositionMismatch) as info:
        run_mover(source, target)
    text = str(info.value)
    assert f"last applied tick is {mark}" in text
    assert f"{prev}..{cur}" in text
    assert "'mover'" in text and "rewind" in text and "reset" in text
    assert queue_events(target, "dst_q") == before
    assert mark_of(target, "mover") == mark


def test_lost_position_stops_and_rewind_moves_the_gap(source: Server, target: Server) -> None:
    (t1, t2, t3), (e1, e2, e3) = lose_position(source, target)
    assert_mismatch(source, target, t1, t2, t3, bag(e1))
    assert_mismatch(source, target, t1, t2, t3, bag(e1))  # stays stopped, never guesses
    with open_mover(source, target) as mover:
        assert mover.rewind() == t1
    assert consumer_position(source) == (t1, None)
    report = run_mover(source, target)
    assert report.events == 80 and report.first_tick == t1 and report.last_tick == t3
    assert queue_events(target, "dst_q") == bag(e1, e2, e3)
    assert mark_of(target, "mover") == t3


def test_lost_position_reset_continues_from_the_source_position(source: Server, target: Server) -> None:
    (t1, t2, t3), (e1, _e2, e3) = lose_position(source, target)
    assert_mismatch(source, target, t1, t2, t3, bag(e1))
    with open_mover(source, target) as mover:
        assert mover.reset() == t1
    assert mark_of(target, "mover") is None
    report = run_mover(source, target)
    assert (report.events, report.first_tick, report.last_tick) == (40, t2, t3)
    assert queue_events(target, "dst_q") == bag(e1, e3)  # E2 skipped, as reset documents
    assert mark_of(target, "mover") == t3


def test_mark_from_an_unrelated_tick(source: Server, target: Server) -> None:
    """A mark no tick of the source has (a restored or foreign target): stop; rewind
    cannot go there and says so; reset recovers."""
    register(source, "src_q", "mover")
    reg_tick = consumer_position(source)[0]
    events = simple_events(30)
    produce(source, "src_q", events)
    t1 = tick(source, "src_q")
    target.execute("select pgq_ext.set_last_tick('mover', '', 987654)")
    assert_mismatch(source, target, 987654, reg_tick, t1, Counter())
    with open_mover(source, target) as mover:
        with pytest.raises(PositionMismatch, match="987654"):
            mover.rewind()
        assert mover.reset() == 987654
    assert run_mover(source, target).events == 30
    assert queue_events(target, "dst_q") == bag(events)
    assert mark_of(target, "mover") == t1


def test_rewind_without_a_mark_refuses(source: Server, target: Server) -> None:
    register(source, "src_q", "mover")
    before = consumer_position(source)
    with open_mover(source, target) as mover:
        with pytest.raises(PositionMismatch, match="no mark"):
            mover.rewind()
    assert consumer_position(source) == before


# -- one key, two sources ----------------------------------------------------------------


def test_key_of_another_source_is_refused(source: Server, target: Server, make_db: MakeDb) -> None:
    """Two source databases, same consumer name, same target. Their tick numbers line
    up on purpose: by ticks alone the second source's batch would look already applied
    and be skipped silently. The source binding refuses it; a subconsumer works."""
    other = make_db(queue="src_q")
    register(source, "src_q", "mover")
    register(other, "src_q", "mover")
    other_start = consumer_position(other)[0]
    a = simple_events(20, prefix="a")
    b = simple_events(30, prefix="b")
    produce(source, "src_q", a)
    produce(other, "src_q", b)
    ta, tb = tick(source, "src_q"), tick(other, "src_q")
    assert ta == tb
    assert run_mover(source, target).events == 20
    bound_before = target.execute("select * from pgq_ext.tracking_source")

    with pytest.raises(TrackingKeyConflict) as info:
        run_mover(other, target)
    text = str(info.value)
    assert source.dbname in text and other.dbname in text and "subconsumer" in text
    assert queue_events(target, "dst_q") == bag(a)
    assert mark_of(target, "mover") == ta
    assert target.execute("select * from pgq_ext.tracking_source") == bound_before
    last, open_batch = consumer_position(other)
    assert last == other_start and open_batch is not None  # nothing finished on that source

    report = run_mover(other, target, subconsumer="s2")
    assert report.events == 30
    assert queue_events(target, "dst_q") == bag(a, b)
    assert mark_of(target, "mover", "s2") == tb and mark_of(target, "mover") == ta
    assert run_mover(source, target).events == 0  # the first key still works


# -- what is missing -----------------------------------------------------------------


def target_untouched(target: Server, queue_rows: int = 0) -> None:
    if has_pgq_ext(target):
        assert target.execute("select count(*) from pgq_ext.completed_tick")[0][0] == 0
        assert target.execute("select count(*) from pgq_ext.tracking_source")[0][0] == 0
    if target.execute("select to_regclass('pgq.queue') is not null")[0][0]:
        rows = target.execute("select queue_name from pgq.queue")
        for (name,) in rows:
            assert sum(queue_events(target, name).values()) == queue_rows


def test_missing_target_queue(source: Server, make_db: MakeDb) -> None:
    target = make_db()  # pgq, but no queue and no pgq_ext
    with pytest.raises(QueueNotFound) as info:
        run_mover(source, target, target_queue="no_such_q", register_consumer=True, install_pgq_ext=True)
    assert "'no_such_q'" in str(info.value) and target.dbname in str(info.value)
    assert "target" in str(info.value)
    assert not has_pgq_ext(target) and not is_registered(source, "src_q", "mover")


def test_target_queue_with_inserts_disabled(source: Server, target: Server) -> None:
    register(source, "src_q", "mover")
    produce(source, "src_q", simple_events(5))
    tick(source, "src_q")
    target.execute("update pgq.queue set queue_disable_insert = true where queue_name = 'dst_q'")
    with pytest.raises(QueueDisabled, match="'dst_q'"):
        run_mover(source, target)
    target_untouched(target)
    target.execute("update pgq.queue set queue_disable_insert = false where queue_name = 'dst_q'")
    assert run_mover(source, target).events == 5


def test_missing_source_queue(source: Server, target: Server) -> None:
    with pytest.raises(QueueNotFound) as info:
        run_mover(source, target, source_queue="no_src_q", register_consumer=True)
    assert "source queue 'no_src_q'" in str(info.value) and source.dbname in str(info.value)
    assert not is_registered(source, "src_q", "mover")
    target_untouched(target)


def test_missing_pgq_on_source(make_db: MakeDb) -> None:
    source = make_db(pgq=False)
    target = make_db(queue="dst_q")
    with pytest.raises(PgqNotInstalled) as info:
        run_mover(source, target, register_consumer=True, install_pgq_ext=True)
    assert "source database" in str(info.value) and source.dbname in str(info.value)
    assert not has_pgq_ext(target)
    target_untouched(target)


def test_missing_pgq_on_target(source: Server, make_db: MakeDb) -> None:
    target = make_db(pgq=False)
    produce(source, "src_q", simple_events(5))
    with pytest.raises(PgqNotInstalled) as info:
        run_mover(source, target, register_consumer=True, install_pgq_ext=True)
    assert "target database" in str(info.value) and target.dbname in str(info.value)
    assert not is_registered(source, "src_q", "mover") and not has_pgq_ext(target)


def test_missing_pgq_ext_then_install(source: Server, make_db: MakeDb) -> None:
    target = make_db(queue="dst_q")
    with pytest.raises(PgqExtMissing) as info:
        run_mover(source, target, register_consumer=True)
    assert "not installed" in str(info.value) and target.dbname in str(info.value)
    assert "install_pgq_ext" in str(info.value)
    assert not has_pgq_ext(target) and not is_registered(source, "src_q", "mover")
    target_untouched(target)

    register(source, "src_q", "mover")
    events = simple_events(25)
    produce(source, "src_q", events)
    last = tick(source, "src_q")
    report = run_mover(source, target, install_pgq_ext=True)
    assert report.events == 25
    assert queue_events(target, "dst_q") == bag(events)
    assert mark_of(target, "mover") == last


def test_unregistered_consumer_then_register(source: Server, target: Server) -> None:
    produce(source, "src_q", simple_events(5, prefix="before"))
    tick(source, "src_q")
    with pytest.raises(ConsumerNotRegistered) as info:
        run_mover(source, target, consumer="newbie")
    text = str(info.value)
    assert "'newbie'" in text and "'src_q'" in text and "register_consumer=True" in text
    assert not is_registered(source, "src_q", "newbie")
    target_untouched(target)

    first = run_mover(source, target, consumer="newbie", register_consumer=True)
    assert is_registered(source, "src_q", "newbie")
    assert first.events == 0  # registration starts at the newest tick, as PgQ defines
    later = simple_events(7, prefix="after")
    produce(source, "src_q", later)
    last = tick(source, "src_q")
    assert run_mover(source, target, consumer="newbie").events == 7
    assert queue_events(target, "dst_q") == bag(later)
    assert mark_of(target, "newbie") == last


def test_consumer_unregistered_between_drains_is_named(source: Server, target: Server) -> None:
    register(source, "src_q", "mover")
    with open_mover(source, target) as mover:
        mover.prepare()
        source.execute("select pgq.unregister_consumer('src_q', 'mover')")
        with pytest.raises(ConsumerNotRegistered, match="'mover'.*'src_q'"):
            mover.next_batch()


# -- coalescing ticks ------------------------------------------------------------------


def test_min_batch_events_coalesces_ticks_and_moves_the_remainder(source: Server, target: Server) -> None:
    """Eight ticks of five events each, min_batch_events=12: next_batch_custom joins
    three ticks per batch while enough is pending; the remainder below the threshold
    (two ticks, ten events) still moves, as one batch. All exactly once."""
    source.execute("select pgq.set_queue_config('src_q', 'ticker_max_count', '1')")
    register(source, "src_q", "mover")
    ticks: list[int] = []
    produced: list[Event] = []
    for i in range(8):
        events = simple_events(5, start=i * 5, prefix="small")
        produce(source, "src_q", events)
        produced += events
        ticks.append(tick_plain(source, "src_q"))
    report = run_mover(source, target, min_batch_events=12)
    assert [b.events for b in report.batch_results] == [15, 15, 10]
    assert [b.cur_tick_id for b in report.batch_results] == [ticks[2], ticks[5], ticks[7]]
    assert report.batches == 3 < len(ticks)
    assert report.events == 40 and report.last_tick == ticks[-1]
    assert queue_events(target, "dst_q") == bag(produced)
    assert mark_of(target, "mover") == ticks[-1]
    assert run_mover(source, target, min_batch_events=12).events == 0


# -- bounded drains -------------------------------------------------------------------


def test_max_batches_stops_and_next_drain_continues(source: Server, target: Server) -> None:
    register(source, "src_q", "mover")
    ticks, produced = rounds(source, [100] * 5)
    first = run_mover(source, target, bounds=DrainBounds(max_batches=2))
    assert (first.stop_reason, first.batches, first.events) == ("max_batches", 2, 200)
    assert first.last_tick == ticks[1] and mark_of(target, "mover") == ticks[1]
    assert queue_events(target, "dst_q") == bag(*produced[:2])
    rest = run_mover(source, target)
    assert (rest.stop_reason, rest.batches, rest.first_tick, rest.last_tick) == ("drained", 3, ticks[1], ticks[4])
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")


def test_max_events_stops_between_batches(source: Server, target: Server) -> None:
    register(source, "src_q", "mover")
    ticks, produced = rounds(source, [100] * 4)
    first = run_mover(source, target, bounds=DrainBounds(max_events=150))
    assert (first.stop_reason, first.batches, first.events) == ("max_events", 2, 200)
    assert queue_events(target, "dst_q") == bag(*produced[:2])
    rest = run_mover(source, target, bounds=DrainBounds(max_events=10_000))
    assert (rest.stop_reason, rest.events, rest.first_tick) == ("drained", 200, ticks[1])
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")


def test_max_runtime_stops_and_next_drain_continues(source: Server, target: Server) -> None:
    """A batch that outlasts max_runtime (its callback sleeps that long) ends the
    drain before the next batch is taken."""
    register(source, "src_q", "mover")
    ticks, produced = rounds(source, [50] * 4)
    limit = 0.3
    with open_mover(source, target, on_batch=lambda _r: time.sleep(limit)) as mover:
        first = mover.drain(DrainBounds(max_runtime=limit))
    assert first.stop_reason == "max_runtime"
    assert first.batches <= 1
    assert queue_events(target, "dst_q") == bag(*produced[: first.batches])
    rest = run_mover(source, target)
    assert rest.batches == 4 - first.batches and rest.last_tick == ticks[-1]
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")


def test_stop_at_leaves_later_batches_for_a_later_run(source: Server, target: Server) -> None:
    register(source, "src_q", "mover")
    ticks, produced = rounds(source, [30] * 4)
    interval_end = tick_time(source, "src_q", ticks[1])
    first = run_mover(source, target, bounds=DrainBounds(stop_at=interval_end))
    assert (first.stop_reason, first.batches, first.last_tick) == ("interval_end", 2, ticks[1])
    assert queue_events(target, "dst_q") == bag(*produced[:2])
    # The same interval again (a task retry or clear) does the same: nothing more.
    again = run_mover(source, target, bounds=DrainBounds(stop_at=interval_end))
    assert (again.stop_reason, again.batches) == ("interval_end", 0)
    assert queue_events(target, "dst_q") == bag(*produced[:2])
    later = run_mover(source, target, bounds=DrainBounds(stop_at=tick_time(source, "src_q", ticks[3])))
    assert (later.stop_reason, later.batches, later.last_tick) == ("drained", 2, ticks[3])
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")


def test_force_tick_with_own_ticker_drains_what_was_committed(source: Server, target: Server) -> None:
    register(source, "src_q", "mover")
    events = simple_events(60)
    produce(source, "src_q", events)  # no tick made by the test
    before = pgq_last_tick(source)
    report = run_mover(source, target, bounds=DrainBounds(force_tick=True, run_ticker=True))
    assert report.events == 60 and report.stop_reason == "drained"
    assert report.last_tick is not None and report.last_tick > before
    assert queue_events(target, "dst_q") == bag(events)


def pgq_last_tick(server: Server, queue: str = "src_q") -> int:
    conn = server.connect()
    try:
        last = pgq.newest_tick(conn, queue)
        conn.rollback()
    finally:
        conn.close()
    assert last is not None
    return last


def test_force_tick_without_a_ticker_times_out(source: Server, target: Server) -> None:
    register(source, "src_q", "mover")
    produce(source, "src_q", simple_events(10))
    position = consumer_position(source)
    with pytest.raises(TickerNotRunning) as info:
        run_mover(source, target, bounds=DrainBounds(force_tick=True, tick_timeout=0.5))
    assert "'src_q'" in str(info.value) and "no ticker is running" in str(info.value)
    assert consumer_position(source) == position
    target_untouched(target)


def test_force_tick_on_a_paused_ticker_fails_at_once(source: Server, target: Server) -> None:
    register(source, "src_q", "mover")
    source.execute("select pgq.set_queue_config('src_q', 'ticker_paused', 'true')")
    with pytest.raises(TickerNotRunning, match="paused"):
        run_mover(source, target, bounds=DrainBounds(force_tick=True, run_ticker=True, tick_timeout=30))
    target_untouched(target)


# -- the report ---------------------------------------------------------------------


def test_report_fields(source: Server, target: Server) -> None:
    register(source, "src_q", "mover")
    start = consumer_position(source)[0]
    ticks, _ = rounds(source, [10, 0, 25])  # an empty tick range moves the mark too
    seen: list[BatchResult] = []
    before = db_now(source)
    with open_mover(source, target, on_batch=seen.append) as mover:
        report = mover.drain()
    after = db_now(source)
    assert (report.batches, report.skipped, report.stale, report.events) == (3, 0, 0, 35)
    assert (report.first_tick, report.last_tick) == (start, ticks[-1])
    assert [(b.prev_tick_id, b.cur_tick_id, b.outcome, b.events) for b in report.batch_results] == [
        (start, ticks[0], "moved", 10), (ticks[0], ticks[1], "moved", 0), (ticks[1], ticks[2], "moved", 25),
    ]
    assert seen == report.batch_results
    assert (report.source_queue, report.target_queue, report.consumer_name, report.subconsumer) == (
        "src_q", "dst_q", "mover", "",
    )
    assert report.write_path == "copy" and report.stop_reason == "drained"
    # Lag: now minus the consumer's last tick time, measured inside the drain.
    last_time = tick_time(source, "src_q", ticks[-1])
    assert report.lag_seconds is not None
    assert (before - last_time).total_seconds() <= report.lag_seconds <= (after - last_time).total_seconds()
    assert report.pending_events == 0
    out = report.to_dict()
    assert "batch_results" not in out and json.loads(json.dumps(out)) == out
    assert out["events"] == 35 and out["last_tick"] == ticks[-1]


def test_report_counts_pending_events_when_bounded(source: Server, target: Server) -> None:
    source.execute("select pgq.set_queue_config('src_q', 'ticker_max_count', '1')")
    register(source, "src_q", "mover")
    for i in range(3):
        produce(source, "src_q", simple_events(10, start=i * 10))
        tick_plain(source, "src_q")
    report = run_mover(source, target, bounds=DrainBounds(max_batches=1))
    assert report.pending_events == 20
    assert report.lag_seconds is not None and report.lag_seconds >= 0


def test_status_shows_position_mark_and_lag(source: Server, target: Server) -> None:
    register(source, "src_q", "mover")
    ticks, _ = rounds(source, [10, 10])
    with open_mover(source, target) as mover:
        before = mover.status()
        assert (before.registered, before.target_mark, before.current_batch) == (True, None, None)
        assert before.newest_tick == ticks[-1] and before.last_tick is not None and before.last_tick < ticks[0]
        assert before.batch_available and before.ready(10)  # PgQ's estimate: one low on a fresh queue
        mover.drain()
        after = mover.status()
        assert_idle(mover)
        # the mark agrees with the source consumer: a reset (e.g. a retried one) keeps it
        assert mover.reset() == ticks[-1]
        assert mover.status().target_mark == ticks[-1]
    assert (after.last_tick, after.target_mark, after.newest_tick) == (ticks[-1],) * 3
    assert after.pending_events == 0 and after.lag_seconds is not None and not after.batch_available
    assert (after.queue_name, after.target_queue, after.consumer_name) == ("src_q", "dst_q", "mover")
    # one status model: the mover's is the sensor's PendingStatus plus the target's side
    assert isinstance(after, PendingStatus)
    as_dict = after.to_dict()
    assert as_dict["newest_tick"] == ticks[-1] and as_dict["target_mark"] == ticks[-1]
    assert as_dict["consumer_name"] == "mover" and as_dict["batch_available"] is False
    json.dumps(as_dict)
