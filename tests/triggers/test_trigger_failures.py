"""Issue 14, point 5 (and point 1 in the triggerer): which failures a trigger waits out and
which end it at once, and what it logs, against a real server with real roles."""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

import pytest

from airflow_provider_pgq.triggers.pgq import PgqEventsTrigger, PgqQueueEventTrigger, PollingStopped
from tests.helpers import Server, produce, register, require_password_checks, simple_events, tick_plain
from tests.triggers.test_pgq_triggers import FIRE_TIMEOUT, _in_thread, _kwargs, _quiet, _stop

TRIGGER_LOG = "airflow_provider_pgq.triggers.pgq"


@pytest.fixture
def reader(make_db, monkeypatch) -> tuple[Server, str]:
    """src_q with consumer 'mover', polled through pgq_src as a password login with pgq_reader."""
    db = make_db(queue="src_q")
    produce(db, "src_q", simple_events(1, start=-1))
    tick_plain(db, "src_q")
    register(db, "src_q", "mover")
    role = f"r_{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(12)
    db.execute(f"create role {role} login password %s in role pgq_reader", (password,))
    monkeypatch.setenv("AIRFLOW_CONN_PGQ_SRC", db.uri(user=role, password=password))
    return db, role


def _messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith(TRIGGER_LOG) and r.levelno == level]


def _kill_sessions(db: Server, role: str) -> None:
    db.execute("select pg_terminate_backend(pid) from pg_stat_activity where usename = %s", (role,))


def test_password_change_ends_the_sensor_wait_at_once(reader):
    db, role = reader
    require_password_checks(db.cluster)

    async def scenario() -> dict[str, Any]:
        agen = PgqEventsTrigger(**_kwargs()).run()
        task = asyncio.ensure_future(agen.__anext__())
        await _quiet(task)  # connected and polling, nothing to do
        await _in_thread(db.execute, f"alter role {role} password 'changed-elsewhere-77'")
        await _in_thread(_kill_sessions, db, role)  # the next poll has to log in again
        event = await asyncio.wait_for(task, FIRE_TIMEOUT)
        await _stop(agen)
        return dict(event.payload)

    payload = asyncio.run(scenario())
    assert payload["status"] == "error"
    message = payload["message"]
    assert "password authentication failed" in message and "a retry cannot fix this" in message
    assert f"Airflow connection 'pgq_src' (127.0.0.1:{db.cluster.port}/{db.dbname} as {role})" in message
    assert "changed-elsewhere-77" not in message


async def _first_payload() -> dict[str, Any]:
    """The sensor trigger's first event, then the trigger is stopped."""
    agen = PgqEventsTrigger(**_kwargs()).run()
    event = await asyncio.wait_for(agen.__anext__(), FIRE_TIMEOUT)
    await _stop(agen)
    return dict(event.payload)


def test_missing_database_ends_the_sensor_wait_at_once(reader, monkeypatch):
    db, _ = reader
    monkeypatch.setenv("AIRFLOW_CONN_PGQ_SRC", db.uri().rsplit("/", 1)[0] + "/no_such_db_14")

    payload = asyncio.run(_first_payload())
    assert payload["status"] == "error" and 'database "no_such_db_14" does not exist' in payload["message"]


def test_event_trigger_fails_when_its_queue_disappears(reader):
    db, _ = reader

    async def scenario() -> None:
        agen = PgqQueueEventTrigger(**_kwargs()).run()
        task = asyncio.ensure_future(agen.__anext__())
        await _quiet(task)  # the queue exists, nothing waits
        await _in_thread(db.execute, "select pgq.drop_queue('src_q', true)")
        with pytest.raises(PollingStopped, match="queue 'src_q' .*existed and is gone"):
            await asyncio.wait_for(task, FIRE_TIMEOUT)
        await agen.aclose()  # type: ignore[attr-defined]

    asyncio.run(scenario())


