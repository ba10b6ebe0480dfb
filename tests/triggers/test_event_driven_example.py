"""example_pgq_event_driven end to end: its Asset watcher's trigger, rebuilt as the
triggerer rebuilds it (class path + kwargs), fires for waiting events and not before;
the DAG's run then moves them; afterwards the watcher stays quiet."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from typing import Any

from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger
from airflow.sdk._shared.module_loading import import_string

from airflow_provider_pgq.triggers.pgq import PgqQueueEventTrigger
from tests.helpers import EXAMPLES, DagRunner, produce, queue_events, register, simple_events, tick_plain

QUIET = 0.4


def _example_watcher_trigger() -> Any:
    path = Path(EXAMPLES) / "example_pgq_event_driven.py"
    spec = importlib.util.spec_from_file_location("example_pgq_event_driven_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (watcher,) = module.orders_waiting.watchers
    return watcher.trigger


async def _fires_within(trigger: PgqQueueEventTrigger, quiet: float, before_fire: Any = None) -> Any:
    agen = trigger.run()
    task = asyncio.ensure_future(agen.__anext__())
    await asyncio.sleep(quiet)
    if before_fire is None:
        fired = task.done()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await agen.aclose()
        return fired
    assert not task.done(), "fired before there was anything to announce"
    await asyncio.to_thread(before_fire)
    event = await asyncio.wait_for(task, 30)
    await agen.aclose()
    return event


def test_event_driven_example(make_db, run_dag: DagRunner, monkeypatch):  # noqa: F811
    src, dst = make_db(queue="orders"), make_db(queue="orders")
    src.execute("select pgq.set_queue_config('orders', 'ticker_max_count', '1')")
    produce(src, "orders", simple_events(1, start=-1))  # before the consumer: not its business
    tick_plain(src, "orders")
    register(src, "orders", "orders_mover")
    monkeypatch.setenv("AIRFLOW_CONN_PGQ_SOURCE", src.uri())

    watched = _example_watcher_trigger()
    assert isinstance(watched, MessageQueueTrigger)
    classpath, kwargs = watched.serialize()
    assert import_string(classpath) is PgqQueueEventTrigger
    assert kwargs["queue_name"] == "orders" and kwargs["consumer_name"] == "orders_mover"
    # as the triggerer would run it, polling faster for the test
    trigger = import_string(classpath)(**{**kwargs, "poll_interval": 0.02})

    def new_orders() -> None:
        produce(src, "orders", simple_events(25, prefix="order"))
        tick_plain(src, "orders")

    event = asyncio.run(_fires_within(trigger, QUIET, before_fire=new_orders))
    assert event.payload["pending_events"] == 25 and event.payload["queue_name"] == "orders"

    result = run_dag("example_pgq_event_driven", {"pgq_source": src.uri(), "pgq_target": dst.uri()})
    assert result["state"] == "success", result["log"][-3000:]
    assert result["xcom"]["move_orders[-1]"]["events"] == 25
    moved = queue_events(dst, "orders")
    expected = {e: n for e, n in queue_events(src, "orders").items() if e[0] == "order.type"}
    assert dict(moved) == expected

    # drained: a new watch cycle has nothing to announce
    trigger = import_string(classpath)(**{**kwargs, "poll_interval": 0.02})
    assert asyncio.run(_fires_within(trigger, QUIET)) is False
