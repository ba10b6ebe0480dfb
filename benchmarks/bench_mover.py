"""How close the mover comes to a plain COPY, and how much memory it needs.

    python -m benchmarks.bench_mover --events 1000000 --ticks-of 10000 --repeat 3

Builds a throwaway PostgreSQL cluster with PgQ, loads N events of about 200 bytes
into a source queue, ticking after every B events (N/B ticks: one batch each for a
consumer that does not coalesce ticks), then measures, each on a freshly reset
source consumer and a fresh target database:

(a) the COPY limit: the source's event table piped by two psql processes, binary
    COPY TO STDOUT into binary COPY FROM STDIN of the target queue's current event
    table, in one transaction, no protocol: what no mover can beat;
(b) the core mover, QueueMover.drain, in a child process;
(d) the least-privilege path: the same with a target role that holds only pgq_mover;
(e) the command line: the real `pgq-queue-mover --once mover.ini` as a child process
    (rate over the drain time it logs; wall: the whole command);
(g) the core mover as (b), both connections through a PgBouncer in transaction
    pooling (Debian's pgbouncer; skipped with a note without it): what the per-
    transaction settings and the pooler's hop cost;
(h) the core mover as (b) with the per-transaction settings switched off (the pinned
    search_path and the bounds sent at the head of every transaction): unsafe, only to
    measure what they cost, best seen with many small batches
    (--ticks-of 100 --batch-target-events 1);
(f) the classic baseline: a skytools-style queue mover on PyPI's pgq package
    (benchmarks/classic_mover.py: pgq.SerialConsumer, pgq.bulk_insert_events, pgq_ext
    ticks, one target transaction per batch); skipped with a note without `pgq`;
(c) the Airflow operator PgqQueueMoverOperator through dag.test(), in a child
    process with its own AIRFLOW_HOME (migrated first, not timed), at the end.

Scenarios (a), (b), (d), (e), (f), (g) run interleaved per repeat so that load from other
processes hits them alike; the table shows medians. Rates of the movers are taken
over their drain (QueueMover.drain; for (c) the drain time the operator returns as
XCom, for (e) the one the command logs, for (f) skytools' run loop), so process and
Airflow start-up are not in them; the wall column has everything. Peak RSS is the
mover process's ru_maxrss from wait4(). Every run is checked: the target must hold
all N events with the source's content (count and checksums), else the benchmark
stops. benchmarks/bench_scaleout.py runs several sources into one target.

Not part of the test run: a figure, never a pass/fail timing. Needs about 3x the
event volume in free disk (source, one target at a time, WAL); removes everything.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import connection as Connection

ROOT = Path(__file__).resolve().parents[1]

SOURCE_DB = "bench_src"
TARGET_DB = "bench_dst"
TARGET_TEMPLATE = "bench_dst_tpl"
SOURCE_QUEUE = "bench_src_q"
TARGET_QUEUE = "bench_dst_q"
CONSUMER = "bench_mover"
LIMIT = "(a) COPY limit, psql | psql"
CORE = "(b) core mover, QueueMover.drain"
LEAST = "(d) least privilege, pgq_mover only"
CLI = "(e) CLI, pgq-queue-mover --once"
CLASSIC = "(f) classic, python-pgq SerialConsumer"
OPERATOR = "(c) operator, dag.test()"
POOLED = "(g) core mover through PgBouncer (txn)"
BARE = "(h) core mover, no per-txn settings"

#: The line `pgq-queue-mover --once` logs at the end of its drain.
CLI_REPORT = re.compile(r"moved (\d+) events in (\d+) batch(?:es)? \(.*?\) in ([0-9.]+)s, stopped")
COLUMNS = ("ev_type", "ev_data", "ev_extra1", "ev_extra2", "ev_extra3", "ev_extra4", "ev_time")

#: About 200 bytes an event: type 11, data ~185 (JSON-ish, distinct per event), extra1,
#: extra2 NULL every other event, extras 3 and 4 NULL, the event's own time. Events
#: first..last (ids in ev_data and times distinct over every source of bench_scaleout),
#: a tick after each `step` of them: one server-side loop that commits the insert, then
#: the tick (pgq.ticker() in a transaction of its own, so its snapshot sees the events),
#: so that 1,000 ticks of 100 events cost no 2,000 client round trips.
LOAD_BLOCK = """
do $bench_load$
declare
  first bigint;
