"""``pgq-queue-mover [switches] config.ini``: the skytools queue_mover command line.

Same ini file, same switches, same tracking (the mark in the target's
``pgq_ext.completed_tick``), over the one move implementation in
``core.mover.QueueMover``: this module only reads the config, opens and recycles
connections, loops, sleeps, handles signals, the pidfile and daemon mode, and logs.

Exit codes: 0 done, 1 runtime error (database unreachable, PgqError, already
running), 2 usage or config error. Every error is one line on stderr; passwords
never appear in output or log.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import logging.handlers
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg2
from psycopg2.extensions import connection as Connection

from airflow_provider_pgq import __version__
from airflow_provider_pgq.core import guard, pgq, pgq_ext
from airflow_provider_pgq.core.config import (
    IGNORED_KEY_NOTES,
    SECRET_KEYS,
    ConfigError,
    MoverConfig,
    load_config,
    sample_ini,
)
from airflow_provider_pgq.core.connect import connect, connection_parameters, describe, redact
from airflow_provider_pgq.core.errors import ConnectionFailed, PgqError, TickerNotRunning, WaitAborted, WaitTimeout
from airflow_provider_pgq.core.mover import BatchResult, DrainBounds, MoveReport, QueueMover

PROG = "pgq-queue-mover"
EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2

#: Errors a running loop outlives: log, close connections, sleep, try again.
RETRYABLE = (psycopg2.Error, ConnectionFailed, TickerNotRunning, WaitTimeout, WaitAborted)

#: Consecutive failures double the retry delay up to this (seconds), or retry_delay if longer.
MAX_BACKOFF = 60.0

#: Longest single sleep, so that signals are noticed promptly.
_SLEEP_SLICE = 0.1

log = logging.getLogger("airflow_provider_pgq.cli")  # not __name__: "__main__" under -m


class UsageError(Exception):
    """Switches or config that cannot work together (exit 2)."""


class AlreadyRunning(PgqError):
    """The pidfile names a live process (exit 1)."""


class _Terminated(BaseException):
    """SIGTERM (or a second SIGINT): leave now. BaseException, so nothing swallows it."""


class _StopAfterBatch(BaseException):
    """Raised between batches after SIGINT: the batch before it is complete."""


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


# -- logging ------------------------------------------------------------------


class _RedactFilter(logging.Filter):
    """Last line of defence: no password leaves through a log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True


class _CoreOnceFilter(logging.Filter):
    """Without -v, the core's per-drain info lines ("moving a -> b", "cut tick") would
    repeat every loop: show each kind once, and all of them at -v."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("airflow_provider_pgq.core") or record.levelno != logging.INFO:
            return True
        key = str(record.msg)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


class _Logs:
    """The one handler of the package's loggers: the logfile, or stderr without one."""

    FORMAT = "%(asctime)s %(process)d %(levelname)s %(message)s"

    def __init__(self, level: int) -> None:
        self.level = level
        self.logger = logging.getLogger("airflow_provider_pgq")
        self.handler: logging.Handler | None = None
        self.logfile: Path | None = None
        self.once = _CoreOnceFilter()

    @property
    def to_file(self) -> bool:
        return self.logfile is not None

    def configure(self, logfile: Path | None) -> None:
        """(Re)opens the log target; also what SIGHUP does after a logrotate."""
        handler: logging.Handler
        if logfile is not None:
            logfile.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.handlers.WatchedFileHandler(logfile, encoding="utf-8")
        else:
            handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(self.FORMAT))
        if self.level > logging.DEBUG:
            handler.addFilter(self.once)  # before redaction: it keys on the unformatted message
        handler.addFilter(_RedactFilter())
        if self.handler is not None:
            self.logger.removeHandler(self.handler)
            self.handler.close()
        self.handler = handler
        self.logfile = logfile
        self.logger.addHandler(handler)
        self.logger.setLevel(self.level)
        self.logger.propagate = False

    def close(self) -> None:
        if self.handler is not None:
            self.logger.removeHandler(self.handler)
            self.handler.close()
            self.handler = None


