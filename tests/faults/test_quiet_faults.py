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
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
import pytest

from airflow_provider_pgq.core import faults, transfer
from airflow_provider_pgq.core.connect import connect
from airflow_provider_pgq.core.errors import ConnectionFailed, KeyLocked, WaitTimeout
from airflow_provider_pgq.core.guard import Timeouts
from airflow_provider_pgq.core.mover import MoveReport, MoverOptions, QueueMover
from tests.faults.disk import SmallDisk, move_event_tables
from tests.faults.proxy import FaultProxy
from tests.helpers import ROOT, Server, produce, queue_events, register, run_mover, tick
from tests.support.chroot import new_cluster
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


@pytest.fixture(params=["direct", "transaction pool"])
def proxies(request: pytest.FixtureRequest, cluster: ThrowawayCluster) -> Iterator[tuple[FaultProxy, FaultProxy]]:
    """The fault proxies in front of the server, or in front of a PgBouncer in
    transaction pooling (the quiet network is then the one between mover and pooler)."""
    port = cluster.port if request.param == "direct" else request.getfixturevalue("bouncer").port
    sp, tp = FaultProxy(port).start(), FaultProxy(port).start()
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
    at: str | None = None, strike: Callable[[], None] | None = None, timeouts: Timeouts = TIMEOUTS,
) -> tuple[MoveReport | BaseException, float]:
    """One drain through the proxies; strike() when the mover reaches point `at`."""
    started = time.monotonic()
    struck = []

    def hook(point: str) -> None:
        if point == at and strike is not None and not struck:
            struck.append(point)
            strike()

    try:
        s = connect(sp.dsn(source.dsn), application_name="quiet:src", timeouts=timeouts)
        try:
            t = connect(tp.dsn(target.dsn), application_name="quiet:tgt", timeouts=timeouts)
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


def test_a_connection_lost_after_a_long_silence_is_a_wait_timeout_naming_the_side(
    target: Server, proxies: tuple[FaultProxy, FaultProxy]
) -> None:
    """statement_timeout far above network_timeout; the network goes silent, then the
    connection dies before our statement watch fires (as when the kernel's keepalives or
    tcp_user_timeout give up first, which the storm saw under load): WaitTimeout naming the
    side and the server, not libpq's bare "server closed the connection unexpectedly"."""
    _, tp = proxies
    patient = Timeouts(connect_timeout=2, network_timeout=1.0, statement_timeout=60, lock_timeout=1)
    conn = connect(tp.dsn(target.dsn), application_name="quiet:lost", timeouts=patient, side="target")
    try:
        tp.freeze()
        threading.Timer(2.5, tp.cut).start()
        started = time.monotonic()
        with pytest.raises(WaitTimeout) as caught, conn.cursor() as cur:
            cur.execute("select 1")
        seconds = time.monotonic() - started
    finally:
        conn.close()
        tp.heal()
    message = str(caught.value)
    assert caught.value.side == "target" and "connection was lost" in message and "127.0.0.1" in message, message
    assert 2 < seconds < 2.5 + MARGIN, seconds


def test_a_source_lock_held_elsewhere_is_a_wait_timeout_naming_the_side(source: Server, target: Server) -> None:
    """Another session holds the consumer's next-batch lock on the source: the mover gives
    up within lock_timeout with WaitTimeout naming the source, and moves once it is free."""
    big_batch(source, 20)
    holder = connect(source.dsn, application_name="quiet:holder")
    try:
        with holder.cursor() as cur:
            cur.execute("select pg_advisory_xact_lock(hashtextextended(%s::text, 0::bigint))",
                        ("airflow_provider_pgq:next_batch:src_q\x01mover",))
        s = connect(source.dsn, application_name="quiet:src", timeouts=TIMEOUTS, side="source")
        t = connect(target.dsn, application_name="quiet:tgt", timeouts=TIMEOUTS, side="target")
        try:
            started = time.monotonic()
            with pytest.raises(WaitTimeout) as caught:
                QueueMover(s, t, MoverOptions("src_q", "dst_q", "mover", register_consumer=True)).drain()
            seconds = time.monotonic() - started
        finally:
            s.close()
            t.close()
    finally:
        holder.close()
    assert caught.value.side == "source" and "lock_timeout" in str(caught.value), str(caught.value)
    assert seconds < TIMEOUTS.lock_timeout + MARGIN, seconds
    assert open_transactions(source) == 0
    run_mover(source, target, register_consumer=True)
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")


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
    c = new_cluster(in_memory=True)
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
        result, seconds = run_through(source, target, sp, tp, faults.MID_STREAM, c.kill9)
        assert isinstance(result, (psycopg2.Error, WaitTimeout)), result
        assert seconds < STREAM_BOUND + MARGIN, seconds
        assert wait_until(lambda: open_transactions(source) == 0, timeout=3)
        c.start_after_crash()  # crash recovery, once the orphaned backends are gone
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
            "select 1 from pg_stat_activity where datname = %s"
            " and query ~* '(^|;)[[:space:]]*copy ' and state = 'active'",
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


