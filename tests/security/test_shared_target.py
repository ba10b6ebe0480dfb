"""A central target shared by many teams (issue 21), attacked for real.

Two teams move their own source queue into one target queue, each with least-privilege
logins the test creates: a source login in pgq_reader and a target login in pgq_mover
(no pgq_admin). Team B attacks team A's tracking key; a login with no PgQ role at all
tries to stall team A's mover. After each attack both teams move on, and the target
holds every event of each team exactly once; no attacker became superuser and a
producer was never blocked.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psycopg2
import pytest
from psycopg2.extensions import connection as Connection

from airflow_provider_pgq.core import pgq_ext
from airflow_provider_pgq.core.connect import connect
from airflow_provider_pgq.core.errors import KeyLocked, PgqError
from airflow_provider_pgq.core.guard import Timeouts
from airflow_provider_pgq.core.mover import MoveReport, MoverOptions, QueueMover
from tests.helpers import (
    Login,
    Server,
    create_login,
    create_queue,
    mark_of,
    pretend_mover_schema,
    produce,
    queue_events,
    register,
    simple_events,
    tick,
)
from tests.security.attacker import call, denied
from tests.support.cluster import ThrowawayCluster

#: Short lock waits: a stalled mover shows within a second.
TIMEOUTS = Timeouts(connect_timeout=5, network_timeout=10, statement_timeout=20, lock_timeout=1)


@dataclass
class Team:
    name: str
    consumer: str
    source: Server
    reader: Login  # source login: pgq_reader only
    mover: Login  # target login: pgq_mover only
    produced: int = 0

    def produce(self, n: int) -> int:
        """n more events on the team's source queue, and a tick."""
        produce(self.source, "src_q", simple_events(n, start=self.produced, prefix=self.name))
        self.produced += n
        return tick(self.source, "src_q")

    def move(self, target: Server, target_queue: str = "dst_q", **options: object) -> MoveReport:
        s = connect(self.reader.dsn(self.source), application_name=f"team-{self.name}", timeouts=TIMEOUTS,
                    side="source")
        t = connect(self.mover.dsn(target), application_name=f"team-{self.name}", timeouts=TIMEOUTS,
                    side="target")
        try:
            opts = MoverOptions("src_q", target_queue, self.consumer, **options)  # type: ignore[arg-type]
            return QueueMover(s, t, opts).drain()
        finally:
            s.close()
            t.close()

    def session(self, target: Server) -> Connection:
        """A plain session of the team's target login (what a hostile member would use)."""
        return self.mover.raw(target)


@pytest.fixture
def teams(cluster: ThrowawayCluster, make_db: Callable[..., Server], target: Server) -> Iterator[tuple[Team, Team]]:
    made = []
    for name, consumer in (("a", "m1"), ("b", "m2")):
        source = make_db(queue="src_q")
        register(source, "src_q", consumer)
        team = Team(name, consumer, source, create_login(cluster, f"reader_{name}", in_role="pgq_reader"),
                    create_login(cluster, f"mover_{name}", in_role="pgq_mover"))
        made.append(team)
    a, b = made
    yield a, b


@pytest.fixture
def nobody(cluster: ThrowawayCluster) -> Login:
    """A login with no PgQ role at all."""
    return create_login(cluster, "nobody")


def team_events(target: Server, team: Team, queue: str = "dst_q") -> Counter[tuple[object, ...]]:
    return Counter({ev: n for ev, n in queue_events(target, queue).items() if str(ev[0]).startswith(f"{team.name}.")})


def assert_each_event_once(target: Server, *teams: Team, queue: str = "dst_q") -> None:
    for team in teams:
        assert team_events(target, team, queue) == queue_events(team.source, "src_q"), team.name
        assert sum(team_events(target, team, queue).values()) == team.produced, team.name


def assert_nobody_superuser(target: Server, *logins: Login) -> None:
    for login in logins:
        assert target.execute("select rolsuper from pg_roles where rolname = %s", (login.name,)) == [(False,)]


def assert_producer_not_blocked(cluster: ThrowawayCluster, target: Server, queue: str = "dst_q") -> None:
    producer = create_login(cluster, "producer", in_role="pgq_writer")
    conn = producer.raw(target)
    try:
        with conn.cursor() as cur:
            cur.execute("set statement_timeout = '3s'")
            cur.execute("select pgq.insert_event(%s, 'producer.type', 'still writes')", (queue,))
            assert cur.fetchone()[0] > 0  # type: ignore[index]
        conn.rollback()  # the teams' counts stay exact
    finally:
        conn.close()


