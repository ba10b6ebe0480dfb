"""The classic skytools queue_mover ini file, read and validated.

One section (the first one unless a name is given), configparser's %-interpolation,
and the keys the classic tool knew, so an existing queue_mover config runs as is.
Like skytools, ``job_name`` defaults to the config file's name without extension,
and ``%(job_name)s``, ``%(service_name)s`` (the section), ``%(host_name)s``,
``%(config_dir)s`` and ``%(config_file)s`` can be used in values.

Errors are one line and name the file, the section and the key. A connection string
is never repeated in a message: it may hold a password.
"""

from __future__ import annotations

import configparser
import datetime as dt
import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from airflow_provider_pgq.core.errors import InvalidParameter, PgqError
from airflow_provider_pgq.core.guard import Timeouts
from airflow_provider_pgq.core.mover import (
    DEFAULT_BATCH_TARGET_EVENTS,
    DEFAULT_BATCH_TARGET_SECONDS,
    MAX_BATCH_INTERVAL,
    MAX_MIN_BATCH_EVENTS,
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
        "batch_target_events", "batch_target_seconds",
        "register_consumer", "install_pgq_ext",
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

T = TypeVar("T")


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
    force_tick: bool = False
    run_ticker: bool = False
    keep_event_id: bool = False
    register_consumer: bool = False
    install_pgq_ext: bool = False
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


class _Reader:
    """Typed access to one section, every failure a ConfigError naming file/section/key."""

    def __init__(self, parser: configparser.ConfigParser, path: Path, section: str) -> None:
        self.parser = parser
        self.path = path
        self.section = section

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: section [{self.section}], key {key!r}: {problem}")

    def has(self, key: str) -> bool:
        return self.parser.has_option(self.section, key)

    def text(self, key: str) -> str:
        try:
            value = self.parser.get(self.section, key).strip()
        except configparser.InterpolationMissingOptionError as exc:
            raise self.error(key, f"refers to %({exc.reference})s, which is not set") from None
        except configparser.InterpolationError:
            raise self.error(
                key, "bad %-reference (write %(name)s to use another key, %% for a literal %)"
            ) from None
        if "\x00" in value:
            # PostgreSQL text cannot hold NUL, nor can a file name: no value may have one.
            shown = "<hidden>" if key in SECRET_KEYS else repr(value)
            raise self.error(key, f"{shown} contains a NUL character (\\x00), which no value may hold")
        return value

    def required(self, key: str) -> str:
        if not self.has(key):
            raise self.error(key, "is missing (required)")
        value = self.text(key)
        if not value:
            raise self.error(key, "is empty (required)")
        return value

    def optional(self, key: str, convert: Callable[[str], T], what: str) -> T | None:
        if not self.has(key):
            return None
        raw = self.text(key)
        if raw == "":
            return None
        try:
            return convert(raw)
        except ValueError:
            shown = "<hidden>" if key in SECRET_KEYS else repr(raw)
            raise self.error(key, f"{shown} is not {what}") from None

    def seconds(
        self, key: str, default: float | None, allow_zero: bool = False, maximum: float | None = None
    ) -> float | None:
        value = self.optional(key, float, "a number of seconds")
        if value is None:
            return default
        if value != value or value in (float("inf"), float("-inf")):
            raise self.error(key, f"{value!r} is not a finite number of seconds")
        if value < 0 or (value == 0 and not allow_zero):
            raise self.error(key, f"must be {'>= 0' if allow_zero else '> 0'} seconds, got {value:g}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"must be at most {maximum:g} seconds, got {value:g}")
        return value

    def count(self, key: str, maximum: int | None = None, zero_is_none: bool = False) -> int | None:
        value = self.optional(key, int, "a whole number")
        if value == 0 and zero_is_none:  # skytools: 0 disables
            return None
        if value is not None and value < 1:
            raise self.error(key, f"must be >= 1, got {value}")
        if value is not None and maximum is not None and value > maximum:
            raise self.error(key, f"must be at most {maximum}, got {value}")
        return value

    def loop_delay(self) -> float:
        """Any finite number: > 0 sleep, 0 drain then exit, < 0 one batch then exit."""
        value = self.optional("loop_delay", float, "a number of seconds")
        if value is None:
            return DEFAULT_LOOP_DELAY
        if not math.isfinite(value):
            raise self.error("loop_delay", f"{value!r} is not a finite number of seconds")
        return value

    def interval(self, key: str) -> float | None:
        """A PostgreSQL interval as skytools passed it to PgQ ('5 minutes', '00:05:00',
        '300'); seconds above zero, at most MAX_BATCH_INTERVAL; empty: None."""
        if not self.has(key) or not self.text(key):
            return None
        raw = self.text(key)
        try:
            value = parse_interval(raw)
        except ValueError as exc:
            raise self.error(key, f"{raw!r} is not an interval ({exc})") from None
        if value == 0:
            return None  # an empty lag or interval: no bound, as PgQ treats zero
        if value > MAX_BATCH_INTERVAL.total_seconds():
            raise self.error(key, f"must be at most {MAX_BATCH_INTERVAL.days} days, got {raw!r}")
        return value

    def table_filter(self) -> tuple[str, ...]:
        """Comma-separated table names; a name without a schema is in public (skytools'
        fq_name), compared with ev_extra1 as written, case and all."""
        if not self.has("table_filter"):
            return ()
        names = []
        for item in self.text("table_filter").split(","):
            name = item.strip()
            if not name:
                continue
            names.append(name if "." in name else f"public.{name}")
        return tuple(dict.fromkeys(names))

    def boolean(self, key: str) -> bool:
        if not self.has(key):
            return False
        try:
            return self.parser.getboolean(self.section, key)
        except ValueError:
            raise self.error(
                key, f"{self.text(key)!r} is not a boolean (use true/false, yes/no, on/off, 1/0)"
            ) from None
        except configparser.InterpolationError:
            raise self.error(key, "bad %-reference") from None

    def path_value(self, key: str, base_dir: Path) -> Path | None:
        """A file name: ~ expanded, relative to base_dir (the current directory, as classic)."""
        value = self.text(key) if self.has(key) else ""
        if value in ("", "-"):
            return None
        return Path(base_dir, os.path.expanduser(value))


def _parse(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=configparser.BasicInterpolation())
    try:
        with open(path, encoding="utf-8") as handle:
            parser.read_file(handle, source=str(path))
    except IsADirectoryError:
        raise ConfigError(f"{path}: cannot read config file: it is a directory") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: cannot read config file: not UTF-8 text ({exc.reason})") from None
    except configparser.MissingSectionHeaderError as exc:
        raise ConfigError(
            f"{path}: line {exc.lineno}: a section header such as [queue_mover] must come first"
        ) from None
    except configparser.DuplicateSectionError as exc:
        raise ConfigError(f"{path}: line {exc.lineno}: section [{exc.section}] appears twice") from None
    except configparser.DuplicateOptionError as exc:
        raise ConfigError(
            f"{path}: line {exc.lineno}: section [{exc.section}], key {exc.option!r} appears twice"
        ) from None
    except configparser.ParsingError as exc:
        # The offending lines are not shown: they may hold a password.
        lines = ", ".join(str(lineno) for lineno, _ in exc.errors)
        raise ConfigError(f"{path}: cannot parse line(s) {lines}: expected 'key = value'") from None
    return parser


def load_config(
    path: str | os.PathLike[str], section: str | None = None, base_dir: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> MoverConfig:
    """Reads and validates a queue_mover config; raises ConfigError.

    section: the section to use (default: the first one). base_dir: what relative
    pidfile/logfile paths are relative to (default: the current directory).
    overrides: key -> value set over the file's section (the CLI's --set key=value,
    as skytools had it; %(name)s references in them work as in the file).
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    file = Path(base, os.path.expanduser(os.fspath(path)))
    parser = _parse(file)
    sections = parser.sections()
    if section is None:
        if not sections:
            raise ConfigError(f"{file}: no section found: put the settings under a header like [queue_mover]")
        section = sections[0]
    elif not parser.has_section(section):
        have = ", ".join(f"[{s}]" for s in sections) or "none"
        raise ConfigError(f"{file}: section [{section}] not found (sections: {have})")

    for key, value in (overrides or {}).items():
        parser.set(section, key.strip().lower(), value.strip())
    own_keys = set(parser.options(section))
    builtins = {
        "job_name": file.stem,
        "service_name": section,
        "host_name": socket.gethostname(),
        "config_dir": str(file.parent),
        "config_file": str(file),
    }
    for key, value in builtins.items():
        if not parser.has_option(section, key):
            parser.set(section, key, value.replace("%", "%%"))

    r = _Reader(parser, file, section)
    job_name = r.required("job_name")
    # skytools 3: pgq_consumer_id when set and not empty, else consumer_name, else job_name.
    consumer = r.text("pgq_consumer_id") if r.has("pgq_consumer_id") else ""
    if not consumer:
        consumer = r.text("consumer_name") if r.has("consumer_name") else job_name
    if not consumer:
        raise r.error("consumer_name", "is empty (leave it out to use job_name)")
    # ... and pgq_queue_name when set and not empty, else queue_name.
    if not (r.has("pgq_queue_name") and r.text("pgq_queue_name")) and r.has("queue_name"):
        parser.set(section, "pgq_queue_name", parser.get(section, "queue_name", raw=True))

    values = {key: r.required(key) for key in REQUIRED_KEYS}
    loop_delay = r.loop_delay()
    lifetime = r.seconds("connection_lifetime", DEFAULT_CONNECTION_LIFETIME)
    assert loop_delay is not None and lifetime is not None
    config = MoverConfig(
        path=file,
        section=section,
        job_name=job_name,
        src_db=values["src_db"],
        dst_db=values["dst_db"],
        pgq_queue_name=values["pgq_queue_name"],
        dst_queue_name=values["dst_queue_name"],
        pgq_consumer_id=consumer,
        subconsumer=r.text("subconsumer") if r.has("subconsumer") else "",
        pidfile=r.path_value("pidfile", base),
        logfile=r.path_value("logfile", base),
        loop_delay=loop_delay,
        connection_lifetime=lifetime,
        exception_sleep=r.seconds("exception_sleep", None, allow_zero=True),
        max_batches=r.count("max_batches"),
        max_events=r.count("max_events"),
        max_runtime=r.seconds("max_runtime", None),
        min_batch_events=_alias(
            r, "min_batch_events", r.count("min_batch_events", maximum=MAX_MIN_BATCH_EVENTS),  # PgQ's int4
            "pgq_batch_collect_events", r.count("pgq_batch_collect_events", maximum=MAX_MIN_BATCH_EVENTS,
                                                zero_is_none=True),
        ),
        min_batch_interval=_alias(
            r, "min_batch_interval",
            r.seconds("min_batch_interval", None, maximum=MAX_BATCH_INTERVAL.total_seconds()),
            "pgq_batch_collect_interval", r.interval("pgq_batch_collect_interval"),
        ),
        table_filter=r.table_filter(),
        keep_lag=r.interval("pgq_keep_lag"),
        batch_target_events=r.count("batch_target_events") or DEFAULT_BATCH_TARGET_EVENTS,
        batch_target_seconds=r.seconds("batch_target_seconds", None) or DEFAULT_BATCH_TARGET_SECONDS,
        force_tick=r.boolean("force_tick"),
        run_ticker=r.boolean("run_ticker"),
        keep_event_id=r.boolean("keep_event_id"),
        register_consumer=r.boolean("register_consumer"),
        install_pgq_ext=r.boolean("install_pgq_ext"),
        **_timeout_keys(r),
        unknown_keys=tuple(sorted(own_keys - KNOWN_KEYS - IGNORED_CLASSIC_KEYS - BUILTIN_KEYS)),
        ignored_keys=tuple(sorted(own_keys & IGNORED_CLASSIC_KEYS)),
    )
    if config.run_ticker and not config.force_tick:
        raise r.error("run_ticker", "only has a meaning together with force_tick = true")
    try:  # the core's own checks, reported against the file
        config.options()
        config.bounds()
        config.timeouts()
    except InvalidParameter as exc:
        raise ConfigError(f"{file}: section [{section}]: {exc}") from None
    return config


_INTERVAL_UNITS = {
    "microsecond": 1e-6, "microseconds": 1e-6, "us": 1e-6, "usec": 1e-6, "usecs": 1e-6,
    "millisecond": 1e-3, "milliseconds": 1e-3, "ms": 1e-3, "msec": 1e-3, "msecs": 1e-3,
    "second": 1.0, "seconds": 1.0, "s": 1.0, "sec": 1.0, "secs": 1.0,
    "minute": 60.0, "minutes": 60.0, "m": 60.0, "min": 60.0, "mins": 60.0,
    "hour": 3600.0, "hours": 3600.0, "h": 3600.0, "hr": 3600.0, "hrs": 3600.0,
    "day": 86400.0, "days": 86400.0, "d": 86400.0,
    "week": 604800.0, "weeks": 604800.0, "w": 604800.0,
}
_INTERVAL_PART = re.compile(r"([+-]?\d+(?:\.\d*)?|[+-]?\.\d+)\s*([a-z]*)")
_INTERVAL_CLOCK = re.compile(r"([+-])?(\d+):(\d{1,2})(?::(\d{1,2}(?:\.\d*)?))?")


def parse_interval(text: str) -> float:
    """Seconds of a PostgreSQL interval in the forms skytools configs use: '300' (seconds),
    '5 minutes', '1 hour 30 mins', '1d', '@ 2 hours', '00:05:00', '1 day 02:00'.
    Months and years are refused (their length depends on the date)."""
    rest = text.strip().lower().removeprefix("@").strip()
    if not rest:
        raise ValueError("empty")
    total = 0.0
    clock = re.search(r"[+-]?\d+:\d{1,2}(?::\d{1,2}(?:\.\d*)?)?$", rest)
    if clock:
        m = _INTERVAL_CLOCK.fullmatch(clock.group(0))
        assert m is not None
        sign = -1.0 if m.group(1) == "-" else 1.0
        total += sign * (int(m.group(2)) * 3600 + int(m.group(3)) * 60 + float(m.group(4) or 0))
        rest = rest[: clock.start()].strip()
    pos = 0
    while pos < len(rest):
        m = _INTERVAL_PART.match(rest, pos)
        if m is None:
            raise ValueError(f"cannot read {rest[pos:]!r}; write e.g. '5 minutes' or '00:05:00'")
        number, unit = float(m.group(1)), m.group(2)
        if unit in ("mon", "mons", "month", "months", "y", "year", "years"):
            raise ValueError("months and years have no fixed length: give days")
        if unit == "" and not clock and m.end() >= len(rest.rstrip()) and pos == 0:
            unit = "s"  # a bare number: seconds, as PostgreSQL reads '300'::interval
        if unit not in _INTERVAL_UNITS:
            raise ValueError(f"unknown unit {unit or '(none)'!r}")
        total += number * _INTERVAL_UNITS[unit]
        pos = m.end()
        while pos < len(rest) and rest[pos] in " ,\t":
            pos += 1
    if not math.isfinite(total) or total < 0:
        raise ValueError("must be a finite interval of zero or more")
    return total


def _alias(r: _Reader, ours: str, our_value: T | None, classic: str, classic_value: T | None) -> T | None:
    """Our key and skytools' name for the same setting: either one, not two values."""
    if our_value is not None and classic_value is not None and our_value != classic_value:
        raise r.error(classic, f"sets what {ours!r} sets, to another value: keep one of the two")
    return our_value if our_value is not None else classic_value


def _timeout_keys(r: _Reader) -> dict[str, float]:
    """connect_timeout and network_timeout (> 0), statement_timeout and lock_timeout
    (0: no bound), with guard.Timeouts' defaults."""
    out: dict[str, float] = {}
    for key in ("connect_timeout", "network_timeout", "statement_timeout", "lock_timeout"):
        value = r.seconds(key, getattr(Timeouts, key), allow_zero=key in ("statement_timeout", "lock_timeout"))
        assert value is not None
        out[key] = value
    return out


_SAMPLE_INI = """\
; pgq-queue-mover: moves the events of a PgQ queue into a queue of another database,
; exactly once. Uncomment and edit; docs/cli.md explains every key.

; -- required --------------------------------------------------------------------
src_db = dbname=sourcedb
dst_db = dbname=targetdb
pgq_queue_name = source_queue
dst_queue_name = target_queue

; -- the job -----------------------------------------------------------------------
; job_name defaults to the config file's name without extension
;job_name = queue_mover
;pgq_consumer_id = %(job_name)s
;subconsumer =
;pidfile = ~/pid/%(job_name)s.pid
;logfile = ~/log/%(job_name)s.log

; > 0: seconds to sleep when idle; 0: move what there is, then exit; < 0: one batch, then exit
;loop_delay = 1.0
;connection_lifetime = 1200
;exception_sleep = 1.0

; -- what moves --------------------------------------------------------------------
; only events whose ev_extra1 names one of these tables (no schema: public)
;table_filter = public.orders, public.users
; stay this far behind the source (a PostgreSQL interval)
;pgq_keep_lag = 5 minutes
;keep_event_id = false

; -- batch size ----------------------------------------------------------------------
;min_batch_events =
;min_batch_interval =
; catching up, pending ticks become batches of about this many events and seconds
; (1: one tick a batch, as the classic tool)
;batch_target_events = 200000
;batch_target_seconds = 10
;max_batches =
;max_events =
;max_runtime =

; -- ticks and setup -----------------------------------------------------------------
;force_tick = false
;run_ticker = false
;register_consumer = false
;install_pgq_ext = false

; -- network bounds (seconds) --------------------------------------------------------
;connect_timeout = {connect_timeout:g}
;network_timeout = {network_timeout:g}
;statement_timeout = {statement_timeout:g}
;lock_timeout = {lock_timeout:g}
"""


def sample_ini(section: str = "queue_mover", overrides: Mapping[str, str] | None = None) -> str:
    """A commented sample config (the CLI's --ini); keys given with --set appear set."""
    body = _SAMPLE_INI.format(
        connect_timeout=Timeouts.connect_timeout, network_timeout=Timeouts.network_timeout,
        statement_timeout=Timeouts.statement_timeout, lock_timeout=Timeouts.lock_timeout,
    )
    wanted = dict(overrides or {})
    lines = []
    for line in body.splitlines():
        key = line.lstrip(";").split("=", 1)[0].strip() if "=" in line and not line.startswith("; ") else ""
        if key in wanted:
            lines.append(f"{key} = {wanted.pop(key)}")
        else:
            lines.append(line)
    lines += [f"{key} = {value}" for key, value in wanted.items()]
    return f"[{section}]\n" + "\n".join(lines) + "\n"
