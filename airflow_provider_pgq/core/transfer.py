"""Moving one batch's rows from the source into the target queue.

Two paths, same result:
- ``copy_stream``: the source's ``COPY (batch) TO STDOUT`` piped straight into the
  target's ``COPY <current event table> FROM STDIN``, binary format. No Python
  object per event, memory bounded by the pipe buffers whatever the batch size.
- ``insert_chunks``: for a target role that may not write event tables (it holds the
  ``pgq_mover`` role of pgq_ext, not pgq_admin). The batch is streamed by the same
  binary COPY into a temporary staging table that pgq_ext's ``stage_events`` makes
  (owned by pgq_ext's owner, so the caller cannot attach code to it), and
  ``insert_staged_events`` moves it into the event table in one statement. Where
  pgq_ext's owner may not make temporary tables, the source aggregates chunks into
  array literals that Python hands to ``insert_event_chunk`` as opaque strings.
  Either way there is no Python object per event.

Neither copies ``ev_txid``: the target's default (``txid_current()``) is what puts
the rows into the target's next batch. ``ev_time`` is always sent. Both keep the
batch's ``ev_id`` order, so target consumers see the events in the source's order.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO

from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from airflow_provider_pgq.core import pgq_ext
from airflow_provider_pgq.core.errors import WaitTimeout
from airflow_provider_pgq.core.guard import WATCHDOG, GuardedConnection, Watch, server_of, shut_socket, unsent_bytes

log = logging.getLogger(__name__)

#: Columns carried over, in COPY order; ev_id is appended when ids are kept.
EVENT_COLUMNS = ("ev_type", "ev_data", "ev_extra1", "ev_extra2", "ev_extra3", "ev_extra4", "ev_time")

#: The source side hands rows on in blocks of this size: small enough that the target
#: starts inserting while the source still sends, large enough to keep syscalls rare.
_WRITE_BUFFER = 1 << 16
#: Most bytes the target side passes to one PQputCopyData.
_READ_CHUNK = 1 << 18
#: Kernel pipe buffer asked for (Linux allows up to 1 MiB unprivileged); best effort.
_PIPE_SIZE = 1 << 20

#: Session-local staging table of the chunk path (temporary, emptied at commit).
STAGING_TABLE = "pgq_mover_rows"

#: A long batch says how far it got this often (seconds), so slow can be told from stuck.
PROGRESS_EVERY = 5.0


class _Progress:
    """Logs a long transfer's progress every PROGRESS_EVERY seconds (quiet for short ones)."""

    def __init__(self, what: str, unit: str) -> None:
        self.what = what
        self.unit = unit
        self.started = time.monotonic()
        self.next_log = self.started + PROGRESS_EVERY
        self.done = 0

    def add(self, amount: int) -> None:
        self.done += amount
        now = time.monotonic()
        if now >= self.next_log:
            self.next_log = now + PROGRESS_EVERY
            elapsed = now - self.started
            if self.unit == "bytes":
                log.info("%s: %.1f MB so far in %.0fs (%.1f MB/s)", self.what, self.done / 1e6, elapsed,
                         self.done / 1e6 / elapsed)
            else:
                log.info("%s: %d %s so far in %.0fs (%.0f/s)", self.what, self.done, self.unit, elapsed,
                         self.done / elapsed)


