"""Typed calls of the PgQ 3.x SQL API.

Every function runs in the caller's transaction and never commits: the mover
decides where transactions end, because that is what the protocol is about.
Queue and consumer names always travel as bound parameters.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from airflow_provider_pgq.core.errors import (
    ConsumerNotRegistered,
    EventTablesUntrusted,
    PgqError,
    PgqNotInstalled,
    QueueDisabled,
    QueueNotFound,
    TickNotFound,
    literal,
)

#: PgQ reports its own errors with RAISE EXCEPTION (SQLSTATE P0001) in its SQL and with
#: elog(ERROR) (XX000) in its C parts: told apart only by their text. The one place that
#: reads that text: PgQ 3.5's primary messages, and what each one means.
_PGQ_ERRORS: tuple[tuple[str, re.Pattern[str], type[PgqError]], ...] = (
    ("P0001", re.compile(r"Not subscriber to queue: "), ConsumerNotRegistered),  # next_batch_*
    ("P0001", re.compile(r"cannot reposition, tick not found: "), TickNotFound),  # register_consumer_at
    ("P0001", re.compile(r"Writing to queue disabled$"), QueueDisabled),  # current_event_table
    ("XX000", re.compile(r"Insert into queue disallowed$"), QueueDisabled),  # insert_event (C)
    ("P0001", re.compile(r"Event queue not found$"), QueueNotFound),  # current_event_table, insert_event
)


def pgq_error(exc: BaseException) -> type[PgqError] | None:
    """Which of our errors a database error raised by PgQ stands for, or None."""
    if not isinstance(exc, psycopg2.Error) or exc.diag is None:
        return None
    message = exc.diag.message_primary or ""
    for sqlstate, pattern, kind in _PGQ_ERRORS:
        if exc.pgcode == sqlstate and pattern.match(message):
            return kind
    return None


@dataclass(frozen=True)
class BatchInfo:
    batch_id: int
    prev_tick_id: int
    cur_tick_id: int
    prev_tick_time: dt.datetime
    cur_tick_time: dt.datetime
    prev_tick_event_seq: int | None
    cur_tick_event_seq: int | None


@dataclass(frozen=True)
class QueueInfo:
    queue_name: str
    external_ticker: bool
    ticker_paused: bool
    ticker_max_count: int
    ticker_max_lag: dt.timedelta
    ticker_idle_period: dt.timedelta
    ticker_lag: dt.timedelta | None
    ev_new: int | None
    #: the queue's newest tick (PgQ's get_queue_info column last_tick_id)
    newest_tick: int | None
    disable_insert: bool


@dataclass(frozen=True)
class ConsumerInfo:
    queue_name: str
    consumer_name: str
    lag: dt.timedelta | None
    last_seen: dt.timedelta | None
    last_tick: int | None
    current_batch: int | None
    next_tick: int | None
    pending_events: int | None


def _one(conn: Connection, query: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> tuple[Any, ...] | None:
    with conn.cursor() as cur:
        cur.execute(query, params)
        row = cur.fetchone()
    return tuple(row) if row is not None else None


def _value(conn: Connection, query: str, params: tuple[Any, ...] = ()) -> Any:
    row = _one(conn, query, params)
    return row[0] if row else None


def version(conn: Connection) -> str | None:
    """PgQ's version, or None where the pgq schema is absent."""
    if _value(conn, "select pg_catalog.to_regproc('pgq.version')") is None:
        return None
    return str(_value(conn, "select pgq.version()"))


def require_pgq(conn: Connection, side: str) -> str:
    ver = version(conn)
    if ver is None:
        db = _value(conn, "select pg_catalog.current_database()")
        raise PgqNotInstalled(
            f"the pgq extension is not installed in the {side} database {db!r}: "
            "run 'create extension pgq' there (Debian package postgresql-<major>-pgq3)"
        )
    return ver


def queue_exists(conn: Connection, queue: str) -> bool:
    return _one(conn, "select 1 from pgq.queue where queue_name = %s", (queue,)) is not None


