"""Least privilege: the mover runs with a source role holding only pgq_reader (and
CONNECT) and a target role holding only pgq_mover (and CONNECT), both logging in
over TCP with a password (scram), and moves every event exactly once.

What the roles may and may not do is asserted first, so that a test passing
because a role had more rights than intended cannot go unnoticed. PUBLIC's
CONNECT on both databases is revoked: the roles get in only through their grant.
The grants found here are the ones docs/reliability.md lists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest
from psycopg2 import sql

from airflow_provider_pgq.core.connect import connect
from airflow_provider_pgq.core.errors import ConnectionFailed, PgqError
from airflow_provider_pgq.core.mover import CHUNK_PATH, COPY_PATH, DrainBounds, MoveReport, MoverOptions, QueueMover
from tests.helpers import Login, Server, create_login, mark_of, produce, queue_events, register, simple_events, tick
from tests.support.cluster import ThrowawayCluster
from tests.support.pgqd import Pgqd

#: The functions a hardened pgq_ext (EXECUTE revoked from PUBLIC) must grant the
#: target role: exactly what the mover calls.
MOVER_PGQ_EXT_FUNCTIONS = (
    ("mover_schema_version", ""),
    ("get_last_tick", "text, text"),
    ("set_last_tick", "text, text, bigint"),
    ("bind_source", "text, text, text, text, text"),
    ("insert_event_chunk", "text, text[], text[], text[], text[], text[], text[], timestamptz[], bigint[]"),
    ("stage_events", ""),
    ("insert_staged_events", "text, bigint, boolean"),
    ("begin_batch", "text, text, text, text, text"),
    ("ensure_key", "text, text"),
    ("mark_batch", "text, text, bigint, bigint, bigint, bigint, bigint, bigint, jsonb"),
)


LoginMaker = Callable[[Server, "str | None"], Login]


@pytest.fixture
def login_in(cluster: ThrowawayCluster) -> Iterator[LoginMaker]:
    """login_in(server, pgq_role) -> a password login holding pgq_role (or nothing)
    and CONNECT on that one database, whose PUBLIC CONNECT is revoked."""
    made: list[tuple[Login, Server]] = []

    def make(server: Server, pgq_role: str | None) -> Login:
        login = create_login(cluster, "lp", in_role=pgq_role)
        made.append((login, server))
        db = sql.Identifier(server.dbname)
        cluster.execute("postgres", sql.SQL("revoke connect on database {} from public").format(db))
        cluster.execute("postgres", sql.SQL("grant connect on database {} to {}").format(
            db, sql.Identifier(login.name)))
        return login

    yield make
    for login, server in made:
        server.execute(sql.SQL("drop owned by {}").format(sql.Identifier(login.name)))
        cluster.execute("postgres", sql.SQL("drop role {}").format(sql.Identifier(login.name)))


def move(source_dsn: str, target_dsn: str, bounds: DrainBounds | None = None, **options: Any) -> MoveReport:
    opts = MoverOptions(source_queue="src_q", target_queue="dst_q", consumer=options.pop("consumer", "mover"),
                        **options)
    s = connect(source_dsn, application_name="lp-test-src")
    t = connect(target_dsn, application_name="lp-test-tgt")
    try:
        return QueueMover(s, t, opts).drain(bounds)
    finally:
        s.close()
        t.close()


def can(server: Server, login: Login, check: str, *args: str) -> bool:
    """has_*_privilege(login, ...) evaluated in the server's database."""
    query = sql.SQL("select {}(%s, " + ", ".join(["%s"] * len(args)) + ")").format(sql.Identifier(check))
    return bool(server.execute(query, (login.name, *args))[0][0])


def memberships(server: Server, login: Login) -> set[str]:
    rows = server.execute(
        "select r.rolname from pg_auth_members m join pg_roles r on r.oid = m.roleid"
        " join pg_roles u on u.oid = m.member where u.rolname = %s",
        (login.name,),
    )
    return {str(r[0]) for r in rows}


def event_table(server: Server, queue: str) -> str:
    return str(server.execute(
        "select queue_data_pfx || '_' || queue_cur_table from pgq.queue where queue_name = %s", (queue,)
    )[0][0])