class _StreamWatch(Watch):
    """The COPY pipe's progress bound: no byte through the pipe for `bound` seconds
    means one side has stopped. The stalled side is the one the other waits for: the
    target's thread sitting in read() of the pipe waits for the source; otherwise the
    target does not take what the source sends. Both sockets are shut (libpq stops
    waiting at once, the servers roll back); the transfer then raises WaitTimeout."""

    def __init__(self, source: Connection, target: Connection, bound: float) -> None:
        super().__init__(bound)
        self.source = source
        self.target = target
        self.in_read = False
        self.stalled: Connection | None = None
        self.unsent: int | None = None
        self.progress = _Progress("batch COPY", "bytes")

    def moved(self, size: int) -> None:
        bound = self.bound
        if not size:
            # End of the source's data: what is left is the target's answer to the COPY,
            # after the tail still in flight; bounded like a statement on top.
            bound += getattr(self.target, "statement_bound", None) or self.bound
        self.deadline = time.monotonic() + bound
        self.unsent = unsent_bytes(self.target)
        self.progress.add(size)

    def expire(self) -> float | None:
        if not self.in_read:
            # The target's socket buffers hold megabytes the pipe has long passed on:
            # while that queue still shrinks, the target takes data, slowly.
            unsent = unsent_bytes(self.target)
            if unsent and unsent != self.unsent:
                self.unsent = unsent
                return time.monotonic() + self.bound
        self.stalled, other = (self.source, self.target) if self.in_read else (self.target, self.source)
        shut_socket(self.stalled)
        shut_socket(other)  # mid-COPY it cannot be used again anyway
        return None

    def error(self) -> WaitTimeout:
        conn = self.stalled
        assert conn is not None
        side = getattr(conn, "side", "database")
        server = server_of(conn)
        return WaitTimeout(
            f"{side} {server}: the batch's COPY moved no bytes for {self.bound:g}s (network_timeout):"
            f" the {side} stopped {'sending' if conn is self.source else 'taking'} data; both"
            " connections were closed and nothing of the batch was committed (it is retried whole)",
            side, server, "COPY progress",
        )


def _stream_bound(*conns: Connection) -> float | None:
    bounds = [b for b in (getattr(c, "stream_bound", None) for c in conns) if b]
    return min(bounds) if bounds else None


def _lift_statement_timeout(conn: Connection) -> str | None:
    """A COPY may legitimately outlast the statement bound (its progress is watched
    instead): lifted for this transaction when the bound is the mover's own, in the
    COPY's own round trip (GuardedConnection.then); returns the value to put back."""
    if not getattr(conn, "own_statement_timeout", False) or not isinstance(conn, GuardedConnection):
        return None
    conn.then("select pg_catalog.set_config('statement_timeout', '0', true); ")
    return conn.transaction_settings.get("statement_timeout")


def _restore_statement_timeout(conn: Connection, value: str | None) -> None:
    """Put back with the next statement (a commit or rollback ends the lift anyway)."""
    if value is not None and isinstance(conn, GuardedConnection):
        conn.then(sql.SQL("select pg_catalog.set_config('statement_timeout', {}, true); ")
                  .format(sql.Literal(value)).as_string(conn))


def _columns(keep_event_id: bool) -> list[str]:
    return list(EVENT_COLUMNS) + (["ev_id"] if keep_event_id else [])


def _column_list(keep_event_id: bool) -> sql.Composed:
    return sql.SQL(", ").join(sql.Identifier(c) for c in _columns(keep_event_id))


def _batch_select(batch_sql: str, keep_event_id: bool) -> sql.Composed:
    # batch_sql is PgQ's own text for this batch (pgq.batch_event_sql), not user input.
    # It ends in "order by 1" (ev_id); a subquery in FROM keeps that order.
    return sql.SQL("select {} from ({}) b").format(_column_list(keep_event_id), sql.SQL(batch_sql))


def filter_batch_sql(conn: Connection, batch_sql: str, tables: Sequence[str]) -> str:
    """The batch's SELECT restricted to events whose ev_extra1 is one of tables (skytools'
    table_filter), so the filter runs on the source and other events never leave it.
    PgQ's text is wrapped as a subquery, as _batch_select does; the names travel as one
    quoted text[] value (COPY takes no bound parameters); ev_id order is kept."""
    return (
        sql.SQL("select * from ({}) f where f.ev_extra1 = any({}::text[]) order by f.ev_id")
        .format(sql.SQL(batch_sql), sql.Literal(list(tables)))
        .as_string(conn)
    )


