"""Demo body: see scripts/demo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from airflow_provider_pgq.core import pgq
from airflow_provider_pgq.core.connect import connect
from tests.support.cluster import ThrowawayCluster
from tests.support.pgqd import Pgqd

ROOT = Path(__file__).resolve().parents[1]
EVENTS = 20_000
CONSUMER = "eventlog_to_batch_mover"  # the example DAG's consumer_name

SUMMARY = (
    "select count(*), md5(coalesce(string_agg(concat_ws('|', ev_type, ev_data, ev_extra1, ev_extra2,"
    " ev_extra3, ev_extra4, ev_time), E'\\n' order by ev_time, ev_data), '')) from pgq.event_template"
    " where tableoid::regclass::text like (select queue_data_pfx || '\\_%%' from pgq.queue"
    " where queue_name = 'eventlog')"
)


def airflow(home: Path, cluster: ThrowawayCluster, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags" / "examples"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW_CONN_PGQ_OLTP": cluster.uri("demo_oltp"),
        "AIRFLOW_CONN_PGQ_BATCH": cluster.uri("demo_batch"),
    })
    airflow_bin = str(Path(sys.executable).with_name("airflow"))
    proc = subprocess.run([airflow_bin, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-5000:], proc.stderr[-5000:])
        raise SystemExit(f"airflow {' '.join(args)} failed ({proc.returncode})")
    for line in (proc.stdout + proc.stderr).splitlines():
        if "queue_mover.py" in line and ("batch " in line or "moved " in line):
            print("   ", line.strip()[:160])


def main() -> int:
    print("== starting a throwaway PostgreSQL with PgQ")
    cluster = ThrowawayCluster().start()
    work = Path(tempfile.mkdtemp(prefix="pgq-demo-"))
    daemon = Pgqd(cluster, work)
    try:
        for db in ("demo_oltp", "demo_batch"):
            cluster.create_database(db)
            cluster.execute(db, "create extension pgq")
            cluster.execute(db, "select pgq.create_queue('eventlog')")
        daemon.watch("demo_oltp")
        oltp = connect(cluster.dsn("demo_oltp"))
        pgq.register_consumer(oltp, "eventlog", CONSUMER)
        oltp.commit()
        print(f"== producing {EVENTS} events into demo_oltp.eventlog")
        with oltp.cursor() as cur:
            for start in range(0, EVENTS, 1000):
                cur.execute(
                    "select pgq.insert_event('eventlog', 'order.created', 'order ' || i,"
                    " 'shop-' || (i %% 5), case when i %% 3 = 0 then null else 'eur' end, null, null)"
                    " from generate_series(%s, %s) i", (start, start + 999))
                oltp.commit()
        oltp.close()
        print("== airflow db migrate; airflow dags test example_pgq_oltp_to_batch")
        airflow(work, cluster, "db", "migrate")
        airflow(work, cluster, "dags", "test", "example_pgq_oltp_to_batch")
        src = cluster.execute("demo_oltp", SUMMARY)[0]
        dst = cluster.execute("demo_batch", SUMMARY)[0]
        print()
        print(f"{'':10} {'demo_oltp (source)':>36} {'demo_batch (target)':>36}")
        print(f"{'events':10} {src[0]:>36} {dst[0]:>36}")
        print(f"{'checksum':10} {src[1]:>36} {dst[1]:>36}")
        same = src == dst and src[0] == EVENTS
        print("\nRESULT:", "every event arrived exactly once" if same else "MISMATCH")
        return 0 if same else 1
    finally:
        daemon.stop()
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