def require_queue(conn: Connection, queue: str, side: str) -> None:
    if not queue_exists(conn, queue):
        db = _value(conn, "select pg_catalog.current_database()")
        raise QueueNotFound(
            f"{side} queue {queue!r} does not exist in database {db!r}: "
            f"create it with select pgq.create_queue({literal(queue)})"
        )


def create_queue(conn: Connection, queue: str) -> bool:
    """True when the queue was created, False when it existed."""
    return bool(_value(conn, "select pgq.create_queue(%s::text)", (queue,)))


def drop_queue(conn: Connection, queue: str, force: bool = False) -> None:
    _value(conn, "select pgq.drop_queue(%s::text, %s::boolean)", (queue, force))


def register_consumer(conn: Connection, queue: str, consumer: str) -> bool:
    """True when newly registered, False when it already was."""
    return bool(_value(conn, "select pgq.register_consumer(%s::text, %s::text)", (queue, consumer)))


def register_consumer_at(conn: Connection, queue: str, consumer: str, tick_id: int) -> bool:
    """Registers, or moves an existing registration, to tick_id; drops any active batch."""
    return bool(
        _value(conn, "select pgq.register_consumer_at(%s::text, %s::text, %s::bigint)", (queue, consumer, tick_id))
    )


def unregister_consumer(conn: Connection, queue: str, consumer: str) -> None:
    _value(conn, "select pgq.unregister_consumer(%s::text, %s::text)", (queue, consumer))


def is_registered(conn: Connection, queue: str, consumer: str) -> bool:
    return (
        _one(
            conn,
            "select 1 from pgq.subscription s"
            " join pgq.queue q on q.queue_id = s.sub_queue"
            " join pgq.consumer c on c.co_id = s.sub_consumer"
            " where q.queue_name = %s and c.co_name = %s",
            (queue, consumer),
        )
        is not None
    )


def _batch(row: tuple[Any, ...] | None) -> BatchInfo | None:
    if row is None or row[0] is None:
        return None
    batch_id, cur_tick, prev_tick, cur_time, prev_time, cur_seq, prev_seq = row
    return BatchInfo(batch_id, prev_tick, cur_tick, prev_time, cur_time, prev_seq, cur_seq)


_NEXT_BATCH_INFO = (
    "select batch_id, cur_tick_id, prev_tick_id, cur_tick_time, prev_tick_time,"
    " cur_tick_event_seq, prev_tick_event_seq from pgq.next_batch_info(%s::text, %s::text)"
)
_NEXT_BATCH_CUSTOM = (
    "select batch_id, cur_tick_id, prev_tick_id, cur_tick_time, prev_tick_time,"
    " cur_tick_event_seq, prev_tick_event_seq"
    " from pgq.next_batch_custom(%s::text, %s::text, %s::interval, %s::int4, %s::interval)"
)


def next_batch_info(conn: Connection, queue: str, consumer: str) -> BatchInfo | None:
    """The consumer's active batch, or a new one; None when no tick is ahead."""
    return _batch(
        _one(conn, _NEXT_BATCH_INFO, (queue, consumer))
    )


def next_batch_custom(
    conn: Connection,
    queue: str,
    consumer: str,
    min_lag: dt.timedelta | None = None,
    min_count: int | None = None,
    min_interval: dt.timedelta | None = None,
) -> BatchInfo | None:
    """Like next_batch_info, but coalesces ticks until min_count events or min_interval."""
    return _batch(
        _one(
            conn,
            _NEXT_BATCH_CUSTOM,
            (queue, consumer, min_lag, min_count, min_interval),
        )
    )


