"""Live reads for the page against real databases: one statement per database however
many movers share it, a cache, a bound on the wait, errors per row, no password."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from airflow_provider_pgq.ui import live
from airflow_provider_pgq.ui.app import build_rows
from airflow_provider_pgq.ui.history import RunPoint
from airflow_provider_pgq.ui.movers import MoverSpec
from tests.helpers import Server, create_queue, produce, queue_events, register, run_mover, simple_events, tick

#: Every connection id these tests use: a user who may read them all.
EVERY = frozenset(("src_a", "src_b", "dst", "dst_again", "down", "silent", "no_such_conn"))


def _spec(task: str, src: str, dst: str, queue: str, consumer: str, sub: str = "") -> MoverSpec:
    return MoverSpec(dag_id="d", task_id=task, map_index=-1, source_conn_id=src, target_conn_id=dst,
                     source_queue=queue, target_queue=queue, consumer_name=consumer, subconsumer=sub)


@pytest.fixture
def silent_server() -> Iterator[int]:
    """Accepts TCP connections and never answers: a server behind a frozen network."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for s in held:
        s.close()
    listener.close()


@pytest.fixture
def three_databases(make_db: Callable[..., Server], monkeypatch: pytest.MonkeyPatch) -> list[Server]:
    """Two sources and a target (pgq_ext installed), as Airflow connections src_a, src_b, dst
    (and dst_again: a second connection id to the same target database)."""
    dbs = [make_db(queue="q"), make_db(queue="q"), make_db(ext=True)]
    for name, server in zip(("src_a", "src_b", "dst"), dbs, strict=True):
        monkeypatch.setenv(f"AIRFLOW_CONN_{name.upper()}", server.uri())
    monkeypatch.setenv("AIRFLOW_CONN_DST_AGAIN", dbs[2].uri())
    create_queue(dbs[2], "q")
    return dbs


def test_one_read_per_database_for_many_movers_then_the_cache(three_databases: list[Server]) -> None:
    src_a, src_b, dst = three_databases
    specs = []
    for i in range(6):
        register(src_a, "q", f"c{i}")
        register(src_b, "q", f"c{i}")
        specs += [_spec(f"a{i}", "src_a", "dst", "q", f"c{i}", "a"),
                  _spec(f"b{i}", "src_b", "dst_again", "q", f"c{i}", "b")]
    produce(src_a, "q", simple_events(4))
    tick(src_a, "q")
    reader = live.LiveReader(lambda conn_id: _open(conn_id), ttl=60, bound=20)
    rows = build_rows(reader, specs, {}, 900, "", set(), connections=EVERY)
    assert reader.reads == 3  # twelve movers, two connection ids to one target: three databases
    assert len(rows) == 12 and all(r["errors"] == [] for r in rows), [r["errors"] for r in rows]
    a0 = next(r for r in rows if r["task_id"] == "a0")
    assert a0["registered"] is True and a0["pending_events"] > 0 and a0["newest_tick"] > a0["last_tick"]
    assert a0["source"]["database"] == src_a.dbname and a0["target"]["database"] == dst.dbname
    build_rows(reader, specs, {}, 900, "", set(), connections=EVERY)
    assert reader.reads == 3  # within ttl: from the cache


