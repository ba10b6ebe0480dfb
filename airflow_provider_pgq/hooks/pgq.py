"""PgqHook: psycopg2 connections from Airflow connections, and the core's queue operations.

Why a ``BaseHook`` and not a ``PostgresHook`` subclass (composition, decided in issue 13):
the core speaks psycopg2, while providers-postgres 7.x builds psycopg 3 connections
under Airflow 3. A subclass that overrides ``get_conn`` to return psycopg2 inherits a
surface that quietly breaks: ``copy_expert``, ``insert_rows``, ``get_df`` and
``get_sqlalchemy_engine`` assume the driver PostgresHook chose, and its IAM / Entra ID
token handling lives in its own connect path, so IAM extras were silently dropped and
the login failed with a bare password error. Making every inherited method work would
mean re-implementing PostgresHook for psycopg2 and chasing each of its releases. So
this hook inherits nothing it cannot honour: it reads the Airflow Connection (types
``pgq`` and ``postgres``; the same URI works for both), builds psycopg2 connections
itself and exposes the PgQ operations of the core. For plain SQL on the same database
use ``PostgresHook(postgres_conn_id=...)`` with the same connection id. IAM / Entra
token logins (``iam`` extra) are refused with a clear error instead of being dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from airflow.sdk import BaseHook
from psycopg2.extensions import connection as Psycopg2Connection

from airflow_provider_pgq.core import pgq, pgq_ext, poison, registration
from airflow_provider_pgq.core.connect import connect
from airflow_provider_pgq.core.errors import ConnectionFailed, InvalidParameter
from airflow_provider_pgq.core.guard import Timeouts
from airflow_provider_pgq.core.mover import MoverOptions, QueueMover
from airflow_provider_pgq.core.pending import MoverStatus, PendingStatus, pending_status

_CANNOT_CONNECT = "cannot connect to "

#: Connection types this hook reads: its own, and PostgresHook's (``postgresql://`` URIs).
CONN_TYPES = ("pgq", "postgres")

#: Extras that configure Airflow's SQL hooks, not libpq: never passed to psycopg2.
AIRFLOW_ONLY_EXTRAS = frozenset({
    "iam", "redshift", "redshift-serverless", "cluster-identifier", "workgroup-name", "aws_conn_id",
    "azure_conn_id", "cursor", "sqlalchemy_scheme", "sqlalchemy_query", "enable_log_db_messages",
    "log_sql", "placeholder", "escape_column_names", "escape_word_format", "insert_statement_format",
    "replace_statement_format",
})

_FALSE = ("", "0", "false", "no", "off", "none")


class UnsupportedConnection(InvalidParameter):
    """An Airflow connection this hook cannot use as given (wrong type, IAM login)."""


def connection_error(conn_id: str, message: str) -> str:
    """The core's connect error, led by the Airflow connection id it came through:
    ``Airflow connection 'pgq_oltp' (host:port/db as user): <libpq's reason>; <what to check>``."""
    where, reason = "", message
    if message.startswith(_CANNOT_CONNECT) and ": " in message:
        where, reason = message[len(_CANNOT_CONNECT):].split(": ", 1)
    lead = f"Airflow connection {conn_id!r}" + (f" ({where})" if where else "")
    return (f"{lead}: {' '.join(reason.split())}; check that connection's host, port, login, password, schema"
            f" (the database) and extras, e.g. with 'airflow connections get {conn_id}'")


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() not in _FALSE if value is not None else False