begin
  for first in {lo}..{hi} by {step} loop
    insert into {table} (ev_type, ev_data, ev_extra1, ev_extra2, ev_time)
    select 'bench.event',
           '{{"id":' || i || ',"payload":"' || repeat(md5(i::text), 5) || '"}}',
           'extra-' || (i % 100),
           case when i % 2 = 0 then 'x' end,
           timestamptz '2026-01-01 00:00:00+00' + i * interval '1 microsecond'
      from generate_series(first, least(first + {step} - 1, {hi})) i;
    commit;
    if pgq.ticker({queue}) is null then
      raise exception 'pgq.ticker() made no tick after a load step at event %', first;
    end if;
    commit;
  end loop;
end
$bench_load$
"""

#: Same content or not: order-independent sums over every carried field.
CHECKSUM_SQL = """
select count(*),
       coalesce(sum(hashtextextended(concat_ws(chr(1), ev_type, ev_data, ev_extra1, ev_extra2,
                                               ev_extra3, ev_extra4), 0) % 1000000007), 0),
       coalesce(sum(extract(epoch from ev_time) * 1000000 % 1000000007), 0)
  from {table}
"""


# -- helpers ----------------------------------------------------------------------------


@contextmanager
def _session(dsn: str) -> Iterator[Connection]:
    """An autocommit connection for set-up and checks, closed afterwards."""
    conn = psycopg2.connect(dsn, application_name="pgq-bench")
    conn.autocommit = True
    try:
        yield conn
    finally:
        conn.close()


def _one(conn: Connection, query: Any, params: tuple[Any, ...] = ()) -> Any:
    with conn.cursor() as cur:
        cur.execute(query, params)
        row = cur.fetchone() if cur.description else None
    return row[0] if row else None


def _table(qualified: str) -> sql.Identifier:
    schema, _, name = qualified.partition(".")
    return sql.Identifier(schema, name)


def _passfile_line(host: str, port: int, user: str, password: str) -> str:
    def esc(value: str) -> str:
        return value.replace("\\", "\\\\").replace(":", "\\:")

    return f"{esc(host)}:{port}:*:{esc(user)}:{esc(password)}\n"


def queue_table_prefix(conn: Connection, queue: str) -> str:
    """The queue's data table prefix: its parent event table, all rotations under it."""
    return str(_one(conn, "select queue_data_pfx from pgq.queue where queue_name = %s", (queue,)))


def checksum(conn: Connection, table: str) -> tuple[Any, ...]:
    with conn.cursor() as cur:
        cur.execute(sql.SQL(CHECKSUM_SQL).format(table=_table(table)))
        row = cur.fetchone()
    assert row is not None
    return tuple(row)


def add_sums(a: tuple[Any, ...], b: tuple[Any, ...]) -> tuple[Any, ...]:
    """CHECKSUM_SQL's sums of two sets of events: what a target holding both must show."""
    return tuple(x + y for x, y in zip(a, b, strict=True)) if a else b


def load_source(
    conn: Connection, n: int, b: int, *, offset: int = 0, consumers: tuple[str, ...] = (CONSUMER,)
) -> tuple[int, tuple[Any, ...]]:
    """Makes SOURCE_QUEUE in conn's (autocommit) database, registers the consumers and
    loads events offset+1..offset+n, a tick after every b of them; returns the tick
    before the first event and the checksum of what was loaded."""
    _one(conn, "create extension if not exists pgq")
    _one(conn, "select pgq.create_queue(%s)", (SOURCE_QUEUE,))
    # Tick on any new event: no force_tick, whose inflated event sequence would
    # mislead next_batch_custom's event counts.
    _one(conn, "select pgq.set_queue_config(%s, 'ticker_max_count', '1')", (SOURCE_QUEUE,))
    for consumer in consumers:
        _one(conn, "select pgq.register_consumer(%s, %s)", (SOURCE_QUEUE, consumer))
    start_tick = int(_one(
        conn, "select last_tick from pgq.get_consumer_info(%s, %s)", (SOURCE_QUEUE, consumers[0])
    ))
    table = _table(str(_one(conn, "select pgq.current_event_table(%s)", (SOURCE_QUEUE,))))
    with conn.cursor() as cur:  # no parameters: the block's % signs stay as they are
        cur.execute(sql.SQL(LOAD_BLOCK).format(
            table=table, queue=sql.Literal(SOURCE_QUEUE),
            lo=sql.Literal(offset + 1), hi=sql.Literal(offset + n), step=sql.Literal(b),
        ))
    return start_tick, checksum(conn, queue_table_prefix(conn, SOURCE_QUEUE))