# The batch an adaptive mover takes next, in one string (one round trip, one implicit
# transaction, so the allocation is committed on its own): the per-consumer lock; then
# one statement that plans (sub, ticks, newest, plan), decides (decision), allocates
# (next_batch_custom, in taken) and returns the batch. (Not its event SQL as well: a
# concurrent run of the same mover may finish the batch before that is read, and
# batch_event_sql then fails; it is read after the target's decision.) A tick k can be selected
# exactly by next_batch_custom with min_count = count(k-1) + 1 and min_interval =
# interval(k-1) + 1 microsecond: each is met first at k. The plan: the furthest pending
# tick a batch of at most %(target)s events (at least one tick) may end at, no later than
# %(until)s; a batch near real time (one tick pending), the consumer's open batch, or no
# plan at all (not registered, nothing pending: PgQ answers that) is next_batch_info's.
_TAKE_BATCH = """
select pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(%(lock)s::text, 0::bigint));
with sub as (
    select s.sub_queue, s.sub_last_tick, s.sub_batch, l.tick_time as l_time, l.tick_event_seq as l_seq
      from pgq.queue q
      join pgq.subscription s on s.sub_queue = q.queue_id
      join pgq.consumer c on c.co_id = s.sub_consumer
      join pgq.tick l on l.tick_queue = s.sub_queue and l.tick_id = s.sub_last_tick
     where q.queue_name = %(queue)s::text and c.co_name = %(consumer)s::text
), ticks as (
    select t.tick_id, t.tick_time,
           t.tick_event_seq - sub.l_seq as cnt,
           t.tick_time - sub.l_time as ival,
           coalesce(pg_catalog.lag(t.tick_event_seq) over w - sub.l_seq, 0) as prev_cnt,
           coalesce(pg_catalog.lag(t.tick_time) over w - sub.l_time, interval '0') as prev_ival,
           pg_catalog.row_number() over w as n
      from sub join pgq.tick t on t.tick_queue = sub.sub_queue and t.tick_id > sub.sub_last_tick
    window w as (order by t.tick_id)
), newest as (
    select * from ticks order by tick_id desc limit 1
), plan as (
    select (select sub_batch is not null from sub) as open_batch,
           p.tick_id as pick_tick, p.n as pick_number, p.tick_id = newest.tick_id as pick_is_last,
           p.ival as pick_interval, p.prev_cnt, p.prev_ival
      from newest
      left join lateral (
          select * from ticks
           where ticks.tick_time <= coalesce(%(until)s::timestamptz, 'infinity')
             and (ticks.n = 1 or ticks.cnt <= %(target)s::bigint)
             and (ticks.n = 1 or ticks.tick_id = newest.tick_id
                  or newest.cnt > 2 * (ticks.prev_cnt + 1)
                  or newest.ival > 2 * (ticks.prev_ival + interval '1 microsecond'))
           order by ticks.tick_id desc
           limit 1
      ) p on true
), decision as (
    select case when pl.open_batch is null or pl.open_batch or pl.pick_number = 1 then 'info'
                when pl.pick_tick is null then 'hold'
                when pl.pick_is_last then 'last'
                else 'custom' end as how,
           pl.pick_interval, pl.prev_cnt, pl.prev_ival
      from (select) one left join plan pl on true
)
select b.batch_id, b.cur_tick_id, b.prev_tick_id, b.cur_tick_time, b.prev_tick_time,
       b.cur_tick_event_seq, b.prev_tick_event_seq, d.how = 'hold',
       -- no batch: where the consumer stands, for the report (read only then)
       case when b.batch_id is null then (
           select array[pg_catalog.date_part('epoch', i.lag)::text, i.pending_events::text]
             from pgq.get_consumer_info(%(queue)s::text, %(consumer)s::text) i) end,
       -- and when the next tick is due: the mean interval of the last five ticks, and
       -- how long ago the newest was
       case when b.batch_id is null then (
           select array[pg_catalog.date_part('epoch', (pg_catalog.max(r.tick_time) - pg_catalog.min(r.tick_time))
                                                      / nullif(pg_catalog.count(*) - 1, 0)::float8),
                        pg_catalog.date_part('epoch', pg_catalog.now() - pg_catalog.max(r.tick_time))]
             from (select k.tick_time from pgq.tick k join pgq.queue q on q.queue_id = k.tick_queue
                    where q.queue_name = %(queue)s::text order by k.tick_id desc limit 5) r) end
  from decision d
  left join lateral (
      -- the allocation takes its queue name from g, which has no row when held back
      -- (offset 0: g is not folded into the call), so it runs only when decided, once
      select nb.* from (select %(queue)s::text as queue_name where d.how <> 'hold' offset 0) g
      cross join lateral pgq.next_batch_custom(
          g.queue_name, %(consumer)s::text, null::interval,
          case when d.how = 'custom' and d.prev_cnt + 1 <= 2147483647 then (d.prev_cnt + 1)::int4 end,
          case d.how when 'last' then d.pick_interval
                     when 'custom' then d.prev_ival + interval '1 microsecond' end) nb
  ) b on true
"""


