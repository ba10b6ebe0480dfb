"""Round trips and queries of the mover and of the classic tool, counted on the wire.

    python -m benchmarks.bench_roundtrips [--events 100]

A counting proxy (tests/support/roundtrips.py) sits in front of the source and of the
target; both tools connect through it to a throwaway cluster with PgQ. Counted for each:
the set-up (login and whatever a tool does before its first poll), an idle poll (no
batch), a batch of one tick with --events events, and for ours also the checks of a
new mover (prepare) and a whole `pgq-queue-mover --once` process over an empty queue.
A round trip is a turn of the conversation (the client sends after hearing from the
server); queries are Query messages (a string may hold several statements). The
counts are exact and repeatable: tests/core/test_round_trips.py asserts ours. The
classic is benchmarks/classic_mover.py on PyPI's pgq (pip install pgq); without it,
its column says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import psycopg2

from tests.support.cluster import ThrowawayCluster
from tests.support.roundtrips import CountingProxy

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DB, TARGET_DB = "rt_src", "rt_dst"
SOURCE_QUEUE, TARGET_QUEUE = "rt_src_q", "rt_dst_q"

Counts = dict[str, tuple[tuple[int, int], tuple[int, int]]]  # step -> ((trips, queries) source, target)


def pgq_database(cluster: ThrowawayCluster, db: str, with_pgq_ext: bool = False) -> None:
    """A new database with the pgq extension (and our pgq_ext); the latency benchmark's too."""
    from airflow_provider_pgq.core import pgq_ext

    cluster.create_database(db)
    cluster.execute(db, "create extension pgq")
    if with_pgq_ext:
        conn = psycopg2.connect(cluster.dsn(db))
        try:
            pgq_ext.install(conn)
            conn.commit()
        finally:
            conn.close()


def set_up(cluster: ThrowawayCluster) -> None:
    for db, queue in ((SOURCE_DB, SOURCE_QUEUE), (TARGET_DB, TARGET_QUEUE)):
        pgq_database(cluster, db, with_pgq_ext=db == TARGET_DB)
        cluster.execute(db, "select pgq.create_queue(%s)", (queue,))
        cluster.execute(db, "select pgq.set_queue_config(%s, 'ticker_max_count', '1')", (queue,))


def one_tick(cluster: ThrowawayCluster, events: int) -> None:
    conn = psycopg2.connect(cluster.dsn(SOURCE_DB))
    try:
        with conn.cursor() as cur:
            cur.execute("select pgq.insert_event(%s, 'rt', 'event ' || n) from generate_series(1, %s) n",
                        (SOURCE_QUEUE, events))
        conn.commit()
        with conn.cursor() as cur:
            cur.execute("select pgq.ticker(%s)", (SOURCE_QUEUE,))
        conn.commit()
    finally:
        conn.close()


#: step -> (source turns, target turns): what the client sent in each round trip
TURNS: dict[str, tuple[list[str], list[str]]] = {}


def _step(counts: Counts, name: str, sp: CountingProxy, tp: CountingProxy, action: Callable[[], object]) -> None:
    sp.reset_both()
    tp.reset_both()
    action()
    TURNS[name] = (sp.turns(), tp.turns())
    counts[name] = (sp.reset_both(), tp.reset_both())