def count_filtered_out(conn: Connection, batch_sql: str, tables: Sequence[str]) -> int:
    """How many of the batch's events table_filter leaves out (consumed, not moved);
    an event without ev_extra1 matches no table."""
    query = sql.SQL(
        "select pg_catalog.count(*) from ({}) f where f.ev_extra1 is null or f.ev_extra1 <> all(%s::text[])"
    ).format(sql.SQL(batch_sql.replace("%", "%%")))  # PgQ's text, read past the parameter
    with conn.cursor() as cur:
        cur.execute(query, (list(tables),))
        row = cur.fetchone()
    return int(row[0]) if row else 0


def split_table_name(qualified: str) -> sql.Identifier:
    """'pgq.event_2_1' (as pgq.current_event_table answers) as a quoted identifier."""
    schema, _, table = qualified.partition(".")
    return sql.Identifier(schema, table) if table else sql.Identifier(schema)


def _widen_pipe(fd: int) -> None:
    """Fewer wake-ups between the two threads; the default 64 KiB pipe works too."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), _PIPE_SIZE)
    except (ImportError, OSError):
        pass


class _OnceAfterFirstRead:
    """Wraps the pipe's read end: calls a hook once, when the stream has begun, and
    keeps any exception raised inside read() (by the hook, or by a signal handler
    while the read waits: SIGTERM turned into SystemExit, a task timeout).

    psycopg2 turns an exception raised in read() into the server's QueryCanceled
    ("error in .read() call"); _pipe_copy raises the kept one instead, so a signal
    stays a signal for the caller."""

    def __init__(self, stream: IO[bytes], hook: Callable[[], None] | None, watch: _StreamWatch | None) -> None:
        self._stream = stream
        self._hook = hook
        self._watch = watch
        self.raised: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        try:
            watch = self._watch
            if watch is not None:
                watch.in_read = True
                data = self._stream.read(size)
                watch.in_read = False
                watch.moved(len(data))
            else:
                data = self._stream.read(size)
            if self._hook is not None and data:
                hook, self._hook = self._hook, None
                hook()
        except BaseException as exc:
            self.raised = exc
            raise
        return data

    def readline(self, size: int = -1) -> bytes:
        return self._stream.readline(size)


def _pipe_copy(
    source: Connection,
    target: Connection,
    copy_out: sql.Composable,
    copy_in: sql.Composable,
    mid_stream: Callable[[], None] | None,
) -> int:
    """Runs copy_out on the source and copy_in on the target at the same time, joined
    by an OS pipe: the source's rows are never Python objects, only bytes in flight.

    The source's COPY runs in a helper thread (psycopg2 releases the GIL while it
    waits on the network), the target's in the caller's thread. A source that breaks
    off mid-stream makes the target see a clean end of data, so its failure is
    re-raised here: the caller must never commit what the target received.
    """
    out_text = copy_out.as_string(source)
    in_text = copy_in.as_string(target)
    # Binary COPY carries text byte for byte in each session's client encoding. Where
    # they differ (a LATIN1 source and a UTF8 target, say) the source must send in the
    # target's, or text arrives mangled (silently, UTF8 into LATIN1) or is refused; a
    # character the target cannot hold then fails the batch on the source. Transaction-
    # local: a failed batch's rollback reverts it, a good one puts it back below.
    source_encoding, target_encoding = source.encoding, target.encoding
    if source_encoding != target_encoding:
        _set_client_encoding(source, target_encoding)
    lifted = (_lift_statement_timeout(source), _lift_statement_timeout(target))
    bound = _stream_bound(source, target)
    watch = _StreamWatch(source, target, bound) if bound is not None else None
    try:
        rows = _pipe_copy_watched(source, target, out_text, in_text, mid_stream, watch)
    except BaseException as exc:
        if watch is not None and watch.fired and watch.stalled is not None:
            raise watch.error() from exc
        raise
    _restore_statement_timeout(source, lifted[0])
    _restore_statement_timeout(target, lifted[1])
    if source_encoding != target_encoding:
        _set_client_encoding(source, source_encoding)
    return rows


def _pipe_copy_watched(
    source: Connection,
    target: Connection,
    out_text: str,
    in_text: str,
    mid_stream: Callable[[], None] | None,
    watch: _StreamWatch | None,
) -> int:
    """_pipe_copy's two threads, under the progress watch when there is one."""
    streaming = [c for c in (source, target) if isinstance(c, GuardedConnection)]
    for conn in streaming:
        conn.streaming = True
    if watch is not None:
        WATCHDOG.add(watch)
    try:
        return _pipe(source, target, out_text, in_text, mid_stream, watch)
    finally:
        if watch is not None:
            WATCHDOG.discard(watch)
        for conn in streaming:
            conn.streaming = False


