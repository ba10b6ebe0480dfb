"""What a catch-up costs the OLTP source, with and without max_events_per_second.

    python -m benchmarks.bench_oltp [--events 500000] [--cap 50000] [--seconds 16]

Two throwaway clusters (source and target, on disk). The source holds pgbench's tables
(scale 5) and a queue with --events events in ticks of 10,000. For each scenario,
pgbench (-c 4, the TPC-B-like default script) runs --seconds seconds against the source
and logs every transaction; two seconds in, a mover child (QueueMover.drain) starts
catching up the whole backlog into the target:

- pgbench alone (no mover): the baseline;
- the mover as fast as it goes;
- the mover with max_events_per_second = --cap.

Printed per scenario: the mover's drain time, and pgbench's TPS and latency p50/p95
over the window the mover ran (for the baseline: the same window of its run) and over
the whole run, with ratios against the baseline measured in the same run. A figure,
never a pass/fail timing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.cluster import ThrowawayCluster

ROOT = Path(__file__).resolve().parents[1]
DB, QUEUE, TARGET_QUEUE, CONSUMER = "oltp", "oltp_q", "oltp_copy", "oltp_mover"
START_AFTER = 2.0


@dataclass
class Window:
    tps: float
    p50_ms: float
    p95_ms: float


def _window(samples: list[tuple[float, float]], start: float, end: float) -> Window:
    inside = sorted(lat for at, lat in samples if start <= at < end)
    if not inside or end <= start:
        return Window(0.0, 0.0, 0.0)
    return Window(len(inside) / (end - start), statistics.median(inside) / 1000,
                  inside[min(len(inside) - 1, int(0.95 * len(inside)))] / 1000)


def _read_log(prefix: Path) -> list[tuple[float, float]]:
    """(epoch seconds, latency in µs) of every transaction pgbench logged."""
    samples = []
    for path in prefix.parent.glob(prefix.name + "*"):
        for line in path.read_text().splitlines():
            parts = line.split()
            # client_id transaction_no time script_no time_epoch time_us
            samples.append((int(parts[4]) + int(parts[5]) / 1e6, float(parts[2])))
    return samples


def _load(source: ThrowawayCluster, events: int) -> None:
    source.execute(DB, "create extension pgq")
    source.execute(DB, "select pgq.create_queue(%s)", (QUEUE,))
    source.execute(DB, "select pgq.register_consumer(%s, %s)", (QUEUE, CONSUMER))
    source.execute(DB, """
        do $$
        declare n int := 0;
        begin
            while n < %s loop
                perform pgq.insert_event('oltp_q', 'order', 'order ' || i || ' ' || repeat('x', 150))
                  from generate_series(n, n + 9999) i;
                n := n + 10000;
                commit;
                perform pgq.ticker();
                commit;
            end loop;
        end $$""" % int(events))  # noqa: UP031 - a whole number, not user input
    source.execute(DB, "select pgq.force_tick(%s)", (QUEUE,))
    source.execute(DB, "select pgq.ticker()")


def _first_tick(source: ThrowawayCluster) -> int:
    return int(source.execute(DB, "select sub_last_tick from pgq.subscription s join pgq.consumer c"
                                  " on c.co_id = s.sub_consumer where c.co_name = %s", (CONSUMER,))[0][0])


def _reset(source: ThrowawayCluster, target: ThrowawayCluster, tick: int) -> None:
    source.execute(DB, "select pgq.register_consumer_at(%s, %s, %s)", (QUEUE, CONSUMER, tick))
    target.drop_database(DB)
    target.create_database(DB)
    target.execute(DB, "create extension pgq")
    target.execute(DB, "select pgq.create_queue(%s)", (TARGET_QUEUE,))


def _mover(source: ThrowawayCluster, target: ThrowawayCluster, cap: float | None) -> subprocess.Popen[str]:
    code = (
        "import json, sys, time\n"
        "from airflow_provider_pgq.core.connect import connect\n"
        "from airflow_provider_pgq.core.mover import MoverOptions, QueueMover\n"
        "s, t = connect(sys.argv[1]), connect(sys.argv[2])\n"
        "cap = float(sys.argv[3]) if sys.argv[3] != 'none' else None\n"
        f"options = MoverOptions({QUEUE!r}, {TARGET_QUEUE!r}, {CONSUMER!r}, install_pgq_ext=True,"
        " max_events_per_second=cap)\n"
        "started = time.time()\n"
        "report = QueueMover(s, t, options).drain()\n"
        "print(json.dumps({'events': report.events, 'start': started, 'end': time.time()}))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", code, source.dsn(DB), target.dsn(DB), str(cap or "none")],
                            stdout=subprocess.PIPE, text=True, env=env)


def run(source: ThrowawayCluster, target: ThrowawayCluster, seconds: float, cap: float | None,
        with_mover: bool, workdir: Path, label: str) -> dict[str, object]:
    prefix = workdir / ("pgbench-" + "".join(c if c.isalnum() else "_" for c in label))
    env = dict(os.environ, PGPASSWORD=source.password)
    bench = subprocess.Popen(
        [str(source.bindir / "pgbench"), "-h", "127.0.0.1", "-p", str(source.port), "-U", "pgq_test_admin",
         "-c", "4", "-j", "2", "-T", str(int(seconds)), "-l", f"--log-prefix={prefix}", "-n", DB],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=workdir)
    began = time.time()
    moved: dict[str, float] = {}
    if with_mover:
        time.sleep(START_AFTER)
        mover = _mover(source, target, cap)
        out, _ = mover.communicate()
        if mover.returncode != 0:
            raise RuntimeError(f"the mover failed: {out}")
        moved = json.loads(out.strip().splitlines()[-1])
    bench.communicate()
    samples = _read_log(prefix)
    start = float(moved.get("start", began + START_AFTER))
    end = float(moved.get("end", began + seconds - 1.0))
    return {"label": label, "moved": moved, "window": _window(samples, start, end),
            "whole": _window(samples, began, began + seconds), "span": (start - began, end - began)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--cap", type=float, default=50_000.0, help="max_events_per_second of the capped run")
    parser.add_argument("--seconds", type=float, default=16.0, help="pgbench duration per scenario")
    args = parser.parse_args(argv)
    source, target = ThrowawayCluster(), ThrowawayCluster()
    workdir = Path(tempfile.mkdtemp(prefix="pgq-oltp-"))
    os.chmod(workdir, 0o777)
    try:
        source.start()
        target.start()
        source.create_database(DB)
        subprocess.run([str(source.bindir / "pgbench"), "-i", "-s", "5", "-q", "-h", "127.0.0.1", "-p",
                        str(source.port), "-U", "pgq_test_admin", DB],
                       env=dict(os.environ, PGPASSWORD=source.password), check=True, capture_output=True)
        _load(source, args.events)
        tick = _first_tick(source)
        results = []
        for label, with_mover, cap in (("pgbench alone", False, None), ("mover, no cap", True, None),
                                       (f"mover, cap {args.cap:,.0f} ev/s", True, args.cap)):
            _reset(source, target, tick)
            # pgbench outlasts the capped catch-up too
            seconds = max(args.seconds, args.events / cap + START_AFTER + 4) if cap else args.seconds
            results.append(run(source, target, seconds, cap, with_mover, workdir, label))
            print(f"  {label}: done", flush=True)
    finally:
        source.stop()
        target.stop()
    base = results[0]
    print(f"\n{args.events:,} events in ticks of 10,000; pgbench -c 4 for {args.seconds:g}s (or as long as the capped"
          f" catch-up needs); {os.cpu_count()} CPUs,"
          f" load average {os.getloadavg()[0]:.1f}")
    print(f"{'scenario':<28} {'drain s':>8} {'TPS (window)':>13} {'x':>5} {'p50 ms':>7} {'p95 ms':>7} {'x':>5}"
          f" {'TPS (whole)':>12} {'p95 ms':>7}")
    for r in results:
        w, whole, bw = r["window"], r["whole"], base["window"]
        assert isinstance(w, Window) and isinstance(whole, Window) and isinstance(bw, Window)
        moved = r["moved"]
        drain = f"{moved['end'] - moved['start']:.1f}" if isinstance(moved, dict) and moved else "-"
        print(f"{r['label']:<28} {drain:>8} {w.tps:>13,.0f} {w.tps / bw.tps if bw.tps else 0:>5.2f}"
              f" {w.p50_ms:>7.1f} {w.p95_ms:>7.1f} {w.p95_ms / bw.p95_ms if bw.p95_ms else 0:>5.2f}"
              f" {whole.tps:>12,.0f} {whole.p95_ms:>7.1f}")
    print("(window: while the mover ran; for pgbench alone, the same seconds of its own run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