# -- item 1: any pgq_mover member acted on every key ----------------------------------------


def test_another_team_cannot_move_clear_bind_or_unbind_a_key(
    cluster: ThrowawayCluster, target: Server, teams: tuple[Team, Team]
) -> None:
    """Team B's login, a pgq_mover member as A's, moves A's mark to the end of A's next
    batch (the review's attack: A's next run took it for applied and it never reached the
    target), clears it, unbinds and rebinds A's key: each is refused, naming A's role."""
    a, b = teams
    a.produce(5)
    b.produce(4)
    assert a.move(target).events == 5
    assert b.move(target).events == 4
    mark = mark_of(target, a.consumer)
    assert mark is not None
    next_tick = a.produce(6)  # A's next batch is ticks mark..next_tick

    attacker = b.session(target)
    try:
        for query, params in (
            ("select pgq_ext.set_last_tick('m1', '', %s)", (next_tick,)),
            ("select pgq_ext.set_last_tick('m1', %s)", (next_tick,)),
            ("select pgq_ext.set_last_tick('m1', '', null)", ()),
            ("select pgq_ext.unbind_source('m1', '')", ()),
            ("select pgq_ext.bind_source('m1', '', 'sys', 'db', 'q')", ()),
            ("select pgq_ext.set_batch_done('m1', '', 99)", ()),
            ("select pgq_ext.set_event_done('m1', '', 99, 1)", ()),
            ("select * from pgq_ext.begin_batch('m1', '', 'sys', 'db', 'q')", ()),
            ("select pgq_ext.lock_key('m1', '')", ()),
            # a new subconsumer of A's consumer name would share A's bind lock
            ("select pgq_ext.set_last_tick('m1', 'mine', 1)", ()),
        ):
            message = denied(attacker, query, params)
            assert "m1" in message and a.mover.name in message, (query, message)
        # B's own key is B's to write
        assert call(attacker, "select pgq_ext.set_last_tick('m2', '', %s)", (mark_of(target, "m2"),)) == 1
    finally:
        attacker.close()
    assert mark_of(target, a.consumer) == mark

    # B's mover configured with A's consumer name is refused before anything is taken
    from airflow_provider_pgq.core.errors import KeyNotOwned  # new with owned keys

    with pytest.raises(KeyNotOwned) as info:
        Team(b.name, a.consumer, b.source, b.reader, b.mover).move(target)
    assert a.mover.name in str(info.value) and b.mover.name in str(info.value) and "assign_key" in str(info.value)

    b.produce(3)
    assert a.move(target).events == 6
    assert b.move(target).events == 3
    assert_each_event_once(target, a, b)
    assert_nobody_superuser(target, a.mover, b.mover)
    assert_producer_not_blocked(cluster, target)


def test_another_team_cannot_poison_or_release_a_queues_kept_ids(
    cluster: ThrowawayCluster, target: Server, teams: tuple[Team, Team]
) -> None:
    """B claims an empty queue of A's for kept ids with B's own key and moves its id
    sequence to the end (every later insert_event into it failed for good); B releases
    and takes over the kept-id claim of A's queue. Each refused; A's kept ids go on."""
    a, b = teams
    for queue in ("a_plain", "a_kept"):
        create_queue(target, queue)
    a.produce(5)
    assert a.move(target, target_queue="a_kept", keep_event_id=True).events == 5

    attacker = b.session(target)
    try:
        with attacker.cursor() as cur:
            cur.execute("select pgq_ext.kept_ids_claim('m2', '', 'a_plain')")
            with pytest.raises(psycopg2.errors.InsufficientPrivilege) as info:
                cur.execute("select pgq_ext.kept_ids_commit('m2', '', 'a_plain', 9223372036854775807)")
        attacker.rollback()
        assert "a_plain" in str(info.value) and "9223372036854775807" in str(info.value)
        message = denied(attacker, "select pgq_ext.kept_ids_release('a_kept')")
        assert "a_kept" in message and a.mover.name in message
        message = denied(attacker, "select pgq_ext.kept_ids_claim('m1', '', 'a_kept')")
        assert a.mover.name in message
    finally:
        attacker.close()
    assert target.execute("select count(*) from pgq_ext.kept_event_ids where target_queue = 'a_kept'") == [(1,)]
    assert target.execute("select pgq.insert_event('a_plain', 'local', 'still works')")[0][0] < 2**40

    a.produce(4)
    assert a.move(target, target_queue="a_kept", keep_event_id=True).events == 4
    assert queue_events(target, "a_kept", with_ids=True) == queue_events(a.source, "src_q", with_ids=True)
    assert_nobody_superuser(target, a.mover, b.mover)
    assert_producer_not_blocked(cluster, target, "a_plain")


