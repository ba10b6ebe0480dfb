"""The triggers' run() in a real event loop against a real database with PgQ.

"Not before" is shown by letting a trigger poll many times (every 20 ms) over a
queue whose state must not fire it and checking it has not fired; "fires" by
awaiting its event once the state changed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger
from airflow.sdk._shared.module_loading import import_string
from airflow.triggers.base import TriggerEvent
from airflow.triggers.shared_stream import SharedStreamManager

from airflow_provider_pgq.triggers.pgq import APPLICATION_NAME, PgqEventsTrigger, PgqQueueEventTrigger
from tests.helpers import Server, produce, register, run_mover, simple_events, tick_plain

POLL = 0.02
QUIET = 0.4  # about 20 polls that must not fire
FIRE_TIMEOUT = 30.0


@pytest.fixture
def queue_db(make_db, monkeypatch) -> Server:
    """src_q ticking on every new event (ticker_max_count 1), consumer 'mover', as pgq_src.

    One event is inserted and ticked before the consumer registers: on a queue that
    never had an event PgQ's pending estimate is one low (its sequence starts unused).
    """
    db = make_db(queue="src_q")
    db.execute("select pgq.set_queue_config('src_q', 'ticker_max_count', '1')")
    produce(db, "src_q", simple_events(1, start=-1))
    tick_plain(db, "src_q")
    register(db, "src_q", "mover")
    monkeypatch.setenv("AIRFLOW_CONN_PGQ_SRC", db.uri())
    return db


def _kwargs(**over: Any) -> dict[str, Any]:
    return {"pgq_conn_id": "pgq_src", "queue_name": "src_q", "consumer_name": "mover",
            "poll_interval": POLL, **over}


async def _quiet(task: asyncio.Task[Any]) -> None:
    await asyncio.sleep(QUIET)
    assert not task.done(), f"fired too early: {task.result() if not task.cancelled() else 'cancelled'}"


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


def _run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


async def _stop(agen: AsyncIterator[Any], task: asyncio.Task[Any] | None = None) -> None:
    if task is not None and not task.done():
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
    await agen.aclose()  # type: ignore[attr-defined]


@pytest.mark.parametrize("cls", [PgqEventsTrigger, PgqQueueEventTrigger])
def test_serialize_round_trips(cls):
    trigger = cls(**_kwargs(min_events=7, max_lag=60.0))
    classpath, kwargs = trigger.serialize()
    assert import_string(classpath) is cls
    again = import_string(classpath)(**kwargs)
    assert again.serialize() == (classpath, kwargs)
    assert kwargs == {"pgq_conn_id": "pgq_src", "queue_name": "src_q", "consumer_name": "mover",
                      "min_events": 7, "max_lag": 60.0, "poll_interval": POLL}


@pytest.mark.parametrize("cls", [PgqEventsTrigger, PgqQueueEventTrigger])
def test_triggers_serialized_by_0_2_0_still_load(cls):
    """What 0.2.0 stored in the metadata database (classpath and kwargs, ``consumer=``)
    still builds the trigger, which serializes itself under the new name from then on."""
    classpath = f"{cls.__module__}.{cls.__qualname__}"
    stored = {"pgq_conn_id": "pgq_src", "queue_name": "src_q", "consumer": "mover",
              "min_events": 7, "max_lag": 60.0, "poll_interval": POLL}
    trigger = import_string(classpath)(**stored)
    assert trigger.consumer_name == "mover"
    assert trigger.serialize() == cls(**_kwargs(min_events=7, max_lag=60.0)).serialize()
    with pytest.raises(ValueError, match="consumer_name only"):
        cls(**{**stored, "consumer_name": "other"})


@pytest.mark.parametrize("bad", [{"min_events": -1}, {"max_lag": 0}, {"consumer_name": ""}, {"poll_interval": 0}])
def test_bad_parameters_refused(bad):
    with pytest.raises(ValueError):
        PgqEventsTrigger(**_kwargs(**bad))


def test_trigger_waits_for_events_and_a_tick(queue_db):
    async def scenario() -> None:
        agen = PgqEventsTrigger(**_kwargs()).run()
        task = asyncio.ensure_future(agen.__anext__())
        await _quiet(task)  # empty queue
        await _in_thread(produce, queue_db, "src_q", simple_events(5))
        await _quiet(task)  # events, but no tick yet: no batch is available
        await _in_thread(tick_plain, queue_db, "src_q")
        event: TriggerEvent = await asyncio.wait_for(task, FIRE_TIMEOUT)
        await _stop(agen)
        p = event.payload
        assert p["status"] == "ready" and p["batch_available"] is True
        assert p["pending_events"] == 5 and p["newest_tick"] > p["last_tick"]

    _run(scenario)
    # it only looked: no batch was allocated for the consumer, nothing was finished
    rows = queue_db.execute(
        "select current_batch, pending_events from pgq.get_consumer_info('src_q', 'mover')")
    assert rows == [(None, 5)]


def test_min_events_threshold(queue_db):
    async def scenario() -> None:
        agen = PgqEventsTrigger(**_kwargs(min_events=10)).run()
        task = asyncio.ensure_future(agen.__anext__())
        await _in_thread(produce, queue_db, "src_q", simple_events(4))
        await _in_thread(tick_plain, queue_db, "src_q")
        await _quiet(task)  # a batch of 4 < 10
        await _in_thread(produce, queue_db, "src_q", simple_events(6, start=4))
        await _in_thread(tick_plain, queue_db, "src_q")
        event = await asyncio.wait_for(task, FIRE_TIMEOUT)
        await _stop(agen)
        assert event.payload["pending_events"] == 10

    _run(scenario)


def test_unregistered_consumer_and_missing_queue_end_with_an_error(queue_db):
    async def first(**over: Any) -> dict[str, Any]:
        agen = PgqEventsTrigger(**_kwargs(**over)).run()
        event = await asyncio.wait_for(agen.__anext__(), FIRE_TIMEOUT)
        await _stop(agen)
        return dict(event.payload)

    nobody = asyncio.run(first(consumer_name="nobody"))
    assert nobody["status"] == "error"
    assert "'nobody' is not registered on queue 'src_q'" in nobody["message"]
    missing = asyncio.run(first(queue_name="no_such_q"))
    assert missing["status"] == "error" and "queue 'no_such_q' does not exist" in missing["message"]


def test_message_queue_trigger_scheme_pgq_fires_once_per_new_work(queue_db, make_db):
    target = make_db(queue="dst_q", ext=True)
    mqt = MessageQueueTrigger(scheme="pgq", **_kwargs())
    assert isinstance(mqt.trigger, PgqQueueEventTrigger)
    # what the Asset's watcher row stores: our class, so the triggerer runs it directly
    assert mqt.serialize() == PgqQueueEventTrigger(**_kwargs()).serialize()

    async def scenario() -> None:
        agen = mqt.run()
        task = asyncio.ensure_future(agen.__anext__())
        await _quiet(task)  # nothing in the queue
        await _in_thread(produce, queue_db, "src_q", simple_events(3))
        await _in_thread(tick_plain, queue_db, "src_q")
        first = await asyncio.wait_for(task, FIRE_TIMEOUT)
        assert first.payload["pending_events"] == 3 and first.payload["pgq_conn_id"] == "pgq_src"

        task = asyncio.ensure_future(agen.__anext__())
        await _quiet(task)  # the same work is not announced twice
        await _in_thread(lambda: run_mover(queue_db, target, consumer="mover"))
        await _quiet(task)  # drained: nothing waits
        await _in_thread(produce, queue_db, "src_q", simple_events(2, start=3))
        await _in_thread(tick_plain, queue_db, "src_q")
        second = await asyncio.wait_for(task, FIRE_TIMEOUT)
        assert second.payload["pending_events"] == 2
        assert second.payload["newest_tick"] > first.payload["newest_tick"]
        assert second.payload["last_tick"] == first.payload["newest_tick"]
        await _stop(agen)

    _run(scenario)


def test_event_trigger_waits_out_a_missing_consumer(queue_db):
    async def scenario() -> None:
        agen = PgqQueueEventTrigger(**_kwargs(consumer_name="later")).run()
        task = asyncio.ensure_future(agen.__anext__())
        await _quiet(task)  # not registered yet: the trigger waits, it does not fail
        await _in_thread(register, queue_db, "src_q", "later")
        await _in_thread(produce, queue_db, "src_q", simple_events(1))
        await _in_thread(tick_plain, queue_db, "src_q")
        event = await asyncio.wait_for(task, FIRE_TIMEOUT)
        await _stop(agen)
        assert event.payload["consumer_name"] == "later" and event.payload["pending_events"] == 1

    _run(scenario)


def _poll_sessions(db: Server) -> int:
    return int(db.execute(
        "select count(*) from pg_stat_activity where datname = %s and application_name = %s",
        (db.dbname, APPLICATION_NAME))[0][0])


def test_watchers_of_one_queue_share_one_poll(queue_db):
    """Through Airflow's own SharedStreamManager, as the triggerer runs them."""
    register(queue_db, "src_q", "other")
    few = PgqQueueEventTrigger(**_kwargs(consumer_name="mover"))
    many = PgqQueueEventTrigger(**_kwargs(consumer_name="other", min_events=5))
    assert few.shared_stream_key() == many.shared_stream_key()

    async def scenario() -> None:
        manager = SharedStreamManager()
        key = few.shared_stream_key()
        few_events = few.filter_shared_stream(manager.subscribe(trigger_id=1, trigger=few, key=key))
        many_events = many.filter_shared_stream(manager.subscribe(trigger_id=2, trigger=many, key=key))
        few_task = asyncio.ensure_future(few_events.__anext__())
        many_task = asyncio.ensure_future(many_events.__anext__())
        await _in_thread(produce, queue_db, "src_q", simple_events(2))
        await _in_thread(tick_plain, queue_db, "src_q")
        got = await asyncio.wait_for(few_task, FIRE_TIMEOUT)
        assert got.payload["consumer_name"] == "mover" and got.payload["pending_events"] == 2
        await _quiet(many_task)  # 2 < 5 for the other watcher
        assert await _in_thread(_poll_sessions, queue_db) == 1
        await _in_thread(produce, queue_db, "src_q", simple_events(3, start=2))
        await _in_thread(tick_plain, queue_db, "src_q")
        got = await asyncio.wait_for(many_task, FIRE_TIMEOUT)
        assert got.payload["consumer_name"] == "other" and got.payload["pending_events"] == 5
        await _stop(few_events)
        await _stop(many_events)
        await manager.unsubscribe(1, key)
        await manager.unsubscribe(2, key)
        assert await _in_thread(_poll_sessions, queue_db) == 0

    _run(scenario)
