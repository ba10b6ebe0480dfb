"""Fixtures: one throwaway PostgreSQL with PgQ per test session (in /dev/shm when it
can, see tests/support/cluster.py; or PGQ_TEST_DSN), fresh databases per test cloned
from a template that has the pgq extension (and pgq_ext, for make_db(ext=True)), a real
pgqd, and real Airflow: one migrated sqlite metadata database per session and
run_dag(), which runs a DAG with dag.test() in a long-lived Airflow worker subprocess
(one per DAGs folder, see tests/airflow/runner.py). Tiers and the xdist work units:
docs/testing.md."""

from __future__ import annotations

import dataclasses
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import psycopg2
import pytest
from psycopg2 import sql
from psycopg2.extensions import parse_dsn

from airflow_provider_pgq.core import pgq_ext
from airflow_provider_pgq.core.connect import connect
from airflow_provider_pgq.core.mover import MoverOptions
from tests.airflow.runner import read_result
from tests.helpers import CLASSIC_BATCHES, EXAMPLES, ROOT, DagRunner, Server, create_queue
from tests.support.chroot import new_cluster
from tests.support.cluster import ThrowawayCluster, memory_dir
from tests.support.pgbouncer import PgBouncer
from tests.support.pgqd import Pgqd


class _ExistingServer(ThrowawayCluster):
    """PGQ_TEST_DSN: a superuser DSN on a running server that has PgQ installed: any
    superuser name, a password or none (a server that trusts the tests' address).
    What only a cluster of our own has (its OS user, socket folder, log file, data
    folder, pg_ctl) skips the test that needs it, saying why."""

    shared = True

    def __init__(self, dsn: str) -> None:  # noqa: D107 - no cluster of our own
        parts = parse_dsn(dsn) if "://" not in dsn else _uri_parts(dsn)
        self.port = int(parts.get("port", 5432))
        self.password = parts.get("password", "")
        self.host = parts.get("host", "127.0.0.1")
        self.superuser = parts.get("user", "postgres")
        self.major = int(self.execute("postgres", "select current_setting('server_version_num')::int")[0][0]) // 10000
        self.checks_passwords = self._refuses_wrong_password()

    def _refuses_wrong_password(self) -> bool:
        """Whether the server refuses the superuser with a wrong password (tests of
        password errors skip on a server that trusts the tests' address)."""
        wrong = "wrong-" + uuid.uuid4().hex
        try:
            psycopg2.connect(self.dsn("postgres", password=wrong), connect_timeout=10).close()
        except psycopg2.OperationalError:
            return True
        return False

    def _not_here(self, what: str) -> Any:
        pytest.skip(f"PGQ_TEST_DSN names a shared server: this test needs {what} of a throwaway cluster of its own")

    @property
    def os_user(self) -> str | None:  # type: ignore[override]
        return self._not_here("the server's OS user")  # type: ignore[no-any-return]

    @property
    def sockdir(self) -> Path:  # type: ignore[override]
        return self._not_here("the server's socket folder")  # type: ignore[no-any-return]

    @property
    def logfile(self) -> Path:  # type: ignore[override]
        return self._not_here("the server's log file")  # type: ignore[no-any-return]

    @property
    def datadir(self) -> Path:  # type: ignore[override]
        return self._not_here("the server's data folder")  # type: ignore[no-any-return]

    def pg_ctl(self, action: str, mode: str = "fast") -> None:
        self._not_here(f"to {action} the server")

    def kill9(self) -> None:
        self._not_here("to crash the server")

    def stop(self) -> None:
        pass


def _uri_parts(uri: str) -> dict[str, str]:
    u = urlparse(uri)
    parts = {"host": u.hostname or "127.0.0.1", "port": str(u.port or 5432), "user": unquote(u.username or "postgres"),
             "password": unquote(u.password or "")}
    return parts


#: per xdist worker (PYTEST_XDIST_WORKER: gw0, gw1, ...), as the workers may share a
#: server (PGQ_TEST_DSN); each throwaway cluster is per worker anyway
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
TEMPLATE = "pgq_test_template" + (f"_{_WORKER}" if _WORKER else "")
#: TEMPLATE plus pgq_ext as pgq_ext.install() leaves it: make_db(ext=True) clones it
#: (tests of the installation itself call pgq_ext.install on a database without it)
TEMPLATE_EXT = TEMPLATE + "_ext"

