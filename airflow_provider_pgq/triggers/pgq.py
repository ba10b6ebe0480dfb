"""Triggers that wait in the triggerer, not in a worker slot, until a PgQ consumer has work.

Both poll the same read-only check (``core.pending``): the consumer's last tick
against the queue's newest tick and PgQ's pending-events estimate. Neither takes a
batch: allocating one here would leave an open batch that only the mover may finish.

* ``PgqEventsTrigger``: fires once, for ``PgqQueueSensor(deferrable=True)``.
* ``PgqQueueEventTrigger``: runs for as long as the Asset is watched and fires once
  per newly available work, for event-driven scheduling
  (``AssetWatcher(trigger=MessageQueueTrigger(scheme="pgq", ...))``).

psycopg2 blocks, so every database call runs in a worker thread
(``asyncio.to_thread``); the poller's connection is in autocommit mode, so no
transaction stays open between polls (that would hold back PgQ's table rotation).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg2
import psycopg2.errors
from airflow.sdk import BaseHook
from airflow.triggers.base import BaseEventTrigger, BaseTrigger, TriggerEvent
from psycopg2.extensions import connection as Psycopg2Connection

from airflow_provider_pgq.core import pgq
from airflow_provider_pgq.core.errors import ConnectionFailed, PgqError, PgqNotInstalled, QueueNotFound
from airflow_provider_pgq.core.pending import (
    PendingStatus,
    queue_statuses,
    require_registered,
    status_for,
    validate_thresholds,
)
from airflow_provider_pgq.hooks.pgq import PgqHook, UnsupportedConnection

log = logging.getLogger(__name__)

T = TypeVar("T")

APPLICATION_NAME = "airflow-pgq-trigger"

#: Errors after which the poller reconnects on its next poll instead of failing.
_TRANSIENT = (psycopg2.OperationalError, psycopg2.InterfaceError, ConnectionFailed)

#: libpq's words for a connection the server answered and refused for good: waiting out
#: a sensor's timeout after a password change, or on a dropped database, helps nobody.
_PERMANENT = (
    "authentication failed",  # password, scram, md5, peer, ident...
    "no password supplied",
    "no pg_hba.conf entry",
    "is not permitted to log in",
    "permission denied for database",
    "does not exist",  # database "x" does not exist, role "x" does not exist
)


class PollingStopped(PgqError):
    """A poll failed in a way no retry can fix (authentication, missing database or queue)."""


def _permanent(exc: BaseException) -> bool:
    return isinstance(exc, ConnectionFailed) and any(words in str(exc) for words in _PERMANENT)


def _describe(conn_id: str, exc: BaseException) -> str:
    """One line; the hook's errors already lead with the connection id and server."""
    text = " ".join(str(exc).split())
    return text if text.startswith("Airflow connection") else f"Airflow connection {conn_id!r}: {text}"


@dataclass(frozen=True)
class QueueSnapshot:
    """What one poll saw of a queue: every consumer's status, or the problem that hid it."""

    queue_name: str
    newest_tick: int | None = None
    statuses: dict[str, PendingStatus] = field(default_factory=dict)
    problem: str | None = None

    def status(self, consumer: str) -> PendingStatus:
        return status_for(self.statuses, self.queue_name, consumer, self.newest_tick)


#: What a query of PgQ's functions and tables raises where the pgq schema is missing.
_NO_PGQ = (psycopg2.errors.UndefinedFunction, psycopg2.errors.UndefinedTable, psycopg2.errors.InvalidSchemaName)


def read_snapshot(conn: Psycopg2Connection, queue_name: str) -> QueueSnapshot:
    """One poll, all consumers of the queue in one query (blocking; run it in a thread).

    A missing queue, and a database without the pgq extension, are problems of the
    snapshot (a setup DAG may create them later), not errors. Needs an autocommit
    connection: the failed query must not leave an aborted transaction behind.
    """
    try:
        try:
            statuses = queue_statuses(conn, queue_name)
        except _NO_PGQ:
            try:
                pgq.require_pgq(conn, "polled")
            except PgqNotInstalled as missing:
                return QueueSnapshot(queue_name, problem=f"queue {queue_name!r}: {missing}")
            # pgq is there now: a setup committed it between the query and this check (the
            # event trigger's test caught that race). Read once more; failing again, something
            # else is wrong, said as it is.
            statuses = queue_statuses(conn, queue_name)
    except QueueNotFound as exc:
        return QueueSnapshot(queue_name, problem=str(exc))
    newest = next(iter(statuses.values())).newest_tick if statuses else pgq.newest_tick(conn, queue_name)
    return QueueSnapshot(queue_name, newest, statuses)