def ours(cluster: ThrowawayCluster, events: int, workdir: Path) -> Counts:
    from airflow_provider_pgq.core.connect import connect_unsettled
    from airflow_provider_pgq.core.mover import MoverOptions, QueueMover

    cluster.execute(SOURCE_DB, "select pgq.register_consumer(%s, 'ours')", (SOURCE_QUEUE,))
    counts: Counts = {}
    with CountingProxy(cluster.port) as sp, CountingProxy(cluster.port) as tp:
        conns: list[psycopg2.extensions.connection] = []

        def login() -> None:
            # as the CLI connects: the checks of the mover settle the connections
            conns.append(connect_unsettled(sp.dsn(cluster.dsn(SOURCE_DB)), side="source"))
            conns.append(connect_unsettled(tp.dsn(cluster.dsn(TARGET_DB)), side="target"))

        _step(counts, "set-up: login", sp, tp, login)
        mover = QueueMover(conns[0], conns[1], MoverOptions(SOURCE_QUEUE, TARGET_QUEUE, "ours"))
        _step(counts, "checks of a new mover (prepare)", sp, tp, mover.prepare)
        _step(counts, "idle poll", sp, tp, mover.next_batch)
        one_tick(cluster, events)

        def batch() -> None:
            taken = mover.next_batch()
            assert taken is not None
            mover.apply_batch(taken)

        _step(counts, f"batch of one tick, {events} events", sp, tp, batch)
        _step(counts, "idle drain of a prepared mover", sp, tp, mover.drain)
        for conn in conns:
            conn.close()
        ini = workdir / "ours.ini"
        ini.write_text(f"[queue_mover]\njob_name = rt_ours\nsrc_db = {sp.dsn(cluster.dsn(SOURCE_DB))}\n"
                       f"dst_db = {tp.dsn(cluster.dsn(TARGET_DB))}\npgq_queue_name = {SOURCE_QUEUE}\n"
                       f"dst_queue_name = {TARGET_QUEUE}\npgq_consumer_id = ours\n")
        command = [sys.executable, "-m", "airflow_provider_pgq.cli", "--once", str(ini)]
        _step(counts, "a whole --once over an empty queue", sp, tp,
              lambda: subprocess.run(command, check=True, capture_output=True, cwd=ROOT))
    return counts


def classic(cluster: ThrowawayCluster, events: int, workdir: Path) -> Counts | str:
    if importlib.util.find_spec("pgq") is None:
        return "skipped: the classic needs PyPI's pgq package (.venv/bin/pip install pgq)"
    from benchmarks.classic_mover import ClassicMover, ini_text

    cluster.execute(SOURCE_DB, "select pgq.register_consumer(%s, 'classic')", (SOURCE_QUEUE,))
    counts: Counts = {}
    with CountingProxy(cluster.port) as sp, CountingProxy(cluster.port) as tp:
        ini = workdir / "classic.ini"
        ini.write_text(ini_text(sp.dsn(cluster.dsn(SOURCE_DB)), tp.dsn(cluster.dsn(TARGET_DB)), SOURCE_QUEUE,
                                TARGET_QUEUE, "classic", str(workdir / "classic.log")))
        mover = ClassicMover([str(ini), "-q"])
        # skytools connects on first use: the first poll carries its set-up
        _step(counts, "set-up and first (idle) poll", sp, tp, mover.work)
        _step(counts, "idle poll", sp, tp, mover.work)
        one_tick(cluster, events)
        _step(counts, f"batch of one tick, {events} events", sp, tp, mover.work)
        _step(counts, "idle poll after a batch", sp, tp, mover.work)
    return counts


def report(title: str, counts: Counts | str, verbose: bool = False) -> None:
    print(f"\n{title}")
    if isinstance(counts, str):
        print(f"  {counts}")
        return
    print(f"  {'step':<42} {'source trips':>12} {'queries':>8} {'target trips':>12} {'queries':>8}")
    for step, ((st, sq), (tt, tq)) in counts.items():
        print(f"  {step:<42} {st:>12} {sq:>8} {tt:>12} {tq:>8}")
    if verbose:
        print("  what the client sent in each round trip (ssl: the SSL request; startup; p: a login step;"
              " Q: a query string; d/c: COPY data/done; the goodbye, which waits for no answer, is no round trip):")
        for step in counts:
            for side, turns in zip(("source", "target"), TURNS.get(step, ([], [])), strict=True):
                print(f"    {step} / {side}: {' | '.join(turns) or '-'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100, help="events in the one-tick batch")
    parser.add_argument("--turns", action="store_true", help="print what the client sent in each round trip")
    args = parser.parse_args(argv)
    cluster = ThrowawayCluster().start()
    workdir = Path(tempfile.mkdtemp(prefix="pgq-rt-"))
    try:
        set_up(cluster)
        report("ours (airflow-provider-pgq)", ours(cluster, args.events, workdir), args.turns)
        report("classic (python-pgq SerialConsumer, benchmarks/classic_mover.py)",
               classic(cluster, args.events, workdir), args.turns)
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
