"""Source and target connections of one CLI run: opened on first use, recycled by age."""

from __future__ import annotations

import time

import psycopg2
from psycopg2.extensions import connection as Connection

from airflow_provider_pgq.cli.config import MoverConfig
from airflow_provider_pgq.core.connect import connect, connect_unsettled
from airflow_provider_pgq.core.errors import ConnectionFailed

# -- connections ----------------------------------------------------------------


class Connections:
    """Source and target connections, opened on first use, with their age."""

    def __init__(self, config: MoverConfig, settle: bool = True) -> None:
        """settle=False: for a mover, whose checks (prepare) settle the connections in
        their first read (core.connect.connect): a round trip less on each side."""
        self.config = config
        self.settle = settle
        self._source: Connection | None = None
        self._target: Connection | None = None
        self.opened = time.monotonic()

    def _open(self, key: str, dsn: str) -> Connection:
        try:
            conn = (connect if self.settle else connect_unsettled)(
                dsn, application_name=self.config.job_name, timeouts=self.config.timeouts(),
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

