"""Fault storm: a producer and a ticker keep the source queue busy while mover
processes are started and disrupted, again and again; afterwards one clean mover
drains, and source and target are compared event by event.

Disruptions (chosen at random from a seed; every kind once first, in a shuffled
order, so that even a short storm covers all of them):
- kill_at_point      PGQ_MOVER_FAULT=<point>:<n>: os._exit(77) between two protocol steps
- sigkill            SIGKILL after a random delay, wherever the mover is
- sigterm            SIGTERM while a batch is held open at a random point (default
                     action, or raised as SystemExit as Airflow's task runner does)
- terminate_source   pg_terminate_backend of the mover's source backend mid-stream
- terminate_target   pg_terminate_backend of the mover's target backend mid-stream
- restart_target     fast restart of the target server while a batch is open
- race               two or three movers on the same tracking key at once
- statement_timeout  the target session runs with a statement_timeout of a few ms
- freeze_target      the mover's target connection (through the driver's fault proxy)
                     stops forwarding mid-batch without closing: the mover, run with
                     small bounds, must end with WaitTimeout within them
- freeze_source      the same for the source connection
- cut_target_mid_copy the target connection is reset (RST) while a big batch streams
- cut_source_at_byte the source connection is reset after n more bytes of a big
                     batch's COPY (proxy.cut_at counts bytes towards the client, so
                     the byte-exact cut is on the side that streams towards the mover)
- throttle           a slow link (latency, a few MB/s) under a 6 MB batch that takes
                     longer than network_timeout: it must still complete
- crash_source       kill -9 of the source's postmaster while a batch is open, then
                     crash recovery (the server is started again; producer and ticker
                     reconnect); the storm goes on
- crash_target       the same for the target's postmaster
- full_disk_target   the target queue's event tables live in a tablespace on a tmpfs
                     of their own; it is shrunk to leave 0-128 KB free under a 6 MB
                     batch: the mover fails with DiskFull, nothing of the batch is in
                     the target; the disk is freed and later movers move it once
                     (drawn only where a tmpfs can be mounted: root)

Each mover process logs in, at random, as the superuser or as least-privilege
roles (pgq_reader on the source; pgq_mover on the target, which takes the
pgq_ext.insert_event_chunk path instead of COPY), so both write paths are
disrupted. The source and the target live in different clusters: restarting the
target leaves the producer and the ticker alone. Both databases run with
synchronous_commit on (the throwaway clusters default to off): a crashed server
keeps what it acknowledged, as a production server does. Only the movers of the network
kinds connect through the proxies (one per side, 127.0.0.1, owned by the driver);
the producer, the ticker and every other mover connect directly.

After every disruption, with no mover running (and, after a network fault, the
proxies healed and the mover's abandoned backends gone), two invariants are checked: the
target's mark is either the consumer's last finished tick or the end tick of its
open batch (batch+mark or neither), and no payload is in the target twice.
"""

from __future__ import annotations

import json
import os
import queue as queue_mod
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2 import sql

from airflow_provider_pgq.core import faults, pgq, pgq_ext, ticking
from airflow_provider_pgq.core.connect import connect
from airflow_provider_pgq.core.errors import PgqError
from airflow_provider_pgq.core.mover import DrainBounds, MoverOptions, QueueMover
from tests.faults import mover_child
from tests.faults.disk import SmallDisk, move_event_tables
from tests.faults.proxy import FaultProxy
from tests.helpers import FAULT_ENV
from tests.support.cluster import ThrowawayCluster
from tests.support.pgbouncer import PgBouncer

ROOT = Path(__file__).resolve().parents[2]

KINDS = (
    "kill_at_point",
    "sigkill",
    "sigterm",
    "terminate_source",
    "terminate_target",
    "restart_target",
    "race",
    "statement_timeout",
    "freeze_target",
    "freeze_source",
    "cut_target_mid_copy",
    "cut_source_at_byte",
    "throttle",
    "crash_source",
    "crash_target",
    "full_disk_target",
)
#: The pooled storm's kinds (Storm(bouncer=...)): every mover connects through a
#: PgBouncer in transaction pooling; the pooler itself is restarted and its console
#: KILLs a database while a batch is open. (The network kinds need the fault proxies
#: in front of the server, the crash and disk kinds are the direct storm's.)
POOLED_KINDS = (
    "kill_at_point",
    "sigkill",
    "sigterm",
    "terminate_target",
    "restart_target",
    "race",
    "bouncer_restart",
    "bouncer_kill",
)
#: The kinds whose mover connects through the fault proxies.
NETWORK_KINDS = frozenset({"freeze_target", "freeze_source", "cut_target_mid_copy", "cut_source_at_byte",
                           "throttle"})
#: How often each kind is drawn after the first round (restarts are the slowest).
WEIGHTS = {
    "kill_at_point": 5,
    "sigkill": 3,
    "sigterm": 2,
    "terminate_source": 2,
    "terminate_target": 2,
    "restart_target": 1,
    "race": 2,
    "statement_timeout": 2,
    "freeze_target": 1,
    "freeze_source": 1,
    "cut_target_mid_copy": 1,
    "cut_source_at_byte": 1,
    "throttle": 1,
    "crash_source": 1,
    "crash_target": 1,
    "full_disk_target": 1,
    "bouncer_restart": 2,
    "bouncer_kill": 2,
}

#: The bounds of the network kinds' movers (mover_child --network-timeout etc.): small,
#: so that a frozen connection ends within seconds.
QUIET_TIMEOUTS = {"connect_timeout": 2.0, "network_timeout": 2.0, "statement_timeout": 2.0, "lock_timeout": 2.0}
#: The longest a frozen mover may take to return: a COPY that moves no byte is given up
#: after network_timeout (twice, while the send queue still drained), a statement after
#: statement_timeout + min(grace, network_timeout); plus a margin for the watchdog's tick,
#: rollbacks, closing and process exit on a busy 2-core machine.
QUIET_BOUND = 2 * QUIET_TIMEOUTS["network_timeout"] + 3.0

#: A burst this big (events x bytes) outgrows the copy pipe and the socket buffers,
#: so the source's COPY is still sending while the paused target waits.
BIG_BURST_EVENTS = 3000
BIG_BURST_PAD = 2000