def _fail(message: str, code: int, logs: _Logs | None = None) -> int:
    """One line on stderr (and in the logfile, when there is one); returns code."""
    line = redact(_one_line(message))
    if logs is not None and logs.to_file:
        log.error("%s", line)
    try:
        print(f"{PROG}: error: {line}", file=sys.stderr)
    except OSError:
        pass
    return code


def _note_config(config: MoverConfig) -> None:
    for key in config.unknown_keys:
        log.warning("%s: section [%s]: unknown key %r ignored (a typo?)", config.path, config.section, key)
    for key in config.ignored_keys:
        note = IGNORED_KEY_NOTES.get(key, "")
        log.info("%s: classic key %r has no effect here and is ignored%s", config.path, key,
                 f": {note}" if note else "")


# -- pidfile ------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether pid is a running process (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


class PidFile:
    """One instance per pidfile: refuse a live owner, replace a stale file, clean up."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.owned = False

    def read(self) -> int | None:
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            return None
        try:
            return int(text.split()[0])
        except (ValueError, IndexError):
            return 0  # unreadable content: treated as stale

    def running_pid(self) -> int | None:
        pid = self.read()
        return pid if pid and pid_alive(pid) else None

    def refuse_if_running(self) -> None:
        pid = self.running_pid()
        if pid is not None and pid != os.getpid():
            raise AlreadyRunning(
                f"already running as pid {pid} (pidfile {self.path}): stop it with -s first,"
                " or remove the pidfile if that process is not a mover"
            )

    def acquire(self) -> None:
        """Writes our pid with O_EXCL, so two starts at once cannot both win."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self.refuse_if_running()
                stale = self.read()
                log.warning("replacing stale pidfile %s (pid %s is not running)", self.path, stale)
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(f"{os.getpid()}\n")
            self.owned = True
            return
        raise AlreadyRunning(f"cannot take pidfile {self.path}: another process keeps writing it")

    def release(self) -> None:
        if self.owned and self.read() == os.getpid():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        self.owned = False


def _signal_running(config: MoverConfig, sig: signal.Signals) -> int:
    """-r/-s/-k: signal the instance the pidfile names. Not running: -s and -k have
    nothing to do (exit 0, as classic), -r fails (exit 1)."""
    if config.pidfile is None:
        raise UsageError(
            f"{config.path}: section [{config.section}], key 'pidfile': not set, so no running"
            " instance can be found to signal"
        )
    pidfile = PidFile(config.pidfile)
    pid = pidfile.read()
    if pid is None or not pid_alive(pid):
        why = "no pidfile" if pid is None else f"stale pidfile names pid {pid}"
        code = EXIT_RUNTIME if sig == signal.SIGHUP else EXIT_OK
        print(f"{PROG}: {config.job_name} is not running ({why}: {config.pidfile})", file=sys.stderr)
        return code
    os.kill(pid, sig)
    return EXIT_OK


# -- connections ----------------------------------------------------------------


class _Connections:
    """Source and target connections, opened on first use, with their age."""

    def __init__(self, config: MoverConfig) -> None:
        self.config = config
        self._source: Connection | None = None
        self._target: Connection | None = None
        self.opened = time.monotonic()

    def _open(self, key: str, dsn: str) -> Connection:
        try:
            conn = connect(dsn, application_name=self.config.job_name, timeouts=self.config.timeouts(),
                           side="source" if key == "src_db" else "target")
        except ConnectionFailed as exc:
            raise ConnectionFailed(f"{key}: {exc}") from None
        if self._source is None and self._target is None:
            self.opened = time.monotonic()
        return conn

    @property
    def source(self) -> Connection:
        if self._source is None:
            self._source = self._open("src_db", self.config.src_db)
        return self._source

    @property
    def target(self) -> Connection:
        if self._target is None:
            self._target = self._open("dst_db", self.config.dst_db)
        return self._target

    def age(self) -> float:
        return time.monotonic() - self.opened

    def open_connections(self) -> list[Connection | None]:
        """For SIGTERM's abort, from another thread: no connection is opened here."""
        return [self._source, self._target]

    def broken(self) -> bool:
        return any(c is not None and c.closed for c in (self._source, self._target))

    def close(self) -> None:
        for conn in (self._source, self._target):
            if conn is not None:
                try:
                    conn.close()
                except psycopg2.Error:
                    pass
        self._source = self._target = None


