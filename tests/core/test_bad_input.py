"""Bad input: each mistake ends in one specific exception whose message names the
object at fault and the fix, and nothing is written anywhere.

"Nothing written" is checked against a snapshot of everything the mover could
touch on both sides (schemas, queues, consumers, subscriptions, ticks, event
counts and sequences, pgq_ext tables), taken before and after the failing run,
even though each run is allowed to register the consumer and (where the case is
not about pgq_ext) to install pgq_ext. Then the fix the message names is applied
and the same run moves every event once.
"""

from __future__ import annotations

import datetime as dt
import secrets
import socket
import subprocess
import sys
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from psycopg2 import sql

from airflow_provider_pgq.cli.config import ConfigError, load_config
from airflow_provider_pgq.core import pgq_ext
from airflow_provider_pgq.core.connect import connect
from airflow_provider_pgq.core.errors import (
    ConnectionFailed,
    ConsumerNotRegistered,
    InvalidParameter,
    PgqError,
    PgqExtMissing,
    PgqNotInstalled,
    QueueDisabled,
    QueueNotFound,
)
from airflow_provider_pgq.core.mover import DrainBounds, MoverOptions, QueueMover
from tests.helpers import (
    Server,
    create_queue,
    has_pgq_ext,
    is_registered,
    pretend_mover_schema,
    produce,
    queue_events,
    register,
    require_password_checks,
    run_mover,
    simple_events,
    tick,
)

MakeDb = Callable[..., Server]


def _rows(server: Server, query: str) -> list[tuple[Any, ...]]:
    return server.execute(query)


def snapshot(server: Server) -> dict[str, Any]:
    """Everything of PgQ and pgq_ext in a database that a run could change."""
    state: dict[str, Any] = {
        "schemas": _rows(server, "select nspname from pg_namespace order by 1"),
        "functions": _rows(server, "select p.oid::regprocedure::text from pg_proc p join pg_namespace n"
                                   " on n.oid = p.pronamespace where n.nspname in ('pgq', 'pgq_ext') order by 1"),
    }
    if server.execute("select to_regclass('pgq.queue') is not null")[0][0]:
        state["queues"] = _rows(server, "select queue_name, queue_disable_insert, queue_cur_table,"
                                        " queue_ticker_paused, pgq.seq_getval(queue_event_seq)"
                                        " from pgq.queue order by 1")
        state["consumers"] = _rows(server, "select co_name from pgq.consumer order by 1")
        state["subscriptions"] = _rows(server, "select sub_queue, sub_consumer, sub_last_tick, sub_next_tick,"
                                               " sub_batch from pgq.subscription order by 1, 2")
        state["ticks"] = _rows(server, "select tick_queue, count(*), max(tick_id) from pgq.tick group by 1 order by 1")
        state["events"] = {
            name: sorted(queue_events(server, name).items(), key=repr)
            for (name,) in _rows(server, "select queue_name from pgq.queue")
        }
    if server.execute("select to_regclass('pgq_ext.completed_tick') is not null")[0][0]:
        state["marks"] = _rows(server, "select * from pgq_ext.completed_tick order by 1, 2")
    if server.execute("select to_regclass('pgq_ext.tracking_source') is not null")[0][0]:
        state["bindings"] = _rows(server, "select consumer_id, subconsumer_id, source_database, source_queue"
                                          " from pgq_ext.tracking_source order by 1, 2")
    return state


@dataclass
class Case:
    """One mistake: how to make it, what it must raise, and the fix its message names."""

    break_it: Callable[[Server, Server], Any]
    error: type[PgqError]
    says: list[str]
    fix: Callable[[Server, Server], dict[str, Any]]
    options: dict[str, Any] = field(default_factory=lambda: {"register_consumer": True, "install_pgq_ext": True})


def _create_queue(server: Server, queue: str) -> None:
    server.execute("select pgq.create_queue(%s)", (queue,))


def _drop_pgq(server: Server) -> None:
    server.execute("drop extension pgq cascade")


def _add_pgq(server: Server, queue: str) -> None:
    server.execute("create extension pgq")
    _create_queue(server, queue)


def _install_pgq_ext(server: Server) -> None:
    conn = connect(server.dsn)
    try:
        pgq_ext.install(conn)
    finally:
        conn.close()