def test_an_admin_assigns_a_classic_mark_which_stays_writable_until_then(
    target: Server, teams: tuple[Team, Team]
) -> None:
    """Marks that install took over (here: rows of a classic consumer) have no owner: any
    pgq_mover member may write them, as before the upgrade, until an admin assigns them."""
    a, b = teams
    target.execute("insert into pgq_ext.completed_tick (consumer_id, subconsumer_id, last_tick_id)"
                   " values ('classic_c', '', 5)")
    conn = target.connect()
    try:
        pgq_ext.install(conn)
    finally:
        conn.close()
    attacker = b.session(target)
    owner = a.session(target)
    try:
        assert call(attacker, "select pgq_ext.set_last_tick('classic_c', '', 6)") == 1  # as today
        assert target.execute("select owner_role from pgq_ext.tracking_key where consumer_id = 'classic_c'") == [
            (None,)]
        # only an admin assigns: neither team may take the key for itself
        denied(owner, "select pgq_ext.assign_key('classic_c', '', %s)", (a.mover.name,))
        target.execute("select pgq_ext.assign_key('classic_c', '', %s)", (a.mover.name,))
        assert a.mover.name in denied(attacker, "select pgq_ext.set_last_tick('classic_c', '', 7)")
        assert call(owner, "select pgq_ext.set_last_tick('classic_c', '', 7)") == 1
    finally:
        attacker.close()
        owner.close()
    assert mark_of(target, "classic_c") == 7


# -- item 2: any login stalled any mover -----------------------------------------------------


def test_a_login_without_pgq_roles_cannot_stall_a_mover(
    cluster: ThrowawayCluster, target: Server, teams: tuple[Team, Team], nobody: Login
) -> None:
    """The tracking key's lock was an advisory lock derived from the consumer name: a
    login with no PgQ role held it (and the bind lock) and every run of m1 failed with
    KeyLocked after lock_timeout. Now the lock is a row of pgq_ext nobody else may lock."""
    a, b = teams
    a.produce(5)
    assert a.move(target).events == 5
    attacker = nobody.raw(target)
    member = b.session(target)
    try:
        with attacker.cursor() as cur:
            cur.execute("select pg_advisory_lock(hashtextextended(concat('pgq_ext:', 'm1', chr(1), ''), 0))")
            cur.execute("select pg_advisory_lock(hashtextextended('pgq_ext bind:' || 'm1', 0))")
        attacker.commit()  # session-level advisory locks stay
        a.produce(3)
        assert a.move(target).events == 3  # not KeyLocked

        for attack in (
            "select 1 from pgq_ext.tracking_key for update",
            "select 1 from pgq_ext.tracking_key for key share",
            "lock table pgq_ext.tracking_key in share mode",
            "select 1 from pgq_ext.tracking_consumer for share",
            "lock table pgq_ext.tracking_consumer in exclusive mode",
        ):
            denied(attacker, attack)
        with attacker.cursor() as cur:  # what it may do, reading the keys, blocks nothing
            cur.execute("lock table pgq_ext.tracking_key, pgq_ext.tracking_consumer in access share mode")
        # neither may another team's member lock A's key through pgq_ext
        for attack in ("select pgq_ext.lock_key('m1', '')",
                       "select * from pgq_ext.begin_batch('m1', '', 'x', 'y', 'z')"):
            denied(member, attack)
        with member.cursor() as cur:
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                cur.execute("select pgq_ext.lock_key('m1', '')")
            # refused before any lock: the failed transaction holds none on pgq_ext's rows
            assert target.execute("select count(*) from pg_locks where pid = %s and locktype <> 'virtualxid'"
                                  " and not (locktype = 'relation' and mode = 'AccessShareLock')",
                                  (member.get_backend_pid(),)) == [(0,)]
        member.rollback()

        a.produce(4)
        assert a.move(target).events == 4
    finally:
        attacker.close()
        member.close()
    assert_each_event_once(target, a)
    assert_nobody_superuser(target, nobody, b.mover)
    assert_producer_not_blocked(cluster, target)