# -- one-shot actions -------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}s"
    return str(value)


def _admin(config: MoverConfig, args: argparse.Namespace) -> int:
    """--install-pgq-ext, --register, --reset, --rewind, --status, in that order."""
    conns = _Connections(config)
    out = sys.stdout
    try:
        if args.install_pgq_ext:
            report = pgq_ext.install(conns.target)
            print(f"pgq_ext is installed and current in {describe(config.dst_db)} (marks kept):"
                  f" {report.summary()}", file=out)
        if args.register:
            pgq.require_queue(conns.source, config.pgq_queue_name, "source")
            new = pgq.register_consumer(conns.source, config.pgq_queue_name, config.pgq_consumer_id)
            conns.source.commit()
            state = "registered" if new else "was already registered"
            print(f"consumer {config.pgq_consumer_id!r} {state} on queue {config.pgq_queue_name!r}", file=out)
        if args.unregister:
            _unregister(config, conns, out)
        if args.reset or args.rewind or args.status:
            mover = QueueMover(conns.source, conns.target, config.options())
            if args.reset:
                old = mover.reset()
                print(
                    f"target mark of consumer {config.pgq_consumer_id!r} cleared (was {_fmt(old)}):"
                    " the next run continues from the source consumer's position", file=out,
                )
            if args.rewind:
                tick = mover.rewind()
                print(
                    f"consumer {config.pgq_consumer_id!r} on queue {config.pgq_queue_name!r}"
                    f" rewound to the target's mark, tick {tick}", file=out,
                )
            if args.status:
                pgq_ext.require(conns.target)
                conns.target.rollback()
                _print_status(config, mover.status())
    finally:
        conns.close()
    return EXIT_OK


def _unregister(config: MoverConfig, conns: _Connections, out: Any) -> None:
    """--unregister, as skytools' SerialConsumer did it: the consumer leaves the source
    queue, and the target forgets its mark (and the source it was bound to), so that a
    later --register starts clean instead of meeting a mark that no longer fits."""
    pgq.require_queue(conns.source, config.pgq_queue_name, "source")
    was = pgq.is_registered(conns.source, config.pgq_queue_name, config.pgq_consumer_id)
    if was:
        pgq.unregister_consumer(conns.source, config.pgq_queue_name, config.pgq_consumer_id)
    conns.source.commit()
    old = QueueMover(conns.source, conns.target, config.options()).reset()
    state = "unregistered from" if was else "was not registered on"
    print(
        f"consumer {config.pgq_consumer_id!r} {state} queue {config.pgq_queue_name!r}; target mark"
        f" cleared (was {_fmt(old)}): events queued from now on are not moved until it registers again",
        file=out,
    )


def _print_status(config: MoverConfig, status: dict[str, Any]) -> None:
    running = "-"
    if config.pidfile is not None:
        pid = PidFile(config.pidfile).running_pid()
        running = f"yes, pid {pid}" if pid else "no"
    rows = [
        ("job", config.job_name),
        ("running", running),
        ("source", f"{describe(config.src_db)} queue {status['source_queue']}"),
        ("target", f"{describe(config.dst_db)} queue {status['target_queue']}"),
        ("consumer", status["consumer"] + (f" / {status['subconsumer']}" if status["subconsumer"] else "")),
        ("registered", _fmt(status["registered"])),
        ("consumer last tick", _fmt(status["last_tick"])),
        ("current batch", _fmt(status["current_batch"])),
        ("source last tick", _fmt(status["source_last_tick"])),
        ("target mark", _fmt(status["target_mark"])),
        ("lag", _fmt(status["lag_seconds"])),
        ("pending events", _fmt(status["pending_events"])),
    ]
    width = max(len(name) for name, _ in rows) + 1
    for name, value in rows:
        print(f"{name + ':':<{width}} {value}")


