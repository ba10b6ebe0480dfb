"""Errors of the move core: each names the object at fault and what to do next."""

from __future__ import annotations

import psycopg2


def literal(value: str) -> str:
    """value as an SQL string literal, for the statements error messages suggest
    (text for a human to run; never executed by us)."""
    return "'" + value.replace("'", "''") + "'"


class PgqError(Exception):
    """Base of every error the core raises on purpose."""


class InvalidParameter(PgqError, ValueError):
    """A parameter value the mover cannot work with (negative bound, empty name...)."""


class ConnectionFailed(PgqError):
    """A database could not be reached or refused the login (password never shown)."""


class PgqNotInstalled(PgqError):
    """The pgq extension is missing in a database."""


class QueueNotFound(PgqError):
    """A named queue does not exist."""


class QueueDisabled(PgqError):
    """The target queue refuses inserts (queue_disable_insert)."""


class ConsumerNotRegistered(PgqError):
    """The mover's consumer is not registered on the source queue."""


class PgqExtMissing(PgqError):
    """pgq_ext is missing on the target, or older than the mover needs."""


class PgqExtUntrusted(PgqError):
    """pgq_ext (or the mover role) is controlled by a role we do not trust: never adopted."""


class KeyNotOwned(PgqError):
    """The tracking key (or its consumer name) belongs to another role on the target:
    only its owner, its members or an admin may write it (pgq_ext.assign_key)."""


class EventTablesUntrusted(PgqError):
    """The target queue's event tables are not as PgQ makes them (another owner, another
    schema, triggers or rules): code of whoever made them so would run as the writer."""


class TickNotFound(PgqError):
    """A tick the consumer should be moved to is gone (rotated away)."""


class PositionMismatch(PgqError):
    """The target's mark and the source consumer's position disagree."""


class TrackingKeyConflict(PgqError):
    """The tracking key already belongs to another source."""


class TickerNotRunning(PgqError):
    """force_tick asked for a tick that no ticker produced in time."""


class KeptIdConflict(PgqError):
    """keep_event_id, but the target queue has another writer: its ids could collide."""


class WaitTimeout(PgqError):
    """A network wait outlived its bound (connect, statement, lock, a COPY that moved no
    bytes): names the side, the server and what timed out. Nothing was committed by the
    statement that timed out; the caller's rollbacks keep the batch all-or-nothing."""

    def __init__(self, message: str, side: str = "", server: str = "", what: str = "") -> None:
        super().__init__(message)
        self.side = side
        self.server = server
        self.what = what


class KeyLocked(WaitTimeout):
    """The tracking key's lock on the target was not granted within lock_timeout: the
    message names the session holding it (pid, application, client, state, wait event,
    how long), so that one left behind by a vanished mover can be told from a live one
    and ended (pg_terminate_backend)."""

    def __init__(self, message: str, side: str = "", server: str = "", what: str = "",
                 holder_pid: int | None = None) -> None:
        super().__init__(message, side, server, what)
        self.holder_pid = holder_pid


class ConnectionLost(PgqError, psycopg2.OperationalError):
    """A connection ended under a statement: the server or a pooler in front of it
    (PgBouncer's KILL, RECONNECT or a restart, a terminated backend, a server restart)
    closed it. Names the side, the server as configured (a pooler's address when one is
    in front) and what was running. Still a psycopg2.OperationalError, so every handler
    that retries a lost connection keeps doing so."""

    def __init__(self, message: str, side: str = "", server: str = "", what: str = "") -> None:
        super().__init__(message)
        self.side = side
        self.server = server
        self.what = what


class WaitAborted(PgqError):
    """A network wait was cut short on purpose (SIGTERM, Airflow's on_kill, a task
    timeout): the connection is closed, the open transaction rolled back by the server."""


class InvalidEvents(PgqError):
    """A side refused events of a batch for their content (an encoding error, say), and
    invalid_events is "stop": nothing of the batch was committed. Names the side, the
    queues, the consumer, the events' ids and the batch's ticks; invalid_events =
    dead_letter moves the rest and keeps the refused events on the target."""

    def __init__(self, message: str, side: str = "target", ev_ids: tuple[int, ...] = (),
                 sqlstate: str = "", prev_tick: int | None = None, cur_tick: int | None = None) -> None:
        super().__init__(message)
        self.side = side
        self.ev_ids = ev_ids
        self.sqlstate = sqlstate
        self.prev_tick = prev_tick
        self.cur_tick = cur_tick
