"""Queue administration as tasks: create queues, register consumers, cut ticks.

Each is idempotent, so a setup DAG can run on every deployment (or be cleared and
rerun) without harm: what exists is reported as existing and left alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator, Context

from airflow_provider_pgq.core import pgq, registration, ticking
from airflow_provider_pgq.core.errors import InvalidParameter
from airflow_provider_pgq.hooks.pgq import PgqHook


def _names(value: str | Sequence[str], what: str) -> list[str]:
    names = [value] if isinstance(value, str) else list(value)
    if not names or any(not isinstance(n, str) or not n.strip() for n in names):
        raise InvalidParameter(f"{what} must be a non-empty name or list of names, got {value!r}")
    return names


def _hook(conn_id: str, op: BaseOperator) -> PgqHook:
    return PgqHook(conn_id, application_name=f"airflow:{op.dag_id}.{op.task_id}"[:63])


#: pgq.set_queue_config settings (names without the ``queue_`` prefix).
QUEUE_SETTINGS = frozenset({
    "ticker_max_count", "ticker_max_lag", "ticker_idle_period", "ticker_paused", "rotation_period",
    "external_ticker",
})


class PgqCreateQueueOperator(BaseOperator):
    """Creates PgQ queues that do not exist yet and applies their settings.

    :param pgq_conn_id: connection to the database (templated); needs pgq_admin.
    :param queue_name: a queue name or a list of them (templated).
    :param queue_config: settings applied to every queue on every run, e.g.
        ``{"ticker_max_lag": "1 second", "rotation_period": "1 hour"}``; names as
        ``pgq.set_queue_config`` takes them, without the ``queue_`` prefix.
    :return: ``{"created": [...], "existing": [...]}`` (XCom).
    """

    template_fields: Sequence[str] = ("pgq_conn_id", "queue_name")
    ui_color = "#fff9c4"

    def __init__(self, *, pgq_conn_id: str, queue_name: str | Sequence[str],
                 queue_config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pgq_conn_id = pgq_conn_id
        self.queue_name = queue_name
        self.queue_config = dict(queue_config or {})
        unknown = set(self.queue_config) - QUEUE_SETTINGS
        if unknown:
            raise InvalidParameter(
                f"unknown queue setting(s) {sorted(unknown)}: use {sorted(QUEUE_SETTINGS)}"
                " (without the 'queue_' prefix)"
            )

    def execute(self, context: Context) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {"created": [], "existing": []}
        with _hook(self.pgq_conn_id, self).psycopg2_connection() as conn:
            pgq.require_pgq(conn, "queue")
            for queue in _names(self.queue_name, "queue_name"):
                created = pgq.create_queue(conn, queue)
                for name, value in self.queue_config.items():
                    pgq.set_queue_config(conn, queue, name, str(value))
                conn.commit()
                out["created" if created else "existing"].append(queue)
                self.log.info("queue %r %s", queue, "created" if created else "already exists")
        return out


class PgqRegisterConsumerOperator(BaseOperator):
    """Registers consumers on a queue where they are not registered yet.

    A consumer sees only events after its registration: register the mover's
    consumer before producers start, or accept that earlier events are not its.

    :param pgq_conn_id: connection to the database with the queue (templated).
    :param queue_name: the queue (templated).
    :param consumer_name: a consumer name or a list of them (templated). ``consumer=``
        is its old name: still accepted, with a DeprecationWarning.
    :param register_at: where a new registration starts: ``"now"`` (PgQ's rule: only what
        comes after; a WARNING counts what the queue already holds) or ``"oldest"`` (the
        queue's oldest retained tick: what it still holds is moved too).
    :return: ``{"registered": [...], "existing": [...]}`` (XCom).
    """

    template_fields: Sequence[str] = ("pgq_conn_id", "queue_name", "consumer_name")
    ui_color = "#fff9c4"

    def __init__(self, *, pgq_conn_id: str, queue_name: str, consumer_name: str | Sequence[str] | None = None,
                 consumer: str | Sequence[str] | None = None, register_at: str = "now", **kwargs: Any) -> None:
        if consumer is not None:
            warnings.warn("PgqRegisterConsumerOperator(consumer=...) is deprecated: use consumer_name=...",
                          DeprecationWarning, stacklevel=2)
            if consumer_name is not None and consumer_name != consumer:
                raise InvalidParameter(
                    f"give consumer_name only, not also consumer ({consumer_name!r} != {consumer!r})")
            consumer_name = consumer
        if consumer_name is None:
            raise TypeError("PgqRegisterConsumerOperator needs consumer_name: a name or a list of names")
        super().__init__(**kwargs)
        self.pgq_conn_id = pgq_conn_id
        self.queue_name = queue_name
        self.consumer_name = consumer_name
        registration.check_register_at(register_at)
        self.register_at = register_at

    def execute(self, context: Context) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {"registered": [], "existing": []}
        with _hook(self.pgq_conn_id, self).psycopg2_connection() as conn:
            pgq.require_queue(conn, self.queue_name, "the")
            for consumer in _names(self.consumer_name, "consumer_name"):
                done = registration.register(conn, self.queue_name, consumer, self.register_at)
                out["registered" if done else "existing"].append(consumer)
                self.log.info(
                    "consumer %r on %r %s", consumer, self.queue_name,
                    "registered" if done else "was registered already",
                )
        return out


class PgqTickerOperator(BaseOperator):
    """Cuts ticks for queues of a database where no pgqd runs, one ``pgq.ticker`` pass each.

    Without ticks consumers see no new batches. Schedule this as often as batches
    should appear (e.g. every minute). Each pass takes an advisory lock per queue so
    that two of these tasks never tick one queue at once (PgQ forbids parallel
    ticker passes: ticks out of snapshot order lose events). **pgqd does not take
    that lock: never run this against a database that pgqd ticks.** Needs pgq_admin.

    A pass ticks when the queue's own thresholds say so (``ticker_max_count`` events,
    ``ticker_max_lag``, ``ticker_idle_period``); ``force=True`` first calls
    ``pgq.force_tick`` so every queue gets a tick now (it inflates PgQ's
    pending-events estimate, never the events). Queues with an external ticker or a
    paused ticker are skipped.

    :param pgq_conn_id: connection to the database (templated).
    :param queue_name: a queue or list of queues (templated); None: every queue there.
    :param force: tick even where the thresholds would not.
    :return: ``{queue: new tick id or None}`` (XCom); None means no tick was due.
    """

    template_fields: Sequence[str] = ("pgq_conn_id", "queue_name")
    ui_color = "#fff9c4"

    def __init__(self, *, pgq_conn_id: str, queue_name: str | Sequence[str] | None = None,
                 force: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pgq_conn_id = pgq_conn_id
        self.queue_name = queue_name
        self.force = force

    def _queues(self, conn: Any) -> list[str]:
        if self.queue_name is not None:
            return _names(self.queue_name, "queue_name")
        with conn.cursor() as cur:
            cur.execute("select queue_name from pgq.queue order by queue_name")
            names = [str(r[0]) for r in cur.fetchall()]
        conn.rollback()
        return names

    def execute(self, context: Context) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        with _hook(self.pgq_conn_id, self).psycopg2_connection() as conn:
            pgq.require_pgq(conn, "queue")
            for queue in self._queues(conn):
                info = pgq.get_queue_info(conn, queue)
                conn.rollback()
                if info.external_ticker or info.ticker_paused:
                    self.log.warning(
                        "queue %r: %s, not ticking it", queue,
                        "external ticker" if info.external_ticker else "ticker paused",
                    )
                    continue
                if self.force:
                    pgq.force_tick(conn, queue)
                    conn.commit()
                out[queue] = ticking.ticker_pass(conn, queue)
                self.log.info("queue %r: %s", queue, f"tick {out[queue]}" if out[queue] else "no tick due")
        return out