def _pipe(
    source: Connection,
    target: Connection,
    out_text: str,
    in_text: str,
    mid_stream: Callable[[], None] | None,
    watch: _StreamWatch | None,
) -> int:
    read_fd, write_fd = os.pipe()
    _widen_pipe(write_fd)
    # Unbuffered read end: read(n) answers with what the pipe holds now instead of
    # waiting for n bytes, so the target never idles while a block is in flight.
    reader = os.fdopen(read_fd, "rb", buffering=0)
    writer = os.fdopen(write_fd, "wb", buffering=_WRITE_BUFFER)
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            with source.cursor() as cur:
                cur.copy_expert(out_text, writer)
        except BaseException as exc:  # handed to the consumer side below
            failure.append(exc)
        finally:
            try:
                writer.close()
            except OSError:
                pass  # the reader is gone already: the target side has failed

    producer = threading.Thread(target=produce, name="pgq-copy-out", daemon=True)
    producer.start()
    stream = _OnceAfterFirstRead(reader, mid_stream, watch)
    try:
        with target.cursor() as cur:
            cur.copy_expert(in_text, stream, size=_READ_CHUNK)
            rows = cur.rowcount
    except BaseException:
        reader.close()
        producer.join()
        if stream.raised is not None:
            raise stream.raised  # noqa: B904 - psycopg2's QueryCanceled stays as __context__
        if failure and not isinstance(failure[0], OSError):
            # A source that died mid-row makes the target fail on a truncated row:
            # the source's error is the cause worth reporting (the target's is chained).
            # An OSError (broken pipe) is only the echo of the target failing first and
            # closing the pipe: then the target's error is the one to report.
            raise failure[0]  # noqa: B904 - the target error stays as __context__
        raise
    reader.close()
    producer.join()
    if failure:
        # The target saw a clean end of stream, but the source broke off: the rows in
        # the target's open transaction are incomplete and must never be committed.
        raise failure[0]
    return int(rows)


def _set_client_encoding(conn: Connection, encoding: str) -> None:
    """SET LOCAL client_encoding behind psycopg2's back: only for the COPY's bytes,
    which psycopg2 never decodes; set back before any text is read again (with the
    next statement, in its round trip, where the connection can carry it)."""
    statement = sql.SQL("select pg_catalog.set_config('client_encoding', {}, true); ").format(sql.Literal(encoding))
    if isinstance(conn, GuardedConnection):
        conn.then(statement.as_string(conn))
        return
    with conn.cursor() as cur:
        cur.execute(statement)


def copy_stream(
    source: Connection,
    target: Connection,
    batch_sql: str,
    target_table: str,
    keep_event_id: bool = False,
    mid_stream: Callable[[], None] | None = None,
) -> int:
    """Streams the batch into target_table; returns the number of rows written.

    Runs in the callers' open transactions on both sides and commits neither.
    """
    copy_out = sql.SQL("copy ({}) to stdout (format binary)").format(
        _batch_select(batch_sql, keep_event_id)
    )
    copy_in = sql.SQL("copy {} ({}) from stdin (format binary)").format(
        split_table_name(target_table), _column_list(keep_event_id)
    )
    return _pipe_copy(source, target, copy_out, copy_in, mid_stream)


