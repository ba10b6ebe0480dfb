"""Test helpers over a real database: produce events, tick, read queues back."""

from __future__ import annotations

import datetime as dt
import os
import secrets
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2 import sql
from psycopg2.extras import execute_values

from airflow_provider_pgq.core import faults, pgq
from airflow_provider_pgq.core.connect import connect
from airflow_provider_pgq.core.mover import DrainBounds, MoveReport, MoverOptions, QueueMover
from tests.support.cluster import ThrowawayCluster

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "dags" / "examples"

#: run_dag(dag_id, conns, logical_date=..., env=..., dags_folder=...) -> outcome (see conftest)
DagRunner = Callable[..., dict[str, Any]]

#: batch_target_events of the tests' movers unless a test says otherwise (tests/conftest.py
#: sets it as MoverOptions' default in the test process, spawned movers take it as an
#: option): one tick a batch, as the classic tool, so that tests counting batches and
#: fault points keep their meaning. tests/core/test_catch_up.py covers the real default.
CLASSIC_BATCHES = 1

#: (ev_type, ev_data, extra1, extra2, extra3, extra4, ev_time)
Event = tuple[Any, ...]


@dataclass
class Server:
    cluster: ThrowawayCluster
    dbname: str

    @property
    def dsn(self) -> str:
        return self.cluster.dsn(self.dbname)

    def uri(self, user: str | None = None, password: str | None = None) -> str:
        if user is None:
            return self.cluster.uri(self.dbname)
        return self.cluster.uri(self.dbname, user=user, password=password)

    def connect(self) -> psycopg2.extensions.connection:
        return connect(self.dsn, application_name="pgq-tests")

    def execute(self, query: Any, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self.cluster.execute(self.dbname, query, params)


def pooled(bouncer: Any, server: Server) -> Server:
    """The same database as clients behind the PgBouncer (tests/support/pgbouncer.py)
    reach it: dsn() and uri() through the pool, the harness's execute() direct."""
    return Server(bouncer.view(server.cluster), server.dbname)


@dataclass(frozen=True)
class Login:
    """A password login a test created (see create_login)."""

    name: str
    password: str

    def dsn(self, server: Server) -> str:
        return server.cluster.dsn(server.dbname, user=self.name, password=self.password)

    def uri(self, server: Server) -> str:
        return server.uri(user=self.name, password=self.password)

    def raw(self, server: Server) -> psycopg2.extensions.connection:
        """A plain libpq session with the role's and database's defaults (no pinned search_path)."""
        return psycopg2.connect(self.dsn(server))


def create_login(cluster: ThrowawayCluster, prefix: str, in_role: str | None = None,
                 superuser: bool = False) -> Login:
    """A new login role ``<prefix>_<random>`` with a random password, member of ``in_role``."""
    login = Login(f"{prefix}_{uuid.uuid4().hex[:10]}", "pw-" + secrets.token_urlsafe(12))
    create = sql.SQL("create role {} login password %s" + (" superuser" if superuser else "")).format(
        sql.Identifier(login.name))
    if in_role:
        create = sql.SQL("{} in role {}").format(create, sql.Identifier(in_role))
    cluster.execute("postgres", create, (login.password,))
    return login


def pretend_mover_schema(server: Server, version: int) -> None:
    """Makes pgq_ext say it is mover schema `version`, as an older install left it (the
    upgrade tests then install over it)."""
    server.execute(sql.SQL("create or replace function pgq_ext.mover_schema_version() returns integer"
                           " language sql immutable security definer set search_path = pg_catalog, pg_temp"
                           " as $$ select {} $$").format(sql.Literal(int(version))))


def create_queue(server: Server, queue: str) -> None:
    server.execute("select pgq.create_queue(%s)", (queue,))
    server.execute("select pgq.set_queue_config(%s, 'ticker_max_count', '1')", (queue,))


def produce(server: Server, queue: str, events: Iterable[Sequence[Any]], page_size: int = 2000) -> int:
    """Inserts events (type, data, e1..e4[, time]) in one transaction, times kept
    (now() where none is given); many rows per statement, so volume tests stay fast."""

    conn = server.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("select pgq.current_event_table(%s)", (queue,))
            table = cur.fetchone()[0]  # type: ignore[index]
            schema, name = table.split(".")
            insert = sql.SQL(
                "insert into {} (ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4, ev_time)"
                " values %s"
            ).format(sql.Identifier(schema, name))
            rows = [tuple(e[:6]) + ((e[6] if len(e) > 6 else None),) for e in events]
            execute_values(
                cur, insert.as_string(conn), rows, page_size=page_size,
                template="(%s, %s, %s, %s, %s, %s, coalesce(%s, now()))",
            )
        conn.commit()
    finally:
        conn.close()
    return len(rows)


def simple_events(n: int, start: int = 0, prefix: str = "ev") -> list[Event]:
    base = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    return [
        (f"{prefix}.type", f"{prefix}-data-{i}", f"x{i % 7}", None, "" if i % 3 == 0 else None,
         "é✓" if i % 5 == 0 else None, base + dt.timedelta(seconds=i, microseconds=i))
        for i in range(start, start + n)
    ]


def tick(server: Server, queue: str) -> int:
    """Makes a new tick on the queue now (what pgqd would do)."""
    conn = server.connect()
    try:
        # Test queues tick on any new event (ticker_max_count 1), so the tick's event
        # sequence stays true; force_tick (which inflates it) only when there is none.
        new = pgq.ticker(conn, queue)
        conn.commit()
        if new is None:
            before = pgq.force_tick(conn, queue)
            conn.commit()
            new = pgq.ticker(conn, queue)
            conn.commit()
            assert new is not None and (before is None or new > before), (before, new)
        return new
    finally:
        conn.close()


def queue_events(server: Server, queue: str, with_ids: bool = False) -> Counter[Event]:
    """Multiset of every event row in the queue's tables (type, data, extras, time[, id])."""
    rows = server.execute(
        "select queue_data_pfx from pgq.queue where queue_name = %s", (queue,)
    )
    schema, name = rows[0][0].split(".")
    cols = "ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4, ev_time" + (
        ", ev_id" if with_ids else ""
    )
    data = server.execute(
        sql.SQL("select " + cols + " from {}").format(sql.Identifier(schema, name))  # noqa: S608
    )
    return Counter(tuple(r) for r in data)


def register(server: Server, queue: str, consumer: str) -> None:
    server.execute("select pgq.register_consumer(%s, %s)", (queue, consumer))


def run_mover(
    source: Server,
    target: Server,
    consumer: str = "mover",
    bounds: DrainBounds | None = None,
    **options: Any,
) -> MoveReport:
    opts = MoverOptions(
        source_queue=options.pop("source_queue", "src_q"),
        target_queue=options.pop("target_queue", "dst_q"),
        consumer=consumer,
        **options,
    )
    s, t = source.connect(), target.connect()
    try:
        return QueueMover(s, t, opts).drain(bounds)
    finally:
        s.close()
        t.close()


def mark_of(target: Server, consumer: str, subconsumer: str = "") -> int | None:
    rows = target.execute("select pgq_ext.get_last_tick(%s, %s)", (consumer, subconsumer))
    return rows[0][0]


# -- added for the core suite (tests/core) ---------------------------------------


def tick_plain(server: Server, queue: str) -> int:
    """One pgq.ticker() pass without force_tick, which would inflate the event sequence
    by thousands; with ticker_max_count 1 it ticks whenever new events exist. Asserts
    that a tick was made and returns it."""
    conn = server.connect()
    try:
        new = pgq.ticker(conn, queue)
        conn.commit()
    finally:
        conn.close()
    assert new is not None, f"pgq.ticker({queue!r}) made no tick"
    return int(new)


def tick_time(server: Server, queue: str, tick_id: int) -> dt.datetime:
    rows = server.execute(
        "select t.tick_time from pgq.tick t join pgq.queue q on q.queue_id = t.tick_queue"
        " where q.queue_name = %s and t.tick_id = %s",
        (queue, tick_id),
    )
    return rows[0][0]  # type: ignore[no-any-return]


def is_registered(server: Server, queue: str, consumer: str) -> bool:
    return bool(
        server.execute(
            "select 1 from pgq.get_consumer_info() where queue_name = %s and consumer_name = %s",
            (queue, consumer),
        )
    )


def has_pgq_ext(server: Server) -> bool:
    return bool(server.execute("select to_regnamespace('pgq_ext') is not null")[0][0])


_CHILD_ENV = "PGQ_TEST_MOVER_CHILD"

#: Tells a mover child process of the tests where to die: "<point>[:<n>]" (faults.kill_at).
#: Read by the tests' child processes only; the package never looks at it.
FAULT_ENV = "PGQ_MOVER_FAULT"


def fault_from_environment() -> faults.FaultHook | None:
    spec = os.environ.get(FAULT_ENV)
    return faults.kill_at(spec) if spec else None


def spawn_mover(
    source: Server,
    target: Server,
    consumer: str = "mover",
    fault: str | None = None,
    **options: Any,
) -> Any:
    """Starts a drain in a child process (subprocess.Popen, stdout piped); fault sets
    PGQ_MOVER_FAULT so the child dies with os._exit at that point. Read the outcome
    with wait_mover(). The DSNs travel in the child's environment, never on argv."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    env[_CHILD_ENV] = json.dumps(
        {"source": source.dsn, "target": target.dsn, "consumer": consumer, "options": options}
    )
    return subprocess.Popen(
        [sys.executable, "-c", "from tests.helpers import mover_child_main; mover_child_main()"],
        cwd=str(root), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_mover(proc: Any, timeout: float = 120.0) -> tuple[int, dict[str, Any] | None, str]:
    """(exit code, the child's report as a dict or None, its stderr)."""
    import json

    out, err = proc.communicate(timeout=timeout)
    report = json.loads(out) if proc.returncode == 0 and out.strip() else None
    return int(proc.returncode), report, err


def mover_child_main() -> None:
    """Body of spawn_mover's child: one drain, the report as JSON on stdout."""
    import json
    import os
    from dataclasses import asdict

    spec = json.loads(os.environ[_CHILD_ENV])
    opts = dict(spec["options"])
    opts.setdefault("batch_target_events", CLASSIC_BATCHES)
    options = MoverOptions(
        source_queue=opts.pop("source_queue", "src_q"),
        target_queue=opts.pop("target_queue", "dst_q"),
        consumer=spec["consumer"],
        **opts,
    )
    s, t = connect(spec["source"]), connect(spec["target"])
    try:
        report = QueueMover(s, t, options, fault=fault_from_environment()).drain()
    finally:
        s.close()
        t.close()
    out = report.to_dict()
    out["batch_results"] = [asdict(r) for r in report.batch_results]
    print(json.dumps(out, default=str))


def require_password_checks(cluster: Any) -> None:
    """Skips a test of a refused password on a server of PGQ_TEST_DSN that lets the
    tests' address in without one (trust): a wrong password cannot fail there."""
    if not getattr(cluster, "checks_passwords", True):
        import pytest

        pytest.skip("PGQ_TEST_DSN's server does not check passwords for the tests' address (trust):"
                    " a wrong password cannot be refused there")
