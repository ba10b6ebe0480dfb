"""The move journal on a target shared by teams: no one but a key's writer puts rows in
it, nobody without pgq_mover at all, and nobody forges or erases another team's rows."""

from __future__ import annotations

import psycopg2
import pytest

from tests.helpers import Login, Server, mark_of
from tests.security.attacker import call, denied
from tests.security.test_shared_target import Team, nobody, teams  # noqa: F401 - the fixtures
from tests.support.cluster import ThrowawayCluster

MARK_BATCH = "select pgq_ext.mark_batch(%s, '', 1, %s, %s, 1000000, 0, 0, %s::jsonb)"


def journal_of(target: Server, consumer: str) -> list[tuple[object, ...]]:
    return target.execute(
        "select batch_id, cur_tick_id, events, login_role, dag_id from pgq_ext.move_journal"
        " where consumer_id = %s order by journal_id", (consumer,))


def test_another_team_cannot_write_or_erase_a_keys_journal(
    cluster: ThrowawayCluster, target: Server, teams: tuple[Team, Team], nobody: Login  # noqa: F811
) -> None:
    """Team B's pgq_mover login forges a journal row of A's key (a report of a million
    events A never moved), writes the table directly, deletes A's rows, or changes the
    retention so A's rows go: each refused. A login without pgq_mover cannot call the
    writer at all. A's rows stay exactly what A's mover wrote, under A's login."""
    a, b = teams
    a.produce(5)
    assert a.move(target).events == 5
    mark = mark_of(target, a.consumer)
    before = journal_of(target, a.consumer)
    assert [(r[2], r[3]) for r in before] == [(5, a.mover.name)]

    attacker = b.session(target)
    try:
        message = denied(attacker, MARK_BATCH, (a.consumer, mark, (mark or 0) + 1, '{"dag_id": "forged"}'))
        assert a.consumer in message and a.mover.name in message
        for query in (
            "insert into pgq_ext.move_journal (consumer_id, batch_id, cur_tick_id, events, login_role)"
            " values ('m1', 1, 1, 1000000, 'x')",
            "update pgq_ext.move_journal set events = 0 where consumer_id = 'm1'",
            "delete from pgq_ext.move_journal where consumer_id = 'm1'",
            "select pgq_ext.set_journal_retention('1 microsecond', 1)",
            "update pgq_ext.move_journal_retention set keep_rows = 1",
        ):
            denied(attacker, query)
        # B's own key: B's rows, under B's login whatever "who" B claims
        assert call(attacker, MARK_BATCH, (b.consumer, 1, 2, '{"dag_id": "mine"}')) is not None
    finally:
        attacker.close()
    assert journal_of(target, b.consumer) == [(1, 2, 1000000, b.mover.name, "mine")]

    outsider = nobody.raw(target)
    try:
        with pytest.raises(psycopg2.errors.InsufficientPrivilege) as info:
            call(outsider, MARK_BATCH, (a.consumer, mark, (mark or 0) + 1, "{}"))
        assert "permission denied for function mark_batch" in str(info.value)
        # reading is open to all, as the marks are
        assert call(outsider, "select count(*) from pgq_ext.move_journal where consumer_id = 'm1'") == 1
    finally:
        outsider.close()

    assert journal_of(target, a.consumer) == before and mark_of(target, a.consumer) == mark
    a.produce(6)
    assert a.move(target).events == 6
    assert [r[2] for r in journal_of(target, a.consumer)] == [5, 6]
