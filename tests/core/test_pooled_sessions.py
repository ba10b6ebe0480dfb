"""Behind a transaction-mode PgBouncer (a real one, tests/support/pgbouncer.py): every
transaction the package opens carries its own pinned search_path and bounds, and no
setting of ours is left on a server session that the pool hands to another client.

The pool of each (database, login) has two server sessions, used round robin, and
"neighbours" (other clients of the same login) leave their own session-level settings
on both (a careless search_path with public first, no timeouts), as the other
applications of a shared pool do.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from airflow_provider_pgq.core import pgq_ext
from airflow_provider_pgq.core.connect import SAFE_SEARCH_PATH, connect
from airflow_provider_pgq.core.errors import KeyLocked
from airflow_provider_pgq.core.guard import Timeouts
from airflow_provider_pgq.core.mover import CHUNK_PATH, COPY_PATH, MoverOptions, QueueMover
from airflow_provider_pgq.core.pending import pending_status
from tests.helpers import Login, Server, create_login, pooled, produce, queue_events, register, simple_events, tick
from tests.support.pgbouncer import PgBouncer, every_server_session, leave_settings

#: What the neighbours leave on every server session.
NEIGHBOUR = {"search_path": "public, pg_catalog", "statement_timeout": "0", "lock_timeout": "0",
             "idle_in_transaction_session_timeout": "0"}
#: The settings the package sets for its transactions: none may outlive them.
OURS = ("search_path", "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout",
        "client_connection_check_interval", "tcp_user_timeout", "tcp_keepalives_idle", "tcp_keepalives_interval",
        "tcp_keepalives_count", "default_transaction_read_only", "transaction_read_only")
#: PgBouncer itself sets these on a server session for each client it links to it.
POOLER_TRACKED = ("application_name", "client_encoding", "datestyle", "timezone", "standard_conforming_strings")
TIMEOUTS = Timeouts(connect_timeout=5, network_timeout=10, statement_timeout=11, lock_timeout=1)
CLI = [sys.executable, "-m", "airflow_provider_pgq.cli"]


def spoil(bouncer: PgBouncer, server: Server, login: Login | None = None) -> None:
    """The neighbours' session-level settings, on every server session of the pool."""
    leave_settings(_dsn(bouncer, server, login), bouncer.pool_size, NEIGHBOUR)


def _dsn(bouncer: PgBouncer, server: Server, login: Login | None) -> str:
    return login.dsn(pooled(bouncer, server)) if login else pooled(bouncer, server).dsn


def left_behind(bouncer: PgBouncer, server: Server, login: Login | None = None) -> list[dict[str, Any]]:
    """What another client of the login finds on each server session: the settings of
    ours, and every setting some client set at session level."""
    found = []
    with every_server_session(_dsn(bouncer, server, login), bouncer.pool_size) as conns:
        for conn in conns:
            with conn.cursor() as cur:
                cur.execute("select pg_catalog.pg_backend_pid(), pg_catalog.array_agg(s.name order by s.name)"
                            " filter (where s.source = 'session' and s.name <> all(%s)),"
                            " pg_catalog.json_object_agg(s.name, s.setting) filter (where s.name = any(%s))"
                            " from pg_catalog.pg_settings s", (list(POOLER_TRACKED), list(OURS)))
                pid, session_set, values = cur.fetchone()  # type: ignore[misc]
            found.append({"pid": pid, "set by a client": session_set or [], **values})
    return found