STORM_MODULES = ("test_fast_faults.py", "test_quiet_faults.py", "test_pooled_storm.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tiers, so that -m "not airflow and not storm and not system" is a fast loop:
    tests that start Airflow (they use its metadata database) and the fault suites."""
    shared = bool(os.environ.get("PGQ_TEST_DSN"))
    for item in items:
        if "airflow_home" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.airflow)
        if item.path.name in STORM_MODULES:
            item.add_marker(pytest.mark.storm)
            if shared:
                item.add_marker(pytest.mark.skip(reason=(
                    "PGQ_TEST_DSN names a shared server: the storm tier needs clusters of its own"
                    " (it restarts, crashes and fills them); run it without PGQ_TEST_DSN")))


def _airflow_modules() -> set[str]:
    """Test modules (paths as in node ids) that start Airflow: tests/system and every
    module that uses run_dag or airflow_home."""
    tests = Path(__file__).parent
    return {
        str(path.relative_to(ROOT))
        for path in tests.rglob("test_*.py")
        if path.is_relative_to(tests / "system") or any(w in path.read_text() for w in ("run_dag", "airflow_home"))
    }


class _XdistTiers:
    """With -n N --dist loadgroup (scripts/run-tests): every module that starts Airflow is
    one work unit (on two cores two Airflows at once starve each other: a system test
    timed out so; and the Airflow workers and the deployment are set up once), each storm
    module is one (it shares a second cluster), every other test is a unit of its own;
    units go out largest first. (Our own scopes: xdist's xdist_group suffix on node ids
    has no effect with pytest 9.) A plugin of its own, registered only where xdist is."""

    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        if config.getvalue("dist") != "loadgroup":
            return None
        from xdist.scheduler import LoadScopeScheduling

        airflow = _airflow_modules()

        class TierScheduling(LoadScopeScheduling):  # type: ignore[misc]
            def _split_scope(self, nodeid: str) -> str:
                module = nodeid.split("::", 1)[0]
                if module in airflow:
                    return "airflow"
                if Path(module).name in STORM_MODULES:
                    return module
                return nodeid

        return TierScheduling(config, log)


def pytest_configure(config: pytest.Config) -> None:
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistTiers(), "pgq-xdist-tiers")


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
    c: ThrowawayCluster = _ExistingServer(existing) if existing else new_cluster()
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


@pytest.fixture(scope="session")
def bouncer(cluster: ThrowawayCluster) -> Iterator[PgBouncer]:
    """A real PgBouncer in transaction pooling in front of the cluster: two server
    sessions per database and login, used round robin."""
    with PgBouncer(cluster, "transaction", pool_size=2) as b:
        yield b


@pytest.fixture
def make_db(cluster: ThrowawayCluster) -> Iterator[Callable[..., Server]]:
    """make_db(queue=None, pgq=True, ext=False, encoding=None) -> Server: a fresh database;
    with encoding (e.g. 'SQL_ASCII', 'LATIN1') one of that encoding and the C locale, made
    from template0, so pgq (and pgq_ext) are created in it, not cloned."""
    made: list[str] = []

    def make(queue: str | None = None, pgq: bool = True, ext: bool = False, encoding: str | None = None) -> Server:
        name = f"t_{uuid.uuid4().hex[:12]}"
        if ext and not pgq:
            raise ValueError("pgq_ext needs pgq")
        if encoding is None:
            cluster.create_database(name, (TEMPLATE_EXT if ext else TEMPLATE) if pgq else "template0")
        else:
            cluster.execute("postgres", sql.SQL(
                "create database {} encoding {} template template0 lc_collate 'C' lc_ctype 'C'"
            ).format(sql.Identifier(name), sql.Literal(encoding)))
        made.append(name)
        server = Server(cluster, name)
        if encoding is not None and pgq:
            server.execute("create extension pgq")
            if ext:
                conn = server.connect()
                try:
                    pgq_ext.install(conn)
                finally:
                    conn.close()
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
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One migrated metadata database per session (sqlite; in memory_dir() when there
    is one, as sqlite syncs each of the many commits of a DAG run)."""
    shm = memory_dir()
    home = Path(tempfile.mkdtemp(prefix="airflow_home-", dir=shm)) if shm else tmp_path_factory.mktemp("airflow_home")
    env = _base_env(home, EXAMPLES)
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True,
                   capture_output=True, cwd=ROOT)
    yield home
    if shm:
        shutil.rmtree(home, ignore_errors=True)


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