def test_key_locked_names_the_holding_role_and_pid(target: Server, teams: tuple[Team, Team]) -> None:
    a, _ = teams
    a.produce(5)
    holder = connect(a.mover.dsn(target), application_name="a-holder")
    try:
        pgq_ext.lock_key(holder, a.consumer, "")
        with pytest.raises(KeyLocked) as info:
            a.move(target)
        message = str(info.value)
        pid = holder.get_backend_pid()
        assert info.value.holder_pid == pid
        assert f"pg_terminate_backend({pid})" in message
        assert f"role {a.mover.name!r}" in message and "'a-holder'" in message, message
    finally:
        holder.rollback()
        holder.close()
    assert a.move(target).events == 5
    assert_each_event_once(target, a)


def test_a_held_bind_lock_is_named_not_called_let_go(target: Server, teams: tuple[Team, Team]) -> None:
    """Another key of the same consumer holds the consumer's bind lock (a second source
    being bound): the mover's KeyLocked names that session, the bind lock and its role,
    where it said 'its holder has let go since' while the lock was still held."""
    a, _ = teams
    a.produce(5)
    holder = connect(a.mover.dsn(target), application_name="a-binder")
    try:
        assert pgq_ext.bind_source(holder, a.consumer, "second", "sys", "db", "other_q") is None
        with pytest.raises(KeyLocked) as info:
            a.move(target)
        message = str(info.value)
        pid = holder.get_backend_pid()
        assert "let go" not in message, message
        assert info.value.holder_pid == pid and f"pg_terminate_backend({pid})" in message
        assert "bind" in message and f"role {a.mover.name!r}" in message, message
    finally:
        holder.rollback()
        holder.close()
    assert a.move(target).events == 5
    assert_each_event_once(target, a)


# -- item 3: locks on PgQ's event tables through a PUBLIC function ---------------------------


def _event_table_locks(target: Server, conn: Connection) -> list[tuple[object, ...]]:
    return target.execute(
        "select l.relation::regclass::text, l.mode from pg_locks l join pg_class c on c.oid = l.relation"
        " where l.pid = %s and l.locktype = 'relation' and c.relnamespace = 'pgq'::regnamespace"
        " and c.relkind = 'r' and c.relname ~ '^event_'", (conn.get_backend_pid(),))


def test_a_login_without_pgq_roles_cannot_lock_event_tables_through_pgq_ext(
    cluster: ThrowawayCluster, target: Server, nobody: Login
) -> None:
    """kept_ids_refusal, open to PUBLIC, read the queue's event tables: a login with no
    PgQ role held ACCESS SHARE on all of them for as long as it liked (PgQ then skips
    their rotation). No function of pgq_ext that PUBLIC may call touches them now."""
    conn = nobody.raw(target)
    try:
        with conn.cursor() as cur:
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                cur.execute("select pgq_ext.kept_ids_refusal('x', '', 'dst_q')")
            assert _event_table_locks(target, conn) == []
        conn.rollback()
        with conn.cursor() as cur:  # what stays open to all reads no event table
            cur.execute("select pgq_ext.kept_ids_seq_position('dst_q'), pgq_ext.get_last_tick('x', '')")
            assert _event_table_locks(target, conn) == []
        conn.rollback()
    finally:
        conn.close()
    assert_producer_not_blocked(cluster, target)


# -- item 5: names read from pgq.queue -------------------------------------------------------

EVIL = """
create schema {schema};
create function {schema}.evil() returns boolean language plpgsql as $$
begin
    if exists (select 1 from pg_catalog.pg_roles where rolname = current_user and rolsuper) then
        execute pg_catalog.format('alter role %I superuser', {attacker});
    end if;
    return true;
end $$;
create view {schema}.ev as select 1::bigint as ev_id, 1::bigint as ev_txid where {schema}.evil();
create view {schema}.ev_0 as select * from {schema}.ev;
create view {schema}.seq as select 1::bigint as last_value, true as is_called where {schema}.evil();
grant usage on schema {schema} to public;
grant select on {schema}.ev, {schema}.ev_0, {schema}.seq to public;
"""