def assert_reader_only(source: Server, reader: Login) -> None:
    """The source login consumes and nothing more: no writes, no ticker, no admin."""
    assert memberships(source, reader) == {"pgq_reader"}
    assert not source.execute("select rolsuper or rolcreaterole or rolcreatedb from pg_roles where rolname = %s",
                              (reader.name,))[0][0]
    assert can(source, reader, "has_function_privilege", "pgq.next_batch_info(text, text)", "execute")
    assert not can(source, reader, "has_function_privilege", "pgq.insert_event(text, text, text)", "execute")
    assert not can(source, reader, "has_function_privilege", "pgq.ticker(text)", "execute")
    assert not can(source, reader, "has_table_privilege", event_table(source, "src_q"), "insert")
    assert can(source, reader, "has_table_privilege", event_table(source, "src_q"), "select")


def assert_writer_only(target: Server, writer: Login) -> None:
    """The target login is a member of pgq_mover and nothing more: it may not write the
    event tables, nor produce through pgq.insert_event."""
    assert memberships(target, writer) == {"pgq_mover"}
    assert not target.execute("select rolsuper from pg_roles where rolname = %s", (writer.name,))[0][0]
    table = event_table(target, "dst_q")
    assert not can(target, writer, "has_table_privilege", table, "insert")
    assert not can(target, writer, "has_table_privilege", table, "select")
    assert not can(target, writer, "has_function_privilege", "pgq.next_batch_info(text, text)", "execute")
    assert not can(target, writer, "has_table_privilege", "pgq_ext.completed_tick", "update")
    assert not can(target, writer, "has_function_privilege", "pgq.insert_event(text, text, text)", "execute")


def test_roles_cannot_log_in_without_their_connect_grant(source: Server, target: Server, login_in: LoginMaker) -> None:
    """The premise of the tests below: CONNECT is really needed (PUBLIC's is revoked)."""
    reader = login_in(source, "pgq_reader")
    login_in(target, "pgq_mover")  # revokes PUBLIC's CONNECT on the target too
    with pytest.raises(ConnectionFailed, match="permission denied for database") as info:
        connect(reader.dsn(target))
    assert reader.password not in str(info.value)
    conn = connect(reader.dsn(source))
    conn.close()


@pytest.mark.parametrize("register_as_reader", [True, False], ids=["reader-registers", "admin-registered"])
def test_reader_and_writer_roles_move_every_event_once(
    source: Server, target: Server, login_in: LoginMaker, register_as_reader: bool
) -> None:
    reader = login_in(source, "pgq_reader")
    writer = login_in(target, "pgq_mover")
    assert_reader_only(source, reader)
    assert_writer_only(target, writer)
    if not register_as_reader:
        register(source, "src_q", "mover")
    else:
        # the reader registers itself: pgq_reader may call pgq.register_consumer
        first = move(reader.dsn(source), writer.dsn(target), register_consumer=True)
        assert first.events == 0
    events = simple_events(300)
    produce(source, "src_q", events[:120])
    tick(source, "src_q")
    produce(source, "src_q", events[120:])
    last = tick(source, "src_q")

    report = move(reader.dsn(source), writer.dsn(target), chunk_size=50)
    assert report.write_path == CHUNK_PATH
    assert report.events == 300 and report.batches >= 2
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")
    assert mark_of(target, "mover") == last
    assert move(reader.dsn(source), writer.dsn(target)).events == 0
    assert sum(queue_events(target, "dst_q").values()) == 300


def test_writer_without_temporary_privilege_still_moves_everything(
    source: Server, target: Server, login_in: LoginMaker
) -> None:
    """TEMPORARY is granted to PUBLIC by default; a hardened target may revoke it."""
    target.execute(sql.SQL("revoke temporary on database {} from public").format(sql.Identifier(target.dbname)))
    reader = login_in(source, "pgq_reader")
    writer = login_in(target, "pgq_mover")
    assert not can(target, writer, "has_database_privilege", target.dbname, "temporary")
    register(source, "src_q", "mover")
    produce(source, "src_q", simple_events(200))
    tick(source, "src_q")
    report = move(reader.dsn(source), writer.dsn(target), chunk_size=33)
    assert report.write_path == CHUNK_PATH and report.events == 200
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")


