"""PgqQueueSensor: wait until a PgQ consumer has events to move."""

from __future__ import annotations

import datetime as dt
import warnings
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseSensorOperator, Context
from airflow.sdk.bases.sensor import PokeReturnValue

try:
    from airflow.sdk.configuration import conf
except ImportError:  # pragma: no cover - Airflow 3.0, before the Task SDK had its own config
    from airflow.configuration import conf

from airflow_provider_pgq.core.errors import PgqError
from airflow_provider_pgq.core.pending import PendingStatus, require_registered, validate_thresholds
from airflow_provider_pgq.hooks.pgq import PgqHook
from airflow_provider_pgq.triggers.pgq import PgqEventsTrigger


class PgqQueueSensor(BaseSensorOperator):
    """Succeeds when ``consumer_name`` on ``queue_name`` has an available batch holding at least
    ``min_events`` events (PgQ's estimate), or any events once it lags ``max_lag`` seconds.

    It reads positions only and never takes a batch, so the mover that runs after it
    still finds every event. "Available" means a tick newer than the consumer's last
    one exists: without a ticker (pgqd, or PgqTickerOperator) new events are not
    visible to it, exactly as they are not to the mover.

    ``deferrable=True`` checks once and then waits in the triggerer
    (``PgqEventsTrigger``) without holding a worker slot; otherwise it pokes every
    ``poke_interval`` seconds (``mode="reschedule"`` frees the slot between pokes).
    A missing queue or an unregistered consumer fails the task at once, with what to
    create: waiting for them would never end.

    :param pgq_conn_id: Airflow connection to the database with the queue (templated).
    :param queue_name: the PgQ queue (templated). (``queue`` is BaseOperator's executor queue.)
    :param consumer_name: the consumer whose backlog counts, usually the mover's
        (templated). ``consumer=`` is its old name: still accepted, with a DeprecationWarning.
    :param min_events: estimated events that must wait; 0 succeeds on any available batch.
    :param max_lag: also succeed when events wait and the consumer lags this many seconds.
    :param deferrable: wait in the triggerer instead of a worker; default
        ``[operators] default_deferrable`` (False), as Airflow's own sensors.
    :return: the consumer's status (``PendingStatus.to_dict()``, XCom): queue_name,
        consumer_name, pending_events, last_tick, newest_tick, lag_seconds, batch_available...
    """

    template_fields: Sequence[str] = ("pgq_conn_id", "queue_name", "consumer_name")
    ui_color = "#dcedc8"

    def __init__(
        self,
        *,
        pgq_conn_id: str,
        queue_name: str,
        consumer_name: str | None = None,
        min_events: int = 1,
        max_lag: float | dt.timedelta | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        consumer: str | None = None,
        **kwargs: Any,
    ) -> None:
        if consumer is not None:
            warnings.warn(
                "PgqQueueSensor(consumer=...) is deprecated: use consumer_name=...",
                DeprecationWarning, stacklevel=2,
            )
            if consumer_name is not None and consumer_name != consumer:
                raise ValueError(f"give consumer_name only, not also consumer ({consumer_name!r} != {consumer!r})")
            consumer_name = consumer
        if consumer_name is None:
            raise TypeError("PgqQueueSensor needs consumer_name: the consumer whose backlog counts")
        super().__init__(**kwargs)
        self.pgq_conn_id = pgq_conn_id
        self.queue_name = queue_name
        self.consumer_name = consumer_name
        self.min_events = min_events
        self.max_lag = max_lag.total_seconds() if isinstance(max_lag, dt.timedelta) else max_lag
        self.deferrable = deferrable
        validate_thresholds(min_events, self.max_lag)  # fails when the DAG is parsed, not at run time

    def _status(self) -> PendingStatus:
        hook = PgqHook(self.pgq_conn_id, application_name=f"airflow:{self.dag_id}.{self.task_id}"[:63])
        status = hook.get_lag(self.queue_name, self.consumer_name)
        require_registered(status)
        return status

    def poke(self, context: Context) -> PokeReturnValue:
        status = self._status()
        self.log.info(
            "consumer %r on %r: last tick %s, newest tick %s, ~%s events pending, lag %s s",
            self.consumer_name, self.queue_name, status.last_tick, status.newest_tick,
            status.pending_events, status.lag_seconds,
        )
        return PokeReturnValue(status.ready(self.min_events, self.max_lag), status.to_dict())

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        first = self.poke(context)
        if first:
            return first.xcom_value
        self.defer(
            trigger=PgqEventsTrigger(
                pgq_conn_id=self.pgq_conn_id,
                queue_name=self.queue_name,
                consumer_name=self.consumer_name,
                min_events=self.min_events,
                max_lag=self.max_lag,
                poll_interval=max(self.poke_interval, 0.1),
            ),
            method_name="execute_complete",
            timeout=dt.timedelta(seconds=self.timeout),
        )

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Back from the triggerer: the status that satisfied it, or its error."""
        if not event or event.get("status") != "ready":
            message = (event or {}).get("message", "the trigger ended without an event")
            raise PgqError(f"waiting for consumer {self.consumer_name!r} on queue {self.queue_name!r}: {message}")
        self.log.info(
            "consumer %r on %r: ~%s events pending up to tick %s",
            self.consumer_name, self.queue_name, event.get("pending_events"), event.get("newest_tick"),
        )
        return {k: v for k, v in event.items() if k != "status"}
