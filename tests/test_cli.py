"""pgq-queue-mover, the skytools-compatible command line, run as a real subprocess
against the test cluster: config handling, the loop, daemon mode and signals,
the one-shot switches, and errors (one line, right exit code, no password)."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg2 import sql

from airflow_provider_pgq.cli import pid_alive
from airflow_provider_pgq.cli.config import ConfigError, load_config
from airflow_provider_pgq.core import pgq, pgq_ext
from airflow_provider_pgq.core.errors import PgqError
from airflow_provider_pgq.core.mover import DrainBounds
from tests.helpers import Server, mark_of, produce, queue_events, register, require_password_checks, simple_events, tick
from tests.support.cluster import free_port, wait_until

CLI = [sys.executable, "-m", "airflow_provider_pgq.cli"]
WAIT = 30.0


# -- helpers ----------------------------------------------------------------------


def write_ini(path: Path, keys: dict[str, Any], section: str = "queue_mover") -> Path:
    """Mode 600, as an ini holding a password should be (the mover warns otherwise)."""
    path.write_text(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()))
    path.chmod(0o600)
    return path


def base_keys(source: Server, target: Server, job: str, **extra: Any) -> dict[str, Any]:
    keys: dict[str, Any] = {
        "job_name": job,
        "src_db": source.dsn,
        "dst_db": target.dsn,
        "pgq_queue_name": "src_q",
        "dst_queue_name": "dst_q",
    }
    keys.update(extra)
    return keys


def run_cli(*args: str | Path, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ \d+ (DEBUG|INFO|WARNING) ")


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """stderr holds exactly one error line (besides progress lines of the log at
    INFO and below, which go to stderr when there is no logfile); returns it."""
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if not LOG_LINE.match(line)]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("pgq-queue-mover: error: "), errors[0]
    return errors[0]


def read_pid(pidfile: Path) -> int:
    return int(pidfile.read_text().split()[0])


def signal_pending(pid: int, signum: int) -> bool:
    """Whether signum is still waiting to be delivered to pid (Linux /proc)."""
    bit = 1 << (signum - 1)
    pending = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("SigPnd:", "ShdPnd:")):
            pending |= int(line.split()[1], 16)
    return bool(pending & bit)


def backends_waiting_on_lock(target: Server, job: str) -> int:
    rows = target.execute(
        "select count(*) from pg_stat_activity where application_name = %s and datname = %s"
        " and wait_event_type = 'Lock'",
        (job, target.dbname),
    )
    return int(rows[0][0])


def allow_connections(server: Server, allow: bool) -> None:
    server.cluster.execute(
        "postgres",
        sql.SQL("alter database {} allow_connections {}").format(
            sql.Identifier(server.dbname), sql.Literal(allow)
        ),
    )


def terminate_backends(server: Server, job: str) -> int:
    rows = server.execute(
        "select count(pg_terminate_backend(pid)) from pg_stat_activity"
        " where application_name = %s and datname = %s",
        (job, server.dbname),
    )
    return int(rows[0][0])


def consumer_info(source: Server, consumer: str, queue: str = "src_q") -> pgq.ConsumerInfo | None:
    conn = source.connect()
    try:
        return pgq.get_consumer_info(conn, queue, consumer)
    finally:
        conn.close()


def finish_one_batch(source: Server, consumer: str, queue: str = "src_q") -> int:
    """What a consumer does without a target: take the next batch and finish it."""
    conn = source.connect()
    try:
        batch = pgq.next_batch_info(conn, queue, consumer)
        assert batch is not None
        pgq.finish_batch(conn, batch.batch_id)
        conn.commit()
        return batch.cur_tick_id
    finally:
        conn.close()


@pytest.fixture
def daemons() -> Iterator[list[Path]]:
    """Pidfiles of daemons a test starts; whatever still runs at the end is killed by pid."""
    pidfiles: list[Path] = []
    yield pidfiles
    for pidfile in pidfiles:
        try:
            pid = read_pid(pidfile)
        except (OSError, ValueError, IndexError):
            continue
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda p=pid: not pid_alive(p), timeout=10)  # type: ignore[misc]


def no_secret(cluster: Any, *texts: str) -> None:
    """The superuser's password is in none of the texts (a server of PGQ_TEST_DSN may
    have no password: then there is nothing to find, and '' is in every text)."""
    assert cluster.password or cluster.shared, "a throwaway cluster always has a password"
    for text in texts:
        assert not cluster.password or cluster.password not in text


# -- the classic example config ------------------------------------------------------


def test_classic_example_config_moves_events(make_db: Callable[..., Server], cluster: Any, tmp_path: Path) -> None:
    """The ini from the skytools man page, only the databases pointed at the test
    cluster: relative pidfile/logfile under the current directory, consumer = job_name,
    the mark in pgq_ext.completed_tick under (job_name, '')."""
    source = make_db(queue="eventlog")
    target = make_db(queue="copy_of_eventlog", ext=True)
    job = "eventlog_to_target_mover"
    register(source, "eventlog", job)
    produce(source, "eventlog", simple_events(60))
    last = tick(source, "eventlog")
    ini = tmp_path / "mover.ini"
    ini.write_text(
        "[queue_mover]\n"
        f"job_name = {job}\n"
        f"src_db = {source.dsn}\n"
        f"dst_db = {target.dsn}\n"
        "pgq_queue_name = eventlog\n"
        "dst_queue_name = copy_of_eventlog\n"
        "pidfile = log/%(job_name)s.pid\n"
        "logfile = pid/%(job_name)s.log\n"
        "use_skylog = 0\n"
    )
    proc = run_cli("--once", "mover.ini", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert queue_events(target, "copy_of_eventlog") == queue_events(source, "eventlog")
    assert sum(queue_events(target, "copy_of_eventlog").values()) == 60
    rows = target.execute("select consumer_id, subconsumer_id, last_tick_id from pgq_ext.completed_tick")
    assert rows == [(job, "", last)]
    logfile = tmp_path / "pid" / f"{job}.log"
    text = logfile.read_text()
    assert "moved 60 events" in text
    assert "'use_skylog' has no effect" in text
    assert (tmp_path / "log").is_dir() and not (tmp_path / "log" / f"{job}.pid").exists()
    assert proc.stderr == ""  # everything went to the logfile
    no_secret(cluster, text, proc.stdout)


# -- --once and the extra keys ---------------------------------------------------------


def test_once_honours_bounds_and_warns_about_unknown_keys(
    source: Server, target: Server, tmp_path: Path
) -> None:
    register(source, "src_q", "cron_mover")
    first = simple_events(10)
    produce(source, "src_q", first)
    t1 = tick(source, "src_q")
    produce(source, "src_q", simple_events(15, start=10))
    t2 = tick(source, "src_q")
    ini = write_ini(tmp_path / "m.ini", base_keys(source, target, "cron_mover", max_batches=1, colour="blue",
                                                  batch_target_events=1))

    proc = run_cli("--once", ini)
    assert proc.returncode == 0, proc.stderr
    assert "unknown key 'colour' ignored" in proc.stderr
    assert mark_of(target, "cron_mover") == t1  # one batch only: max_batches = 1
    assert queue_events(target, "dst_q") == Counter(first)

    proc = run_cli("--once", "-q", ini)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("WARNING") == 1 and "INFO" not in proc.stderr  # -q: warnings only
    assert mark_of(target, "cron_mover") == t2
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")

    proc = run_cli("--once", ini)  # nothing left: still exit 0, nothing duplicated
    assert proc.returncode == 0, proc.stderr
    assert "nothing to move" in proc.stderr
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")


def test_subconsumer_and_consumer_id_keys(source: Server, target: Server, tmp_path: Path) -> None:
    register(source, "src_q", "shared_name")
    produce(source, "src_q", simple_events(5))
    last = tick(source, "src_q")
    keys = base_keys(source, target, "job_x", pgq_consumer_id="shared_name", subconsumer="part1")
    proc = run_cli("--once", write_ini(tmp_path / "m.ini", keys))
    assert proc.returncode == 0, proc.stderr
    assert mark_of(target, "shared_name", "part1") == last
    assert mark_of(target, "shared_name") is None
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")


# -- daemon mode and signals ------------------------------------------------------------


def test_daemon_moves_reloads_survives_disconnects_and_stops(
    source: Server, target: Server, cluster: Any, tmp_path: Path, daemons: list[Path]
) -> None:
    job = "daemon_mover"
    register(source, "src_q", job)
    pidfile, logfile = tmp_path / "run" / "m.pid", tmp_path / "logs" / "m.log"
    daemons.append(pidfile)
    keys = base_keys(source, target, job, pidfile=pidfile, logfile=logfile, loop_delay=0.2,
                     connection_lifetime=1)
    ini = write_ini(tmp_path / "m.ini", keys)

    proc = run_cli("-v", "-d", ini)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # the daemon logs to its logfile
    pid = read_pid(pidfile)
    assert pid_alive(pid) and pid != os.getpid()

    # events are moved as they arrive
    produce(source, "src_q", simple_events(20))
    tick(source, "src_q")
    assert wait_until(lambda: queue_events(target, "dst_q") == queue_events(source, "src_q"), WAIT)

    # a second instance is refused, the first one keeps running
    again = run_cli("-d", ini)
    assert again.returncode == 1
    assert f"already running as pid {pid}" in one_error_line(again)
    assert read_pid(pidfile) == pid and pid_alive(pid)

    # -r: the changed loop_delay is read and used
    write_ini(ini, {**keys, "loop_delay": 0.7})
    assert run_cli("-r", ini).returncode == 0
    assert wait_until(lambda: "loop_delay 0.2 -> 0.7" in logfile.read_text(), WAIT)
    assert wait_until(lambda: "(loop_delay 0.7)" in logfile.read_text(), WAIT)

    # a broken config on reload is refused; the running config stays
    write_ini(ini, {**keys, "loop_delay": "soon"})
    assert run_cli("-r", ini).returncode == 2  # -r itself reads the file first
    os.kill(pid, signal.SIGHUP)
    assert wait_until(lambda: "reload failed, keeping the running config" in logfile.read_text(), WAIT)
    write_ini(ini, {**keys, "loop_delay": 0.7})

    # --status sees it running
    status = run_cli("--status", ini)
    assert status.returncode == 0 and f"yes, pid {pid}" in status.stdout

    # its connections are killed (as by a target restart): it reconnects and goes on
    assert wait_until(lambda: terminate_backends(target, job) > 0, WAIT)
    terminate_backends(source, job)
    produce(source, "src_q", simple_events(30, start=20))
    last = tick(source, "src_q")
    assert wait_until(lambda: mark_of(target, job) == last, WAIT)
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")
    assert wait_until(lambda: "reopening connections after" in logfile.read_text(), WAIT)

    # -s: clean stop, pidfile removed
    assert run_cli("-s", ini).returncode == 0
    assert wait_until(lambda: not pid_alive(pid), WAIT)
    assert not pidfile.exists()
    text = logfile.read_text()
    assert "as asked (SIGINT)" in text
    assert "batch " in text and "events, moved in" in text  # -v: a line per batch
    no_secret(cluster, text)

    # not running any more: -s has nothing to do (exit 0), -r fails (exit 1)
    stop = run_cli("-s", ini)
    assert stop.returncode == 0 and "is not running" in stop.stderr
    assert run_cli("-r", ini).returncode == 1


def test_daemon_restart_of_the_target_connection_is_survived(
    source: Server, target: Server, tmp_path: Path, daemons: list[Path]
) -> None:
    """A database error in the loop is logged as one line and retried; the daemon lives."""
    job = "restart_mover"
    register(source, "src_q", job)
    pidfile, logfile = tmp_path / "m.pid", tmp_path / "m.log"
    daemons.append(pidfile)
    ini = write_ini(tmp_path / "m.ini", base_keys(source, target, job, pidfile=pidfile, logfile=logfile,
                                                  loop_delay=0.2, exception_sleep=0.2))
    assert run_cli("-d", ini).returncode == 0
    pid = read_pid(pidfile)
    # the target refuses new connections and loses the current ones for a while
    allow_connections(target, False)
    target.cluster.execute(
        "postgres",
        "select pg_terminate_backend(pid) from pg_stat_activity where application_name = %s"
        " and datname = %s", (job, target.dbname),
    )
    produce(source, "src_q", simple_events(8))
    last = tick(source, "src_q")
    # it keeps trying: the lost connection and each refused reconnect are one log line
    assert wait_until(lambda: "not currently accepting connections" in logfile.read_text(), WAIT)
    assert "database error, reconnecting in 0.2s: " in logfile.read_text()
    assert pid_alive(pid)
    allow_connections(target, True)
    assert wait_until(lambda: mark_of(target, job) == last, WAIT)
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")
    text = logfile.read_text()
    assert "connected (after an error)" in text
    assert not any("Traceback" in line for line in text.splitlines())
    no_secret(target.cluster, text)
    assert run_cli("-k", ini).returncode == 0
    assert wait_until(lambda: not pid_alive(pid), WAIT)
    assert not pidfile.exists()


@pytest.mark.parametrize("switch", ["-s", "-k"])
def test_stop_finishes_the_batch_kill_does_not(
    switch: str, source: Server, target: Server, tmp_path: Path, daemons: list[Path]
) -> None:
    """The daemon is held inside a batch (the test holds the tracking key's lock on the
    target). -s (SIGINT) lets that batch complete, then exits; -k (SIGTERM) leaves at
    once, even from the lock wait, the batch neither applied nor finished, and the next
    run moves it exactly once."""
    job = "held_mover"
    register(source, "src_q", job)
    pidfile, logfile = tmp_path / "m.pid", tmp_path / "m.log"
    daemons.append(pidfile)
    ini = write_ini(tmp_path / "m.ini", base_keys(source, target, job, pidfile=pidfile, logfile=logfile,
                                                  loop_delay=0.1))
    assert run_cli("-d", ini).returncode == 0
    pid = read_pid(pidfile)

    holder = target.connect()
    try:
        pgq_ext.lock_key(holder, job, "")
        produce(source, "src_q", simple_events(25))
        last = tick(source, "src_q")
        assert wait_until(lambda: backends_waiting_on_lock(target, job) == 1, WAIT)
        assert run_cli(switch, ini).returncode == 0
        if switch == "-s":
            assert wait_until(lambda: not signal_pending(pid, signal.SIGINT), WAIT)
            assert pid_alive(pid)  # still inside the batch, waiting for the lock
        else:
            # SIGTERM ends even a wait on a lock at once (the socket is shut, the server
            # rolls the transaction back), while the lock is still held
            assert wait_until(lambda: not pid_alive(pid), 5)
    finally:
        holder.rollback()
        holder.close()
    assert wait_until(lambda: not pid_alive(pid), WAIT)
    assert not pidfile.exists()
    info = consumer_info(source, job)
    assert info is not None
    if switch == "-s":
        assert mark_of(target, job) == last
        assert queue_events(target, "dst_q") == queue_events(source, "src_q")
        assert info.current_batch is None and info.last_tick == last
        assert "stopping after the current batch" in logfile.read_text()
    else:
        assert mark_of(target, job) is None
        assert queue_events(target, "dst_q") == Counter()
        assert info.current_batch is not None  # handed out, never finished
        assert "stopping at once (SIGTERM)" in logfile.read_text()
        again = run_cli("--once", ini)
        assert again.returncode == 0, again.stderr
        assert mark_of(target, job) == last
        assert queue_events(target, "dst_q") == queue_events(source, "src_q")


def test_stale_pidfile_is_replaced(source: Server, target: Server, tmp_path: Path, daemons: list[Path]) -> None:
    job = "stale_mover"
    register(source, "src_q", job)
    pidfile, logfile = tmp_path / "m.pid", tmp_path / "m.log"
    daemons.append(pidfile)
    gone = subprocess.Popen(["true"])
    gone.wait()
    pidfile.write_text(f"{gone.pid}\n")
    ini = write_ini(tmp_path / "m.ini", base_keys(source, target, job, pidfile=pidfile, logfile=logfile,
                                                  loop_delay=0.1))
    # with a stale pidfile, -k finds nothing to stop
    assert "is not running" in run_cli("-k", ini).stderr
    proc = run_cli("-d", ini)
    assert proc.returncode == 0, proc.stderr
    pid = read_pid(pidfile)
    assert pid != gone.pid and pid_alive(pid)
    assert f"replacing stale pidfile {pidfile} (pid {gone.pid}" in logfile.read_text()
    produce(source, "src_q", simple_events(3))
    last = tick(source, "src_q")
    assert wait_until(lambda: mark_of(target, job) == last, WAIT)
    assert run_cli("-k", ini).returncode == 0
    assert wait_until(lambda: not pid_alive(pid), WAIT)
    assert not pidfile.exists()


def test_daemon_start_checks_before_going_to_the_background(
    source: Server, target: Server, tmp_path: Path, daemons: list[Path]
) -> None:
    """A daemon that could not work fails on the terminal (exit 1), leaving no pidfile."""
    pidfile = tmp_path / "m.pid"
    daemons.append(pidfile)
    keys = base_keys(source, target, "early_mover", pidfile=pidfile, logfile=tmp_path / "m.log")
    proc = run_cli("-d", write_ini(tmp_path / "m.ini", keys))  # consumer not registered
    assert proc.returncode == 1
    assert "not registered" in one_error_line(proc)
    assert not pidfile.exists()
    assert "not registered" in (tmp_path / "m.log").read_text()


def test_foreground_run_takes_the_pidfile_and_stops_on_sigint(
    source: Server, target: Server, tmp_path: Path
) -> None:
    job = "fg_mover"
    register(source, "src_q", job)
    pidfile = tmp_path / "fg.pid"
    ini = write_ini(tmp_path / "m.ini", base_keys(source, target, job, pidfile=pidfile, loop_delay=0.1))
    proc = subprocess.Popen([*CLI, str(ini)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: pidfile.exists() and pidfile.read_text().strip() == str(proc.pid), WAIT)
        produce(source, "src_q", simple_events(4))
        last = tick(source, "src_q")
        assert wait_until(lambda: mark_of(target, job) == last, WAIT)
        refused = run_cli("--once", ini)
        assert refused.returncode == 1 and "already running" in one_error_line(refused)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "stopping as asked (SIGINT)" in err
    assert not pidfile.exists()


# -- one-shot switches -----------------------------------------------------------------------


def _position_lost(
    source: Server, target: Server, tmp_path: Path, job: str
) -> tuple[Path, Counter[Any], Counter[Any], int]:
    """A mark at t1 on the target, but the consumer re-registered on the source (at t2):
    the events between (B) would be lost. Returns ini, events B, events C, t1."""
    register(source, "src_q", job)
    produce(source, "src_q", simple_events(5, prefix="a"))
    t1 = tick(source, "src_q")
    ini = write_ini(tmp_path / "m.ini", base_keys(source, target, job))
    assert run_cli("--once", ini).returncode == 0
    assert mark_of(target, job) == t1
    b = simple_events(6, prefix="b")
    produce(source, "src_q", b)
    tick(source, "src_q")
    source.execute("select pgq.unregister_consumer('src_q', %s)", (job,))
    register(source, "src_q", job)
    c = simple_events(7, prefix="c")
    produce(source, "src_q", c)
    tick(source, "src_q")
    refused = run_cli("--once", ini)
    assert refused.returncode == 1
    line = one_error_line(refused)
    assert "position lost" in line and "--rewind" in line and "--reset" in line
    return ini, Counter(b), Counter(c), t1


def test_rewind_moves_the_gap_exactly_once(source: Server, target: Server, tmp_path: Path) -> None:
    job = "rewind_mover"
    ini, _, _, t1 = _position_lost(source, target, tmp_path, job)
    proc = run_cli("--rewind", ini)
    assert proc.returncode == 0, proc.stderr
    assert f"rewound to the target's mark, tick {t1}" in proc.stdout
    info = consumer_info(source, job)
    assert info is not None and info.last_tick == t1
    assert run_cli("--once", ini).returncode == 0
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")  # a + b + c, once each


def test_reset_accepts_the_source_position(source: Server, target: Server, tmp_path: Path) -> None:
    job = "reset_mover"
    ini, b, c, t1 = _position_lost(source, target, tmp_path, job)
    proc = run_cli("--reset", ini)
    assert proc.returncode == 0, proc.stderr
    assert f"(was {t1})" in proc.stdout
    assert mark_of(target, job) is None
    assert run_cli("--once", ini).returncode == 0
    moved = queue_events(target, "dst_q")
    assert moved == queue_events(source, "src_q") - b  # b was skipped by the re-registration
    assert moved & c == c


def test_status_reports_queue_consumer_lag_and_mark(source: Server, target: Server, tmp_path: Path) -> None:
    job = "status_mover"
    register(source, "src_q", job)
    produce(source, "src_q", simple_events(4))
    t1 = tick(source, "src_q")
    ini = write_ini(tmp_path / "m.ini", base_keys(source, target, job, pidfile=tmp_path / "s.pid"))
    assert run_cli("--once", ini).returncode == 0
    produce(source, "src_q", simple_events(9, start=4))
    t2 = tick(source, "src_q")
    proc = run_cli("--status", ini)
    assert proc.returncode == 0, proc.stderr
    status = dict(line.split(":", 1) for line in proc.stdout.splitlines())
    status = {k.strip(): v.strip() for k, v in status.items()}
    assert status["consumer"] == job
    assert status["registered"] == "yes"
    assert status["running"] == "no"
    assert status["target mark"] == str(t1)
    assert status["consumer last tick"] == str(t1)
    assert status["source newest tick"] == str(t2)
    assert int(status["pending events"]) >= 9
    assert status["lag"].endswith("s")
    assert status["source"].endswith("queue src_q") and status["target"].endswith("queue dst_q")
    assert mark_of(target, job) == t1  # --status moves nothing


def test_status_shows_the_last_entries_of_the_move_journal(source: Server, target: Server, tmp_path: Path) -> None:
    """--status lists the key's newest journal entries: batch, ticks, events, job, host, login."""
    job = "journal_mover"
    register(source, "src_q", job)
    ini = write_ini(tmp_path / "m.ini", base_keys(source, target, job))
    proc = run_cli("--status", ini)
    assert proc.returncode == 0, proc.stderr
    assert "journal: no batch applied" in proc.stdout
    ticks = []
    for n in (3, 4):
        produce(source, "src_q", simple_events(n, start=10 * n))
        ticks.append(tick(source, "src_q"))
        assert run_cli("--once", ini).returncode == 0
    proc = run_cli("--status", ini)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("journal: the last 2 batches applied"))
    newest, older = lines[start + 1], lines[start + 2]
    assert f"..{ticks[1]}: 4 events; job {job} on {socket.gethostname()} pid " in newest
    assert f"ticks {ticks[0]}..{ticks[1]}" in newest
    assert f"..{ticks[0]}: 3 events; job {job}" in older
    assert newest.endswith(f" as {target.cluster.superuser}")