def _vm_hwm_kb() -> int:
    """This process's peak resident set (VmHWM), in KiB; 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _backend_cpu(pid: int) -> float | None:
    """CPU seconds a server backend on this machine has used (None if unreadable)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Run:
    """One measured run of one scenario."""

    events: int
    seconds: float  # what the rate is taken over
    wall: float  # the whole scenario: process start, Airflow, everything
    peak_rss_kb: int | None = None
    cpu_seconds: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


# -- the child processes ---------------------------------------------------------------


def child_core(args: argparse.Namespace) -> int:
    """Runs one drain and prints RESULT {json}; the parent reads our peak RSS."""
    from airflow_provider_pgq.core.connect import connect
    from airflow_provider_pgq.core.mover import MoverOptions, QueueMover

    source = connect(args.source_dsn, application_name="pgq-bench-mover")
    target = connect(args.target_dsn, application_name="pgq-bench-mover")
    if args.bare:  # (h): what the per-transaction settings cost; never do this in earnest
        source.set_transaction_settings({})
        target.set_transaction_settings({})
    pids = (source.get_backend_pid(), target.get_backend_pid())
    cpu_before = [_backend_cpu(p) for p in pids]
    batching = {} if args.batch_target_events is None else {"batch_target_events": args.batch_target_events}
    options = MoverOptions(
        source_queue=SOURCE_QUEUE, target_queue=TARGET_QUEUE, consumer=args.consumer,
        chunk_size=args.chunk_size, min_batch_events=args.min_batch_events, **batching,
    )
    mover = QueueMover(source, target, options)
    if args.wait_go:  # bench_scaleout: connected, now all start at once
        print("READY", flush=True)
        sys.stdin.readline()
    t_start = time.time()
    started = time.perf_counter()
    report = mover.drain()
    seconds = time.perf_counter() - started
    t_end = time.time()
    cpu_after = [_backend_cpu(p) for p in pids]
    source.close()
    target.close()
    backend = [
        round(b - a, 2) if a is not None and b is not None else None
        for a, b in zip(cpu_before, cpu_after, strict=True)
    ]
    print("RESULT " + json.dumps({
        "events": report.events, "batches": report.batches, "seconds": seconds,
        "write_path": report.write_path, "vm_hwm_kb": _vm_hwm_kb(),
        "source_backend_cpu": backend[0], "target_backend_cpu": backend[1],
        "t_start": t_start, "t_end": t_end,
    }))
    return 0


def child_classic(args: argparse.Namespace) -> int:
    """(f): the skytools-style mover of classic_mover.py over its ini; prints RESULT {json}."""
    from benchmarks.classic_mover import ClassicMover

    mover = ClassicMover([args.ini, "-q"])
    started = time.perf_counter()
    mover.start()  # skytools' loop: with loop_delay 0, until no batch is left
    seconds = time.perf_counter() - started
    print("RESULT " + json.dumps({
        "events": mover.moved, "batches": mover.batches, "seconds": seconds,
        "write_path": "bulk_insert_events", "vm_hwm_kb": _vm_hwm_kb(),
    }))
    return 0


def child_airflow(args: argparse.Namespace) -> int:
    """Runs the benchmark DAG with dag.test() and prints RESULT {json}."""
    import datetime as dt

    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    if bag.import_errors:
        print("RESULT " + json.dumps({"error": {k: str(v) for k, v in bag.import_errors.items()}}))
        return 3
    dag = bag.get_dag(args.dag_id)
    if dag is None:
        print("RESULT " + json.dumps({"error": f"DAG {args.dag_id} not found"}))
        return 3
    started = time.perf_counter()
    run = dag.test(logical_date=dt.datetime.now(dt.timezone.utc))
    wall = time.perf_counter() - started
    with create_session() as session:
        value = (
            session.query(XComModel.value)
            .filter(XComModel.dag_run_id == run.id, XComModel.key == "return_value")
            .scalar()
        )
    report = value if isinstance(value, dict) else json.loads(value) if value else {}
    print("RESULT " + json.dumps({
        "state": str(run.state), "events": report.get("events"), "batches": report.get("batches"),
        "seconds": report.get("seconds"), "write_path": report.get("write_path"),
        "dag_test_seconds": wall, "vm_hwm_kb": _vm_hwm_kb(),
    }))
    return 0


@dataclass
class Finished:
    """A reaped child process."""

    returncode: int
    stdout: str
    stderr: str
    wall: float
    peak_rss_kb: int
    cpu_seconds: float


