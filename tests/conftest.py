"""Fixtures: one throwaway PostgreSQL with PgQ per test session (or PGQ_TEST_DSN),
fresh databases per test cloned from a template that has the pgq extension, a real
pgqd, and real Airflow: one migrated sqlite metadata database per session and
run_dag(), which runs a DAG with dag.test() in a subprocess."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from psycopg2.extensions import parse_dsn

from airflow_provider_pgq.core import pgq_ext
from airflow_provider_pgq.core.connect import connect
from airflow_provider_pgq.core.mover import MoverOptions
from tests.helpers import CLASSIC_BATCHES, EXAMPLES, ROOT, DagRunner, Server, create_queue
from tests.support.cluster import ThrowawayCluster
from tests.support.pgqd import Pgqd


class _ExistingServer(ThrowawayCluster):
    """PGQ_TEST_DSN: a superuser DSN on a running server that has PgQ installed."""

    def __init__(self, dsn: str) -> None:  # noqa: D107 - no cluster of our own
        parts = parse_dsn(dsn) if "://" not in dsn else _uri_parts(dsn)
        self.port = int(parts.get("port", 5432))
        self.password = parts.get("password", "")
        self._host = parts.get("host", "127.0.0.1")
        self._user = parts.get("user", "postgres")

    def dsn(self, dbname: str = "postgres", user: str | None = None, password: str | None = None) -> str:
        user = user or self._user
        pw = self.password if password is None and user == self._user else password
        return f"host={self._host} port={self.port} dbname={dbname} user={user}" + (
            f" password={pw}" if pw else ""
        )

    def stop(self) -> None:
        pass


def _uri_parts(uri: str) -> dict[str, str]:
    u = urlparse(uri)
    return {"host": u.hostname or "127.0.0.1", "port": str(u.port or 5432), "user": u.username or "postgres",
            "password": u.password or ""}


TEMPLATE = "pgq_test_template"
#: TEMPLATE plus pgq_ext as pgq_ext.install() leaves it: make_db(ext=True) clones it
#: (tests of the installation itself call pgq_ext.install on a database without it)
TEMPLATE_EXT = "pgq_test_template_ext"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tiers, so that -m "not airflow and not storm and not system" is a fast loop:
    tests that start Airflow (they use its metadata database) and the fault suites."""
    for item in items:
        if "airflow_home" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.airflow)
        if item.path.name in ("test_fast_faults.py", "test_quiet_faults.py"):
            item.add_marker(pytest.mark.storm)


@pytest.fixture(autouse=True)
def classic_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """MoverOptions built in tests move one tick a batch unless they say otherwise (see
    tests.helpers.CLASSIC_BATCHES); movers in other processes are told the same."""
    defaults = tuple(
        CLASSIC_BATCHES if f.name == "batch_target_events" else f.default
        for f in dataclasses.fields(MoverOptions)
        if f.default is not dataclasses.MISSING
    )
    monkeypatch.setattr(MoverOptions.__init__, "__defaults__", defaults)


@pytest.fixture(scope="session")
def cluster() -> Iterator[ThrowawayCluster]:
    existing = os.environ.get("PGQ_TEST_DSN")
    c: ThrowawayCluster = _ExistingServer(existing) if existing else ThrowawayCluster(in_memory=True).start()
    try:
        for name in (TEMPLATE_EXT, TEMPLATE):
            c.drop_database(name)
        c.create_database(TEMPLATE)
        c.execute(TEMPLATE, "create extension if not exists pgq")
        c.create_database(TEMPLATE_EXT, TEMPLATE)
        conn = connect(c.dsn(TEMPLATE_EXT))
        try:
            pgq_ext.install(conn)
        finally:
            conn.close()
        yield c
    finally:
        for name in (TEMPLATE_EXT, TEMPLATE):
            c.drop_database(name)
        c.stop()


@pytest.fixture
def make_db(cluster: ThrowawayCluster) -> Iterator[Callable[..., Server]]:
    """make_db(queue=None, pgq=True, ext=False) -> Server: a fresh database."""
    made: list[str] = []

    def make(queue: str | None = None, pgq: bool = True, ext: bool = False) -> Server:
        name = f"t_{uuid.uuid4().hex[:12]}"
        if ext and not pgq:
            raise ValueError("pgq_ext needs pgq")
        cluster.create_database(name, (TEMPLATE_EXT if ext else TEMPLATE) if pgq else "template0")
        made.append(name)
        server = Server(cluster, name)
        if queue:
            create_queue(server, queue)
        return server

    yield make
    for name in made:
        cluster.drop_database(name)


@pytest.fixture
def source(make_db: Callable[..., Server]) -> Server:
    return make_db(queue="src_q")


@pytest.fixture
def target(make_db: Callable[..., Server]) -> Server:
    return make_db(queue="dst_q", ext=True)


@pytest.fixture
def pgqd(cluster: ThrowawayCluster, tmp_path: Path) -> Iterator[Pgqd]:
    """A real pgqd; pgqd.watch(dbname, ...) makes it tick those databases."""
    daemon = Pgqd(cluster, tmp_path)
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("airflow_home")
    env = _base_env(home, EXAMPLES)
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True,
                   capture_output=True, cwd=ROOT)
    return home


def _base_env(home: Path, dags: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "AIRFLOW__"))}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "PYTHONPATH": str(ROOT),
    })
    return env


@pytest.fixture
def run_dag(airflow_home: Path, tmp_path: Path) -> DagRunner:
    """run_dag(dag_id, conns={conn_id: uri}, logical_date=..., env={}, dags_folder=None)."""

    def run(dag_id: str, conns: dict[str, str], logical_date: str = "2026-06-01T12:00:00+00:00",
            env: dict[str, str] | None = None, dags_folder: Path | None = None) -> dict[str, Any]:
        folder = dags_folder or EXAMPLES
        home = airflow_home
        if dags_folder is not None:
            # Its own metadata copy, so the DAG bundle of another folder never mixes in.
            home = tmp_path / "airflow_home"
            if not home.exists():
                shutil.copytree(airflow_home, home)
        full = _base_env(home, folder)
        full.update({f"AIRFLOW_CONN_{k.upper()}": v for k, v in conns.items()})
        full.update(env or {})
        proc = subprocess.run(
            [sys.executable, "-m", "tests.airflow.runner", dag_id, logical_date],
            env=full, capture_output=True, text=True, cwd=ROOT, timeout=600,
        )
        out = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if not out:
            raise AssertionError(f"DAG {dag_id} did not report (rc {proc.returncode}):\n"
                                 f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
        result: dict[str, Any] = json.loads(out[-1][len("RESULT "):])
        result["log"] = proc.stdout + proc.stderr
        return result

    return run
