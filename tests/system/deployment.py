"""A real Airflow deployment for the system tests: api-server, scheduler, dag-processor and
triggerer as separate processes, a PostgreSQL metadata database on the throwaway cluster,
and a client that drives it only through the REST API, as the UI does.

Executor: LocalExecutor (default), or CeleryExecutor with a broker URL (a Redis the tests
start, tests/support/redis.py), the metadata database as Celery's result backend, and
workers (``airflow celery worker``) started one by one with start_worker(); kill() stops
a component as a crash would (the whole process tree, SIGKILL).

Authentication: SimpleAuthManager's users (``USERS``, passwords written before the start)
through tests/system/auth.py, which can refuse single DAGs to a user; the client logs
in with ``POST /auth/token`` as a user and sends the JWT as a bearer token.
Every process is started in its own session (process group)
and stopped by that group's id, SIGTERM first, SIGKILL after a grace period.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import psutil

from tests.support.cluster import ThrowawayCluster, free_port

T = TypeVar("T")

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")

#: The deployment's users and their SimpleAuthManager roles.
#: operator: may read connections too (the simple auth manager's op role), as the PgQ
#: page needs to show a mover's databases and positions.
USERS = {"admin": "admin", "operator": "op", "viewer": "viewer", "outsider": "viewer"}


class DeploymentError(AssertionError):
    pass


class Deployment:
    """Start with start(), always stop() (the fixture does, even after a failure)."""

    def __init__(self, cluster: ThrowawayCluster, home: Path, dags: Path, root: Path,
                 conns: dict[str, str], env: dict[str, str] | None = None,
                 executor: str = "LocalExecutor", broker_url: str | None = None) -> None:
        if executor not in ("LocalExecutor", "CeleryExecutor"):
            raise ValueError(f"executor must be LocalExecutor or CeleryExecutor, got {executor!r}")
        if (executor == "CeleryExecutor") != (broker_url is not None):
            raise ValueError("CeleryExecutor needs a broker_url, LocalExecutor none")
        self.cluster = cluster
        self.home = home
        self.dags = dags
        self.port = free_port()
        self.metadata_db = f"airflow_meta_{secrets.token_hex(4)}"
        self.base = f"http://127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._tokens: dict[str, str] = {}
        self.passwords = {user: secrets.token_urlsafe(12) for user in USERS}
        self.user = "admin"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "AIRFLOW__"))}
        login = quote(cluster.superuser, safe="") + (":" + quote(cluster.password, safe="") if cluster.password else "")
        metadata = f"postgresql+psycopg2://{login}@{cluster.host}:{cluster.port}/{self.metadata_db}"
        self.env.update({
            "AIRFLOW_HOME": str(home),
            "PYTHONPATH": str(_tests_only(root, home)),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__CORE__EXECUTOR": executor,
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__AUTH_MANAGER": "tests.system.auth.DagRestrictedAuthManager",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:{r}" for u, r in USERS.items()),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base}/execution/",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata,
            "AIRFLOW__API__BASE_URL": self.base,
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "30",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
            # private ports for the log servers (8793 and 8794 by default), so that
            # deployments never meet
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        })
        if broker_url is not None:
            self.env.update({
                "AIRFLOW__CELERY__BROKER_URL": broker_url,
                # the metadata database, psycopg2 (the provider would pick psycopg 3 where installed)
                "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{metadata}",
            })
        self.env.update({f"AIRFLOW_CONN_{k.upper()}": v for k, v in conns.items()})
        self.env.update(env or {})

    # -- processes ------------------------------------------------------------------

    def _airflow(self, *args: str, timeout: float = 300) -> str:
        proc = subprocess.run([sys.executable, "-m", "airflow", *args], env=self.env, cwd=self.home,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise DeploymentError(f"airflow {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return proc.stdout

    def start(self) -> Deployment:
        self.cluster.create_database(self.metadata_db)
        (self.home / "passwords.json").write_text(json.dumps(self.passwords) + "\n")
        self._airflow("db", "migrate")
        for name in COMPONENTS:
            self._spawn(name, name)
        self.wait(lambda: self._health(), 120, "the api-server to answer")
        return self

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """``airflow <args>`` in a session of its own, its output in <home>/<name>.log."""
        log = open(self.home / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "airflow", *args], env=self.env, cwd=self.home,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        return self.procs[name]

    def start_worker(self, name: str, concurrency: int, timeout: float = 90) -> subprocess.Popen[bytes]:
        """A Celery worker ``<name>@<host>`` (CeleryExecutor), once it takes tasks. Its log
        server is off: workers on one host would share its port, and the api-server reads
        task logs from the shared log folder anyway."""
        if self.env["AIRFLOW__CORE__EXECUTOR"] != "CeleryExecutor":
            raise DeploymentError("start_worker() needs executor='CeleryExecutor'")
        proc = self._spawn(name, "celery", "worker", "--celery-hostname", f"{name}@%h",
                           "--concurrency", str(concurrency), "--skip-serve-logs",
                           "--pid", str(self.home / f"{name}.pid"))
        self.wait(lambda: f"{name}@" in (log := self.log_tail(name, 100_000)) and " ready." in log,
                  timeout, f"Celery worker {name} to be ready")
        return proc

    def worker_of(self, pid: int) -> str | None:
        """The component whose process tree holds process ``pid`` (a task's), if any."""
        try:
            ancestors = {p.pid for p in psutil.Process(pid).parents()}
        except psutil.NoSuchProcess:
            return None
        return next((name for name, proc in self.procs.items() if proc.pid in ancestors), None)

    def kill(self, name: str) -> None:
        """Component ``name`` dies as its machine would: every process of its tree (the
        Celery pool, the task supervisors, the task processes, which run in process groups
        of their own) stopped at once with SIGSTOP, then SIGKILL. It is no longer checked
        by check_alive()."""
        proc = self.procs.pop(name)
        tree = _tree(proc.pid)
        groups = {proc.pid}
        for pid in tree:
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for group in groups:
                _signal_group(group, sig)
        proc.wait(30)
        self.wait(lambda: not any(_alive(pid) for pid in tree), 30, f"every process of {name} to die")

    def _health(self) -> bool:
        self.check_alive()
        try:
            return httpx.get(f"{self.base}/api/v2/monitor/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise DeploymentError(f"airflow {name} exited ({proc.returncode}):\n{self.log_tail(name)}")

    def log_tail(self, name: str, chars: int = 4000) -> str:
        path = self.home / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self) -> None:
        """Every process group we started: SIGTERM, then SIGKILL what is left after 20 s,
        and then what is left of their trees (task processes run in groups of their own)."""
        trees = {pid for proc in self.procs.values() for pid in _tree(proc.pid, with_times=True)}
        for proc in self.procs.values():
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc.pid, signal.SIGKILL)  # stragglers in the group (task processes)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for pid, started in trees:
            try:
                straggler = psutil.Process(pid)
                if straggler.create_time() == started:  # not a recycled pid
                    straggler.kill()
            except psutil.NoSuchProcess:
                pass
        self.cluster.drop_database(self.metadata_db)

    # -- REST API, as the UI uses it ----------------------------------------------------

    def token(self, user: str) -> str:
        """A JWT for ``user``, as the UI's login form gets one."""
        if user not in self._tokens:
            r = httpx.post(f"{self.base}/auth/token", json={"username": user, "password": self.passwords[user]},
                           timeout=30)
            if r.status_code >= 300:
                raise DeploymentError(f"POST /auth/token as {user}: {r.status_code} {r.text}")
            self._tokens[user] = r.json()["access_token"]
        return self._tokens[user]

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(self.user)}"}

    def api(self, method: str, path: str, body: dict[str, Any] | None = None, ok: tuple[int, ...] = (200, 201),
            params: dict[str, Any] | None = None) -> Any:
        r = httpx.request(method, f"{self.base}/api/v2{path}", json=body, params=params,
                          headers=self._headers(), timeout=60)
        if r.status_code not in ok:
            raise DeploymentError(f"{method} {path}: {r.status_code} {r.text[:2000]}")
        return r.json() if r.content else None

    def wait(self, check: Callable[[], T | None | bool], timeout: float, what: str, poll: float = 0.5) -> T:
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result  # type: ignore[return-value]
            if time.monotonic() > deadline:
                raise DeploymentError(f"timed out after {timeout}s waiting for {what}\n"
                                      f"--- scheduler:\n{self.log_tail('scheduler', 3000)}")
            self.check_alive()
            time.sleep(poll)

    def wait_for_dags(self, dag_ids: list[str], timeout: float = 120) -> None:
        def parsed() -> bool:
            found = {d["dag_id"] for d in self.api("GET", "/dags", params={"limit": 100})["dags"]}
            return set(dag_ids) <= found

        self.wait(parsed, timeout, f"the dag-processor to parse {dag_ids}", poll=1)

    def unpause(self, dag_id: str) -> None:
        self.api("PATCH", f"/dags/{dag_id}", {"is_paused": False})

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        run = self.api("POST", f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf or {}})
        return str(run["dag_run_id"])

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        return list(self.api("GET", f"/dags/{dag_id}/dagRuns", params={"limit": 100,
                                                                     "order_by": "run_after"})["dag_runs"])

    def run_state(self, dag_id: str, run_id: str) -> str:
        return str(self.api("GET", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}")["state"])

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 90, states: tuple[str, ...] = ("success", "failed")
                 ) -> str:
        return self.wait(lambda: (s := self.run_state(dag_id, run_id)) in states and s, timeout,
                         f"run {run_id} of {dag_id} to end")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return list(self.api("GET", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances",
                             params={"limit": 100})["task_instances"])

    def task_instance(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> dict[str, Any]:
        mapped = f"/{map_index}" if map_index >= 0 else ""
        return dict(self.api("GET", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}{mapped}"))

    def tries(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> list[dict[str, Any]]:
        """Every try of a task instance (the current one included), oldest first."""
        found = self.api("GET", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}"
                                f"/{map_index}/tries")["task_instances"]
        return sorted(found, key=lambda t: int(t["try_number"]))

    def xcom(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> Any:
        entry = self.api("GET", f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}"
                                "/xcomEntries/return_value", params={"map_index": map_index, "deserialize": True})
        return entry["value"]


def _tests_only(root: Path, home: Path) -> Path:
    """A directory that puts this checkout's ``tests`` and ``airflow_provider_pgq``
    packages on the path and nothing else: the repository root itself holds the editable
    install's egg-info, through which Airflow would load this package's plugin a second
    time. The package is linked too, so that a deployment started from another worktree
    than the one the editable install points at runs that worktree's code."""
    path = home / "pythonpath"
    path.mkdir(exist_ok=True)
    for name in ("tests", "airflow_provider_pgq"):
        link = path / name
        if not link.exists():
            link.symlink_to(root / name)
    return path


def _tree(pid: int, with_times: bool = False) -> set[Any]:
    """The descendants of ``pid`` (pids, or (pid, create_time) pairs)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return set()
    found: set[Any] = set()
    for child in children:
        try:
            found.add((child.pid, child.create_time()) if with_times else child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by its new parent, is not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