class PgqHook(BaseHook):
    """Talks to a database with PgQ through an Airflow connection (type ``pgq`` or ``postgres``).

    Builds psycopg2 connections, autocommit off, from the Connection's host, port,
    login, password, schema (the database; ``database=`` overrides it) and extras
    (sslmode and any other libpq keyword; Airflow's own SQL-hook extras are left out).
    It writes no SQL of its own: it calls the core. See the module docstring for why it
    is not a PostgresHook.

    :param pgq_conn_id: the Airflow connection id (default ``pgq_default``).
    :param connection: an already fetched Connection (the triggers look it up asynchronously).
    :param database: a database name that overrides the connection's schema.
    :param application_name: ``application_name`` of the sessions, shown in pg_stat_activity.
    :param timeouts: bounds of every network wait (core.guard); the connection's extras
        (connect_timeout, keepalives_idle, tcp_user_timeout, options=-c ...) win.
    """

    conn_name_attr = "pgq_conn_id"
    default_conn_name = "pgq_default"
    conn_type = "pgq"
    hook_name = "PgQ"

    def __init__(
        self, pgq_conn_id: str = default_conn_name, *, connection: Any = None, database: str | None = None,
        application_name: str = "airflow-pgq", timeouts: Timeouts | None = None,
    ) -> None:
        super().__init__()
        self.pgq_conn_id = pgq_conn_id
        self.database = database
        self.application_name = application_name
        self.timeouts = timeouts
        self._connection = connection

    @property
    def conn_id(self) -> str:
        return str(self.pgq_conn_id)

    @property
    def connection(self) -> Any:
        """The Airflow Connection, fetched once."""
        if self._connection is None:
            self._connection = self.get_connection(self.conn_id)
        return self._connection

    def connect_parameters(self) -> dict[str, str]:
        """libpq keywords from the Airflow Connection; UnsupportedConnection for a
        connection type this hook does not read, or an IAM token login."""
        c = self.connection
        if c.conn_type not in CONN_TYPES:
            raise UnsupportedConnection(
                f"Airflow connection {self.conn_id!r} is of type {c.conn_type!r}: PgqHook reads connections of"
                f" type {' or '.join(map(repr, CONN_TYPES))} (e.g. postgresql://user@host:5432/db)"
            )
        extras = c.extra_dejson
        if _truthy(extras.get("iam")):
            raise UnsupportedConnection(
                f"Airflow connection {self.conn_id!r} asks for an IAM / Entra ID token login (extra 'iam'):"
                " PgqHook opens psycopg2 connections with the connection's own password and does not fetch"
                " cloud tokens. Give the connection a password (or a .pgpass / PGPASSFILE entry) and"
                " remove the 'iam' extra"
            )
        args: dict[str, str] = {}
        for key, value in (("host", c.host), ("port", c.port), ("user", c.login),
                           ("password", c.password), ("dbname", self.database or c.schema)):
            if value not in (None, ""):
                args[key] = str(value)
        for key, value in extras.items():
            if key not in AIRFLOW_ONLY_EXTRAS and value is not None:
                args[key] = str(value)
        return args

    def get_conn(self) -> Psycopg2Connection:
        """A new psycopg2 connection, autocommit off; the caller closes it.

        A failure names the Airflow connection id beside the server it resolved to:
        the server alone does not tell which of many connections holds the wrong field.
        """
        args = self.connect_parameters()
        try:
            return connect("", self.application_name, self.timeouts, f"Airflow connection {self.conn_id!r}", **args)
        except ConnectionFailed as exc:
            raise ConnectionFailed(connection_error(self.conn_id, str(exc))) from None

    def test_connection(self) -> tuple[bool, str]:
        """The UI's "Test" button: logs in and tells whether PgQ is installed there."""
        try:
            with self.psycopg2_connection() as conn:
                version = pgq.version(conn)
        except Exception as exc:  # noqa: BLE001 - the UI shows the message, whatever it is
            return False, " ".join(str(exc).split())
        return True, f"connected; pgq {version}" if version else "connected; the pgq extension is not installed there"

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

    def register_consumer(self, queue: str, consumer: str, register_at: str = "now") -> bool:
        """True when newly registered, False when it already was (see core/registration.py)."""
        with self.psycopg2_connection() as conn:
            return registration.register(conn, queue, consumer, register_at)

    def get_queue_info(self, queue: str) -> pgq.QueueInfo:
        with self.psycopg2_connection() as conn:
            return pgq.get_queue_info(conn, queue)

    def get_consumer_info(self, queue: str, consumer: str) -> pgq.ConsumerInfo | None:
        with self.psycopg2_connection() as conn:
            return pgq.get_consumer_info(conn, queue, consumer)

    def get_lag(self, queue_name: str, consumer_name: str) -> PendingStatus:
        """The consumer's position, lag (seconds) and pending events (an estimate): the
        same status the sensor and the triggers read (``.to_dict()`` for XCom).
        ``registered=False`` for a consumer that is not subscribed; QueueNotFound when
        the queue does not exist."""
        with self.psycopg2_connection() as conn:
            try:
                return pending_status(conn, queue_name, consumer_name)
            finally:
                conn.rollback()

    def count_events(self, queue: str) -> int:
        """Rows in the queue's event tables (all three rotations)."""
        with self.psycopg2_connection() as conn:
            return pgq.count_queue_events(conn, queue)

    def install_pgq_ext(self) -> pgq_ext.InstallReport:
        """Installs or upgrades pgq_ext (and the pgq_mover role); says what it changed."""
        with self.psycopg2_connection() as conn:
            return pgq_ext.install(conn)

    # -- dead letters (this hook is the target) --------------------------------

    def list_dead_letters(self, consumer: str, subconsumer: str = "",
                          include_replayed: bool = False) -> list[poison.DeadLetter]:
        """The events the target refused for the key (invalid_events = dead_letter), as
        the source stored them (bytes); those replayed already only with include_replayed.
        Needs a pgq_mover login of the key's owner (or an admin): another team's is refused."""
        with self.psycopg2_connection() as conn:
            try:
                return poison.list_dead_letters(conn, consumer, subconsumer, include_replayed)
            finally:
                conn.rollback()

    def replay_dead_letters(self, consumer: str, subconsumer: str = "", dl_ids: list[int] | None = None,
                            from_encoding: str | None = None) -> int:
        """Puts the key's dead letters (all waiting, or those of dl_ids) into their target
        queue with their times, each once (marked replayed in the same transaction), read
        as from_encoding (e.g. "LATIN1"; None: the source database's encoding). A byte
        sequence the target still refuses fails the call and replays nothing. Returns
        how many were replayed."""
        with self.psycopg2_connection() as conn:
            return poison.replay(conn, consumer, subconsumer, dl_ids, from_encoding)

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

    def status(self, target: PgqHook, options: MoverOptions) -> MoverStatus:
        """The mover's status: its source consumer's PendingStatus plus the target's mark."""
        with self.psycopg2_connection() as s, target.psycopg2_connection() as t:
            return self._mover(s, t, options).status()