@dataclass(frozen=True)
class Taken:
    """What take_batch found: the batch, or none and then whether
    ticks are held back by ``until`` and the consumer's lag and pending events."""

    batch: BatchInfo | None
    held_back: bool = False
    lag_seconds: float | None = None
    pending_events: int | None = None
    #: the queue's recent tick interval, and the age of its newest tick (seconds)
    tick_period: float | None = None
    newest_tick_age: float | None = None

    def next_tick_in(self) -> float | None:
        """Seconds until the next tick is due at the recent pace: negative when it is
        late; None when the pace is not known."""
        if self.tick_period is None or self.newest_tick_age is None:
            return None
        return self.tick_period - self.newest_tick_age


def take_batch(
    conn: Connection, queue: str, consumer: str, target: int, until: dt.datetime | None, lock: str,
) -> Taken:
    """The next batch in one round trip. Run it in autocommit: the string is one implicit
    transaction, so the lock is held through the allocation and the allocation is
    committed on its own."""
    row = _one(conn, _TAKE_BATCH, {"lock": lock, "queue": queue, "consumer": consumer, "target": target,
                                   "until": until})
    assert row is not None
    batch = _batch(row[:7])
    if batch is not None:
        return Taken(batch)
    lag, pending = row[8] if row[8] is not None else (None, None)
    period, age = row[9] if row[9] is not None else (None, None)
    return Taken(None, bool(row[7]), float(lag) if lag is not None else None,
                 int(pending) if pending is not None else None,
                 float(period) if period is not None else None, float(age) if age is not None else None)


def events_up_to_last_tick(conn: Connection, queue: str, consumer: str) -> int:
    """Event-sequence distance from the consumer's last tick to the queue's newest
    tick: what a batch up to the newest tick holds (force_tick inflates it)."""
    return int(
        _value(
            conn,
            "select coalesce(pg_catalog.max(t.tick_event_seq) - pg_catalog.min(l.tick_event_seq), 0)"
            " from pgq.queue q"
            " join pgq.consumer c on c.co_name = %s"
            " join pgq.subscription s on s.sub_queue = q.queue_id and s.sub_consumer = c.co_id"
            " join pgq.tick l on l.tick_queue = q.queue_id and l.tick_id = s.sub_last_tick"
            " join pgq.tick t on t.tick_queue = q.queue_id and t.tick_id > s.sub_last_tick"
            " where q.queue_name = %s",
            (consumer, queue),
        )
    )


def batch_is_active(conn: Connection, batch_id: int) -> bool:
    """Whether batch_id is still some consumer's open batch."""
    return _one(conn, "select 1 from pgq.subscription where sub_batch = %s", (batch_id,)) is not None


def batch_event_sql(conn: Connection, batch_id: int) -> str:
    """The SELECT that yields exactly the batch's events, retry-queue events included."""
    return str(_value(conn, "select pgq.batch_event_sql(%s::bigint)", (batch_id,)))


def batch_max_event_id(conn: Connection, batch_sql: str) -> int:
    """Largest ev_id among a batch's events (batch_sql from batch_event_sql)."""
    query = sql.SQL("select pg_catalog.max(ev_id) from ({}) b").format(sql.SQL(batch_sql))
    return int(_value(conn, query.as_string(conn)) or 0)


