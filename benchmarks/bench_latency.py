"""Near real time: how long an event takes from the source's commit to the target's,
ours against the classic, over links of 0, 10 and 30 ms round-trip time.

    python -m benchmarks.bench_latency [--seconds 15] [--rtt 0,10,30] [--rate 200]

One throwaway cluster (track_commit_timestamp on) with a source and a target database,
pgqd ticking the source once a second (ticker_period = 1), a producer committing
--rate events a second in small transactions. Each tool runs as its own daemon process
(loop_delay = 1) for --seconds, both connections through a delaying proxy (half the
round-trip time each way, tests/support/roundtrips.py), with its own consumer and
target queue. Per event moved: end to end (target commit time, from the commit
timestamp of its row, minus the source's ev_time) and tick to commit (minus the time of
the tick that closed it: the first tick whose event sequence reaches its ev_id).
Printed: p50, p95 and max of both, per tool and link. A figure, never a pass/fail.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg2
from psycopg2 import sql

from tests.support.cluster import ThrowawayCluster
from tests.support.roundtrips import CountingProxy

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DB, TARGET_DB, SOURCE_QUEUE = "lat_src", "lat_dst", "lat_q"


def _cluster() -> ThrowawayCluster:
    cluster = ThrowawayCluster()
    cluster.start()
    with open(cluster.datadir / "postgresql.conf", "a") as conf:
        conf.write("\ntrack_commit_timestamp = on\n")
    cluster.pg_ctl("restart")
    return cluster


def _pgqd(cluster: ThrowawayCluster, workdir: Path) -> subprocess.Popen[bytes]:
    ini = workdir / "pgqd.ini"
    base = cluster.dsn("postgres").replace(" dbname=postgres", "")
    ini.write_text(f"[pgqd]\nlogfile = {workdir / 'pgqd.log'}\npidfile = {workdir / 'pgqd.pid'}\n"
                   f"base_connstr = {base}\ninitial_database = postgres\ndatabase_list = {SOURCE_DB}\n"
                   "check_period = 1\nticker_period = 1\nretry_period = 1\nmaint_period = 60\n")
    ini.chmod(0o600)
    return subprocess.Popen(["pgqd", str(ini)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Producer(threading.Thread):
    def __init__(self, cluster: ThrowawayCluster, rate: int) -> None:
        super().__init__(daemon=True)
        self.cluster, self.rate, self.stopped = cluster, rate, threading.Event()

    def run(self) -> None:
        conn = psycopg2.connect(self.cluster.dsn(SOURCE_DB))
        n = 0
        per = max(1, self.rate // 20)
        while not self.stopped.is_set():
            with conn.cursor() as cur:
                cur.execute("select pgq.insert_event(%s, 'lat', 'e' || g) from generate_series(%s, %s) g",
                            (SOURCE_QUEUE, n, n + per - 1))
            conn.commit()
            n += per
            time.sleep(0.05)
        conn.close()


def _set_up(cluster: ThrowawayCluster) -> None:
    from benchmarks.bench_roundtrips import pgq_database

    pgq_database(cluster, SOURCE_DB)
    pgq_database(cluster, TARGET_DB, with_pgq_ext=True)
    cluster.execute(SOURCE_DB, "select pgq.create_queue(%s)", (SOURCE_QUEUE,))
    cluster.execute(SOURCE_DB, "select pgq.set_queue_config(%s, 'ticker_max_lag', '1 second')", (SOURCE_QUEUE,))
    cluster.execute(SOURCE_DB, "select pgq.set_queue_config(%s, 'ticker_max_count', '100000')", (SOURCE_QUEUE,))


def _command(tool: str, cluster: ThrowawayCluster, sp: CountingProxy, tp: CountingProxy, queue: str,
             workdir: Path) -> list[str]:
    src, dst = sp.dsn(cluster.dsn(SOURCE_DB)), tp.dsn(cluster.dsn(TARGET_DB))
    ini = workdir / f"{queue}.ini"
    if tool == "ours":
        ini.write_text(f"[queue_mover]\njob_name = {queue}\nsrc_db = {src}\ndst_db = {dst}\n"
                       f"pgq_queue_name = {SOURCE_QUEUE}\ndst_queue_name = {queue}\npgq_consumer_id = {queue}\n"
                       "loop_delay = 1\n")
        return [sys.executable, "-m", "airflow_provider_pgq.cli", str(ini)]
    from benchmarks.classic_mover import ini_text

    ini.write_text(ini_text(src, dst, SOURCE_QUEUE, queue, queue, str(workdir / f"{queue}.log"))
                   .replace("loop_delay = 0", "loop_delay = 1"))
    code = "import sys; from benchmarks.classic_mover import ClassicMover; ClassicMover([sys.argv[1], '-q']).start()"
    return [sys.executable, "-c", code, str(ini)]


def _parent(cluster: ThrowawayCluster, db: str, queue: str) -> sql.Identifier:
    pfx = str(cluster.execute(db, "select queue_data_pfx from pgq.queue where queue_name = %s", (queue,))[0][0])
    schema, _, table = pfx.partition(".")
    return sql.Identifier(schema, table)


def _measure(cluster: ThrowawayCluster, queue: str, since: float) -> tuple[list[float], list[float]]:
    rows = cluster.execute(TARGET_DB, sql.SQL(
        "select ev_data, extract(epoch from pg_xact_commit_timestamp(xmin)) from {}").format(
        _parent(cluster, TARGET_DB, queue)))
    committed = {str(d): float(c) for d, c in rows}
    source = cluster.execute(SOURCE_DB, sql.SQL(
        "select e.ev_data, extract(epoch from e.ev_time),"
        " (select extract(epoch from k.tick_time) from pgq.tick k join pgq.queue q on q.queue_id = k.tick_queue"
        "   where q.queue_name = %s and k.tick_event_seq >= e.ev_id order by k.tick_id limit 1)"
        " from {} e where e.ev_time >= to_timestamp(%s)").format(_parent(cluster, SOURCE_DB, SOURCE_QUEUE)),
        (SOURCE_QUEUE, since))
    e2e, reaction = [], []
    for data, ev_time, tick_time in source:
        at = committed.get(str(data))
        if at is None:
            continue
        e2e.append(at - float(ev_time))
        if tick_time is not None:
            reaction.append(at - float(tick_time))
    return e2e, reaction


def _stats(values: list[float]) -> str:
    if not values:
        return f"{'-':>7} {'-':>7} {'-':>7}"
    values = sorted(values)
    return (f"{statistics.median(values):>7.2f} {values[min(len(values) - 1, int(0.95 * len(values)))]:>7.2f}"
            f" {values[-1]:>7.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rtt", default="0,10,30", help="round-trip times in ms, comma-separated")
    parser.add_argument("--rate", type=int, default=200, help="events a second")
    args = parser.parse_args(argv)
    tools = ["ours"] + (["classic"] if importlib.util.find_spec("pgq") is not None else [])
    cluster = _cluster()
    workdir = Path(tempfile.mkdtemp(prefix="pgq-latency-"))
    os.chmod(workdir, 0o755)
    results: list[tuple[str, int, list[float], list[float]]] = []
    pgqd = None
    try:
        _set_up(cluster)
        pgqd = _pgqd(cluster, workdir)
        producer = Producer(cluster, args.rate)
        producer.start()
        for rtt in (int(x) for x in args.rtt.split(",")):
            for tool in tools:
                queue = f"lat_{tool}_{rtt}"
                cluster.execute(TARGET_DB, "select pgq.create_queue(%s)", (queue,))
                cluster.execute(SOURCE_DB, "select pgq.register_consumer(%s, %s)", (SOURCE_QUEUE, queue))
                with CountingProxy(cluster.port, delay=rtt / 2000) as sp, \
                        CountingProxy(cluster.port, delay=rtt / 2000) as tp:
                    proc = subprocess.Popen(_command(tool, cluster, sp, tp, queue, workdir), cwd=ROOT,
                                            env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(3)  # connected and caught up
                    since = time.time()
                    time.sleep(args.seconds)
                    proc.send_signal(signal.SIGINT)  # both stop after the batch at hand
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                e2e, reaction = _measure(cluster, queue, since)
                results.append((tool, rtt, e2e, reaction))
                print(f"  {tool} at {rtt} ms: {len(e2e)} events", flush=True)
        producer.stopped.set()
    finally:
        if pgqd is not None:
            pgqd.terminate()
            pgqd.wait(timeout=10)
        cluster.stop()
    print(f"\n{args.rate} events/s, pgqd ticker_period 1, loop_delay 1, {args.seconds:g}s a run;"
          f" {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; seconds")
    print(f"{'tool':<8} {'RTT':>5} {'events':>7}  {'end to end p50 p95 max':>23}  {'tick to commit p50 p95 max':>27}")
    for tool, rtt, e2e, reaction in results:
        print(f"{tool:<8} {rtt:>3}ms {len(e2e):>7}  {_stats(e2e)}  {_stats(reaction):>27}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
