"""The keys a queue_mover section may hold, and the validated section (MoverConfig)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from airflow_provider_pgq.core.errors import PgqError
from airflow_provider_pgq.core.guard import Timeouts
from airflow_provider_pgq.core.journal import Who
from airflow_provider_pgq.core.mover import (
    DEFAULT_BATCH_TARGET_EVENTS,
    DEFAULT_BATCH_TARGET_SECONDS,
    DrainBounds,
    MoverOptions,
)

#: Keys the move needs; without them there is nothing to do (pgq_queue_name may be
#: given as skytools 3's queue_name instead).
REQUIRED_KEYS = ("src_db", "dst_db", "pgq_queue_name", "dst_queue_name")

#: Keys this program reads (required, classic optional, and our extras).
KNOWN_KEYS = frozenset(
    REQUIRED_KEYS
    + (
        "job_name", "pgq_consumer_id", "pidfile", "logfile", "loop_delay", "connection_lifetime",
        "exception_sleep", "subconsumer", "max_batches", "max_events", "max_runtime",
        "min_batch_events", "min_batch_interval", "force_tick", "run_ticker", "keep_event_id",
        "batch_target_events", "batch_target_seconds", "max_events_per_second",
        "register_consumer", "register_at", "install_pgq_ext", "invalid_events",
        "connect_timeout", "network_timeout", "statement_timeout", "lock_timeout",
        # skytools 3 BaseConsumer keys with a meaning here
        "queue_name", "consumer_name", "table_filter", "pgq_keep_lag",
        "pgq_batch_collect_events", "pgq_batch_collect_interval",
    )
)

#: Classic skytools keys that have no meaning here: accepted, noted in the log, ignored.
IGNORED_CLASSIC_KEYS = frozenset(
    (
        "use_skylog", "skylog_locations", "log_size", "log_count", "logfmt_file", "logfmt_console",
        "logdatefmt_file", "logdatefmt_console", "logfmt_file_verbose", "logfmt_console_verbose",
        "logdatefmt_file_verbose", "logdatefmt_console_verbose", "exception_quiet",
        "exception_grace", "exception_reset", "pgq_lazy_fetch", "pgq_autocommit", "keepalive_stats",
        "sql_retry", "sql_retry_max_count", "sql_retry_max_time", "sql_retry_formula_a",
        "sql_retry_formula_b", "sql_retry_formula_cap",
    )
)

#: What an accepted classic key without effect means here: one line in the log.
IGNORED_KEY_NOTES = {
    "pgq_lazy_fetch": "events stream from source to target by COPY and are never fetched into"
    " Python, so there is no fetch size to set",
    "pgq_autocommit": "the source is always read in short transactions: the exactly-once protocol"
    " needs them (the batch is taken, read and finished in its own transactions)",
    "keepalive_stats": "no idle statistics are written: an idle loop is logged at -v, and --status"
    " shows lag and pending events",
    "log_size": "the logfile is not rotated by size here: use logrotate (the file is reopened when moved)",
    "log_count": "the logfile is not rotated here: use logrotate (the file is reopened when moved)",
}

#: Values every section can refer to, as skytools provided them.
BUILTIN_KEYS = frozenset(("job_name", "service_name", "host_name", "config_dir", "config_file"))

#: Keys whose values are never shown in messages.
SECRET_KEYS = frozenset(("src_db", "dst_db"))

#: skytools' default for connection_lifetime: reconnect every 20 minutes.
DEFAULT_CONNECTION_LIFETIME = 1200.0
DEFAULT_LOOP_DELAY = 1.0


class ConfigError(PgqError):
    """The config file cannot be used: unreadable, no such section, a key missing or bad."""


@dataclass(frozen=True)
class MoverConfig:
    """A validated queue_mover config section; paths are absolute."""

    path: Path
    section: str
    job_name: str
    src_db: str = field(repr=False)
    dst_db: str = field(repr=False)
    pgq_queue_name: str
    dst_queue_name: str
    pgq_consumer_id: str
    subconsumer: str = ""
    pidfile: Path | None = None
    logfile: Path | None = None
    #: > 0: seconds to sleep after an idle loop; 0: drain, then exit; < 0: one batch, then exit.
    loop_delay: float = DEFAULT_LOOP_DELAY
    connection_lifetime: float = DEFAULT_CONNECTION_LIFETIME
    exception_sleep: float | None = None
    max_batches: int | None = None
    max_events: int | None = None
    max_runtime: float | None = None
    min_batch_events: int | None = None
    min_batch_interval: float | None = None
    #: Catching up, batches of about this many events / seconds (see MoverOptions).
    batch_target_events: int = DEFAULT_BATCH_TARGET_EVENTS
    batch_target_seconds: float = DEFAULT_BATCH_TARGET_SECONDS
    #: catching up, at most this many events a second on average (see MoverOptions)
    max_events_per_second: float | None = None
    force_tick: bool = False
    run_ticker: bool = False
    keep_event_id: bool = False
    register_consumer: bool = False
    #: where a new registration starts: "now" (PgQ's rule) or "oldest" (what the queue holds)
    register_at: str = "now"
    install_pgq_ext: bool = False
    #: events the target refuses: "stop" (the default) or "dead_letter" (see MoverOptions)
    invalid_events: str = "stop"
    #: table_filter: move only events whose ev_extra1 is one of these (schema-qualified) names.
    table_filter: tuple[str, ...] = ()
    #: pgq_keep_lag in seconds: only batches whose end tick is at least this old.
    keep_lag: float | None = None
    #: Bounds of every network wait (guard.Timeouts); the connection string's own win.
    connect_timeout: float = Timeouts.connect_timeout
    network_timeout: float = Timeouts.network_timeout
    statement_timeout: float = Timeouts.statement_timeout
    lock_timeout: float = Timeouts.lock_timeout
    #: Keys nobody reads (probably typos): the caller logs a warning for each.
    unknown_keys: tuple[str, ...] = ()
    #: Classic keys that mean nothing here: the caller logs a note for each.
    ignored_keys: tuple[str, ...] = ()

    @property
    def retry_delay(self) -> float:
        """Seconds to wait after a database error before trying again."""
        if self.exception_sleep is not None:
            return self.exception_sleep
        return self.loop_delay if self.loop_delay > 0 else DEFAULT_LOOP_DELAY

    @property
    def run_mode(self) -> str:
        """What loop_delay asks for, as skytools' DBScript read it: "loop" (> 0, sleep
        between idle loops), "drain" (0: work while there is work, then exit) or
        "one_batch" (< 0: one round, which for a consumer is one batch, then exit)."""
        if self.loop_delay > 0:
            return "loop"
        return "drain" if self.loop_delay == 0 else "one_batch"

    def options(self) -> MoverOptions:
        return MoverOptions(
            source_queue=self.pgq_queue_name,
            target_queue=self.dst_queue_name,
            consumer=self.pgq_consumer_id,
            subconsumer=self.subconsumer,
            register_consumer=self.register_consumer,
            register_at=self.register_at,
            install_pgq_ext=self.install_pgq_ext,
            keep_event_id=self.keep_event_id,
            min_batch_events=self.min_batch_events,
            min_batch_interval=(
                dt.timedelta(seconds=self.min_batch_interval)
                if self.min_batch_interval is not None
                else None
            ),
            table_filter=self.table_filter,
            keep_lag=dt.timedelta(seconds=self.keep_lag) if self.keep_lag is not None else None,
            batch_target_events=self.batch_target_events,
            batch_target_seconds=self.batch_target_seconds,
            max_events_per_second=self.max_events_per_second,
            invalid_events=self.invalid_events,
            who=Who(job=self.job_name),
        )

    def timeouts(self) -> Timeouts:
        return Timeouts(
            connect_timeout=self.connect_timeout, network_timeout=self.network_timeout,
            statement_timeout=self.statement_timeout, lock_timeout=self.lock_timeout,
        )

    def bounds(self) -> DrainBounds:
        return DrainBounds(
            max_batches=self.max_batches,
            max_events=self.max_events,
            max_runtime=self.max_runtime,
            force_tick=self.force_tick,
            run_ticker=self.run_ticker,
        )