def test_register_then_once(source: Server, target: Server, tmp_path: Path) -> None:
    job = "new_mover"
    ini = write_ini(tmp_path / "m.ini", base_keys(source, target, job))
    not_registered = run_cli("--once", ini)
    assert not_registered.returncode == 1
    assert "not registered" in one_error_line(not_registered)
    proc = run_cli("--register", ini)
    assert proc.returncode == 0, proc.stderr
    assert f"consumer '{job}' registered on queue 'src_q'" in proc.stdout
    assert consumer_info(source, job) is not None
    produce(source, "src_q", simple_events(3))
    last = tick(source, "src_q")
    proc = run_cli("--register", "--once", ini)  # registered already; then moves
    assert proc.returncode == 0, proc.stderr
    assert "was already registered" in proc.stdout
    assert mark_of(target, job) == last
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")


def test_install_pgq_ext_keeps_a_classic_mark(
    source: Server, make_db: Callable[..., Server], tmp_path: Path
) -> None:
    """Migration: the target has the classic pgq_ext table with the mark a classic
    queue_mover left; the source consumer is past it. After --install-pgq-ext the mover
    continues from that mark: only what came later is moved."""
    target = make_db(queue="dst_q")  # no pgq_ext of ours
    job = "legacy_mover"
    ini = write_ini(tmp_path / "m.ini", base_keys(source, target, job))
    register(source, "src_q", job)
    produce(source, "src_q", simple_events(5, prefix="old"))
    tick(source, "src_q")
    classic_mark = finish_one_batch(source, job)  # what the classic mover did
    target.execute(
        "create schema pgq_ext; create table pgq_ext.completed_tick (consumer_id text not null,"
        " subconsumer_id text not null default '', last_tick_id bigint not null,"
        " primary key (consumer_id, subconsumer_id))"
    )
    target.execute("insert into pgq_ext.completed_tick values (%s, '', %s)", (job, classic_mark))
    new = simple_events(7, prefix="new")
    produce(source, "src_q", new)
    last = tick(source, "src_q")

    old_schema = run_cli("--once", ini)
    assert old_schema.returncode == 1
    assert "--install-pgq-ext" in one_error_line(old_schema)
    proc = run_cli("--install-pgq-ext", ini)
    assert proc.returncode == 0, proc.stderr
    assert "marks kept" in proc.stdout
    assert mark_of(target, job) == classic_mark
    assert run_cli("--install-pgq-ext", ini).returncode == 0  # idempotent
    assert mark_of(target, job) == classic_mark
    assert run_cli("--once", ini).returncode == 0
    assert queue_events(target, "dst_q") == Counter(new)
    assert mark_of(target, job) == last