def _old_pgq_ext(server: Server) -> None:
    _install_pgq_ext(server)
    pretend_mover_schema(server, 0)


def _classic_pgq_ext(server: Server) -> None:
    """The classic layout: its tables and functions, none of what the mover adds."""
    _install_pgq_ext(server)
    server.execute("drop function pgq_ext.mover_schema_version()")
    server.execute("drop function pgq_ext.bind_source(text, text, text, text, text)")
    server.execute("drop table pgq_ext.tracking_source")


def _nothing(source: Server, target: Server) -> None:
    return None


def _then(action: Callable[[Server, Server], Any], **options: Any) -> Callable[[Server, Server], dict[str, Any]]:
    """A fix: do `action`, then run again with `options` on top."""

    def fix(source: Server, target: Server) -> dict[str, Any]:
        action(source, target)
        return dict(options)

    return fix


def _enable(source: Server, target: Server) -> None:
    target.execute("update pgq.queue set queue_disable_insert = false where queue_name = 'dst_q'")


CASES: dict[str, Case] = {
    "source-queue-missing": Case(
        lambda s, t: s.execute("select pgq.drop_queue('src_q')"),
        QueueNotFound, ["source queue 'src_q'", "pgq.create_queue('src_q')"],
        _then(lambda s, t: _create_queue(s, "src_q")),
    ),
    "target-queue-missing": Case(
        lambda s, t: t.execute("select pgq.drop_queue('dst_q')"),
        QueueNotFound, ["target queue 'dst_q'", "pgq.create_queue('dst_q')"],
        _then(lambda s, t: _create_queue(t, "dst_q")),
    ),
    "pgq-missing-on-source": Case(
        lambda s, t: _drop_pgq(s),
        PgqNotInstalled, ["source database", "create extension pgq"],
        _then(lambda s, t: _add_pgq(s, "src_q")),
    ),
    "pgq-missing-on-target": Case(
        lambda s, t: _drop_pgq(t),
        PgqNotInstalled, ["target database", "create extension pgq"],
        _then(lambda s, t: _add_pgq(t, "dst_q")),
    ),
    "pgq_ext-missing": Case(
        _nothing,
        PgqExtMissing, ["pgq_ext is not installed", "install_pgq_ext=True"],
        _then(_nothing, install_pgq_ext=True),
        options={"register_consumer": True},
    ),
    "pgq_ext-older": Case(
        lambda s, t: _old_pgq_ext(t),
        PgqExtMissing, ["pgq_ext is older", "schema 0 < ", "install_pgq_ext=True"],
        _then(_nothing, install_pgq_ext=True),
        options={"register_consumer": True},
    ),
    "pgq_ext-classic": Case(
        lambda s, t: _classic_pgq_ext(t),
        PgqExtMissing, ["pgq_ext is older", "schema classic", "install_pgq_ext=True"],
        _then(_nothing, install_pgq_ext=True),
        options={"register_consumer": True},
    ),
    "consumer-not-registered": Case(
        lambda s, t: _install_pgq_ext(t),
        ConsumerNotRegistered, ["consumer 'mover'", "source queue 'src_q'", "register_consumer=True"],
        _then(_nothing, register_consumer=True),
        options={},
    ),
    "target-queue-disabled": Case(
        lambda s, t: t.execute("update pgq.queue set queue_disable_insert = true where queue_name = 'dst_q'"),
        QueueDisabled, ["target queue 'dst_q'", "queue_disable_insert"],
        _then(_enable),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_setup_is_named_writes_nothing_and_its_fix_works(name: str, make_db: MakeDb) -> None:
    case = CASES[name]
    source = make_db(queue="src_q")
    target = make_db(queue="dst_q")  # pgq, queue, no pgq_ext
    produce(source, "src_q", simple_events(5, prefix="early"))
    tick(source, "src_q")
    case.break_it(source, target)
    before = snapshot(source), snapshot(target)

    with pytest.raises(case.error) as info:
        run_mover(source, target, **case.options)
    text = str(info.value)
    for fragment in case.says:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    if case.error in (PgqNotInstalled, PgqExtMissing):
        db = source if "source database" in text else target
        assert db.dbname in text  # which database
    assert (snapshot(source), snapshot(target)) == before, "a failed run changed something"

    options = {**case.options, **case.fix(source, target)}
    register(source, "src_q", "mover")
    events = simple_events(30, prefix=name)
    produce(source, "src_q", events)
    tick(source, "src_q")
    report = run_mover(source, target, **options)
    assert report.events == 30
    moved = queue_events(target, "dst_q")
    assert {e[1] for e in moved.elements()} == {e[1] for e in events} and sum(moved.values()) == 30


def test_target_queue_disabled_after_the_checks_leaves_the_batch_open(source: Server, target: Server) -> None:
    """Disabled between prepare() and the batch: the batch stays open on the source and
    the run after re-enabling moves it once."""
    register(source, "src_q", "mover")
    produce(source, "src_q", simple_events(20))
    last = tick(source, "src_q")
    s, t = connect(source.dsn), connect(target.dsn)
    try:
        mover = QueueMover(s, t, MoverOptions("src_q", "dst_q", "mover"))
        mover.prepare()
        target.execute("update pgq.queue set queue_disable_insert = true where queue_name = 'dst_q'")
        batch = mover.next_batch()
        assert batch is not None
        with pytest.raises(QueueDisabled, match="target queue 'dst_q'"):
            mover.apply_batch(batch)
    finally:
        s.close()
        t.close()
    assert sum(queue_events(target, "dst_q").values()) == 0
    assert target.execute("select count(*) from pgq_ext.completed_tick")[0][0] == 0
    open_batch = source.execute("select sub_batch from pgq.subscription")[0][0]
    assert open_batch == batch.batch_id  # not finished: it comes back
    target.execute("update pgq.queue set queue_disable_insert = false where queue_name = 'dst_q'")
    report = run_mover(source, target)
    assert report.events == 20 and report.last_tick == last
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")


# -- connections -----------------------------------------------------------------------

PASSWORD = "Zq8-distinctive-Pa55w0rd"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends


def assert_password_hidden(exc: BaseException, password: str = PASSWORD) -> None:
    shown = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    chained = exc.__cause__ or exc.__context__
    if chained is not None:
        shown += [str(chained), repr(chained)]
    for text in shown:
        assert password not in text, text
    assert exc.__cause__ is None and exc.__suppress_context__  # the driver's error is not shown


@pytest.mark.parametrize("form", ["keywords", "quoted", "uri", "argument"])
def test_wrong_password_is_named_without_showing_it(source: Server, form: str) -> None:
    c = source.cluster
    require_password_checks(c)
    user = c.superuser
    pw = PASSWORD if form != "quoted" else PASSWORD + " with 'quotes' and spaces"
    quoted = pw.replace("\\", "\\\\").replace("'", "\\'")
    dsn = {
        "keywords": f"host=127.0.0.1 port={c.port} dbname={source.dbname} user={user} password={pw}",
        "quoted": f"host=127.0.0.1 port={c.port} dbname={source.dbname} user={user} password='{quoted}'",
        "uri": f"postgresql://{user}:{pw}@127.0.0.1:{c.port}/{source.dbname}",
        "argument": f"host=127.0.0.1 port={c.port} dbname={source.dbname} user={user}",
    }[form]
    extra = {"password": pw} if form == "argument" else {}
    with pytest.raises(ConnectionFailed) as info:
        connect(dsn, **extra)
    text = str(info.value)
    assert f"127.0.0.1:{c.port}/{source.dbname}" in text  # which server and database
    assert "password authentication failed" in text and user in text
    assert_password_hidden(info.value, pw)
    assert_password_hidden(info.value, PASSWORD)


def test_unreachable_host_is_named_without_showing_the_password() -> None:
    port = closed_port()
    with pytest.raises(ConnectionFailed) as info:
        connect(f"host=127.0.0.1 port={port} dbname=db user=u password={PASSWORD} connect_timeout=5")
    text = str(info.value)
    assert f"127.0.0.1:{port}/db" in text and "refused" in text.lower()
    assert_password_hidden(info.value)


def test_malformed_connection_string_does_not_show_the_password() -> None:
    with pytest.raises(ConnectionFailed) as info:
        connect(f"host=127.0.0.1 password={PASSWORD} no_such_option=1")
    # with a password in the string, the option's name may be a piece of it: not shown
    assert 'invalid connection option "<hidden>"' in str(info.value)
    assert_password_hidden(info.value)


# -- parameter values -------------------------------------------------------------------

OPTION_CASES: list[tuple[dict[str, Any], str]] = [
    ({"source_queue": ""}, "source_queue"),
    ({"source_queue": "   "}, "source_queue"),
    ({"target_queue": ""}, "target_queue"),
    ({"consumer": ""}, "consumer"),
    ({"consumer": None}, "consumer"),
    ({"subconsumer": None}, "subconsumer"),
    ({"min_batch_events": 0}, "min_batch_events"),
    ({"min_batch_events": -5}, "min_batch_events"),
    ({"min_batch_interval": dt.timedelta(0)}, "min_batch_interval"),
    ({"min_batch_interval": dt.timedelta(seconds=-1)}, "min_batch_interval"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"chunk_size": -100}, "chunk_size"),
    # pgq.next_batch_custom's min_count is int4: one more fails deep inside PgQ.
    ({"min_batch_events": 2**31}, "min_batch_events"),
    ({"min_batch_events": True}, "min_batch_events"),  # a bool is an int to Python
    ({"min_batch_events": 2.5}, "min_batch_events"),
    ({"min_batch_events": "10"}, "min_batch_events"),
    ({"min_batch_interval": dt.timedelta(days=366)}, "min_batch_interval"),
    ({"min_batch_interval": dt.timedelta.max}, "min_batch_interval"),
    ({"min_batch_interval": 5}, "min_batch_interval"),  # seconds, not a timedelta
    ({"chunk_size": True}, "chunk_size"),
    ({"chunk_size": 10**12}, "chunk_size"),
    ({"chunk_size": 100.0}, "chunk_size"),
    ({"source_queue": "src\x00q"}, "source_queue"),
    ({"target_queue": "dst_q\x00"}, "target_queue"),
    ({"consumer": "\x00mover"}, "consumer"),
    ({"subconsumer": "part\x00two"}, "subconsumer"),
    ({"register_consumer": "false"}, "register_consumer"),  # a non-empty string is true
    ({"keep_event_id": 1}, "keep_event_id"),
]


@pytest.mark.parametrize(("bad", "name"), OPTION_CASES, ids=[f"{n}={b[n]!r}" for b, n in OPTION_CASES])
def test_invalid_mover_options_are_named(bad: dict[str, Any], name: str) -> None:
    options: dict[str, Any] = {"source_queue": "src_q", "target_queue": "dst_q", "consumer": "mover", **bad}
    with pytest.raises(InvalidParameter) as info:
        MoverOptions(**options)
    text = str(info.value)
    assert text.startswith(name), text  # names the parameter...
    assert repr(bad[name]) in text or str(bad[name]) in text, text  # ...and the value given
    assert isinstance(info.value, ValueError)  # callers catching ValueError see it too


BOUND_CASES: list[tuple[dict[str, Any], str]] = [
    ({"max_batches": 0}, "max_batches"),
    ({"max_batches": -1}, "max_batches"),
    ({"max_events": -10}, "max_events"),
    ({"max_runtime": -0.5}, "max_runtime"),
    ({"max_runtime": 0}, "max_runtime"),
    ({"tick_timeout": 0}, "tick_timeout"),
    ({"stop_at": dt.datetime(2026, 1, 1)}, "stop_at"),
    # NaN compares false with everything: the bound would silently never stop a drain.
    ({"max_runtime": float("nan")}, "max_runtime"),
    ({"max_runtime": float("inf")}, "max_runtime"),
    ({"max_runtime": True}, "max_runtime"),
    ({"max_runtime": "60"}, "max_runtime"),
    ({"max_batches": True}, "max_batches"),
    ({"max_batches": 2.5}, "max_batches"),
    ({"max_events": True}, "max_events"),
    ({"max_events": "100"}, "max_events"),
    ({"tick_timeout": float("nan")}, "tick_timeout"),
    ({"tick_timeout": float("inf")}, "tick_timeout"),
    ({"tick_timeout": True}, "tick_timeout"),
    ({"tick_timeout": 10**400}, "tick_timeout"),  # beyond any float
    ({"force_tick": "false"}, "force_tick"),
    ({"stop_at": "2026-01-01T00:00:00+00:00"}, "stop_at"),
]


@pytest.mark.parametrize(("bad", "name"), BOUND_CASES, ids=[n + "=" + str(b[n])[:20] for b, n in BOUND_CASES])
def test_invalid_drain_bounds_are_named(bad: dict[str, Any], name: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        DrainBounds(**bad)
    text = str(info.value)
    assert text.startswith(name), text
    assert repr(bad[name]) in text, text  # the value given


def test_invalid_parameter_fails_before_anything_is_written(source: Server, target: Server) -> None:
    before = snapshot(source), snapshot(target)
    with pytest.raises(InvalidParameter, match="chunk_size"):
        run_mover(source, target, register_consumer=True, install_pgq_ext=True, chunk_size=0)
    with pytest.raises(InvalidParameter, match="max_batches"):
        run_mover(source, target, bounds=DrainBounds(max_batches=-1), register_consumer=True)
    assert (snapshot(source), snapshot(target)) == before


# -- hostile values: one named error before anything is written ----------------------------

NUL_RUNS: list[dict[str, Any]] = [
    {"consumer": "mo\x00ver"},
    {"subconsumer": "sub\x00"},
    {"source_queue": "src_q\x00"},
    {"target_queue": "\x00dst_q"},
    {"min_batch_events": 2**31},
    {"min_batch_events": True},
    {"chunk_size": True},
    {"bounds": {"max_runtime": float("nan")}},
    {"bounds": {"max_batches": True}},
    {"bounds": {"tick_timeout": True, "force_tick": True}},  # before: waited 1 s, then TickerNotRunning
]


@pytest.mark.parametrize("bad", NUL_RUNS, ids=[repr(b) for b in NUL_RUNS])
def test_hostile_values_fail_by_name_before_anything_is_written(
    source: Server, target: Server, bad: dict[str, Any]
) -> None:
    """Before: NUL ended in psycopg2's "A string literal cannot contain NUL" after pgq_ext
    and the registration were written, 2**31 in PgQ's "integer out of range" after the
    registration, and a NaN max_runtime or a bool bound ran as if no bound were given."""
    produce(source, "src_q", simple_events(5))
    tick(source, "src_q")
    before = snapshot(source), snapshot(target)
    options = dict(bad)
    bounds = options.pop("bounds", {})
    name = next(iter(bounds or options))
    with pytest.raises(InvalidParameter) as info:
        run_mover(source, target, consumer=options.pop("consumer", "mover"), bounds=DrainBounds(**bounds),
                  register_consumer=True, install_pgq_ext=True, **options)
    text = str(info.value)
    assert text.startswith(name), text
    assert "\x00" not in text  # shown escaped, never raw
    assert (snapshot(source), snapshot(target)) == before


# -- source and target the same queue ------------------------------------------------------------


def _event_count(server: Server, queue: str) -> int:
    return sum(queue_events(server, queue).values())


def test_same_queue_of_one_database_is_refused_before_anything_is_written(make_db: MakeDb) -> None:
    """Before: the mover registered, installed pgq_ext and copied the queue into itself."""
    db = make_db(queue="q")
    produce(db, "q", simple_events(10))
    tick(db, "q")
    before = snapshot(db)
    with pytest.raises(InvalidParameter) as info:
        run_mover(db, db, source_queue="q", target_queue="q", register_consumer=True, install_pgq_ext=True)
    text = str(info.value)
    assert text.startswith("target_queue 'q' is the source queue itself"), text
    assert repr(db.dbname) in text and "into itself" in text and "another database" in text
    assert not is_registered(db, "q", "mover")
    assert not has_pgq_ext(db)
    assert _event_count(db, "q") == 10
    assert snapshot(db) == before


def test_same_queue_is_refused_for_least_privilege_roles_in_other_time_zones(make_db: MakeDb) -> None:
    """The identity is read with what PUBLIC may execute (pgq_reader / pgq_writer logins,
    no superuser, no pg_monitor) and compares equal whatever each session's TimeZone.
    Before: prepare() passed, and the drain copied the queue into itself."""
    db = make_db(queue="q", ext=True)
    register(db, "q", "mover")
    produce(db, "q", simple_events(10))
    tick(db, "q")
    cluster = db.cluster
    logins: list[tuple[str, str]] = []
    try:
        for role, zone in (("pgq_reader", "Pacific/Kiritimati"), ("pgq_writer", "America/Adak")):
            name, password = f"sq_{uuid.uuid4().hex[:10]}", "pw-" + secrets.token_urlsafe(12)
            cluster.execute("postgres", sql.SQL("create role {} login password %s in role {}").format(
                sql.Identifier(name), sql.Identifier(role)), (password,))
            cluster.execute("postgres", sql.SQL("alter role {} set timezone = {}").format(
                sql.Identifier(name), sql.Literal(zone)))
            logins.append((name, password))
        before = snapshot(db)
        (reader, reader_pw), (writer, writer_pw) = logins
        s = connect(cluster.dsn(db.dbname, user=reader, password=reader_pw))
        t = connect(cluster.dsn(db.dbname, user=writer, password=writer_pw))
        try:
            assert (s.get_parameter_status("is_superuser"), t.get_parameter_status("is_superuser")) == ("off", "off")
            mover = QueueMover(s, t, MoverOptions("q", "q", "mover"))
            with pytest.raises(InvalidParameter, match="is the source queue itself"):
                mover.drain()
        finally:
            s.close()
            t.close()
        assert snapshot(db) == before
        assert _event_count(db, "q") == 10
    finally:
        for name, _ in logins:
            cluster.execute("postgres", sql.SQL("drop role {}").format(sql.Identifier(name)))


def test_same_queue_name_in_two_databases_is_still_moved(make_db: MakeDb) -> None:
    """Regression guard for the check above: only one database's own queue is refused."""
    source = make_db(queue="q")
    target = make_db(queue="q", ext=True)
    register(source, "q", "mover")
    produce(source, "q", simple_events(12))
    tick(source, "q")
    report = run_mover(source, target, source_queue="q", target_queue="q", register_consumer=True)
    assert report.events == 12
    assert queue_events(target, "q") == queue_events(source, "q")


def test_two_queues_of_one_database_are_still_moved(make_db: MakeDb) -> None:
    """Regression guard: one database, two queues, is a move like any other."""
    db = make_db(queue="src_q")
    create_queue(db, "dst_q")
    register(db, "src_q", "mover")
    produce(db, "src_q", simple_events(12))
    tick(db, "src_q")
    report = run_mover(db, db, register_consumer=True, install_pgq_ext=True)
    assert report.events == 12
    assert queue_events(db, "dst_q") == queue_events(db, "src_q")


# -- the classic ini file and the command line -------------------------------------------------


def _ini(path: Path, lines: dict[str, str]) -> Path:
    keys = {"src_db": "dbname=a", "dst_db": "dbname=b", "pgq_queue_name": "q", "dst_queue_name": "q2", **lines}
    path.write_text("[mover]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()), encoding="utf-8")
    return path


INI_NUL_KEYS = ["pgq_queue_name", "dst_queue_name", "pgq_consumer_id", "job_name", "subconsumer", "pidfile"]


@pytest.mark.parametrize("key", INI_NUL_KEYS)
def test_ini_value_with_nul_is_named(tmp_path: Path, key: str) -> None:
    ini = _ini(tmp_path / "m.ini", {key: "bad\x00name"})
    with pytest.raises(ConfigError) as info:
        load_config(ini, base_dir=tmp_path)
    text = str(info.value)
    assert text.startswith(f"{ini}: section [mover], key {key!r}: 'bad\\x00name' contains a NUL"), text
    assert "\x00" not in text and "\n" not in text


def test_ini_connection_string_with_nul_is_named_without_showing_it(tmp_path: Path) -> None:
    ini = _ini(tmp_path / "m.ini", {"src_db": f"dbname=a password={PASSWORD}\x00x"})
    with pytest.raises(ConfigError) as info:
        load_config(ini, base_dir=tmp_path)
    text = str(info.value)
    assert "key 'src_db': <hidden> contains a NUL" in text, text
    assert PASSWORD not in text and "\x00" not in text


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"min_batch_events": "2147483648"}, "'min_batch_events': must be at most 2147483647, got 2147483648"),
        ({"min_batch_interval": "1e20"}, "'min_batch_interval': must be at most 3.1536e+07 seconds, got 1e+20"),
        ({"min_batch_interval": "31622400"}, "'min_batch_interval': must be at most 3.1536e+07 seconds"),
    ],
)
def test_ini_numbers_beyond_what_pgq_takes_are_named(tmp_path: Path, line: dict[str, str], message: str) -> None:
    """Before: 2**31 failed inside PgQ at the first batch; 1e20 seconds escaped as
    timedelta's OverflowError."""
    ini = _ini(tmp_path / "m.ini", line)
    with pytest.raises(ConfigError) as info:
        load_config(ini, base_dir=tmp_path)
    assert message in str(info.value), str(info.value)


