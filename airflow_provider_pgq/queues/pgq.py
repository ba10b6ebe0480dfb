"""Message-queue provider for scheme ``pgq``: event-driven scheduling on a PgQ queue.

With apache-airflow-providers-common-messaging installed, ::

    Asset("pgq_orders", watchers=[AssetWatcher(
        name="orders_waiting",
        trigger=MessageQueueTrigger(scheme="pgq", pgq_conn_id="pgq_source",
                                    queue_name="orders", consumer_name="orders_mover"),
    )])

resolves to ``PgqQueueEventTrigger`` with those keyword arguments (``min_events``,
``max_lag``, ``poll_interval`` too). The queue is named ``queue_name`` because
MessageQueueTrigger keeps ``queue`` for its deprecated queue-URI form.
"""

from __future__ import annotations

from airflow.providers.common.messaging.providers.base_provider import BaseMessageQueueProvider
from airflow.triggers.base import BaseEventTrigger

from airflow_provider_pgq.triggers.pgq import PgqQueueEventTrigger


class PgqMessageQueueProvider(BaseMessageQueueProvider):
    """Matches ``MessageQueueTrigger(scheme="pgq", ...)``; listed under ``queues`` in get_provider_info()."""

    scheme = "pgq"

    def trigger_class(self) -> type[BaseEventTrigger]:
        return PgqQueueEventTrigger
