"""Registering a consumer: where it starts, and saying what it will never see.

PgQ's rule: a consumer sees the events that come after its registration tick. So a
new registration either starts now (the queue's newest tick: what the queue already
holds is never its) or at the queue's oldest retained tick (what the queue still
holds is moved too, back to its last rotation). Either way the events before the
tick are counted and named in a WARNING: a user reading "moved 0 events" must not
take PgQ's rule for data loss. The mover, the CLI's --register and the admin
operator share this one function.
"""

from __future__ import annotations

import logging

from psycopg2.extensions import connection as Connection

from airflow_provider_pgq.core import pgq
from airflow_provider_pgq.core.errors import InvalidParameter

log = logging.getLogger(__name__)

#: Where a new registration starts.
REGISTER_AT = ("now", "oldest")


def check_register_at(at: object) -> None:
    """InvalidParameter unless ``at`` is one of REGISTER_AT (checked where it is given)."""
    if at not in REGISTER_AT:
        raise InvalidParameter(f"register_at must be one of {', '.join(map(repr, REGISTER_AT))}, got {at!r}")


def register(conn: Connection, queue: str, consumer: str, at: str = "now") -> bool:
    """Registers the consumer unless it is; True when it did. Commits."""
    check_register_at(at)
    if pgq.is_registered(conn, queue, consumer):
        conn.rollback()
        return False
    # Concurrent first runs: register_consumer_at would move a registration another run
    # just made (and moved batches with) back; so lock, then look again.
    with conn.cursor() as cur:
        cur.execute(
            "select pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(%s::text, 0::bigint))",
            (f"airflow_provider_pgq:register:{queue}\x01{consumer}",),
        )
    if pgq.is_registered(conn, queue, consumer):
        conn.rollback()
        return False
    oldest = pgq.oldest_tick_id(conn, queue) if at == "oldest" else None
    if oldest is not None:
        pgq.register_consumer_at(conn, queue, consumer, oldest)
    else:
        pgq.register_consumer(conn, queue, consumer)
    conn.commit()
    info = pgq.get_consumer_info(conn, queue, consumer)
    tick = info.last_tick if info is not None else None
    unseen = pgq.events_before_tick(conn, queue, tick) if tick is not None else 0
    conn.rollback()
    log.info("registered consumer %r on queue %r at tick %s (register_at=%r)", consumer, queue, tick, at)
    if unseen:
        log.warning(
            "consumer %r registered on queue %r at tick %s: %d events the queue already holds"
            " were queued before that tick and will never be moved by it (PgQ: a consumer sees"
            " only what comes after its position).%s",
            consumer, queue, tick, unseen,
            " To move them too, unregister it (pgq.unregister_consumer) before it moved anything"
            " and register again with register_at='oldest'" if at == "now" else
            " They came before the queue's oldest retained tick; none older can be reached",
        )
    return True