def test_an_unreachable_and_a_silent_database_do_not_hold_the_page(
        three_databases: list[Server], silent_server: int, monkeypatch: pytest.MonkeyPatch) -> None:
    src_a, _, _ = three_databases
    register(src_a, "q", "c")
    monkeypatch.setenv("AIRFLOW_CONN_DOWN", "postgresql://someone:s3cret-pw@127.0.0.1:1/nothing")
    monkeypatch.setenv("AIRFLOW_CONN_SILENT", f"postgresql://someone:s3cret-pw@127.0.0.1:{silent_server}/quiet")
    specs = [_spec("up", "src_a", "dst", "q", "c"), _spec("down", "down", "dst", "q", "c"),
             _spec("silent", "silent", "dst", "q", "c"), _spec("unknown", "no_such_conn", "dst", "q", "c")]
    history = {("d", "up", -1): [RunPoint("r1", None, "success", 5, 1, 0.5, 0, "drained")]}
    reader = live.LiveReader(lambda conn_id: _open(conn_id), ttl=60, bound=1.0)
    started = time.monotonic()
    rows = {r["task_id"]: r for r in build_rows(reader, specs, history, 900, "/ui", {"d"}, connections=EVERY)}
    assert time.monotonic() - started < 4  # the silent server's connect timeout is 5 s
    assert rows["up"]["errors"] == [] and rows["up"]["state"] == "keeping up"
    assert rows["up"]["runs"][0]["events"] == 5 and rows["up"]["grid_url"] == "/ui/dags/d"
    assert rows["down"]["state"] == "stopped" and "Connection refused" in " ".join(rows["down"]["errors"])
    assert any("no answer within 1 s" in e for e in rows["silent"]["errors"])
    assert rows["silent"]["state"] == "unknown"  # not read in time: the mover may be fine
    assert any("no_such_conn" in e for e in rows["unknown"]["errors"])
    text = repr(rows)
    assert "s3cret-pw" not in text and "someone" not in text
    assert rows["down"]["source"] == {"conn_id": "down", "queue": "q", "host": "127.0.0.1", "port": "1",
                                      "database": "nothing"}
    # the next page load joins the silent read still in flight instead of starting another
    reads = reader.reads
    build_rows(reader, specs, history, 900, "", {"d"}, connections=EVERY)
    assert reader.reads == reads


def test_run_reports_are_hidden_without_xcom_access(three_databases: list[Server]) -> None:
    src_a, _, _ = three_databases
    register(src_a, "q", "c")
    history = {("d", "up", -1): [RunPoint("r1", None, "success", 5, 1, 0.5, 0, "drained")]}
    reader = live.LiveReader(lambda conn_id: _open(conn_id))
    (row,) = build_rows(reader, [_spec("up", "src_a", "dst", "q", "c")], history, 900, "", set(),
                        connections=EVERY)
    assert row["runs"] is None


def test_a_connection_the_user_may_not_read_is_neither_opened_nor_shown(three_databases: list[Server]) -> None:
    """The page opened any connection a readable DAG names, with that connection's
    credentials, and showed its host, port, database and positions to every user who may
    read the DAG. A connection the auth manager does not let the user read is not opened."""
    src_a, _, dst = three_databases
    register(src_a, "q", "c")
    opened: list[str] = []

    def open_counted(conn_id: str) -> object:
        opened.append(conn_id)
        return _open(conn_id)

    reader = live.LiveReader(open_counted, ttl=0, bound=20)
    spec = _spec("up", "src_a", "dst", "q", "c")
    (row,) = build_rows(reader, [spec], {}, 900, "", set(), connections=EVERY)
    assert sorted(opened) == ["dst", "src_a"] and row["registered"] is True  # a user who may
    opened.clear()
    (row,) = build_rows(reader, [spec], {}, 900, "", set(), connections={"src_a"})
    assert opened == []  # a mover is read from both sides or not at all
    assert row["target"] == {"conn_id": "dst", "queue": "q"}  # no host, port, database
    assert row["target_mark"] is None and row["registered"] is None and row["state"] == "stopped"
    assert any("may not read" in e and "'dst'" in e for e in row["errors"]), row["errors"]
    assert row["source"]["database"] == src_a.dbname  # a connection the user may read
    (row,) = build_rows(reader, [spec], {}, 900, "", set(), connections=set())
    assert opened == []
    assert row["source"] == {"conn_id": "src_a", "queue": "q"} and row["last_tick"] is None
    assert dst.dbname not in repr(row) and src_a.dbname not in repr(row)


def _open(conn_id: str) -> object:
    from airflow_provider_pgq.ui.app import _open as open_for_page

    return open_for_page(conn_id)


def test_describe_hides_the_login_but_not_words_that_contain_it() -> None:
    exc = RuntimeError('role "bob" does not exist; bobby and bob.x stay')
    assert live.describe(exc, "bob") == 'RuntimeError: role "<login>" does not exist; bobby and bob.x stay'


