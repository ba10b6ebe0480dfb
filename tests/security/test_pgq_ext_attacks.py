"""Attacks on pgq_ext by ordinary roles, run for real as those roles.

A producer holds pgq_writer (every producer does); the mover's target login holds the
pgq_mover role that install makes. Each test has the attacker try what the security
review found possible and shows it gets nothing: marks, bindings, kept-id claims,
explicit ids and times stay the mover's; a pre-made pgq_ext is refused, not adopted;
re-running install keeps what an admin granted and revoked.
"""

from __future__ import annotations

import secrets
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg2
import pytest
from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from airflow_provider_pgq.core import pgq_ext
from airflow_provider_pgq.core.errors import PgqExtUntrusted
from tests.helpers import (
    Server,
    mark_of,
    pretend_mover_schema,
    produce,
    queue_events,
    register,
    run_mover,
    simple_events,
    tick,
)
from tests.security.attacker import call, denied
from tests.support.cluster import ThrowawayCluster

#: (name, argument types) of every function of pgq_ext's write side.
WRITE_SIDE = (
    ("set_last_tick", "text, text, bigint"),
    ("set_last_tick", "text, bigint"),
    ("set_batch_done", "text, text, bigint"),
    ("set_batch_done", "text, bigint"),
    ("set_event_done", "text, text, bigint, bigint"),
    ("set_event_done", "text, bigint, bigint"),
    ("bind_source", "text, text, text, text, text"),
    ("unbind_source", "text, text"),
    ("insert_event_chunk", "text, text[], text[], text[], text[], text[], text[], timestamptz[], bigint[]"),
    ("kept_ids_claim", "text, text, text"),
    ("kept_ids_commit", "text, text, text, bigint"),
    ("kept_ids_release", "text"),
    ("stage_events", ""),
    ("begin_batch", "text, text, text, text, text"),
    ("insert_staged_events", "text, bigint, boolean"),
    ("lock_key", "text, text"),
    ("ensure_key", "text, text"),
    ("kept_ids_refusal", "text, text, text"),
)

#: Reading marks stays open to all, as in the classic pgq_ext.
READ_SIDE = (
    ("get_last_tick", "text, text"),
    ("get_last_tick", "text"),
    ("is_batch_done", "text, text, bigint"),
    ("is_event_done", "text, text, bigint, bigint"),
    ("kept_ids_seq_position", "text"),
    ("mover_schema_version", ""),
)

Login = Callable[..., Connection]


@pytest.fixture
def login(cluster: ThrowawayCluster) -> Iterator[Callable[[Server, str], Connection]]:
    """login(server, 'pgq_writer' | 'pgq_mover' | '') -> a connection of a fresh login
    role holding just that role (made in the test, password over TCP)."""
    opened: list[Connection] = []

    def make(server: Server, role: str) -> Connection:
        name = f"atk_{uuid.uuid4().hex[:10]}"
        password = "Zq" + secrets.token_hex(8)
        create = sql.SQL("create role {} login password %s").format(sql.Identifier(name))
        if role:
            create = sql.SQL("{} in role {}").format(create, sql.Identifier(role))
        cluster.execute("postgres", create, (password,))
        conn = psycopg2.connect(cluster.dsn(server.dbname, user=name, password=password))
        opened.append(conn)
        return conn

    yield make
    for conn in opened:
        conn.close()


def seq_position(server: Server, queue: str) -> int:
    return int(server.execute("select pgq_ext.kept_ids_seq_position(%s)", (queue,))[0][0])


# -- finding 6: a producer moves a mark ------------------------------------------


def test_a_producer_cannot_move_a_mark_and_make_the_mover_skip(source: Server, target: Server, login: Login) -> None:
    register(source, "src_q", "mover")
    produce(source, "src_q", simple_events(5))
    tick(source, "src_q")
    run_mover(source, target)
    mark = mark_of(target, "mover")
    assert mark is not None

    producer = login(target, "pgq_writer")
    for query in (
        "select pgq_ext.set_last_tick('mover', '', %s)",
        "select pgq_ext.set_last_tick('mover', %s)",
    ):
        denied(producer, query, (mark + 1,))
    denied(producer, "select pgq_ext.set_last_tick('mover', '', null)")
    denied(producer, "select pgq_ext.unbind_source('mover', '')")
    denied(producer, "select pgq_ext.bind_source('evil', '', 'sys', 'db', 'q')")
    denied(producer, "select pgq_ext.set_batch_done('mover', '', 77)")
    denied(producer, "select pgq_ext.set_event_done('mover', '', 77, 1)")
    assert call(producer, "select pgq_ext.get_last_tick('mover', '')") == mark  # reading stays open
    assert mark_of(target, "mover") == mark

    produced = simple_events(10, start=5)
    produce(source, "src_q", produced)
    tick(source, "src_q")
    report = run_mover(source, target)
    assert report.events == 10
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")


