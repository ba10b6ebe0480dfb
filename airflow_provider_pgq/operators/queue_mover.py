"""PgqQueueMoverOperator: one DAG run drains a source queue into a target queue."""

from __future__ import annotations

import datetime as dt
import signal
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import psycopg2
from airflow.sdk import Asset, BaseOperator, Context
from psycopg2.extensions import connection as Psycopg2Connection

from airflow_provider_pgq.core import guard, journal
from airflow_provider_pgq.core.errors import InvalidParameter
from airflow_provider_pgq.core.guard import Timeouts
from airflow_provider_pgq.core.mover import (
    DEFAULT_BATCH_TARGET_EVENTS,
    DEFAULT_BATCH_TARGET_SECONDS,
    BatchResult,
    DrainBounds,
    MoverOptions,
    QueueMover,
    check_batching,
    check_keep_lag,
    normalize_table_filter,
    seconds_to_interval,
)
from airflow_provider_pgq.core.poison import check_invalid_events
from airflow_provider_pgq.hooks.pgq import PgqHook
from airflow_provider_pgq.links.mover_page import PgqMoverPageLink
from airflow_provider_pgq.operators import turns

try:
    from airflow.sdk.observability.stats import Stats
except ImportError:  # pragma: no cover - older Airflow 3 releases
    from airflow.stats import Stats


_JINJA_MARKERS = ("{{", "{%", "{#")


def target_asset(target_conn_id: str, target_queue: str) -> Asset:
    """The Asset a mover updates: downstream DAGs can be scheduled on it.

    Built when the DAG is parsed, before templates are rendered: a templated connection
    id or queue would put ``{{ ... }}`` into the Asset's URI (an asset no run ever
    updates under its real name), so templates are refused here with InvalidParameter.
    """
    for name, value in (("target_conn_id", target_conn_id), ("target_queue", target_queue)):
        if not isinstance(value, str) or any(marker in value for marker in _JINJA_MARKERS):
            raise InvalidParameter(
                f"outlet_asset=True needs a plain {name}, got {value!r}: the outlet Asset"
                f" pgq://<target_conn_id>/<target_queue> is built when the DAG is parsed, before"
                " templates are rendered. Give the literal value, or drop outlet_asset and declare"
                " outlets=[Asset(...)] yourself"
            )
    return Asset(f"pgq://{target_conn_id}/{target_queue}")


def queue_dataset_address(parameters: dict[str, str], queue: str, conn: Psycopg2Connection) -> tuple[str, str]:
    """A queue's OpenLineage (namespace, name), as the postgres provider names a table:
    ``postgres://<host>:<port>`` (the connection's host in lower case, ``localhost`` when it
    has none, i.e. libpq's local socket; port 5432 when it gives none) and
    ``<database>.pgq.<queue>`` (PgQ keeps its queues in the ``pgq`` schema). ``parameters``:
    PgqHook.connect_parameters(); ``conn``, open, names the database when they do not."""
    host = (parameters.get("host") or parameters.get("hostaddr") or "localhost").lower()
    database = parameters.get("dbname") or str(conn.info.dbname)
    return f"postgres://{host}:{parameters.get('port') or 5432}", f"{database}.pgq.{queue}"


def _seconds(value: float | dt.timedelta | None) -> float | None:
    return value.total_seconds() if isinstance(value, dt.timedelta) else value


