"""Poison events (issue 24): a SQL_ASCII source holding a Latin-1 byte, a UTF8 target.

The default stops with one line that names the side, the queues, the consumer, the
refused ev_id(s), the batch's ticks and the option; invalid_events = dead_letter moves
the rest of the batch and keeps the refused events, byte for byte, in
pgq_ext.dead_letter on the target, in the batch's transaction; replay puts them into
the target queue once, after they were fixed. Real databases throughout: the source is
created with ENCODING 'SQL_ASCII', the refusal is PostgreSQL's own.
"""

from __future__ import annotations

import datetime as dt
import secrets
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest
from psycopg2 import sql

from airflow_provider_pgq.core import faults, pgq_ext, poison
from airflow_provider_pgq.core.connect import connect
from airflow_provider_pgq.core.errors import InvalidEvents, InvalidParameter, PgqExtMissing
from airflow_provider_pgq.core.mover import CHUNK_PATH, COPY_PATH, MoverOptions
from tests.core.test_transfer import move
from tests.helpers import (
    Server,
    create_login,
    mark_of,
    pretend_mover_schema,
    register,
    spawn_mover,
    tick,
    wait_mover,
)
from tests.security.attacker import call, denied
from tests.support.cluster import ThrowawayCluster, wait_until

UTC = dt.timezone.utc
FIELDS = "ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4"

#: (type, data, extra1..4) as the source stores them, bytes; None is NULL. Two of them
#: hold a byte that is no UTF8 (0xe9, Latin-1's é): one in ev_data, one in ev_extra2.
GOOD_1 = (b"order", b"plain ascii 1", b"public.orders", None, b"", b"x")
POISON_DATA = (b"order", b"caf\xe9 au lait", b"public.orders", b"k=1", None, None)
GOOD_2 = (b"order", b"plain ascii 2", None, None, None, None)
POISON_EXTRA = (b"note", b"fine data", b"public.notes", b"na\xefve", b"e3", b"e4")
GOOD_3 = (b"order", b"plain ascii 3", b"public.orders", b"tab\there", b"back\\slash", b"'quote'")
EVENTS = [GOOD_1, POISON_DATA, GOOD_2, POISON_EXTRA, GOOD_3]
GOOD = [GOOD_1, GOOD_2, GOOD_3]


@pytest.fixture
def make_sql_ascii_db(make_db: Callable[..., Server]) -> Callable[[str], Server]:
    """make_sql_ascii_db(queue) -> a SQL_ASCII database with pgq and the queue."""
    return lambda queue: make_db(queue, encoding="SQL_ASCII")


@pytest.fixture
def sa_source(make_sql_ascii_db: Callable[[str], Server]) -> Server:
    source = make_sql_ascii_db("src_q")
    register(source, "src_q", "mover")
    return source


def produce_raw(server: Server, queue: str, events: list[tuple[bytes | None, ...]]) -> list[int]:
    """Inserts events whose fields are raw bytes (in a SQL_ASCII database a text is its
    bytes: convert_from to SQL_ASCII is none); returns their ev_ids."""
    args = sql.SQL(", ").join(sql.SQL("pg_catalog.convert_from(%s::bytea, 'SQL_ASCII')") for _ in range(6))
    query = sql.SQL("select pgq.insert_event(%s::text, {})").format(args)
    conn = server.connect()
    try:
        ids = []
        with conn.cursor() as cur:
            for ev in events:
                cur.execute(query, (queue, *(None if f is None else psycopg2.Binary(f) for f in ev)))
                ids.append(int(cur.fetchone()[0]))  # type: ignore[index]
        conn.commit()
    finally:
        conn.close()
    return ids


def raw_events(server: Server, queue: str) -> dict[int, tuple[Any, ...]]:
    """ev_id -> (type, data, extra1..4 as bytes, ev_time) of every event of the queue,
    read as bytes in the database's own encoding (never decoded by the client)."""
    table = server.execute("select queue_data_pfx from pgq.queue where queue_name = %s", (queue,))[0][0]
    schema, name = table.split(".")
    cols = sql.SQL(", ").join(
        sql.SQL("pg_catalog.convert_to({}, pg_catalog.getdatabaseencoding())").format(sql.Identifier(c))
        for c in FIELDS.split(", ")
    )
    rows = server.execute(sql.SQL("select ev_id, {}, ev_time from {}").format(cols, sql.Identifier(schema, name)))
    return {int(r[0]): tuple(None if v is None else bytes(v) for v in r[1:7]) + (r[7],) for r in rows}


def target_events(target: Server) -> list[tuple[Any, ...]]:
    """The target queue's events in ev_id order, as bytes (UTF8) and time."""
    return sorted(raw_events(target, "dst_q").items())