@dataclass(frozen=True)
class Database:
    """One database in a cluster; dsn() as the superuser unless a login is given."""

    cluster: ThrowawayCluster
    dbname: str

    def dsn(self, user: str | None = None, password: str | None = None) -> str:
        if user is None:
            return self.cluster.dsn(self.dbname)
        return self.cluster.dsn(self.dbname, user=user, password=password)

    def execute(self, query: Any, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self.cluster.execute(self.dbname, query, params)


@dataclass(frozen=True)
class Login:
    user: str
    password: str


# -- load: producer and ticker ------------------------------------------------


class Producer(threading.Thread):
    """Inserts events with unique payloads in small transactions, now and then a
    burst; remembers every payload whose transaction committed."""

    def __init__(self, source: Database, queue: str, seed: int) -> None:
        super().__init__(name="storm-producer", daemon=True)
        self.source = source
        self.queue = queue
        self.rng = random.Random(seed * 7919 + 1)
        self.stop_event = threading.Event()
        self.requests: queue_mod.Queue[tuple[int, int, threading.Event]] = queue_mod.Queue()
        self.committed: list[str] = []
        self.errors: list[str] = []
        self.transactions = 0
        self._txn = 0
        self.last_burst = ""

    def burst(self, events: int, pad: int, timeout: float = 60.0) -> str:
        """Asks for one transaction of `events` events with `pad`-byte extras; waits for
        its commit; returns the prefix of its payloads."""
        done = threading.Event()
        self.requests.put((events, pad, done))
        if not done.wait(timeout):
            raise TimeoutError("the producer did not commit a requested burst")
        return self.last_burst

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=60)

    def _rows(self, n: int, pad: int, kind: str) -> list[tuple[str | None, ...]]:
        self._txn += 1
        rows: list[tuple[str | None, ...]] = []
        for i in range(n):
            data = f"{kind}-{self._txn}-{i}"
            extra1 = "x" * pad if pad else self.rng.choice([None, "", "é✓ ünïcode", "tab\there", "a'b\"c\\d"])
            rows.append((f"storm.{kind}", data, extra1, str(i % 7) if i % 3 else None,
                         None if i % 2 else "", self.rng.choice([None, "{\"k\": 1}"])))
        return rows

    def _insert(self, conn: psycopg2.extensions.connection, rows: list[tuple[Any, ...]]) -> None:
        cols = [list(c) for c in zip(*rows, strict=True)]
        with conn.cursor() as cur:
            cur.execute(
                "select count(pgq.insert_event(%s, t, d, e1, e2, e3, e4))"
                " from unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[])"
                " as u(t, d, e1, e2, e3, e4)",
                (self.queue, *cols),
            )
        conn.commit()

    def run(self) -> None:
        conn: psycopg2.extensions.connection | None = None
        while not self.stop_event.is_set():
            try:
                request = self.requests.get_nowait()
            except queue_mod.Empty:
                request = None
            if request is not None:
                rows = self._rows(request[0], request[1], "big")
                self.last_burst = f"big-{self._txn}-"
            elif self.rng.random() < 0.01:
                rows = self._rows(self.rng.randint(200, 800), 0, "burst")
            else:
                rows = self._rows(self.rng.randint(1, 6), 0, "small")
            try:
                if conn is None:
                    conn = connect(self.source.dsn(), application_name="storm-producer")
                self._insert(conn, rows)
                self.committed.extend(str(r[1]) for r in rows)
                self.transactions += 1
            except (psycopg2.Error, PgqError) as exc:  # ConnectionFailed while a crashed source restarts
                self.errors.append(f"{type(exc).__name__}: {str(exc).strip()[:200]}")
                self._recover(conn, rows)
                conn = None
            if request is not None:
                request[2].set()
            time.sleep(self.rng.uniform(0.004, 0.02))
        if conn is not None:
            conn.close()

    def _recover(self, conn: psycopg2.extensions.connection | None, rows: list[tuple[Any, ...]]) -> None:
        """After a failed transaction: did it commit? (only a lost commit reply leaves
        doubt). Asks the source until it answers again: a crashed source is back
        after its crash recovery, with every commit it acknowledged."""
        if conn is not None:
            try:
                conn.close()
            except psycopg2.Error:
                pass
        deadline = time.monotonic() + 120
        while True:
            try:
                found = self.source.execute(
                    sql.SQL("select count(*) from {} where ev_data = %s").format(
                        _event_parent(self.source, self.queue)),
                    (rows[0][1],),
                )
                if found and found[0][0]:
                    self.committed.extend(str(r[1]) for r in rows)
                return
            except psycopg2.Error as exc:
                if time.monotonic() > deadline:
                    self.errors.append(f"could not tell whether a transaction committed: {exc}")
                    return
                time.sleep(0.2)


class Ticker(threading.Thread):
    """pgq.ticker for the source queue every ~50 ms (the storm's own pgqd)."""

    def __init__(self, source: Database, queue: str, period: float = 0.05) -> None:
        super().__init__(name="storm-ticker", daemon=True)
        self.source = source
        self.queue = queue
        self.period = period
        self.stop_event = threading.Event()
        self.ticks = 0
        self.errors = 0

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=30)

    def run(self) -> None:
        conn: psycopg2.extensions.connection | None = None
        while not self.stop_event.wait(self.period):
            try:
                if conn is None:
                    conn = connect(self.source.dsn(), application_name="storm-ticker")
                if ticking.ticker_pass(conn, self.queue) is not None:
                    self.ticks += 1
            except (psycopg2.Error, PgqError):  # ConnectionFailed while a crashed source restarts
                self.errors += 1
                if conn is not None:
                    try:
                        conn.close()
                    except psycopg2.Error:
                        pass
                conn = None
        if conn is not None:
            conn.close()


def _event_parent(db: Database, queue: str) -> sql.Identifier:
    rows = db.execute("select queue_data_pfx from pgq.queue where queue_name = %s", (queue,))
    schema, _, table = str(rows[0][0]).partition(".")
    return sql.Identifier(schema, table)


# -- children -------------------------------------------------------------------


