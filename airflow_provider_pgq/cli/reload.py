"""SIGHUP: reread the config at a loop boundary; a file that cannot be used changes nothing."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from airflow_provider_pgq.cli.common import log, note_config
from airflow_provider_pgq.cli.config import SECRET_KEYS, ConfigError, MoverConfig, load_config
from airflow_provider_pgq.cli.logs import Logs
from airflow_provider_pgq.cli.secrets import warn_readable_ini
from airflow_provider_pgq.core.connect import connection_parameters
from airflow_provider_pgq.core.errors import ConnectionFailed


def reread(old: MoverConfig, logs: Logs, base_dir: Path, overrides: Mapping[str, str]) -> MoverConfig | None:
    """The config to run with from now on (the pidfile kept: it changes at the next
    start), or None when the new file cannot be used and the running config stays."""
    try:
        new = load_config(old.path, old.section, base_dir=base_dir, overrides=overrides)
    except ConfigError as exc:
        log.error("reload failed, keeping the running config: %s", exc)
        return None
    for key in ("src_db", "dst_db"):  # checked now: once taken, a broken one fails every loop
        try:
            connection_parameters(getattr(new, key))
        except ConnectionFailed as exc:
            log.error("reload failed, keeping the running config: %s: %s", key, exc)
            return None
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
        logs.configure(new.logfile)  # also reopens the logfile after a logrotate
    except OSError as exc:
        log.error("reload: cannot open logfile %s (%s): keeping the running config", new.logfile, exc.strerror)
        return None
    if new.pidfile != old.pidfile:
        log.warning("pidfile changed in the config: takes effect at the next start")
    log.info("config reloaded: %s", ", ".join(changes) if changes else "no changes")
    note_config(new)
    warn_readable_ini(new, overrides)
    return dataclasses.replace(new, pidfile=old.pidfile)


def needs_reconnect(old: MoverConfig, new: MoverConfig) -> bool:
    """Whether the open connections and mover no longer fit the reloaded config."""
    return old.options() != new.options() or (old.src_db, old.dst_db, old.job_name) != (
        new.src_db, new.dst_db, new.job_name
    )


def _fmt_plain(value: Any) -> str:
    return "-" if value is None else str(value)