def dead_letters(target: Server) -> list[tuple[Any, ...]]:
    rows = target.execute(
        "select ev_id, ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4, ev_time, source_queue,"
        " target_queue, prev_tick_id, cur_tick_id,"
        " source_encoding, error_sqlstate, error_message, replayed_at from pgq_ext.dead_letter order by ev_id"
    )
    return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in rows]


@pytest.fixture
def mover_only(cluster: ThrowawayCluster) -> Iterator[Callable[[Server], str]]:
    """dsn(target) of a new login in pgq_mover only (no pgq_admin): the staged path."""
    made: list[str] = []

    def make(target: Server) -> str:
        login = create_login(cluster, "dl_mover", in_role="pgq_mover")
        made.append(login.name)
        return login.dsn(target)

    yield make
    for name in made:
        wait_until(lambda name=name: not cluster.execute(
            "postgres", "select 1 from pg_stat_activity where usename = %s", (name,)), timeout=10)
        cluster.execute("postgres", sql.SQL("drop role if exists {}").format(sql.Identifier(name)))


def writer_dsn(target: Server, path: str, mover_only: Callable[[Server], str]) -> str:
    """copy: an admin login; staged: pgq_mover only; arrays: pgq_mover only on a target
    where pgq_ext's owner may not make temporary tables (the source renders chunks)."""
    if path == "arrays":
        target.execute(sql.SQL("revoke temporary on database {} from public").format(sql.Identifier(target.dbname)))
    return target.dsn if path == "copy" else mover_only(target)


def batch_of(source: Server) -> tuple[list[int], int, int]:
    """Produces EVENTS in one tick after the consumer's: (their ids, prev tick, cur tick)."""
    prev = source.execute("select sub_last_tick from pgq.subscription s join pgq.consumer c"
                          " on c.co_id = s.sub_consumer where c.co_name = 'mover'")[0][0]
    ids = produce_raw(source, "src_q", EVENTS)
    return ids, int(prev), tick(source, "src_q")


# -- the default: stop, with one line that says everything --------------------------------


@pytest.mark.parametrize("path", ["copy", "staged", "arrays"])
def test_default_stop_names_side_queues_events_ticks_and_option(
    sa_source: Server, target: Server, mover_only: Callable[[Server], str], path: str
) -> None:
    """On main: 'invalid byte sequence for encoding "UTF8": 0xe9', no side, no event."""
    ids, prev, cur = batch_of(sa_source)
    dsn = writer_dsn(target, path, mover_only)
    with pytest.raises(InvalidEvents) as info:
        move(sa_source, dsn)
    message = str(info.value)
    assert "\n" not in message
    # a SQL_ASCII source checks the bytes it sends in the target's encoding: the source
    # raises (on main the error said "target" although the source's server raised it)
    assert message.startswith(f"source database {sa_source.dbname!r} cannot convert into target database")
    assert f'ev_id {ids[1]} (22021: invalid byte sequence for encoding "UTF8": 0xe9' in message
    assert f'ev_id {ids[3]} (22021: invalid byte sequence for encoding "UTF8": 0xef' in message
    assert "encoding (UTF8) 2 event(s)" in message
    assert f"ticks {prev}..{cur}" in message
    assert "'src_q'" in message and "'dst_q'" in message and "consumer 'mover'" in message
    assert f"ev_id {ids[0]} " not in message and f"ev_id {ids[2]} " not in message
    assert "invalid_events = dead_letter" in message
    assert info.value.ev_ids == (ids[1], ids[3]) and info.value.side == "source"
    assert (info.value.prev_tick, info.value.cur_tick) == (prev, cur)
    assert isinstance(info.value.__cause__, psycopg2.errors.CharacterNotInRepertoire)
    # nothing of the batch, no mark, no dead letter: the next run stops the same way
    assert target_events(target) == []
    assert mark_of(target, "mover") is None
    assert target.execute("select count(*) from pgq_ext.dead_letter") == [(0,)]
    with pytest.raises(InvalidEvents):
        move(sa_source, dsn)


# -- dead_letter: the rest moves, the refused events are kept byte for byte ----------------