def test_run_history_reads_the_journal_where_the_xcom_is_missing_or_partial(
        three_databases: list[Server]) -> None:
    """A try killed after some batches writes no XCom; a report of an older release covers
    one try only. Their runs show the events and batches the target's journal holds for
    the task instance; a whole-run report stays as it is."""
    from airflow_provider_pgq.core.connect import connect
    from airflow_provider_pgq.core.journal import Who
    from airflow_provider_pgq.core.mover import MoverOptions, QueueMover

    src_a, _, dst = three_databases
    register(src_a, "q", "c")
    for run_id, sizes in (("killed", (3, 4)), ("old", (5, 6)), ("new", (7,))):
        for n in sizes:
            produce(src_a, "q", simple_events(n))
            tick(src_a, "q")
            who = Who(dag_id="d", run_id=run_id, task_id="up", map_index=-1, try_number=1)
            s, t = connect(src_a.dsn), connect(dst.dsn)
            try:
                QueueMover(s, t, MoverOptions("q", "q", "c", batch_target_events=1, who=who)).drain()
            finally:
                s.close()
                t.close()
    history = {("d", "up", -1): [
        RunPoint("killed", None, "failed", None, None, None, None, None),
        RunPoint("old", None, "success", 6, 1, 0.5, 0, "drained"),  # the retry's own try only
        RunPoint("new", None, "success", 7, 1, 0.5, 0, "drained", whole_run=True),
        RunPoint("never", None, "failed", None, None, None, None, None),
    ]}
    reader = live.LiveReader(lambda conn_id: _open(conn_id))
    (row,) = build_rows(reader, [_spec("up", "src_a", "dst", "q", "c")], history, 900, "", {"d"},
                        connections=EVERY)
    runs = {r["run_id"]: r for r in row["runs"]}
    assert (runs["killed"]["events"], runs["killed"]["batches"], runs["killed"]["from_journal"]) == (7, 2, True)
    assert (runs["old"]["events"], runs["old"]["batches"], runs["old"]["from_journal"]) == (11, 2, True)
    assert (runs["new"]["events"], runs["new"]["from_journal"]) == (7, False)
    assert (runs["never"]["events"], runs["never"]["from_journal"]) == (None, False)
    assert row["errors"] == []


def test_an_open_batch_left_behind_by_a_dead_worker_reads_as_stuck_until_a_retry_moves_it(
        source: Server, target: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 24, point 3: the row said "keeping up" (open batch, events pending, the task
    up_for_retry) until the lag passed ui_behind_seconds."""
    monkeypatch.setenv("AIRFLOW_CONN_SRC_A", source.uri())
    monkeypatch.setenv("AIRFLOW_CONN_DST", target.uri())
    register(source, "src_q", "c")
    produce(source, "src_q", simple_events(40))
    tick(source, "src_q")
    # the worker took the batch, then died: PgQ keeps it open for the consumer
    [[batch_id]] = source.execute("select pgq.next_batch('src_q', 'c')")
    assert batch_id is not None
    spec = _spec("m", "src_a", "dst", "src_q", "c")
    spec = MoverSpec(**{**spec.__dict__, "target_queue": "dst_q"})
    time.sleep(1.2)
    reader = live.LiveReader(lambda conn_id: _open(conn_id), ttl=0, bound=20)

    def row(stuck: float, task_state: str | None = None) -> dict[str, object]:
        point = RunPoint("r1", None, task_state, None, None, None, None, None)
        history = {("d", "m", -1): [point]} if task_state else {}
        (only,) = build_rows(reader, [spec], history, 900, "", {"d"}, connections=EVERY | {"src_a", "dst"},
                             stuck=stuck)
        return only

    stuck = row(stuck=1.0)
    assert stuck["errors"] == [] and stuck["current_batch"] == batch_id, stuck
    assert stuck["state"] == "stuck" and isinstance(stuck["last_seen_seconds"], float)
    assert stuck["last_seen_seconds"] >= 1.2
    assert row(stuck=3600)["state"] == "keeping up"  # under the setting: a batch being moved
    assert row(stuck=3600, task_state="up_for_retry")["state"] == "stuck"  # nobody is moving it
    # the retry takes the same open batch over and moves it: the row is green again
    assert run_mover(source, target, consumer="c").events == 40
    after = row(stuck=1.0, task_state="success")
    assert after["current_batch"] is None and after["state"] == "keeping up", after
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")
