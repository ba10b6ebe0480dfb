"""What every part of the CLI shares: the exit codes, its errors, its logger, one-line failures."""

from __future__ import annotations

import logging
import sys

from airflow_provider_pgq.cli.config import IGNORED_KEY_NOTES, MoverConfig
from airflow_provider_pgq.cli.logs import Logs
from airflow_provider_pgq.core.connect import redact
from airflow_provider_pgq.core.errors import PgqError

PROG = "pgq-queue-mover"
EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2

#: One logger for the whole CLI, named so even under -m (where a module is "__main__").
log = logging.getLogger("airflow_provider_pgq.cli")


class UsageError(Exception):
    """Switches or config that cannot work together (exit 2)."""


class AlreadyRunning(PgqError):
    """The pidfile names a live process (exit 1)."""


class Terminated(BaseException):
    """SIGTERM (or a second SIGINT): leave now. BaseException, so nothing swallows it."""


class StopAfterBatch(BaseException):
    """Raised between batches after SIGINT: the batch before it is complete."""


def one_line(text: str) -> str:
    """Errors go out as one line: a log line or stderr line each."""
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def fail(message: str, code: int, logs: Logs | None = None) -> int:
    """One line on stderr (and in the logfile, when there is one); returns code."""
    line = redact(one_line(message))
    if logs is not None and logs.to_file:
        log.error("%s", line)
    try:
        print(f"{PROG}: error: {line}", file=sys.stderr)
    except OSError:
        pass
    return code


def note_config(config: MoverConfig) -> None:
    """Keys that are read but do nothing: said at start and after each reload."""
    for key in config.unknown_keys:
        log.warning("%s: section [%s]: unknown key %r ignored (a typo?)", config.path, config.section, key)
    for key in config.ignored_keys:
        note = IGNORED_KEY_NOTES.get(key, "")
        log.info("%s: classic key %r has no effect here and is ignored%s", config.path, key,
                 f": {note}" if note else "")