# -- errors: one line, exit 2 for usage/config, 1 at runtime, no password --------------------


def _bad_cases(source: Server, target: Server, cluster: Any, tmp_path: Path) -> dict[str, tuple[list[str], int, str]]:
    good = base_keys(source, target, "bad_mover")
    missing = dict(good)
    del missing["dst_queue_name"]
    directory = tmp_path / "a_directory"
    directory.mkdir()
    wrong_pw = "NotThePassword42"
    cases = {
        "missing key": (write_ini(tmp_path / "missing.ini", missing), [], 2, "'dst_queue_name': is missing"),
        "unknown section": (write_ini(tmp_path / "sect.ini", good), ["--section", "nope"], 2,
                            "section [nope] not found"),
        "no such file": (tmp_path / "absent.ini", [], 2, "No such file or directory"),
        "a directory": (directory, [], 2, "it is a directory"),
        "bad value": (write_ini(tmp_path / "val.ini", {**good, "loop_delay": "soon"}), [], 2,
                      "'loop_delay': 'soon' is not a number of seconds"),
        "bad boolean": (write_ini(tmp_path / "bool.ini", {**good, "force_tick": "perhaps"}), [], 2,
                        "'force_tick': 'perhaps' is not a boolean"),
        "percent in password": (
            write_ini(tmp_path / "pct.ini", {**good, "src_db": source.dsn + "x%secretish"}), [], 2,
            "'src_db': bad %-reference",
        ),
        "daemon without pidfile": (write_ini(tmp_path / "nopid.ini", good), ["-d"], 2, "-d needs a pidfile"),
        "wrong password": (
            write_ini(tmp_path / "pw.ini", {**good, "dst_db": cluster.dsn(target.dbname, user=cluster.superuser,
                                                                           password=wrong_pw)}),
            [], 1, "dst_db: cannot connect to 127.0.0.1",
        ),
        "unparsable connection string": (
            write_ini(tmp_path / "dsn.ini", {**good, "src_db": f"this is not a dsn password={wrong_pw}"}), [], 1,
            "src_db: bad connection string",
        ),
        "unreachable database": (
            write_ini(tmp_path / "down.ini", {**good, "src_db": f"host=127.0.0.1 port={free_port()}"
                                              f" dbname=x user=u password={wrong_pw} connect_timeout=5"}),
            [], 1, "src_db: cannot connect",
        ),
        "unknown queue": (write_ini(tmp_path / "q.ini", {**good, "pgq_queue_name": "no_such_q"}), [], 1,
                          "source queue 'no_such_q' does not exist"),
    }
    return {name: ([*extra, str(path)], code, text) for name, (path, extra, code, text) in cases.items()}


