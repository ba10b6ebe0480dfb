"""keep_event_id: target events carry the source's ev_id, and nothing may collide with them.

PgQ enforces no uniqueness of ev_id, and rows written with explicit ids do not move
the target queue's id sequence. So kept ids are safe only while the target queue has
one writer. The rule, checked in the target database (pgq_ext, mover schema 3):

* a target queue receives kept ids from at most one tracking key (consumer,
  subconsumer), recorded in ``pgq_ext.kept_event_ids`` on its first kept-id batch;
* on that first batch the target queue must hold no events (their ids are unknown);
* afterwards the queue's event-id sequence must still stand where the key left it
  after its last batch: any other insert (a local producer, a mover without kept
  ids), a ``pgq.force_tick`` on the target, even a rolled-back insert, moves it.

Each batch claims the queue first (``kept_ids_claim``: the refusal decided before
any lock; then the queue's row in ``pgq_ext.kept_ids_queue`` (FOR UPDATE: no login
without pgq_mover can take or hold it) and a SHARE ROW EXCLUSIVE lock on the
current event table, so no other insert into it can start until the batch commits,
and a row in ``pgq_ext.kept_ids_claims`` stamped with the transaction's txid: the
proof, which no other session can forge, that ``insert_event_chunk`` may take
explicit ids and ``kept_ids_commit`` may move the sequence in this transaction) and
ends with ``kept_ids_commit``, which checks the sequence did not move, advances it
past the batch's largest id (later local inserts get fresh, larger ids; the ticker
sees the new events) and records it. A violation stops the mover with
KeptIdConflict, the batch rolled back on the target and left unfinished on the source.
All of these are granted to the pgq_mover role only.
"""

from __future__ import annotations

import psycopg2
from psycopg2.extensions import connection as Connection

from airflow_provider_pgq.core.errors import KeptIdConflict, PgqExtMissing, literal

#: pgq_ext.mover_schema_version() that has the kept-id functions.
KEPT_IDS_SCHEMA = 2

_WHAT_TO_DO = (
    " Move without keep_event_id, or give the target queue no other writer; once it is"
    " emptied or recreated, select pgq_ext.kept_ids_release({queue}) lets a key start afresh."
)


def _conflict(queue: str, key: str, reason: str) -> KeptIdConflict:
    return KeptIdConflict(
        f"keep_event_id refused for {key} into target queue {queue!r}: {reason}."
        + _WHAT_TO_DO.format(queue=literal(queue))
    )


def _require_schema(conn: Connection) -> None:
    with conn.cursor() as cur:
        cur.execute("select pg_catalog.to_regproc('pgq_ext.kept_ids_claim')")
        row = cur.fetchone()
    if row is None or row[0] is None:
        raise PgqExtMissing(
            "pgq_ext in the target database lacks kept-id support (mover schema"
            f" {KEPT_IDS_SCHEMA}): upgrade it with install_pgq_ext=True, --install-pgq-ext"
            " or PgqHook.install_pgq_ext()"
        )


def refusal(conn: Connection, consumer: str, subconsumer: str, queue: str) -> str | None:
    """Why the key may not write kept ids into the queue now; None when it may. Read-only."""
    _require_schema(conn)
    with conn.cursor() as cur:
        cur.execute("select pgq_ext.kept_ids_refusal(%s::text, %s::text, %s::text)", (consumer, subconsumer, queue))
        row = cur.fetchone()
    return None if row is None or row[0] is None else str(row[0])


def check(conn: Connection, consumer: str, subconsumer: str, queue: str, key: str) -> None:
    """The refusal as an error, before a drain: fail early, before any batch is taken."""
    reason = refusal(conn, consumer, subconsumer, queue)
    if reason is not None:
        raise _conflict(queue, key, reason)


def claim(conn: Connection, consumer: str, subconsumer: str, queue: str, key: str) -> None:
    """Start of a kept-id batch, in the target transaction (locks held until it ends)."""
    with conn.cursor() as cur:
        cur.execute("select pgq_ext.kept_ids_claim(%s::text, %s::text, %s::text)", (consumer, subconsumer, queue))
        row = cur.fetchone()
    if row is not None and row[0] is not None:
        raise _conflict(queue, key, str(row[0]))


def commit(conn: Connection, consumer: str, subconsumer: str, queue: str, max_id: int, key: str) -> int:
    """End of a kept-id batch that wrote ids up to max_id; returns the sequence's new value."""
    try:
        with conn.cursor() as cur:
            cur.execute(
                "select pgq_ext.kept_ids_commit(%s::text, %s::text, %s::text, %s::bigint)",
                (consumer, subconsumer, queue, max_id),
            )
            row = cur.fetchone()
    except (psycopg2.errors.RaiseException, psycopg2.errors.InsufficientPrivilege) as exc:
        reason = (exc.diag.message_primary or str(exc)).strip()
        raise _conflict(queue, key, reason) from exc
    assert row is not None
    return int(row[0])