@pytest.mark.parametrize("path", ["copy", "staged", "arrays"])
def test_dead_letter_moves_the_rest_and_keeps_the_refused_byte_for_byte(
    sa_source: Server, target: Server, mover_only: Callable[[Server], str], path: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ids, prev, cur = batch_of(sa_source)
    source_rows = raw_events(sa_source, "src_q")
    dsn = writer_dsn(target, path, mover_only)
    with caplog.at_level("WARNING", logger="airflow_provider_pgq.core.mover"):
        report = move(sa_source, dsn, invalid_events="dead_letter")
    assert report.write_path == (COPY_PATH if path == "copy" else CHUNK_PATH)
    assert (report.batches, report.events, report.dead_lettered) == (1, 3, 2)
    assert [r.dead_lettered for r in report.batch_results] == [2]
    assert report.to_dict()["dead_lettered"] == 2
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "dead_letter" in r.getMessage()]
    assert len(warned) == 1 and f"ev_id {ids[1]} " in warned[0] and f"ev_id {ids[3]} " in warned[0], warned
    # the good events arrived once, in order, field for field and time for time
    assert [row[:7] for _, row in target_events(target)] == [source_rows[i] for i in (ids[0], ids[2], ids[4])]
    assert mark_of(target, "mover") == cur
    # the refused ones are on the target, byte for byte as the source holds them
    kept = dead_letters(target)
    assert [k[0] for k in kept] == [ids[1], ids[3]]
    for k in kept:
        assert k[1:8] == source_rows[k[0]]
        assert k[8:14] == ("src_q", "dst_q", prev, cur, "SQL_ASCII", "22021")
        assert 'invalid byte sequence for encoding "UTF8"' in k[14] and k[15] is None
    # the batch is finished: nothing more to move, nothing doubled
    again = move(sa_source, dsn, invalid_events="dead_letter")
    assert (again.batches, again.events, again.dead_lettered) == (0, 0, 0)
    assert len(target_events(target)) == 3 and len(dead_letters(target)) == 2


def test_dead_letter_with_only_good_events_costs_nothing_and_writes_none(
    sa_source: Server, target: Server
) -> None:
    produce_raw(sa_source, "src_q", GOOD)
    tick(sa_source, "src_q")
    report = move(sa_source, target.dsn, invalid_events="dead_letter")
    assert (report.events, report.dead_lettered) == (3, 0)
    assert dead_letters(target) == []


def test_dead_letter_with_kept_event_ids_keeps_the_good_ids_and_the_next_batch_moves(
    sa_source: Server, target: Server
) -> None:
    """keep_event_id: the sequence moves past the largest id really written (the
    refused ids are not), so the next batch's kept-id checks still agree."""
    ids, _, _ = batch_of(sa_source)
    report = move(sa_source, target.dsn, invalid_events="dead_letter", keep_event_id=True)
    assert (report.events, report.dead_lettered) == (3, 2)
    assert [i for i, _ in target_events(target)] == [ids[0], ids[2], ids[4]]
    [later] = produce_raw(sa_source, "src_q", [GOOD_1])
    tick(sa_source, "src_q")
    again = move(sa_source, target.dsn, invalid_events="dead_letter", keep_event_id=True)
    assert (again.events, again.dead_lettered) == (1, 0)
    assert [i for i, _ in target_events(target)] == [ids[0], ids[2], ids[4], later]
    conn = target.connect()
    try:  # a replayed event would take an id from the kept-id queue's sequence
        with pytest.raises(psycopg2.errors.ObjectNotInPrerequisiteState, match="kept event ids"):
            poison.replay(conn, "mover", from_encoding="LATIN1")
    finally:
        conn.close()


@pytest.mark.parametrize("mode", ["stop", "dead_letter"])
def test_the_happy_path_costs_no_round_trip_whichever_invalid_events(
    source: Server, target: Server, mode: str
) -> None:
    """Clean events: the round trips tests/core/test_round_trips.py counts for a one-tick
    batch on the COPY path (there 4 on the source with the take, here 3 after it; 5 on
    the target)."""
    from tests.core.test_round_trips import counted, trips
    from tests.helpers import produce, simple_events

    register(source, "src_q", "mover")
    with counted(source, target, invalid_events=mode) as (mover, sp, tp):
        mover.prepare()
        produce(source, "src_q", simple_events(100))
        tick(source, "src_q")
        batch = mover.next_batch()
        assert batch is not None
        trips(sp, tp)
        assert mover.apply_batch(batch).events == 100
        assert trips(sp, tp) == (3, 5)


@pytest.mark.parametrize("point", [faults.AFTER_TARGET_COMMIT, faults.BEFORE_SOURCE_COMMIT])
def test_a_crash_after_the_target_commit_does_not_double_dead_letters(
    sa_source: Server, target: Server, point: str
) -> None:
    """Killed between the target's commit (events, dead letters, mark) and finish_batch:
    the retry sees the mark, finishes the batch only, and writes no dead letter again."""
    ids, _, cur = batch_of(sa_source)
    proc = spawn_mover(sa_source, target, fault=point, invalid_events="dead_letter")
    code, _, err = wait_mover(proc)
    assert code == faults.FAULT_EXIT_CODE, err
    assert mark_of(target, "mover") == cur and len(dead_letters(target)) == 2
    report = move(sa_source, target.dsn, invalid_events="dead_letter")
    assert (report.skipped, report.events, report.dead_lettered) == (1, 0, 0)
    assert [k[0] for k in dead_letters(target)] == [ids[1], ids[3]]
    assert len(target_events(target)) == 3


