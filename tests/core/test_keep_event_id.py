"""keep_event_id: target events carry the source's ev_id; the target queue must have no
other writer, and the mover refuses (KeptIdConflict) when it has one.

The rule (core/kept_ids.py): one tracking key per target queue, an empty target queue
on the key's first kept-id batch, and the queue's event-id sequence untouched by
anyone else between the key's batches.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from psycopg2 import sql

from airflow_provider_pgq.core import faults, pgq_ext
from airflow_provider_pgq.core.errors import KeptIdConflict
from airflow_provider_pgq.core.mover import CHUNK_PATH, COPY_PATH, MoverOptions, QueueMover
from tests.helpers import (
    Server,
    mark_of,
    pretend_mover_schema,
    produce,
    queue_events,
    register,
    run_mover,
    simple_events,
    tick_plain,
)


def _ids(server: Server, queue: str) -> dict[Any, int]:
    """ev_data -> ev_id of every event in the queue (ev_data is unique in these tests)."""
    return {e[1]: e[7] for e in queue_events(server, queue, with_ids=True)}


def _seq(server: Server, queue: str) -> int:
    return int(server.execute(
        "select pgq.seq_getval(queue_event_seq) from pgq.queue where queue_name = %s", (queue,))[0][0])


@pytest.fixture
def pair(source: Server, target: Server) -> tuple[Server, Server]:
    """src_q with 3 batches of events (ids 1..30) for consumer 'mover'; an empty dst_q.
    Both queues tick whenever they have new events (ticker_max_count 1)."""
    for db, q in ((source, "src_q"), (target, "dst_q")):
        db.execute("select pgq.set_queue_config(%s, 'ticker_max_count', '1')", (q,))
    register(source, "src_q", "mover")
    for i in range(3):
        produce(source, "src_q", simple_events(10, start=i * 10))
        tick_plain(source, "src_q")
    return source, target


def _read_batch(server: Server, queue: str, consumer: str) -> dict[Any, int]:
    """One batch as a consumer of the target sees it: ev_data -> ev_id."""
    conn = server.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("select pgq.next_batch(%s, %s)", (queue, consumer))
            batch = cur.fetchone()[0]  # type: ignore[index]
            assert batch is not None, "no batch on the target"
            cur.execute("select ev_data, ev_id from pgq.get_batch_events(%s)", (batch,))
            rows = dict(cur.fetchall())
            cur.execute("select pgq.finish_batch(%s)", (batch,))
        conn.commit()
        return rows
    finally:
        conn.close()


def test_ids_are_the_same_on_both_sides_and_delivered(pair):
    source, target = pair
    register(target, "dst_q", "reader")
    report = run_mover(source, target, keep_event_id=True)
    assert report.events == 30 and report.batches == 3
    src_ids = _ids(source, "src_q")
    assert _ids(target, "dst_q") == src_ids
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")
    # the sequence stands past the largest id, so the target's ticker sees the events
    # and its consumers get them, with the source's ids
    assert _seq(target, "dst_q") >= max(src_ids.values())
    tick_plain(target, "dst_q")
    assert _read_batch(target, "dst_q", "reader") == src_ids
    owner = target.execute("select consumer_id, subconsumer_id, seq_high from pgq_ext.kept_event_ids"
                           " where target_queue = 'dst_q'")
    assert owner == [("mover", "", _seq(target, "dst_q"))]


def test_local_insert_after_the_move_gets_a_fresh_id_and_stops_the_next_move(pair):
    source, target = pair
    run_mover(source, target, keep_event_id=True)
    src_ids = set(_ids(source, "src_q").values())
    local = int(target.execute("select pgq.insert_event('dst_q', 'local', 'local-1')")[0][0])
    assert local > max(src_ids) and local not in src_ids

    # from now on the target queue has another producer: kept ids could collide
    produce(source, "src_q", simple_events(5, start=100))
    tick_plain(source, "src_q")
    before = queue_events(target, "dst_q", with_ids=True)
    with pytest.raises(KeptIdConflict) as err:
        run_mover(source, target, keep_event_id=True)
    msg = str(err.value)
    assert "target queue 'dst_q'" in msg and "moved from" in msg and "local producer" in msg
    assert "keep_event_id" in msg
    assert queue_events(target, "dst_q", with_ids=True) == before
    # nothing was taken from the source either: the five events still wait for 'mover'
    assert source.execute("select pending_events from pgq.get_consumer_info('src_q', 'mover')")[0][0] == 5
    # without kept ids the same key moves on (fresh target ids)
    assert run_mover(source, target).events == 5


def test_first_use_on_a_queue_holding_events_is_refused_before_anything_happens(pair):
    source, target = pair
    target.execute("select pgq.insert_event('dst_q', 'local', 'early')")
    with pytest.raises(KeptIdConflict, match="already holds events not written with kept ids"):
        run_mover(source, target, keep_event_id=True)
    assert mark_of(target, "mover") is None
    assert source.execute("select current_batch from pgq.get_consumer_info('src_q', 'mover')") == [(None,)]


def test_a_second_key_into_the_same_queue_is_refused(pair, make_db):
    source, target = pair
    other = make_db(queue="src_q")
    register(other, "src_q", "mover_b")
    produce(other, "src_q", simple_events(4, prefix="b"))
    tick_plain(other, "src_q")
    run_mover(source, target, keep_event_id=True)
    with pytest.raises(KeptIdConflict, match="from tracking key consumer 'mover' subconsumer ''"):
        run_mover(other, target, consumer="mover_b", keep_event_id=True)
    # releasing the queue does not open it to the other key while it holds mover's events
    target.execute("select pgq_ext.kept_ids_release('dst_q')")
    with pytest.raises(KeptIdConflict, match="already holds events"):
        run_mover(other, target, consumer="mover_b", keep_event_id=True)
    assert sum(queue_events(target, "dst_q").values()) == 30


def _mover_with_fault(source: Server, target: Server, action: Any) -> tuple[QueueMover, Any, Any]:
    s, t = source.connect(), target.connect()

    def fault(point: str) -> None:
        if point == faults.MID_STREAM:
            action()

    opts = MoverOptions(source_queue="src_q", target_queue="dst_q", consumer="mover", keep_event_id=True)
    return QueueMover(s, t, opts, fault=fault), s, t


def _local_insert(target: Server, outcomes: list[str]) -> None:
    """A producer on the target, giving up after 300 ms of waiting for a lock."""
    conn = target.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("set lock_timeout = '300ms'")
            cur.execute("select pgq.insert_event('dst_q', 'local', 'during')")
        conn.commit()
        outcomes.append("inserted")
    except psycopg2.errors.LockNotAvailable:
        outcomes.append("blocked")
    finally:
        conn.close()


@pytest.mark.parametrize("intruder", ["local insert", "force_tick"])
def test_an_id_allocated_during_the_batch_rolls_it_back(pair, intruder):
    """While a kept-id batch is written, a local insert waits for the batch's lock on the
    event table, but pgq.insert_event takes its id first; pgq.force_tick bumps the
    sequence without touching the table. Both show in the sequence: the batch (here
    the very first, on a fresh sequence) is rolled back instead of committed."""
    source, target = pair
    outcomes: list[str] = []
    if intruder == "local insert":
        def action() -> None:
            _local_insert(target, outcomes)
    else:
        def action() -> None:
            target.execute("select pgq.force_tick('dst_q')")
    mover, s, t = _mover_with_fault(source, target, action)
    try:
        with pytest.raises(KeptIdConflict, match="moved from 0 to .* during the batch"):
            mover.drain()
    finally:
        s.close()
        t.close()
    if intruder == "local insert":
        assert outcomes == ["blocked"]
    assert sum(queue_events(target, "dst_q").values()) == 0 and mark_of(target, "mover") is None
    # the batch stays open on the source, to be moved again
    assert source.execute("select current_batch is not null from pgq.get_consumer_info('src_q', 'mover')") \
        == [(True,)]


@pytest.fixture
def writer_dsn(target: Server) -> Iterator[str]:
    """A login on the target holding only pgq_mover (no rights on the event tables)."""
    name, password = f"kw_{uuid.uuid4().hex[:10]}", "pw-" + secrets.token_urlsafe(12)
    target.execute(sql.SQL("create role {} login password %s in role pgq_mover").format(sql.Identifier(name)),
                   (password,))
    yield target.cluster.dsn(target.dbname, user=name, password=password)
    target.execute(sql.SQL("drop owned by {}").format(sql.Identifier(name)))
    target.execute(sql.SQL("drop role {}").format(sql.Identifier(name)))


def test_mover_role_keeps_ids_through_the_chunk_path(pair, writer_dsn):
    from airflow_provider_pgq.core.connect import connect

    source, target = pair
    opts = MoverOptions(source_queue="src_q", target_queue="dst_q", consumer="mover", keep_event_id=True)
    s, t = source.connect(), connect(writer_dsn)
    try:
        mover = QueueMover(s, t, opts)
        report = mover.drain()
    finally:
        s.close()
        t.close()
    assert report.write_path == CHUNK_PATH != COPY_PATH and report.events == 30
    assert _ids(target, "dst_q") == _ids(source, "src_q")
    assert _seq(target, "dst_q") >= max(_ids(source, "src_q").values())


def test_a_schema_1_target_is_upgraded_on_request(pair):
    """Targets installed before kept-id support: refused with what to do, upgraded by
    install_pgq_ext, marks kept."""
    from airflow_provider_pgq.core.errors import PgqExtMissing

    source, target = pair
    run_mover(source, target)  # a mark to keep
    mark = mark_of(target, "mover")
    target.execute("drop function pgq_ext.kept_ids_claim(text, text, text)")
    target.execute("drop table pgq_ext.kept_event_ids")
    pretend_mover_schema(target, 1)
    produce(source, "src_q", simple_events(3, start=100))
    tick_plain(source, "src_q")
    with pytest.raises(PgqExtMissing, match="install_pgq_ext=True"):
        run_mover(source, target, keep_event_id=True)
    assert mark_of(target, "mover") == mark
    # the queue holds the earlier (fresh-id) events: after the upgrade the rule refuses kept ids
    with pytest.raises(KeptIdConflict, match="already holds events"):
        run_mover(source, target, keep_event_id=True, install_pgq_ext=True)
    assert target.execute("select pgq_ext.mover_schema_version()")[0][0] == pgq_ext.REQUIRED_MOVER_SCHEMA
    assert mark_of(target, "mover") == mark