def test_admin_target_role_takes_the_copy_path(source: Server, target: Server, login_in: LoginMaker) -> None:
    reader = login_in(source, "pgq_reader")
    admin = login_in(target, "pgq_admin")
    target.execute(sql.SQL("grant pgq_mover to {}").format(sql.Identifier(admin.name)))  # marks
    assert can(target, admin, "has_table_privilege", event_table(target, "dst_q"), "insert")
    register(source, "src_q", "mover")
    produce(source, "src_q", simple_events(150))
    last = tick(source, "src_q")
    report = move(reader.dsn(source), admin.dsn(target))
    assert report.write_path == COPY_PATH and report.events == 150
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")
    assert mark_of(target, "mover") == last


def test_hardened_pgq_ext_needs_exactly_the_listed_functions(
    source: Server, target: Server, login_in: LoginMaker
) -> None:
    """A DBA who revokes EXECUTE on pgq_ext from PUBLIC grants the mover's role these
    functions (docs/reliability.md) and nothing else: the move works."""
    reader = login_in(source, "pgq_reader")
    writer = login_in(target, "pgq_mover")
    target.execute("revoke execute on all functions in schema pgq_ext from public")
    target.execute("revoke execute on all functions in schema pgq_ext from pgq_mover")
    assert not can(target, writer, "has_function_privilege", "pgq_ext.set_last_tick(text, text, bigint)", "execute")
    register(source, "src_q", "mover")
    produce(source, "src_q", simple_events(40))
    tick(source, "src_q")

    with pytest.raises(psycopg2.errors.InsufficientPrivilege):
        move(reader.dsn(source), writer.dsn(target))
    assert sum(queue_events(target, "dst_q").values()) == 0 and mark_of(target, "mover") is None

    for name, argtypes in MOVER_PGQ_EXT_FUNCTIONS:
        # argtypes are the constant type lists above, never input
        target.execute(sql.SQL("grant execute on function {}({}) to {}").format(
            sql.Identifier("pgq_ext", name), sql.SQL(argtypes), sql.Identifier(writer.name)))
    last = tick(source, "src_q")
    report = move(reader.dsn(source), writer.dsn(target))
    assert report.write_path == CHUNK_PATH and report.events == 40
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")
    assert mark_of(target, "mover") == last


def test_target_role_without_pgq_mover_is_refused_before_anything_is_written(
    source: Server, target: Server, login_in: LoginMaker
) -> None:
    reader = login_in(source, "pgq_reader")
    nobody = login_in(target, None)
    produce(source, "src_q", simple_events(10))
    tick(source, "src_q")
    with pytest.raises(PgqError) as info:
        move(reader.dsn(source), nobody.dsn(target), register_consumer=True)
    text = str(info.value)
    assert nobody.name in text and "'dst_q'" in text and "pgq_mover" in text
    # nothing written on either side: no registration, no mark, no binding, no events
    assert source.execute("select count(*) from pgq.subscription")[0][0] == 0
    assert target.execute("select count(*) from pgq_ext.completed_tick")[0][0] == 0
    assert target.execute("select count(*) from pgq_ext.tracking_source")[0][0] == 0
    assert sum(queue_events(target, "dst_q").values()) == 0


def test_reader_forces_a_tick_cut_by_pgqd(
    source: Server, target: Server, login_in: LoginMaker, pgqd: Pgqd
) -> None:
    """force_tick is a pgq_reader right; the tick itself comes from pgqd (running as
    admin). pgq.ticker is not: the mover's own ticker option needs pgq_admin."""
    reader = login_in(source, "pgq_reader")
    writer = login_in(target, "pgq_mover")
    register(source, "src_q", "mover")
    events = simple_events(60)
    produce(source, "src_q", events)
    pgqd.watch(source.dbname)
    report = move(reader.dsn(source), writer.dsn(target), DrainBounds(force_tick=True, tick_timeout=60))
    assert report.events == 60
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")
    pgqd.stop()

    with pytest.raises(psycopg2.errors.InsufficientPrivilege, match="pgq.ticker|function ticker"):
        move(reader.dsn(source), writer.dsn(target), DrainBounds(force_tick=True, run_ticker=True))
