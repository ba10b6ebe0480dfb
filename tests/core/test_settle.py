"""A connection of connect_unsettled (the CLI's) ends up bounded exactly as connect()'s.

connect() reads in a statement of its own which bounds the user chose (ALTER ROLE /
DATABASE SET, options in the connection string) and sets the others in every
transaction. connect_unsettled() saves that round trip: until the mover's checks read
it along with their facts, each transaction decides in SQL. Both must give the same
settings in every transaction, and the same client-side statement bound."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from psycopg2 import sql

from airflow_provider_pgq.core.connect import connect, connect_unsettled
from airflow_provider_pgq.core.guard import GuardedConnection, Timeouts
from airflow_provider_pgq.core.mover import MoverOptions, QueueMover
from tests.helpers import Login, Server, create_login, register

TIMEOUTS = Timeouts(connect_timeout=5, network_timeout=10, statement_timeout=11, lock_timeout=2)
SHOWN = ("search_path", "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout",
         "client_connection_check_interval")


@pytest.fixture
def chooser(target: Server) -> Iterator[Login]:
    """A superuser login whose role chose lock_timeout and whose database chose
    statement_timeout: those stay the user's, the others are the mover's."""
    login = create_login(target.cluster, "rt_settle", superuser=True)
    cluster = target.cluster
    cluster.execute("postgres", sql.SQL("alter role {} set lock_timeout = '7s'").format(sql.Identifier(login.name)))
    cluster.execute("postgres", sql.SQL("alter role {} in database {} set statement_timeout = '45s'").format(
        sql.Identifier(login.name), sql.Identifier(target.dbname)))
    yield login
    cluster.execute("postgres", sql.SQL("drop role if exists {}").format(sql.Identifier(login.name)))


def in_transaction(conn: GuardedConnection) -> dict[str, str]:
    with conn.cursor() as cur:
        cur.execute("select " + ", ".join(f"pg_catalog.current_setting('{name}')" for name in SHOWN))
        row = cur.fetchone()
    conn.rollback()
    return dict(zip(SHOWN, row, strict=True))


def bounds(conn: GuardedConnection) -> tuple[object, ...]:
    return conn.transaction_settings, conn.own_statement_timeout, conn.statement_bound, conn.bound_name


@pytest.mark.parametrize("keep_event_id", [False, True], ids=["checks in one read", "checks one by one"])
def test_settled_by_the_checks_as_by_connect(source: Server, target: Server, chooser: Login,
                                            keep_event_id: bool) -> None:
    register(source, "src_q", "mover")
    eager = connect(chooser.dsn(target), timeouts=TIMEOUTS, side="target")
    lazy_source = connect_unsettled(source.dsn, timeouts=TIMEOUTS, side="source")
    lazy = connect_unsettled(chooser.dsn(target), timeouts=TIMEOUTS, side="target")
    try:
        expected = in_transaction(eager)
        assert expected == {"search_path": "pg_catalog, pg_temp", "statement_timeout": "45s", "lock_timeout": "7s",
                            "idle_in_transaction_session_timeout": "26s",
                            "client_connection_check_interval": "1s"}
        assert lazy.unsettled is not None
        assert in_transaction(lazy) == expected, "unsettled: decided by the server, the same"
        assert lazy.statement_bound == 5 + 5  # bounded like the login until settled
        QueueMover(lazy_source, lazy, MoverOptions("src_q", "dst_q", "mover", keep_event_id=keep_event_id)).prepare()
        assert lazy.unsettled is None and lazy_source.unsettled is None
        assert bounds(lazy) == bounds(eager)
        settings, own, bound, name = bounds(lazy)
        assert "statement_timeout" not in settings and "lock_timeout" not in settings  # type: ignore[operator]
        assert (own, bound, name) == (False, 45 + 5, "statement_timeout")
        assert in_transaction(lazy) == expected
        # the source chose nothing: all of the mover's bounds
        assert lazy_source.own_statement_timeout and lazy_source.statement_bound == 11 + 5
    finally:
        for conn in (eager, lazy_source, lazy):
            conn.close()
