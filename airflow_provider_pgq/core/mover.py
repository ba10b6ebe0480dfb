"""QueueMover: the move protocol, one batch at a time, and draining with bounds.

Per batch (S = source connection, T = target connection, autocommit off):
1. S: next batch, committed in its own short transaction.
2. T: transaction-scoped lock on the tracking key (consumer, subconsumer).
3. T: the key's source binding and last applied tick decide: apply (mark is none or
   the batch's prev tick), skip (mark is its cur tick), or stop (anything else).
4. Events streamed from S into the target queue's current event table.
5. T: mark := cur tick; commit T.
6. S: finish batch; commit S.
A crash anywhere leaves either batch+mark on the target or neither: both retry safely.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from airflow_provider_pgq.core import (
    connect,
    faults,
    guard,
    kept_ids,
    pgq,
    pgq_ext,
    poison,
    registration,
    ticking,
    transfer,
)
from airflow_provider_pgq.core.errors import (
    ConsumerNotRegistered,
    InvalidEvents,
    InvalidParameter,
    PgqError,
    PositionMismatch,
    QueueDisabled,
    QueueNotFound,
    TickNotFound,
    TrackingKeyConflict,
    WaitTimeout,
    literal,
)
from airflow_provider_pgq.core.journal import Who
from airflow_provider_pgq.core.pending import MoverStatus, pending_status

log = logging.getLogger(__name__)

COPY_PATH = "copy"
CHUNK_PATH = "insert_event_chunk"


#: An idle loop polls this long after the next tick is due (idle_wait).
IDLE_POLL_MARGIN = 0.05

#: pgq.next_batch_custom takes min_count as int4: a larger threshold fails inside PgQ.
MAX_MIN_BATCH_EVENTS = 2**31 - 1
#: Longest min_batch_interval taken: coalescing ticks for longer is a mistake, not a plan.
MAX_BATCH_INTERVAL = dt.timedelta(days=365)
#: Largest chunk_size: a chunk travels as one array per column (PostgreSQL caps a value
#: at 1 GB) and sits in memory whole on both sides.
MAX_CHUNK_SIZE = 1_000_000


def _refuse_nul(name: str, value: str) -> None:
    """PostgreSQL text cannot hold NUL: refused here, by name, instead of psycopg2's
    "A string literal cannot contain NUL" in the middle of a run."""
    if "\x00" in value:
        raise InvalidParameter(
            f"{name} must not contain a NUL character (\\x00), got {value!r}:"
            " PostgreSQL text cannot hold one"
        )


def _require_flag(name: str, value: object) -> None:
    """True or False only: a string such as "false" would count as true."""
    if not isinstance(value, bool):
        raise InvalidParameter(f"{name} must be True or False, got {value!r}")


def _require_whole(name: str, value: object, low: int, high: int | None, extra: str = "") -> None:
    """An int (not a bool, which Python counts as one) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"from {low} to {high}" if high is not None else f">= {low}"
        raise InvalidParameter(f"{name} must be a whole number {allowed}{' ' + extra if extra else ''}, got {value!r}")


def _require_seconds(name: str, value: object, extra: str = "", unit: str = "seconds") -> None:
    """A finite number of seconds (or unit) above zero: NaN never compares true, so a NaN
    bound would silently never stop a drain; a bool is not a duration."""
    good = False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            good = math.isfinite(float(value)) and value > 0
        except OverflowError:  # an int beyond any float
            good = False
    if not good:
        raise InvalidParameter(
            f"{name} must be a finite number of {unit} above zero{' ' + extra if extra else ''}, got {value!r}"
        )


def check_batching(
    min_batch_events: object = None, min_batch_interval: object = None, chunk_size: object = 5000
) -> None:
    """The batch-shaping options of MoverOptions, on their own: the operator checks them
    when the DAG is parsed, before the queue names (templated) are known."""
    if min_batch_events is not None:
        _require_whole("min_batch_events", min_batch_events, 1, MAX_MIN_BATCH_EVENTS, "or None")
    if min_batch_interval is not None and (
        not isinstance(min_batch_interval, dt.timedelta)
        or not dt.timedelta(0) < min_batch_interval <= MAX_BATCH_INTERVAL
    ):
        shown = str(min_batch_interval) if isinstance(min_batch_interval, dt.timedelta) else repr(min_batch_interval)
        raise InvalidParameter(
            f"min_batch_interval must be a timedelta above zero and at most {MAX_BATCH_INTERVAL.days}"
            f" days, or None, got {shown}"
        )
    _require_whole("chunk_size", chunk_size, 1, MAX_CHUNK_SIZE)


def seconds_to_interval(name: str, value: float | dt.timedelta | None) -> dt.timedelta | None:
    """A number of seconds (or a timedelta, or None) as a timedelta; InvalidParameter
    instead of timedelta's own ValueError/OverflowError for NaN, infinite or huge values."""
    if value is None or isinstance(value, dt.timedelta):
        return value
    _require_seconds(name, value, "(or a timedelta, or None)")
    seconds = float(value)
    if seconds > MAX_BATCH_INTERVAL.total_seconds():
        raise InvalidParameter(
            f"{name} must be at most {MAX_BATCH_INTERVAL.total_seconds():.0f} seconds"
            f" ({MAX_BATCH_INTERVAL.days} days), got {value!r}"
        )
    return dt.timedelta(seconds=seconds)


def normalize_table_filter(names: object) -> tuple[str, ...]:
    """table_filter as a tuple of schema-qualified names, as skytools' fq_name made them:
    'orders' is 'public.orders'; compared with ev_extra1 exactly (case included)."""
    if names is None:
        return ()
    if isinstance(names, str) or not isinstance(names, (list, tuple, set, frozenset)):
        raise InvalidParameter(f"table_filter must be a list of table names, got {names!r}")
    out: list[str] = []
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise InvalidParameter(f"table_filter names must be non-empty strings, got {name!r}")
        _refuse_nul("table_filter", name)
        name = name.strip()
        out.append(name if "." in name else f"public.{name}")
    return tuple(dict.fromkeys(out))


def check_keep_lag(keep_lag: object) -> None:
    if keep_lag is not None and (
        not isinstance(keep_lag, dt.timedelta) or not dt.timedelta(0) < keep_lag <= MAX_BATCH_INTERVAL
    ):
        raise InvalidParameter(
            f"keep_lag must be a timedelta above zero and at most {MAX_BATCH_INTERVAL.days} days, or None,"
            f" got {keep_lag!r}"
        )


#: A database's (system identifier, name, server start time): the first two name the
#: source in pgq_ext's binding; the start time tells apart two servers cloned from one
#: base backup. In UTC, so that sessions with different TimeZone settings agree. Every
#: function in it may be executed by any role (PUBLIC), pgq_reader included.
_IDENTITY = (
    "(select s.system_identifier::text from pg_catalog.pg_control_system() s),"
    " pg_catalog.current_database()::text,"
    " pg_catalog.to_char(pg_catalog.timezone('UTC', pg_catalog.pg_postmaster_start_time()),"
    " 'YYYY-MM-DD HH24:MI:SS.US')"
)