def test_a_crash_before_the_target_commit_leaves_neither(sa_source: Server, target: Server) -> None:
    ids, _, cur = batch_of(sa_source)
    proc = spawn_mover(sa_source, target, fault=faults.BEFORE_TARGET_COMMIT, invalid_events="dead_letter")
    code, _, err = wait_mover(proc)
    assert code == faults.FAULT_EXIT_CODE, err
    assert mark_of(target, "mover") is None and dead_letters(target) == [] and target_events(target) == []
    report = move(sa_source, target.dsn, invalid_events="dead_letter")
    assert (report.events, report.dead_lettered) == (3, 2)
    assert [k[0] for k in dead_letters(target)] == [ids[1], ids[3]]


# -- replay once fixed ------------------------------------------------------------------------


def test_replay_puts_each_dead_letter_into_the_target_queue_once(
    sa_source: Server, target: Server, mover_only: Callable[[Server], str]
) -> None:
    ids, _, _ = batch_of(sa_source)
    dsn = mover_only(target)
    move(sa_source, dsn, invalid_events="dead_letter")
    conn = connect(dsn)
    try:
        listed = poison.list_dead_letters(conn, "mover")
        conn.rollback()
        assert [d.ev_id for d in listed] == [ids[1], ids[3]]
        assert listed[0].ev_data == b"caf\xe9 au lait" and listed[0].to_dict()["ev_data"] == "\\x" + (
            b"caf\xe9 au lait").hex()
        # as the source's own SQL_ASCII the bytes are still no UTF8: refused, nothing replayed
        with pytest.raises(psycopg2.errors.CharacterNotInRepertoire):
            poison.replay(conn, "mover")
        assert len(target_events(target)) == 3
        # read as what they are (Latin-1), they are: each replayed once
        assert poison.replay(conn, "mover", from_encoding="LATIN1") == 2
        assert poison.replay(conn, "mover", from_encoding="LATIN1") == 0
        assert poison.list_dead_letters(conn, "mover") == []
        assert len(poison.list_dead_letters(conn, "mover", include_replayed=True)) == 2
        conn.rollback()
    finally:
        conn.close()
    replayed = [row for _, row in target_events(target)][3:]
    source_rows = raw_events(sa_source, "src_q")
    assert [r[:6] for r in replayed] == [
        tuple(None if f is None else f.decode("latin-1").encode("utf-8") for f in source_rows[i][:6])
        for i in (ids[1], ids[3])
    ]
    assert [r[6] for r in replayed] == [source_rows[i][6] for i in (ids[1], ids[3])]  # times kept
    assert all(r[-1] is not None for r in dead_letters(target))


def test_concurrent_replays_put_each_event_in_once(sa_source: Server, target: Server) -> None:
    """The second replay waits for the rows the first holds, then finds them replayed."""
    import threading

    batch_of(sa_source)
    move(sa_source, target.dsn, invalid_events="dead_letter")
    first, second = target.connect(), target.connect()
    try:
        with first.cursor() as cur:
            cur.execute("select pgq_ext.replay_dead_letters('mover', '', null, 'LATIN1')")
            replayed_first = cur.fetchone()[0]  # type: ignore[index]
        result: list[int] = []
        racer = threading.Thread(target=lambda: result.append(poison.replay(second, "mover", from_encoding="LATIN1")))
        racer.start()
        pid = second.info.backend_pid
        assert wait_until(lambda: target.execute(
            "select wait_event_type from pg_stat_activity where pid = %s", (pid,)) == [("Lock",)], timeout=10)
        first.commit()
        racer.join(30)
    finally:
        first.close()
        second.close()
    assert (replayed_first, result) == (2, [0])
    assert len(target_events(target)) == 5


# -- who may see and write dead letters ---------------------------------------------------------