def _cli(ini: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "airflow_provider_pgq.cli", str(ini), *args],
        cwd=ini.parent, capture_output=True, text=True, timeout=120,
    )


def _error_line(proc: subprocess.CompletedProcess[str]) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pgq-queue-mover: error: ")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def test_cli_refuses_a_nul_in_the_ini_with_one_line(source: Server, target: Server, tmp_path: Path) -> None:
    """Before: psycopg2's ValueError surfaced as "unexpected ValueError", after pgq_ext
    was installed on the target."""
    ini = _ini(tmp_path / "m.ini", {"src_db": source.dsn, "dst_db": target.dsn, "pgq_queue_name": "src_q",
                                     "dst_queue_name": "dst_q", "pgq_consumer_id": "mo\x00ver",
                                     "register_consumer": "true", "install_pgq_ext": "true"})
    before = snapshot(source), snapshot(target)
    proc = _cli(ini, "--once")
    assert proc.returncode == 2, proc.stderr
    line = _error_line(proc)
    assert "key 'pgq_consumer_id': 'mo\\x00ver' contains a NUL" in line, line
    assert (snapshot(source), snapshot(target)) == before


def test_cli_refuses_moving_a_queue_into_itself_with_one_line(make_db: MakeDb, tmp_path: Path) -> None:
    db = make_db(queue="q")
    produce(db, "q", simple_events(10))
    tick(db, "q")
    ini = _ini(tmp_path / "m.ini", {"src_db": db.dsn, "dst_db": db.dsn, "pgq_queue_name": "q",
                                     "dst_queue_name": "q", "register_consumer": "true",
                                     "install_pgq_ext": "true"})
    before = snapshot(db)
    proc = _cli(ini, "--once")
    assert proc.returncode == 1, proc.stderr
    assert "target_queue 'q' is the source queue itself" in _error_line(proc)
    assert snapshot(db) == before and not is_registered(db, "q", "m") and not has_pgq_ext(db)


