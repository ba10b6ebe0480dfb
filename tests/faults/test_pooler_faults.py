"""Faults of a real PgBouncer (transaction pooling) in front of source and target: its
console's KILL and RECONNECT and a restart of the pooler while a batch streams, and a
PAUSEd pool. Each error is one ConnectionLost / WaitTimeout / ConnectionFailed line
naming the side and the server as configured (the pooler's address), nothing of the
driver's reaches stderr, and afterwards a clean run through the pool moves everything
exactly once (compared event by event)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_provider_pgq.core import faults
from airflow_provider_pgq.core.connect import connect
from airflow_provider_pgq.core.errors import ConnectionFailed, ConnectionLost, WaitTimeout
from airflow_provider_pgq.core.guard import Timeouts
from airflow_provider_pgq.core.mover import MoverOptions, QueueMover
from tests.helpers import Login, Server, create_login, pooled, produce, queue_events, register, tick
from tests.support.cluster import ThrowawayCluster
from tests.support.pgbouncer import PgBouncer

TIMEOUTS = Timeouts(connect_timeout=2, network_timeout=5, statement_timeout=5, lock_timeout=2)
BIG = 3000
CLI = [sys.executable, "-m", "airflow_provider_pgq.cli"]


@pytest.fixture(scope="module")
def own_bouncer(cluster: ThrowawayCluster) -> Iterator[PgBouncer]:
    """A pooler of this module's own: its faults must not reach other tests."""
    with PgBouncer(cluster, "transaction", pool_size=2) as b:
        yield b


@pytest.fixture
def chunk_login(cluster: ThrowawayCluster) -> Iterator[Login]:
    login = create_login(cluster, "pooled_chunk", in_role="pgq_mover")
    yield login
    cluster.execute("postgres", f'drop role if exists "{login.name}"')


def big_batch(source: Server) -> None:
    register(source, "src_q", "mover")
    produce(source, "src_q", [("t", f"{n:05d}" + "x" * 2000, None, None, None, None) for n in range(BIG)])
    tick(source, "src_q")


def move(bouncer: PgBouncer, source: Server, target: Server, target_dsn: str | None = None,
         strike: str | None = None) -> object:
    """One drain through the pool; strike runs on the console when the COPY has begun.
    Returns the report, or the exception it ended with."""
    def hook(point: str) -> None:
        if point == faults.MID_STREAM and strike:
            if strike == "restart":
                bouncer.restart()
            else:
                bouncer.console(strike)

    try:
        s = connect(pooled(bouncer, source).dsn, side="source", timeouts=TIMEOUTS)
        t = connect(target_dsn or pooled(bouncer, target).dsn, side="target", timeouts=TIMEOUTS)
    except Exception as exc:  # noqa: BLE001 - the outcome under test
        return exc
    try:
        return QueueMover(s, t, MoverOptions("src_q", "dst_q", "mover"), fault=hook).drain()
    except Exception as exc:  # noqa: BLE001
        return exc
    finally:
        s.close()
        t.close()


@pytest.mark.parametrize(("strike", "side", "path"), [
    ("KILL {target}", "target", "copy"),
    ("KILL {target}", "target", "chunks"),
    ("KILL {source}", "source", "copy"),
    ("RECONNECT {target}", None, "copy"),
    ("restart", None, "copy"),
])
def test_a_pooler_fault_mid_copy_is_one_line_and_moves_once_after(
    own_bouncer: PgBouncer, source: Server, target: Server, chunk_login: Login, capfd: pytest.CaptureFixture[str],
    strike: str, side: str | None, path: str,
) -> None:
    big_batch(source)
    target_dsn = chunk_login.dsn(pooled(own_bouncer, target)) if path == "chunks" else None
    command = strike.format(source=source.dbname, target=target.dbname)
    result = move(own_bouncer, source, target, target_dsn, command)
    if command.startswith("KILL"):  # a killed database takes no client until RESUME
        own_bouncer.console("RESUME " + command.split()[1])
    out, err = capfd.readouterr()
    assert err == "", err
    if command.startswith("RECONNECT"):
        # RECONNECT closes a server connection only once it is released: the batch completes
        assert getattr(result, "events", None) == BIG, result
    else:
        assert isinstance(result, ConnectionLost), repr(result)
        message = str(result)
        assert "\n" not in message and "Traceback" not in message
        sides = {"source": source, "target": target}
        lost = result.side
        assert lost == side or (side is None and lost in sides), message
        assert message.startswith(f"{lost} 127.0.0.1:{own_bouncer.port}/{sides[lost].dbname}: "), message
        if lost == "target" or "during COPY" in message:
            assert "during COPY" in message and "nothing of it was committed" in message
            assert sum(queue_events(target, "dst_q").values()) == 0
        else:  # the source's COPY had all arrived: the KILL met the finish, after the target's commit
            assert "during statement 'select pgq.finish_batch" in message, message
    after = move(own_bouncer, source, target, target_dsn)
    assert not isinstance(after, Exception), repr(after)
    src, dst = queue_events(source, "src_q"), queue_events(target, "dst_q")
    assert src == dst and max(dst.values()) == 1 and sum(dst.values()) == BIG


def test_a_paused_pool_names_connect_timeout(own_bouncer: PgBouncer, source: Server, target: Server) -> None:
    """A PAUSEd pool holds a new connection's first statement (with a server session
    open already) or its login (without one): either way the error names
    connect_timeout, the bound that fired, and the pooler's address."""
    warm = connect(pooled(own_bouncer, target).dsn)
    warm.close()
    own_bouncer.console(f"PAUSE {target.dbname}")
    try:
        started = time.monotonic()
        with pytest.raises((WaitTimeout, ConnectionFailed)) as info:
            connect(pooled(own_bouncer, target).dsn, side="target", timeouts=TIMEOUTS).close()
        took = time.monotonic() - started
    finally:
        own_bouncer.console(f"RESUME {target.dbname}")
    message = str(info.value)
    assert "connect_timeout" in message and "raise statement_timeout" not in message, message
    assert f"127.0.0.1:{own_bouncer.port}/{target.dbname}" in message, message
    assert took < TIMEOUTS.connect_timeout + 5 + 3, took


def test_the_command_line_says_one_line_for_a_paused_pool(
    own_bouncer: PgBouncer, source: Server, target: Server, tmp_path: Path,
) -> None:
    register(source, "src_q", "cli")
    ini = tmp_path / "paused.ini"
    ini.write_text(
        "[queue_mover]\njob_name = paused\n"
        f"src_db = {pooled(own_bouncer, source).dsn}\ndst_db = {pooled(own_bouncer, target).dsn}\n"
        "pgq_queue_name = src_q\ndst_queue_name = dst_q\npgq_consumer_id = cli\n"
        "connect_timeout = 2\nnetwork_timeout = 5\n"
    )
    own_bouncer.console(f"PAUSE {target.dbname}")
    try:
        proc = subprocess.run([*CLI, "--once", str(ini)], capture_output=True, text=True, timeout=60)
    finally:
        own_bouncer.console(f"RESUME {target.dbname}")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in lines if "ERROR" in line or "error" in line.lower()]
    assert len(errors) == 1, proc.stderr
    assert "connect_timeout" in errors[0] and f"127.0.0.1:{own_bouncer.port}/{target.dbname}" in errors[0], errors
    assert own_bouncer.password not in proc.stderr