def test_names_in_pgq_queue_are_resolved_to_pgq_own_relations(
    cluster: ThrowawayCluster, target: Server, teams: tuple[Team, Team], nobody: Login
) -> None:
    """A pgq_admin member points a queue's table prefix and id sequence at views of its
    own whose function makes it superuser when a superuser reads them; pgq_ext's
    functions ran SQL on those names as their owner (a login with no PgQ role triggered
    it through the PUBLIC readers). They refuse such names now, before reading."""
    from psycopg2 import sql

    a, b = teams
    create_queue(target, "victim_q")
    admin = create_login(cluster, "qadmin", in_role="pgq_admin")
    cluster.execute("postgres", sql.SQL("grant create on database {} to {}").format(
        sql.Identifier(target.dbname), sql.Identifier(admin.name)))
    schema = f"s_{admin.name}"
    conn = admin.raw(target)
    try:
        call(conn, EVIL.format(schema=schema, attacker=sql.Literal(admin.name).as_string(conn)))
        call(conn, "update pgq.queue set queue_data_pfx = %s, queue_event_seq = %s where queue_name = 'victim_q'",
             (f"{schema}.ev", f"{schema}.seq"))
    finally:
        conn.close()
    caller = nobody.raw(target)
    member = b.session(target)
    try:
        for session, query in (
            (caller, "select pgq_ext.kept_ids_seq_position('victim_q')"),
            (member, "select pgq_ext.kept_ids_seq_position('victim_q')"),
            (member, "select pgq_ext.kept_ids_refusal('m2', '', 'victim_q')"),
            (member, "select pgq_ext.kept_ids_claim('m2', '', 'victim_q')"),
            (member, "select pgq_ext.insert_event_chunk('victim_q', array['t'], array['d'], array[null]::text[],"
                     " array[null]::text[], array[null]::text[], array[null]::text[], array[now()], null)"),
        ):
            try:
                with pytest.raises(psycopg2.errors.InsufficientPrivilege) as info:
                    call(session, query)
            finally:
                assert not _is_superuser(target, admin.name), query
            assert "'victim_q'" in str(info.value) and "PgQ's own relations" in str(info.value), (query, info.value)
        try:
            call(caller, "select pgq_ext.kept_ids_refusal('x', '', 'victim_q')")
        except psycopg2.errors.InsufficientPrivilege:
            pass
        assert not _is_superuser(target, admin.name)
    finally:
        caller.close()
        member.close()
    assert_nobody_superuser(target, admin, nobody, b.mover)


def _is_superuser(server: Server, role: str) -> bool:
    return bool(server.execute("select rolsuper from pg_roles where rolname = %s", (role,))[0][0])


# -- item 4: code of an event table's owner ran as pgq_ext's owner ---------------------------

TRIGGER = """
create function {fn}() returns trigger language plpgsql as $$
begin
    if exists (select 1 from pg_catalog.pg_roles where rolname = current_user and rolsuper) then
        execute pg_catalog.format('alter role %I superuser', {attacker});
    end if;
    return new;
end $$;
"""


def _event_tables(target: Server, queue: str) -> list[str]:
    return [r[0] for r in target.execute(
        "select c.oid::regclass::text from pg_class c join pgq.queue q on c.oid = q.queue_data_pfx::regclass"
        " or c.oid in (select inhrelid from pg_inherits where inhparent = q.queue_data_pfx::regclass)"
        " where q.queue_name = %s order by 1", (queue,))]