# -- the loop -----------------------------------------------------------------------


class Runner:
    """The long-running (or --once) mover: connections, loop, signals, pidfile."""

    def __init__(
        self, config: MoverConfig, logs: _Logs, once: bool, daemon: bool, base_dir: Path,
        overrides: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.overrides = dict(overrides or {})  # --set, applied again on every reload
        self.logs = logs
        self.once = once
        self.daemon = daemon
        self.base_dir = base_dir
        self.pidfile = PidFile(config.pidfile) if config.pidfile is not None else None
        self.conns: _Connections | None = None
        self.mover: QueueMover | None = None
        self.stop_requested = False
        self.reload_requested = False
        self.terminating = False
        self.worked = False  # a drain succeeded once: from now on database errors are retried
        self.failures = 0  # in a row: the retry delay doubles with each
        self.reconnect_reason = "start"

    # -- signals: handlers only set flags (or leave at once) -----------------------

    def install_signals(self) -> None:
        signal.signal(signal.SIGHUP, self._on_sighup)
        signal.signal(signal.SIGINT, self._on_sigint)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sighup(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested = True

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.stop_requested:  # a second ^C: do not wait for the batch
            self._on_sigterm(signum, frame)
        self.stop_requested = True

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self.terminating:
            return
        self.terminating = True
        raise _Terminated(signal.Signals(signum).name)

    def _sleep(self, seconds: float) -> None:
        """Sleeps, but wakes for a stop or reload request."""
        deadline = time.monotonic() + seconds
        while not (self.stop_requested or self.reload_requested):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, _SLEEP_SLICE))

    # -- entry --------------------------------------------------------------------------

    def run(self) -> int:
        """Returns the exit code; in daemon mode, the starting process returns here too."""
        self.install_signals()
        try:
            if self.daemon:
                assert self.pidfile is not None
                self.pidfile.refuse_if_running()
                self._startup_check()
                code = self._daemonize()
                if code is not None:
                    return code
            elif self.pidfile is not None:
                self.pidfile.acquire()
            # SIGTERM must end the process even while it waits inside libpq (no Python
            # handler runs there): a helper thread shuts the connections down first.
            with guard.interrupt_waits_on((signal.SIGTERM,), self._open_connections):
                return self._loop()
        except (_Terminated, WaitAborted) as exc:
            # WaitAborted: SIGTERM's helper thread closed the connections under a wait,
            # and the error got out before the signal's own handler ran.
            why = exc if isinstance(exc, _Terminated) else "SIGTERM"
            log.info("%s: stopping at once (%s); an unfinished batch is retried on the next start",
                     self.config.job_name, why)
            return EXIT_OK
        finally:
            self._disconnect()
            if self.pidfile is not None:
                self.pidfile.release()

    def _startup_check(self) -> None:
        """Before going to the background: connect and check both sides, so that a bad
        connection string or a missing queue is reported on the terminal (exit 1)."""
        conns = _Connections(self.config)
        try:
            QueueMover(conns.source, conns.target, self.config.options()).prepare()
        finally:
            conns.close()
        self.worked = True

    def _daemonize(self) -> int | None:
        """Double fork. Returns None in the daemon; in the starting process, the exit code
        once the daemon has taken the pidfile (0) or failed to (1, with its message)."""
        if self.logs.logfile is None:
            log.warning("no logfile in %s: the daemon's log is discarded", self.config.path)
        sys.stdout.flush()
        sys.stderr.flush()
        read_fd, write_fd = os.pipe()
        first = os.fork()
        if first > 0:
            os.close(write_fd)
            with os.fdopen(read_fd, "rb") as pipe:
                answer = pipe.read().decode("utf-8", "replace")
            os.waitpid(first, 0)
            self.pidfile = None  # the daemon's, not ours to remove
            if answer == "ok":
                return EXIT_OK
            return _fail(answer or "the daemon died while starting", EXIT_RUNTIME)
        # first child: new session, then the daemon is its child
        os.close(read_fd)
        os.setsid()
        if os.fork() > 0:
            os._exit(0)
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        assert self.pidfile is not None
        try:
            self.pidfile.acquire()
        except (AlreadyRunning, OSError) as exc:
            os.write(write_fd, str(exc).encode())
            os._exit(EXIT_RUNTIME)
        os.write(write_fd, b"ok")
        os.close(write_fd)
        log.info("%s: running as daemon, pid %s, pidfile %s", self.config.job_name, os.getpid(), self.pidfile.path)
        return None

    # -- connections --------------------------------------------------------------------

    def _open_connections(self) -> list[Connection | None]:
        conns = self.conns
        return conns.open_connections() if conns is not None else []

    def _disconnect(self) -> None:
        if self.conns is not None:
            self.conns.close()
        self.conns = None
        self.mover = None

    def _ensure_connected(self) -> QueueMover:
        if self.conns is not None and self.conns.broken():
            self._disconnect()
            self.reconnect_reason = "a connection was closed"
        if self.conns is not None and self.conns.age() >= self.config.connection_lifetime:
            log.debug("reopening connections after %.0fs (connection_lifetime)", self.conns.age())
            self._disconnect()
            self.reconnect_reason = ""
        if self.mover is None:
            conns = _Connections(self.config)
            try:
                self.mover = QueueMover(conns.source, conns.target, self.config.options(),
                                        on_batch=self._on_batch)
            except BaseException:
                conns.close()
                raise
            self.conns = conns
            c = self.config
            if self.reconnect_reason:
                log.info(
                    "%s: connected (%s): %s queue %s -> %s queue %s as consumer %r",
                    c.job_name, self.reconnect_reason, describe(c.src_db), c.pgq_queue_name,
                    describe(c.dst_db), c.dst_queue_name, c.pgq_consumer_id,
                )
            self.reconnect_reason = ""
        return self.mover

    # -- loop -------------------------------------------------------------------------

    def _on_batch(self, result: BatchResult) -> None:
        log.debug(
            "batch %s: ticks %s..%s, %s events, %s in %.3fs",
            result.batch_id, result.prev_tick_id, result.cur_tick_id, result.events, result.outcome,
            result.seconds,
        )
        if self.stop_requested:
            raise _StopAfterBatch

    def _loop(self) -> int:
        while True:
            if self.reload_requested:
                self._reload()
            if self.stop_requested:
                log.info("%s: stopping as asked (SIGINT)", self.config.job_name)
                return EXIT_OK
            try:
                report = self._ensure_connected().drain(self._bounds())
            except _StopAfterBatch:
                log.info("%s: stopping after the current batch as asked (SIGINT)", self.config.job_name)
                return EXIT_OK
            except RETRYABLE as exc:
                if self._single_run() or not self.worked or isinstance(exc, WaitAborted):
                    raise
                self.failures += 1
                base = self.config.retry_delay
                delay = min(base * 2 ** min(self.failures - 1, 16), max(base, MAX_BACKOFF))
                log.error("database error, reconnecting in %gs: %s", delay, _one_line(str(exc)))
                self._disconnect()
                self.reconnect_reason = "after an error"
                self._sleep(delay)
                continue
            self.worked = True
            self.failures = 0
            self._log_report(report)
            if self._single_run():
                log.debug("%s: %s done, exiting", self.config.job_name,
                          "one batch (loop_delay < 0)" if self._one_batch() else "drain")
                return EXIT_OK
            if report.events == 0 and report.stop_reason == "drained":
                log.debug("idle: sleeping %gs (loop_delay)", self.config.loop_delay)
                self._sleep(self.config.loop_delay)

    def _single_run(self) -> bool:
        """--once, or loop_delay <= 0 (skytools: 0 works while there is work, then exits;
        < 0 runs one round): one drain, then exit; the same with and without -d."""
        return self.once or self.config.run_mode != "loop"

    def _one_batch(self) -> bool:
        """loop_delay < 0: one round is one batch for a consumer (--once drains instead)."""
        return not self.once and self.config.run_mode == "one_batch"

    def _bounds(self) -> DrainBounds:
        bounds = self.config.bounds()
        return dataclasses.replace(bounds, max_batches=1) if self._one_batch() else bounds

    def _log_report(self, r: MoveReport) -> None:
        busy = r.events or r.batches or r.skipped or r.stale
        level = logging.INFO if (r.events or r.skipped or r.stale or self._single_run()) else logging.DEBUG
        ticks = f"ticks {r.first_tick}..{r.last_tick}" if r.last_tick is not None else "no ticks"
        extra = ""
        if r.skipped:
            extra += f", {r.skipped} already applied"
        if r.stale:
            extra += f", {r.stale} finished by another mover"
        if r.filtered:
            extra += f", {r.filtered} of other tables consumed (table_filter)"
        lag = f"{r.lag_seconds:.1f}s" if r.lag_seconds is not None else "-"
        log.log(
            level,
            "%s %s events in %s batch%s (%s%s) in %.3fs, stopped: %s; lag %s, pending ~%s",
            "moved" if busy else "nothing to move:", r.events, r.batches, "" if r.batches == 1 else "es",
            ticks, extra, r.seconds, r.stop_reason, lag,
            r.pending_events if r.pending_events is not None else "-",
        )

    def _reload(self) -> None:
        """SIGHUP: reread the config at a loop boundary; a bad file keeps the old config."""
        self.reload_requested = False
        old = self.config
        try:
            new = load_config(old.path, old.section, base_dir=self.base_dir, overrides=self.overrides)
        except ConfigError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            return
        for key in ("src_db", "dst_db"):  # checked now: once taken, a broken one fails every loop
            try:
                connection_parameters(getattr(new, key))
            except ConnectionFailed as exc:
                log.error("reload failed, keeping the running config: %s: %s", key, exc)
                return
        changes = []
        for f in dataclasses.fields(MoverConfig):
            before, after = getattr(old, f.name), getattr(new, f.name)
            if before == after or f.name in ("unknown_keys", "ignored_keys"):
                continue
            if f.name in SECRET_KEYS:
                changes.append(f"{f.name} changed")
            else:
                changes.append(f"{f.name} {_fmt_plain(before)} -> {_fmt_plain(after)}")
        try:
            self.logs.configure(new.logfile)  # also reopens the logfile after a logrotate
        except OSError as exc:
            log.error("reload: cannot open logfile %s (%s): keeping the running config", new.logfile, exc.strerror)
            return
        if new.pidfile != old.pidfile:
            log.warning("pidfile changed in the config: takes effect at the next start")
        self.config = dataclasses.replace(new, pidfile=old.pidfile)
        log.info("config reloaded: %s", ", ".join(changes) if changes else "no changes")
        _note_config(new)
        if old.options() != new.options() or (old.src_db, old.dst_db, old.job_name) != (
            new.src_db, new.dst_db, new.job_name
        ):
            self._disconnect()
            self.reconnect_reason = "config reloaded"