def test_transient_problem_logged_once_when_it_starts_and_once_when_it_clears(reader, caplog):
    """'too many connections for role' is a real refusal that clears by itself."""
    db, role = reader
    caplog.set_level(logging.INFO, logger=TRIGGER_LOG)
    db.execute(f"alter role {role} connection limit 0")

    async def scenario() -> dict[str, Any]:
        agen = PgqEventsTrigger(**_kwargs()).run()
        task = asyncio.ensure_future(agen.__anext__())
        await _quiet(task)  # ~20 failed polls: waited out, not fatal
        await _in_thread(db.execute, f"alter role {role} connection limit -1")
        await _in_thread(produce, db, "src_q", simple_events(3))
        await _in_thread(tick_plain, db, "src_q")
        event = await asyncio.wait_for(task, FIRE_TIMEOUT)
        await _stop(agen)
        return dict(event.payload)

    payload = asyncio.run(scenario())
    assert payload["status"] == "ready" and payload["pending_events"] == 3
    warned = _messages(caplog, logging.WARNING)
    assert len(warned) == 1, warned
    assert "too many connections" in warned[0]
    assert f"Airflow connection 'pgq_src' (127.0.0.1:{db.cluster.port}/{db.dbname} as {role})" in warned[0]
    cleared = [m for m in _messages(caplog, logging.INFO) if "works again" in m]
    assert len(cleared) == 1 and "too many connections" in cleared[0]


def test_event_trigger_logs_a_missing_consumer_once_and_its_resolution(reader, caplog):
    db, _ = reader
    caplog.set_level(logging.INFO, logger=TRIGGER_LOG)

    async def scenario() -> None:
        agen = PgqQueueEventTrigger(**_kwargs(consumer_name="later")).run()
        task = asyncio.ensure_future(agen.__anext__())
        await _quiet(task)
        await _in_thread(register, db, "src_q", "later")
        await _in_thread(produce, db, "src_q", simple_events(1))
        await _in_thread(tick_plain, db, "src_q")
        await asyncio.wait_for(task, FIRE_TIMEOUT)
        await _stop(agen)

    asyncio.run(scenario())
    warned = _messages(caplog, logging.WARNING)
    assert len(warned) == 1 and "'later' is not registered" in warned[0]
    assert any("resolved" in m and "'later'" in m for m in _messages(caplog, logging.INFO))



# -- issue 13: a database without the pgq extension is a problem waited out, not a crash --

_INSTALL_PGQ = ("create extension pgq; select pgq.create_queue('src_q');"
                " select pgq.set_queue_config('src_q', 'ticker_max_count', '1');"
                " select pgq.register_consumer('src_q', 'mover')")


@pytest.fixture
def bare(make_db, monkeypatch) -> Server:
    """A database without the pgq extension, polled through pgq_src."""
    db = make_db(pgq=False)
    monkeypatch.setenv("AIRFLOW_CONN_PGQ_SRC", db.uri())
    return db


def test_event_trigger_waits_out_a_database_without_pgq(bare, caplog):
    """The shared stream lives on; the problem is logged once when it starts and once
    when it clears, and the watcher fires once a setup creates extension, queue and consumer."""
    caplog.set_level(logging.INFO, logger=TRIGGER_LOG)

    async def scenario() -> dict[str, Any]:
        agen = PgqQueueEventTrigger(**_kwargs()).run()
        task = asyncio.ensure_future(agen.__anext__())
        await _quiet(task)  # ~20 polls of a database without pgq: waited out, not fatal
        await _in_thread(bare.execute, _INSTALL_PGQ)  # one transaction: no half-made state is seen
        await _in_thread(produce, bare, "src_q", simple_events(3))
        await _in_thread(tick_plain, bare, "src_q")
        event = await asyncio.wait_for(task, FIRE_TIMEOUT)
        await _stop(agen)
        return dict(event.payload)

    payload = asyncio.run(scenario())
    assert payload["consumer_name"] == "mover" and payload["batch_available"] is True
    assert payload["pgq_conn_id"] == "pgq_src"
    warned = _messages(caplog, logging.WARNING)
    assert len(warned) == 1, warned
    assert "the pgq extension is not installed" in warned[0] and repr(bare.dbname) in warned[0]
    assert "create extension pgq" in warned[0]
    cleared = [m for m in _messages(caplog, logging.INFO) if "resolved" in m]
    assert len(cleared) == 1 and "pgq extension is not installed" in cleared[0]
    assert not _messages(caplog, logging.ERROR)


def test_sensor_trigger_ends_with_a_clear_error_on_a_database_without_pgq(bare):
    payload = asyncio.run(_first_payload())
    assert payload["status"] == "error"
    assert "the pgq extension is not installed" in payload["message"] and "create extension pgq" in payload["message"]