class AirflowWorker:
    """One long-lived `python -m tests.airflow.runner --serve` for one DAGs folder:
    Airflow is imported and the folder parsed once, then it runs DAG after DAG (each
    with its own connections and environment, its output in its own log)."""

    def __init__(self, home: Path, folder: Path) -> None:
        self.home, self.folder = home, folder
        self.lock = threading.Lock()
        self.stderr = open(home / "worker.stderr", "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.airflow.runner", "--serve"], env=_base_env(home, folder), cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
        )
        if self._reply(600) != "READY":
            tail = self._stderr_tail()
            self.stop()
            raise AssertionError(f"the Airflow worker for {folder} did not start:\n{tail}")

    def _reply(self, timeout: float) -> str | None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return line.strip() or None

    def _stderr_tail(self) -> str:
        self.stderr.flush()
        return (self.home / "worker.stderr").read_text(errors="replace")[-6000:]

    def run(self, dag_id: str, logical_date: str, env: dict[str, str], log: Path,
            timeout: float = 600) -> tuple[int | None, str]:
        """(rc or None when the worker died or timed out, the run's output)."""
        assert self.proc.stdin is not None
        request = {"dag_id": dag_id, "logical_date": logical_date, "env": env, "log": str(log)}
        with self.lock:
            try:
                self.proc.stdin.write(json.dumps(request) + "\n")
                self.proc.stdin.flush()
                answer = self._reply(timeout)
            except OSError:
                answer = None
        out = log.read_text(errors="replace") if log.exists() else ""
        if answer is None:
            tail = self._stderr_tail()
            self.stop()
            return None, out + tail
        return int(json.loads(answer)["rc"]), out

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self.stderr.close()


@pytest.fixture(scope="session")
def airflow_workers(airflow_home: Path) -> Iterator[Callable[[Path], AirflowWorker]]:
    """worker(dags_folder): that folder's AirflowWorker, started on first use (a dead
    one is replaced). The examples folder uses airflow_home; every other folder its own
    copy of it, so that the DAG bundle of another folder never mixes in."""
    workers: dict[Path, AirflowWorker] = {}
    homes: list[Path] = []
    lock = threading.Lock()

    def get(folder: Path) -> AirflowWorker:
        with lock:
            worker = workers.get(folder)
            if worker is None or not worker.alive:
                home = airflow_home
                if folder != EXAMPLES:
                    home = airflow_home.parent / f"{airflow_home.name}-{len(workers)}-{folder.name}"
                    homes.append(home)
                    if not home.exists():
                        shutil.copytree(airflow_home, home, ignore=shutil.ignore_patterns("worker.stderr", "logs"))
                worker = workers[folder] = AirflowWorker(home, folder)
            return worker

    yield get
    for worker in workers.values():
        worker.stop()
    for home in homes:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def run_dag(airflow_workers: Callable[[Path], AirflowWorker], tmp_path: Path) -> DagRunner:
    """run_dag(dag_id, conns={conn_id: uri}, logical_date=..., env={}, dags_folder=None)."""
    runs = iter(range(1_000_000))

    def run(dag_id: str, conns: dict[str, str], logical_date: str = "2026-06-01T12:00:00+00:00",
            env: dict[str, str] | None = None, dags_folder: Path | None = None) -> dict[str, Any]:
        worker = airflow_workers(dags_folder or EXAMPLES)
        request_env = {f"AIRFLOW_CONN_{k.upper()}": v for k, v in conns.items()}
        request_env.update(env or {})
        log = tmp_path / f"dag-run-{next(runs)}-{dag_id}.log"
        rc, output = worker.run(dag_id, logical_date, request_env, log)
        result = read_result(output)
        if result is None:
            raise AssertionError(f"DAG {dag_id} did not report (rc {rc}):\n{output[-10000:]}")
        result["log"] = output
        return result

    return run
