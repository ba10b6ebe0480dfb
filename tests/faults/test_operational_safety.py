"""Operational safety, one disruption at a time and deterministic:

- while the target is slow to commit, the mover holds no transaction open on the
  source (an open one would hold back PgQ's event-table rotation and bloat it);
- SIGTERM mid-batch, with the default action or raised as an exception (as
  Airflow's task runner does), leaves a state the next run completes exactly once;
- the target's backend terminated while the source is still streaming: the error
  is the target's database error (not the broken pipe it causes), nothing is
  committed, and the retry moves the batch once;
- an exception raised inside the COPY stream (a signal handler's, a timeout's)
  keeps its type instead of turning into psycopg2's QueryCanceled.
"""

from __future__ import annotations

import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from airflow_provider_pgq.core import faults
from airflow_provider_pgq.core.connect import connect
from airflow_provider_pgq.core.mover import MoverOptions, QueueMover
from tests.faults.driver import Storm, start_child
from tests.helpers import Server, mark_of, produce, queue_events, register, run_mover, simple_events, tick

# built at import, before tests/conftest.py's classic_batches: one tick a batch, said here
OPTIONS = MoverOptions(source_queue="src_q", target_queue="dst_q", consumer="mover", batch_target_events=1)


def backend_state(server: Server, pid: int) -> tuple[str, Any]:
    """(state, xact_start) of one backend, read in a fresh transaction (pg_stat_activity
    is a snapshot per transaction)."""
    rows = server.cluster.execute(
        "postgres", "select coalesce(state, ''), xact_start from pg_stat_activity where pid = %s", (pid,)
    )
    assert rows, f"backend {pid} is gone"
    return str(rows[0][0]), rows[0][1]


def payload_counts(server: Server, queue: str) -> Counter[str]:
    return Counter(str(e[1]) for e in queue_events(server, queue).elements())


def produce_big(server: Server, events: int, pad: int, prefix: str) -> None:
    """One transaction of big events, built server-side (fast, and big enough to outgrow
    the copy pipe and the socket buffers)."""
    server.execute(
        "select count(pgq.insert_event('src_q', 'big', %s || g, repeat('x', %s), null, null, null))"
        " from generate_series(1, %s) g",
        (prefix, pad, events),
    )


@pytest.fixture
def two_batches(source: Server) -> Iterator[list[int]]:
    register(source, "src_q", "mover")
    produce(source, "src_q", simple_events(500, prefix="one"))
    first = tick(source, "src_q")
    produce(source, "src_q", simple_events(700, prefix="two"))
    second = tick(source, "src_q")
    yield [first, second]


def test_no_source_transaction_is_open_while_the_target_is_slow(
    source: Server, target: Server, two_batches: list[int]
) -> None:
    samples: dict[str, list[tuple[str, Any]]] = {p: [] for p in faults.POINTS}
    target_states: list[str] = []
    s = connect(source.dsn, application_name="safety-src")
    t = connect(target.dsn, application_name="safety-tgt")
    src_pid, tgt_pid = s.get_backend_pid(), t.get_backend_pid()

    def slow_target(point: str) -> None:
        samples[point].append(backend_state(source, src_pid))
        if point == faults.BEFORE_TARGET_COMMIT:
            # the target takes its time to commit: sample the source all along
            target_states.append(backend_state(target, tgt_pid)[0])
            for _ in range(5):
                time.sleep(0.04)
                samples[point].append(backend_state(source, src_pid))

    try:
        report = QueueMover(s, t, OPTIONS, fault=slow_target).drain()
    finally:
        s.close()
        t.close()
    assert report.batches == 2 and report.events == 1200
    # The probe sees the source's COPY where there is one: mid-stream it runs (its own
    # transaction, ended with the COPY), or has just ended, leaving nothing open.
    assert samples[faults.MID_STREAM]
    assert all(state == "active" or (state == "idle" and xact_start is None)
               for state, xact_start in samples[faults.MID_STREAM])
    # ...and sees none while the target holds the batch open and is slow to commit.
    assert target_states == ["idle in transaction"] * 2
    slow = samples[faults.BEFORE_TARGET_COMMIT] + samples[faults.AFTER_TARGET_COMMIT]
    assert len(slow) == 2 * 6 + 2
    assert all(state == "idle" and xact_start is None for state, xact_start in slow), slow
    assert all(state == "idle" for state, _ in samples[faults.AFTER_NEXT_BATCH])
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")