def _fmt_plain(value: Any) -> str:
    return "-" if value is None else str(value)


# -- command line ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Move PgQ events from a source queue to a target queue, exactly once, tracking"
            " progress in the target's pgq_ext (the skytools queue_mover protocol and config)."
        ),
        epilog="Exit codes: 0 ok, 1 runtime error, 2 usage or config error.",
    )
    p.add_argument("config", nargs="?", help="queue_mover ini file")
    p.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log every batch")
    p.add_argument("-d", "--daemon", action="store_true", help="go to the background (needs pidfile)")
    p.add_argument("--section", metavar="NAME", help="config section to use (default: the first)")
    p.add_argument("--ini", action="store_true", help="print a commented sample config, then exit")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override a config key (repeatable), e.g. --set loop_delay=5")
    ctl = p.add_argument_group("control a running instance (found through the pidfile)")
    ex = ctl.add_mutually_exclusive_group()
    ex.add_argument("-r", "--reload", dest="send", action="store_const", const=signal.SIGHUP,
                    help="reread the config (SIGHUP)")
    ex.add_argument("-s", "--stop", dest="send", action="store_const", const=signal.SIGINT,
                    help="stop after the current batch (SIGINT)")
    ex.add_argument("-k", "--kill", dest="send", action="store_const", const=signal.SIGTERM,
                    help="stop at once (SIGTERM); an unfinished batch is retried on the next start")
    more = p.add_argument_group("beyond the classic tool")
    more.add_argument("--once", action="store_true", help="move what is available, then exit (for cron)")
    pos = more.add_mutually_exclusive_group()
    pos.add_argument("--rewind", action="store_true",
                     help="re-register the source consumer at the target's mark, then exit")
    pos.add_argument("--reset", action="store_true",
                     help="forget the target's mark (continue from the source consumer), then exit")
    more.add_argument("--install-pgq-ext", action="store_true",
                      help="install or upgrade pgq_ext in the target (keeps marks), then exit")
    reg = more.add_mutually_exclusive_group()
    reg.add_argument("--register", action="store_true",
                     help="register the consumer on the source queue, then exit")
    reg.add_argument("--unregister", action="store_true",
                     help="unregister the consumer from the source queue and clear the target's mark, then exit")
    more.add_argument("--status", action="store_true",
                      help="print queue, consumer, lag, pending events and target mark, then exit")
    return p