@dataclass
class Child:
    proc: subprocess.Popen[bytes]
    app: str
    pause_file: Path
    out: Path
    err: Path
    target_role: str

    def wait(self, timeout: float) -> int:
        try:
            return int(self.proc.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise

    def release(self) -> None:
        self.pause_file.unlink(missing_ok=True)

    def summary(self) -> dict[str, Any] | None:
        lines = self.out.read_text().strip().splitlines() if self.out.exists() else []
        return json.loads(lines[-1]) if lines else None

    def error_line(self) -> str:
        return self.error_tail(1)

    def error_tail(self, n: int) -> str:
        lines = self.err.read_text().strip().splitlines() if self.err.exists() else []
        return "\n".join(lines[-n:])


def start_child(
    source_dsn: str,
    target_dsn: str,
    args: list[str],
    workdir: Path,
    app: str,
    fault_env: str | None = None,
    target_role: str = "superuser",
) -> Child:
    """Starts tests.faults.mover_child: DSNs through the environment, output to files
    in workdir, --app-name and (with --pause-at) --pause-file filled in."""
    env = dict(os.environ)
    env.pop(FAULT_ENV, None)
    if fault_env:
        env[FAULT_ENV] = fault_env
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env[mover_child.ENV_SOURCE] = source_dsn
    env[mover_child.ENV_TARGET] = target_dsn
    pause_file = workdir / f"{app}.paused"
    argv = [sys.executable, "-m", "tests.faults.mover_child", "--app-name", app, *args]
    if "--pause-at" in args:
        argv += ["--pause-file", str(pause_file)]
    out, err = workdir / f"{app}.out", workdir / f"{app}.err"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(argv, cwd=str(ROOT), env=env, stdout=fo, stderr=fe)
    return Child(proc, app, pause_file, out, err, target_role)


@dataclass
class FaultRecord:
    index: int
    kind: str
    detail: str
    fired: bool
    exit_codes: list[int]
    note: str = ""
    #: seconds from the disruption to the mover's return (None: no single moment of disruption)
    hang: float | None = None
    #: how many payloads the producer had committed when this fault began: the events
    #: committed from then until the next fault began are counted for this fault's kind
    committed_from: int = 0


@dataclass(frozen=True)
class KindEvents:
    """The fate of the events committed while faults of one kind were injected."""

    produced: int = 0
    in_target: int = 0
    lost: int = 0
    doubled: int = 0


@dataclass
class StormResult:
    seed: int
    records: list[FaultRecord] = field(default_factory=list)
    produced: int = 0
    source_events: int = 0
    target_events: int = 0
    lost: int = 0
    doubled: int = 0
    unexpected: int = 0
    mismatched: int = 0
    produced_missing_in_source: int = 0
    invariant_violations: list[str] = field(default_factory=list)
    doubled_midway: int = 0
    hung: list[str] = field(default_factory=list)
    unexpected_errors: list[str] = field(default_factory=list)
    write_paths: Counter[str] = field(default_factory=Counter)
    mid_copy_hits: int = 0
    race_collisions: int = 0
    producer_errors: int = 0
    ticks: int = 0
    final_mark_ok: bool = False
    seconds: float = 0.0
    events_by_kind: dict[str, KindEvents] = field(default_factory=dict)
    #: the kinds this storm could draw (full_disk_target only where a tmpfs mounts)
    kinds: tuple[str, ...] = KINDS

    @property
    def fired(self) -> int:
        return sum(1 for r in self.records if r.fired)

    def by_kind(self) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        for kind in self.kinds:
            recs = [r for r in self.records if r.kind == kind]
            out[kind] = (len(recs), sum(1 for r in recs if r.fired))
        return out

    def longest_hang(self, kind: str) -> float | None:
        """The longest time from a disruption of this kind to the mover's return (for
        throttle: the slow run's whole duration)."""
        hangs = [r.hang for r in self.records if r.kind == kind and r.hang is not None]
        return max(hangs) if hangs else None

    def summary(self) -> str:
        """One line per kind: faults landed (of injected), the events committed while
        they were injected and what became of them, the longest hang."""
        head = (f"{'fault kind':<20}{'faults':>8}{'injected':>9}{'produced':>10}{'in target':>10}"
                f"{'lost':>6}{'doubled':>8}{'longest hang':>13}")
        lines = [head]
        total = KindEvents()
        for kind, (injected, fired) in self.by_kind().items():
            ev = self.events_by_kind.get(kind, KindEvents())
            total = KindEvents(total.produced + ev.produced, total.in_target + ev.in_target,
                               total.lost + ev.lost, total.doubled + ev.doubled)
            hang = self.longest_hang(kind)
            shown = "-" if hang is None else f"{hang:.2f} s"
            lines.append(f"{kind:<20}{fired:>8}{injected:>9}{ev.produced:>10}{ev.in_target:>10}"
                         f"{ev.lost:>6}{ev.doubled:>8}{shown:>13}")
        hangs = [h for h in (self.longest_hang(k) for k in self.kinds) if h is not None]
        longest = f"{max(hangs):.2f} s" if hangs else "-"
        lines.append(f"{'total':<20}{self.fired:>8}{len(self.records):>9}{total.produced:>10}"
                     f"{total.in_target:>10}{total.lost:>6}{total.doubled:>8}{longest:>13}")
        return "\n".join(lines)

    def table(self) -> str:
        lines = [f"fault storm, seed {self.seed}, {self.seconds:.0f} s", "", self.summary(), "",
                 f"{'fault kind':<20}  details of the faults that landed"]
        for kind in self.kinds:
            details = Counter(r.detail for r in self.records if r.kind == kind and r.fired)
            text = ", ".join(f"{d} x{n}" for d, n in sorted(details.items()))
            lines.append(f"{kind:<20}  {text}")
        lines.append("")
        rows = [
            ("events produced (committed)", self.produced),
            ("events in source queue", self.source_events),
            ("events in target queue", self.target_events),
            ("lost", self.lost),
            ("doubled", self.doubled),
            ("in target but not in source", self.unexpected),
            ("produced but missing in source", self.produced_missing_in_source),
            ("doubled at any check in between", self.doubled_midway),
            ("mark/batch invariant violations", len(self.invariant_violations)),
            ("hung movers", len(self.hung)),
            ("unexpected mover errors", len(self.unexpected_errors)),
            ("backend terminated while in COPY", self.mid_copy_hits),
            ("race collisions (skipped/stale batches)", self.race_collisions),
            ("source ticks made during the storm", self.ticks),
        ]
        lines += [f"{name:<42}{value:>10}" for name, value in rows]
        lines.append(f"{'write paths of clean mover runs':<42}  " +
                     ", ".join(f"{k} x{v}" for k, v in sorted(self.write_paths.items())))
        return "\n".join(lines)

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0 and self.doubled == 0 and self.unexpected == 0 and self.mismatched == 0
            and self.produced_missing_in_source == 0 and self.doubled_midway == 0
            and not self.invariant_violations and not self.hung and not self.unexpected_errors
            and self.final_mark_ok and self.produced > 0 and self.source_events == self.target_events
        )


# -- the storm ------------------------------------------------------------------