def test_the_write_side_is_granted_to_the_mover_role_only(target: Server) -> None:
    def can(role: str, fn: str, args: str) -> bool:
        return bool(target.execute(
            "select has_function_privilege(%s, %s, 'execute')", (role, f"pgq_ext.{fn}({args})"))[0][0])

    for fn, args in WRITE_SIDE:
        assert can("pgq_mover", fn, args), fn
        assert not can("pgq_writer", fn, args), fn
        assert not can("pgq_reader", fn, args), fn
        assert not can("public", fn, args), fn
    for fn, args in READ_SIDE:
        assert can("public", fn, args), fn
    assert target.execute("select rolcanlogin, rolsuper from pg_roles where rolname = 'pgq_mover'") == [
        (False, False)]


# -- finding 5: explicit ids and backdated times ----------------------------------

CHUNK = ("select pgq_ext.insert_event_chunk(%s, array['t'], array['d'], array[null]::text[], array[null]::text[],"
         " array[null]::text[], array[null]::text[], array['2001-01-01 00:00+00']::timestamptz[], {ids})")


def test_a_producer_cannot_write_events_with_chosen_ids_or_times(target: Server, login: Login) -> None:
    producer = login(target, "pgq_writer")
    denied(producer, CHUNK.format(ids="array[1]::bigint[]"), ("dst_q",))
    denied(producer, CHUNK.format(ids="null"), ("dst_q",))
    assert not queue_events(target, "dst_q")


def test_explicit_ids_need_the_kept_id_claim_of_the_same_transaction(target: Server, login: Login) -> None:
    mover = login(target, "pgq_mover")
    message = denied(mover, CHUNK.format(ids="array[5]::bigint[]"), ("dst_q",))
    assert "kept-id claim in this transaction" in message
    # a claim taken in another (committed) transaction proves nothing for this one
    assert call(mover, "select pgq_ext.kept_ids_claim('k', '', 'dst_q')") is None
    denied(mover, CHUNK.format(ids="array[5]::bigint[]"), ("dst_q",))
    assert not queue_events(target, "dst_q", with_ids=True)
    # the mover's own times are its job: without ids, the chunk goes in
    assert call(mover, CHUNK.format(ids="null"), ("dst_q",)) == 1


# -- finding 3: kept_ids_commit trusting a setting --------------------------------


def test_a_forged_setting_cannot_claim_a_queue_or_max_out_its_sequence(target: Server, login: Login) -> None:
    target.execute("select pgq.create_queue('victim_q')")
    target.execute("select pgq.insert_event('victim_q', 'before', 'x')")
    before = seq_position(target, "victim_q")
    forge = ("select pg_catalog.set_config('pgq_ext.kept_ids_seq', %s, true),"
             " pgq_ext.kept_ids_commit('evil', '', 'victim_q', 9223372036854775806)")
    producer = login(target, "pgq_writer")
    denied(producer, forge, (str(before),))
    mover = login(target, "pgq_mover")  # even the mover role cannot do it without a claim
    assert "without kept_ids_claim" in denied(mover, forge, (str(before),))
    assert seq_position(target, "victim_q") == before
    assert target.execute("select count(*) from pgq_ext.kept_event_ids where target_queue = 'victim_q'") == [(0,)]
    assert target.execute("select pgq.insert_event('victim_q', 'after', 'y')")[0][0] == before + 1


# -- finding 4: a lock taken before the refusal -----------------------------------


def _locks_of(server: Server, conn: Connection) -> list[tuple[object, ...]]:
    """Locks of conn's backend that could stall somebody: advisory ones, and anything on a
    relation stronger than the ACCESS SHARE of a plain read."""
    return server.execute(
        "select locktype, relation::regclass::text, mode from pg_locks where pid = %s"
        " and (locktype = 'advisory' or (locktype = 'relation' and mode <> 'AccessShareLock'))",
        (conn.get_backend_pid(),))