@pytest.mark.parametrize("path", ["staged", "copy"])
def test_event_tables_with_a_foreign_owner_or_trigger_are_not_written(
    cluster: ThrowawayCluster, target: Server, teams: tuple[Team, Team], path: str
) -> None:
    """The target queue's event tables given to an ordinary role (ALTER TABLE ... OWNER):
    its trigger ran as the installing superuser on the staged path and made it superuser.
    A trigger on PgQ's own event tables by a role granted TRIGGER, the same. Both are
    refused with one error naming the queue and the table, nothing written; on the COPY
    path too (a mover with pgq_admin), where the trigger would run as the mover."""
    from psycopg2 import sql

    a, b = teams
    if path == "copy":
        cluster.execute("postgres", sql.SQL("grant pgq_admin to {}").format(sql.Identifier(a.mover.name)))
    for queue, kind in (("owned_q", "owner"), ("trig_q", "trigger")):
        create_queue(target, queue)
        role = create_login(cluster, f"q{kind}")
        fn = f"public.f_{role.name}"
        target.execute(sql.SQL("grant create on schema public to {}").format(sql.Identifier(role.name)))
        for table in _event_tables(target, queue):
            if kind == "owner":
                target.execute(sql.SQL("alter table {} owner to {}").format(sql.SQL(table), sql.Identifier(role.name)))
            else:
                target.execute(sql.SQL("grant trigger on {} to {}").format(sql.SQL(table), sql.Identifier(role.name)))
        conn = role.raw(target)
        try:
            call(conn, TRIGGER.format(fn=fn, attacker=sql.Literal(role.name).as_string(conn)))
            for table in _event_tables(target, queue):
                call(conn, f"create trigger t before insert on {table} for each row execute function {fn}()")
        finally:
            conn.close()
        before = queue_events(a.source, "src_q")
        a.produce(3)
        refused: Exception | None = None
        try:
            a.move(target, target_queue=queue)
        except (psycopg2.Error, PgqError) as exc:
            refused = exc
        assert not _is_superuser(target, role.name), f"{kind}: the role's trigger ran as a superuser"
        assert refused is not None, f"{kind}: written into event tables PgQ did not make so"
        message = str(refused)
        assert queue in message and ("triggers" in message or role.name in message), message
        assert not queue_events(target, queue)
        # the batch stays on the source: it moves once the queue is PgQ's own again
        target.execute("select pgq.drop_queue(%s, true)", (queue,))
        create_queue(target, queue)
        assert a.move(target, target_queue=queue).events == 3
        assert queue_events(target, queue) == queue_events(a.source, "src_q") - before
    assert_producer_not_blocked(cluster, target)


# -- upgrading an installation of mover schema 4 in place -------------------------------------


def test_upgrade_to_owned_keys_keeps_marks_and_grants_and_leaves_old_keys_unowned(
    make_db: Callable[..., Server], cluster: ThrowawayCluster
) -> None:
    """An installation of mover schema 4 (no owners, kept_ids_refusal open to PUBLIC),
    re-installed: its marks and an admin's grants stay, its keys are unowned (writable
    as before until an admin assigns them), kept_ids_refusal goes to pgq_mover, and a
    new key is its first writer's."""
    from psycopg2 import sql

    target = make_db(queue="dst_q", ext=True)
    ops = create_login(cluster, "ops")
    target.execute("select pgq_ext.set_last_tick('old_a', '', 11), pgq_ext.set_last_tick('old_b', 'x', 12)")
    # what schema 4 had: no owners (its tables did not exist), the reader open to all
    target.execute("drop table pgq_ext.tracking_key, pgq_ext.tracking_consumer")
    target.execute("grant execute on function pgq_ext.kept_ids_refusal(text, text, text) to public")
    target.execute(sql.SQL("grant execute on function pgq_ext.unbind_source(text, text) to {}").format(
        sql.Identifier(ops.name)))
    pretend_mover_schema(target, 4)
    conn = target.connect()
    try:
        report = pgq_ext.install(conn)
    finally:
        conn.close()
    assert any("kept_ids_refusal" in g and "from public" in g for g in report.granted), report.granted
    assert target.execute("select pgq_ext.mover_schema_version()") == [(pgq_ext.REQUIRED_MOVER_SCHEMA,)]
    assert target.execute("select consumer_id, subconsumer_id, owner_role from pgq_ext.tracking_key"
                          " order by 1") == [("old_a", "", None), ("old_b", "x", None)]
    assert (mark_of(target, "old_a"), mark_of(target, "old_b", "x")) == (11, 12)
    assert target.execute("select has_function_privilege('public', 'pgq_ext.kept_ids_refusal(text, text, text)',"
                          " 'execute'), has_function_privilege('pgq_mover',"
                          " 'pgq_ext.kept_ids_refusal(text, text, text)', 'execute'),"
                          " has_function_privilege(%s, 'pgq_ext.unbind_source(text, text)', 'execute')",
                          (ops.name,)) == [(False, True, True)]
    mover = create_login(cluster, "upgraded", in_role="pgq_mover")
    session = mover.raw(target)
    try:
        assert call(session, "select pgq_ext.set_last_tick('old_a', '', 13)") == 1  # unowned: as before
        assert call(session, "select pgq_ext.set_last_tick('new_key', '', 1)") == 1
    finally:
        session.close()
    assert target.execute("select pg_get_userbyid(owner_role) from pgq_ext.tracking_key"
                          " where consumer_id = 'new_key'") == [(mover.name,)]


