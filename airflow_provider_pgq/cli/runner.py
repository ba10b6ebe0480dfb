"""The long-running (or --once) mover: the loop, its signals, retries and reconnects."""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

import psycopg2
from psycopg2.extensions import connection as Connection

from airflow_provider_pgq.cli.common import EXIT_OK, StopAfterBatch, Terminated, log, one_line
from airflow_provider_pgq.cli.config import MoverConfig
from airflow_provider_pgq.cli.connections import Connections
from airflow_provider_pgq.cli.daemon import PidFile, daemonize
from airflow_provider_pgq.cli.logs import Logs
from airflow_provider_pgq.cli.reload import needs_reconnect, reread
from airflow_provider_pgq.cli.report import log_report
from airflow_provider_pgq.core import guard
from airflow_provider_pgq.core.connect import describe
from airflow_provider_pgq.core.errors import ConnectionFailed, TickerNotRunning, WaitAborted, WaitTimeout
from airflow_provider_pgq.core.mover import BatchResult, DrainBounds, QueueMover

#: Errors a running loop outlives: log, close connections, sleep, try again.
RETRYABLE = (psycopg2.Error, ConnectionFailed, TickerNotRunning, WaitTimeout, WaitAborted)

#: Consecutive failures double the retry delay up to this (seconds), or retry_delay if longer.
MAX_BACKOFF = 60.0

#: Longest single sleep, so that signals are noticed promptly.
_SLEEP_SLICE = 0.1


class Runner:
    """The long-running (or --once) mover: connections, loop, signals, pidfile."""

    def __init__(
        self, config: MoverConfig, logs: Logs, once: bool, daemon: bool, base_dir: Path,
        overrides: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.overrides = dict(overrides or {})  # --set, applied again on every reload
        self.logs = logs
        self.once = once
        self.daemon = daemon
        self.base_dir = base_dir
        self.pidfile = PidFile(config.pidfile) if config.pidfile is not None else None
        self.conns: Connections | None = None
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
        raise Terminated(signal.Signals(signum).name)

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
        except (Terminated, WaitAborted) as exc:
            # WaitAborted: SIGTERM's helper thread closed the connections under a wait,
            # and the error got out before the signal's own handler ran.
            why = exc if isinstance(exc, Terminated) else "SIGTERM"
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
        conns = Connections(self.config, settle=False)
        try:
            QueueMover(conns.source, conns.target, self.config.options()).prepare()
        finally:
            conns.close()
        self.worked = True

    def _daemonize(self) -> int | None:
        """None in the daemon; in the starting process, its exit code."""
        assert self.pidfile is not None
        code = daemonize(self.config, self.logs, self.pidfile)
        if code is not None:
            self.pidfile = None  # the daemon's, not ours to remove
        return code

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
            # a new mover checks both sides once (prepare) on its first drain: after a
            # reconnect or a reload, not at every poll
            conns = self.conns or Connections(self.config, settle=False)  # prepare() settles them
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
            raise StopAfterBatch

    def _loop(self) -> int:
        while True:
            if self.reload_requested:
                self._reload()
            if self.stop_requested:
                log.info("%s: stopping as asked (SIGINT)", self.config.job_name)
                return EXIT_OK
            try:
                report = self._ensure_connected().drain(self._bounds())
            except StopAfterBatch:
                log.info("%s: stopping after the current batch as asked (SIGINT)", self.config.job_name)
                return EXIT_OK
            except RETRYABLE as exc:
                if self._single_run() or not self.worked or isinstance(exc, WaitAborted):
                    raise
                self.failures += 1
                base = self.config.retry_delay
                delay = min(base * 2 ** min(self.failures - 1, 16), max(base, MAX_BACKOFF))
                log.error("database error, reconnecting in %gs: %s", delay, one_line(str(exc)))
                self._disconnect()
                self.reconnect_reason = "after an error"
                self._sleep(delay)
                continue
            self.worked = True
            self.failures = 0
            log_report(report, self._single_run())
            if self._single_run():
                log.debug("%s: %s done, exiting", self.config.job_name,
                          "one batch (loop_delay < 0)" if self._one_batch() else "drain")
                return EXIT_OK
            if report.events == 0 and report.stop_reason == "drained":
                # at most loop_delay; sooner when the next tick is due sooner
                wait = self._ensure_connected().idle_wait(self.config.loop_delay)
                log.debug("idle: sleeping %.2fs (loop_delay %g)", wait, self.config.loop_delay)
                self._sleep(wait)

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

    def _reload(self) -> None:
        """SIGHUP: reread the config at a loop boundary; a bad file keeps the old config."""
        self.reload_requested = False
        old = self.config
        new = reread(old, self.logs, self.base_dir, self.overrides)
        if new is None:
            return
        self.config = new
        if needs_reconnect(old, new):
            self._disconnect()
            self.reconnect_reason = "config reloaded"
        else:
            self.mover = None  # the new options, checked again on the next drain