def _admin_switches(args: argparse.Namespace) -> bool:
    return bool(args.rewind or args.reset or args.install_pgq_ext or args.register or args.unregister
                or args.status)


def _overrides(pairs: Sequence[str]) -> dict[str, str]:
    """--set key=value, as skytools took it: split at the first '=', both sides stripped."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {pair!r}: expected KEY=VALUE")
        if "\x00" in pair:
            raise UsageError("--set: a NUL character (\\x00) cannot be in a key or value")
        out[key.strip().lower()] = value.strip()
    return out


def _check_switches(args: argparse.Namespace) -> None:
    admin = _admin_switches(args)
    if args.unregister and args.rewind:
        raise UsageError("--unregister and --rewind contradict each other: use one")
    if args.send is not None and (args.daemon or args.once or admin):
        raise UsageError("-r/-s/-k only signal a running instance: use them alone")
    if args.daemon and (args.once or admin):
        raise UsageError("-d runs the mover in the background: it does not combine with --once"
                         " or the one-shot switches")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logs = _Logs(level)
    base_dir = Path.cwd()
    try:
        _check_switches(args)
        overrides = _overrides(args.set)
        if args.ini:
            print(sample_ini(args.section or "queue_mover", overrides), end="")
            return EXIT_OK
        if args.config is None:
            parser.error("the following arguments are required: config")
        config = load_config(args.config, args.section, base_dir=base_dir, overrides=overrides)
        if args.send is not None:
            return _signal_running(config, args.send)
        if args.daemon and config.pidfile is None:
            raise UsageError(
                f"{config.path}: section [{config.section}], key 'pidfile': -d needs a pidfile"
            )
        logs.configure(config.logfile)
        _note_config(config)
        if _admin_switches(args):
            code = _admin(config, args)
            if code != EXIT_OK or not args.once:
                return code
        return Runner(config, logs, once=args.once, daemon=args.daemon, base_dir=base_dir,
                      overrides=overrides).run()
    except (ConfigError, UsageError) as exc:
        return _fail(str(exc), EXIT_USAGE, logs)
    except _Terminated:  # SIGTERM while cleaning up after a stop
        return EXIT_OK
    except KeyboardInterrupt:  # ^C before the loop installed its own handler
        return _fail("interrupted", 130, logs)
    except PgqError as exc:
        return _fail(str(exc), EXIT_RUNTIME, logs)
    except psycopg2.Error as exc:
        return _fail(f"database error: {exc}", EXIT_RUNTIME, logs)
    except OSError as exc:
        return _fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "), EXIT_RUNTIME, logs)
    except Exception as exc:  # a bug: still one line, details at -v
        log.debug("unexpected error", exc_info=True)
        return _fail(f"unexpected {type(exc).__name__}: {exc}", EXIT_RUNTIME, logs)
    finally:
        logs.close()


if __name__ == "__main__":
    sys.exit(main())
