"""Moving one batch's rows from the source into the target queue.

Two paths, same result:
- ``copy_stream``: the source's ``COPY (batch) TO STDOUT`` piped straight into the
  target's ``COPY <current event table> FROM STDIN``, binary format. No Python
  object per event, memory bounded by the pipe buffers whatever the batch size.
- ``insert_chunks``: for a target role holding only ``pgq_writer``; events travel
  in chunks as arrays through ``pgq_ext.insert_event_chunk`` (one statement a chunk).

Neither copies ``ev_txid``: the target's default (``txid_current()``) is what puts
the rows into the target's next batch. ``ev_time`` is always sent.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import IO, Any

from psycopg2 import sql
from psycopg2.extensions import connection as Connection

#: Columns carried over, in COPY order; ev_id is appended when ids are kept.
EVENT_COLUMNS = ("ev_type", "ev_data", "ev_extra1", "ev_extra2", "ev_extra3", "ev_extra4", "ev_time")

_PIPE_BUFFER = 1 << 20
_COPY_CHUNK = 1 << 18


def _columns(keep_event_id: bool) -> list[str]:
    return list(EVENT_COLUMNS) + (["ev_id"] if keep_event_id else [])


def _batch_select(batch_sql: str, keep_event_id: bool) -> sql.Composed:
    # batch_sql is PgQ's own text for this batch (pgq.batch_event_sql), not user input.
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in _columns(keep_event_id))
    return sql.SQL("select {} from ({}) b").format(cols, sql.SQL(batch_sql))


def split_table_name(qualified: str) -> sql.Identifier:
    """'pgq.event_2_1' (as pgq.current_event_table answers) as a quoted identifier."""
    schema, _, table = qualified.partition(".")
    return sql.Identifier(schema, table) if table else sql.Identifier(schema)


class _OnceAfterFirstRead:
    """Wraps the pipe's read end to call a hook once, when the stream has begun."""

    def __init__(self, stream: IO[bytes], hook: Callable[[], None]) -> None:
        self._stream = stream
        self._hook: Callable[[], None] | None = hook

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        if self._hook is not None and data:
            hook, self._hook = self._hook, None
            hook()
        return data

    def readline(self, size: int = -1) -> bytes:
        return self._stream.readline(size)


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
        split_table_name(target_table),
        sql.SQL(", ").join(sql.Identifier(c) for c in _columns(keep_event_id)),
    )
    out_text = copy_out.as_string(source)
    in_text = copy_in.as_string(target)

    read_fd, write_fd = os.pipe()
    reader = os.fdopen(read_fd, "rb", buffering=_PIPE_BUFFER)
    writer = os.fdopen(write_fd, "wb", buffering=_PIPE_BUFFER)
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            with source.cursor() as cur:
                cur.copy_expert(out_text, writer, size=_COPY_CHUNK)
        except BaseException as exc:  # handed to the consumer side below
            failure.append(exc)
        finally:
            try:
                writer.close()
            except OSError:
                pass  # the reader is gone already: the target side has failed

    producer = threading.Thread(target=produce, name="pgq-copy-out", daemon=True)
    producer.start()
    stream: Any = _OnceAfterFirstRead(reader, mid_stream) if mid_stream else reader
    try:
        with target.cursor() as cur:
            cur.copy_expert(in_text, stream, size=_COPY_CHUNK)
            rows = cur.rowcount
    finally:
        reader.close()
        producer.join()
    if failure:
        # The target saw a clean end of stream, but the source broke off: the rows in
        # the target's open transaction are incomplete and must never be committed.
        raise failure[0]
    return int(rows)


def insert_chunks(
    source: Connection,
    target: Connection,
    batch_sql: str,
    target_queue: str,
    keep_event_id: bool = False,
    chunk_size: int = 5000,
    mid_stream: Callable[[], None] | None = None,
) -> int:
    """Reads the batch through a server-side cursor and inserts it chunk by chunk."""
    written = 0
    cast = sql.SQL(
        "select pgq_ext.insert_event_chunk(%s, %s::text[], %s::text[], %s::text[], %s::text[],"
        " %s::text[], %s::text[], %s::timestamptz[], %s::bigint[])"
    )
    with source.cursor(name="pgq_mover_batch") as src, target.cursor() as dst:
        src.itersize = chunk_size
        src.execute(_batch_select(batch_sql, keep_event_id))
        while True:
            rows = src.fetchmany(chunk_size)
            if not rows:
                break
            columns = [list(c) for c in zip(*rows)]
            ids = columns[7] if keep_event_id else None
            dst.execute(cast, (target_queue, *columns[:7], ids))
            row = dst.fetchone()
            written += int(row[0]) if row else 0
            if mid_stream is not None:
                hook, mid_stream = mid_stream, None
                hook()
    return written
