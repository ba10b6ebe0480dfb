"""Classic compatibility as found in the field (issue 11), command-line side, as real
processes: loop_delay 0 (drain, then exit) and < 0 (one batch, then exit), in the
foreground and with -d; skytools 3 consumer keys (table_filter, pgq_keep_lag, the
collect aliases, queue_name/consumer_name fallbacks, keys noted as without effect);
--ini, --set, --unregister."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_pgq.cli.config import ConfigError, load_config, parse_interval
from airflow_provider_pgq.core import pgq
from tests.helpers import Server, mark_of, produce, queue_events, register, simple_events, tick
from tests.test_cli import WAIT, base_keys, consumer_info, run_cli, write_ini

TABLES3 = ("public.orders", "public.users", "public.audit")


def batches(source: Server, n: int, size: int = 10, prefix: str = "b") -> None:
    """n ticks of size events each; ev_extra1 cycles through three tables."""
    for b in range(n):
        produce(source, "src_q", [
            ("I:id", f"{prefix}{b}-{i}", TABLES3[i % 3], None, None, None) for i in range(size)
        ])
        tick(source, "src_q")


def moved(target: Server) -> int:
    return sum(queue_events(target, "dst_q").values())


# -- config keys ---------------------------------------------------------------------


def test_loop_delay_zero_and_negative_are_accepted(tmp_path: Path) -> None:
    keys = {"src_db": "dbname=a", "dst_db": "dbname=b", "pgq_queue_name": "q", "dst_queue_name": "r"}
    for value, mode in (("0", "drain"), ("-1", "one_batch"), ("-0.5", "one_batch"), ("2.5", "loop")):
        config = load_config(write_ini(tmp_path / "m.ini", {**keys, "loop_delay": value}))
        assert config.run_mode == mode and config.retry_delay > 0
    with pytest.raises(ConfigError, match="loop_delay"):
        load_config(write_ini(tmp_path / "m.ini", {**keys, "loop_delay": "nan"}))


def test_skytools3_consumer_keys(tmp_path: Path) -> None:
    keys = {"src_db": "dbname=a", "dst_db": "dbname=b", "dst_queue_name": "r", "job_name": "j"}
    config = load_config(write_ini(tmp_path / "m.ini", {
        **keys, "queue_name": "q3", "consumer_name": "c3", "table_filter": "orders, s.users ,orders",
        "pgq_keep_lag": "5 minutes", "pgq_batch_collect_events": "100",
        "pgq_batch_collect_interval": "00:00:30", "pgq_lazy_fetch": "300", "pgq_autocommit": "0",
        "keepalive_stats": "300", "bogus_key": "1",
    }))
    assert (config.pgq_queue_name, config.pgq_consumer_id) == ("q3", "c3")
    assert config.table_filter == ("public.orders", "s.users")
    assert (config.keep_lag, config.min_batch_events, config.min_batch_interval) == (300.0, 100, 30.0)
    options = config.options()
    assert options.keep_lag is not None and options.keep_lag.total_seconds() == 300
    assert options.table_filter == ("public.orders", "s.users")
    assert config.unknown_keys == ("bogus_key",)
    assert set(config.ignored_keys) == {"pgq_lazy_fetch", "pgq_autocommit", "keepalive_stats"}
    # the classic names are fallbacks: pgq_queue_name / pgq_consumer_id win when set
    config = load_config(write_ini(tmp_path / "m.ini", {
        **keys, "pgq_queue_name": "q", "queue_name": "q3", "pgq_consumer_id": "c", "consumer_name": "c3",
        "pgq_batch_collect_events": "0",
    }))
    assert (config.pgq_queue_name, config.pgq_consumer_id, config.min_batch_events) == ("q", "c", None)
    with pytest.raises(ConfigError, match="pgq_batch_collect_events.*min_batch_events"):
        load_config(write_ini(tmp_path / "m.ini", {
            **keys, "pgq_queue_name": "q", "min_batch_events": "5", "pgq_batch_collect_events": "6"}))
    with pytest.raises(ConfigError, match="pgq_keep_lag.*months"):
        load_config(write_ini(tmp_path / "m.ini", {**keys, "pgq_queue_name": "q", "pgq_keep_lag": "1 month"}))


def test_interval_forms() -> None:
    assert [parse_interval(t) for t in ("300", "5 minutes", "1 hour 30 mins", "00:05:00", "1 day 02:00",
                                        "@ 2 hours", "1.5s", "2 weeks")] == [
        300, 300, 5400, 300, 93600, 7200, 1.5, 1209600]
    for bad in ("", "abc", "5 parsecs", "1 year", "1 2"):
        with pytest.raises(ValueError):
            parse_interval(bad)


# -- loop_delay ---------------------------------------------------------------------


@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
def test_loop_delay_zero_drains_then_exits(source: Server, target: Server, tmp_path: Path, daemon: bool) -> None:
    register(source, "src_q", "drainer")
    batches(source, 3)
    pidfile = tmp_path / "drainer.pid"
    ini = write_ini(tmp_path / "m.ini", base_keys(
        source, target, "drainer", loop_delay=0, pidfile=pidfile, logfile=tmp_path / "m.log"))
    proc = run_cli(*(["-d"] if daemon else []), ini, timeout=WAIT)
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + WAIT
    while pidfile.exists() and time.monotonic() < deadline:  # a daemon works, then leaves
        time.sleep(0.1)
    assert not pidfile.exists()
    assert queue_events(target, "dst_q") == queue_events(source, "src_q") and moved(target) == 30
    info = consumer_info(source, "drainer")
    assert info is not None and info.pending_events == 0 and info.current_batch is None
    # nothing left: it still exits at once (0), it does not sleep and wait
    started = time.monotonic()
    assert run_cli(ini, timeout=WAIT).returncode == 0
    assert time.monotonic() - started < WAIT


@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
def test_negative_loop_delay_moves_one_batch_then_exits(
    source: Server, target: Server, tmp_path: Path, daemon: bool
) -> None:
    register(source, "src_q", "one")
    batches(source, 3)
    pidfile = tmp_path / "one.pid"
    ini = write_ini(tmp_path / "m.ini", base_keys(
        source, target, "one", loop_delay=-1, pidfile=pidfile, logfile=tmp_path / "one.log",
        min_batch_events=5))  # a batch is one tick of 10 events: "one batch" shows in the counts
    conn = source.connect()
    try:
        before = pgq.get_consumer_info(conn, "src_q", "one")
    finally:
        conn.close()
    assert before is not None
    proc = run_cli(*(["-d"] if daemon else []), ini, timeout=WAIT)
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + WAIT
    while pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pidfile.exists()
    after = consumer_info(source, "one")
    assert after is not None and after.last_tick is not None and after.last_tick > (before.last_tick or 0)
    # exactly one batch: one round of a consumer; the rest is still pending
    assert moved(target) == 10 and after.pending_events == 20
    assert mark_of(target, "one") == after.last_tick
    # --once stays "drain, then exit", whatever loop_delay says
    assert run_cli("--once", ini, timeout=WAIT).returncode == 0
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")


def test_set_overrides_a_key(source: Server, target: Server, tmp_path: Path) -> None:
    register(source, "src_q", "setter")
    batches(source, 2)
    ini = write_ini(tmp_path / "m.ini", base_keys(source, target, "setter", loop_delay=5))
    # without --set this would loop forever; loop_delay=-1 makes it one batch and exit
    proc = run_cli("--set", "loop_delay=-1", "--set", "table_filter = orders", ini, timeout=WAIT)
    assert proc.returncode == 0, proc.stderr
    rows = queue_events(target, "dst_q")
    assert rows and {e[2] for e in rows} == {"public.orders"}
    bad = run_cli("--set", "loop_delay", ini, timeout=WAIT)
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr


def test_ini_prints_a_commented_sample(tmp_path: Path) -> None:
    proc = run_cli("--ini", timeout=WAIT)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("[queue_mover]\n")
    for key in ("src_db", "dst_db", "pgq_queue_name", "dst_queue_name", "loop_delay", "table_filter",
                "pgq_keep_lag", "pidfile", "logfile"):
        assert f"{key} =" in text
    # the sample loads as a config once written out, and --set shows in it
    proc = run_cli("--ini", "--set", "loop_delay=0", timeout=WAIT)
    assert "\nloop_delay = 0\n" in proc.stdout
    config = load_config(write_sample(tmp_path, proc.stdout))
    assert config.run_mode == "drain" and config.pgq_queue_name == "source_queue"


def write_sample(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sample.ini"
    path.write_text(text)
    return path


# -- consumer keys, end to end ------------------------------------------------------------


def test_table_filter_in_the_ini(source: Server, target: Server, tmp_path: Path) -> None:
    register(source, "src_q", "filt")
    batches(source, 3, size=12)
    ini = write_ini(tmp_path / "m.ini", base_keys(
        source, target, "filt", table_filter="public.orders, users", loop_delay=0))
    proc = run_cli("-v", ini, timeout=WAIT)
    assert proc.returncode == 0, proc.stderr
    got = queue_events(target, "dst_q")
    want = {e: c for e, c in queue_events(source, "src_q").items() if e[2] in ("public.orders", "public.users")}
    assert got == want and sum(got.values()) == 24
    assert "12 of other tables consumed (table_filter)" in proc.stderr
    info = consumer_info(source, "filt")
    assert info is not None and info.pending_events == 0 and info.current_batch is None


def test_keep_lag_in_the_ini(source: Server, target: Server, tmp_path: Path) -> None:
    register(source, "src_q", "lagger")
    batches(source, 2)
    made = time.monotonic()
    ini = write_ini(tmp_path / "m.ini", base_keys(source, target, "lagger", pgq_keep_lag="3 seconds"))
    assert run_cli("--once", ini, timeout=WAIT).returncode == 0
    assert moved(target) == 0  # younger than the lag: still on the source
    time.sleep(max(0.0, 3.3 - (time.monotonic() - made)))
    assert run_cli("--once", ini, timeout=WAIT).returncode == 0
    assert run_cli("--once", ini, timeout=WAIT).returncode == 0
    assert queue_events(target, "dst_q") == queue_events(source, "src_q") and moved(target) == 20


def test_classic_keys_are_noted_and_typos_warned(source: Server, target: Server, tmp_path: Path) -> None:
    register(source, "src_q", "noted")
    keys: dict[str, Any] = base_keys(source, target, "noted", loop_delay=0, pgq_lazy_fetch=300,
                                     pgq_autocommit=0, keepalive_stats=300, sql_retry=0, loop_dealy=2)
    del keys["pgq_queue_name"]
    keys["queue_name"] = "src_q"
    proc = run_cli(write_ini(tmp_path / "m.ini", keys), timeout=WAIT)
    assert proc.returncode == 0, proc.stderr
    log = proc.stderr
    assert "unknown key 'loop_dealy' ignored (a typo?)" in log
    for key in ("pgq_lazy_fetch", "pgq_autocommit", "keepalive_stats", "sql_retry"):
        assert f"classic key {key!r} has no effect here" in log
        assert f"unknown key {key!r}" not in log
    assert "never fetched into Python" in log  # what pgq_lazy_fetch means here


def test_unregister_leaves_the_queue_and_clears_the_mark(source: Server, target: Server, tmp_path: Path) -> None:
    register(source, "src_q", "leaver")
    batches(source, 1)
    ini = write_ini(tmp_path / "m.ini", base_keys(source, target, "leaver"))
    assert run_cli("--once", ini, timeout=WAIT).returncode == 0
    assert mark_of(target, "leaver") is not None
    proc = run_cli("--unregister", ini, timeout=WAIT)
    assert proc.returncode == 0, proc.stderr
    assert "unregistered from queue 'src_q'" in proc.stdout
    assert consumer_info(source, "leaver") is None
    assert mark_of(target, "leaver") is None
    assert target.execute("select count(*) from pgq_ext.tracking_source where consumer_id = 'leaver'")[0][0] == 0
    # again: nothing registered, still exit 0
    again = run_cli("--unregister", ini, timeout=WAIT)
    assert again.returncode == 0 and "was not registered" in again.stdout
    # register again: a clean start, no position mismatch
    assert run_cli("--register", "--once", ini, timeout=WAIT).returncode == 0
    assert run_cli("--unregister", "--rewind", ini, timeout=WAIT).returncode == 2


def test_register_at_oldest_in_the_ini_moves_what_the_queue_holds(
    source: Server, target: Server, tmp_path: Path
) -> None:
    """--register with register_at = oldest: events queued before the registration move too."""
    produce(source, "src_q", simple_events(30))
    tick(source, "src_q")
    ini = write_ini(tmp_path / "m.ini", base_keys(source, target, "late_mover", register_at="oldest"))
    assert run_cli("--register", ini).returncode == 0
    assert run_cli("--once", ini).returncode == 0
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")
    bad = write_ini(tmp_path / "bad.ini", base_keys(source, target, "late_mover", register_at="yesterday"))
    proc = run_cli("--once", bad)
    assert proc.returncode == 2 and "register_at" in proc.stderr and "'yesterday'" in proc.stderr