class _Poller:
    """One autocommit psycopg2 connection from an Airflow connection, reopened after failures."""

    def __init__(self, conn_id: str) -> None:
        self.conn_id = conn_id
        self._conn: Psycopg2Connection | None = None

    async def _connect(self) -> Psycopg2Connection:
        # The async lookup: a blocking one from the event loop can deadlock the triggerer's
        # channel to its supervisor.
        airflow_conn = await BaseHook.aget_connection(self.conn_id)
        hook = PgqHook(self.conn_id, connection=airflow_conn, application_name=APPLICATION_NAME)
        conn = await asyncio.to_thread(hook.get_conn)
        conn.autocommit = True
        return conn

    async def call(self, work: Callable[[Psycopg2Connection], T]) -> T:
        if self._conn is None or self._conn.closed:
            self._conn = await self._connect()
        try:
            return await asyncio.to_thread(work, self._conn)
        except _TRANSIENT:
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg2.Error:
                pass
            self._conn = None


async def poll_snapshots(conn_id: str, queue_name: str, poll_interval: float) -> AsyncIterator[QueueSnapshot]:
    """Yields a snapshot every poll_interval seconds, forever; survives lost connections.

    A transient failure (server down, restarting, too many connections) is waited out,
    logged once when it starts (and again only when it changes) and once when it
    clears: an outage of hours stays two log lines. A failure no retry can fix
    (authentication, database missing, a connection PgqHook cannot use) raises
    PollingStopped at once.
    """
    poller = _Poller(conn_id)
    failures = 0
    problem: str | None = None
    try:
        while True:
            try:
                snapshot = await poller.call(lambda c: read_snapshot(c, queue_name))
            except UnsupportedConnection as exc:
                raise PollingStopped(f"polling queue {queue_name!r} stopped: {exc}") from None
            except _TRANSIENT as exc:
                failures += 1
                text = _describe(conn_id, exc)
                if _permanent(exc):
                    raise PollingStopped(
                        f"polling queue {queue_name!r} stopped: {text} (a retry cannot fix this: fix the"
                        " connection, the role or the database, then clear the task)"
                    ) from None
                if text != problem:
                    log.warning("polling queue %r failed, retrying every %ss until it works: %s",
                                queue_name, poll_interval, text)
                    problem = text
            else:
                if problem is not None:
                    log.info("polling queue %r through Airflow connection %r works again after %d failed"
                             " polls (was: %s)", queue_name, conn_id, failures, problem)
                failures, problem = 0, None
                yield snapshot
            await asyncio.sleep(poll_interval)
    finally:
        poller.close()


def _event(payload: dict[str, Any]) -> TriggerEvent:
    return TriggerEvent(payload)  # type: ignore[no-untyped-call]


class _WaitParameters:
    """The parameters both triggers share, checked at construction and serialized.

    ``consumer`` is the old name of ``consumer_name`` (0.2.0 and before): triggers a
    running deployment serialized under it (the metadata database stores classpath and
    kwargs) must still deserialize, so it stays accepted; serialize() writes
    ``consumer_name`` only.
    """

    def __init__(self, *, pgq_conn_id: str, queue_name: str, consumer_name: str | None = None,
                 min_events: int = 1, max_lag: float | None = None, poll_interval: float = 5.0,
                 consumer: str | None = None) -> None:
        super().__init__()
        if consumer is not None:
            if consumer_name is not None and consumer_name != consumer:
                raise ValueError(f"give consumer_name only, not also consumer ({consumer_name!r} != {consumer!r})")
            consumer_name = consumer
        for name, value in (("pgq_conn_id", pgq_conn_id), ("queue_name", queue_name),
                            ("consumer_name", consumer_name)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        validate_thresholds(min_events, max_lag)
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive seconds, got {poll_interval!r}")
        self.pgq_conn_id = pgq_conn_id
        self.queue_name = queue_name
        self.consumer_name = str(consumer_name)
        self.min_events = min_events
        self.max_lag = max_lag
        self.poll_interval = float(poll_interval)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "pgq_conn_id": self.pgq_conn_id,
                "queue_name": self.queue_name,
                "consumer_name": self.consumer_name,
                "min_events": self.min_events,
                "max_lag": self.max_lag,
                "poll_interval": self.poll_interval,
            },
        )


