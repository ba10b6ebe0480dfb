"""Events a target refuses for their content (poison events) and their dead letters.

A batch holding an event whose text the target cannot store (a Latin-1 byte from a
SQL_ASCII source in a UTF8 target: SQLSTATE 22021; a character the target's encoding
lacks: 22P05) fails whole. Only then, never on the happy path, the mover finds which
events: it moves the batch again in halves under savepoints, splitting the halves that
are refused, down to single events (``QueueMover._sift``). The refused ones either stop
the mover with one line naming them (``invalid_events = "stop"``, the default) or go,
byte for byte, into ``pgq_ext.dead_letter`` on the target in the batch's transaction
(``"dead_letter"``), from where ``replay`` puts them into the target queue once fixed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from airflow_provider_pgq.core.errors import InvalidParameter, PgqExtMissing

STOP = "stop"
DEAD_LETTER = "dead_letter"
#: The values of MoverOptions.invalid_events (ini key invalid_events, operator parameter).
INVALID_EVENTS = (STOP, DEAD_LETTER)

#: SQLSTATEs with which a database refuses a value for what it holds, not for how it was
#: asked: no valid byte sequence in the encoding (22021, also a NUL byte), a character
#: the encoding lacks (22P05).
REFUSALS = {
    "22021": "character_not_in_repertoire",
    "22P05": "untranslatable_character",
}

#: A limit (54000: a value too large to store) is also hit by a piece of many events as
#: a whole (insert_event_chunk's arrays, say): it makes the mover sift, and refuses an
#: event only when that event alone, moved by itself, hits it.
LIMITS = {"54000": "program_limit_exceeded"}

#: How many ev_ids a one-line message names before "and N more".
SHOWN_IDS = 10


def check_invalid_events(value: object) -> None:
    if not isinstance(value, str) or value not in INVALID_EVENTS:
        raise InvalidParameter(
            f"invalid_events must be one of {', '.join(repr(v) for v in INVALID_EVENTS)}, got {value!r}:"
            f" {STOP!r} (the default) stops at an event the target refuses, {DEAD_LETTER!r} moves the"
            " rest of the batch and keeps the refused events in pgq_ext.dead_letter on the target"
        )


def refusal(exc: BaseException, limits: bool = False) -> tuple[str, str] | None:
    """(SQLSTATE, first line of the message) when exc may be a refusal of an event's
    content: a REFUSALS code, or with limits a LIMITS code too (worth sifting for, but
    an event's own only when that single event, moved alone, hits it)."""
    if isinstance(exc, psycopg2.Error) and (exc.pgcode in REFUSALS or (limits and exc.pgcode in LIMITS)):
        primary = exc.diag.message_primary if exc.diag is not None else None
        return str(exc.pgcode), (primary or str(exc)).strip().splitlines()[0]
    return None


@dataclass(frozen=True)
class Refused:
    """One event refused: its id, why, and the side whose server raised it ("target";
    "source" when the source could not convert it into the target's encoding)."""

    ev_id: int
    sqlstate: str
    message: str
    side: str = "target"


def _batch_text(batch_sql: str) -> sql.SQL:
    # PgQ's own text for the batch (pgq.batch_event_sql), never user input; its "%"
    # doubled for the statements below, which carry parameters.
    return sql.SQL(batch_sql.replace("%", "%%"))


def batch_ids(conn: Connection, batch_sql: str) -> list[int]:
    """The batch's event ids in ev_id order (one round trip, the failure path only)."""
    query = sql.SQL("select b.ev_id from ({}) b order by 1").format(sql.SQL(batch_sql))
    with conn.cursor() as cur:
        cur.execute(query)
        return [int(r[0]) for r in cur.fetchall()]


def range_sql(conn: Connection, batch_sql: str, first: int, last: int) -> str:
    """The batch's SELECT restricted to ev_id first..last, in ev_id order (for a COPY,
    which takes no bound parameters: the ids are integer literals)."""
    return (
        sql.SQL("select * from ({}) r where r.ev_id between {} and {} order by r.ev_id")
        .format(sql.SQL(batch_sql), sql.Literal(int(first)), sql.Literal(int(last)))
        .as_string(conn)
    )


def describe(refused: list[Refused]) -> str:
    """'ev_id 5 (22021: invalid byte sequence ...), ev_id 9 (...)', at most SHOWN_IDS of them."""
    shown = ", ".join(f"ev_id {r.ev_id} ({r.sqlstate}: {r.message})" for r in refused[:SHOWN_IDS])
    more = len(refused) - SHOWN_IDS
    return shown + (f" and {more} more" if more > 0 else "")


_RAW = """
select b.ev_id, b.ev_time,
       pg_catalog.convert_to(b.ev_type, e.enc), pg_catalog.convert_to(b.ev_data, e.enc),
       pg_catalog.convert_to(b.ev_extra1, e.enc), pg_catalog.convert_to(b.ev_extra2, e.enc),
       pg_catalog.convert_to(b.ev_extra3, e.enc), pg_catalog.convert_to(b.ev_extra4, e.enc), e.enc::text
  from ({}) b cross join (select pg_catalog.getdatabaseencoding()::pg_catalog.name as enc) e
 where b.ev_id = any(%s::bigint[])
 order by b.ev_id
"""


def read_raw(conn: Connection, batch_sql: str, ids: list[int]) -> list[tuple[Any, ...]]:
    """The events' fields as the source stores them, byte for byte: every text field as
    bytea in the source database's own encoding (a conversion to itself is none), which
    the client receives as hex, so no client encoding touches them. Rows: (ev_id,
    ev_time, type, data, extra1..4, source encoding), in ev_id order."""
    query = sql.SQL(_RAW).format(_batch_text(batch_sql))
    with conn.cursor() as cur:
        cur.execute(query, (ids,))
        return [tuple(r) for r in cur.fetchall()]


def store(
    conn: Connection,
    consumer: str,
    subconsumer: str,
    source_queue: str,
    target_queue: str,
    prev_tick: int,
    cur_tick: int,
    rows: list[tuple[Any, ...]],
    refused: list[Refused],
) -> int:
    """Writes the refused events (rows from read_raw) into pgq_ext.dead_letter, in the
    caller's target transaction (committed with the batch's mark); returns the count."""
    if not rows:
        return 0
    why = {r.ev_id: r for r in refused}
    columns: list[list[Any]] = [[] for _ in range(8)]
    for raw in rows:
        for i in range(8):
            value = raw[i]
            columns[i].append(psycopg2.Binary(bytes(value)) if i >= 2 and value is not None else value)
    encoding = str(rows[0][8])
    states = [why[int(r[0])].sqlstate for r in rows]
    errors = [why[int(r[0])].message for r in rows]
    with conn.cursor() as cur:
        cur.execute(
            "select pgq_ext.dead_letter_events(%s::text, %s::text, %s::text, %s::text, %s::bigint, %s::bigint,"
            " %s::text, %s::bigint[], %s::timestamptz[], %s::bytea[], %s::bytea[], %s::bytea[], %s::bytea[],"
            " %s::bytea[], %s::bytea[], %s::text[], %s::text[])",
            (consumer, subconsumer, source_queue, target_queue, prev_tick, cur_tick, encoding,
             *columns, states, errors),
        )
        row = cur.fetchone()
    return int(row[0]) if row and row[0] is not None else 0


@dataclass(frozen=True)
class DeadLetter:
    """One row of pgq_ext.dead_letter (payload fields as the source's bytes)."""

    dl_id: int
    consumer: str
    subconsumer: str
    source_queue: str
    target_queue: str
    prev_tick_id: int
    cur_tick_id: int
    ev_id: int
    ev_time: dt.datetime
    ev_type: bytes | None
    ev_data: bytes | None
    ev_extra1: bytes | None
    ev_extra2: bytes | None
    ev_extra3: bytes | None
    ev_extra4: bytes | None
    source_encoding: str
    error_sqlstate: str
    error_message: str
    dead_lettered_at: dt.datetime
    replayed_at: dt.datetime | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: bytes as text in the source's encoding where they decode,
        else as hex (\\x...), times in ISO format."""
        out: dict[str, Any] = {}
        for name, value in self.__dict__.items():
            if isinstance(value, bytes):
                out[name] = shown(value, self.source_encoding)
            elif isinstance(value, dt.datetime):
                out[name] = value.isoformat()
            else:
                out[name] = value
        return out


def shown(value: bytes | None, encoding: str) -> str | None:
    """The bytes as text where they decode in encoding, else as hex (\\x...)."""
    if value is None:
        return None
    codec = {"SQL_ASCII": "ascii", "UTF8": "utf-8", "LATIN1": "latin-1"}.get(encoding.upper(), encoding)
    try:
        return value.decode(codec)
    except (LookupError, UnicodeDecodeError):
        return "\\x" + value.hex()


_LIST = """
select d.dl_id, d.consumer_id, d.subconsumer_id, d.source_queue, d.target_queue, d.prev_tick_id,
       d.cur_tick_id, d.ev_id, d.ev_time, d.ev_type, d.ev_data, d.ev_extra1, d.ev_extra2, d.ev_extra3,
       d.ev_extra4, d.source_encoding, d.error_sqlstate, d.error_message, d.dead_lettered_at, d.replayed_at
  from pgq_ext.list_dead_letters(%s::text, %s::text, %s::boolean) d
 order by d.dl_id
"""


def list_dead_letters(conn: Connection, consumer: str, subconsumer: str = "",
                      include_replayed: bool = False) -> list[DeadLetter]:
    """The key's dead letters (those not replayed yet unless include_replayed), through
    pgq_ext.list_dead_letters: for a writer of the key (a pgq_mover login of its owner)
    or an admin only, as they hold event payloads."""
    try:
        with conn.cursor() as cur:
            cur.execute(_LIST, (consumer, subconsumer, include_replayed))
            rows = cur.fetchall()
    except psycopg2.errors.UndefinedFunction as exc:
        conn.rollback()
        raise PgqExtMissing(
            f"pgq_ext in target database {conn.info.dbname!r} has no list_dead_letters (installed by an"
            f" earlier build of mover schema 7): install it again once (--install-pgq-ext, or"
            f" PgqHook.install_pgq_ext()); then read the dead letters of consumer {consumer!r}"
        ) from exc
    out = []
    for row in rows:
        values: list[Any] = [bytes(v) if isinstance(v, memoryview) else v for v in row]
        out.append(DeadLetter(*values))
    return out


def pending_count(conn: Connection, consumer: str, subconsumer: str = "") -> int | None:
    """How many of the key's dead letters wait for replay; None when this login may not
    read them (not a writer of the key, or no pgq_mover) or pgq_ext has no
    list_dead_letters (older than this release)."""
    try:
        with conn.cursor() as cur:
            cur.execute(
                "select pg_catalog.count(*) from pgq_ext.list_dead_letters(%s::text, %s::text, false)",
                (consumer, subconsumer),
            )
            row = cur.fetchone()
    except (psycopg2.errors.InsufficientPrivilege, psycopg2.errors.UndefinedTable,
            psycopg2.errors.UndefinedFunction):
        conn.rollback()
        return None
    conn.rollback()
    return int(row[0]) if row else 0


def replay(conn: Connection, consumer: str, subconsumer: str = "", dl_ids: list[int] | None = None,
           from_encoding: str | None = None) -> int:
    """Puts the key's dead letters (all not replayed yet, or those of dl_ids) into their
    target queue, decoded from from_encoding (None: the source's own encoding), each
    once: marked replayed in the same transaction. Commits; returns the count."""
    if from_encoding is not None and (not isinstance(from_encoding, str) or not from_encoding.strip()):
        raise InvalidParameter(f"from_encoding must be an encoding name or None, got {from_encoding!r}")
    try:
        with conn.cursor() as cur:
            cur.execute(
                "select pgq_ext.replay_dead_letters(%s::text, %s::text, %s::bigint[], %s::text)",
                (consumer, subconsumer, dl_ids, from_encoding),
            )
            row = cur.fetchone()
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return int(row[0]) if row and row[0] is not None else 0