def run_process(argv: list[str], env: dict[str, str]) -> Finished:
    """Runs a process to its end and reaps it with wait4, for its own resource usage."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, env=env, cwd=str(ROOT), stdout=out, stderr=err, text=True)
        # Reaped here, not by Popen, so that its own resource usage comes back with it.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        return Finished(proc.returncode, out.read(), err.read(), wall, int(usage.ru_maxrss),
                        usage.ru_utime + usage.ru_stime)


def parse_result(argv: list[str], done: Finished) -> dict[str, Any]:
    """The child's last RESULT {json} line; raises when it failed or gave none."""
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"child {argv[3:5]} failed (rc {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT "):])
    if "error" in result:
        raise RuntimeError(f"child {argv[3:5]}: {result['error']}")
    return result


def run_child(argv: list[str], env: dict[str, str]) -> tuple[dict[str, Any], float, int, float]:
    """Starts a child and reaps it with wait4: (its RESULT, wall s, peak RSS KiB, CPU s)."""
    done = run_process(argv, env)
    return parse_result(argv, done), done.wall, done.peak_rss_kb, done.cpu_seconds


# -- the parent -------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from tests.support.cluster import SUPERUSER, ThrowawayCluster

        self.args = args
        self.cluster = ThrowawayCluster()
        self.superuser = SUPERUSER
        self.writer = "bench_writer"
        self.writer_password = secrets.token_urlsafe(16)
        self.start_tick = 0
        self.source_sums: tuple[Any, ...] = ()
        self.airflow_home: Path | None = None
        self.bouncer: Any = None
        self.workdir = Path(tempfile.mkdtemp(prefix="pgq-bench-"))  # ini and log files

    # -- set-up -------------------------------------------------------------------

    def dsn(self, db: str, user: str | None = None, pooled: bool = False) -> str:
        """Without password: libpq takes it from our PGPASSFILE, so none is on a command line."""
        port = self.bouncer.port if pooled else self.cluster.port
        return f"host=127.0.0.1 port={port} dbname={db} user={user or self.superuser}"

    def child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "AIRFLOW"))}
        env["PGPASSFILE"] = str(self.cluster.root / "bench.pgpass")
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def start(self) -> None:
        self.cluster.start()
        passfile = self.cluster.root / "bench.pgpass"
        passfile.write_text(
            _passfile_line("127.0.0.1", self.cluster.port, self.superuser, self.cluster.password)
            + _passfile_line("127.0.0.1", self.cluster.port, self.writer, self.writer_password)
        )
        if self.bouncer is not None:
            self.bouncer.start()
            with passfile.open("a") as f:
                f.write(_passfile_line("127.0.0.1", self.bouncer.port, self.superuser, self.cluster.password))
        passfile.chmod(0o600)
        os.environ["PGPASSFILE"] = str(passfile)
        with _session(self.dsn("postgres")) as admin:
            _one(admin, sql.SQL("create database {}").format(sql.Identifier(SOURCE_DB)))
            _one(admin, sql.SQL("create database {}").format(sql.Identifier(TARGET_TEMPLATE)))
        with _session(self.dsn(TARGET_TEMPLATE)) as tpl:
            _one(tpl, "create extension pgq")
            _one(tpl, "select pgq.create_queue(%s)", (TARGET_QUEUE,))
            _one(
                tpl,
                sql.SQL("create role {} login password %s").format(
                    sql.Identifier(self.writer)
                ),
                (self.writer_password,),
            )
        from airflow_provider_pgq.core import pgq_ext

        tpl2 = psycopg2.connect(self.dsn(TARGET_TEMPLATE))
        try:
            pgq_ext.install(tpl2)  # makes the pgq_mover role: the writer's only one
            _one(tpl2, sql.SQL("grant pgq_mover to {}").format(sql.Identifier(self.writer)))
            tpl2.commit()
        finally:
            tpl2.close()
        self.load()

    def load(self) -> None:
        n, b = self.args.events, self.args.batch_size
        started = time.perf_counter()
        with _session(self.dsn(SOURCE_DB)) as conn:
            self.start_tick, self.source_sums = load_source(conn, n, b)
        print(
            f"loaded {n:,} events in {(n + b - 1) // b:,} ticks of {b:,} in"
            f" {time.perf_counter() - started:.1f}s", flush=True,
        )

    def reset(self) -> None:
        """Source consumer back to before the first event; an empty target database."""
        with _session(self.dsn(SOURCE_DB)) as conn:
            _one(conn, "select pgq.register_consumer_at(%s, %s, %s)", (SOURCE_QUEUE, CONSUMER, self.start_tick))
        with _session(self.dsn("postgres")) as admin, admin.cursor() as cur:
            cur.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(TARGET_DB)))
            cur.execute("checkpoint")  # every run starts from the same WAL state
            cur.execute(sql.SQL("create database {} template {}").format(
                sql.Identifier(TARGET_DB), sql.Identifier(TARGET_TEMPLATE)))

    def verify(self, label: str) -> None:
        with _session(self.dsn(TARGET_DB)) as conn:
            got = checksum(conn, queue_table_prefix(conn, TARGET_QUEUE))
        if got != self.source_sums:
            raise RuntimeError(f"{label}: target holds {got}, source {self.source_sums}: not the same events")

    # -- scenarios ----------------------------------------------------------------

    def copy_limit(self) -> Run:
        """(a): psql | psql, binary, source event tables into the target's current table."""
        self.reset()
        with _session(self.dsn(SOURCE_DB)) as src:
            pfx = queue_table_prefix(src, SOURCE_QUEUE)
            cols = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
            out_sql = sql.SQL("copy (select {} from {}) to stdout (format binary)").format(
                cols, _table(pfx)).as_string(src)
        with _session(self.dsn(TARGET_DB)) as dst:
            current = str(_one(dst, "select pgq.current_event_table(%s)", (TARGET_QUEUE,)))
            in_sql = sql.SQL("copy {} ({}) from stdin (format binary)").format(
                _table(current), cols).as_string(dst)
        psql = str(self.cluster.bindir / "psql")
        env = self.child_env()
        started = time.perf_counter()
        out = subprocess.Popen(
            [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self.dsn(SOURCE_DB), "-c", out_sql],
            stdout=subprocess.PIPE, env=env,
        )
        assert out.stdout is not None
        # psql's own \timing of the COPY FROM (from its start to the commit): the two
        # connection set-ups are not part of the limit.
        into = subprocess.run(
            [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self.dsn(TARGET_DB),
             "-c", "\\timing on", "-c", in_sql],
            stdin=out.stdout, env=env, capture_output=True, text=True,
        )
        out.stdout.close()
        out.wait()
        wall = time.perf_counter() - started
        if out.returncode or into.returncode:
            raise RuntimeError(f"(a) psql failed: {into.stderr[-2000:]}")
        timed = [line for line in into.stdout.splitlines() if line.startswith("Time: ")]
        seconds = float(timed[-1].split()[1]) / 1000 if timed else wall
        self.verify("(a)")
        return Run(self.args.events, seconds, wall)

    def core(self, user: str | None = None, min_batch_events: int | None = None, pooled: bool = False,
             bare: bool = False) -> Run:
        """(b), (d), (g) and (h): QueueMover.drain in a child process."""
        self.reset()
        argv = [
            sys.executable, "-m", "benchmarks.bench_mover", "--child", "core",
            "--source-dsn", self.dsn(SOURCE_DB, pooled=pooled), "--target-dsn", self.dsn(TARGET_DB, user, pooled),
            "--chunk-size", str(self.args.chunk_size),
        ]
        if min_batch_events:
            argv += ["--min-batch-events", str(min_batch_events)]
        if self.args.batch_target_events is not None:
            argv += ["--batch-target-events", str(self.args.batch_target_events)]
        if bare:
            argv.append("--bare")
        result, wall, peak, cpu = run_child(argv, self.child_env())
        self.verify("(d)" if user else "(b)")
        if result["events"] != self.args.events:
            raise RuntimeError(f"mover moved {result['events']} events, not {self.args.events}")
        return Run(result["events"], result["seconds"], wall, peak, cpu, result)

    def cli_command(self) -> list[str]:
        """The console script next to our interpreter, else the module."""
        script = Path(sys.executable).with_name("pgq-queue-mover")
        return [str(script)] if script.exists() else [sys.executable, "-m", "airflow_provider_pgq.cli"]

    def cli(self) -> Run:
        """(e): `pgq-queue-mover --once mover.ini`, rate over the drain time it logs."""
        self.reset()
        ini, logfile = self.workdir / "bench_cli_mover.ini", self.workdir / "bench_cli_mover.log"
        logfile.unlink(missing_ok=True)
        ini.write_text(textwrap.dedent(f"""\
            [queue_mover]
            job_name = bench_cli_mover
            src_db = {self.dsn(SOURCE_DB)}
            dst_db = {self.dsn(TARGET_DB)}
            pgq_queue_name = {SOURCE_QUEUE}
            dst_queue_name = {TARGET_QUEUE}
            pgq_consumer_id = {CONSUMER}
            logfile = {logfile}
            pidfile = {self.workdir / "bench_cli_mover.pid"}
            """))
        argv = [*self.cli_command(), "--once", str(ini)]
        done = run_process(argv, self.child_env())
        log = logfile.read_text() if logfile.exists() else ""
        if done.returncode != 0:
            raise RuntimeError(f"(e) {' '.join(argv[-2:])} exited {done.returncode}:\n"
                               f"{done.stderr[-2000:]}\n{log[-2000:]}")
        found = CLI_REPORT.findall(log)
        if not found:
            raise RuntimeError(f"(e) no 'moved ... events' line in {logfile}:\n{log[-2000:]}")
        events, batches, seconds = int(found[-1][0]), int(found[-1][1]), float(found[-1][2])
        self.verify("(e)")
        if events != self.args.events:
            raise RuntimeError(f"(e) the command moved {events} events, not {self.args.events}")
        return Run(events, seconds, done.wall, done.peak_rss_kb, done.cpu_seconds,
                   {"batches": batches, "write_path": "cli --once"})

    def classic(self) -> Run:
        """(f): the skytools-style baseline of classic_mover.py in a child process."""
        from benchmarks.classic_mover import ini_text

        self.reset()
        ini, logfile = self.workdir / "bench_classic_mover.ini", self.workdir / "bench_classic_mover.log"
        ini.write_text(ini_text(self.dsn(SOURCE_DB), self.dsn(TARGET_DB), SOURCE_QUEUE, TARGET_QUEUE,
                                CONSUMER, str(logfile)))
        argv = [sys.executable, "-m", "benchmarks.bench_mover", "--child", "classic", "--ini", str(ini)]
        result, wall, peak, cpu = run_child(argv, self.child_env())
        self.verify("(f)")
        if result["events"] != self.args.events:
            raise RuntimeError(f"(f) classic mover moved {result['events']} events, not {self.args.events}")
        return Run(result["events"], result["seconds"], wall, peak, cpu, result)

    def airflow_ready(self) -> bool:
        """(c) needs the operator module; prepares AIRFLOW_HOME (migrated, not timed)."""
        if not (ROOT / "airflow_provider_pgq" / "operators" / "queue_mover.py").exists():
            return False
        home = Path(tempfile.mkdtemp(prefix="pgq-bench-airflow-"))
        self.airflow_home = home
        dags = home / "dags"
        dags.mkdir()
        (dags / "bench_pgq_mover.py").write_text(textwrap.dedent(f"""\
            import datetime as dt

            from airflow.sdk import DAG

            from airflow_provider_pgq.operators.queue_mover import PgqQueueMoverOperator

            with DAG("bench_pgq_mover", schedule=None, catchup=False,
                     start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)):
                PgqQueueMoverOperator(
                    task_id="move", source_conn_id="bench_src", target_conn_id="bench_dst",
                    source_queue={SOURCE_QUEUE!r}, target_queue={TARGET_QUEUE!r},
                    consumer_name={CONSUMER!r},
                )
            """))
        env = self.airflow_env()
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, cwd=str(ROOT),
                       check=True, capture_output=True)
        print(f"(c) airflow db migrate in {time.perf_counter() - started:.0f}s (not timed)", flush=True)
        return True

    def airflow_env(self) -> dict[str, str]:
        assert self.airflow_home is not None
        env = self.child_env()
        port = self.cluster.port
        env.update({
            "AIRFLOW_HOME": str(self.airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.airflow_home / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            # No password in the URI: PgqHook's libpq reads it from PGPASSFILE.
            "AIRFLOW_CONN_BENCH_SRC": f"postgresql://{self.superuser}@127.0.0.1:{port}/{SOURCE_DB}",
            "AIRFLOW_CONN_BENCH_DST": f"postgresql://{self.superuser}@127.0.0.1:{port}/{TARGET_DB}",
        })
        return env

    def operator(self) -> Run:
        """(c): the operator through dag.test() in a child process."""
        self.reset()
        argv = [sys.executable, "-m", "benchmarks.bench_mover", "--child", "airflow",
                "--dag-id", "bench_pgq_mover"]
        result, wall, peak, cpu = run_child(argv, self.airflow_env())
        if "success" not in str(result.get("state")):
            raise RuntimeError(f"(c) DAG run ended {result.get('state')}")
        self.verify("(c)")
        return Run(int(result["events"]), float(result["seconds"]), wall, peak, cpu, result)

    def stop(self) -> None:
        if self.bouncer is not None:
            self.bouncer.remove()
        if self.airflow_home is not None:
            shutil.rmtree(self.airflow_home, ignore_errors=True)
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.cluster.stop()


def _median_run(runs: list[Run]) -> Run:
    ordered = sorted(runs, key=lambda r: r.rate)
    return ordered[(len(ordered) - 1) // 2] if len(ordered) % 2 else ordered[len(ordered) // 2 - 1]


def _paired_ratio(runs: list[Run], against: list[Run]) -> float:
    """The median of per-repeat rate ratios when both ran interleaved, else of medians."""
    if len(runs) == len(against):
        return statistics.median(r.rate / a.rate for r, a in zip(runs, against, strict=True))
    return statistics.median(r.rate for r in runs) / statistics.median(a.rate for a in against)


def report(
    args: argparse.Namespace, results: dict[str, list[Run]], notes: list[str], load: list[float]
) -> None:
    limits = results[LIMIT]
    limit = statistics.median(r.rate for r in limits)
    print()
    print(f"events {args.events:,} in ticks of {args.batch_size:,} ({-(-args.events // args.batch_size):,}"
          f" ticks), repeat {args.repeat}, medians; {os.cpu_count()} CPUs, load average"
          f" {min(load):.1f}..{max(load):.1f} during the runs")
    header = f"{'scenario':<40} {'events/s':>10} {'x COPY':>7} {'rate s':>7} {'wall s':>7}" \
             f" {'peak RSS':>9} {'CPU s':>6}  path"
    print(header)
    print("-" * len(header))
    for label, runs in results.items():
        rate = statistics.median(r.rate for r in runs)
        # (a), (b), (d), (e), (f) ran interleaved: the median of the per-repeat ratios is
        # steadier under outside load than a ratio of medians; (c) ran later, so against
        # (a)'s median.
        ratio = 1.0 if label == LIMIT else rate / limit if label == OPERATOR else _paired_ratio(runs, limits)
        mid = _median_run(runs)
        peak = max((r.peak_rss_kb or 0) for r in runs)
        rss = f"{peak / 1024:.0f} MB" if peak else "-"
        cpu = f"{mid.cpu_seconds:.1f}" if mid.cpu_seconds is not None else "-"
        path = str(mid.detail.get("write_path", "")) + (
            f", {mid.detail['batches']} batches" if mid.detail.get("batches") is not None else "")
        print(f"{label:<40} {rate:>10,.0f} {ratio:>7.2f} {mid.seconds:>7.2f} {mid.wall:>7.2f}"
              f" {rss:>9} {cpu:>6}  {path}")
    for label, runs in results.items():
        mid = _median_run(runs)
        if mid.detail.get("target_backend_cpu") is not None:
            print(f"  {label}: backend CPU source {mid.detail['source_backend_cpu']}s,"
                  f" target {mid.detail['target_backend_cpu']}s over {mid.seconds:.2f}s")
    if BARE in results and CORE in results:
        print(f"  (b) against (h): {_paired_ratio(results[CORE], results[BARE]):.3f}x the drain rate without"
              " per-transaction settings (per-repeat pairs): what the pin and the bounds cost")
    if POOLED in results and CORE in results:
        print(f"  (g) against (b): {_paired_ratio(results[POOLED], results[CORE]):.2f}x the direct core"
              " mover's drain rate (per-repeat pairs)")
    if OPERATOR in results and CORE in results:
        print(f"  (c) against (b): {_paired_ratio(results[OPERATOR], results[CORE]):.2f}x the core"
              " mover's drain rate (medians; (c) ran after the interleaved repeats)")
    if CLASSIC in results:
        against = [
            f"{label.split()[0]} {_paired_ratio(results[label], results[CLASSIC]):.1f}x"
            for label in (CORE, CLI, LEAST, OPERATOR) if label in results
        ]
        print(f"  against (f) classic, drain rate: {', '.join(against)}")
    for note in notes:
        print(note)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Scenarios: (a) COPY limit psql|psql (always), (b) core mover, (d) least-privilege"
               " role, (e) CLI pgq-queue-mover --once, (f) classic python-pgq baseline (needs"
               " `pip install pgq`), (c) operator through dag.test(). See docs/benchmarks.md;"
               " several sources into one target: python -m benchmarks.bench_scaleout.",
    )
    parser.add_argument("--events", type=int, default=1_000_000, help="N events in the source queue")
    parser.add_argument("--ticks-of", "--batch-size", dest="batch_size", type=int, default=10_000,
                        metavar="B", help="a tick after every B events (N/B ticks)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per scenario; the table shows medians")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="MoverOptions.chunk_size (events per insert_event_chunk call) for (d)")
    parser.add_argument("--coalesce", type=int, default=None, metavar="N",
                        help="also run the core mover with min_batch_events=N")
    parser.add_argument("--skip", default="",
                        help="scenario letters to leave out of b c d e f g h, e.g. 'cf'")
    parser.add_argument("--batch-target-events", type=int, default=None, metavar="N",
                        help="MoverOptions.batch_target_events of (b), (d), (g), (h) (1: one tick a batch)")
    # internal: the child processes
    parser.add_argument("--child", choices=("core", "airflow", "classic"), help=argparse.SUPPRESS)
    parser.add_argument("--source-dsn", help=argparse.SUPPRESS)
    parser.add_argument("--target-dsn", help=argparse.SUPPRESS)
    parser.add_argument("--consumer", default=CONSUMER, help=argparse.SUPPRESS)
    parser.add_argument("--wait-go", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--min-batch-events", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dag-id", help=argparse.SUPPRESS)
    parser.add_argument("--ini", help=argparse.SUPPRESS)
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.chunk_size is None:
        from airflow_provider_pgq.core.mover import MoverOptions

        args.chunk_size = MoverOptions("q", "q", "c").chunk_size
    if args.child == "core":
        return child_core(args)
    if args.child == "airflow":
        return child_airflow(args)
    if args.child == "classic":
        return child_classic(args)
    if args.events < 1 or args.batch_size < 1 or args.repeat < 1:
        parser.error("--events, --ticks-of and --repeat must be positive")
    if set(args.skip) - set("bcdefgh"):
        parser.error(f"--skip takes letters of b c d e f g h, not {args.skip!r}")

    bench = Bench(args)
    results: dict[str, list[Run]] = {}
    notes: list[str] = []
    scenarios: list[tuple[str, Any]] = [(LIMIT, bench.copy_limit)]
    if "b" not in args.skip:
        scenarios.append((CORE, bench.core))
    if args.coalesce and "b" not in args.skip:
        scenarios.append((f"(b') core mover, min_batch_events={args.coalesce:,}",
                          lambda: bench.core(min_batch_events=args.coalesce)))
    if "d" not in args.skip:
        scenarios.append((LEAST, lambda: bench.core(user=bench.writer)))
    if "e" not in args.skip:
        scenarios.append((CLI, bench.cli))
    if "h" not in args.skip:
        scenarios.append((BARE, lambda: bench.core(bare=True)))
    if "g" in args.skip:
        pass
    elif shutil.which("pgbouncer") is None and not Path("/usr/sbin/pgbouncer").exists():
        notes.append("(g) skipped: no pgbouncer (apt-get install pgbouncer; scripts/setup-env does)")
        print(notes[-1], flush=True)
    else:
        from tests.support.pgbouncer import PgBouncer

        bench.bouncer = PgBouncer(bench.cluster, "transaction", pool_size=2)
        scenarios.append((POOLED, lambda: bench.core(pooled=True)))
    if "f" in args.skip:
        pass
    elif importlib.util.find_spec("pgq") is None:
        notes.append("(f) skipped: the classic baseline needs PyPI's pgq package:"
                     " .venv/bin/pip install pgq (it brings skytools)")
        print(notes[-1], flush=True)
    else:
        scenarios.append((CLASSIC, bench.classic))
    load: list[float] = [os.getloadavg()[0]]
    try:
        bench.start()
        for i in range(args.repeat):
            for label, scenario in scenarios:
                load.append(os.getloadavg()[0])
                run = scenario()
                results.setdefault(label, []).append(run)
                print(f"  run {i + 1} {label}: {run.rate:,.0f} events/s"
                      + (f", peak RSS {run.peak_rss_kb / 1024:.0f} MB" if run.peak_rss_kb else ""), flush=True)
        if "c" in args.skip:
            notes.append("(c) skipped: --skip")
        elif bench.airflow_ready():
            for i in range(args.repeat):
                load.append(os.getloadavg()[0])
                run = bench.operator()
                results.setdefault(OPERATOR, []).append(run)
                print(f"  run {i + 1} (c): {run.rate:,.0f} events/s (dag.test() {run.wall:.1f}s wall)",
                      flush=True)
            notes.append("(c) rate over the operator's drain (XCom seconds); wall includes the child's"
                         " Airflow start-up and dag.test(); its RSS includes Airflow itself")
        else:
            notes.append("(c) skipped: operator missing")
    finally:
        bench.stop()
    load.append(os.getloadavg()[0])
    report(args, results, notes, load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