def insert_chunks(
    source: Connection,
    target: Connection,
    batch_sql: str,
    target_queue: str,
    keep_event_id: bool = False,
    chunk_size: int = 5000,
    mid_stream: Callable[[], None] | None = None,
    staged: pgq_ext.Staged | None = None,
) -> int:
    """Writes the batch through pgq_ext, for roles that may not write event tables.

    Staged where pgq_ext's owner may make temporary tables: pgq_ext.stage_events()
    makes (once a session) the staging table, the batch is streamed into it by binary
    COPY, and pgq_ext.insert_staged_events() moves it into the event table in one
    statement. Otherwise insert_event_chunk, chunk_size events a call. Runs in the
    callers' open transactions and commits neither; returns the number of rows written.
    staged: stage_events' answer where the caller asked it in this transaction already
    (pgq_ext.begin_batch(stage=True): no round trip of its own).
    """
    if staged is None:
        with target.cursor() as cur:
            cur.execute("select pgq_ext.stage_events()")
            answer = cur.fetchone()
        staged = pgq_ext.Staged(None if answer is None or answer[0] is None else int(answer[0]))
    after = staged.after
    if after is None:
        return _insert_source_arrays(
            source, target, batch_sql, target_queue, keep_event_id, chunk_size, mid_stream
        )
    copy_out = sql.SQL("copy ({}) to stdout (format binary)").format(_batch_select(batch_sql, keep_event_id))
    copy_in = sql.SQL("copy {} ({}) from stdin (format binary)").format(
        sql.Identifier("pg_temp", STAGING_TABLE), _column_list(keep_event_id)
    )
    copied = _pipe_copy(source, target, copy_out, copy_in, mid_stream)
    with target.cursor() as cur:
        cur.execute(
            "select pgq_ext.insert_staged_events(%s::text, %s::bigint, %s::boolean)",
            (target_queue, int(after), keep_event_id),
        )
        written = cur.fetchone()
    if written is None or written[0] != copied:
        raise RuntimeError(
            f"staging table {STAGING_TABLE} lost rows: {copied} copied, {written and written[0]} moved"
        )
    return int(written[0])


def _insert_source_arrays(
    source: Connection,
    target: Connection,
    batch_sql: str,
    target_queue: str,
    keep_event_id: bool,
    chunk_size: int,
    mid_stream: Callable[[], None] | None,
) -> int:
    """For roles without TEMPORARY: the source renders each chunk as array literals
    (one row per chunk), which travel through Python as opaque strings."""
    columns = _columns(keep_event_id)
    aggregates = sql.SQL(", ").join(
        sql.SQL("pg_catalog.array_agg({} order by n)::text").format(sql.Identifier(c)) for c in columns
    )
    chunks = sql.SQL(
        "select {} from (select {}, pg_catalog.row_number() over (order by ev_id) - 1 as n from ({}) b) r"
        " group by n / {size} order by n / {size}"
    ).format(
        aggregates, _column_list(True), sql.SQL(batch_sql), size=sql.Literal(int(chunk_size))
    )
    ids = sql.SQL("%s::bigint[]") if keep_event_id else sql.SQL("null::bigint[]")
    insert = sql.SQL(
        "select pgq_ext.insert_event_chunk(%s::text, %s::text[], %s::text[], %s::text[], %s::text[],"
        " %s::text[], %s::text[], %s::timestamptz[], {})"
    ).format(ids)
    with source.cursor() as cur:
        # ISO times carry their offset and parse the same whatever the target's
        # DateStyle and TimeZone; reverts with the source transaction.
        cur.execute("set local datestyle = 'ISO, YMD'")
    written = 0
    progress = _Progress("batch chunks", "events")
    with source.cursor(name="pgq_mover_chunks") as src, target.cursor() as dst:
        src.itersize = 1  # one row is a whole chunk: never hold two
        src.execute(chunks)
        for chunk in src:
            dst.execute(insert, (target_queue, *chunk))
            result = dst.fetchone()
            written += int(result[0]) if result and result[0] is not None else 0
            progress.add(int(result[0]) if result and result[0] is not None else 0)
            if mid_stream is not None:
                hook, mid_stream = mid_stream, None
                hook()
    return written