def finish_batch(conn: Connection, batch_id: int) -> bool:
    """False when the batch was not active any more (someone else finished it)."""
    return bool(_value(conn, "select pgq.finish_batch(%s::bigint)", (batch_id,)))


def force_tick(conn: Connection, queue: str) -> int | None:
    """Marks the queue so the next ticker pass ticks; returns the newest tick id now."""
    return _value(conn, "select pgq.force_tick(%s::text)", (queue,))  # type: ignore[no-any-return]


def ticker(conn: Connection, queue: str) -> int | None:
    """One ticker pass on the queue; the new tick id, or None when it saw no reason to tick.

    Never call this where pgqd runs, nor twice at once: see core.ticking.
    """
    return _value(conn, "select pgq.ticker(%s::text)", (queue,))  # type: ignore[no-any-return]


def newest_tick(conn: Connection, queue: str) -> int | None:
    """The queue's newest tick (PgQ's ``last_tick_id``); None without ticks or queue."""
    return _value(  # type: ignore[no-any-return]
        conn,
        "select pg_catalog.max(t.tick_id) from pgq.tick t join pgq.queue q on q.queue_id = t.tick_queue"
        " where q.queue_name = %s",
        (queue,),
    )


def current_event_table(conn: Connection, queue: str) -> str:
    """Schema-qualified name of the table taking the queue's inserts in this transaction."""
    return str(_value(conn, "select pgq.current_event_table(%s::text)", (queue,)))


def get_queue_info(conn: Connection, queue: str) -> QueueInfo:
    row = _one(
        conn,
        "select i.queue_name, i.queue_external_ticker, i.queue_ticker_paused,"
        " i.queue_ticker_max_count, i.queue_ticker_max_lag, i.queue_ticker_idle_period,"
        " i.ticker_lag, i.ev_new, i.last_tick_id, q.queue_disable_insert"
        " from pgq.get_queue_info(%s::text) i join pgq.queue q on q.queue_name = i.queue_name",
        (queue,),
    )
    if row is None:
        raise QueueNotFound(f"queue {queue!r} does not exist")
    return QueueInfo(*row)


def get_consumer_info(conn: Connection, queue: str, consumer: str) -> ConsumerInfo | None:
    row = _one(
        conn,
        "select queue_name, consumer_name, lag, last_seen, last_tick, current_batch,"
        " next_tick, pending_events from pgq.get_consumer_info(%s::text, %s::text)",
        (queue, consumer),
    )
    return ConsumerInfo(*row) if row else None


def count_queue_events(conn: Connection, queue: str) -> int:
    """Rows in all of the queue's event tables (for reports; a full count)."""
    pfx = _value(conn, "select queue_data_pfx from pgq.queue where queue_name = %s", (queue,))
    if pfx is None:
        raise QueueNotFound(f"queue {queue!r} does not exist")
    schema, _, table = str(pfx).partition(".")
    query = sql.SQL("select pg_catalog.count(*) from {}").format(sql.Identifier(schema, table))
    return int(_value(conn, query.as_string(conn)))


def set_queue_config(conn: Connection, queue: str, name: str, value: str) -> None:
    """name without the 'queue_' prefix: ticker_max_count, rotation_period, ..."""
    _value(conn, "select pgq.set_queue_config(%s::text, %s::text, %s::text)", (queue, name, value))


def insert_event(
    conn: Connection,
    queue: str,
    ev_type: str | None,
    ev_data: str | None,
    extra1: str | None = None,
    extra2: str | None = None,
    extra3: str | None = None,
    extra4: str | None = None,
) -> int:
    return int(
        _value(
            conn,
            "select pgq.insert_event(%s::text, %s::text, %s::text, %s::text, %s::text, %s::text, %s::text)",
            (queue, ev_type, ev_data, extra1, extra2, extra3, extra4),
        )
    )


def oldest_tick_id(conn: Connection, queue: str) -> int | None:
    """The queue's oldest retained tick: the earliest position a consumer can be registered at
    (older ticks went with the event tables PgQ rotated away)."""
    return _value(  # type: ignore[no-any-return]
        conn,
        "select pg_catalog.min(t.tick_id) from pgq.tick t join pgq.queue q on q.queue_id = t.tick_queue"
        " where q.queue_name = %s::text",
        (queue,),
    )