def test_only_the_keys_writer_reads_writes_or_replays_its_dead_letters(
    cluster: ThrowawayCluster, sa_source: Server, target: Server, mover_only: Callable[[Server], str]
) -> None:
    batch_of(sa_source)
    move(sa_source, mover_only(target), invalid_events="dead_letter")
    write = ("select pgq_ext.dead_letter_events('mover', '', 'src_q', 'dst_q', 1, 2, 'SQL_ASCII',"
             " array[1]::bigint[], array[now()], array['\\x41'::bytea], array['\\x41'::bytea], array[null::bytea],"
             " array[null::bytea], array[null::bytea], array[null::bytea], array['22021'], array['forged'])")
    replay = "select pgq_ext.replay_dead_letters('mover', '', null, 'LATIN1')"
    for prefix, role in (("nobody", None), ("producer", "pgq_writer"), ("reader", "pgq_reader")):
        login = create_login(cluster, prefix, in_role=role)
        session = login.raw(target)
        try:
            denied(session, "select count(*) from pgq_ext.dead_letter")
            denied(session, "select ev_data from pgq_ext.dead_letter")
            denied(session, "select count(*) from pgq_ext.list_dead_letters('mover', '', true)")
            denied(session, write)
            denied(session, replay)
            denied(session, "delete from pgq_ext.dead_letter")
            denied(session, "update pgq_ext.dead_letter set replayed_at = now()")
        finally:
            session.close()
    # another team's pgq_mover login neither reads nor writes this key's dead letters
    other = create_login(cluster, "other_team", in_role="pgq_mover")
    session = other.raw(target)
    try:
        denied(session, "select count(*) from pgq_ext.dead_letter")
        assert "may not read the dead letters of it" in denied(
            session, "select count(*) from pgq_ext.list_dead_letters('mover', '', true)")
        assert "may not dead-letter events of it" in denied(session, write)
        assert "may not replay the dead letters of it" in denied(session, replay)
        denied(session, "delete from pgq_ext.dead_letter")
        denied(session, "insert into pgq_ext.dead_letter (consumer_id, source_queue, target_queue, prev_tick_id,"
                        " cur_tick_id, ev_id, ev_time, source_encoding, error_sqlstate, error_message)"
                        " values ('mover', 'q', 'dst_q', 1, 2, 3, now(), 'UTF8', '', '')")
    finally:
        session.close()
    assert len(dead_letters(target)) == 2 and all(k[-1] is None for k in dead_letters(target))
    assert target.execute("select has_table_privilege('public', 'pgq_ext.dead_letter', 'select')") == [(False,)]


def test_no_login_plants_dead_letters_under_a_key_nobody_made_or_outside_the_keys_batch(
    cluster: ThrowawayCluster, sa_source: Server, target: Server, mover_only: Callable[[Server], str]
) -> None:
    """On main: another team's pgq_mover login wrote dead letters under a key that did
    not exist (no owner: any mover could replay them; the team that later makes the key
    would inherit them)."""
    batch_of(sa_source)
    owner_dsn = mover_only(target)
    move(sa_source, owner_dsn, invalid_events="dead_letter")
    plant = ("select pgq_ext.dead_letter_events(%s, '', 'src_q', 'dst_q', 1, 2, 'SQL_ASCII',"
             " array[1]::bigint[], array[now()], array['\\x41'::bytea], array['\\x41'::bytea], array[null::bytea],"
             " array[null::bytea], array[null::bytea], array[null::bytea], array['22021'], array['planted'])")
    other = create_login(cluster, "other_team", in_role="pgq_mover")
    session = other.raw(target)
    try:
        assert "does not exist" in denied(session, plant, ("ghost",))
        # once made by the later team, the key has no planted rows
        call(session, "select pgq_ext.ensure_key('ghost', '')")
        assert call(session, "select count(*) from pgq_ext.list_dead_letters('ghost', '', true)") == 0
        # even its own key's owner writes dead letters only inside the key's batch (its lock)
        assert "outside its batch" in denied(session, plant, ("ghost",))
    finally:
        session.close()
    owner = connect(owner_dsn)
    try:
        with pytest.raises(psycopg2.errors.InsufficientPrivilege, match="outside its batch"):
            with owner.cursor() as cur:
                cur.execute(plant, ("mover",))
        owner.rollback()
    finally:
        owner.close()
    assert target.execute("select count(*) from pgq_ext.dead_letter where error_message = 'planted'") == [(0,)]


def test_the_keys_owner_writes_dead_letters_while_its_transaction_holds_the_key(
    sa_source: Server, target: Server, mover_only: Callable[[Server], str]
) -> None:
    """The lock proof holds for the key's row locked (lock_key) and still once this
    transaction updated the row (mark_batch counts the journal's rows in it)."""
    batch_of(sa_source)
    dsn = mover_only(target)
    move(sa_source, dsn, invalid_events="dead_letter")
    write = ("select pgq_ext.dead_letter_events('mover', '', 'src_q', 'dst_q', 1, 2, 'SQL_ASCII',"
             " array[1]::bigint[], array[now()], array['\\x41'::bytea], array['\\x41'::bytea], array[null::bytea],"
             " array[null::bytea], array[null::bytea], array[null::bytea], array['22021'], array['held'])")
    conn = connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("select pgq_ext.lock_key('mover', '')")
            cur.execute(write)
            assert cur.fetchone() == (1,)
            cur.execute("select pgq_ext.mark_batch('mover', '', 999, 1, 2, 0, 0, 1, '{}'::jsonb)")
            cur.execute(write)
            assert cur.fetchone() == (1,)
        conn.rollback()
    finally:
        conn.close()