def test_a_refused_claim_holds_no_lock_that_stalls_producers(target: Server, login: Login) -> None:
    target.execute("select pgq.insert_event('dst_q', 'local', 'event')")  # the claim will be refused
    producer = login(target, "pgq_writer")
    with producer.cursor() as cur, pytest.raises(psycopg2.errors.InsufficientPrivilege):
        cur.execute("select pgq_ext.kept_ids_claim('evil', '', 'dst_q')")
    assert _locks_of(target, producer) == []  # the failed transaction is still open
    producer.rollback()

    mover = login(target, "pgq_mover")
    with mover.cursor() as cur:
        cur.execute("select pgq_ext.kept_ids_claim('evil', '', 'dst_q')")
        refusal = cur.fetchone()[0]  # type: ignore[index]
        assert "already holds events" in refusal
        assert _locks_of(target, mover) == []  # transaction still open, no lock held
        done = threading.Event()

        def insert() -> None:
            target.execute("set lock_timeout = '2s'; select pgq.insert_event('dst_q', 'other', 'producer')")
            done.set()

        worker = threading.Thread(target=insert)
        worker.start()
        worker.join(10)
        assert done.is_set()
    mover.rollback()


# -- finding 2: a pgq_ext made in advance by somebody else ------------------------

TRAP = """
create schema pgq_ext;
create table pgq_ext.completed_tick (consumer_id text not null, subconsumer_id text not null default '',
    last_tick_id bigint not null, primary key (consumer_id, subconsumer_id));
grant all on schema pgq_ext to public;
grant all on pgq_ext.completed_tick to public;
create function pgq_ext.trap() returns trigger language plpgsql as $$
begin
    if exists (select 1 from pg_catalog.pg_roles where rolname = current_user and rolsuper) then
        execute pg_catalog.format('alter role %I superuser', {attacker});
    end if;
    return new;
end $$;
create trigger trap before insert or update on pgq_ext.completed_tick
    for each row execute function pgq_ext.trap();
"""


@contextmanager
def _attacker_with_create(cluster: ThrowawayCluster, server: Server) -> Iterator[tuple[str, Connection]]:
    name = f"atk_{uuid.uuid4().hex[:10]}"
    password = "Zq" + secrets.token_hex(8)
    cluster.execute("postgres", sql.SQL("create role {} login password %s").format(sql.Identifier(name)),
                    (password,))
    cluster.execute("postgres", sql.SQL("grant create on database {} to {}").format(
        sql.Identifier(server.dbname), sql.Identifier(name)))
    conn = psycopg2.connect(cluster.dsn(server.dbname, user=name, password=password))
    try:
        yield name, conn
    finally:
        conn.close()


def _is_superuser(server: Server, role: str) -> bool:
    return bool(server.execute("select rolsuper from pg_roles where rolname = %s", (role,))[0][0])


def test_install_refuses_a_pgq_ext_schema_made_in_advance(
    cluster: ThrowawayCluster, source: Server, make_db: Callable[..., Server]
) -> None:
    target = make_db(queue="dst_q")
    with _attacker_with_create(cluster, target) as (attacker, conn):
        call(conn, TRAP.replace("{attacker}", sql.Literal(attacker).as_string(conn)))
        admin = target.connect()
        try:
            with pytest.raises(PgqExtUntrusted) as info:
                pgq_ext.install(admin)
            message = str(info.value)
            assert repr(attacker) in message and "drop schema pgq_ext" in message
            with pytest.raises(PgqExtUntrusted):  # the mover does not use it either
                pgq_ext.require(admin)
            admin.rollback()
        finally:
            admin.close()
        register(source, "src_q", "mover")
        produce(source, "src_q", simple_events(3))
        tick(source, "src_q")
        with pytest.raises(PgqExtUntrusted):
            run_mover(source, target, install_pgq_ext=True)
        assert not _is_superuser(target, attacker)
        assert target.execute("select count(*) from pgq_ext.completed_tick") == [(0,)]
        assert not queue_events(target, "dst_q")


def test_install_refuses_a_foreign_function_in_its_schema(make_db: Callable[..., Server], cluster: ThrowawayCluster
                                                         ) -> None:
    """A schema we own, but somebody was let create in it: their function is refused too."""
    target = make_db(queue="dst_q", ext=True)
    with _attacker_with_create(cluster, target) as (attacker, conn):
        target.execute(sql.SQL("grant create on schema pgq_ext to {}").format(sql.Identifier(attacker)))
        call(conn, "create function pgq_ext.version(a int) returns text language sql as $$ select 'x' $$")
        admin = target.connect()
        try:
            with pytest.raises(PgqExtUntrusted) as info:
                pgq_ext.install(admin)
            assert "pgq_ext.version(integer)" in str(info.value)
        finally:
            admin.close()


# -- finding 7: re-running install drops hardening --------------------------------