def test_a_login_without_pgq_roles_cannot_stall_kept_id_batches(
    target: Server, teams: tuple[Team, Team], nobody: Login
) -> None:
    """kept_ids_claim serialized the kept-id writers of a queue with an advisory lock
    derived from the queue's name, which any login may take and hold."""
    a, _ = teams
    create_queue(target, "a_kept")
    attacker = nobody.raw(target)
    try:
        with attacker.cursor() as cur:
            cur.execute("select pg_advisory_lock(hashtextextended('pgq_ext kept ids:' || 'a_kept', 0))")
        attacker.commit()
        a.produce(4)
        assert a.move(target, target_queue="a_kept", keep_event_id=True).events == 4
    finally:
        attacker.close()
    assert queue_events(target, "a_kept", with_ids=True) == queue_events(a.source, "src_q", with_ids=True)


def test_the_audit_queries_of_the_docs_run_and_find_nothing_wrong(target: Server, teams: tuple[Team, Team]) -> None:
    """Every query of docs/security.md's Audit section runs on an installation in use;
    those that list what should not exist list nothing, and PUBLIC may call only readers."""
    import re

    from tests.helpers import ROOT

    a, b = teams
    a.produce(2)
    b.produce(2)
    a.move(target)
    b.move(target)
    text = (ROOT / "docs" / "security.md").read_text()
    block = re.search(r"## Audit\n\n```sql\n(.*?)```", text, re.S)
    assert block is not None
    queries = [q.strip() for q in block.group(1).split(";\n") if q.strip()]
    results = {}
    for query in queries:
        lines = [line for line in query.splitlines() if not line.startswith("--")]
        comments = [line for line in query.splitlines() if line.startswith("--")]
        results[" ".join(comments) or lines[0]] = target.execute("\n".join(lines))
    assert len(results) >= 12, list(results)
    should_be_none = {k: v for k, v in results.items() if "should be none" in k or "only an admin" in k}
    assert len(should_be_none) == 3 and all(v == [] for v in should_be_none.values()), should_be_none
    public = next(v for k, v in results.items() if "PUBLIC may call" in k)
    assert {str(r[0]).split("(")[0] for r in public} == {
        "pgq_ext.get_last_tick", "pgq_ext.is_batch_done", "pgq_ext.is_event_done", "pgq_ext.version",
        "pgq_ext.mover_schema_version", "pgq_ext.kept_ids_seq_position"}
    owners = next(v for k, v in results.items() if "tracking key and its owner" in k)
    assert {(r[0], r[2]) for r in owners} == {("m1", a.mover.name), ("m2", b.mover.name)}
    lockers = next(v for k, v in results.items() if "lock the key rows directly" in k)
    assert all(r[0] == "pg_write_all_data" or target.execute(
        "select rolsuper from pg_roles where rolname = %s", (r[0],))[0][0] for r in lockers), lockers


def test_a_mover_of_an_unowned_key_says_so_and_how_to_assign_it(
    target: Server, teams: tuple[Team, Team], caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    a, _ = teams
    a.produce(3)
    assert a.move(target).events == 3
    target.execute("update pgq_ext.tracking_key set owner_role = null where consumer_id = 'm1'")  # as install
    a.produce(2)
    with caplog.at_level(logging.WARNING, logger="airflow_provider_pgq"):
        assert a.move(target).events == 2
    warned = [r.getMessage() for r in caplog.records if "has no owner" in r.getMessage()]
    assert warned and "select pgq_ext.assign_key('m1', '', <role>)" in warned[0], warned
    target.execute("select pgq_ext.assign_key('m1', '', %s)", (a.mover.name,))
    caplog.clear()
    a.produce(1)
    with caplog.at_level(logging.WARNING, logger="airflow_provider_pgq"):
        assert a.move(target).events == 1
    assert not [r for r in caplog.records if "has no owner" in r.getMessage()]
    assert_each_event_once(target, a)