@pytest.mark.parametrize("point", [faults.MID_STREAM, faults.BEFORE_TARGET_COMMIT, faults.AFTER_TARGET_COMMIT])
@pytest.mark.parametrize("raises", [False, True], ids=["default-action", "raised"])
def test_sigterm_mid_batch_then_the_next_run_completes_exactly_once(
    source: Server, target: Server, two_batches: list[int], tmp_path: Path, point: str, raises: bool
) -> None:
    args = ["--source-queue", "src_q", "--target-queue", "dst_q", "--consumer", "mover", "--pause-at", point]
    if raises:
        args.append("--sigterm-raises")
    child = start_child(source.dsn, target.dsn, args, tmp_path, "sigterm-child")
    try:
        assert Storm.wait_paused(child), child.error_tail(20)
        child.proc.send_signal(signal.SIGTERM)
        code = child.wait(60)
    finally:
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()
    # Died by the signal, or by SystemExit(128+15) raised from it; not by some other error.
    assert code == (128 + signal.SIGTERM if raises else -signal.SIGTERM), child.error_tail(20)
    first, second = two_batches
    moved = payload_counts(target, "dst_q")
    if point == faults.AFTER_TARGET_COMMIT:
        assert mark_of(target, "mover") == first and sum(moved.values()) == 500
    else:
        assert mark_of(target, "mover") is None and not moved

    report = run_mover(source, target)
    assert report.skipped == (1 if point == faults.AFTER_TARGET_COMMIT else 0)
    assert report.last_tick == second and mark_of(target, "mover") == second
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")
    assert set(payload_counts(target, "dst_q").values()) == {1}
    assert sum(queue_events(target, "dst_q").values()) == 1200


def test_target_killed_while_the_source_still_streams_reports_the_target_error(
    source: Server, target: Server
) -> None:
    register(source, "src_q", "mover")
    produce_big(source, 5000, 4000, "big-")  # ~20 MB: the source is still sending at first read
    tick(source, "src_q")
    seen: dict[str, Any] = {}
    s = connect(source.dsn, application_name="kill-src")
    t = connect(target.dsn, application_name="kill-tgt")
    src_pid, tgt_pid = s.get_backend_pid(), t.get_backend_pid()

    def kill_target(point: str) -> None:
        if point != faults.MID_STREAM:
            return
        seen["source"] = source.cluster.execute(
            "postgres", "select state, query from pg_stat_activity where pid = %s", (src_pid,))[0]
        assert target.cluster.execute("postgres", "select pg_terminate_backend(%s, 10000)", (tgt_pid,))[0][0]

    try:
        with pytest.raises(Exception) as info:
            QueueMover(s, t, OPTIONS, fault=kill_target).drain()
    finally:
        s.close()
        t.close()
    state, query = seen["source"]
    assert state == "active" and re.search(r"(^|;)\s*copy\b", query.lower()), seen  # truly mid-COPY
    # The target's own error, not the BrokenPipeError the dead target causes on the pipe.
    assert isinstance(info.value, psycopg2.Error), repr(info.value)
    assert not queue_events(target, "dst_q") and mark_of(target, "mover") is None

    report = run_mover(source, target)
    assert report.events == 5000 and report.batches == 1
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")


class TaskTimeout(BaseException):
    """Stands for what a signal handler raises (Airflow's task timeout, SystemExit)."""


def test_exception_raised_inside_the_copy_stream_keeps_its_type(
    source: Server, target: Server, two_batches: list[int]
) -> None:
    calls = {"n": 0}

    def timeout_mid_stream(point: str) -> None:
        if point == faults.MID_STREAM:
            calls["n"] += 1
            if calls["n"] == 2:
                raise TaskTimeout("execution_timeout")

    s, t = connect(source.dsn), connect(target.dsn)
    try:
        with pytest.raises(TaskTimeout):
            QueueMover(s, t, OPTIONS, fault=timeout_mid_stream).drain()
    finally:
        s.close()
        t.close()
    first, second = two_batches
    assert mark_of(target, "mover") == first and sum(queue_events(target, "dst_q").values()) == 500
    report = run_mover(source, target)
    assert report.events == 700 and report.last_tick == second
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")