def test_one_team_cannot_read_another_teams_dead_letters_the_owner_and_admins_can(
    cluster: ThrowawayCluster, sa_source: Server, target: Server, mover_only: Callable[[Server], str]
) -> None:
    """On main every pgq_mover login read every key's payloads (SELECT on the table)."""
    ids, _, _ = batch_of(sa_source)
    team_b = mover_only(target)
    move(sa_source, team_b, invalid_events="dead_letter")
    team_a = create_login(cluster, "team_a", in_role="pgq_mover")
    session = team_a.raw(target)
    try:
        denied(session, "select ev_data from pgq_ext.dead_letter")
        assert "may not read the dead letters of it" in denied(
            session, "select ev_data from pgq_ext.list_dead_letters('mover', '', true)")
        call(session, "select pgq_ext.ensure_key('team_a', '')")  # its own key: allowed, empty
        assert call(session, "select count(*) from pgq_ext.list_dead_letters('team_a', '', true)") == 0
    finally:
        session.close()
    a_conn = connect(team_a.dsn(target))
    try:
        assert poison.pending_count(a_conn, "mover") is None
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            poison.list_dead_letters(a_conn, "mover")
    finally:
        a_conn.close()
    b_conn = connect(team_b)
    try:
        assert [d.ev_id for d in poison.list_dead_letters(b_conn, "mover")] == [ids[1], ids[3]]
        assert poison.pending_count(b_conn, "mover") == 2
        denied(b_conn, "select count(*) from pgq_ext.dead_letter")  # the table: admins only
    finally:
        b_conn.close()
    assert target.execute("select count(*) from pgq_ext.list_dead_letters('mover', '', false)") == [(2,)]
    assert target.execute("select has_table_privilege('pgq_mover', 'pgq_ext.dead_letter', 'select')") == [(False,)]


def test_replay_into_a_queue_that_takes_no_inserts_is_refused_before_anything_is_replayed(
    sa_source: Server, target: Server
) -> None:
    """On main replay wrote into the event table itself, past queue_disable_insert."""
    batch_of(sa_source)
    move(sa_source, target.dsn, invalid_events="dead_letter")
    target.execute("update pgq.queue set queue_disable_insert = true where queue_name = 'dst_q'")
    conn = target.connect()
    try:
        with pytest.raises(psycopg2.errors.ObjectNotInPrerequisiteState,
                           match="target queue 'dst_q' does not take inserts"):
            poison.replay(conn, "mover", from_encoding="LATIN1")
    finally:
        conn.close()
    assert len(target_events(target)) == 3
    assert all(row[-1] is None for row in dead_letters(target))
    target.execute("update pgq.queue set queue_disable_insert = false where queue_name = 'dst_q'")
    conn = target.connect()
    try:
        assert poison.replay(conn, "mover", from_encoding="LATIN1") == 2
    finally:
        conn.close()


def test_upgrade_of_schema_7_revokes_pgq_movers_select_on_dead_letters(target: Server) -> None:
    """An install of schema 7 made before list_dead_letters granted pgq_mover SELECT on
    the table: install again revokes it, once (an admin's later grant stays)."""
    target.execute("drop function pgq_ext.list_dead_letters")
    target.execute("grant select on pgq_ext.dead_letter to pgq_mover")
    conn = target.connect()
    try:
        with pytest.raises(PgqExtMissing, match="install it again once"):
            poison.list_dead_letters(conn, "mover")
        assert poison.pending_count(conn, "mover") is None
        report = pgq_ext.install(conn)
        assert any("SELECT on pgq_ext.dead_letter revoked" in g for g in report.granted), report.granted
        assert target.execute(
            "select has_table_privilege('pgq_mover', 'pgq_ext.dead_letter', 'select'),"
            " has_function_privilege('pgq_mover', 'pgq_ext.list_dead_letters(text, text, boolean)', 'execute'),"
            " has_function_privilege('public', 'pgq_ext.list_dead_letters(text, text, boolean)', 'execute')"
        ) == [(False, True, False)]
        target.execute("grant select on pgq_ext.dead_letter to pgq_mover")
        pgq_ext.install(conn)
    finally:
        conn.close()
    assert target.execute("select has_table_privilege('pgq_mover', 'pgq_ext.dead_letter', 'select')") == [(True,)]


