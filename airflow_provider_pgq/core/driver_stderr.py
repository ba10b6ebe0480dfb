"""What psycopg2 prints instead of raising, kept off stderr.

When a connection ends under a COPY in some ways (a pooler closing it mid-COPY),
psycopg2's pq_raise prints the server's error, "psycopg2.errors.X: <the server's
words>", and then a SystemError about its own decode call (PyErr_Print), and raises
only a bare "invalid socket". While a COPY runs, sys.stderr passes through the filter
below: those lines are kept for the ConnectionLost message (guard.py), every other
line goes on unchanged, in order.
"""

from __future__ import annotations

import re
import sys
import threading
from typing import Any


class _DriverStderr:
    """sys.stderr while at least one COPY runs (entered by each, process-wide)."""

    _DRIVER_LINE = re.compile(r"^(psycopg2(\.errors|\.extensions)?\.\w+): (.*)$")
    _NOISE = re.compile(
        r"^(SystemError: <(built-in )?function \w+ at 0x[0-9a-f]+> returned .*"
        r"|The above exception was the direct cause of the following exception:|)$"
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._inner: Any = None
        self._pending = ""
        self.words: list[str] = []

    def __enter__(self) -> _DriverStderr:
        with self._lock:
            if self._users == 0:
                self._inner = sys.stderr
                sys.stderr = self
            self._users += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                if sys.stderr is self:
                    sys.stderr = self._inner
                if self._pending:
                    self._inner.write(self._pending)
                self._pending = ""

    def take(self) -> str | None:
        with self._lock:
            words, self.words = self.words, []
        return words[-1] if words else None

    def write(self, text: str) -> int:
        with self._lock:
            lines = (self._pending + text).split("\n")
            self._pending = lines.pop()
            for line in lines:
                driver = self._DRIVER_LINE.match(line)
                if driver:
                    self.words.append(driver.group(3))
                elif not self._NOISE.match(line):
                    self._inner.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        inner = self._inner
        if inner is not None:
            inner.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


DRIVER_STDERR = _DriverStderr()
