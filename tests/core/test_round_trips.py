"""Round trips of the move protocol, counted by a proxy in front of each side
(tests/support/roundtrips.py). The counts are exact and repeatable (libpq waits for
every answer), so they are asserted: what a batch, an idle poll and the set-up cost
on each side. benchmarks/bench_roundtrips.py prints the same counts."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from airflow_provider_pgq.core.connect import connect_unsettled
from airflow_provider_pgq.core.mover import CHUNK_PATH, COPY_PATH, MoverOptions, QueueMover
from tests.helpers import Login, Server, create_login, produce, queue_events, register, simple_events, tick
from tests.support.roundtrips import CountingProxy


@contextmanager
def counted(source: Server, target: Server, target_login: Login | None = None,
            **options: Any) -> Iterator[tuple[QueueMover, CountingProxy, CountingProxy]]:
    with CountingProxy(source.cluster.port) as sp, CountingProxy(target.cluster.port) as tp:
        # as the CLI connects: the mover's checks settle the connections in their reads
        s = connect_unsettled(sp.dsn(source.dsn), side="source")
        t = connect_unsettled(tp.dsn(target_login.dsn(target) if target_login else target.dsn), side="target")
        try:
            yield QueueMover(s, t, MoverOptions("src_q", "dst_q", "mover", **options)), sp, tp
        finally:
            s.close()
            t.close()


def trips(sp: CountingProxy, tp: CountingProxy) -> tuple[int, int]:
    return sp.reset(), tp.reset()


@pytest.fixture
def chunk_login(source: Server) -> Iterator[Login]:
    login = create_login(source.cluster, "rt_chunk", in_role="pgq_mover")
    yield login
    source.cluster.execute("postgres", f'drop role if exists "{login.name}"')


@pytest.mark.parametrize("path", [COPY_PATH, CHUNK_PATH])
def test_a_one_tick_batch_and_an_idle_poll(source: Server, target: Server, chunk_login: Login, path: str) -> None:
    """Source: take (lock, plan and allocation in one string), the batch's SQL (read
    after the target's decision: a concurrent run may have finished the batch), COPY
    out, finish. Target: BEGIN with the key's lock and decision (on the chunk path with
    the staging table's answer), the event table (COPY path) or the insert from staging
    (chunk path, after the COPY), the COPY's two turns, and the mark with the commit."""
    register(source, "src_q", "mover")
    with counted(source, target, chunk_login if path == CHUNK_PATH else None) as (mover, sp, tp):
        mover.prepare()
        trips(sp, tp)
        assert mover.next_batch() is None
        assert trips(sp, tp) == (1, 0), "an idle poll"
        produce(source, "src_q", simple_events(100))
        tick(source, "src_q")
        batch = mover.next_batch()
        assert batch is not None
        assert mover.apply_batch(batch).events == 100
        assert trips(sp, tp) == (4, 5), "a one-tick batch of 100 events"
        assert mover.write_path == path
        report = mover.drain()  # prepared already: the drain is one idle poll
        assert (report.events, report.stop_reason) == (0, "drained") and report.lag_seconds is not None
        assert trips(sp, tp) == (1, 0), "an idle drain of a prepared mover"
    assert queue_events(source, "src_q") == queue_events(target, "dst_q")


def test_the_set_up(source: Server, target: Server) -> None:
    """Connecting: SCRAM over TCP without SSL (the SSL refusal, then three login turns),
    nothing of ours. Then the checks of a new mover: on the source one read (PgQ, the
    queue, the registration, the identity, and which bounds the user chose); on the
    target one read (PgQ, the queue, its event tables, pgq_ext's trust, the write path,
    the identity, the bounds) and, once pgq_ext is known to be trusted, its schema and
    the tracking key's rows (committed). A --once run adds the idle poll: 6 + 6."""
    if source.cluster.shared:
        pytest.skip("a server of PGQ_TEST_DSN may speak SSL or another login method: other counts")
    register(source, "src_q", "mover")
    with counted(source, target) as (mover, sp, tp):
        assert (sp.turns(), tp.turns()) == (["ssl", "startup", "p", "p"], ["ssl", "startup", "p", "p"])
        assert trips(sp, tp) == (4, 4)
        mover.prepare()
        assert trips(sp, tp) == (1, 2)
        assert mover.source.unsettled is None and mover.target.unsettled is None  # type: ignore[attr-defined]
        assert mover.next_batch() is None
        assert trips(sp, tp) == (1, 0)