def test_a_limit_is_an_events_refusal_only_when_that_event_alone_hits_it(target: Server) -> None:
    """54000 (program_limit_exceeded) is also raised for a piece of many events as a whole
    (an array too large): it makes the mover sift, never dead-letters a whole piece."""
    conn = target.connect()
    try:
        with pytest.raises(psycopg2.errors.ProgramLimitExceeded) as info:
            with conn.cursor() as cur:
                cur.execute("select pg_catalog.repeat('x', 1073741824)")
        conn.rollback()
    finally:
        conn.close()
    assert poison.refusal(info.value) is None
    assert poison.refusal(info.value, limits=True) == ("54000", "requested length too large")


def test_stop_reads_no_raw_payloads(sa_source: Server, target: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """On main the stop path read the refused events' payloads from the source, unused."""
    read: list[list[int]] = []
    real = poison.read_raw
    monkeypatch.setattr(poison, "read_raw", lambda conn, q, ids: read.append(ids) or real(conn, q, ids))
    ids, _, _ = batch_of(sa_source)
    with pytest.raises(InvalidEvents):
        move(sa_source, target.dsn)
    assert read == []
    move(sa_source, target.dsn, invalid_events="dead_letter")
    assert read == [[ids[1], ids[3]]]


def test_a_character_the_source_cannot_convert_names_the_source_side(
    cluster: ThrowawayCluster, source: Server
) -> None:
    """A UTF8 source holding '€' and a LATIN1 target: the source's COPY, converting into
    the target's encoding, raises 22P05 on the source. On main: side 'target'."""
    name = f"t_l1_{uuid.uuid4().hex[:10]}"
    cluster.execute("postgres", sql.SQL(
        "create database {} encoding 'LATIN1' template template0 lc_collate 'C' lc_ctype 'C'"
    ).format(sql.Identifier(name)))
    try:
        latin1 = Server(cluster, name)
        latin1.execute("create extension pgq")
        latin1.execute("select pgq.create_queue('dst_q')")
        conn = latin1.connect()
        try:
            pgq_ext.install(conn)
        finally:
            conn.close()
        register(source, "src_q", "mover")
        source.execute("select pgq.insert_event('src_q', 'price', 'ok')")
        source.execute("select pgq.insert_event('src_q', 'price', '5 \u20ac')")
        tick(source, "src_q")
        with pytest.raises(InvalidEvents) as info:
            move(source, latin1.dsn)
        assert info.value.side == "source" and info.value.sqlstate == "22P05", str(info.value)
        assert str(info.value).startswith(f"source database {source.dbname!r} cannot convert")
    finally:
        cluster.drop_database(name)


def test_upgrade_from_mover_schema_5_adds_dead_letters_for_pgq_mover_only(
    make_db: Callable[..., Server], sa_source: Server
) -> None:
    """A schema 5 install (no dead_letter) re-installed: marks kept, the table made and
    readable by pgq_mover only, the write functions the mover's; then dead letters work."""
    target = make_db(queue="dst_q", ext=True)
    target.execute("select pgq_ext.set_last_tick('old', '', 11)")
    target.execute("drop function pgq_ext.dead_letter_events, pgq_ext.replay_dead_letters,"
                   " pgq_ext.list_dead_letters")
    target.execute("drop table pgq_ext.dead_letter")
    pretend_mover_schema(target, 5)
    with pytest.raises(Exception, match="older than this mover needs"):
        move(sa_source, target.dsn)
    conn = target.connect()
    try:
        report = pgq_ext.install(conn)
        again = pgq_ext.install(conn)  # idempotent
    finally:
        conn.close()
    assert any("pgq_ext.dead_letter to its owner only" in g for g in report.granted), report.granted
    assert again.created == []
    assert target.execute("select pgq_ext.mover_schema_version()") == [(pgq_ext.REQUIRED_MOVER_SCHEMA,)]
    assert mark_of(target, "old") == 11
    assert target.execute(
        "select has_table_privilege('public', 'pgq_ext.dead_letter', 'select'),"
        " has_table_privilege('pgq_mover', 'pgq_ext.dead_letter', 'select'),"
        " has_table_privilege('pgq_mover', 'pgq_ext.dead_letter', 'insert'),"
        " has_function_privilege('public', 'pgq_ext.replay_dead_letters(text, text, bigint[], text)', 'execute'),"
        " has_function_privilege('pgq_mover', 'pgq_ext.replay_dead_letters(text, text, bigint[], text)', 'execute')"
    ) == [(False, False, False, False, True)]
    batch_of(sa_source)
    assert move(sa_source, target.dsn, invalid_events="dead_letter").dead_lettered == 2


# -- bad values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["skip", "DEAD_LETTER", "", None, True, 1])
def test_bad_invalid_events_values_are_refused(value: object) -> None:
    with pytest.raises(InvalidParameter, match="invalid_events must be one of 'stop', 'dead_letter'"):
        MoverOptions("src_q", "dst_q", "mover", invalid_events=value)  # type: ignore[arg-type]


def test_replay_refuses_an_unknown_encoding(sa_source: Server, target: Server) -> None:
    batch_of(sa_source)
    move(sa_source, target.dsn, invalid_events="dead_letter")
    conn = target.connect()
    try:
        with pytest.raises(psycopg2.errors.InvalidParameterValue, match="not an encoding"):
            poison.replay(conn, "mover", from_encoding="KLINGON-" + secrets.token_hex(2))
    finally:
        conn.close()
    assert all(k[-1] is None for k in dead_letters(target))


# -- the CLI: ini key, one-line stop, report, --status, --dead-letters, --replay-dead-letters ---


def _ini(tmp_path: Any, source: Server, target: Server, **extra: str) -> Any:
    path = tmp_path / "m.ini"
    keys = {"job_name": "mover", "src_db": source.dsn, "dst_db": target.dsn, "pgq_queue_name": "src_q",
            "dst_queue_name": "dst_q", **extra}
    path.write_text("[queue_mover]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()))
    path.chmod(0o600)
    return path


def _cli(*args: Any) -> Any:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "airflow_provider_pgq.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def _status(proc: Any) -> dict[str, str]:
    pairs = (line.split(":", 1) for line in proc.stdout.splitlines())
    return {k.strip(): v.strip() for k, v in pairs}


def test_cli_stops_with_one_line_then_dead_letters_lists_and_replays(
    sa_source: Server, target: Server, tmp_path: Any
) -> None:
    ids, prev, cur = batch_of(sa_source)
    stop = _cli("--once", _ini(tmp_path, sa_source, target))
    assert stop.returncode == 1
    errors = [line for line in stop.stderr.splitlines() if line.startswith("pgq-queue-mover: error: ")]
    assert len(errors) == 1, stop.stderr
    assert f"ev_id {ids[1]} (22021" in errors[0] and f"ticks {prev}..{cur}" in errors[0]
    assert "invalid_events = dead_letter" in errors[0] and "target database" in errors[0]

    ini = _ini(tmp_path, sa_source, target, invalid_events="dead_letter")
    moved = _cli("--once", "-v", ini)
    assert moved.returncode == 0, moved.stderr
    assert "moved 3 events in 1 batch" in moved.stderr
    assert "2 refused by the target kept in pgq_ext.dead_letter" in moved.stderr
    assert _status(_cli("--status", ini))["dead letters"] == "2"
    listed = _cli("--dead-letters", ini)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[-1].startswith("2 dead letter(s) of consumer 'mover'")
    assert [f" ev_id {ids[1]} " in lines[0], f" ev_id {ids[3]} " in lines[1]] == [True, True]
    assert "22021" in lines[0]
    assert _cli("--from-encoding", "LATIN1", "--once", ini).returncode == 2  # only with --replay-dead-letters
    replayed = _cli("--replay-dead-letters", "--from-encoding", "LATIN1", ini)
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.startswith("replayed 2 dead letter(s)")
    assert _status(_cli("--status", ini))["dead letters"] == "0"
    assert len(target_events(target)) == 5


def test_cli_refuses_a_bad_invalid_events_value(tmp_path: Any) -> None:
    from airflow_provider_pgq.cli.config import ConfigError, load_config

    ini = tmp_path / "m.ini"
    ini.write_text("[mover]\nsrc_db = dbname=a\ndst_db = dbname=b\npgq_queue_name = q\ndst_queue_name = q2\n"
                   "invalid_events = skip\n")
    with pytest.raises(ConfigError, match="key 'invalid_events': must be one of stop, dead_letter, got 'skip'"):
        load_config(ini)


def test_stop_names_the_first_ten_refused_events_without_sifting_the_rest(
    sa_source: Server, target: Server
) -> None:
    """A batch of many poison events: "stop" stops sifting at the tenth (lowest ids first);
    dead_letter then keeps every one of them."""
    events = [POISON_DATA if i % 2 else GOOD_2 for i in range(30)]
    ids = produce_raw(sa_source, "src_q", events)
    tick(sa_source, "src_q")
    bad = [i for i, ev in zip(ids, events, strict=True) if ev is POISON_DATA]
    with pytest.raises(InvalidEvents) as info:
        move(sa_source, target.dsn)
    assert "at least 10 event(s) of batch" in str(info.value)
    assert info.value.ev_ids == tuple(bad[:10])
    assert f"ev_id {bad[10]} " not in str(info.value)
    report = move(sa_source, target.dsn, invalid_events="dead_letter")
    assert (report.events, report.dead_lettered) == (15, 15)
    assert [k[0] for k in dead_letters(target)] == bad
