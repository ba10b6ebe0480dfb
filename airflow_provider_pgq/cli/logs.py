"""The CLI's logging: one handler (logfile or stderr), passwords redacted, repeats once."""

from __future__ import annotations

import errno
import logging
import logging.handlers
import os
import sys
from pathlib import Path

from airflow_provider_pgq.core.connect import redact


class RedactFilter(logging.Filter):
    """Last line of defence: no password leaves through a log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True


class CoreOnceFilter(logging.Filter):
    """The package's one "say it once" mechanism. The core logs what it does at INFO
    each time (an Airflow task drains once, so there each line is said once); only this
    loop repeats them ("moving a -> b", "cut tick" every drain). Without -v each kind
    (the unformatted message) is shown once per process, reconnects included; at -v all."""

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


class NoFollowFileHandler(logging.handlers.WatchedFileHandler):
    """The logfile, opened (and reopened after a logrotate) with O_NOFOLLOW: a symlink
    planted where the logfile goes (a directory others may write, as /tmp) is refused,
    never written through. Created with mode 0640 (less where the umask says so)."""

    def _open(self):  # type: ignore[no-untyped-def]  # logging's own signature
        path = self.baseFilename
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OSError(exc.errno, "is a symbolic link: a logfile is never written through a link"
                              " (remove it, or keep the logfile in a directory only the mover's user may"
                              " write)", path) from None
            raise
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


class Logs:
    """The one handler of the package's loggers: the logfile, or stderr without one."""

    FORMAT = "%(asctime)s %(process)d %(levelname)s %(message)s"

    def __init__(self, level: int) -> None:
        self.level = level
        self.logger = logging.getLogger("airflow_provider_pgq")
        self.handler: logging.Handler | None = None
        self.logfile: Path | None = None
        self.once = CoreOnceFilter()

    @property
    def to_file(self) -> bool:
        return self.logfile is not None

    def configure(self, logfile: Path | None) -> None:
        """(Re)opens the log target; also what SIGHUP does after a logrotate."""
        handler: logging.Handler
        if logfile is not None:
            logfile.parent.mkdir(parents=True, exist_ok=True)
            handler = NoFollowFileHandler(logfile, encoding="utf-8")
        else:
            handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(self.FORMAT))
        if self.level > logging.DEBUG:
            handler.addFilter(self.once)  # before redaction: it keys on the unformatted message
        handler.addFilter(RedactFilter())
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