# -- the operator: at DAG parse time -------------------------------------------------------------


OPERATOR_CASES: list[tuple[dict[str, Any], str]] = [
    ({"min_batch_interval": float("nan")}, "min_batch_interval"),
    ({"min_batch_interval": float("inf")}, "min_batch_interval"),
    ({"min_batch_interval": 1e20}, "min_batch_interval"),
    ({"min_batch_interval": True}, "min_batch_interval"),
    ({"min_batch_events": True}, "min_batch_events"),
    ({"min_batch_events": 2**31}, "min_batch_events"),
    ({"max_runtime": float("nan")}, "max_runtime"),
    ({"tick_timeout": float("inf")}, "tick_timeout"),
]


@pytest.mark.parametrize(("bad", "name"), OPERATOR_CASES, ids=[f"{n}={b[n]!r}" for b, n in OPERATOR_CASES])
def test_operator_refuses_hostile_values_when_the_dag_is_parsed(bad: dict[str, Any], name: str) -> None:
    """Before: NaN/inf/1e20 escaped as timedelta's ValueError/OverflowError, and the
    rest were accepted (True as one second or one event, NaN as no bound)."""
    from airflow_provider_pgq.operators.queue_mover import PgqQueueMoverOperator

    with pytest.raises(InvalidParameter) as info:
        PgqQueueMoverOperator(task_id="move", source_conn_id="s", target_conn_id="t",
                              source_queue="src_q", target_queue="dst_q", **bad)
    assert str(info.value).startswith(name), str(info.value)


def test_operator_refuses_a_rendered_queue_name_with_nul() -> None:
    """Templated names are known only once rendered: mover_options() names the NUL."""
    from airflow_provider_pgq.operators.queue_mover import PgqQueueMoverOperator

    op = PgqQueueMoverOperator(task_id="move", source_conn_id="s", target_conn_id="t",
                               source_queue="{{ params.q }}", target_queue="dst_q")
    op.source_queue = "src\x00q"  # what the template rendered to
    with pytest.raises(InvalidParameter, match=r"^source_queue must not contain a NUL"):
        op.mover_options()
