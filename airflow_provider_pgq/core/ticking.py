"""Making ticks happen: force_tick and wait, and our own serialized ticker pass."""

from __future__ import annotations

import logging
import time

from psycopg2.extensions import connection as Connection

from airflow_provider_pgq.core import pgq
from airflow_provider_pgq.core.errors import TickerNotRunning, literal

log = logging.getLogger(__name__)

_TICKER_LOCK = "airflow_provider_pgq:ticker:"


def ticker_pass(conn: Connection, queue: str) -> int | None:
    """One pgq.ticker() pass, serialized against our other callers; commits.

    PgQ forbids two ticker passes on a queue at once (ticks out of snapshot order
    lose events). This lock only serializes callers of this function: never use it
    on a database where pgqd runs. Needs pgq_admin.
    """
    try:
        with conn.cursor() as cur:
            cur.execute("select pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended("
                "pg_catalog.concat(%s::text, %s::text), 0::bigint))", (_TICKER_LOCK, queue))
        tick = pgq.ticker(conn, queue)
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return tick


def force_tick_and_wait(
    conn: Connection, queue: str, run_ticker: bool = False, timeout: float = 30.0, poll: float = 0.1
) -> int:
    """Makes a tick newer than every commit before the call exist; returns its id.

    pgq.force_tick only marks the queue so that the next ticker pass ticks: the tick
    itself comes from pgqd, or from ticker_pass() when run_ticker is set.
    """
    info = pgq.get_queue_info(conn, queue)
    if info.ticker_paused:
        conn.rollback()
        raise TickerNotRunning(
            f"the ticker of source queue {queue!r} is paused: resume it with"
            f" select pgq.set_queue_config({literal(queue)}, 'ticker_paused', 'false')"
        )
    if info.external_ticker:
        conn.rollback()
        raise TickerNotRunning(
            f"source queue {queue!r} has an external ticker: force_tick cannot cut a tick there;"
            " run without force_tick"
        )
    before = pgq.force_tick(conn, queue)
    conn.commit()
    deadline = time.monotonic() + timeout
    while True:
        if run_ticker:
            ticker_pass(conn, queue)
        last = pgq.newest_tick(conn, queue)
        conn.rollback()
        if last is not None and (before is None or last > before):
            return int(last)
        if time.monotonic() >= deadline:
            raise TickerNotRunning(
                f"no new tick on source queue {queue!r} within {timeout:g}s after force_tick"
                f" (newest tick is still {last}): no ticker is running. Start pgqd for the"
                " source database, or let the mover tick itself (run_ticker=True / ticker"
                " option) where no pgqd runs"
            )
        time.sleep(poll)