class PgqQueueMoverOperator(BaseOperator):
    """Moves every available batch of a source PgQ queue into a target queue, exactly once.

    Each batch lands in one target transaction together with its mark in the
    target's ``pgq_ext``; only then is it finished on the source. That is what
    makes Airflow's re-executions safe:

    * a **retry** after a crash finds batches that reached the target already marked,
      skips them and finishes them on the source; the others are applied once;
    * a **cleared** task runs again and moves whatever is pending now: nothing
      already moved is moved twice;
    * a **backfill** of old intervals with ``stop_at_interval_end=True`` moves only
      batches whose end tick is not later than each run's ``data_interval_end``;
      batches moved by later runs are not moved again.

    :param source_conn_id: connection to the database holding the source queue.
    :param target_conn_id: connection to the database holding the target queue and pgq_ext.
    :param source_queue: queue to read (templated).
    :param target_queue: queue to write (templated).
    :param consumer_name: PgQ consumer on the source, and the tracking key on the
        target (templated). Default ``<dag_id>.<task_id>``, as the classic tool used
        its job name.
    :param subconsumer: second part of the tracking key (templated), default ``''``;
        give each source its own when several sources feed one target.
    :param max_batches: stop after this many batches (None: no bound).
    :param max_events: stop once this many events are moved (checked between batches).
    :param max_runtime: stop taking new batches after this many seconds (or a timedelta).
    :param force_tick: first make the source cut a tick, so that everything committed
        before the run is drained (needs a ticker: pgqd, or ``run_ticker``).
    :param run_ticker: let the task itself run ``pgq.ticker`` for the source queue.
        Off by default: never turn it on where pgqd runs (PgQ forbids two tickers at
        once). Needs pgq_admin on the source.
    :param tick_timeout: seconds to wait for the tick asked for by ``force_tick``.
    :param stop_at_interval_end: only move batches whose end tick is not later than
        the run's ``data_interval_end`` (repeatable runs and backfills).
    :param register_consumer: register the consumer on the source when missing.
    :param register_at: where a consumer registered by ``register_consumer`` starts:
        ``"now"`` (default, PgQ's rule: events queued before the first run are never
        moved; a WARNING gives their count) or ``"oldest"`` (the queue's oldest retained
        tick, so the events the queue still holds are moved too; events before that
        tick, or rotated away, cannot be).
    :param install_pgq_ext: install or upgrade pgq_ext on the target when missing.
    :param min_batch_events: coalesce ticks into batches of at least this many events.
    :param min_batch_interval: coalesce ticks into batches spanning at least this long.
    :param batch_target_events: catching up (more than one tick pending), ticks are
        coalesced into batches of about this many events (default 200,000; 1: one tick a
        batch, as the classic tool).
    :param batch_target_seconds: ... and of about this duration (default 10): a slower
        move shrinks the next batch.
    :param max_events_per_second: catching up, at most this many events a second on
        average (batches of at most a second of it, a pause after each): spares a busy
        OLTP source. None (default): as fast as both sides go.
    :param keep_event_id: give target events the source's ``ev_id`` (the target queue
        must have no other producer).
    :param table_filter: move only events whose ``ev_extra1`` names one of these tables
        (skytools' ``table_filter``; a name without schema means ``public.<name>``). Events
        of other tables are consumed, not moved, and counted as ``filtered`` in the report;
        the filter runs on the source.
    :param keep_lag: only move batches whose end tick is at least this old (seconds or a
        timedelta; skytools' ``pgq_keep_lag``): the target stays that far behind.
    :param invalid_events: what to do with events the target refuses for their content
        (an encoding error, say a Latin-1 byte from a SQL_ASCII source in a UTF8 target):
        ``"stop"`` (default) fails the task with one line naming the side, the events'
        ev_ids, the batch's ticks and this option; ``"dead_letter"`` moves the rest of the
        batch and keeps the refused events, byte for byte, in ``pgq_ext.dead_letter`` on the
        target (same transaction), counted as ``dead_lettered`` in the report; replay them
        once fixed with ``PgqHook.replay_dead_letters``.
    :param outlet_asset: declare ``pgq://<target_conn_id>/<target_queue>`` as outlet. An
        asset event is emitted only by a run that moved events; its ``extra`` holds the
        move report (events, batches, first_tick, last_tick, ...). Built when the DAG is
        parsed, so ``target_conn_id`` and ``target_queue`` must then be literal: a
        template there is refused (InvalidParameter).
    :param reposition: ``"rewind"`` (move the source consumer back to the target's
        mark) or ``"reset"`` (forget the target's mark) before draining, to recover
        from a position mismatch; templated, so a manual run can pass it, e.g.
        ``"{{ params.reposition }}"``. Empty or None: nothing.
    :param connect_timeout: seconds to reach a database and log in.
    :param network_timeout: seconds a connection may be silent: TCP keepalives find a
        dead peer within it, and a COPY that moves no byte for this long is cancelled.
    :param statement_timeout: seconds for one control statement (not the COPY; 0: none).
    :param lock_timeout: seconds to wait for a lock (0: none). Each of these four is a
        default: the Airflow connection's extras (``connect_timeout``, ``keepalives_idle``,
        ``tcp_user_timeout``, ``options: -c statement_timeout=...``) win. Past a bound
        the task fails (and Airflow retries it); nothing is half-applied.
    :return: the run's report as a dict (XCom). It covers the whole run across its
        attempts, read back from the target's move journal (each applied batch's row,
        written with its mark): ``events``, ``batches``, ``filtered``, ``dead_lettered``,
        ``first_tick`` and ``last_tick`` count every batch this task instance (same dag,
        run, task and map index) applied, by whichever try; ``attempts`` lists what each
        try moved (``try_number``, ``events``, ``batches``, ...), and ``this_attempt``
        what this try's drain did (its MoveReport: ``events``, ``batches``, ``skipped``,
        ``stale``, ...). The other keys (``skipped``, ``stale``, ``seconds``,
        ``stop_reason``, ``lag_seconds``, ``pending_events``, ``write_path``) are this
        try's.

    :param turn_poll: seconds after which a mover instance that stepped back for another
        run's instance of itself tries again (twice that for the later of the two;
        see Concurrency). Keep it above the scheduler's loop time (operators/turns.py).

    Concurrency: concurrent runs of the DAG (a backfill's ``max_active_runs``, a clear
    next to a scheduled run) run this task one at a time, per map index for a mapped
    task: the queue hands out batches strictly in order to one consumer, so parallel runs
    would only race for the same batches. A plain task gets ``max_active_tis_per_dag=1``
    (the scheduler holds the others back). A mapped task's map indexes (its partitions)
    run in parallel; an instance that finds the same map index running in another run,
    or waiting in an earlier run, gives its slot back and is rescheduled
    (``up_for_reschedule``, not a retry), so backfilled intervals move oldest first
    (operators/turns.py).
    """

    template_fields: Sequence[str] = (
        "source_conn_id", "target_conn_id", "source_queue", "target_queue",
        "consumer_name", "subconsumer", "reposition",
    )
    ui_color = "#c8e6c9"
    operator_extra_links = (PgqMoverPageLink(),)

    def __init__(
        self,
        *,
        source_conn_id: str,
        target_conn_id: str,
        source_queue: str,
        target_queue: str,
        consumer_name: str | None = None,
        subconsumer: str = "",
        max_batches: int | None = None,
        max_events: int | None = None,
        max_runtime: float | dt.timedelta | None = None,
        force_tick: bool = False,
        run_ticker: bool = False,
        tick_timeout: float = 30.0,
        stop_at_interval_end: bool = False,
        register_consumer: bool = False,
        register_at: str = "now",
        install_pgq_ext: bool = False,
        min_batch_events: int | None = None,
        min_batch_interval: float | dt.timedelta | None = None,
        batch_target_events: int = DEFAULT_BATCH_TARGET_EVENTS,
        batch_target_seconds: float = DEFAULT_BATCH_TARGET_SECONDS,
        max_events_per_second: float | None = None,
        keep_event_id: bool = False,
        table_filter: Sequence[str] | None = None,
        keep_lag: float | dt.timedelta | None = None,
        invalid_events: str = "stop",
        outlet_asset: bool = False,
        reposition: str | None = None,
        connect_timeout: float = Timeouts.connect_timeout,
        network_timeout: float = Timeouts.network_timeout,
        statement_timeout: float = Timeouts.statement_timeout,
        lock_timeout: float = Timeouts.lock_timeout,
        turn_poll: float = 15.0,
        **kwargs: Any,
    ) -> None:
        self._asset = target_asset(target_conn_id, target_queue) if outlet_asset else None
        if self._asset is not None:
            kwargs["outlets"] = [*kwargs.get("outlets", []), self._asset]
        kwargs.setdefault("max_active_tis_per_dag", 1)
        super().__init__(**kwargs)
        self.source_conn_id = source_conn_id
        self.target_conn_id = target_conn_id
        self.source_queue = source_queue
        self.target_queue = target_queue
        self.consumer_name = consumer_name
        self.subconsumer = subconsumer
        self.max_runtime = _seconds(max_runtime)
        # Validated now, so a bad value fails at DAG parse time, not in the middle of a run.
        self.min_batch_interval = seconds_to_interval("min_batch_interval", min_batch_interval)
        check_batching(min_batch_events, self.min_batch_interval)
        self.table_filter = normalize_table_filter(table_filter)
        self.keep_lag = seconds_to_interval("keep_lag", keep_lag)
        check_keep_lag(self.keep_lag)
        check_invalid_events(invalid_events)
        self.invalid_events = invalid_events
        self.bounds = DrainBounds(
            max_batches=max_batches, max_events=max_events, max_runtime=self.max_runtime,
            force_tick=force_tick, run_ticker=run_ticker, tick_timeout=tick_timeout,
        )
        self.stop_at_interval_end = stop_at_interval_end
        self.register_consumer = register_consumer
        self.register_at = register_at
        self.install_pgq_ext = install_pgq_ext
        self.min_batch_events = min_batch_events
        self.batch_target_events = batch_target_events
        self.batch_target_seconds = batch_target_seconds
        self.max_events_per_second = max_events_per_second
        self.keep_event_id = keep_event_id
        self.reposition = reposition
        # Checked now: a bad bound fails when the DAG is parsed.
        self.timeouts = Timeouts(connect_timeout=connect_timeout, network_timeout=network_timeout,
                                 statement_timeout=statement_timeout, lock_timeout=lock_timeout)
        self._connections: list[Psycopg2Connection] = []
        if not isinstance(turn_poll, (int, float)) or isinstance(turn_poll, bool) or not 0 < turn_poll <= 3600:
            raise InvalidParameter(f"turn_poll must be seconds in (0, 3600], got {turn_poll!r}")
        self.turn_poll = float(turn_poll)
        #: What get_openlineage_facets_on_complete reports: the run's report and where the
        #: queues live ((namespace, name) of source and target), set by execute.
        self._lineage: tuple[dict[str, Any], tuple[str, str], tuple[str, str]] | None = None

    def mover_options(self, who: journal.Who | None = None) -> MoverOptions:
        return MoverOptions(
            source_queue=self.source_queue,
            target_queue=self.target_queue,
            consumer=self.consumer_name or f"{self.dag_id}.{self.task_id}",
            subconsumer=self.subconsumer or "",
            register_consumer=self.register_consumer,
            register_at=self.register_at,
            install_pgq_ext=self.install_pgq_ext,
            keep_event_id=self.keep_event_id,
            min_batch_events=self.min_batch_events,
            min_batch_interval=self.min_batch_interval,
            batch_target_events=self.batch_target_events,
            batch_target_seconds=self.batch_target_seconds,
            max_events_per_second=self.max_events_per_second,
            table_filter=self.table_filter,
            keep_lag=self.keep_lag,
            invalid_events=self.invalid_events,
            who=who,
        )

    def _bounds(self, context: Context) -> DrainBounds:
        if not self.stop_at_interval_end:
            return self.bounds
        end = context.get("data_interval_end")
        if end is None:
            self.log.warning("stop_at_interval_end is set but this run has no data interval: no bound")
            return self.bounds
        return DrainBounds(**{**self.bounds.__dict__, "stop_at": end})

    def _log_batch(self, result: BatchResult) -> None:
        self.log.info(
            "batch %s ticks %s..%s: %s, %d events, %.3fs%s",
            result.batch_id, result.prev_tick_id, result.cur_tick_id, result.outcome,
            result.events, result.seconds,
            f", {result.dead_lettered} refused by the target kept in pgq_ext.dead_letter"
            if result.dead_lettered else "",
        )

    def make_mover(
        self, source: Psycopg2Connection, target: Psycopg2Connection, options: MoverOptions,
        context: Context,
    ) -> QueueMover:
        """The core mover for this run; a subclass may wrap it (the tests inject faults here)."""
        return QueueMover(source, target, options, on_batch=self._log_batch)

    def _reposition(self, mover: QueueMover) -> None:
        what = (self.reposition or "").strip().lower()
        if what in ("", "none"):
            return
        if what == "rewind":
            self.log.warning("rewinding %s to the target's mark at tick %s", mover.options.key, mover.rewind())
        elif what == "reset":
            self.log.warning("reset the target's mark of %s (was tick %s)", mover.options.key, mover.reset())
        else:
            raise ValueError(f"reposition must be 'rewind', 'reset' or empty, got {self.reposition!r}")

    @staticmethod
    def _who(context: Context) -> journal.Who:
        """The task instance, as the move journal records who applied each batch (outside
        a task instance, e.g. execute() called by hand: the host and pid only)."""
        ti = context.get("ti")
        if ti is None:
            return journal.Who.here()
        return journal.Who.here(dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id,
                                map_index=ti.map_index, try_number=ti.try_number)

    def execute(self, context: Context) -> dict[str, Any]:
        if context.get("ti") is not None:  # outside a task instance (execute({}) by hand): no turns
            turns.take_turn(context["ti"], self.log, self.turn_poll)  # may reschedule this task
        who = self._who(context)
        options = self.mover_options(who)
        app = f"airflow:{self.dag_id}.{self.task_id}"[:63]
        source_hook = PgqHook(self.source_conn_id, application_name=app, timeouts=self.timeouts)
        target_hook = PgqHook(self.target_conn_id, application_name=app, timeouts=self.timeouts)
        bounds = self._bounds(context)
        with source_hook.psycopg2_connection() as source, target_hook.psycopg2_connection() as target:
            self._connections = [source, target]
            # Airflow's kill (SIGTERM, SIGINT), its execution_timeout (SIGALRM): their
            # handlers cannot run while the task waits inside libpq; the connections are
            # shut first, so the wait ends and on_kill / the timeout take over at once.
            try:
                with guard.interrupt_waits_on((signal.SIGTERM, signal.SIGINT, signal.SIGALRM),
                                              lambda: list(self._connections)):
                    mover = self.make_mover(source, target, options, context)
                    self._reposition(mover)
                    report = mover.drain(bounds)
                    entries = self._run_entries(target, options, who)
            finally:
                self._connections = []
            where = (queue_dataset_address(source_hook.connect_parameters(), options.source_queue, source),
                     queue_dataset_address(target_hook.connect_parameters(), options.target_queue, target))
        self.log.info(
            "moved %d events in %d batches (%d already applied, skipped; %d of other tables"
            " consumed, not moved; %d refused by the target, dead-lettered) from %r to %r as %s in"
            " %.2fs; stopped: %s; lag left %s s, ~%s events pending",
            report.events, report.batches, report.skipped, report.filtered, report.dead_lettered,
            options.source_queue,
            options.target_queue, options.key, report.seconds, report.stop_reason,
            report.lag_seconds, report.pending_events,
        )
        tags = {"source_queue": options.source_queue, "target_queue": options.target_queue,
                "consumer_name": options.consumer}
        Stats.incr("pgq.mover.events", report.events, tags=tags)
        Stats.incr("pgq.mover.batches", report.batches, tags=tags)
        if report.dead_lettered:
            Stats.incr("pgq.mover.dead_lettered", report.dead_lettered, tags=tags)
        if report.lag_seconds is not None:
            Stats.gauge("pgq.mover.lag_seconds", report.lag_seconds, tags=tags)
        result = self._run_report(report.to_dict(), entries)
        self._announce(context, result)
        # lineage is per try (each try's OpenLineage events): this try's own counts, not the run's
        self._lineage = (report.to_dict(), *where)
        return result

    def _run_entries(self, target: Psycopg2Connection, options: MoverOptions,
                     who: journal.Who) -> list[journal.JournalEntry] | None:
        """The journal entries of this task instance (every try), read after the drain;
        None when they cannot be read (the drain's work stands: the report is then this
        try's only, and says so) or there is no task instance to read them for."""
        if who.dag_id is None or who.run_id is None or who.task_id is None:
            return None
        try:
            return journal.run_entries(target, options.consumer, options.subconsumer, who.dag_id, who.run_id,
                                       who.task_id, who.map_index if who.map_index is not None else -1)
        except psycopg2.Error as exc:
            self.log.warning(
                "the move journal of %s on the target could not be read after the drain (%s): the report"
                " counts this try only (attempts: null); the PgQ page reads the journal for this run later",
                options.key, str(exc).strip())
            return None
        finally:
            try:
                target.rollback()
            except psycopg2.Error:
                pass

    def _run_report(self, attempt: dict[str, Any], entries: list[journal.JournalEntry] | None) -> dict[str, Any]:
        """This try's report with the run's totals from the journal in place of its own
        counts, the split by try, and this try's own counts under ``this_attempt``."""
        own = {k: attempt[k] for k in ("events", "batches", "skipped", "stale", "filtered", "dead_lettered",
                                       "first_tick", "last_tick")}
        if entries is None:
            return {**attempt, "attempts": None, "this_attempt": own}
        summary = journal.RunSummary.of(entries)
        out = {**attempt, **asdict(summary.total), "attempts": summary.attempts(), "this_attempt": own}
        if summary.total.batches != attempt["batches"] or summary.total.events != attempt["events"]:
            self.log.info(
                "this run moved %d events in %d batches over %d tries (this try: %d events in %d batches): %s",
                summary.total.events, summary.total.batches, len(summary.by_try), attempt["events"],
                attempt["batches"],
                ", ".join(f"try {a['try_number']}: {a['events']} events in {a['batches']} batches"
                          for a in summary.attempts()),
            )
        return out

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """For Airflow's openlineage provider (only it calls this): the source and target
        queues as datasets, the moved event count as the target's ``outputStatistics`` and the
        consumed tick range as the source's ``pgqTickRange`` facet (operators/lineage.py).
        A run that moved nothing reports no dataset: it changed nothing downstream. None when
        the provider cannot be imported."""
        try:
            from airflow_provider_pgq.operators.lineage import moved_lineage
        except ImportError:
            return None
        if self._lineage is None:  # execute did not finish: what it moved is not known here
            return moved_lineage({}, ("", ""), ("", ""))
        return moved_lineage(*self._lineage)

    def _announce(self, context: Context, report: dict[str, Any]) -> None:
        """The outlet Asset gets an event only when events moved, with the report as extra.

        Airflow emits an event for every declared outlet of a successful task, so a run
        that moved nothing takes its own Asset off the outlets it reports.
        """
        if self._asset is None:
            return
        if report["events"] > 0:
            context["outlet_events"][self._asset].extra = {
                k: report[k] for k in ("source_queue", "target_queue", "consumer_name", "subconsumer",
                                       "events", "batches", "skipped", "first_tick", "last_tick",
                                       "stop_reason")
            }
            return
        self.log.info("no events moved: no asset event for %s", self._asset.uri)
        self.outlets = [o for o in self.outlets if not (isinstance(o, Asset) and o.uri == self._asset.uri)]

    def on_kill(self) -> None:
        """Airflow's kill: the mover's connections are shut, whatever they wait for; the
        servers roll back the open transactions (a batch is applied whole or not at all)."""
        guard.abort(list(self._connections), "the task was killed")