class Storm:
    """Set up once (queues, pgq_ext, roles, registration), then run(faults, seed)."""

    def __init__(
        self,
        source: Database,
        target: Database,
        source_queue: str = "storm_src",
        target_queue: str = "storm_dst",
        consumer: str = "storm_mover",
        log: Callable[[str], None] = print,
        bouncer: PgBouncer | None = None,
    ) -> None:
        self.source = source
        #: where the pooled storm's movers connect (None: to the servers themselves)
        self.bouncer = bouncer
        self.target = target
        self.source_queue = source_queue
        self.target_queue = target_queue
        self.consumer = consumer
        self.log = log
        tag = uuid.uuid4().hex[:8]
        self.reader = Login(f"storm_reader_{tag}", secrets.token_urlsafe(16))
        self.writer = Login(f"storm_writer_{tag}", secrets.token_urlsafe(16))
        self.workdir = Path(tempfile.mkdtemp(prefix="pgq-storm-"))
        self.children: list[Child] = []
        self._n = 0
        # the network kinds' movers connect through these (started in setup)
        self.source_proxy = FaultProxy(source.cluster.port)
        self.target_proxy = FaultProxy(target.cluster.port)
        # the target queue's event tables go there (setup), where a tmpfs can be mounted
        self.disk: SmallDisk | None = SmallDisk(target.cluster, f"storm_disk_{tag}")
        self.kinds: tuple[str, ...] = POOLED_KINDS if bouncer is not None else KINDS

    # setup / teardown

    def setup(self) -> None:
        s, t = self.source, self.target
        self.source_proxy.start()
        self.target_proxy.start()
        s.execute("select pgq.create_queue(%s)", (self.source_queue,))
        # tick whenever there is a new event: many small batches, many places to fail
        s.execute("select pgq.set_queue_config(%s, 'ticker_max_count', '1')", (self.source_queue,))
        s.execute("select pgq.register_consumer(%s, %s)", (self.source_queue, self.consumer))
        t.execute("select pgq.create_queue(%s)", (self.target_queue,))
        conn = connect(t.dsn())
        try:
            pgq_ext.install(conn)
        finally:
            conn.close()
        for db, login, role in ((s, self.reader, "pgq_reader"), (t, self.writer, "pgq_mover")):
            db.execute(sql.SQL("create role {} login password %s in role {}").format(
                sql.Identifier(login.user), sql.Identifier(role)), (login.password,))
            db.execute(sql.SQL("grant connect on database {} to {}").format(
                sql.Identifier(db.dbname), sql.Identifier(login.user)))
            # a crash must keep every acknowledged commit (the clusters default to off)
            db.execute(sql.SQL("alter database {} set synchronous_commit = on").format(sql.Identifier(db.dbname)))
        if "full_disk_target" not in self.kinds:
            self.disk = None
        elif self.disk is not None and self.disk.start():
            move_event_tables(t.execute, self.target_queue, self.disk.tablespace)
        else:
            self.disk = None
            self.kinds = tuple(k for k in KINDS if k != "full_disk_target")
            self.log("no tmpfs can be mounted here: the full_disk_target kind is left out")

    def teardown(self) -> None:
        self._reap()
        self.source_proxy.stop()
        self.target_proxy.stop()
        for db, login in ((self.source, self.reader), (self.target, self.writer)):
            try:
                db.execute(sql.SQL("drop owned by {}").format(sql.Identifier(login.user)))
                db.cluster.execute("postgres", sql.SQL("drop role if exists {}").format(sql.Identifier(login.user)))
            except psycopg2.Error as exc:
                self.log(f"cleanup of role {login.user} failed: {exc}")
        if self.disk is not None:
            try:
                self.disk.free()
                # the event tables on it go with the queue; then the tablespace is empty
                self.target.execute("select pgq.drop_queue(%s, true)", (self.target_queue,))
            except (psycopg2.Error, subprocess.CalledProcessError) as exc:
                self.log(f"cleanup of the small disk failed: {exc}")
            finally:
                try:
                    self.disk.stop()
                except psycopg2.Error as exc:
                    self.log(f"dropping the small disk's tablespace failed: {exc}")
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _reap(self) -> None:
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.kill()
                child.proc.wait(timeout=30)
        self.children.clear()

    # children

    def spawn(
        self,
        rng: random.Random,
        fault_env: str | None = None,
        pause_at: str | None = None,
        pause_min_events: int = 0,
        loop_seconds: float = 0.0,
        target_options: str = "",
        sigterm_raises: bool = False,
        via_proxy: bool = False,
        extra_args: tuple[str, ...] = (),
    ) -> Child:
        self._n += 1
        app = f"storm-{self._n}"
        as_reader = rng.random() < 0.5
        as_writer = rng.random() < 0.5
        source_dsn = self.source.dsn(self.reader.user, self.reader.password) if as_reader else self.source.dsn()
        target_dsn = self.target.dsn(self.writer.user, self.writer.password) if as_writer else self.target.dsn()
        args = [
            "--source-queue", self.source_queue, "--target-queue", self.target_queue,
            "--consumer", self.consumer, "--chunk-size", str(rng.choice([40, 300, 5000])),
            # mostly one tick a batch (many places to fail), sometimes coalesced catch-up
            "--batch-target-events", str(rng.choice([1, 1, 1, 500])),
            "--loop-seconds", f"{loop_seconds:.3f}",
        ]
        if pause_at:
            args += ["--pause-at", pause_at, "--pause-min-events", str(pause_min_events)]
        if target_options:
            args += ["--target-options", target_options]
        if sigterm_raises:
            args.append("--sigterm-raises")
        args += extra_args  # the last of a repeated option wins
        if self.bouncer is not None:
            source_dsn = self.bouncer.dsn(self.source.dbname, *(
                (self.reader.user, self.reader.password) if as_reader else ()))
            target_dsn = self.bouncer.dsn(self.target.dbname, *(
                (self.writer.user, self.writer.password) if as_writer else ()))
        if via_proxy:
            source_dsn, target_dsn = self.source_proxy.dsn(source_dsn), self.target_proxy.dsn(target_dsn)
            for name, seconds in QUIET_TIMEOUTS.items():
                args += [f"--{name.replace('_', '-')}", f"{seconds:g}"]
        child = start_child(source_dsn, target_dsn, args, self.workdir, app, fault_env,
                            "pgq_mover" if as_writer else "superuser")
        self.children.append(child)
        return child

    @staticmethod
    def wait_paused(child: Child, timeout: float = 30.0) -> bool:
        """True once the child holds its pause; False if it ended (or time ran out) first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if child.pause_file.exists():
                return True
            if child.proc.poll() is not None:
                return False
            time.sleep(0.005)
        return False

    def finish(self, child: Child, result: StormResult, timeout: float = 60.0) -> int:
        """Waits for the child; a clean exit counts its write path, a hang is recorded."""
        try:
            code = child.wait(timeout)
        except subprocess.TimeoutExpired:
            result.hung.append(f"{child.app} did not end within {timeout:g}s")
            return -9
        if code == 0:
            summary = child.summary()
            if summary and summary.get("write_path"):
                result.write_paths[str(summary["write_path"])] += 1
        return code

    def _backend(self, db: Database, app: str) -> tuple[int, str, str] | None:
        rows = db.cluster.execute(
            "postgres",
            "select pid, coalesce(state, ''), coalesce(query, '') from pg_stat_activity"
            # behind a pooler, an idle server session keeps the name of its last client
            " where application_name = %s order by state = 'idle'",
            (app,),
        )
        return (int(rows[0][0]), str(rows[0][1]), str(rows[0][2])) if rows else None

    # the disruptions

    def inject(self, index: int, kind: str, rng: random.Random, result: StormResult,
               producer: Producer) -> FaultRecord:
        method = getattr(self, f"_fault_{kind}")
        rec: FaultRecord = method(index, rng, result, producer)
        return rec

    def _fault_kill_at_point(self, i: int, rng: random.Random, result: StormResult, producer: Producer) -> FaultRecord:
        point = rng.choice(faults.POINTS)
        nth = rng.randint(1, 3)
        child = self.spawn(rng, fault_env=f"{point}:{nth}", loop_seconds=4.0)
        code = self.finish(child, result)
        self._expect(child, code, (0, faults.FAULT_EXIT_CODE), result)
        return FaultRecord(i, "kill_at_point", point, code == faults.FAULT_EXIT_CODE, [code], f"n={nth}")

    def _fault_sigkill(self, i: int, rng: random.Random, result: StormResult, producer: Producer) -> FaultRecord:
        if rng.random() < 0.3:
            producer.burst(rng.randint(500, 2000), rng.choice([0, 500]))
        child = self.spawn(rng, loop_seconds=5.0)
        delay = rng.uniform(0.15, 1.2)
        time.sleep(delay)
        fired = child.proc.poll() is None
        if fired:
            child.proc.send_signal(signal.SIGKILL)
        code = self.finish(child, result)
        self._expect(child, code, (0, -signal.SIGKILL), result)
        return FaultRecord(i, "sigkill", "after delay", fired and code == -signal.SIGKILL, [code], f"{delay:.2f}s")

    def _fault_sigterm(self, i: int, rng: random.Random, result: StormResult, producer: Producer) -> FaultRecord:
        point = rng.choice(faults.POINTS)
        raises = rng.random() < 0.5
        child = self.spawn(rng, pause_at=point, loop_seconds=8.0, sigterm_raises=raises)
        fired = self.wait_paused(child)
        struck = None
        if fired:
            child.proc.send_signal(signal.SIGTERM)
            struck = time.monotonic()
            time.sleep(0.05)
        child.release()
        code = self.finish(child, result)
        hang = None if struck is None else time.monotonic() - struck
        landed = fired and code in (-signal.SIGTERM, 128 + signal.SIGTERM)
        self._expect(child, code, (0, -signal.SIGTERM, 128 + signal.SIGTERM), result)
        detail = f"{point} ({'raised' if raises else 'default action'})"
        return FaultRecord(i, "sigterm", detail, landed, [code], hang=hang)

    def _terminate(self, i: int, rng: random.Random, result: StormResult, producer: Producer,
                   side: str) -> FaultRecord:
        big = side == "source" or rng.random() < 0.5
        if big:
            producer.burst(BIG_BURST_EVENTS, BIG_BURST_PAD)
        child = self.spawn(rng, pause_at=faults.MID_STREAM, loop_seconds=10.0,
                           pause_min_events=BIG_BURST_EVENTS if big else 0)
        fired = False
        state = "not reached"
        struck = None
        if self.wait_paused(child):
            db = self.source if side == "source" else self.target
            backend = self._backend(db, f"{child.app}:{'src' if side == 'source' else 'tgt'}")
            if backend is not None:
                pid, st, query = backend
                # the COPY leads its string, or follows the settings of its transaction
                in_copy = st == "active" and re.search(r"(^|;)\s*copy\b", query.lower()) is not None
                state = "in COPY" if in_copy else (st or "?")
                result.mid_copy_hits += int(in_copy)
                fired = bool(db.cluster.execute("postgres", "select pg_terminate_backend(%s)", (pid,))[0][0])
                struck = time.monotonic()
        child.release()
        code = self.finish(child, result)
        hang = None if struck is None else time.monotonic() - struck
        self._expect(child, code, (0, 1), result)
        path = "chunks" if child.target_role == "pgq_mover" else "copy"
        return FaultRecord(i, f"terminate_{side}", f"{path} path, backend {state}", fired and code == 1, [code],
                           hang=hang)

    def _fault_terminate_source(self, i: int, rng: random.Random, result: StormResult,
                                producer: Producer) -> FaultRecord:
        return self._terminate(i, rng, result, producer, "source")

    def _fault_terminate_target(self, i: int, rng: random.Random, result: StormResult,
                                producer: Producer) -> FaultRecord:
        return self._terminate(i, rng, result, producer, "target")

    def _fault_restart_target(self, i: int, rng: random.Random, result: StormResult,
                              producer: Producer) -> FaultRecord:
        point = rng.choice([faults.MID_STREAM, faults.BEFORE_TARGET_COMMIT,
                            faults.AFTER_TARGET_COMMIT, faults.BEFORE_SOURCE_COMMIT])
        child = self.spawn(rng, pause_at=point, loop_seconds=10.0)
        fired = self.wait_paused(child)
        struck = None
        if fired:
            self.target.cluster.pg_ctl("restart", "fast")
            struck = time.monotonic()
        child.release()
        code = self.finish(child, result)
        hang = None if struck is None else time.monotonic() - struck
        self._expect(child, code, (0, 1), result)
        return FaultRecord(i, "restart_target", point, fired and code == 1, [code], hang=hang)

    def _fault_race(self, i: int, rng: random.Random, result: StormResult, producer: Producer) -> FaultRecord:
        n = rng.choice([2, 3])
        if rng.random() < 0.5:
            producer.burst(rng.randint(300, 1500), 0)
        killer = rng.randrange(n) if rng.random() < 0.3 else -1
        kids = []
        for k in range(n):
            fault_env = f"{rng.choice(faults.POINTS)}:{rng.randint(1, 4)}" if k == killer else None
            kids.append(self.spawn(rng, fault_env=fault_env, loop_seconds=rng.uniform(0.8, 2.0)))
        codes = [self.finish(c, result) for c in kids]
        collisions = 0
        for c, code in zip(kids, codes, strict=True):
            self._expect(c, code, (0, faults.FAULT_EXIT_CODE), result)
            s = c.summary() if code == 0 else None
            if s:
                collisions += int(s["skipped"]) + int(s["stale"])
        result.race_collisions += collisions
        ran_together = sum(1 for code in codes if code in (0, faults.FAULT_EXIT_CODE)) >= 2
        detail = f"{n} movers" + (" (one killed at a point)" if killer >= 0 else "")
        return FaultRecord(i, "race", detail, ran_together, codes, f"collisions={collisions}")

    def _fault_statement_timeout(self, i: int, rng: random.Random, result: StormResult,
                                 producer: Producer) -> FaultRecord:
        ms = rng.choice([1, 2, 5, 10, 20])
        # a batch big enough that some statement outlasts the timeout
        producer.burst(rng.randint(1000, 3000), rng.choice([0, 1000]))
        child = self.spawn(rng, loop_seconds=2.0, target_options=f"-c statement_timeout={ms}")
        code = self.finish(child, result)
        self._expect(child, code, (0, 1), result, allowed_error="QueryCanceled")
        return FaultRecord(i, "statement_timeout", f"{ms} ms", code == 1, [code])

    # the network kinds: the mover connects through the proxies, with small bounds

    def _strike_paused(self, child: Child, strike: Callable[[], None]) -> float | None:
        """Strikes once the child holds its pause, then lets it go; the moment of the
        strike (None when the child never paused)."""
        struck = None
        if self.wait_paused(child):
            strike()
            struck = time.monotonic()
        child.release()
        return struck

    def _settle_network(self, child: Child, result: StormResult, timeout: float = 20.0) -> None:
        """Heals both proxies (held bytes go on: a held COMMIT may land now, as a lost
        reply's would), then waits until the child's abandoned backends are gone."""
        self.source_proxy.heal()
        self.target_proxy.heal()
        deadline = time.monotonic() + timeout
        left: list[str] = []
        while time.monotonic() < deadline:
            left = [f"{side}" for db, side in ((self.source, "src"), (self.target, "tgt"))
                    if self._backend(db, f"{child.app}:{side}") is not None]
            if not left:
                return
            time.sleep(0.05)
        result.hung.append(f"{child.app}: backends {left} still there {timeout:g}s after the network healed")

    def _check_bound(self, child: Child, hang: float | None, result: StormResult) -> None:
        if hang is not None and hang > QUIET_BOUND:
            result.hung.append(f"{child.app}: returned {hang:.1f}s after the network fault (bound {QUIET_BOUND:g}s)")

    def _freeze(self, i: int, rng: random.Random, result: StormResult, producer: Producer,
                side: str) -> FaultRecord:
        if side == "target":
            points = [faults.MID_STREAM, faults.MID_STREAM, faults.AFTER_NEXT_BATCH, faults.BEFORE_TARGET_COMMIT]
        else:
            points = [faults.MID_STREAM, faults.MID_STREAM, faults.AFTER_TARGET_COMMIT, faults.BEFORE_SOURCE_COMMIT]
        point = rng.choice(points)
        big = point == faults.MID_STREAM
        if big:
            producer.burst(BIG_BURST_EVENTS, BIG_BURST_PAD)
        child = self.spawn(rng, pause_at=point, loop_seconds=10.0,
                           pause_min_events=BIG_BURST_EVENTS if big else 0, via_proxy=True)
        proxy = self.target_proxy if side == "target" else self.source_proxy
        struck = self._strike_paused(child, proxy.freeze)
        code = self.finish(child, result)
        hang = None if struck is None else time.monotonic() - struck
        self._settle_network(child, result)
        self._expect(child, code, (0, 1), result, allowed_error="WaitTimeout")
        self._check_bound(child, hang, result)
        path = "chunks" if child.target_role == "pgq_mover" else "copy"
        landed = struck is not None and code == 1 and "WaitTimeout" in child.error_line()
        return FaultRecord(i, f"freeze_{side}", f"{point}, {path} path", landed, [code], hang=hang)

    def _fault_freeze_target(self, i: int, rng: random.Random, result: StormResult,
                             producer: Producer) -> FaultRecord:
        return self._freeze(i, rng, result, producer, "target")

    def _fault_freeze_source(self, i: int, rng: random.Random, result: StormResult,
                             producer: Producer) -> FaultRecord:
        return self._freeze(i, rng, result, producer, "source")

    def _fault_cut_target_mid_copy(self, i: int, rng: random.Random, result: StormResult,
                                   producer: Producer) -> FaultRecord:
        producer.burst(BIG_BURST_EVENTS, BIG_BURST_PAD)
        child = self.spawn(rng, pause_at=faults.MID_STREAM, loop_seconds=10.0,
                           pause_min_events=BIG_BURST_EVENTS, via_proxy=True)
        struck = self._strike_paused(child, self.target_proxy.cut)
        code = self.finish(child, result)
        hang = None if struck is None else time.monotonic() - struck
        self._settle_network(child, result)
        self._expect(child, code, (0, 1), result)
        self._check_bound(child, hang, result)
        path = "chunks" if child.target_role == "pgq_mover" else "copy"
        return FaultRecord(i, "cut_target_mid_copy", f"{path} path", struck is not None and code == 1, [code],
                           hang=hang)

    def _fault_cut_source_at_byte(self, i: int, rng: random.Random, result: StormResult,
                                  producer: Producer) -> FaultRecord:
        producer.burst(BIG_BURST_EVENTS, BIG_BURST_PAD)
        nbytes = rng.randint(50_000, 4_000_000)
        child = self.spawn(rng, pause_at=faults.AFTER_NEXT_BATCH, loop_seconds=10.0,
                           pause_min_events=BIG_BURST_EVENTS, via_proxy=True)
        struck = self._strike_paused(child, lambda: self.source_proxy.cut_at(nbytes))
        code = self.finish(child, result)
        # the reset comes when the n-th byte passes: the hang is counted from the strike
        hang = None if struck is None else time.monotonic() - struck
        self._settle_network(child, result)
        self._expect(child, code, (0, 1), result)
        self._check_bound(child, hang, result)
        path = "chunks" if child.target_role == "pgq_mover" else "copy"
        size = "under 1 MB" if nbytes < 1_000_000 else "1-4 MB"
        return FaultRecord(i, "cut_source_at_byte", f"{path} path, {size} in", struck is not None and code == 1,
                           [code], f"n={nbytes}", hang=hang)

    def _fault_throttle(self, i: int, rng: random.Random, result: StormResult,
                        producer: Producer) -> FaultRecord:
        side = rng.choice(["target", "source"])
        rate = rng.choice([1_500_000, 2_000_000, 3_000_000])
        latency = rng.choice([0.0, 0.002, 0.005])
        # the backlog the earlier disruptions left is moved at full speed first: the slow
        # link carries the big batch, not minutes of catch-up
        self.catch_up()
        producer.burst(BIG_BURST_EVENTS, BIG_BURST_PAD)
        time.sleep(0.2)  # the ticker closes the burst's batch
        (self.target_proxy if side == "target" else self.source_proxy).throttle(rate)
        self.source_proxy.delay(latency)
        self.target_proxy.delay(latency)
        started = time.monotonic()
        # one drain that stops after the big batch (with the ticker at 50 ms, a run of
        # one-tick batches over a high-latency link would chase the ticks for ever)
        child = self.spawn(rng, via_proxy=True, extra_args=(
            "--batch-target-events", "500", "--max-events", str(BIG_BURST_EVENTS)))
        code = self.finish(child, result, timeout=45.0)
        took = time.monotonic() - started
        self._settle_network(child, result)
        self._expect(child, code, (0,), result)
        summary = child.summary() if code == 0 else None
        moved = int(summary["events"]) if summary else 0
        detail = f"{side} {rate / 1e6:g} MB/s, {latency * 1000:g} ms latency"
        # landed: the big batch went over the slow link and the run completed
        return FaultRecord(i, "throttle", detail, code == 0 and moved >= BIG_BURST_EVENTS, [code],
                           f"events={moved} took={took:.1f}s", hang=took)

    # the pooler's own faults (the pooled storm)

    def _pooler_fault(self, i: int, rng: random.Random, result: StormResult, producer: Producer,
                      kind: str) -> FaultRecord:
        """The pooler restarted (immediate shutdown, then started again), or its console's
        KILL of one side's database (then RESUME), while the child holds a batch open."""
        assert self.bouncer is not None
        bouncer = self.bouncer
        point = rng.choice([faults.MID_STREAM, faults.MID_STREAM, faults.BEFORE_TARGET_COMMIT,
                            faults.AFTER_TARGET_COMMIT, faults.BEFORE_SOURCE_COMMIT])
        big = point == faults.MID_STREAM
        if big:
            producer.burst(BIG_BURST_EVENTS, BIG_BURST_PAD)
        child = self.spawn(rng, pause_at=point, loop_seconds=8.0, pause_min_events=BIG_BURST_EVENTS if big else 0)
        db = rng.choice([self.source, self.target])
        if kind == "bouncer_restart":
            detail, strike = point, bouncer.restart
        else:
            detail = f"{point}, KILL {'source' if db is self.source else 'target'}"

            def strike() -> None:
                bouncer.console(f"KILL {db.dbname}")
                bouncer.console(f"RESUME {db.dbname}")

        struck = self._strike_paused(child, strike)
        code = self.finish(child, result)
        hang = None if struck is None else time.monotonic() - struck
        self._expect(child, code, (0, 1), result)
        path = "chunks" if child.target_role == "pgq_mover" else "copy"
        return FaultRecord(i, kind, f"{detail}, {path} path", struck is not None and code == 1, [code], hang=hang)

    def _fault_bouncer_restart(self, i: int, rng: random.Random, result: StormResult,
                               producer: Producer) -> FaultRecord:
        return self._pooler_fault(i, rng, result, producer, "bouncer_restart")

    def _fault_bouncer_kill(self, i: int, rng: random.Random, result: StormResult,
                            producer: Producer) -> FaultRecord:
        return self._pooler_fault(i, rng, result, producer, "bouncer_kill")

    def catch_up(self) -> None:
        """One clean drain in the driver (direct connections, default bounds)."""
        s = connect(self.source.dsn(), application_name="storm-catch-up")
        t = connect(self.target.dsn(), application_name="storm-catch-up")
        try:
            options = MoverOptions(self.source_queue, self.target_queue, self.consumer)
            QueueMover(s, t, options, fault=lambda point: None).drain()
        except (psycopg2.Error, PgqError) as exc:
            # best effort: the throttled run still stops after the big batch
            self.log(f"catch-up before throttle failed: {type(exc).__name__}: {str(exc).strip()[:160]}")
        finally:
            s.close()
            t.close()

    # the servers' own faults: a crash with recovery, a full disk

    def _crash(self, i: int, rng: random.Random, result: StormResult, producer: Producer,
               side: str) -> FaultRecord:
        db = self.source if side == "source" else self.target
        point = rng.choice([faults.MID_STREAM, faults.MID_STREAM, faults.BEFORE_TARGET_COMMIT,
                            faults.AFTER_TARGET_COMMIT, faults.BEFORE_SOURCE_COMMIT])
        big = point == faults.MID_STREAM and rng.random() < 0.5
        if big:
            producer.burst(BIG_BURST_EVENTS, BIG_BURST_PAD)
        child = self.spawn(rng, pause_at=point, loop_seconds=10.0, pause_min_events=BIG_BURST_EVENTS if big else 0)
        struck = self._strike_paused(child, db.cluster.kill9)
        code = self.finish(child, result)
        hang = None if struck is None else time.monotonic() - struck
        recovery = db.cluster.start_after_crash() if struck is not None else 0.0
        self._expect(child, code, (0, 1), result)
        path = "chunks" if child.target_role == "pgq_mover" else "copy"
        return FaultRecord(i, f"crash_{side}", f"{point}, {path} path", struck is not None and code == 1, [code],
                           f"back after {recovery:.1f}s", hang=hang)

    def _fault_crash_source(self, i: int, rng: random.Random, result: StormResult,
                            producer: Producer) -> FaultRecord:
        return self._crash(i, rng, result, producer, "source")

    def _fault_crash_target(self, i: int, rng: random.Random, result: StormResult,
                            producer: Producer) -> FaultRecord:
        return self._crash(i, rng, result, producer, "target")

    def _fault_full_disk_target(self, i: int, rng: random.Random, result: StormResult,
                                producer: Producer) -> FaultRecord:
        """The target's event tables run out of space under a 6 MB batch: the mover
        fails with DiskFull and nothing of that batch is in the target; once the disk
        is freed, later movers move it once."""
        assert self.disk is not None
        self.catch_up()  # the backlog first, so that the big batch is the one that meets the full disk
        prefix = producer.burst(BIG_BURST_EVENTS, BIG_BURST_PAD)
        # the burst's 2 KB extras compress well: its rows take about 0.5 MB in the table
        headroom = rng.choice([0, 32 << 10, 128 << 10])
        self.disk.fill(headroom)
        started = time.monotonic()
        try:
            child = self.spawn(rng, loop_seconds=1.0)
            code = self.finish(child, result)
        finally:
            self.disk.free()
        took = time.monotonic() - started
        self._expect(child, code, (0, 1), result, allowed_error="DiskFull")
        landed = code == 1 and "DiskFull" in child.error_line()
        applied = int(self.target.execute(
            sql.SQL("select count(*) from {} where ev_data like %s").format(
                _event_parent(self.target, self.target_queue)),
            (prefix + "%",),
        )[0][0])
        if landed and applied:
            result.invariant_violations.append(
                f"after fault {i}: the mover failed on a full disk, yet {applied} events of its batch"
                " are in the target")
        path = "chunks" if child.target_role == "pgq_mover" else "copy"
        return FaultRecord(i, "full_disk_target", f"{path} path, {headroom >> 10} KB free", landed, [code],
                           f"applied={applied}", hang=took)

    def _expect(self, child: Child, code: int, allowed: tuple[int, ...], result: StormResult,
                allowed_error: str | None = None) -> None:
        """Exit codes outside `allowed`, and errors a disruption cannot explain, are findings."""
        line = child.error_line()
        tail = child.error_tail(400)
        if code not in allowed or (code == 1 and ("Traceback" in tail or "SystemError" in tail)):
            result.unexpected_errors.append(f"{child.app}: exit {code}:\n{child.error_tail(25)}")
        elif code == 1 and allowed_error and allowed_error not in line and "ConnectionFailed" not in line:
            result.unexpected_errors.append(f"{child.app}: {line}")
        elif code == 1 and any(bad in line for bad in ("PositionMismatch", "TrackingKeyConflict")):
            result.unexpected_errors.append(f"{child.app}: {line}")
        elif code == 1 and self.bouncer is not None and not (
                f":{self.bouncer.port}/" in line or any(f": {side} " in line for side in ("source", "target"))):
            # behind the pooler every error names its side or the server as configured
            result.unexpected_errors.append(f"{child.app}: names neither side nor server: {line}")

    # checks

    def check_invariants(self, index: int, result: StormResult) -> None:
        """With no mover running: batch+mark or neither, and nothing doubled so far."""
        mark = self.target.execute("select pgq_ext.get_last_tick(%s, '')", (self.consumer,))[0][0]
        rows = self.source.execute(
            "select s.sub_last_tick, s.sub_next_tick, s.sub_batch from pgq.subscription s"
            " join pgq.queue q on q.queue_id = s.sub_queue join pgq.consumer c on c.co_id = s.sub_consumer"
            " where q.queue_name = %s and c.co_name = %s",
            (self.source_queue, self.consumer),
        )
        last, nxt, batch = rows[0]
        if not (mark is None or mark == last or (batch is not None and mark == nxt)):
            result.invariant_violations.append(
                f"after fault {index}: target mark {mark}, source last tick {last}, open batch {batch} to {nxt}"
            )
        dup = self.target.execute(
            sql.SQL("select count(*) - count(distinct ev_data) from {}").format(
                _event_parent(self.target, self.target_queue))
        )[0][0]
        result.doubled_midway = max(result.doubled_midway, int(dup))

    def _digests(self, db: Database, queue: str) -> Counter[tuple[str, str]]:
        """Multiset of (ev_data, md5 of every carried field) over all the queue's event tables."""
        rows = db.execute(
            sql.SQL(
                "select ev_data, md5(row(ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4,"
                " ev_time at time zone 'UTC')::text) from {}"
            ).format(_event_parent(db, queue))
        )
        return Counter((str(r[0]), str(r[1])) for r in rows)

    def final_drain(self, result: StormResult) -> None:
        """Tick past everything produced, then one clean mover drains to the end."""
        s = connect(self.source.dsn(), application_name="storm-final")
        t = connect(self.target.dsn(), application_name="storm-final")
        try:
            options = MoverOptions(self.source_queue, self.target_queue, self.consumer)
            # an explicit no-op hook: a PGQ_MOVER_FAULT left in this environment must not fire here
            report = QueueMover(s, t, options, fault=lambda point: None).drain(
                DrainBounds(force_tick=True, run_ticker=True)
            )
            self.log(f"final drain: {report.batches} batches, {report.skipped} skipped, {report.events} events")
            result.write_paths[report.write_path] += 1
            last_tick = pgq.newest_tick(s, self.source_queue)
            info = pgq.get_consumer_info(s, self.source_queue, self.consumer)
            s.rollback()
            mark = pgq_ext.get_last_tick(t, self.consumer, "")
            t.rollback()
            result.final_mark_ok = (
                info is not None and info.current_batch is None and info.last_tick == last_tick == mark
            )
            if not result.final_mark_ok:
                self.log(f"after the final drain: source last tick {last_tick}, consumer {info}, mark {mark}")
        finally:
            s.close()
            t.close()

    def compare(self, result: StormResult, produced: list[str]) -> None:
        src = self._digests(self.source, self.source_queue)
        dst = self._digests(self.target, self.target_queue)
        result.produced = len(produced)
        result.source_events = sum(src.values())
        result.target_events = sum(dst.values())
        result.lost = sum((src - dst).values())
        result.unexpected = sum((dst - src).values())
        per_payload = Counter(data for data, _ in dst.elements())
        result.doubled = sum(n - 1 for n in per_payload.values() if n > 1)
        src_by_data = {data: digest for data, digest in src}
        result.mismatched = sum(1 for data, digest in dst if data in src_by_data and src_by_data[data] != digest)
        source_payloads = Counter(data for data, _ in src.elements())
        result.produced_missing_in_source = sum(1 for p in produced if p not in source_payloads)
        result.events_by_kind = self._events_by_kind(result, produced, per_payload)
        if any(n > 1 for n in source_payloads.values()):
            result.invariant_violations.append("the producer's payloads are not unique in the source")

    @staticmethod
    def _events_by_kind(result: StormResult, produced: list[str],
                        in_target: Counter[str]) -> dict[str, KindEvents]:
        """Each fault's window of committed payloads (from its start to the next fault's
        start; the first one's from the storm's start, the last one's to the end),
        summed per kind: the windows cover every payload once."""
        out: dict[str, KindEvents] = {}
        records = sorted(result.records, key=lambda r: r.index)
        for n, rec in enumerate(records):
            start = rec.committed_from if n else 0
            end = records[n + 1].committed_from if n + 1 < len(records) else len(produced)
            counts = [in_target.get(p, 0) for p in produced[start:end]]
            ev = out.get(rec.kind, KindEvents())
            out[rec.kind] = KindEvents(
                ev.produced + len(counts), ev.in_target + sum(counts),
                ev.lost + sum(1 for c in counts if c == 0), ev.doubled + sum(c - 1 for c in counts if c > 1),
            )
        return out

    # the whole run

    def run(self, faults_wanted: int, seed: int) -> StormResult:
        """Injects until `faults_wanted` disruptions have landed (at most twice as many tries)."""
        rng = random.Random(seed)
        result = StormResult(seed, kinds=self.kinds)
        started = time.monotonic()
        producer = Producer(self.source, self.source_queue, seed)
        ticker = Ticker(self.source, self.source_queue)
        producer.start()
        ticker.start()
        schedule = list(self.kinds)
        rng.shuffle(schedule)
        kinds, weights = zip(*((k, w) for k, w in WEIGHTS.items() if k in self.kinds), strict=True)
        try:
            time.sleep(0.3)  # some events and ticks before the first mover
            index = 0
            while result.fired < faults_wanted and index < 2 * faults_wanted:
                by_kind = result.by_kind()
                # after the first round, a kind that has not landed yet goes first
                missing = [k for k in self.kinds if by_kind[k][0] and not by_kind[k][1]]
                if index < len(schedule):
                    kind = schedule[index]
                elif missing:
                    kind = missing[0]
                else:
                    kind = rng.choices(kinds, weights)[0]
                committed_from = len(producer.committed)
                rec = self.inject(index, kind, rng, result, producer)
                rec.committed_from = committed_from
                if not (producer.is_alive() and ticker.is_alive()):
                    result.unexpected_errors.append(f"after fault {index}: the producer or the ticker thread died")
                    result.records.append(rec)
                    break
                result.records.append(rec)
                self._reap()
                self.check_invariants(index, result)
                self.log(f"fault {index:3d} {rec.kind:<18} {'landed' if rec.fired else 'missed':<7}"
                         f" {rec.detail} {rec.note} exit={rec.exit_codes}")
                index += 1
        finally:
            producer.stop()
            ticker.stop()
            self._reap()
        result.producer_errors = len(producer.errors)
        result.ticks = ticker.ticks
        self.final_drain(result)
        self.compare(result, producer.committed)
        result.seconds = time.monotonic() - started
        return result