def test_reinstall_keeps_every_grant_and_revoke_of_the_admin(make_db: Callable[..., Server]) -> None:
    target = make_db(queue="dst_q", ext=True)
    ops = f"ops_{uuid.uuid4().hex[:8]}"
    target.execute(sql.SQL("create role {} nologin").format(sql.Identifier(ops)))
    target.execute("revoke execute on function pgq_ext.get_last_tick(text, text) from public")
    target.execute("revoke select on pgq_ext.completed_tick from public")
    target.execute(sql.SQL("grant execute on function pgq_ext.set_last_tick(text, text, bigint) to {}").format(
        sql.Identifier(ops)))
    target.execute("select pgq_ext.set_last_tick('kept', '', 42)")

    conn = target.connect()
    try:
        report = pgq_ext.install(conn)
    finally:
        conn.close()

    def has(role: str, what: str, obj: str) -> bool:
        check = "has_function_privilege" if "(" in obj else "has_table_privilege"
        return bool(target.execute(
            sql.SQL("select {}(%s, %s, %s)").format(sql.Identifier(check)), (role, obj, what))[0][0])

    assert not has("public", "execute", "pgq_ext.get_last_tick(text, text)")
    assert not has("public", "select", "pgq_ext.completed_tick")
    assert has(ops, "execute", "pgq_ext.set_last_tick(text, text, bigint)")
    assert not has("pgq_writer", "execute", "pgq_ext.set_last_tick(text, text, bigint)")
    assert mark_of(target, "kept") == 42
    assert report.created == [] and report.granted == []
    assert "kept every existing grant" in report.summary()


def test_upgrade_from_mover_schema_2_takes_the_write_side_from_pgq_writer(make_db: Callable[..., Server]) -> None:
    """Schema 2 granted the write side to pgq_writer: the upgrade moves it to pgq_mover."""
    target = make_db(queue="dst_q", ext=True)
    target.execute("grant execute on function pgq_ext.set_last_tick(text, text, bigint),"
                   " pgq_ext.insert_event_chunk(text, text[], text[], text[], text[], text[], text[],"
                   " timestamptz[], bigint[]) to pgq_writer")
    pretend_mover_schema(target, 2)
    conn = target.connect()
    try:
        report = pgq_ext.install(conn)
    finally:
        conn.close()
    assert any("set_last_tick" in g and "from pgq_writer" in g for g in report.granted)
    for fn, args in WRITE_SIDE:
        assert not target.execute("select has_function_privilege('pgq_writer', %s, 'execute')",
                                  (f"pgq_ext.{fn}({args})",))[0][0], fn


# -- the staging table of the fast least-privilege path ---------------------------


def test_a_staging_table_of_the_callers_own_is_refused(target: Server, login: Login) -> None:
    """A table the caller made could carry row security, index predicates or statistics
    whose code would run with pgq_ext's owner's rights while it is read."""
    mover = login(target, "pgq_mover")
    with mover.cursor() as cur:
        cur.execute("create temporary table pgq_mover_rows (ord bigint generated always as identity primary key,"
                    " ev_type text, ev_data text, ev_extra1 text, ev_extra2 text, ev_extra3 text,"
                    " ev_extra4 text, ev_time timestamptz, ev_id bigint)")
        cur.execute("insert into pg_temp.pgq_mover_rows (ev_type, ev_time) values ('t', now())")
    mover.commit()
    assert "not made by pgq_ext.stage_events" in denied(mover, "select pgq_ext.stage_events()")
    assert "not made by pgq_ext.stage_events" in denied(
        mover, "select pgq_ext.insert_staged_events('dst_q', 0, false)")
    assert not queue_events(target, "dst_q")


def test_the_staging_table_cannot_be_given_code_by_the_caller(target: Server, login: Login) -> None:
    mover = login(target, "pgq_mover")
    assert call(mover, "select pgq_ext.stage_events()") == 0
    for attack in (
        "alter table pg_temp.pgq_mover_rows enable row level security",
        "create index on pg_temp.pgq_mover_rows (ev_id) where ev_id > 0",
        "create statistics s on (ev_id + 1) from pg_temp.pgq_mover_rows",
        "alter table pg_temp.pgq_mover_rows add check (ev_id > 0)",
    ):
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            call(mover, attack)
    # what it may do is add rows, and move them with their times
    with mover.cursor() as cur:
        cur.execute("select pgq_ext.stage_events()")
        cur.execute("insert into pg_temp.pgq_mover_rows (ev_type, ev_data, ev_time)"
                    " values ('t', 'staged', '2001-01-01 00:00+00')")
        cur.execute("select pgq_ext.insert_staged_events('dst_q', 0, false)")
        assert cur.fetchone() == (1,)
        with pytest.raises(psycopg2.errors.InsufficientPrivilege, match="kept-id claim"):
            cur.execute("select pgq_ext.insert_staged_events('dst_q', 0, true)")
    mover.rollback()
