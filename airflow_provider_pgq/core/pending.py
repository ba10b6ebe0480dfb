"""Is there work for a consumer? The check behind the sensor, the triggers, the hook's
lag and the mover's status, and the one typed answer they all give (``PendingStatus``;
``MoverStatus`` adds the target's side where there is one).

Reads positions only: the consumer's last finished tick against the queue's newest
tick, plus PgQ's own pending-events estimate. It never allocates a batch (that would
open a batch the mover then has to finish) and never writes. Runs in the caller's
transaction and does not end it: pollers should use an autocommit connection, or
roll back after each call, so no transaction stays open between polls (an open
transaction holds back PgQ's event-table rotation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from psycopg2.extensions import connection as Connection

from airflow_provider_pgq.core import pgq
from airflow_provider_pgq.core.errors import ConsumerNotRegistered, InvalidParameter, QueueNotFound, literal


@dataclass(frozen=True)
class PendingStatus:
    """One consumer's position on one queue, and what lies ahead of it.

    The names are PgQ's: ``queue_name``, ``consumer_name``, ``last_tick`` (the
    consumer's last finished tick), ``current_batch``, ``pending_events``; the queue's
    newest tick is ``newest_tick`` everywhere in this package (PgQ's get_queue_info
    calls it ``last_tick_id``).

    ``pending_events`` is PgQ's estimate (the event sequence between the consumer's
    last tick and the newest tick): exact for plain inserts, inflated by
    ``pgq.force_tick`` and by rolled-back inserts. Use it to decide when to wake a
    mover, never to decide what was moved.
    """

    queue_name: str
    consumer_name: str
    registered: bool
    last_tick: int | None
    newest_tick: int | None
    current_batch: int | None
    pending_events: int | None
    lag_seconds: float | None
    #: The open batch's end tick (None without one).
    next_tick: int | None = None
    #: Seconds since PgQ last saw the consumer take or finish a batch (get_consumer_info's
    #: ``last_seen``: ``now() - sub_active``); with an open batch, how long it has been open.
    #: Read by the PgQ page (core.positions) only; None elsewhere.
    last_seen_seconds: float | None = None

    @property
    def batch_available(self) -> bool:
        """A tick newer than the consumer's last one exists: next_batch would answer a batch."""
        return (
            self.registered
            and self.last_tick is not None
            and self.newest_tick is not None
            and self.newest_tick > self.last_tick
        )

    def ready(self, min_events: int = 1, max_lag: float | None = None) -> bool:
        """Worth waking a mover: a batch is available and holds at least ``min_events``
        (estimated), or holds some events and the consumer lags ``max_lag`` seconds or more.

        ``min_events=0`` wakes on any available batch, an empty one included (moving
        the mark past empty ticks keeps the lag figure honest).
        """
        if not self.batch_available:
            return False
        pending = self.pending_events or 0
        if pending >= min_events:
            return True
        return (
            max_lag is not None
            and pending > 0
            and self.lag_seconds is not None
            and self.lag_seconds >= max_lag
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly, for XCom, trigger payloads and asset event extras."""
        out = asdict(self)
        out["batch_available"] = self.batch_available
        return out


@dataclass(frozen=True)
class MoverStatus(PendingStatus):
    """A mover's status: its source consumer's ``PendingStatus`` (``queue_name`` is the
    source queue) plus the target's side, ``target_queue`` and the tracking key's mark
    in the target's pgq_ext (``target_mark``, None when nothing was applied yet)."""

    target_queue: str = ""
    subconsumer: str = ""
    target_mark: int | None = None

    @classmethod
    def of(cls, source: PendingStatus, target_queue: str, subconsumer: str, target_mark: int | None) -> MoverStatus:
        position = {f.name: getattr(source, f.name) for f in fields(PendingStatus)}
        return cls(**position, target_queue=target_queue, subconsumer=subconsumer, target_mark=target_mark)


def validate_thresholds(min_events: int, max_lag: float | None) -> None:
    """Raises InvalidParameter for thresholds no queue could meet sensibly."""
    if not isinstance(min_events, int) or isinstance(min_events, bool) or min_events < 0:
        raise InvalidParameter(f"min_events must be an integer >= 0, got {min_events!r}")
    if max_lag is not None and max_lag <= 0:
        raise InvalidParameter(f"max_lag must be positive seconds or None, got {max_lag!r}")


_QUERY = (
    "select c.consumer_name, c.last_tick, c.current_batch, c.pending_events, c.next_tick,"
    " pg_catalog.date_part('epoch', c.lag)::float8,"
    " (select pg_catalog.max(t.tick_id) from pgq.tick t join pgq.queue q on q.queue_id = t.tick_queue"
    "   where q.queue_name = %s)"
    " from pgq.get_consumer_info(%s::text, %s::text) c"
)


def _statuses(conn: Connection, queue: str, consumer: str | None) -> dict[str, PendingStatus]:
    with conn.cursor() as cur:
        cur.execute(_QUERY, (queue, queue, consumer))
        rows = cur.fetchall()
    return {
        name: PendingStatus(queue, name, True, last, newest, batch, pending, lag, next_tick)
        for name, last, batch, pending, next_tick, lag, newest in rows
    }


def _require_queue(conn: Connection, queue: str) -> None:
    if not pgq.queue_exists(conn, queue):
        raise QueueNotFound(
            f"queue {queue!r} does not exist in database {_database(conn)!r}: create it"
            f" (PgqCreateQueueOperator, or select pgq.create_queue({literal(queue)}))"
        )


def _database(conn: Connection) -> str:
    with conn.cursor() as cur:
        cur.execute("select pg_catalog.current_database()")
        row = cur.fetchone()
    return str(row[0]) if row else "?"


def pending_status(conn: Connection, queue: str, consumer: str) -> PendingStatus:
    """The consumer's status; ``registered=False`` when it is not subscribed.

    Raises QueueNotFound when the queue does not exist.
    """
    found = _statuses(conn, queue, consumer).get(consumer)
    if found is not None:
        return found
    _require_queue(conn, queue)
    return PendingStatus(queue, consumer, False, None, pgq.newest_tick(conn, queue), None, None, None)


def queue_statuses(conn: Connection, queue: str) -> dict[str, PendingStatus]:
    """Every consumer of the queue in one query (one poll serves many watchers).

    Raises QueueNotFound when the queue does not exist.
    """
    found = _statuses(conn, queue, None)
    if not found:
        _require_queue(conn, queue)
    return found


def status_for(statuses: dict[str, PendingStatus], queue: str, consumer: str,
               newest_tick: int | None = None) -> PendingStatus:
    """The consumer's entry of queue_statuses(), or an unregistered placeholder."""
    found = statuses.get(consumer)
    if found is not None:
        return found
    if newest_tick is None and statuses:
        newest_tick = next(iter(statuses.values())).newest_tick
    return PendingStatus(queue, consumer, False, None, newest_tick, None, None, None)


def require_registered(status: PendingStatus, database: str | None = None) -> None:
    """Raises ConsumerNotRegistered with what to do, for waiters that cannot wait on nothing."""
    if status.registered:
        return
    where = f" in database {database!r}" if database else ""
    raise ConsumerNotRegistered(
        f"consumer {status.consumer_name!r} is not registered on queue {status.queue_name!r}{where}:"
        " nothing will ever be pending for it. Register it first (PgqRegisterConsumerOperator,"
        f" register_consumer=True on the mover, or select pgq.register_consumer("
        f"{literal(status.queue_name)}, {literal(status.consumer_name)}))"
    )