class PgqEventsTrigger(_WaitParameters, BaseTrigger):
    """Fires once when ``consumer_name`` on ``queue_name`` has at least ``min_events`` waiting
    in an available batch (or any events once it lags ``max_lag`` seconds).

    The event's payload is the consumer's status (``PendingStatus.to_dict()``) with
    ``"status": "ready"``; a missing queue or an unregistered consumer ends the wait
    with ``"status": "error"`` and a message saying what to create, since waiting
    could never succeed. Lost connections are retried every poll.

    :param pgq_conn_id: Airflow connection to the database holding the queue.
    :param queue_name: the PgQ queue.
    :param consumer_name: the registered consumer whose backlog is watched (the mover's);
        ``consumer`` is accepted as its old name.
    :param min_events: estimated events that must wait; 0 fires on any available batch.
    :param max_lag: also fire when events wait and the consumer lags this many seconds.
    :param poll_interval: seconds between polls.
    """

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            async for event in self._wait():
                yield event
        except PollingStopped as exc:
            log.error("consumer %r: %s", self.consumer_name, exc)
            yield _event({"status": "error", "message": str(exc)})

    async def _wait(self) -> AsyncIterator[TriggerEvent]:
        async for snapshot in poll_snapshots(self.pgq_conn_id, self.queue_name, self.poll_interval):
            if snapshot.problem is not None:
                yield _event({"status": "error", "message": snapshot.problem})
                return
            status = snapshot.status(self.consumer_name)
            if not status.registered:
                yield _event({"status": "error", "message": _not_registered(status)})
                return
            if status.ready(self.min_events, self.max_lag):
                self.log.info(
                    "consumer %r on %r: %s events pending up to tick %s",
                    self.consumer_name, self.queue_name, status.pending_events, status.newest_tick,
                )
                yield _event({"status": "ready", **status.to_dict()})
                return


def _not_registered(status: PendingStatus) -> str:
    try:
        require_registered(status)
    except PgqError as exc:
        return str(exc)
    return ""  # pragma: no cover - only called for unregistered consumers


class PgqQueueEventTrigger(_WaitParameters, BaseEventTrigger):
    """Event-driven scheduling on a PgQ queue: fires each time new work appears for ``consumer_name``.

    Fires when the consumer's status is ready (as in ``PgqEventsTrigger``) and the
    queue's newest tick is newer than the tick of its previous firing: one asset event
    per stretch of new work, however often it polls; Airflow folds asset events that
    arrive before the DAG run starts into that run. It is level-triggered from the
    database: after a triggerer restart (memory lost) it fires again if work is still
    waiting, so a wake-up is never lost, at worst repeated, and a repeated run of
    the mover finds nothing to move. A database without the pgq extension, a missing
    queue or an unregistered consumer is logged and waited out (a setup DAG may create
    them later), once when it starts (and when it changes) and once when it clears; a
    queue that existed and then disappears, and a connection the server refuses for
    good (authentication, missing database), fail the trigger at once.

    Sibling watchers of the same connection, queue and poll interval share one poll in
    the triggerer (``shared_stream_key``): one query reads every consumer of the queue.

    Reached through ``MessageQueueTrigger(scheme="pgq", pgq_conn_id=..., queue_name=...,
    consumer_name=...)``; parameters as in ``PgqEventsTrigger``. The payload (stored in the
    asset event's extra) is the consumer's status with ``pgq_conn_id``.
    """

    def shared_stream_key(self) -> Hashable | None:
        return ("pgq-queue-poll", self.pgq_conn_id, self.queue_name, self.poll_interval)

    @classmethod
    async def open_shared_stream(cls, kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        """One poll loop per (connection, queue, interval), broadcast to every watcher."""
        async for snapshot in poll_snapshots(kwargs["pgq_conn_id"], kwargs["queue_name"],
                                             float(kwargs["poll_interval"])):
            yield snapshot

    async def filter_shared_stream(self, shared_stream: AsyncIterator[Any]) -> AsyncIterator[TriggerEvent]:
        """This watcher's firings, from the shared snapshots."""
        fired_tick: int | None = None
        complaint: str | None = None
        queue_seen = False
        async for snapshot in shared_stream:
            if snapshot.problem is not None and queue_seen:
                raise PollingStopped(
                    f"queue {self.queue_name!r} (Airflow connection {self.pgq_conn_id!r}) existed and is"
                    f" gone: {snapshot.problem}; consumer {self.consumer_name!r} can never get work from it."
                    " Recreate the queue (and register the consumer), or remove this watcher"
                )
            queue_seen = queue_seen or snapshot.problem is None
            status = snapshot.status(self.consumer_name)
            problem = snapshot.problem or (None if status.registered else _not_registered(status))
            if problem is not None:
                if problem != complaint:
                    log.warning("consumer %r on queue %r, waiting: %s", self.consumer_name, self.queue_name, problem)
                    complaint = problem
                continue
            if complaint is not None:
                log.info("consumer %r on queue %r: resolved (was: %s)", self.consumer_name, self.queue_name, complaint)
            complaint = None
            if not status.ready(self.min_events, self.max_lag):
                continue
            if fired_tick is not None and (status.newest_tick or 0) <= fired_tick:
                continue  # this work was announced already
            fired_tick = status.newest_tick
            self.log.info(
                "consumer %r on %r: ~%s events pending up to tick %s: firing",
                self.consumer_name, self.queue_name, status.pending_events, status.newest_tick,
            )
            yield _event({"pgq_conn_id": self.pgq_conn_id, **status.to_dict()})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Standalone path (tests, or a triggerer without shared streams): own poll loop."""
        kwargs = self.serialize()[1]
        async for event in self.filter_shared_stream(type(self).open_shared_stream(kwargs)):
            yield event
