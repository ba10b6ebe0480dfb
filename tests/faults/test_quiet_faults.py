"""Quiet faults: a network or server that stops answering without closing anything.

Each test puts a FaultProxy (tests/faults/proxy.py) between the mover and each
database, strikes at a precise protocol point (the mover's fault hook), and checks:
the mover returns (error or success) within its bound plus a margin, the source
holds no open transaction afterwards (pg_stat_activity), and after healing a
following run moves everything exactly once (source and target compared event by
event). Bounds are small here (network_timeout 1.5 s) so the suite stays fast.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
import pytest

from airflow_provider_pgq.core import faults, transfer
from airflow_provider_pgq.core.connect import connect
from airflow_provider_pgq.core.errors import ConnectionFailed, WaitTimeout
from airflow_provider_pgq.core.guard import Timeouts
from airflow_provider_pgq.core.mover import MoveReport, MoverOptions, QueueMover
from tests.faults.proxy import FaultProxy
from tests.helpers import ROOT, Server, produce, queue_events, register, run_mover, tick
from tests.support.cluster import ThrowawayCluster, wait_until

TIMEOUTS = Timeouts(connect_timeout=2, network_timeout=1.5, statement_timeout=1.5, lock_timeout=1)
#: What a return may take beyond its bound: the watchdog's tick, the cancel grace, rollbacks.
MARGIN = 2.5
#: COPY progress (network_timeout, once more while the send queue still drained),
#: statement (statement_timeout + grace), connect bound.
STREAM_BOUND = 2 * TIMEOUTS.network_timeout
STATEMENT_BOUND = TIMEOUTS.statement_timeout + TIMEOUTS.network_timeout
CONNECT_BOUND = TIMEOUTS.connect_timeout

BIG = 5000  # events of 2 KB: 10 MB, more than the pipe and the socket buffers hold


def big_batch(source: Server, n: int = BIG) -> None:
    register(source, "src_q", "mover")  # before the events: a consumer sees what comes after it
    base = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
    produce(source, "src_q", [
        ("big", f"payload-{i:06d}-" + "x" * 2000, str(i), None, "", "é", base + dt.timedelta(microseconds=i))
        for i in range(n)
    ])
    tick(source, "src_q")


@pytest.fixture
def proxies(cluster: ThrowawayCluster) -> Iterator[tuple[FaultProxy, FaultProxy]]:
    sp, tp = FaultProxy(cluster.port).start(), FaultProxy(cluster.port).start()
    try:
        yield sp, tp
    finally:
        sp.stop()
        tp.stop()


def open_transactions(server: Server) -> int:
    rows = server.execute(
        "select count(*) from pg_stat_activity where datname = %s and xact_start is not null"
        " and pid <> pg_backend_pid()", (server.dbname,),
    )
    return int(rows[0][0])


def run_through(
    source: Server, target: Server, sp: FaultProxy, tp: FaultProxy,
    at: str | None = None, strike: Callable[[], None] | None = None,
) -> tuple[MoveReport | BaseException, float]:
    """One drain through the proxies; strike() when the mover reaches point `at`."""
    started = time.monotonic()
    struck = []

    def hook(point: str) -> None:
        if point == at and strike is not None and not struck:
            struck.append(point)
            strike()

    try:
        s = connect(sp.dsn(source.dsn), application_name="quiet:src", timeouts=TIMEOUTS)
        try:
            t = connect(tp.dsn(target.dsn), application_name="quiet:tgt", timeouts=TIMEOUTS)
            try:
                mover = QueueMover(s, t, MoverOptions("src_q", "dst_q", "mover", register_consumer=True),
                                   fault=hook)
                return mover.drain(), time.monotonic() - started
            finally:
                t.close()
        finally:
            s.close()
    except (psycopg2.Error, WaitTimeout, ConnectionFailed) as exc:
        return exc, time.monotonic() - started


def settle_and_compare(source: Server, target: Server, sp: FaultProxy, tp: FaultProxy) -> None:
    """No source transaction left; after healing, one more run moves everything once."""
    assert wait_until(lambda: open_transactions(source) == 0, timeout=3), "source transaction left open"
    sp.heal()
    tp.heal()
    run_mover(source, target, register_consumer=True)
    src, dst = queue_events(source, "src_q"), queue_events(target, "dst_q")
    assert sum(src.values()) == sum(dst.values()) and src == dst
    assert max(dst.values()) == 1


# -- quiet faults mid-COPY ----------------------------------------------------------------


@pytest.mark.parametrize("side", ["target", "source"])
def test_frozen_copy_is_cancelled_within_network_timeout(
    source: Server, target: Server, proxies: tuple[FaultProxy, FaultProxy], side: str
) -> None:
    """A network that stops forwarding mid-COPY (no close, no RST): the COPY moves no
    byte, and within network_timeout the mover fails with WaitTimeout naming the side."""
    sp, tp = proxies
    big_batch(source)
    frozen = tp if side == "target" else sp
    result, seconds = run_through(source, target, sp, tp, faults.MID_STREAM, frozen.freeze)
    assert isinstance(result, WaitTimeout), result
    assert result.side == side and "moved no bytes" in str(result) and "127.0.0.1" in str(result)
    assert seconds < STREAM_BOUND + MARGIN, seconds
    settle_and_compare(source, target, sp, tp)


@pytest.mark.parametrize(("side", "point"), [("target", faults.AFTER_NEXT_BATCH),
                                              ("source", faults.AFTER_TARGET_COMMIT)])
def test_frozen_statement_times_out(
    source: Server, target: Server, proxies: tuple[FaultProxy, FaultProxy], side: str, point: str
) -> None:
    """Frozen before a control statement (the target's lock, the source's finish_batch
    after the target committed): WaitTimeout within the statement bound; the batch is
    applied once in the end either way."""
    sp, tp = proxies
    big_batch(source, 50)
    result, seconds = run_through(source, target, sp, tp, point, (tp if side == "target" else sp).freeze)
    assert isinstance(result, WaitTimeout), result
    assert result.side == side and "no answer to" in str(result)
    assert seconds < STATEMENT_BOUND + MARGIN, seconds
    settle_and_compare(source, target, sp, tp)


def test_frozen_network_at_connect(source: Server, target: Server, proxies: tuple[FaultProxy, FaultProxy]) -> None:
    """A server that accepts TCP but never answers the login: ConnectionFailed within connect_timeout."""
    sp, tp = proxies
    big_batch(source, 10)
    tp.freeze()
    result, seconds = run_through(source, target, sp, tp)
    assert isinstance(result, ConnectionFailed) and "timeout" in str(result), result
    assert seconds < CONNECT_BOUND + MARGIN, seconds
    settle_and_compare(source, target, sp, tp)


@pytest.mark.parametrize("how", ["cut_target", "cut_source_at_byte"])
def test_cut_connection_mid_copy(
    source: Server, target: Server, proxies: tuple[FaultProxy, FaultProxy], how: str
) -> None:
    """A reset connection (RST now, or after N more bytes of the source's COPY): a
    database error at once, nothing committed."""
    sp, tp = proxies
    big_batch(source)
    if how == "cut_target":
        result, seconds = run_through(source, target, sp, tp, faults.MID_STREAM, tp.cut)
    else:
        result, seconds = run_through(source, target, sp, tp, faults.AFTER_NEXT_BATCH,
                                      lambda: sp.cut_at(300_000))
    assert isinstance(result, psycopg2.Error), result
    assert seconds < MARGIN, seconds
    settle_and_compare(source, target, sp, tp)


def test_slow_links_are_not_stuck(
    source: Server, target: Server, proxies: tuple[FaultProxy, FaultProxy],
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """Latency on both sides and a target link at 3 MB/s: the 10 MB batch takes longer
    than network_timeout but keeps moving, so it completes; progress is logged."""
    sp, tp = proxies
    big_batch(source)
    sp.delay(0.01)
    tp.delay(0.01)
    tp.throttle(3_000_000)
    monkeypatch.setattr(transfer, "PROGRESS_EVERY", 0.5)
    with caplog.at_level(logging.INFO, logger="airflow_provider_pgq.core.transfer"):
        result, seconds = run_through(source, target, sp, tp)
    assert isinstance(result, MoveReport), result
    assert result.events == BIG and seconds > TIMEOUTS.network_timeout
    assert any("MB so far" in r.getMessage() for r in caplog.records)
    settle_and_compare(source, target, sp, tp)


# -- the server dies: postmaster kill -9, crash recovery ------------------------------------


@pytest.fixture
def own_target() -> Iterator[tuple[ThrowawayCluster, Server]]:
    """A target in a cluster of its own, so killing it leaves the shared one alone."""
    c = ThrowawayCluster(in_memory=True).start()
    try:
        c.create_database("tgt")
        c.execute("tgt", "create extension pgq")
        server = Server(c, "tgt")
        server.execute("select pgq.create_queue('dst_q')")
        conn = connect(server.dsn)
        from airflow_provider_pgq.core import pgq_ext
        try:
            pgq_ext.install(conn)
        finally:
            conn.close()
        # The throwaway cluster commits asynchronously: flush, so the crash loses no setup.
        server.execute("checkpoint")
        yield c, server
    finally:
        c.stop()


def _kill9(c: ThrowawayCluster) -> None:
    pid = int((Path(c.datadir) / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)


def test_target_postmaster_kill9_and_crash_recovery(
    source: Server, cluster: ThrowawayCluster, own_target: tuple[ThrowawayCluster, Server],
) -> None:
    """kill -9 of the target's postmaster mid-COPY: the mover fails promptly; after
    crash recovery the batch moves exactly once."""
    c, target = own_target
    sp, tp = FaultProxy(cluster.port).start(), FaultProxy(c.port).start()
    try:
        big_batch(source)
        tp.throttle(5_000_000)
        result, seconds = run_through(source, target, sp, tp, faults.MID_STREAM, lambda: _kill9(c))
        assert isinstance(result, (psycopg2.Error, WaitTimeout)), result
        assert seconds < STREAM_BOUND + MARGIN, seconds
        assert wait_until(lambda: open_transactions(source) == 0, timeout=3)
        # crash recovery: the orphaned backends go, then the server starts from its WAL
        wait_until(lambda: subprocess.run(["pgrep", "-f", str(c.datadir)], capture_output=True).returncode != 0,
                   timeout=20)
        for _ in range(100):  # until the last orphaned backend has let go of shared memory
            try:
                c.pg_ctl("start")
                break
            except subprocess.CalledProcessError:
                time.sleep(0.2)
        settle_and_compare(source, target, sp, tp)
    finally:
        sp.stop()
        tp.stop()


# -- SIGTERM while blocked in a frozen COPY -------------------------------------------------


def test_sigterm_ends_the_cli_within_a_second_during_a_frozen_copy(
    source: Server, target: Server, proxies: tuple[FaultProxy, FaultProxy], tmp_path: Path,
) -> None:
    """The real CLI process, a real SIGTERM: while the target's network is frozen
    mid-COPY (and network_timeout is long), the process still ends within ~1 s,
    leaving no source transaction; the next run moves everything once."""
    sp, tp = proxies
    big_batch(source)
    tp.throttle(1_000_000)  # a 10 MB COPY that lasts ~10 s: plenty of time to freeze it
    ini = tmp_path / "m.ini"
    ini.write_text(
        "[queue_mover]\njob_name = quiet_cli\n"
        f"src_db = {sp.dsn(source.dsn)}\ndst_db = {tp.dsn(target.dsn)}\n"
        "pgq_queue_name = src_q\ndst_queue_name = dst_q\npgq_consumer_id = mover\n"
        "register_consumer = true\nnetwork_timeout = 60\nstatement_timeout = 60\n"
    )
    proc = subprocess.Popen([sys.executable, "-m", "airflow_provider_pgq.cli", "--once", str(ini)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        in_copy = wait_until(lambda: bool(target.execute(
            "select 1 from pg_stat_activity where datname = %s and query ilike 'copy%%' and state = 'active'",
            (target.dbname,))), timeout=20, poll=0.02)
        assert in_copy, "the CLI never reached the COPY"
        tp.freeze()
        time.sleep(1.0)
        assert proc.poll() is None
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = proc.communicate()
    assert took < 1.2, (took, err)
    assert proc.returncode == 0, err
    settle_and_compare(source, target, sp, tp)
