"""PgqHook: psycopg2 connections from Airflow connections, and the core's queue operations."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from airflow.providers.postgres.hooks.postgres import PostgresHook
from psycopg2.extensions import connection as Psycopg2Connection

from airflow_provider_pgq.core import pgq, pgq_ext
from airflow_provider_pgq.core.connect import connect
from airflow_provider_pgq.core.errors import ConnectionFailed
from airflow_provider_pgq.core.guard import Timeouts
from airflow_provider_pgq.core.mover import MoverOptions, QueueMover

_CANNOT_CONNECT = "cannot connect to "


def connection_error(conn_id: str, message: str) -> str:
    """The core's connect error, led by the Airflow connection id it came through:
    ``Airflow connection 'pgq_oltp' (host:port/db as user): <libpq's reason>; <what to check>``."""
    where, reason = "", message
    if message.startswith(_CANNOT_CONNECT) and ": " in message:
        where, reason = message[len(_CANNOT_CONNECT):].split(": ", 1)
    lead = f"Airflow connection {conn_id!r}" + (f" ({where})" if where else "")
    return (f"{lead}: {' '.join(reason.split())}; check that connection's host, port, login, password, schema"
            f" (the database) and extras, e.g. with 'airflow connections get {conn_id}'")


class PgqHook(PostgresHook):
    """Talks to a database with PgQ through an Airflow connection (type ``pgq`` or ``postgres``).

    PostgresHook's own ``get_conn`` answers psycopg 3 under Airflow 3; the move core
    speaks psycopg2, so this hook builds psycopg2 connections from the same
    Connection fields (host, port, login, password, schema as database, extras such
    as sslmode), autocommit off. It writes no SQL of its own: it calls the core.
    """

    conn_name_attr = "pgq_conn_id"
    default_conn_name = "pgq_default"
    conn_type = "pgq"
    hook_name = "PgQ"

    def __init__(
        self, *args: Any, application_name: str = "airflow-pgq", timeouts: Timeouts | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.application_name = application_name
        #: Bounds of every network wait (core.guard); the connection's extras
        #: (connect_timeout, keepalives_idle, tcp_user_timeout, options=-c ...) win.
        self.timeouts = timeouts

    @property
    def conn_id(self) -> str:
        return str(getattr(self, self.conn_name_attr))

    def get_conn(self) -> Psycopg2Connection:
        """A new psycopg2 connection, autocommit off; the caller closes it.

        A failure names the Airflow connection id beside the server it resolved to:
        the server alone does not tell which of many connections holds the wrong field.
        """
        c = self.connection
        args: dict[str, str] = {}
        for key, value in (("host", c.host), ("port", c.port), ("user", c.login),
                           ("password", c.password), ("dbname", self.database or c.schema)):
            if value not in (None, ""):
                args[key] = str(value)
        for key, value in c.extra_dejson.items():
            if key not in self.ignored_extra_options and value is not None:
                args[key] = str(value)
        try:
            return connect("", self.application_name, self.timeouts, f"Airflow connection {self.conn_id!r}", **args)
        except ConnectionFailed as exc:
            raise ConnectionFailed(connection_error(self.conn_id, str(exc))) from None

    @contextmanager
    def psycopg2_connection(self) -> Iterator[Psycopg2Connection]:
        conn = self.get_conn()
        try:
            yield conn
        finally:
            conn.close()

    # -- queue administration -------------------------------------------------

    def create_queue(self, queue: str) -> bool:
        """True when created, False when it already existed."""
        with self.psycopg2_connection() as conn:
            created = pgq.create_queue(conn, queue)
            conn.commit()
        return created

    def register_consumer(self, queue: str, consumer: str) -> bool:
        """True when newly registered, False when it already was."""
        with self.psycopg2_connection() as conn:
            done = pgq.register_consumer(conn, queue, consumer)
            conn.commit()
        return done

    def get_queue_info(self, queue: str) -> pgq.QueueInfo:
        with self.psycopg2_connection() as conn:
            return pgq.get_queue_info(conn, queue)

    def get_consumer_info(self, queue: str, consumer: str) -> pgq.ConsumerInfo | None:
        with self.psycopg2_connection() as conn:
            return pgq.get_consumer_info(conn, queue, consumer)

    def get_lag(self, queue: str, consumer: str) -> dict[str, Any]:
        """The consumer's lag (seconds) and pending events (an estimate), for sensors and dashboards."""
        info = self.get_consumer_info(queue, consumer)
        if info is None:
            return {"registered": False, "lag_seconds": None, "pending_events": None}
        return {
            "registered": True,
            "lag_seconds": info.lag.total_seconds() if info.lag is not None else None,
            "pending_events": info.pending_events,
        }

    def count_events(self, queue: str) -> int:
        """Rows in the queue's event tables (all three rotations)."""
        with self.psycopg2_connection() as conn:
            return pgq.count_queue_events(conn, queue)

    def install_pgq_ext(self) -> pgq_ext.InstallReport:
        """Installs or upgrades pgq_ext (and the pgq_mover role); says what it changed."""
        with self.psycopg2_connection() as conn:
            return pgq_ext.install(conn)

    # -- repositioning (this hook is the source; target is the other side) ----

    def _mover(self, source: Psycopg2Connection, target: Psycopg2Connection, options: MoverOptions) -> QueueMover:
        return QueueMover(source, target, options)

    def rewind(self, target: PgqHook, options: MoverOptions) -> int:
        """Re-registers the source consumer at the target's mark; returns the tick."""
        with self.psycopg2_connection() as s, target.psycopg2_connection() as t:
            return self._mover(s, t, options).rewind()

    def reset(self, target: PgqHook, options: MoverOptions) -> int | None:
        """Clears the target's mark and source binding for the key; returns the old mark."""
        with self.psycopg2_connection() as s, target.psycopg2_connection() as t:
            return self._mover(s, t, options).reset()

    def status(self, target: PgqHook, options: MoverOptions) -> dict[str, Any]:
        with self.psycopg2_connection() as s, target.psycopg2_connection() as t:
            return self._mover(s, t, options).status()
