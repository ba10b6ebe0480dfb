"""The file and its section: parsed, overridden (--set), turned into a MoverConfig."""

from __future__ import annotations

import configparser
import os
import socket
from collections.abc import Mapping
from pathlib import Path

from airflow_provider_pgq.cli.config.model import (
    BUILTIN_KEYS,
    DEFAULT_CONNECTION_LIFETIME,
    IGNORED_CLASSIC_KEYS,
    KNOWN_KEYS,
    REQUIRED_KEYS,
    ConfigError,
    MoverConfig,
)
from airflow_provider_pgq.cli.config.reader import Reader, alias, timeout_keys
from airflow_provider_pgq.core.errors import InvalidParameter
from airflow_provider_pgq.core.mover import (
    DEFAULT_BATCH_TARGET_EVENTS,
    DEFAULT_BATCH_TARGET_SECONDS,
    MAX_BATCH_INTERVAL,
    MAX_MIN_BATCH_EVENTS,
    REGISTER_AT,
)
from airflow_provider_pgq.core.poison import INVALID_EVENTS, STOP


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

    r = Reader(parser, file, section)
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
        min_batch_events=alias(
            r, "min_batch_events", r.count("min_batch_events", maximum=MAX_MIN_BATCH_EVENTS),  # PgQ's int4
            "pgq_batch_collect_events", r.count("pgq_batch_collect_events", maximum=MAX_MIN_BATCH_EVENTS,
                                                zero_is_none=True),
        ),
        min_batch_interval=alias(
            r, "min_batch_interval",
            r.seconds("min_batch_interval", None, maximum=MAX_BATCH_INTERVAL.total_seconds()),
            "pgq_batch_collect_interval", r.interval("pgq_batch_collect_interval"),
        ),
        table_filter=r.table_filter(),
        keep_lag=r.interval("pgq_keep_lag"),
        batch_target_events=r.count("batch_target_events") or DEFAULT_BATCH_TARGET_EVENTS,
        batch_target_seconds=r.seconds("batch_target_seconds", None) or DEFAULT_BATCH_TARGET_SECONDS,
        max_events_per_second=r.rate("max_events_per_second"),
        force_tick=r.boolean("force_tick"),
        run_ticker=r.boolean("run_ticker"),
        keep_event_id=r.boolean("keep_event_id"),
        register_consumer=r.boolean("register_consumer"),
        register_at=r.choice("register_at", REGISTER_AT, "now"),
        install_pgq_ext=r.boolean("install_pgq_ext"),
        invalid_events=r.choice("invalid_events", INVALID_EVENTS, STOP),
        **timeout_keys(r),
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