def database_defaults(server: Server, login: Login | None = None) -> dict[str, str]:
    """The same settings in a fresh direct session of the login (what the pool should show)."""
    conn = psycopg2.connect(login.dsn(server) if login else server.dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("select pg_catalog.json_object_agg(name, setting) from pg_catalog.pg_settings"
                        " where name = any(%s)", (list(OURS),))
            return dict(cur.fetchone()[0])  # type: ignore[index]
    finally:
        conn.close()


def read_in_transaction(conn: psycopg2.extensions.connection) -> tuple[Any, ...]:
    with conn.cursor() as cur:
        cur.execute("select pg_catalog.pg_backend_pid(), pg_catalog.current_setting('search_path'),"
                    " pg_catalog.current_setting('statement_timeout'), pg_catalog.current_setting('lock_timeout'),"
                    " pg_catalog.current_setting('idle_in_transaction_session_timeout')")
        row = cur.fetchone()
    assert row is not None
    return tuple(row)


@pytest.fixture
def login(source: Server) -> Iterator[Login]:
    made = create_login(source.cluster, "pooled", superuser=True)
    yield made
    source.cluster.execute("postgres", f'drop role if exists "{made.name}"')


def test_every_pooled_transaction_runs_pinned_and_bounded(bouncer: PgBouncer, source: Server) -> None:
    """Whatever server session a transaction lands on, it resolves names through
    pg_catalog only and runs under the mover's timeouts; in autocommit mode (the
    triggers' pollers) each statement does."""
    spoil(bouncer, source)
    conn = connect(pooled(bouncer, source).dsn, timeouts=TIMEOUTS)
    try:
        seen = set()
        for n in range(8):
            pid, *settings = read_in_transaction(conn)
            seen.add(pid)
            assert settings == [SAFE_SEARCH_PATH, "11s", "1s", "26s"], (n, settings)
            conn.commit() if n % 2 else conn.rollback()
        conn.autocommit = True
        for _ in range(4):
            pid, *settings = read_in_transaction(conn)
            seen.add(pid)
            assert settings == [SAFE_SEARCH_PATH, "11s", "1s", "26s"], settings
        assert len(seen) == bouncer.pool_size, "the pool did not move the connection between server sessions"
    finally:
        conn.close()
    # and nothing of it stayed behind: the neighbours' settings are as they left them
    for session in left_behind(bouncer, source):
        assert {k: session[k] for k in NEIGHBOUR} == NEIGHBOUR, session


def test_a_held_key_is_key_locked_within_lock_timeout_through_the_pool(
    bouncer: PgBouncer, source: Server, target: Server,
) -> None:
    """lock_timeout is in force inside the mover's own transactions, whatever session
    they run on: a tracking key held elsewhere is KeyLocked within it, not a wait until
    the statement bound."""
    register(source, "src_q", "mover")
    produce(source, "src_q", simple_events(5))
    tick(source, "src_q")
    spoil(bouncer, target)
    holder = target.connect()
    try:
        pgq_ext.lock_key(holder, "mover", "")
        s = connect(pooled(bouncer, source).dsn, timeouts=TIMEOUTS, side="source")
        t = connect(pooled(bouncer, target).dsn, timeouts=TIMEOUTS, side="target")
        try:
            with pytest.raises(KeyLocked) as info:
                QueueMover(s, t, MoverOptions("src_q", "dst_q", "mover")).drain()
            assert info.value.holder_pid == holder.get_backend_pid()
        finally:
            s.close()
            t.close()
    finally:
        holder.rollback()
        holder.close()
    assert sum(queue_events(target, "dst_q").values()) == 0


@pytest.fixture(params=["transaction", "session"])
def any_pool(request: pytest.FixtureRequest, bouncer: PgBouncer, source: Server) -> Iterator[PgBouncer]:
    """The shared transaction pool, or a session pool without server_reset_query (so a
    setting a client left on its session would reach the next client)."""
    if request.param == "transaction":
        yield bouncer
        return
    with PgBouncer(source.cluster, "session", pool_size=bouncer.pool_size, reset_query="") as own:
        yield own


def test_no_setting_of_ours_is_left_on_a_pooled_server_session(
    any_pool: PgBouncer, source: Server, target: Server, login: Login, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After the mover (both write paths), the command line, the hook, the sensor, a
    trigger and the PgQ page's read-only sessions worked through the pool, another client of the same login finds every
    server session as the database configures it."""
    from airflow_provider_pgq.hooks.pgq import PgqHook
    from airflow_provider_pgq.sensors.pgq import PgqQueueSensor
    from airflow_provider_pgq.triggers.pgq import PgqEventsTrigger

    chunk = create_login(source.cluster, "pooled_chunk", in_role="pgq_mover")
    try:
        src, dst = login.dsn(pooled(any_pool, source)), login.dsn(pooled(any_pool, target))
        events = simple_events(40)
        produce(source, "src_q", events[:20])
        register(source, "src_q", "mover")
        register(source, "src_q", "chunked")
        tick(source, "src_q")
        produce(source, "src_q", events[20:])
        tick(source, "src_q")
        moved = queue_events(source, "src_q")
        for dsn_t, consumer, path in ((dst, "mover", COPY_PATH),
                                      (chunk.dsn(pooled(any_pool, target)), "chunked", CHUNK_PATH)):
            with closing(connect(src, side="source")) as s, closing(connect(dsn_t, side="target")) as t:
                report = QueueMover(s, t, MoverOptions("src_q", "dst_q", consumer)).drain()
            assert (report.events, report.write_path) == (40, path)
        ini = tmp_path / "pooled.ini"
        ini.write_text(f"[queue_mover]\njob_name = pooled\nsrc_db = {src}\ndst_db = {dst}\n"
                       "pgq_queue_name = src_q\ndst_queue_name = dst_q\npgq_consumer_id = cli\n")
        for switches in (["--register"], ["--once"], ["--status"]):
            proc = subprocess.run([*CLI, *switches, str(ini)], capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr
        monkeypatch.setenv("AIRFLOW_CONN_POOLED_SRC", login.uri(pooled(any_pool, source)))
        hook = PgqHook("pooled_src")
        assert hook.get_lag("src_q", "mover").registered
        assert hook.count_events("src_q") == 40
        with closing(connect(src)) as conn:
            assert not pending_status(conn, "src_q", "mover").ready()
        PgqQueueSensor(task_id="wait", pgq_conn_id="pooled_src", queue_name="src_q",
                       consumer_name="mover").poke({})
        produce(source, "src_q", simple_events(3, start=100))
        tick(source, "src_q")

        async def first_event() -> dict[str, Any]:
            run = PgqEventsTrigger(pgq_conn_id="pooled_src", queue_name="src_q", consumer_name="mover",
                                   poll_interval=0.05).run()
            try:
                return dict((await asyncio.wait_for(run.__anext__(), 30)).payload)
            finally:
                await run.aclose()

        assert asyncio.run(first_event())["batch_available"] is True
        from airflow_provider_pgq.ui.app import _open  # the PgQ page's read-only sessions

        with closing(_open("pooled_src")) as page:
            for _ in range(3):
                assert pending_status(page, "src_q", "mover").registered
                page.rollback()
    finally:
        source.cluster.execute("postgres", f'drop role if exists "{chunk.name}"')
    # two consumers moved the 40 events into one queue; the CLI's, registered after them, none
    assert queue_events(target, "dst_q") == Counter({e: 2 for e in moved})
    for server in (source, target):
        expected = database_defaults(server, login)
        for session in left_behind(any_pool, server, login):
            assert session["set by a client"] == [], session
            # (the TCP settings differ by socket: the pool reaches the server over its own)
            assert {k: session[k] for k in expected if not k.startswith("tcp_")} == \
                {k: v for k, v in expected.items() if not k.startswith("tcp_")}, session


def test_a_direct_session_keeps_nothing_of_ours_between_transactions(source: Server, target: Server) -> None:
    """Without a pooler too: between our transactions the session holds the database's
    own settings (read through a plain cursor, which sends no settings of its own)."""
    register(source, "src_q", "mover")
    produce(source, "src_q", simple_events(5))
    tick(source, "src_q")
    expected = database_defaults(source)
    with closing(connect(source.dsn)) as s, closing(connect(target.dsn)) as t:
        assert QueueMover(s, t, MoverOptions("src_q", "dst_q", "mover")).drain().events == 5
        for conn, server in ((s, source), (t, target)):
            with conn.cursor(cursor_factory=psycopg2.extensions.cursor) as cur:
                cur.execute("select pg_catalog.json_object_agg(name, setting) from pg_catalog.pg_settings"
                            " where name = any(%s)", (list(OURS),))
                row = cur.fetchone()
            conn.rollback()
            assert row is not None
            assert row[0] == database_defaults(server)
    assert expected["search_path"] == '"$user", public'
