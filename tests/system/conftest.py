"""The real Airflow deployment the system tests share (one per session: starting it
takes a minute): four Airflow components, pgqd, and the source, target, partition and
central databases. The tests run in file order and each compares queues event by event.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from airflow_provider_pgq.core import pgq_ext
from tests.conftest import TEMPLATE
from tests.helpers import EXAMPLES, ROOT, Server, create_queue, register
from tests.support.cluster import ThrowawayCluster
from tests.support.pgqd import Pgqd
from tests.system.deployment import Deployment

SYSTEM_DAGS = Path(__file__).parent / "dags"
PARTITION_DAG = "example_pgq_partition_consolidation"
QUEUES = ("bf", "bm0", "bm1", "dr", "sn", "ed", "tq")
#: The DAG the auth manager refuses to the user "outsider" (tests/system/auth.py).
HIDDEN_DAG = "pgq_sys_event"
#: The outsider may read this DAG, not its task instances (so not what its runs rendered).
TEMPLATED_DAG = "pgq_sys_templated"
#: The deployment's [pgq] ui_stuck_seconds.
STUCK_SECONDS = 5


@dataclass
class System:
    airflow: Deployment
    src: Server
    dst: Server
    parts: list[Server]
    central: Server
    work: Path


def _db(cluster: ThrowawayCluster, name: str, made: list[str], *queues: str) -> Server:
    cluster.create_database(name, TEMPLATE)
    made.append(name)
    server = Server(cluster, name)
    for q in queues:
        create_queue(server, q)
    return server


@pytest.fixture(scope="session")
def system(cluster: ThrowawayCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    work = tmp_path_factory.mktemp("deployment")
    dags = work / "dags"
    dags.mkdir()
    shutil.copy(SYSTEM_DAGS / "pgq_system_dags.py", dags)
    shutil.copy(EXAMPLES / f"{PARTITION_DAG}.py", dags)
    made: list[str] = []
    pgqd = Pgqd(cluster, work)
    airflow: Deployment | None = None
    try:
        src = _db(cluster, "sys_src", made, *QUEUES)
        dst = _db(cluster, "sys_dst", made, *QUEUES)
        parts = [_db(cluster, f"sys_part_{i}", made, "events") for i in range(2)]
        central = _db(cluster, "sys_central", made, "events_all")
        conn = dst.connect()
        try:
            pgq_ext.install(conn)
        finally:
            conn.close()
        for q in ("dr", "sn", "ed"):
            register(src, q, f"{q}_mover")
        pgqd.watch(*(p.dbname for p in parts))  # the partition example forces ticks
        conns = {"pgq_sys_src": src.uri(), "pgq_sys_dst": dst.uri(), "pgq_central": central.uri(),
                 "pgq_part_0": parts[0].uri(), "pgq_part_1": parts[1].uri(),
                 "pgq_part_down": "postgresql://nobody:nopass@127.0.0.1:1/none?connect_timeout=2"}
        airflow = Deployment(cluster, work, dags, ROOT, conns,
                             env={"PGQ_PARTITION_CONN_IDS": "pgq_part_0,pgq_part_1,pgq_part_down",
                                  "PGQ_TEST_HIDDEN_DAGS": f"outsider:{HIDDEN_DAG}",
                                  "PGQ_TEST_NO_TASK_INSTANCES": f"outsider:{TEMPLATED_DAG}",
                                  # the page's numbers are compared with the databases right after
                                  "AIRFLOW__PGQ__UI_CACHE_SECONDS": "0",
                                  # a batch left open this long reads "stuck" (test_pgq_page.py);
                                  # the system DAGs' batches move in well under a second
                                  "AIRFLOW__PGQ__UI_STUCK_SECONDS": str(STUCK_SECONDS),
                                  "PGQ_TEST_SPANS": str(work / "spans.jsonl")})
        airflow.start()
        airflow.wait_for_dags(["pgq_sys_backfill", "pgq_sys_backfill_mapped", "pgq_sys_drain", "pgq_sys_sensor",
                               "pgq_sys_event", "pgq_sys_templated", PARTITION_DAG])
        yield System(airflow, src, dst, parts, central, work)
    finally:
        if airflow is not None:
            airflow.stop()
        pgqd.stop()
        for name in made:
            cluster.drop_database(name)
