"""The partition consolidation example on CeleryExecutor (issue 24, point 6): a Redis
broker, two Celery workers, a worker killed with SIGKILL in the middle of a COPY.

Each partition gets a small tick and then a large one, so its mover commits a first
batch and then COPYs the large one for a few seconds. The worker running the first mover
seen COPYing after its first batch dies whole (Celery's processes, the task supervisors
and the task processes, as when its machine goes): the scheduler finds the task without
heartbeat, the retry runs on the other worker, the run succeeds. Then the central queue
is compared with the union of the partitions event by event, and the run's reports must
count every event once, whichever attempt moved it.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter

import pytest
from psycopg2 import sql

from tests.helpers import Server, mark_of, register
from tests.system.conftest import PARTITION_DAG, CelerySystem

pytestmark = pytest.mark.system

#: what the example's mover tasks show in pg_stat_activity
APP = f"airflow:{PARTITION_DAG}.move_partition"
CONSUMER = "consolidate_events"
#: per partition: a first tick the mover commits as one batch, then one large tick (a
#: tick is never split: one batch, one COPY of a few seconds)
SMALL, LARGE = 20_000, 300_000


def _produce(server: Server, queue: str, n: int, tag: str) -> None:
    """n events made by the server itself (one statement), each one unique by its data."""
    table = server.execute("select pgq.current_event_table(%s)", (queue,))[0][0]
    schema, name = table.split(".")
    server.execute(sql.SQL(
        "insert into {} (ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4, ev_time)"
        " select %s, %s || i, 'x' || (i %% 7), null, case when i %% 3 = 0 then '' end,"
        " case when i %% 5 = 0 then 'é✓' end, timestamptz '2026-01-01 00:00:00+00' + i * interval '1 ms'"
        " from pg_catalog.generate_series(1, %s) i").format(sql.Identifier(schema, name)),
        (f"{tag}.type", f"{tag}-", n))


def _ticked(servers: list[Server], queue: str) -> bool:
    """pgqd has put every event of the queue into a tick."""
    return all(s.execute("select ev_new from pgq.get_queue_info(%s)", (queue,))[0][0] == 0 for s in servers)


def _digests(server: Server, queue: str) -> Counter[str]:
    """Every event row of the queue (type, data, extras, time) as the md5 of its text:
    the multiset the comparison is made on (the rows themselves would not fit a test)."""
    table = server.execute("select queue_data_pfx from pgq.queue where queue_name = %s", (queue,))[0][0]
    schema, name = table.split(".")
    rows = server.execute(sql.SQL(
        "select pg_catalog.md5(row(ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4, ev_time)::text)"
        " from {}").format(sql.Identifier(schema, name)))
    return Counter(r[0] for r in rows)


def _newest_tick(server: Server, queue: str) -> int:
    return int(server.execute("select last_tick_id from pgq.get_queue_info(%s)", (queue,))[0][0])


def _copying(system: CelerySystem, first_batch_ends: list[int]) -> int | None:
    """A partition whose mover committed its first batch (its mark on the central database
    reached the tick that ends it) and now COPYs the large one out (rows under way)."""
    for i, part in enumerate(system.parts):
        if (mark_of(system.central, CONSUMER, f"pgq_part_{i}") or 0) < first_batch_ends[i]:
            continue
        rows = part.execute(
            "select p.tuples_processed from pg_catalog.pg_stat_progress_copy p"
            " join pg_catalog.pg_stat_activity a on a.pid = p.pid"
            " where p.datname = pg_catalog.current_database() and p.command = 'COPY TO'"
            " and a.application_name = %s", (APP,))
        if rows and rows[0][0] > 0:
            return i
    return None


def _parse(ts: str) -> dt.datetime:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))


def test_a_worker_killed_mid_copy_the_retry_finishes_exactly_once(celery_system: CelerySystem) -> None:
    system, af = celery_system, celery_system.airflow
    parts = system.parts
    # The run under test is the one unpausing makes (catchup=False: the latest interval);
    # one a later quarter-hour makes waits behind it (max_active_runs=1). So the consumers
    # are registered first, as the run would, and the events are in place before it.
    for part in parts:
        register(part, "events", CONSUMER)
    for i, part in enumerate(parts):
        _produce(part, "events", SMALL, f"p{i}a")
    af.wait(lambda: _ticked(parts, "events"), 30, "pgqd to tick the first events")
    first_batch_ends = [_newest_tick(part, "events") for part in parts]
    for i, part in enumerate(parts):
        _produce(part, "events", LARGE, f"p{i}b")
    af.wait(lambda: _ticked(parts, "events"), 30, "pgqd to tick the large events")
    large_batch_ends = [_newest_tick(part, "events") for part in parts]

    af.unpause(PARTITION_DAG)
    run_id = af.wait(lambda: af.runs(PARTITION_DAG), 60, "the scheduled partition run")[0]["dag_run_id"]
    where: dict[int, str] = {}  # map index -> the worker whose process tree runs its task process

    def copying() -> tuple[int] | None:
        for m in set(range(len(parts))) - set(where):
            ti = af.task_instance(PARTITION_DAG, run_id, "move_partition", m)
            if ti["state"] == "running" and ti["pid"] and (worker := af.worker_of(int(ti["pid"]))):
                where[m] = worker
        found = _copying(system, first_batch_ends)
        return (found,) if found is not None and found in where else None

    (victim,) = af.wait(copying, 120, "a mover's COPY of its second batch", poll=0.05)
    worker = where[victim]
    assert worker in system.workers, (victim, where)
    on_worker = sorted(m for m, w in where.items() if w == worker)
    killed_at, started = dt.datetime.now(dt.timezone.utc), time.monotonic()
    af.kill(worker)
    # the retry is seconds away (the heartbeat timeout): the large batch is not applied yet
    assert (mark_of(system.central, CONSUMER, f"pgq_part_{victim}") or 0) < large_batch_ends[victim], (
        "the killed attempt finished its COPY before the kill: not a kill mid-COPY")

    assert af.wait_run(PARTITION_DAG, run_id, timeout=240) == "success"
    recovered = time.monotonic() - started
    retry_starts = {}
    for m in on_worker:
        tries = af.tries(PARTITION_DAG, run_id, "move_partition", m)
        assert [t["state"] for t in tries][-1] == "success" and len(tries) >= 2, tries
        assert tries[0]["state"] != "success", tries
        retry_starts[m] = round((_parse(tries[1]["start_date"]) - killed_at).total_seconds(), 1)
    print(f"\nkilled {worker} running map indexes {on_worker} (COPY seen on {victim});"
          f" retries started {retry_starts} s after the kill; the run ended {recovered:.1f} s after it")

    # nothing lost, nothing twice: the central queue is the union of the partitions
    union: Counter[str] = Counter()
    for part in parts:
        union += _digests(part, "events")
    total = sum(union.values())
    assert total == len(parts) * (SMALL + LARGE) and set(union.values()) == {1}
    central = _digests(system.central, "events_all")
    lost, extra = union - central, central - union
    assert not lost and not extra, (
        f"{total} events in the partitions, {sum(central.values())} central: {sum(lost.values())} lost,"
        f" {sum(extra.values())} too many ({sum(n - 1 for n in central.values() if n > 1)} duplicates)")

    # the reports: every event once, whichever attempt moved it
    summary = af.xcom(PARTITION_DAG, run_id, "report_central")
    assert summary["central_events"] == total, summary
    moved = {(r := af.xcom(PARTITION_DAG, run_id, "move_partition", m))["subconsumer"]: r["events"]
             for m in range(len(parts))}
    reported = sum(moved.values())
    assert reported == total, (
        f"the mover reports count {reported} {moved} of the {total} events the run moved; the first tries"
        f" of map indexes {on_worker} were killed ({victim} mid-COPY, after its first batch of {SMALL})")
    assert summary["events_moved"] == total, summary
