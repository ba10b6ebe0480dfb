"""Live positions for the page: one statement per database, in threads, bounded, cached.

Movers are grouped by the database they reach (host, port, database and login of the
connection, so two connection ids to one database share a read); each database is read
once with ``core.positions.read_positions`` in a worker thread. A page load waits at
most ``bound`` seconds: a database that has not answered by then shows an error on its
rows, and its read keeps running under its own connect and statement timeouts; the next
page load joins that read instead of starting another. Answers (errors included) are
cached for ``ttl`` seconds.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from psycopg2.extensions import connection as Connection

from airflow_provider_pgq.core.connect import redact
from airflow_provider_pgq.core.journal import RunKey, run_totals
from airflow_provider_pgq.core.positions import Positions, read_positions
from airflow_provider_pgq.ui.movers import MoverSpec


@dataclass(frozen=True)
class Database:
    """Where a connection id leads; ``shown`` holds host, port and database, nothing more."""

    identity: Hashable
    shown: dict[str, str] = field(hash=False, compare=False)
    #: The login, never shown: errors name it as <login>.
    login: str = field(default="", hash=False, compare=False, repr=False)


@dataclass(frozen=True)
class Request:
    """What one page load asks of one database."""

    sources: tuple[tuple[str, str], ...]
    targets: tuple[tuple[str, str, str], ...]
    #: runs whose totals the move journal should give (their XCom is missing or partial)
    runs: tuple[RunKey, ...] = ()


class NoAnswer(str):
    """The message of a read that did not end within the page's bound (still running)."""


#: Outcome of a read: the positions, or an error message without secrets (NoAnswer: not yet).
Answer = Positions | str


class LiveReader:
    """Shared by all page loads of one API server process."""

    def __init__(self, open_connection: Callable[[str], Connection], ttl: float = 5.0, bound: float = 8.0,
                 workers: int = 8) -> None:
        self._open = open_connection
        self.ttl = ttl
        self.bound = bound
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pgq-ui-read")
        self._lock = threading.RLock()  # a future done before add_done_callback stores at once
        self._cache: dict[tuple[Hashable, Request], tuple[float, Answer]] = {}
        self._running: dict[tuple[Hashable, Request], Future[Answer]] = {}
        #: Reads started (each is one statement on one database): the tests count them.
        self.reads = 0

    def read(self, wanted: dict[Database, tuple[str, Request]]) -> dict[Database, Answer]:
        """``wanted`` maps each database to (a connection id that reaches it, what to ask)."""
        now = time.monotonic()
        answers: dict[Database, Answer] = {}
        pending: dict[Database, Future[Answer]] = {}
        with self._lock:
            for key in [k for k, (expires, _) in self._cache.items() if expires <= now]:
                del self._cache[key]
            for db, (conn_id, request) in wanted.items():
                key = (db.identity, request)
                cached = self._cache.get(key)
                if cached is not None and cached[0] > now:
                    answers[db] = cached[1]
                    continue
                future = self._running.get(key)
                if future is None:
                    future = self._pool.submit(self._read_one, conn_id, request, db.login)
                    self._running[key] = future
                    future.add_done_callback(functools.partial(self._store, key))
                    self.reads += 1
                pending[db] = future
        wait(list(pending.values()), timeout=self.bound)
        for db, future in pending.items():
            answers[db] = future.result() if future.done() else NoAnswer(
                f"no answer within {self.bound:g} s (the read goes on; reload to see it)")
        return answers

    def _store(self, key: tuple[Hashable, Request], future: Future[Answer]) -> None:
        with self._lock:
            self._running.pop(key, None)
            self._cache[key] = (time.monotonic() + self.ttl, future.result())

    def _read_one(self, conn_id: str, request: Request, login: str) -> Answer:
        try:
            conn = self._open(conn_id)
        except Exception as exc:  # noqa: BLE001 - shown on the rows, the page stays up
            return describe(exc, login)
        try:
            positions = read_positions(conn, request.sources, request.targets)
            if request.runs and request.targets and positions.target_problem is None:
                try:
                    positions = dataclasses.replace(positions, runs=run_totals(conn, list(request.runs)))
                finally:
                    conn.rollback()
            return positions
        except Exception as exc:  # noqa: BLE001
            return describe(exc, login)
        finally:
            conn.close()


def describe(exc: BaseException, login: str = "") -> str:
    """One line for a row: the error's class and first line. The page shows host, port and
    database only: passwords never reach these messages (core.connect builds them from
    parsed parameters, and redact() runs again here); the login, which libpq and the hook
    do name, is replaced by ``<login>``."""
    first = " ".join(str(exc).split())
    text = redact(f"{type(exc).__name__}: {first}" if first else type(exc).__name__)
    if login:
        text = re.sub(rf"(?<![\w.-]){re.escape(login)}(?![\w.-])", "<login>", text)
    return text


def plan(specs: Sequence[MoverSpec], databases: Mapping[str, Database],
         runs: Mapping[tuple[str, str, int], Sequence[str]] | None = None) -> dict[Database, tuple[str, Request]]:
    """One request per database for the movers (whose connection ids ``databases`` resolves);
    ``runs``: (dag_id, task_id, map_index) -> run ids whose totals the target's journal should give."""
    wanted: dict[Database, set[RunKey]] = {}
    sources: dict[Database, set[tuple[str, str]]] = {}
    targets: dict[Database, set[tuple[str, str, str]]] = {}
    conn_ids: dict[Database, str] = {}
    for spec in specs:
        src, dst = databases[spec.source_conn_id], databases[spec.target_conn_id]
        sources.setdefault(src, set()).add((spec.source_queue, spec.consumer_name))
        targets.setdefault(dst, set()).add((spec.target_queue, spec.consumer_name, spec.subconsumer))
        conn_ids.setdefault(src, spec.source_conn_id)
        conn_ids.setdefault(dst, spec.target_conn_id)
        for run_id in (runs or {}).get((spec.dag_id, spec.task_id, spec.map_index), ()):
            wanted.setdefault(dst, set()).add((spec.consumer_name, spec.subconsumer, spec.dag_id, spec.task_id,
                                               spec.map_index, run_id))
    return {db: (conn_ids[db], Request(tuple(sorted(sources.get(db, ()))), tuple(sorted(targets.get(db, ()))),
                                       tuple(sorted(wanted.get(db, ())))))
            for db in conn_ids}