# -- a mover that gave up leaves no session behind: the tracking key's lock --------------------


def target_backends(target: Server, app: str) -> list[tuple[int, str, str]]:
    rows = target.execute(
        "select pid, coalesce(state, ''), coalesce(wait_event, '') from pg_stat_activity"
        " where datname = %s and application_name = %s", (target.dbname, app),
    )
    return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]


def test_frozen_mover_that_gave_up_leaves_no_session_behind(
    source: Server, target: Server, proxies: tuple[FaultProxy, FaultProxy],
) -> None:
    """Frozen mid-COPY, the mover gives up; with the network still frozen, its target
    session is gone within a second or two (the proxy, a network, lets the server
    side go with the client), so the next mover gets the tracking key's lock at once."""
    sp, tp = proxies
    big_batch(source)
    result, _ = run_through(source, target, sp, tp, faults.MID_STREAM, tp.freeze)
    assert isinstance(result, WaitTimeout), result
    assert wait_until(lambda: not target_backends(target, "quiet:tgt"), timeout=3), target_backends(target, "quiet:tgt")
    started = time.monotonic()
    report = run_mover(source, target, register_consumer=True)  # direct, while the proxy stays frozen
    assert time.monotonic() - started < TIMEOUTS.lock_timeout + MARGIN
    assert report.events == BIG
    settle_and_compare(source, target, sp, tp)


def test_session_held_by_a_middlebox_is_named_by_the_next_mover(
    source: Server, target: Server, cluster: ThrowawayCluster,
) -> None:
    """A middlebox that keeps a dead mover's server connection open (and answers the
    server's keepalives) leaves the target session waiting in COPY for data that never
    comes, holding the tracking key's lock: no server setting ends that wait. The next
    mover fails within lock_timeout with KeyLocked naming that session's pid; once it
    is ended as the message says, everything moves exactly once."""
    sp, tp = FaultProxy(cluster.port).start(), FaultProxy(cluster.port, hold_server=True).start()
    try:
        big_batch(source)
        result, _ = run_through(source, target, sp, tp, faults.MID_STREAM, tp.freeze)
        assert isinstance(result, WaitTimeout), result
        time.sleep(2 * TIMEOUTS.network_timeout)  # longer than every bound of the session
        held = target_backends(target, "quiet:tgt")
        assert [(state, wait) for _, state, wait in held] == [("active", "ClientRead")], held
        sp.heal()
        tp.heal()
        result, seconds = run_through(source, target, sp, tp)
        assert isinstance(result, KeyLocked), result
        assert result.holder_pid == held[0][0] and f"pg_terminate_backend({held[0][0]})" in str(result)
        assert "quiet:tgt" in str(result) and "ClientRead" in str(result)
        assert seconds < TIMEOUTS.lock_timeout + MARGIN, seconds
        assert target.execute("select pg_terminate_backend(%s)", (held[0][0],))[0][0]
        assert wait_until(lambda: not target_backends(target, "quiet:tgt"), timeout=3)
        settle_and_compare(source, target, sp, tp)
    finally:
        sp.stop()
        tp.stop()


# -- the target's disk fills during the COPY ----------------------------------------------------


def test_full_target_disk_fails_cleanly_and_moves_once_after(
    source: Server, target: Server, cluster: ThrowawayCluster,
) -> None:
    """The target queue's event tables on a tablespace of their own, on a tmpfs with
    256 KB left: the 10 MB batch fails with DiskFull, nothing of it is in the target
    and the source's batch is not finished; once the disk has room, the next run moves
    it exactly once."""
    disk = SmallDisk(cluster, f"quiet_disk_{target.dbname}")
    if not disk.start():
        pytest.skip("a tmpfs cannot be mounted here (needs root)")
    try:
        assert move_event_tables(target.execute, "dst_q", disk.tablespace) >= 4
        big_batch(source)
        disk.fill(256 << 10)
        with pytest.raises(psycopg2.errors.DiskFull):
            run_mover(source, target, register_consumer=True)
        assert sum(queue_events(target, "dst_q").values()) == 0
        assert open_transactions(source) == 0 and open_transactions(target) == 0
        disk.free()
        assert run_mover(source, target).events == BIG
        src, dst = queue_events(source, "src_q"), queue_events(target, "dst_q")
        assert src == dst and max(dst.values()) == 1
    finally:
        disk.free()
        target.execute("select pgq.drop_queue('dst_q', true)")
        disk.stop()
