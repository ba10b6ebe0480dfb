"""read_positions: every mover of a database in one statement, against real PgQ."""

from __future__ import annotations

from collections.abc import Callable

import psycopg2
import pytest

from airflow_provider_pgq.core.connect import connect
from airflow_provider_pgq.core.errors import PgqNotInstalled
from airflow_provider_pgq.core.mover import DrainBounds, MoverOptions, QueueMover
from airflow_provider_pgq.core.positions import read_positions
from tests.helpers import Server, create_queue, produce, register, simple_events, tick


def test_sources_and_targets_of_one_database_in_one_statement(make_db: Callable[..., Server]) -> None:
    db = make_db(queue="a", ext=True)
    create_queue(db, "b")
    register(db, "a", "mover_a")
    produce(db, "a", simple_events(5))
    tick(db, "a")
    produce(db, "a", simple_events(3, prefix="later"))
    tick(db, "a")
    conn = connect(db.dsn)
    try:
        mover = QueueMover(conn, connect(db.dsn), MoverOptions(source_queue="a", target_queue="b",
                                                               consumer="mover_a"))
        mover.drain(DrainBounds(max_batches=1))
        positions = read_positions(conn, [("a", "mover_a"), ("a", "nobody"), ("gone", "mover_a")],
                                   [("b", "mover_a", ""), ("b", "mover_a", "other"), ("gone", "x", "")])
    finally:
        conn.close()
    mine = positions.sources[("a", "mover_a")]
    assert mine.registered
    assert mine.newest_tick is not None and mine.last_tick is not None
    assert mine.newest_tick > mine.last_tick  # one batch moved, one pending
    assert mine.pending_events == 3
    assert positions.sources[("a", "nobody")].registered is False
    assert ("gone", "mover_a") not in positions.sources and positions.missing_queues == {"gone"}
    assert positions.targets[("b", "mover_a", "")].mark == mine.last_tick
    assert positions.targets[("b", "mover_a", "other")].mark is None
    assert positions.targets[("gone", "x", "")].queue_exists is False
    assert positions.target_problem is None


def test_one_round_trip_for_many_movers(make_db: Callable[..., Server]) -> None:
    """Forty consumers and forty marks: one statement."""
    db = make_db(queue="q", ext=True)
    pairs = [("q", f"c{i}") for i in range(40)]
    for _, c in pairs:
        register(db, "q", c)
    conn = connect(db.dsn)
    try:
        seen: list[object] = []

        class Counting(conn.cursor_factory or psycopg2.extensions.cursor):  # type: ignore[misc]
            def execute(self, query, vars=None):  # type: ignore[no-untyped-def]
                seen.append(query)
                return super().execute(query, vars)

        conn.cursor_factory = Counting
        positions = read_positions(conn, pairs, [("q", c, "") for _, c in pairs])
    finally:
        conn.close()
    assert len(seen) == 1
    assert len(positions.sources) == 40 and all(p.registered for p in positions.sources.values())
    assert len(positions.targets) == 40


def test_a_database_without_pgq_ext_still_answers_for_its_sources(make_db: Callable[..., Server]) -> None:
    db = make_db(queue="q")
    register(db, "q", "c")
    conn = connect(db.dsn)
    try:
        positions = read_positions(conn, [("q", "c")], [("q", "c", "")])
    finally:
        conn.close()
    assert positions.sources[("q", "c")].registered
    assert positions.targets == {}
    assert positions.target_problem and "pgq_ext is not installed" in positions.target_problem


def test_a_database_without_pgq_is_named(make_db: Callable[..., Server]) -> None:
    db = make_db(pgq=False)
    conn = connect(db.dsn)
    try:
        with pytest.raises(PgqNotInstalled, match=db.dbname):
            read_positions(conn, [("q", "c")], [])
    finally:
        conn.close()


def test_a_target_only_database_without_pgq_ext(make_db: Callable[..., Server]) -> None:
    db = make_db(queue="q")
    conn = connect(db.dsn)
    try:
        positions = read_positions(conn, [], [("q", "c", "")])
    finally:
        conn.close()
    assert positions.targets == {} and positions.missing_queues == frozenset()
    assert positions.target_problem and db.dbname in positions.target_problem