CASES = [
    "missing key", "unknown section", "no such file", "a directory", "bad value", "bad boolean",
    "percent in password", "daemon without pidfile", "wrong password", "unparsable connection string",
    "unreachable database", "unknown queue",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_config_is_one_line_with_the_right_exit_code(
    case: str, source: Server, target: Server, cluster: Any, tmp_path: Path
) -> None:
    if case == "wrong password":
        require_password_checks(cluster)
    args, code, expected = _bad_cases(source, target, cluster, tmp_path)[case]
    proc = run_cli("--once", *args) if "-d" not in args else run_cli(*args)
    assert proc.returncode == code, proc.stderr
    line = one_error_line(proc)
    assert expected in line
    assert proc.stdout == ""
    no_secret(cluster, proc.stderr)
    for secret in ("NotThePassword42", "secretish"):
        assert secret not in proc.stderr
    if code == 2:
        assert str(args[-1]) in line  # names the file
        if case not in ("no such file", "a directory"):
            assert "section [" in line  # and the section


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run_cli().returncode == 2  # no config file
    ini = tmp_path / "x.ini"
    ini.write_text("[queue_mover]\n")
    assert run_cli("--rewind", "--reset", ini).returncode == 2
    both = run_cli("-s", "--once", ini)
    assert both.returncode == 2 and "use them alone" in one_error_line(both)
    help_text = run_cli("--help")
    assert help_text.returncode == 0
    for switch in ("--quiet", "--verbose", "--daemon", "--reload", "--stop", "--kill", "--once",
                   "--rewind", "--reset", "--install-pgq-ext", "--register", "--status", "--section"):
        assert switch in help_text.stdout


# -- the config reader on its own --------------------------------------------------------


def test_load_config_classic_defaults_and_extras(tmp_path: Path) -> None:
    ini = tmp_path / "eventlog_mover.ini"
    ini.write_text(
        "[queue_mover]\n"
        "src_db = dbname=a password=hush\n"
        "dst_db = dbname=b\n"
        "pgq_queue_name = q\n"
        "dst_queue_name = q2\n"
        "pidfile = ~/pid/%(job_name)s.pid\n"
        "logfile = log/%(service_name)s.log\n"
        "min_batch_interval = 2.5\n"
        "force_tick = yes\n"
        "keep_event_id = on\n"
        "max_events = 100\n"
        "[other]\n"
        "job_name = second\n"
        "src_db = dbname=c\n"
        "dst_db = dbname=d\n"
        "pgq_queue_name = q\n"
        "dst_queue_name = q2\n"
        "pgq_consumer_id = %(job_name)s_consumer\n"
        "loop_delay = 0.25\n"
    )
    c = load_config(ini, base_dir=tmp_path)
    assert (c.section, c.job_name, c.pgq_consumer_id) == ("queue_mover", "eventlog_mover", "eventlog_mover")
    assert c.pidfile == Path.home() / "pid" / "eventlog_mover.pid"
    assert c.logfile == tmp_path / "log" / "queue_mover.log"
    assert (c.loop_delay, c.connection_lifetime, c.retry_delay) == (1.0, 1200.0, 1.0)
    assert c.options().min_batch_interval == dt.timedelta(seconds=2.5)
    assert c.options().keep_event_id is True
    assert c.bounds() == DrainBounds(max_events=100, force_tick=True)
    assert "hush" not in repr(c)

    other = load_config(ini, "other", base_dir=tmp_path)
    assert (other.job_name, other.pgq_consumer_id, other.loop_delay) == ("second", "second_consumer", 0.25)
    assert other.pidfile is None and other.logfile is None

    with pytest.raises(ConfigError) as err:
        load_config(ini, "missing", base_dir=tmp_path)
    assert isinstance(err.value, PgqError)
    assert "sections: [queue_mover], [other]" in str(err.value)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("loop_delay = inf", "'loop_delay': inf is not a finite number"),
        ("max_batches = 0", "'max_batches': must be >= 1"),
        ("max_events = many", "'max_events': 'many' is not a whole number"),
        ("run_ticker = true", "'run_ticker': only has a meaning together with force_tick"),
        ("pidfile = %(nothing)s.pid", "'pidfile': refers to %(nothing)s, which is not set"),
        ("consumer_name =", "'consumer_name': is empty"),
        ("max_events_per_second = 0", "'max_events_per_second': must be a finite number of events a second above 0"),
        ("max_events_per_second = nan", "'max_events_per_second': must be a finite number"),
        ("max_events_per_second = fast", "'max_events_per_second': 'fast' is not a number of events a second"),
    ],
)
def test_load_config_rejects_bad_values(tmp_path: Path, line: str, message: str) -> None:
    ini = tmp_path / "m.ini"
    ini.write_text(
        "[mover]\nsrc_db = dbname=a\ndst_db = dbname=b\npgq_queue_name = q\ndst_queue_name = q2\n"
        + line + "\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(ini)
    text = str(err.value)
    assert text.startswith(f"{ini}: section [mover], key ")
    assert message in text
    assert "\n" not in text


def test_load_config_syntax_errors_do_not_echo_lines(tmp_path: Path) -> None:
    ini = tmp_path / "m.ini"
    ini.write_text("[mover]\nsrc_db = dbname=a\n  password hush-hush\nnot a key value line\n")
    with pytest.raises(ConfigError) as err:
        load_config(ini)
    assert "hush" not in str(err.value) and "line" in str(err.value)
    ini.write_text("src_db = x\n[mover]\n")
    with pytest.raises(ConfigError, match="section header"):
        load_config(ini)