#: Of the target queue q: may this role COPY into its event tables (INSERT, the event
#: sequence, current_event_table), may it call pgq_mover's insert_event_chunk.
_WRITE_PATHS = (
    "pg_catalog.has_table_privilege("
    "pg_catalog.concat(q.queue_data_pfx, '_', q.queue_cur_table), 'INSERT')"
    " and pg_catalog.has_sequence_privilege(q.queue_event_seq, 'USAGE')"
    " and pg_catalog.has_function_privilege('pgq.current_event_table(text)', 'EXECUTE'),"
    " pg_catalog.has_function_privilege('pgq_ext.insert_event_chunk(text, text[], text[],"
    " text[], text[], text[], text[], timestamptz[], bigint[])', 'EXECUTE')"
)

REGISTER_AT = registration.REGISTER_AT  # where a new registration starts


#: Defaults of MoverOptions.batch_target_events / batch_target_seconds (measured in
#: benchmarks/bench_mover.py: past ~100k events a batch the fixed costs are noise).
DEFAULT_BATCH_TARGET_EVENTS = 200_000
DEFAULT_BATCH_TARGET_SECONDS = 10.0


@dataclass(frozen=True)
class MoverOptions:
    """What to move where, under which tracking key."""

    source_queue: str
    target_queue: str
    consumer: str
    subconsumer: str = ""
    register_consumer: bool = False
    install_pgq_ext: bool = False
    keep_event_id: bool = False
    min_batch_events: int | None = None
    min_batch_interval: dt.timedelta | None = None
    chunk_size: int = 5000
    #: Catching up, ticks are coalesced into batches of about this many events (1: one
    #: tick per batch, as the classic tool). See docs/benchmarks.md for how it was chosen.
    batch_target_events: int = DEFAULT_BATCH_TARGET_EVENTS
    #: ... and of about this duration: a slower move shrinks the next batch.
    batch_target_seconds: float = DEFAULT_BATCH_TARGET_SECONDS
    #: Where register_consumer puts a new consumer: "now" (the queue's newest tick, PgQ's
    #: own rule: what was queued before is never seen) or "oldest" (the oldest tick the
    #: queue still retains, so the events it still holds are moved too).
    register_at: str = "now"
    #: Move only events whose ev_extra1 names one of these tables (skytools' table_filter);
    #: a name without a schema means public.<name>. The others are consumed, not moved.
    table_filter: tuple[str, ...] = ()
    #: Only batches whose end tick is at least this old (skytools' pgq_keep_lag, PgQ's
    #: min_lag): the target stays this far behind the source.
    keep_lag: dt.timedelta | None = None
    #: Catching up, at most this many events a second on average: batches of at most a
    #: second of it, and after each a pause that keeps the average (a gentle hand on a
    #: busy OLTP source). None: as fast as both sides go.
    max_events_per_second: float | None = None
    #: What to do with events the target refuses for their content (an encoding error):
    #: "stop" (the default) fails the batch with one line naming them; "dead_letter" moves
    #: the rest of the batch and keeps them, byte for byte, in pgq_ext.dead_letter on the
    #: target, in the batch's transaction (see core/poison.py).
    invalid_events: str = poison.STOP
    #: Who runs this mover, recorded in the target's move journal with every batch (the
    #: operator: the Airflow task instance; the CLI: its job name). None: host and pid only.
    who: Who | None = None

    def __post_init__(self) -> None:
        for name in ("source_queue", "target_queue", "consumer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise InvalidParameter(f"{name} must be a non-empty string, got {value!r}")
            _refuse_nul(name, value)
        if not isinstance(self.subconsumer, str):
            raise InvalidParameter(f"subconsumer must be a string, got {self.subconsumer!r}")
        _refuse_nul("subconsumer", self.subconsumer)
        for name in ("register_consumer", "install_pgq_ext", "keep_event_id"):
            _require_flag(name, getattr(self, name))
        check_batching(self.min_batch_events, self.min_batch_interval, self.chunk_size)
        _require_whole("batch_target_events", self.batch_target_events, 1, 2**62)
        _require_seconds("batch_target_seconds", self.batch_target_seconds)
        registration.check_register_at(self.register_at)
        object.__setattr__(self, "table_filter", normalize_table_filter(self.table_filter))
        check_keep_lag(self.keep_lag)
        if self.max_events_per_second is not None:
            _require_seconds("max_events_per_second", self.max_events_per_second, "or None", "events a second")
        poison.check_invalid_events(self.invalid_events)
        if self.who is not None and not isinstance(self.who, Who):
            raise InvalidParameter(f"who must be a journal.Who or None, got {self.who!r}")

    @property
    def key(self) -> str:
        return f"consumer {self.consumer!r}" + (
            f" subconsumer {self.subconsumer!r}" if self.subconsumer else ""
        )


@dataclass(frozen=True)
class DrainBounds:
    """When a drain stops besides running out of batches. None: no bound."""

    max_batches: int | None = None
    max_events: int | None = None
    max_runtime: float | None = None
    stop_at: dt.datetime | None = None
    force_tick: bool = False
    run_ticker: bool = False
    tick_timeout: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_batches", "max_events"):
            value = getattr(self, name)
            if value is not None:
                _require_whole(name, value, 1, None, "or None")
        if self.max_runtime is not None:
            _require_seconds("max_runtime", self.max_runtime, "or None")
        _require_seconds("tick_timeout", self.tick_timeout)
        for name in ("force_tick", "run_ticker"):
            _require_flag(name, getattr(self, name))
        if self.stop_at is not None and (
            not isinstance(self.stop_at, dt.datetime) or self.stop_at.utcoffset() is None
        ):
            raise InvalidParameter(f"stop_at must be a timezone-aware datetime, got {self.stop_at!r}")


@dataclass(frozen=True)
class BatchResult:
    batch_id: int
    prev_tick_id: int
    cur_tick_id: int
    outcome: str  # "moved", "skipped" (already applied), "stale" (finished by another mover)
    events: int
    seconds: float
    #: Events of the batch that table_filter left out: consumed, not moved.
    filtered: int = 0
    #: Events the target refused, kept in pgq_ext.dead_letter (invalid_events = dead_letter).
    dead_lettered: int = 0


@dataclass
class MoveReport:
    """What one drain did; JSON-serialisable through to_dict()."""

    source_queue: str
    target_queue: str
    consumer_name: str
    subconsumer: str
    batches: int = 0
    skipped: int = 0
    stale: int = 0
    events: int = 0
    #: Events consumed but not moved because table_filter does not name their table.
    filtered: int = 0
    #: Events the target refused, kept in pgq_ext.dead_letter instead (invalid_events).
    dead_lettered: int = 0
    first_tick: int | None = None
    last_tick: int | None = None
    seconds: float = 0.0
    stop_reason: str = ""
    write_path: str = ""
    lag_seconds: float | None = None
    pending_events: int | None = None
    batch_results: list[BatchResult] = field(default_factory=list, repr=False)

    def add(self, result: BatchResult) -> None:
        self.batch_results.append(result)
        if result.outcome == "moved":
            self.batches += 1
            self.events += result.events
            self.filtered += result.filtered
            self.dead_lettered += result.dead_lettered
        elif result.outcome == "skipped":
            self.skipped += 1
        else:
            self.stale += 1
        if result.outcome != "stale":
            if self.first_tick is None:
                self.first_tick = result.prev_tick_id
            self.last_tick = result.cur_tick_id

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["batch_results"]
        return out


def _quietly(action: Callable[[], Any]) -> None:
    try:
        action()
    except (psycopg2.Error, OSError):
        pass


def _sides(refused: list[poison.Refused]) -> str:
    """The side that refused the events: one side's name, or "source and target"."""
    sides = sorted({r.side for r in refused})
    return sides[0] if len(sides) == 1 else " and ".join(sides)


def _split(ids: list[int], lo: int, hi: int) -> int:
    """Where to halve ids[lo:hi] (ev_id order) without parting two events of one id;
    ids[lo] != ids[hi - 1], so there is such a place."""
    mid = (lo + hi) // 2
    up = mid
    while up < hi and ids[up - 1] == ids[up]:
        up += 1
    if up < hi:
        return up
    while mid > lo + 1 and ids[mid - 1] == ids[mid]:
        mid -= 1
    return mid


class Decision(enum.Enum):
    """What step 3 of the protocol makes of a batch, given the target's mark."""

    APPLY = "apply"  # no mark yet, or the mark is the batch's start
    SKIP = "skip"  # the mark is the batch's end: applied before, finish it only
    STALE = "stale"  # another mover applied and finished it meanwhile
    MISMATCH = "mismatch"  # the positions disagree: never guess


def decide(mark: int | None, prev_tick: int, cur_tick: int, batch_active: Callable[[], bool]) -> Decision:
    """The decision from the mark and the batch's ticks; batch_active (does the source
    still hold this batch open?) is asked only when they disagree."""
    if mark is None or mark == prev_tick:
        return Decision.APPLY
    if mark == cur_tick:
        return Decision.SKIP
    return Decision.MISMATCH if batch_active() else Decision.STALE


class QueueMover:
    """Moves a source queue's batches into a target queue, exactly once.

    Owns no connections: the caller opens and closes them (the operator through
    PgqHook, the CLI from its ini file, tests directly).
    """

    def __init__(
        self,
        source: Connection,
        target: Connection,
        options: MoverOptions,
        fault: faults.FaultHook | None = None,
        on_batch: Callable[[BatchResult], None] | None = None,
    ) -> None:
        self.source = source
        self.target = target
        for conn, side in ((source, "source"), (target, "target")):  # named in timeout messages
            if isinstance(conn, guard.GuardedConnection):
                conn.side = side
        self.options = options
        self._fault = fault
        self._on_batch = on_batch
        self._target_events = self._capped(options.batch_target_events)
        self.held_back = False
        self._prepared = False
        #: the last next_batch() that found no batch said where the consumer stands
        self._last_taken: pgq.Taken | None = None
        self._said_unowned = False
        self._filtered = 0  # table_filter's left-out events of the batch being applied
        self._dead_lettered = 0  # events of the batch being applied kept in the dead-letter table
        #: the journal's "who" of every batch: the caller's, with this host and pid unless it gave them
        self._who = Who.here(**(options.who.as_json() if options.who else {})).as_json()
        self._source_identity: tuple[str, str] = ("", "")
        #: the chunk path's stage_events answer, asked with the key's lock (pgq_ext.begin_batch(stage=True))
        self._staged: pgq_ext.Staged | None = None
        self.write_path = ""

    # -- checks ---------------------------------------------------------------

    def prepare(self) -> None:
        """Checks both sides once, before any batch is taken; writes nothing but
        pgq_ext (when install_pgq_ext; the tracking key's row, which makes a new key this
        login's) and the registration (when register_consumer).

        First the quick way (_prepare_quickly: one read on the source, a read and the key's
        row on the target); when anything there is not as a working mover needs it, the
        checks one by one, which say what is wrong (and install, where asked)."""
        o = self.options
        try:
            if self._prepare_quickly():
                self._prepared = True
                log.info("moving %s -> %s as %s, writing through %s", o.source_queue, o.target_queue, o.key,
                         self.write_path)
                return
            self._check_step_by_step()
        except BaseException:
            _quietly(self.source.rollback)
            _quietly(self.target.rollback)
            raise
        # Said on every drain: a caller that drains in a loop (the CLI) shows it once.
        log.info("moving %s -> %s as %s, writing through %s", o.source_queue, o.target_queue, o.key, self.write_path)
        self._prepared = True

    def _prepare_quickly(self) -> bool:
        """prepare() in three round trips: what every check needs, read in one statement
        on each side (settling connections of connect_unsettled() on the way), decided
        here; then, only when all of them pass, pgq_ext's schema version and the key's
        row (ensure_key, committed) in one statement: pgq_ext is called only once it is
        known to be trusted. False when anything is not as a working mover needs it (or a
        read failed on a missing object): nothing was written then, and the checks one by
        one find what it is and say so, in their order. keep_event_id movers take that
        way always (kept_ids.check comes between the trust and the key's row)."""
        o = self.options
        if o.keep_event_id:
            return False
        try:
            with guard.autocommit(self.source):
                source = self._read_source_facts()
            pgq_present, queue_present, registered, source_identity = source
            if not (pgq_present and queue_present and (registered or o.register_consumer)):
                return False
            with guard.autocommit(self.target):
                target = self._read_target_facts()
            if target is None:
                return False
            facts, target_identity = target
            if o.source_queue == o.target_queue and source_identity == target_identity:
                return False  # the queue into itself: refused with the whole story below
            pgq_present, disable_insert, own_tables, role_ok, trusted, can_copy, can_chunk = facts
            if not (pgq_present and own_tables and not disable_insert and role_ok and trusted
                    and (can_copy or can_chunk)):
                return False
            with guard.autocommit(self.target):
                with self.target.cursor() as cur:
                    cur.execute(
                        "select x.v, case when x.v >= %s then pgq_ext.ensure_key(%s::text, %s::text) end"
                        " from (select pgq_ext.mover_schema_version() as v offset 0) x",
                        (pgq_ext.REQUIRED_MOVER_SCHEMA, o.consumer, o.subconsumer),
                    )
                    row = cur.fetchone()
        except psycopg2.ProgrammingError:  # a missing object or right: the long way says which
            _quietly(self.source.rollback)
            _quietly(self.target.rollback)
            return False
        if row is None or row[0] is None or row[0] < pgq_ext.REQUIRED_MOVER_SCHEMA:
            return False
        self.write_path = COPY_PATH if can_copy else CHUNK_PATH
        self._warn_unowned(row[1] is None)
        if not registered:  # the registration last, as below: after every check of both sides
            self.ensure_registered()
            self.source.rollback()
        self._source_identity = source_identity[:2]
        return True

    def _read_source_facts(self) -> tuple[bool, bool, bool, tuple[str, str, str]]:
        """(pgq present, the queue present, the consumer registered, the identity) of the
        source, in one statement; ProgrammingError where pgq's tables are missing."""
        o = self.options
        settle = connect.settle_columns(self.source)
        query = sql.SQL(
            "select pg_catalog.to_regproc('pgq.version') is not null,"
            " exists (select 1 from pgq.queue q where q.queue_name = %s::text),"
            " exists (select 1 from pgq.subscription s"
            "  join pgq.queue q on q.queue_id = s.sub_queue"
            "  join pgq.consumer c on c.co_id = s.sub_consumer"
            "  where q.queue_name = %s::text and c.co_name = %s::text), {identity}{settle}"
        ).format(identity=sql.SQL(_IDENTITY), settle=settle or sql.SQL(""))
        with self.source.cursor() as cur:
            cur.execute(query, (o.source_queue, o.source_queue, o.consumer))
            row = cur.fetchone()
        assert row is not None
        if settle is not None:
            connect.settle_with(self.source, row[6], row[7])
        return bool(row[0]), bool(row[1]), bool(row[2]), (str(row[3]), str(row[4]), str(row[5]))

    def _read_target_facts(self) -> tuple[tuple[bool, ...], tuple[str, str, str]] | None:
        """What the target's checks need, in one statement, pgq_ext not called: (pgq
        present, inserts disabled, the event tables PgQ's own, pgq_mover a NOLOGIN role
        (or absent), pgq_ext trusted, may COPY, may insert chunks) and the identity; None
        when the queue is missing. ProgrammingError where pgq's tables are missing."""
        o = self.options
        settle = connect.settle_columns(self.target)
        query = sql.SQL(
            "select pg_catalog.to_regproc('pgq.version') is not null, q.queue_disable_insert,"
            " not exists ({foreign}),"
            " not exists (select from pg_catalog.pg_roles r where r.rolname = %s::text"
            "  and (r.rolcanlogin or r.rolsuper)),"
            " not exists ({untrusted}), {write_paths}, {identity}{settle}"
            " from pgq.queue q where q.queue_name = %s::text"
        ).format(foreign=sql.SQL(pgq.FOREIGN_EVENT_TABLE), untrusted=pgq_ext.UNTRUSTED,
                 write_paths=sql.SQL(_WRITE_PATHS), identity=sql.SQL(_IDENTITY), settle=settle or sql.SQL(""))
        with self.target.cursor() as cur:
            cur.execute(query, (o.target_queue, pgq_ext.MOVER_ROLE, o.target_queue))
            row = cur.fetchone()
        if row is None:
            return None
        if settle is not None:
            connect.settle_with(self.target, row[10], row[11])
        return tuple(bool(v) for v in row[:7]), (str(row[7]), str(row[8]), str(row[9]))

    def _warn_unowned(self, unowned: bool) -> None:
        if unowned and not self._said_unowned:  # once per mover, not every drain of a loop
            self._said_unowned = True
            o = self.options
            log.warning(
                "tracking key %s on the target has no owner (pgq_ext's install took it over):"
                " any member of pgq_mover may move or clear it; an admin gives it to this mover's"
                " role with select pgq_ext.assign_key(%s, %s, <role>)",
                o.key, literal(o.consumer), literal(o.subconsumer),
            )

    def _check_step_by_step(self) -> None:
        """prepare()'s checks one by one, each with its own error; connections of
        connect_unsettled() are settled at the end."""
        o = self.options
        pgq.require_pgq(self.source, "source")
        pgq.require_queue(self.source, o.source_queue, "source")
        pgq.require_pgq(self.target, "target")
        pgq.require_queue(self.target, o.target_queue, "target")
        pgq.require_own_event_tables(self.target, o.target_queue)
        self._refuse_same_queue()
        if pgq.get_queue_info(self.target, o.target_queue).disable_insert:
            raise QueueDisabled(
                f"target queue {o.target_queue!r} has inserts disabled: set"
                " pgq.queue.queue_disable_insert back to false for it, then retry"
            )
        self.target.rollback()
        pgq_ext.require(self.target, install_if_missing=o.install_pgq_ext)
        self.target.rollback()
        if o.keep_event_id:  # refused early when the target queue has another writer
            kept_ids.check(self.target, o.consumer, o.subconsumer, o.target_queue, o.key)
            self.target.rollback()
        # Every check before the registration: a run that fails here must not leave
        # a consumer behind that holds back the source's event-table rotation.
        self.write_path = self._choose_write_path()
        self.target.rollback()
        # A key of another role is refused here; the key's rows exist committed
        # afterwards, so that a mover waiting for its lock can name the holder.
        self._warn_unowned(pgq_ext.ensure_key(self.target, o.consumer, o.subconsumer) is None)
        self.ensure_registered()
        self._source_identity = self._identify_source()
        self.source.rollback()
        self.target.rollback()
        connect.ensure_settled(self.source)
        connect.ensure_settled(self.target)

    def ensure_registered(self) -> bool:
        """Registers the consumer (register_at says where) when it is not; True when it
        did. The CLI's --register and every drain's prepare() share it."""
        o = self.options
        if pgq.is_registered(self.source, o.source_queue, o.consumer):
            return False
        if not o.register_consumer:
            raise ConsumerNotRegistered(
                f"consumer {o.consumer!r} is not registered on source queue {o.source_queue!r}:"
                " pass register_consumer=True (operator), --register (CLI), or run"
                f" select pgq.register_consumer({literal(o.source_queue)}, {literal(o.consumer)})"
            )
        return registration.register(self.source, o.source_queue, o.consumer, o.register_at)

    def _refuse_same_queue(self) -> None:
        """Source and target the same queue of one database: each batch moved would come
        back as new events, copying the queue into itself forever. Checked before pgq_ext
        or the registration is written."""
        o = self.options
        if o.source_queue != o.target_queue:
            return
        source, target = self._identify(self.source), self._identify(self.target)
        self.source.rollback()
        self.target.rollback()
        if source != target:
            return
        raise InvalidParameter(
            f"target_queue {o.target_queue!r} is the source queue itself (database {source[1]!r},"
            f" system identifier {source[0]}): the mover would copy the queue into itself"
            " forever; give a different target queue, or the same name in another database"
        )

    @staticmethod
    def _identify(conn: Connection) -> tuple[str, str, str]:
        """(system identifier, database, server start time) of a connection's database.

        The first two name the source in pgq_ext's binding. The start time tells apart
        two servers cloned from one base backup (same system identifier), so that a
        move between such clones is not mistaken for a queue moved into itself.
        All three functions may be executed by any role (PUBLIC), pgq_reader included.
        """
        with conn.cursor() as cur:
            cur.execute(sql.SQL("select {}").format(sql.SQL(_IDENTITY)))
            row = cur.fetchone()
        assert row is not None
        return str(row[0]), str(row[1]), str(row[2])

    def _identify_source(self) -> tuple[str, str]:
        """(system identifier, database) of the source, as pgq_ext's binding stores it."""
        system_id, database, _ = self._identify(self.source)
        return system_id, database

    def _choose_write_path(self) -> str:
        """COPY into the event table when the role may, else the chunks of pgq_mover's insert_event_chunk."""
        with self.target.cursor() as cur:
            cur.execute(
                sql.SQL("select {}, current_user from pgq.queue q where q.queue_name = %s::text").format(
                    sql.SQL(_WRITE_PATHS)),
                (self.options.target_queue,),
            )
            row = cur.fetchone()
        assert row is not None
        can_copy, can_chunk, user = row
        if can_copy:
            return COPY_PATH
        if can_chunk:
            return CHUNK_PATH
        raise PgqError(
            f"role {user!r} may neither write the event tables of target queue"
            f" {self.options.target_queue!r} nor call pgq_ext.insert_event_chunk: {self._mover_role_fix()}"
        )

    def _mover_role_fix(self) -> str:
        """What to do so that the target login has pgq_mover's rights: a member without
        inheritance (NOINHERIT on 15, a grant WITH INHERIT FALSE on 16+) has none of
        them; who may grant it depends on the version (16+: ADMIN OPTION)."""
        with self.target.cursor() as cur:
            cur.execute(
                "select pg_catalog.pg_has_role('pgq_mover', 'MEMBER'), r.rolinherit,"
                " pg_catalog.current_setting('server_version_num')::int,"
                " (select pg_catalog.string_agg(pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(m.member)::text),"
                "  ', ' order by 1) from pg_catalog.pg_auth_members m"
                "  where m.roleid = pg_catalog.to_regrole('pgq_mover') and m.admin_option)"
                " from pg_catalog.pg_roles r where r.rolname = current_user"
                " and pg_catalog.to_regrole('pgq_mover') is not null"
            )
            row = cur.fetchone()
        if row is None:
            return "pgq_ext's install creates the pgq_mover role: install pgq_ext, then grant it pgq_mover"
        member, inherits, version, admins = row
        user = self.target.info.user
        if member and not inherits:
            return (f"it is a member of pgq_mover but does not inherit its rights (NOINHERIT): alter role {user}"
                    " inherit (or grant pgq_mover to it with inherit true, PostgreSQL 16+)")
        if member:
            return (f"it is a member of pgq_mover without inheriting its rights (granted with inherit false):"
                    f" grant pgq_mover to {user} with inherit true (with set false if it should not SET ROLE)")
        who = "a superuser" + (f" or a role with ADMIN OPTION on it ({admins})" if admins else "")
        if version < 160000:
            who += " or any role with CREATEROLE"
        return (f"grant it the pgq_mover role that pgq_ext's install creates ({who} runs grant pgq_mover to {user})"
                " (and pgq_admin for the faster COPY path)")

    # -- one batch --------------------------------------------------------------

    def next_batch(self, until: dt.datetime | None = None) -> pgq.BatchInfo | None:
        """Step 1, committed on its own: a rolled back allocation would come back
        later under another batch id. With ``until``, no new batch ends after it
        (``held_back`` tells that ticks are pending beyond it)."""
        o = self.options
        # PgQ's next_batch_* read the subscription without locking it: two movers of one
        # consumer calling at once could each allocate a batch for the same ticks, the
        # later overwriting the earlier, whose holder then fails with "batch not found".
        # Serialized per consumer, the second sees the first's batch and gets the same one back.
        lock = f"airflow_provider_pgq:next_batch:{o.source_queue}\x01{o.consumer}"
        try:
            batch: pgq.BatchInfo | None
            self.held_back = False
            if o.keep_lag is None and o.min_batch_events is None and o.min_batch_interval is None:
                # lock, plan, allocation and the batch's SQL: one round trip, committed by itself
                with guard.autocommit(self.source):
                    taken = pgq.take_batch(self.source, o.source_queue, o.consumer, self._target_events, until, lock)
                self.held_back, self._last_taken = taken.held_back, taken
                return taken.batch
            with self.source.cursor() as cur:
                cur.execute(
                    "select pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(%s::text, 0::bigint))",
                    (lock,),
                )
            if o.keep_lag is not None:
                batch = self._next_batch_lagged()
            else:  # the user's floors, PgQ's own coalescing
                batch = pgq.next_batch_custom(
                    self.source, o.source_queue, o.consumer,
                    min_count=o.min_batch_events, min_interval=o.min_batch_interval,
                )
                if batch is None:
                    # What is pending is below the thresholds: take all of it as one batch
                    # (a threshold of exactly the remainder selects the newest tick).
                    remainder = min(
                        pgq.events_up_to_last_tick(self.source, o.source_queue, o.consumer), 2**31 - 1
                    )
                    batch = (
                        pgq.next_batch_custom(self.source, o.source_queue, o.consumer, min_count=remainder)
                        if remainder > 0
                        else pgq.next_batch_info(self.source, o.source_queue, o.consumer)
                    )
            self.source.commit()
        except psycopg2.Error as exc:
            _quietly(self.source.rollback)
            if isinstance(exc, psycopg2.errors.LockNotAvailable):
                server = guard.server_of(self.source)
                raise WaitTimeout(
                    f"source {server}: taking the next batch of consumer {o.consumer!r} on queue"
                    f" {o.source_queue!r} waited for a lock longer than lock_timeout: another mover of"
                    " the same consumer, or a session locking the queue's tables, holds it (see pg_locks"
                    " where not granted); nothing was taken, the next run goes on from here",
                    "source", server, "next batch lock",
                ) from exc
            if pgq.pgq_error(exc) is ConsumerNotRegistered:
                raise ConsumerNotRegistered(
                    f"consumer {o.consumer!r} is not registered on source queue"
                    f" {o.source_queue!r} (any more): register it, or rewind it to the"
                    " target's mark with rewind()/--rewind"
                ) from exc
            raise
        return batch

    def _next_batch_lagged(self) -> pgq.BatchInfo | None:
        """keep_lag (skytools' pgq_keep_lag): PgQ's min_lag, which hands out no batch whose
        end tick is younger. With min_batch_* their coalescing first; when what it would
        pick is too young, or nothing meets the floors, the next tick alone that is old
        enough (one tick a batch, as the classic consumer did)."""
        o = self.options
        batch = None
        if o.min_batch_events is not None or o.min_batch_interval is not None:
            batch = pgq.next_batch_custom(
                self.source, o.source_queue, o.consumer, min_lag=o.keep_lag,
                min_count=o.min_batch_events, min_interval=o.min_batch_interval,
            )
        if batch is None:
            batch = pgq.next_batch_custom(self.source, o.source_queue, o.consumer, min_lag=o.keep_lag)
        return batch

    def _adapt_target(self, result: BatchResult) -> None:
        """Batches should take about batch_target_seconds: a slow target or wide events
        shrink the next one, a fast one grows it back up to batch_target_events."""
        o = self.options
        if result.outcome != "moved" or result.events < 1000 or result.seconds <= 0:
            return
        rate = result.events / result.seconds
        self._target_events = self._capped(
            min(o.batch_target_events, max(1000, int(rate * o.batch_target_seconds))))

    def _capped(self, events: int) -> int:
        """A batch holds at most a second of max_events_per_second."""
        cap = self.options.max_events_per_second
        return events if cap is None else max(1, min(events, int(cap)))

    def _pace(self, started: float, moved: int, bounds: DrainBounds) -> None:
        """max_events_per_second: waits until the events moved so far are the cap's
        worth (never past max_runtime)."""
        cap = self.options.max_events_per_second
        if cap is None or moved <= 0:
            return
        due = started + moved / cap
        if bounds.max_runtime is not None:
            due = min(due, started + bounds.max_runtime)
        wait = due - time.monotonic()
        if wait > 0:
            log.debug("pausing %.2fs: %d events moved, max_events_per_second=%g", wait, moved, cap)
            time.sleep(wait)

    def apply_batch(self, batch: pgq.BatchInfo) -> BatchResult:
        """Steps 2-6 for a batch taken with next_batch()."""
        if not self._prepared:
            self.prepare()
        started = time.monotonic()
        self._filtered = 0
        self._dead_lettered = 0
        self._hit(faults.AFTER_NEXT_BATCH)
        try:
            outcome, events = self._apply_on_target(batch)
            if outcome != "stale":
                self._finish_on_source(batch)
        except BaseException:
            _quietly(self.target.rollback)
            _quietly(self.source.rollback)
            raise
        result = BatchResult(
            batch.batch_id, batch.prev_tick_id, batch.cur_tick_id, outcome, events,
            time.monotonic() - started, self._filtered if outcome == "moved" else 0,
            self._dead_lettered if outcome == "moved" else 0,
        )
        self._adapt_target(result)
        if self._on_batch is not None:
            self._on_batch(result)
        return result

    def _apply_on_target(self, batch: pgq.BatchInfo, sift: bool = False) -> tuple[str, int]:
        """sift: the batch was refused for an event's content; move it in pieces to find
        which events (see _sift), after taking the key's lock and deciding again."""
        o = self.options
        t = self.target
        system_id, database = self._source_identity
        # the chunk path's staging table answer rides on the key's lock
        other, mark, self._staged = pgq_ext.begin_batch(
            t, o.consumer, o.subconsumer, system_id, database, o.source_queue, stage=self.write_path == CHUNK_PATH)
        if other is not None:
            raise TrackingKeyConflict(
                f"tracking key {o.key} on the target already belongs to source {other}, not"
                f" {system_id}/{database}/{o.source_queue}: give each source its own consumer"
                " name or subconsumer, or reset() the key if the old source is gone for good"
            )
        decision = decide(mark, batch.prev_tick_id, batch.cur_tick_id, lambda: self._batch_still_active(batch))
        if decision is Decision.SKIP:
            t.rollback()
            # Expected, not alarming: a retry after a crash between the two commits, or
            # another run of the same mover (a backfill running intervals in parallel) that
            # applied this batch while this one waited for the key's lock.
            log.info(
                "batch %s (ticks %s..%s) of %s is already applied on the target (by an earlier try,"
                " or by a concurrent run of the same mover): finishing it on the source only",
                batch.batch_id, batch.prev_tick_id, batch.cur_tick_id, o.key,
            )
            return "skipped", 0
        if decision is Decision.STALE:
            t.rollback()
            log.info(
                "batch %s (ticks %s..%s) was applied and finished by a concurrent run of the same"
                " mover (%s) meanwhile: nothing to do, the target holds it once",
                batch.batch_id, batch.prev_tick_id, batch.cur_tick_id, o.key,
            )
            return "stale", 0
        if decision is Decision.MISMATCH:
            raise PositionMismatch(
                f"position lost for {o.key} on queues {o.source_queue!r} -> {o.target_queue!r}:"
                f" the target's last applied tick is {mark}, but the source offers a batch of"
                f" ticks {batch.prev_tick_id}..{batch.cur_tick_id}. Rewind the source consumer"
                f" to tick {mark} (rewind(), --rewind, rewind=True) if the target is right, or"
                " reset the target's mark (reset(), --reset) to accept the source's position"
                " and skip what lies between"
            )
        if o.keep_event_id:  # its lock wait comes before the event table is chosen
            kept_ids.claim(t, o.consumer, o.subconsumer, o.target_queue, o.key)
        # The source's reads are each a transaction of their own (the COPY's included):
        # no source transaction is held open while the target works (it would hold back
        # PgQ's rotation), and none needs a BEGIN, a COMMIT or a rollback.
        refused: list[poison.Refused] = []
        refused_rows: list[tuple[Any, ...]] = []
        refused_exc: psycopg2.Error | None = None
        with guard.autocommit(self.source):
            batch_sql = pgq.batch_event_sql(self.source, batch.batch_id)
            if o.table_filter:  # filtered on the source: events of other tables never leave it
                self._filtered = transfer.count_filtered_out(self.source, batch_sql, o.table_filter)
                batch_sql = transfer.filter_batch_sql(self.source, batch_sql, o.table_filter)
            if sift:
                # "stop" names the first SHOWN_IDS only: no need to sift the whole batch
                limit = None if o.invalid_events == poison.DEAD_LETTER else poison.SHOWN_IDS
                events, refused, written_ids = self._sift(batch_sql, limit)
                last_id = max(written_ids) if o.keep_event_id and written_ids else None
            else:
                try:
                    events = self._transfer(batch_sql)
                except psycopg2.Error as exc:
                    why = poison.refusal(exc, limits=True)
                    if why is None:
                        raise
                    log.info("batch %s (ticks %s..%s): the %s refused its content (%s): finding which"
                             " events", batch.batch_id, batch.prev_tick_id, batch.cur_tick_id, self._side(exc),
                             why[0])
                    refused_exc = exc
                last_id = (pgq.batch_max_event_id(self.source, batch_sql)
                           if refused_exc is None and o.keep_event_id and events else None)
            if refused and o.invalid_events == poison.DEAD_LETTER:
                refused_rows = poison.read_raw(self.source, batch_sql, [r.ev_id for r in refused])
        if not sift and refused_exc is not None:
            t.rollback()
            try:
                return self._apply_on_target(batch, sift=True)
            except InvalidEvents as exc:
                raise exc from refused_exc
        if refused:
            self._refused(batch, refused, refused_rows)
        if last_id is not None:
            self._mark(batch, events)
            # Last before the commit: the setval inside cannot be rolled back.
            kept_ids.commit(t, o.consumer, o.subconsumer, o.target_queue, last_id, o.key)
            self._hit(faults.BEFORE_TARGET_COMMIT)
            t.commit()
        else:
            self._hit(faults.BEFORE_TARGET_COMMIT)
            self._mark(batch, events, commit=True)
        self._hit(faults.AFTER_TARGET_COMMIT)
        return "moved", events

    def _mark(self, batch: pgq.BatchInfo, events: int, commit: bool = False) -> None:
        """The mark and the batch's journal row, one statement (with the COMMIT when asked)."""
        o = self.options
        pgq_ext.mark_batch(
            self.target, o.consumer, o.subconsumer, (batch.batch_id, batch.prev_tick_id, batch.cur_tick_id),
            (events, self._filtered, self._dead_lettered), self._who, commit=commit,
        )

    def _refused(self, batch: pgq.BatchInfo, refused: list[poison.Refused], rows: list[tuple[Any, ...]]) -> None:
        """Stops with one line naming the refused events (invalid_events "stop"), or keeps
        them in pgq_ext.dead_letter in the batch's open target transaction."""
        o = self.options
        t = self.target
        database = t.info.dbname
        encoding = t.info.parameter_status("server_encoding") or "?"
        if o.invalid_events != poison.DEAD_LETTER:
            t.rollback()
            side = _sides(refused)
            who = {
                "target": f"target database {database!r} ({encoding}) refuses",
                # e.g. a SQL_ASCII source checks each byte sequence it sends in the target's encoding
                "source": f"source database {self.source.info.dbname!r} cannot convert into target database"
                          f" {database!r}'s encoding ({encoding})",
            }.get(side, f"{side} database (moving into target database {database!r}, {encoding}) refuses")
            raise InvalidEvents(
                f"{who}"
                f" {'at least ' if len(refused) >= poison.SHOWN_IDS else ''}{len(refused)} event(s) of batch"
                f" {batch.batch_id} (ticks {batch.prev_tick_id}..{batch.cur_tick_id}) moved from queue"
                f" {o.source_queue!r} into {o.target_queue!r} by {o.key}: {poison.describe(refused)};"
                " nothing of the batch was written, the mover stops here. Fix the events on the source"
                " (and rewind), or set invalid_events = dead_letter (ini key; operator parameter"
                " invalid_events='dead_letter') to move the rest and keep the refused events in"
                " pgq_ext.dead_letter on the target, for replay once fixed",
                _sides(refused), tuple(r.ev_id for r in refused), refused[0].sqlstate,
                batch.prev_tick_id, batch.cur_tick_id,
            )
        self._dead_lettered = poison.store(
            t, o.consumer, o.subconsumer, o.source_queue, o.target_queue,
            batch.prev_tick_id, batch.cur_tick_id, rows, refused,
        )
        log.warning(
            "batch %s (ticks %s..%s) of %s: %d event(s) of queue %r refused (by the %s, moving into target"
            " database %r, %s), kept in pgq_ext.dead_letter (invalid_events = dead_letter): %s; the rest of"
            " the batch is moved. Replay them once fixed: PgqHook.replay_dead_letters() or --replay-dead-letters",
            batch.batch_id, batch.prev_tick_id, batch.cur_tick_id, o.key, len(refused), o.source_queue,
            _sides(refused), database, encoding, poison.describe(refused),
        )

    def _side(self, exc: psycopg2.Error) -> str:
        """Which server raised exc: psycopg2 names the cursor that received the error."""
        cursor = getattr(exc, "cursor", None)
        conn = cursor.connection if cursor is not None else None
        if conn is self.source:
            return "source"
        if conn is self.target:
            return "target"
        return "source or target"

    def _sift(self, batch_sql: str, limit: int | None = None) -> tuple[int, list[poison.Refused], list[int]]:
        """The batch moved in pieces, each under a savepoint of the target transaction:
        a refused piece is rolled back and split in two, down to single events, which are
        the refused ones. Only after the whole batch was refused (no cost on the happy
        path); about 2 log2(n) pieces per refused event, at most 2n. With limit, it stops
        once that many are found (the rest of the batch is then not written: only for a
        transaction that is rolled back). Returns (events written, the refused events,
        the ids written)."""
        ids = poison.batch_ids(self.source, batch_sql)
        refused: list[poison.Refused] = []
        written: list[int] = []
        count = 0
        # The whole batch was refused already: start with its halves (where it can be split).
        pieces = [(0, len(ids))]
        if len(ids) > 1 and ids[0] != ids[-1]:
            mid = _split(ids, 0, len(ids))
            pieces = [(mid, len(ids)), (0, mid)]
        while pieces and (limit is None or len(refused) < limit):
            lo, hi = pieces.pop()
            if lo >= hi:
                continue
            with self.target.cursor() as cur:
                cur.execute("savepoint pgq_mover_sift")
            try:
                count += self._transfer(poison.range_sql(self.source, batch_sql, ids[lo], ids[hi - 1]),
                                        stream_hook=False)
            except psycopg2.Error as exc:
                why = poison.refusal(exc, limits=True)
                if why is None:
                    raise
                with self.target.cursor() as cur:
                    cur.execute("rollback to savepoint pgq_mover_sift")
                if ids[lo] == ids[hi - 1]:  # one event (or several of one id: a retried event)
                    if hi - lo > 1 and why[0] in poison.LIMITS:
                        raise  # a limit several events hit together: no event's own refusal
                    refused.extend(poison.Refused(i, *why, side=self._side(exc)) for i in ids[lo:hi])
                    continue
                mid = _split(ids, lo, hi)
                pieces += [(mid, hi), (lo, mid)]  # the lower half first: ev_id order kept
                continue
            written += ids[lo:hi]
            with self.target.cursor() as cur:
                cur.execute("release savepoint pgq_mover_sift")
        return count, refused, written

    def _batch_still_active(self, batch: pgq.BatchInfo) -> bool:
        with guard.autocommit(self.source):
            return pgq.batch_is_active(self.source, batch.batch_id)

    def _current_event_table(self) -> str:
        """Read only once the target transaction has its txid: PgQ finds a batch's rows by
        txid against the rotation's switch txids, so a table name read before a rotation
        with a txid taken after it would put the rows where no consumer looks."""
        with self.target.cursor() as cur:
            # two statements, one round trip: the txid is taken before the table is read
            cur.execute(
                "select pg_catalog.txid_current(); select pgq.current_event_table(%s::text)",
                (self.options.target_queue,),
            )
            row = cur.fetchone()
        assert row is not None
        return str(row[0])

    def _transfer(self, batch_sql: str, stream_hook: bool = True) -> int:
        """The chunk path's insert_event_chunk picks the event table itself (a mover role
        need not call pgq.current_event_table, which PgQ grants to producers)."""
        o = self.options

        def mid_stream() -> None:
            self._hit(faults.MID_STREAM)

        # stage_events' answer from the key's lock holds for the transaction's first
        # transfer only: a later one (_sift's pieces) stages after rows staged since
        staged, self._staged = self._staged, None
        try:
            if self.write_path == COPY_PATH:
                return transfer.copy_stream(
                    self.source, self.target, batch_sql, self._current_event_table(), o.keep_event_id,
                    mid_stream if self._fault and stream_hook else None,
                )
            return transfer.insert_chunks(
                self.source, self.target, batch_sql, o.target_queue, o.keep_event_id,
                o.chunk_size, mid_stream if self._fault and stream_hook else None, staged,
            )
        except psycopg2.Error as exc:
            kind = pgq.pgq_error(exc)
            if kind is QueueDisabled:
                raise QueueDisabled(f"target queue {o.target_queue!r} has inserts disabled") from exc
            if kind is QueueNotFound:
                raise QueueNotFound(f"target queue {o.target_queue!r} does not exist (any more)") from exc
            raise

    def _finish_on_source(self, batch: pgq.BatchInfo) -> None:
        self._hit(faults.BEFORE_SOURCE_COMMIT)
        with guard.autocommit(self.source):  # finished and committed in one round trip
            finished = pgq.finish_batch(self.source, batch.batch_id)
        if not finished:
            # Two runs of one mover handed the same open batch: the first to finish it wins.
            # The target's mark decided who applied it, so nothing is lost or doubled.
            log.info(
                "finish_batch(%s) on queue %r: a concurrent run of the same mover (%s) finished"
                " this batch first (the target holds it once)",
                batch.batch_id, self.options.source_queue, self.options.key,
            )

    def _hit(self, point: str) -> None:
        if self._fault is not None:
            self._fault(point)

    # -- many batches ---------------------------------------------------------

    def drain(self, bounds: DrainBounds | None = None) -> MoveReport:
        """Moves batches until none is left or a bound is hit; returns the report."""
        bounds = bounds or DrainBounds()
        o = self.options
        started = time.monotonic()
        report = MoveReport(o.source_queue, o.target_queue, o.consumer, o.subconsumer)
        if not self._prepared:  # once per mover (the CLI keeps one per connection)
            self.prepare()
        report.write_path = self.write_path
        if bounds.force_tick:
            tick = ticking.force_tick_and_wait(
                self.source, o.source_queue, run_ticker=bounds.run_ticker,
                timeout=bounds.tick_timeout,
            )
            log.info("cut tick %s on source queue %r", tick, o.source_queue)
        self._last_taken = None
        while True:
            reason = self._bound_reached(bounds, report, started)
            if reason:
                break
            batch = self.next_batch(bounds.stop_at)
            if batch is None:
                reason = "interval_end" if self.held_back else "drained"
                if self.held_back:
                    log.info("the next tick ends after %s: left for a later run", bounds.stop_at)
                break
            if bounds.stop_at is not None and batch.cur_tick_time > bounds.stop_at:
                # an open batch taken before (by a run without the bound): never cut
                reason = "interval_end"
                log.info(
                    "batch %s ends at %s, after %s: left for a later run",
                    batch.batch_id, batch.cur_tick_time, bounds.stop_at,
                )
                break
            self._last_taken = None
            report.add(self.apply_batch(batch))
            self._pace(started, report.events, bounds)
        report.stop_reason = reason
        report.seconds = round(time.monotonic() - started, 6)
        self._fill_lag(report)
        return report

    @staticmethod
    def _bound_reached(bounds: DrainBounds, report: MoveReport, started: float) -> str:
        if bounds.max_batches is not None and len(report.batch_results) >= bounds.max_batches:
            return "max_batches"
        if bounds.max_events is not None and report.events >= bounds.max_events:
            return "max_events"
        if bounds.max_runtime is not None and time.monotonic() - started >= bounds.max_runtime:
            return "max_runtime"
        return ""

    def idle_wait(self, loop_delay: float) -> float:
        """How long an idle loop should sleep, at most loop_delay: until just after the
        next tick is due at the queue's recent pace (so a poll meets the new tick, not
        up to loop_delay after it), shortly again while a due tick is late by less than
        one interval, and loop_delay when the pace is not known or the queue went quiet."""
        taken = self._last_taken
        due = taken.next_tick_in() if taken is not None and taken.batch is None else None
        if due is None or taken is None or taken.tick_period is None:
            return loop_delay
        if due >= 0:
            return min(loop_delay, due + IDLE_POLL_MARGIN)
        if -due < taken.tick_period:  # late: the ticker may just be slow
            return min(loop_delay, IDLE_POLL_MARGIN * 2)
        return loop_delay

    def _fill_lag(self, report: MoveReport) -> None:
        taken = self._last_taken
        if taken is not None and taken.batch is None and not taken.held_back:
            # the poll that found nothing read it already (an idle poll: one round trip)
            report.lag_seconds, report.pending_events = taken.lag_seconds, taken.pending_events
            return
        try:
            info = pgq.get_consumer_info(self.source, self.options.source_queue, self.options.consumer)
        finally:
            self.source.rollback()
        if info is not None:
            report.lag_seconds = info.lag.total_seconds() if info.lag is not None else None
            report.pending_events = info.pending_events

    # -- repositioning ----------------------------------------------------------

    def rewind(self) -> int:
        """Re-registers the source consumer at the target's mark; returns that tick."""
        o = self.options
        mark = pgq_ext.get_last_tick(self.target, o.consumer, o.subconsumer)
        self.target.rollback()
        if mark is None:
            raise PositionMismatch(
                f"cannot rewind {o.key}: the target holds no mark for it (nothing to rewind to);"
                " the next run applies from the source consumer's position"
            )
        try:
            pgq.register_consumer_at(self.source, o.source_queue, o.consumer, mark)
            self.source.commit()
        except psycopg2.Error as exc:
            _quietly(self.source.rollback)
            if pgq.pgq_error(exc) is TickNotFound:
                raise PositionMismatch(
                    f"cannot rewind consumer {o.consumer!r} on {o.source_queue!r} to tick {mark}:"
                    " the tick was rotated away on the source; reset() the target's mark to"
                    " continue from the source's position (the events between are not moved)"
                ) from exc
            raise
        log.info("rewound consumer %r on %r to tick %s", o.consumer, o.source_queue, mark)
        return mark

    def reset(self) -> int | None:
        """Forgets the target's mark and source binding for the key; returns the old mark.

        Nothing is forgotten while the mark agrees with the source consumer (its last
        tick, or the end of its open batch): the protocol handles that state, and a
        retried reset must not forget a batch applied but not yet finished.
        """
        o = self.options
        try:
            pgq_ext.lock_key(self.target, o.consumer, o.subconsumer)
            mark = pgq_ext.get_last_tick(self.target, o.consumer, o.subconsumer)
            info = pgq.get_consumer_info(self.source, o.source_queue, o.consumer)
            system_id, database = self._identify_source()
            self.source.rollback()
            other = pgq_ext.bind_source(
                self.target, o.consumer, o.subconsumer, system_id, database, o.source_queue
            )
            if other is None and info is not None and mark is not None and mark in (info.last_tick, info.next_tick):
                self.target.rollback()
                log.info("the mark %s of %s agrees with the source consumer: nothing to reset", mark, o.key)
                return mark
            pgq_ext.set_last_tick(self.target, o.consumer, o.subconsumer, None)
            pgq_ext.unbind_source(self.target, o.consumer, o.subconsumer)
            self.target.commit()
        except BaseException:
            _quietly(self.source.rollback)
            _quietly(self.target.rollback)
            raise
        log.info("reset the target's mark for %s (was %s)", o.key, mark)
        return mark

    def status(self) -> MoverStatus:
        """The source consumer's position and lag (the same ``PendingStatus`` the sensor,
        the triggers and ``PgqHook.get_lag`` give) and the target's mark, for --status
        and dashboards. QueueNotFound when the source queue is missing."""
        o = self.options
        try:
            position = pending_status(self.source, o.source_queue, o.consumer)
            mark = pgq_ext.get_last_tick(self.target, o.consumer, o.subconsumer)
        finally:
            _quietly(self.source.rollback)
            _quietly(self.target.rollback)
        return MoverStatus.of(position, o.target_queue, o.subconsumer, mark)