def events_before_tick(conn: Connection, queue: str, tick_id: int) -> int:
    """Rows the queue's event tables still hold that belong to tick_id or earlier: events a
    consumer positioned at tick_id never sees (a full scan: for registration, not per batch)."""
    row = _one(
        conn,
        "select q.queue_data_pfx, t.tick_snapshot::text from pgq.queue q"
        " join pgq.tick t on t.tick_queue = q.queue_id and t.tick_id = %s::bigint"
        " where q.queue_name = %s::text",
        (tick_id, queue),
    )
    if row is None:
        return 0
    schema, _, table = str(row[0]).partition(".")
    query = sql.SQL(
        "select pg_catalog.count(*) from {} e"
        " where pg_catalog.txid_visible_in_snapshot(e.ev_txid, %s::pg_catalog.txid_snapshot)"
    ).format(sql.Identifier(schema, table))
    return int(_value(conn, query.as_string(conn), (row[1],)))


#: The first relation among a queue's event tables (the parent named in pgq.queue and
#: the tables that inherit it) that PgQ would not have made so, and why: outside schema
#: pgq, owned by another role than pgq.queue's owner, or carrying a trigger or rule.
FOREIGN_EVENT_TABLE = """
with q as (
    select q.queue_data_pfx as pfx, pg_catalog.to_regclass(q.queue_data_pfx) as parent,
           (select t.relowner from pg_catalog.pg_class t where t.oid = 'pgq.queue'::pg_catalog.regclass) as owner
      from pgq.queue q where q.queue_name = %s::text
), rels as (
    select c.oid, c.relnamespace, c.relowner, c.relkind, c.relhasrules, q.owner
      from q join pg_catalog.pg_class c
        on c.oid = q.parent
        or c.oid in (select i.inhrelid from pg_catalog.pg_inherits i where i.inhparent = q.parent)
)
select pfx, null::text from q where parent is null
union all
select * from (
    select r.oid::pg_catalog.regclass::text,
           case when r.relnamespace <> 'pgq'::pg_catalog.regnamespace then 'is not in schema pgq'
                when r.relkind <> 'r' then pg_catalog.format('is of kind %%L, not a table', r.relkind)
                when r.relowner <> r.owner then pg_catalog.format(
                    'is owned by %%L, not by %%L (the owner of pgq.queue)',
                    pg_catalog.pg_get_userbyid(r.relowner), pg_catalog.pg_get_userbyid(r.owner))
                when exists (select 1 from pg_catalog.pg_trigger t where t.tgrelid = r.oid and not t.tgisinternal)
                then 'carries triggers (' || (select pg_catalog.string_agg(pg_catalog.quote_ident(t.tgname), ', ')
                                               from pg_catalog.pg_trigger t
                                              where t.tgrelid = r.oid and not t.tgisinternal) || ')'
                when r.relhasrules then 'carries rules'
           end as why
      from rels r
) f where why is not null
limit 1
"""


def require_own_event_tables(conn: Connection, queue: str, side: str = "target") -> None:
    """EventTablesUntrusted unless the queue's event tables are as PgQ makes them: in
    schema pgq, owned by pgq.queue's owner, without triggers or rules. Whoever writes
    them would run such a trigger's code with its own rights (a superuser mover's, or
    pgq_ext's owner's on the least-privilege paths)."""
    row = _one(conn, FOREIGN_EVENT_TABLE, (queue,))
    if row is None:
        return
    table, why = row
    why = why or "which does not exist"
    raise EventTablesUntrusted(
        f"{side} queue {queue!r}: its event table {table} {why}; PgQ makes them owned by"
        " the owner of pgq.queue, without triggers, and the mover writes into no other: an admin"
        " should find out who changed them, and restore them (alter table ... owner to, drop"
        " trigger) or recreate the queue"
    )

