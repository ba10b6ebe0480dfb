"""Several source databases moving at once into one target queue.

    python -m benchmarks.bench_scaleout --sources 1,2,4,8 --events 100000 --ticks-of 10000 --repeat 3

Builds a throwaway cluster (as bench_mover) with as many source databases as the
largest --sources count, each with its own N events (distinct ids and times) in ticks
of B and its own consumer (bench_mover_1, bench_mover_2, ...), and one target template
with the target queue and pgq_ext. For each count k, interleaved per repeat, each on
freshly reset source consumers and a fresh target database:

(a1) one COPY stream: the k sources' event tables, binary COPY TO STDOUT by k psql
     processes, joined into ONE binary COPY FROM STDIN of the target queue's current
     event table by one psql (a byte pump here strips the inner headers/trailers):
     what the target takes from a single stream of the same k*N events;
(ak) k COPY streams at once: k psql | psql pairs into the same target table, each its
     own transaction: what the target takes from k concurrent writers;
(m)  k movers at once: one core mover process (QueueMover.drain, superuser, COPY path)
     per source, distinct consumer names, all into the one target queue; each connects
     first, then all start together.

Aggregate rate = k*N events over the span from the first start to the last end
(server clock_timestamp() around each COPY; time.time() around each drain). Ratios
are medians of per-repeat ratios. While each run goes, pg_stat_activity is sampled
every 20 ms: the share of the bench's backends in each state / wait event, target and
sources apart (CPU = active without a wait event; Client:ClientRead = a backend
waiting for its client to send; Lock:extend = relation extension lock on the event
table; LWLock:WALInsert/WALWrite = WAL; IO:* = data files). Every run is checked: the
target must hold all k*N events with the sources' content. Removes everything.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any

from psycopg2 import sql

from benchmarks.bench_mover import (
    COLUMNS,
    ROOT,
    SOURCE_QUEUE,
    TARGET_DB,
    TARGET_QUEUE,
    TARGET_TEMPLATE,
    Bench,
    Finished,
    _one,
    _session,
    _table,
    add_sums,
    checksum,
    load_source,
    parse_result,
    queue_table_prefix,
)

BINARY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
BINARY_TRAILER = b"\xff\xff"
EPOCH = "select extract(epoch from clock_timestamp())"


def source_db(i: int) -> str:
    return f"bench_src_{i}"


def consumer(i: int) -> str:
    return f"bench_mover_{i}"


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


@dataclass
class Run:
    events: int
    span: float
    peak_rss_kb: int = 0
    cpu_busy: float | None = None  # share of the machine's CPU time busy over the run
    waits: dict[str, collections.Counter[str]] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.events / self.span if self.span > 0 else 0.0


class WaitSampler(threading.Thread):
    """Samples pg_stat_activity of the bench databases until stopped."""

    QUERY = """
        select datname, state, wait_event_type, wait_event from pg_catalog.pg_stat_activity
         where backend_type = 'client backend' and pid <> pg_catalog.pg_backend_pid()
           and datname = any(%s)
    """

    def __init__(self, dsn: str, sides: dict[str, str], interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.dsn, self.sides, self.interval = dsn, sides, interval
        self.counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with _session(self.dsn) as conn, conn.cursor() as cur:
                while not self.done.is_set():
                    cur.execute(self.QUERY, (list(self.sides),))
                    for datname, state, wtype, wevent in cur.fetchall():
                        if state == "active":
                            key = f"{wtype}:{wevent}" if wevent else "CPU"
                        elif state == "idle in transaction":  # waits for its client (ClientRead)
                            key = "idle in transaction"
                        else:
                            key = str(state)
                        self.counts[self.sides[datname]][key] += 1
                    self.done.wait(self.interval)
        except BaseException as exc:  # reported by stop(), never kills the run
            self.error = exc

    def stop(self) -> dict[str, collections.Counter[str]]:
        self.done.set()
        self.join(timeout=10)
        if self.error is not None:
            print(f"  (wait sampling failed: {self.error})", flush=True)
        return dict(self.counts)


class ScaleOut(Bench):
    """Bench's cluster, roles and target template; k source databases instead of one."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.max_sources = max(args.sources)
        self.start_ticks: dict[int, int] = {}
        self.sums: dict[int, tuple[Any, ...]] = {}

    def load(self) -> None:
        n, b = self.args.events, self.args.batch_size
        started = time.perf_counter()
        with _session(self.dsn("postgres")) as admin:
            for i in range(1, self.max_sources + 1):
                _one(admin, sql.SQL("create database {}").format(sql.Identifier(source_db(i))))
        for i in range(1, self.max_sources + 1):
            with _session(self.dsn(source_db(i))) as conn:
                self.start_ticks[i], self.sums[i] = load_source(
                    conn, n, b, offset=(i - 1) * n, consumers=(consumer(i),))
        print(f"loaded {self.max_sources} sources of {n:,} events in ticks of {b:,} in"
              f" {time.perf_counter() - started:.1f}s", flush=True)

    def reset_k(self, k: int) -> None:
        for i in range(1, k + 1):
            with _session(self.dsn(source_db(i))) as conn:
                _one(conn, "select pgq.register_consumer_at(%s, %s, %s)",
                     (SOURCE_QUEUE, consumer(i), self.start_ticks[i]))
        with _session(self.dsn("postgres")) as admin, admin.cursor() as cur:
            cur.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(TARGET_DB)))
            cur.execute("checkpoint")
            cur.execute(sql.SQL("create database {} template {}").format(
                sql.Identifier(TARGET_DB), sql.Identifier(TARGET_TEMPLATE)))

    def verify_k(self, k: int, label: str) -> None:
        want: tuple[Any, ...] = ()
        for i in range(1, k + 1):
            want = add_sums(want, self.sums[i])
        with _session(self.dsn(TARGET_DB)) as conn:
            got = checksum(conn, queue_table_prefix(conn, TARGET_QUEUE))
        if got != want:
            raise RuntimeError(f"{label}: target holds {got}, sources {want}: not the same events")

    # -- helpers ------------------------------------------------------------------

    def _copy_sql(self) -> tuple[str, str]:
        cols = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
        with _session(self.dsn(source_db(1))) as src:
            out_sql = sql.SQL("copy (select {} from {}) to stdout (format binary)").format(
                cols, _table(queue_table_prefix(src, SOURCE_QUEUE))).as_string(src)
        with _session(self.dsn(TARGET_DB)) as dst:
            current = str(_one(dst, "select pgq.current_event_table(%s)", (TARGET_QUEUE,)))
            in_sql = sql.SQL("copy {} ({}) from stdin (format binary)").format(
                _table(current), cols).as_string(dst)
        return out_sql, in_sql

    def _psql(self, db: str, *commands: str) -> list[str]:
        argv = [str(self.cluster.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                "-d", self.dsn(db)]
        for command in commands:
            argv += ["-c", command]
        return argv

    def _sampled(self, k: int) -> WaitSampler:
        sides = {TARGET_DB: "target", **{source_db(i): "sources" for i in range(1, k + 1)}}
        sampler = WaitSampler(self.dsn("postgres"), sides)
        sampler.start()
        return sampler

    @staticmethod
    def _epochs(stdout: str) -> tuple[float, float]:
        values = [float(line) for line in stdout.split() if line.replace(".", "", 1).isdigit()]
        if len(values) < 2:
            raise RuntimeError(f"psql printed no clock_timestamp pair: {stdout!r}")
        return values[0], values[-1]

    # -- scenarios ----------------------------------------------------------------

    def one_stream(self, k: int) -> Run:
        """(a1): k sources' COPY OUT joined into one binary COPY IN of the target."""
        self.reset_k(k)
        out_sql, in_sql = self._copy_sql()
        env = self.child_env()
        sampler = self._sampled(k)
        busy0 = _cpu_jiffies()
        outs = [subprocess.Popen(self._psql(source_db(i), out_sql), stdout=subprocess.PIPE, env=env)
                for i in range(1, k + 1)]
        into = subprocess.Popen(self._psql(TARGET_DB, EPOCH, in_sql, EPOCH), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert into.stdin is not None and into.stdout is not None
        try:
            _pump([o.stdout for o in outs if o.stdout is not None], into.stdin)
        finally:
            into.stdin.close()
            into.stdin = None  # closed: communicate() must not flush it
        stdout, stderr = into.communicate()
        for o in outs:
            o.wait()
        waits, busy = sampler.stop(), _busy_since(busy0)
        if into.returncode or any(o.returncode for o in outs):
            raise RuntimeError(f"(a1) psql failed: {stderr.decode()[-2000:]}")
        t0, t1 = self._epochs(stdout.decode())
        self.verify_k(k, "(a1)")
        return Run(k * self.args.events, t1 - t0, 0, busy, waits)

    def k_streams(self, k: int) -> Run:
        """(ak): k psql | psql pairs at once into the target's current event table."""
        self.reset_k(k)
        out_sql, in_sql = self._copy_sql()
        env = self.child_env()
        sampler = self._sampled(k)
        busy0 = _cpu_jiffies()
        pairs = []
        for i in range(1, k + 1):
            out = subprocess.Popen(self._psql(source_db(i), out_sql), stdout=subprocess.PIPE, env=env)
            into = subprocess.Popen(self._psql(TARGET_DB, EPOCH, in_sql, EPOCH), stdin=out.stdout,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
            assert out.stdout is not None
            out.stdout.close()  # the target psql holds it now
            pairs.append((out, into))
        spans = []
        for out, into in pairs:
            stdout, stderr = into.communicate()
            out.wait()
            if into.returncode or out.returncode:
                raise RuntimeError(f"(ak) psql failed: {stderr.decode()[-2000:]}")
            spans.append(self._epochs(stdout.decode()))
        waits, busy = sampler.stop(), _busy_since(busy0)
        self.verify_k(k, "(ak)")
        span = max(t1 for _, t1 in spans) - min(t0 for t0, _ in spans)
        return Run(k * self.args.events, span, 0, busy, waits)

    def movers(self, k: int) -> Run:
        """(m): k core mover processes at once, one per source, into the one target queue."""
        self.reset_k(k)
        env = self.child_env()
        children = []
        for i in range(1, k + 1):
            argv = [sys.executable, "-m", "benchmarks.bench_mover", "--child", "core",
                    "--source-dsn", self.dsn(source_db(i)), "--target-dsn", self.dsn(TARGET_DB),
                    "--consumer", consumer(i), "--wait-go"]
            err = tempfile.TemporaryFile("w+")
            proc = subprocess.Popen(argv, env=env, cwd=str(ROOT), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=err, text=True)
            children.append((argv, proc, err))
        try:
            for argv, proc, err in children:  # all connected before any starts
                assert proc.stdout is not None
                line = proc.stdout.readline()
                if line.strip() != "READY":
                    proc.wait()
                    err.seek(0)
                    raise RuntimeError(f"(m) mover {argv[-2]} did not start: {line}{err.read()[-2000:]}")
            sampler = self._sampled(k)
            busy0 = _cpu_jiffies()
            for _, proc, _ in children:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.close()
            results, peak = [], 0
            for argv, proc, err in children:
                assert proc.stdout is not None
                stdout = proc.stdout.read()
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                err.seek(0)
                done = Finished(proc.returncode, stdout, err.read(), 0.0, int(usage.ru_maxrss), 0.0)
                results.append(parse_result(argv, done))
                peak = max(peak, done.peak_rss_kb)
            waits, busy = sampler.stop(), _busy_since(busy0)
        finally:
            for _, proc, err in children:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                err.close()
        self.verify_k(k, "(m)")
        moved = sum(int(r["events"]) for r in results)
        if moved != k * self.args.events:
            raise RuntimeError(f"(m) movers moved {moved} events, not {k * self.args.events}")
        span = max(r["t_end"] for r in results) - min(r["t_start"] for r in results)
        return Run(moved, span, peak, busy, waits)


def _busy_since(before: tuple[int, int]) -> float | None:
    after = _cpu_jiffies()
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else None


def _read_exact(stream: IO[bytes], n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            raise RuntimeError("binary COPY stream ended inside its header")
        data += chunk
    return data


def _pump(sources: list[IO[bytes]], sink: IO[bytes]) -> None:
    """Joins binary COPY streams into one: the first header, every row, the last trailer."""
    for i, src in enumerate(sources):
        head = _read_exact(src, 19)  # signature, flags, header extension length
        if head[:11] != BINARY_SIGNATURE:
            raise RuntimeError("not a binary COPY stream")
        head += _read_exact(src, int.from_bytes(head[15:19], "big"))
        if i == 0:
            sink.write(head)
        tail = b""
        while chunk := src.read(1 << 16):
            buf = tail + chunk
            sink.write(buf[:-2])
            tail = buf[-2:]
        if tail != BINARY_TRAILER:
            raise RuntimeError("binary COPY stream without its trailer")
        if i == len(sources) - 1:
            sink.write(tail)


def _waits_line(waits: dict[str, collections.Counter[str]], side: str, top: int = 6) -> str:
    counts = waits.get(side, collections.Counter())
    total = sum(counts.values())
    if not total:
        return f"{side}: no samples"
    parts = [f"{key} {100 * n / total:.0f}%" for key, n in counts.most_common(top)]
    return f"{side} ({total} samples): " + ", ".join(parts)


def report(args: argparse.Namespace, results: dict[tuple[int, str], list[Run]], load: list[float]) -> None:
    print()
    print(f"{args.events:,} events a source in ticks of {args.batch_size:,}, repeat {args.repeat}, medians;"
          f" {os.cpu_count()} CPUs, load average {min(load):.1f}..{max(load):.1f} during the runs")
    header = (f"{'k':>2} {'scenario':<34} {'events':>9} {'events/s':>10} {'x (a1)':>7} {'x (ak)':>7}"
              f" {'span s':>7} {'CPU busy':>8} {'peak RSS':>9}")
    print(header)
    print("-" * len(header))
    names = {"a1": "(a1) one COPY stream", "ak": "(ak) {k} COPY streams at once", "m": "(m) {k} movers at once"}

    def ratio(runs: list[Run], against: list[Run]) -> float:
        return statistics.median(r.rate / a.rate for r, a in zip(runs, against, strict=True))

    for k in args.sources:
        for kind in ("a1", "ak", "m"):
            runs = results[(k, kind)]
            mid = sorted(runs, key=lambda r: r.rate)[(len(runs) - 1) // 2]
            busy = [r.cpu_busy for r in runs if r.cpu_busy is not None]
            rss = max(r.peak_rss_kb for r in runs)
            rate = statistics.median(r.rate for r in runs)
            print(f"{k:>2} {names[kind].format(k=k):<34} {mid.events:>9,} {rate:>10,.0f}"
                  f" {ratio(runs, results[(k, 'a1')]):>7.2f} {ratio(runs, results[(k, 'ak')]):>7.2f}"
                  f" {mid.span:>7.2f} {f'{100 * statistics.median(busy):.0f}%' if busy else '-':>8}"
                  f" {f'{rss / 1024:.0f} MB' if rss else '-':>9}")
    print("\nwhere the time goes: share of pg_stat_activity samples of the bench's backends, all repeats")
    for k in args.sources:
        for kind in ("a1", "ak", "m"):
            waits: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
            for run in results[(k, kind)]:
                for side, counts in run.waits.items():
                    waits[side].update(counts)
            print(f"  k={k} {names[kind].format(k=k)}:")
            print(f"      {_waits_line(waits, 'target')}")
            print(f"      {_waits_line(waits, 'sources')}")
    print("(m)'s peak RSS: the largest of its mover processes; spans run from the first start to"
          " the last end (server clock around each COPY, the movers' clock around each drain)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="See docs/benchmarks.md. Not a test: figures only.")
    parser.add_argument("--sources", default="1,2,4,8",
                        help="comma-separated source counts k to run, e.g. 1,2,4,8")
    parser.add_argument("--events", type=int, default=100_000, help="N events in each source queue")
    parser.add_argument("--ticks-of", "--batch-size", dest="batch_size", type=int, default=10_000,
                        metavar="B", help="a tick after every B events")
    parser.add_argument("--repeat", type=int, default=3, help="runs per scenario and k; medians")
    args = parser.parse_args(argv)
    try:
        args.sources = sorted({int(v) for v in args.sources.split(",") if v.strip()})
    except ValueError:
        parser.error(f"--sources: comma-separated counts, got {args.sources!r}")
    if not args.sources or min(args.sources) < 1 or max(args.sources) > 64:
        parser.error("--sources: counts from 1 to 64")
    if args.events < 1 or args.batch_size < 1 or args.repeat < 1:
        parser.error("--events, --ticks-of and --repeat must be positive")
    args.chunk_size = None

    bench = ScaleOut(args)
    results: dict[tuple[int, str], list[Run]] = {}
    load = [os.getloadavg()[0]]
    try:
        bench.start()
        for k in args.sources:
            for i in range(args.repeat):
                for kind, scenario in (("a1", bench.one_stream), ("ak", bench.k_streams), ("m", bench.movers)):
                    load.append(os.getloadavg()[0])
                    run = scenario(k)
                    results.setdefault((k, kind), []).append(run)
                    print(f"  k={k} run {i + 1} ({kind}): {run.rate:,.0f} events/s over {run.span:.2f}s",
                          flush=True)
    finally:
        bench.stop()
    load.append(os.getloadavg()[0])
    report(args, results, load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
