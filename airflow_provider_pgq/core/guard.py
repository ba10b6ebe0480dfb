"""A bound on every network wait of a psycopg2 connection, enforced from the client.

libpq waits for the server without any limit of its own: a server that stops
answering, or a network that stops forwarding without closing (a stateful firewall
dropping the flow, a frozen proxy, a half-open TCP connection), blocks a statement
for as long as the kernel keeps the socket, hours with default keepalives. Server-side
timeouts (statement_timeout, lock_timeout) do not help when their error cannot reach
the client. So:

- ``Timeouts`` holds the bounds; ``connect.connect`` turns them into libpq parameters
  (connect_timeout, TCP keepalives, tcp_user_timeout) and server settings
  (statement_timeout, lock_timeout, idle_in_transaction_session_timeout and the
  server's own keepalives), each only where the connection string, the Airflow
  connection's extras or a role/database setting did not choose a value already.
  The server settings, with the pinned search_path, are transaction-local: they ride
  on the first statement of every transaction (``GuardedConnection.opening``), so a
  pooler that hands the server session to another client between our transactions
  (PgBouncer's transaction pooling) neither drops them nor passes them on.
- ``GuardedConnection`` (the connection class ``connect`` makes) times every
  statement, fetch, commit and rollback on a watchdog thread. Past its bound the
  watchdog shuts the socket down, which ends libpq's wait at once; the statement
  then fails with ``WaitTimeout`` naming the side, the server and what timed out.
  The server sees the close (within a second even mid-query, through the session's
  ``client_connection_check_interval``) and rolls the transaction back: nothing is
  ever half-committed. (Not ``conn.cancel()``: psycopg2 holds the GIL through its
  blocking connect, so a cancel towards a dead network would freeze every thread.)
- ``abort`` shuts the sockets of running statements on purpose
  (SIGTERM, Airflow's on_kill); ``interrupt_waits_on`` does that from a signal that
  arrives while the main thread is blocked inside libpq, where no Python signal
  handler can run until the wait ends.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from airflow_provider_pgq.core.driver_stderr import DRIVER_STDERR
from airflow_provider_pgq.core.errors import ConnectionLost, InvalidParameter, WaitAborted, WaitTimeout

T = TypeVar("T")

#: Added to the server's statement_timeout for the client's own bound (or network_timeout,
#: when smaller): on a working network the server's error arrives first, and says more.
STATEMENT_GRACE = 5.0
#: How often the watchdog looks at the clock.
_TICK = 0.1


def _check_seconds(name: str, value: object, allow_zero: bool) -> None:
    good = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not good or value < 0 or (value == 0 and not allow_zero) or value > 86400 * 7:  # type: ignore[operator]
        allowed = ">= 0 (0: off)" if allow_zero else "> 0"
        raise InvalidParameter(f"{name} must be a number of seconds {allowed} and at most a week, got {value!r}")


@dataclass(frozen=True)
class Timeouts:
    """Bounds of the mover's network waits, in seconds.

    connect_timeout: reaching the server and logging in (libpq connect_timeout).
    network_timeout: how long a connection may be silent: TCP keepalives and
        tcp_user_timeout find a dead peer within it, and a COPY that moves no byte
        for this long is cancelled.
    statement_timeout: one control statement (every statement but the COPY stream);
        0: no bound (then a frozen network during a statement is found only by TCP).
    lock_timeout: waiting for a lock (another mover on the same tracking key, a
        table lock of the target queue); 0: no bound.
    """

    connect_timeout: float = 10.0
    network_timeout: float = 60.0
    statement_timeout: float = 120.0
    lock_timeout: float = 30.0

    def __post_init__(self) -> None:
        _check_seconds("connect_timeout", self.connect_timeout, allow_zero=False)
        _check_seconds("network_timeout", self.network_timeout, allow_zero=False)
        _check_seconds("statement_timeout", self.statement_timeout, allow_zero=True)
        _check_seconds("lock_timeout", self.lock_timeout, allow_zero=True)

    def libpq_parameters(self) -> dict[str, str]:
        """Connection parameters: a silent peer is given up after about network_timeout
        (keepalive idle + interval x count), unacknowledged data (or a zero window) by
        the kernel after three times that, behind the client's own watchdog."""
        nt = self.network_timeout
        return {
            "connect_timeout": str(max(2, math.ceil(self.connect_timeout))),  # libpq: whole seconds, >= 2
            "keepalives": "1",
            "keepalives_idle": str(max(1, int(nt // 2))),
            "keepalives_interval": str(max(1, int(nt // 6))),
            "keepalives_count": "3",
            # the kernel's own backstop, after the client's watchdog (which names the side):
            # a frozen COPY is given up after up to 2 x network_timeout (once more while the
            # send queue still drained), so the backstop waits three times as long. At twice,
            # the storm saw the kernel win the race now and then ("could not receive data
            # from server: Connection timed out", which names no side)
            "tcp_user_timeout": str(max(1, int(3 * nt * 1000))),
        }

    def server_settings(self) -> dict[str, str]:
        """Server settings of every transaction (in ms / s as PostgreSQL takes them;
        the TCP ones act on the server's socket, which behind a pooler is the pooler's
        link, not ours: there the client's libpq parameters are the bound). The source's read
        transaction is never idle longer than a statement on the target: a mover that
        vanishes without closing cannot hold back PgQ's rotation for longer."""
        nt = self.network_timeout
        settings = {
            "statement_timeout": str(int(self.statement_timeout * 1000)),
            "lock_timeout": str(int(self.lock_timeout * 1000)),
            "tcp_keepalives_idle": str(max(1, int(nt // 2))),
            "tcp_keepalives_interval": str(max(1, int(nt // 6))),
            "tcp_keepalives_count": "3",
            "tcp_user_timeout": str(max(1, int(2 * nt * 1000))),
            # a query whose client went away is ended within a second, not at its end
            "client_connection_check_interval": "1000",
        }
        if self.statement_timeout:
            settings["idle_in_transaction_session_timeout"] = str(
                int((self.statement_timeout + STATEMENT_GRACE + nt) * 1000)
            )
        return settings


# -- the watchdog -------------------------------------------------------------------


class Watch:
    """One timed wait. The watchdog calls expire() once the deadline has passed."""

    def __init__(self, bound: float) -> None:
        self.bound = bound
        self.deadline = time.monotonic() + bound
        self.fired = False

    def expire(self) -> float | None:
        """Acts on the expiry; returns a new deadline to be called again, or None."""
        return None


class _Watchdog:
    """One daemon thread for all watches of the process (restarted after a fork)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watches: set[Watch] = set()
        self._pid = 0
        self._thread: threading.Thread | None = None

    def add(self, watch: Watch) -> None:
        with self._lock:
            self._watches.add(watch)
            if self._pid != os.getpid() or self._thread is None or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="pgq-watchdog", daemon=True)
                self._thread.start()

    def discard(self, watch: Watch) -> None:
        with self._lock:
            self._watches.discard(watch)

    def _run(self) -> None:
        while True:
            time.sleep(_TICK)
            now = time.monotonic()
            with self._lock:
                due = [w for w in self._watches if w.deadline <= now]
            for watch in due:
                watch.fired = True
                try:
                    again = watch.expire()
                except Exception:  # never let the watchdog die
                    again = None
                with self._lock:
                    if again is None:
                        self._watches.discard(watch)
                    else:
                        watch.deadline = again


WATCHDOG = _Watchdog()


def shut_socket(conn: psycopg2.extensions.connection) -> None:
    """Ends whatever libpq waits for on conn's socket at once (both directions): the
    wait fails as a lost connection, and the server rolls the transaction back when it
    sees the close. The file descriptor stays libpq's to close."""
    try:
        if conn.closed:
            return
        fd = conn.fileno()
        sock = socket.socket(fileno=os.dup(fd))
    except (psycopg2.Error, OSError, ValueError):
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


def unsent_bytes(conn: psycopg2.extensions.connection) -> int | None:
    """Bytes the kernel still holds in conn's send queue (Linux SIOCOUTQ), None where
    unknown: a queue that shrinks is a peer that still takes data, however slowly."""
    try:
        import fcntl
        import struct
        import termios

        if conn.closed:
            return None
        buf = fcntl.ioctl(conn.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        return int(struct.unpack("i", buf)[0])
    except (ImportError, AttributeError, OSError, psycopg2.Error, ValueError):
        return None


def server_of(conn: psycopg2.extensions.connection) -> str:
    """host:port/dbname of a connection this module opened, for messages; "?" otherwise."""
    return conn.server() if isinstance(conn, GuardedConnection) else "?"


class _StatementWatch(Watch):
    """A statement past its bound: its socket is shut."""

    def __init__(self, conn: GuardedConnection, what: str, bound: float) -> None:
        super().__init__(bound)
        self.conn = conn
        self.what = what

    def expire(self) -> float | None:
        if self.conn._watch is self:
            shut_socket(self.conn)
        return None


# -- the connection ---------------------------------------------------------------------

#: set_session()'s values as words of BEGIN ("" for the server's default).
_ISOLATION = {
    psycopg2.extensions.ISOLATION_LEVEL_READ_UNCOMMITTED: "isolation level read uncommitted",
    psycopg2.extensions.ISOLATION_LEVEL_READ_COMMITTED: "isolation level read committed",
    psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ: "isolation level repeatable read",
    psycopg2.extensions.ISOLATION_LEVEL_SERIALIZABLE: "isolation level serializable",
    psycopg2.extensions.ISOLATION_LEVEL_DEFAULT: "",
    "READ UNCOMMITTED": "isolation level read uncommitted", "READ COMMITTED": "isolation level read committed",
    "REPEATABLE READ": "isolation level repeatable read", "SERIALIZABLE": "isolation level serializable",
    "DEFAULT": "",
}
_READ_ONLY = {True: "read only", False: "read write", "DEFAULT": ""}
_DEFERRABLE = {True: "deferrable", False: "not deferrable", "DEFAULT": ""}

#: libpq's PQstatus of a usable connection (CONNECTION_OK).
_CONNECTION_OK = 0
#: Server shutdowns (admin_shutdown: a terminated backend; crash_shutdown; cannot_connect_now).
_SHUTDOWN_CODES = frozenset(("57P01", "57P02", "57P03"))

#: What to do when a bound fired, by the setting it came from.
_SLOW_HINTS = {
    "statement_timeout": "A slow server or a broken network: raise statement_timeout if the statement is"
                         " legitimately slow",
    "connect_timeout": "A new connection's first statement got no answer: a server that does not answer"
                       " yet, or a pooler that holds it (a PAUSEd PgBouncer pool waits for RESUME); raise"
                       " connect_timeout if that is legitimately slow",
}


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__





def _statement_text(query: Any, cursor: psycopg2.extensions.cursor) -> str:
    try:
        text = query if isinstance(query, str) else query.as_string(cursor)
    except Exception:
        text = "?"
    text = " ".join(str(text).split())
    return text if len(text) <= 80 else text[:77] + "..."


class GuardedConnection(psycopg2.extensions.connection):
    """A psycopg2 connection whose every wait is timed (see the module docstring).

    side: "source" / "target" / "database", for messages; statement_bound: the client's
    bound of one statement (None: none); stream_bound: the longest a COPY may move no
    byte; own_statement_timeout: the session's statement_timeout is ours (so a COPY
    may lift it for itself), not one the user chose. Transactions are its own (see
    __init__): autocommit, set_session(), commit(), rollback() and `with conn:` behave
    as psycopg2's, with BEGIN sent along with a transaction's first statement.
    """

    def __init__(self, dsn: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(dsn, *args, **kwargs)
        # psycopg2 sends every statement as it is (its own autocommit): the BEGIN of a
        # transaction is ours and rides on the transaction's first statement (opening()),
        # instead of psycopg2's BEGIN of its own round trip. What callers see as
        # autocommit, set_session() and commit()/rollback() is kept here.
        psycopg2.extensions.connection.autocommit.__set__(self, True)  # type: ignore[attr-defined]
        self._autocommit = False
        self._characteristics: dict[str, str] = {}
        self._begin_sql = "begin; "
        #: added to the next statement whatever it is (then()); cleared at commit/rollback
        self._then = ""
        self.cursor_factory = GuardedCursor
        self.side = "database"
        self.statement_bound: float | None = None
        #: the setting statement_bound comes from, for the hint when it fires
        self.bound_name = "statement_timeout"
        self.stream_bound: float | None = None
        self.own_statement_timeout = False
        #: set_config(name, value, true) of each, before the first statement of every
        #: transaction (connect.py fills it in)
        self.transaction_settings: dict[str, str] = {}
        self._opening_sql = ""
        #: the bounds still to settle (connect_unsettled()): until then each transaction
        #: decides in SQL which of them the user chose (set_transaction_defaults)
        self.unsettled: Timeouts | None = None
        self.streaming = False
        self.aborted: str | None = None
        #: what the driver printed of the server's last error instead of raising it (see
        #: driver_stderr), for the next ConnectionLost's message
        self.last_words: str | None = None
        self._watch: _StatementWatch | None = None

    def server(self) -> str:
        """host:port/dbname, never the password."""
        try:
            info = self.info
            host = info.host or "local socket"
            return f"{host}:{info.port}/{info.dbname}"
        except Exception:
            return "?"

    # -- transactions: ours, not psycopg2's --------------------------------------------

    @property
    def autocommit(self) -> bool:
        return self._autocommit

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        self._require_idle("autocommit")
        self._autocommit = bool(value)

    def set_session(self, isolation_level: Any = None, readonly: Any = None, deferrable: Any = None,
                    autocommit: Any = None) -> None:
        """As psycopg2's, but the characteristics go into each transaction's BEGIN: a
        pooled server session is never left with a default of ours."""
        self._require_idle("set_session")
        for key, value, names in (("isolation", isolation_level, _ISOLATION),
                                  ("readonly", readonly, _READ_ONLY), ("deferrable", deferrable, _DEFERRABLE)):
            if value is None:
                continue
            word = names.get(value.upper() if isinstance(value, str) else value)
            if word is None:
                raise psycopg2.ProgrammingError(f"bad value for {key}: {value!r}")
            if word:
                self._characteristics[key] = word
            else:
                self._characteristics.pop(key, None)
        if autocommit is not None:
            self._autocommit = bool(autocommit)
        self._begin_sql = " ".join(["begin", *self._characteristics.values()]) + "; "

    def set_isolation_level(self, level: int | None) -> None:
        if level == psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT:
            self.set_session(autocommit=True)
        else:
            self.set_session(isolation_level=level, autocommit=False)

    def _require_idle(self, what: str) -> None:
        if not self.closed and self.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
            raise psycopg2.ProgrammingError(f"{what} cannot be used inside a transaction")

    def then(self, statement: str) -> None:
        """statement (complete, with its ";") goes ahead of the next statement sent, in
        the same round trip: a setting for the statement it guards, or put back after it."""
        self._then += statement

    def _plain(self, statement: str) -> None:
        with psycopg2.extensions.connection.cursor(self, cursor_factory=psycopg2.extensions.cursor) as cur:
            cur.execute(statement)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """`with conn:` commits or rolls back our transaction (psycopg2's own would see none)."""
        if exc_type is None:
            self.commit()
        else:
            self.rollback()

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        """A named cursor is declared WITH HOLD: psycopg2 refuses one without outside its
        own transactions (the server has ours); it is closed before the commit anyway."""
        name = args[0] if args else kwargs.get("name")
        if name is not None and len(args) < 3:  # (name, cursor_factory, withhold, scrollable)
            kwargs.setdefault("withhold", True)
        return super().cursor(*args, **kwargs)

    def set_transaction_settings(self, settings: dict[str, str]) -> None:
        """What every transaction of this connection starts with (set_config(..., true))."""
        self.transaction_settings = dict(settings)
        calls = [sql.SQL("pg_catalog.set_config({}, {}, true)").format(sql.Literal(k), sql.Literal(v))
                 for k, v in self.transaction_settings.items()]
        self._opening_sql = sql.SQL("select {}; ").format(sql.SQL(", ").join(calls)).as_string(self) if calls else ""

    def set_transaction_defaults(self, defaults: dict[str, str], chosen_sources: list[str]) -> None:
        """Until the connection is settled: after the transaction settings (the pinned
        search_path first, so that this statement resolves its names under it), each of
        defaults set transaction-locally where pg_settings does not show that the user
        chose a value (its source is one of chosen_sources). The same outcome as settling
        first, decided by the server in the transaction's first round trip instead of a
        round trip of its own at connect; a little more work for the server, so only the
        first transactions of a connection (connect.settle_with) do it."""
        rows = sql.SQL(", ").join(
            sql.SQL("({}, {})").format(sql.Literal(k), sql.Literal(v)) for k, v in defaults.items())
        self._opening_sql += sql.SQL(
            "select pg_catalog.count(pg_catalog.set_config(w.name, w.value, true))"
            " from (values {}) w (name, value) where not exists (select from pg_catalog.pg_settings s"
            " where s.name operator(pg_catalog.=) w.name and s.source operator(pg_catalog.=) any({})); "
        ).format(rows, sql.Literal(list(chosen_sources))).as_string(self)

    def starts_transaction(self) -> bool:
        """Whether the next statement opens a transaction (in autocommit: every one)."""
        return self.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE

    def opening(self, query: Any, vars: Any, cursor: psycopg2.extensions.cursor) -> Any:  # noqa: A002
        """query, led by BEGIN and the transaction settings when it opens a transaction
        (in autocommit: the settings, for the implicit transaction of the string), and by
        what then() queued: one string, one round trip. PostgreSQL analyses each
        statement of a string only after the one before it ran, so the query already
        resolves its names under the pinned search_path and runs under the bounds."""
        prefix = self._then
        self._then = ""
        if self.starts_transaction():
            prefix = ("" if self._autocommit else self._begin_sql) + self._opening_sql + prefix
        if not prefix:
            return query
        text = query.as_string(cursor) if isinstance(query, sql.Composable) else query
        if isinstance(text, bytes):
            text = text.decode(self.encoding_name())
        return (prefix.replace("%", "%%") if vars is not None else prefix) + text

    def open_transaction(self) -> None:
        """BEGIN, the transaction settings and what then() queued as a statement of their
        own, for what cannot carry them (a named cursor's DECLARE)."""
        if self.starts_transaction() or self._then:
            with self.cursor() as cur:
                cur.execute("select")

    def encoding_name(self) -> str:
        return psycopg2.extensions.encodings.get(self.encoding, "utf-8")

    def run(self, what: str, action: Callable[[], T], timed: bool = True, translate: bool = True) -> T:
        """action() under the statement bound (timed=False: none, the caller bounds it):
        WaitTimeout past it, WaitAborted when abort() cut it short (translate=False:
        the driver's error as it is)."""
        bound = self.statement_bound if timed else None
        started = time.monotonic()
        if bound is None or self._watch is not None:
            try:
                return action()
            except psycopg2.Error as exc:
                if translate:
                    self._raise_aborted(what, exc)
                    self._raise_network_timeout(what, exc, started)
                    self._raise_connection_lost(what, exc)
                raise
        watch = _StatementWatch(self, what, bound)
        self._watch = watch
        WATCHDOG.add(watch)
        try:
            return action()
        except psycopg2.Error as exc:
            if watch.fired and translate:
                raise WaitTimeout(
                    f"{self.side} {self.server()}: no answer to {what} within {bound:g}s"
                    f" ({self.bound_name} plus a grace): the connection was closed, the server"
                    " rolls its transaction back; nothing of it was committed. "
                    + _SLOW_HINTS.get(self.bound_name, _SLOW_HINTS["statement_timeout"]),
                    self.side, self.server(), what,
                ) from exc
            if translate:
                self._raise_aborted(what, exc)
                self._raise_network_timeout(what, exc, started)
                self._raise_connection_lost(what, exc)
            raise
        finally:
            self._watch = None
            WATCHDOG.discard(watch)

    def _raise_network_timeout(self, what: str, exc: psycopg2.Error, started: float) -> None:
        """The connection died under a wait of network_timeout or more (the kernel gave up
        on a silent peer through the keepalives or tcp_user_timeout that connect sets from
        network_timeout, or a middlebox dropped it): the same WaitTimeout as our own watch
        gives, naming the side and the server, instead of libpq's "could not receive data
        from server". Told apart by time, not by libpq's words: a client-side error (no
        SQLSTATE) after waiting at least network_timeout."""
        waited = time.monotonic() - started
        if exc.pgcode is not None or self.stream_bound is None or waited < self.stream_bound:
            return
        raise WaitTimeout(
            f"{self.side} {self.server()}: the connection was lost during {what}, after {waited:.0f}s (a"
            f" silent peer given up by TCP keepalives / tcp_user_timeout, set from network_timeout="
            f"{self.stream_bound:g}s, or a connection dropped on the way); the server rolls the transaction"
            " back, nothing of it was committed; the next run goes on from the last committed batch",
            self.side, self.server(), what,
        ) from exc

    def _gone(self, exc: psycopg2.Error) -> bool:
        """Whether exc is the end of the connection, not an error of the statement."""
        code = exc.pgcode or ""
        if code.startswith("08") or code in _SHUTDOWN_CODES:
            return True
        if code or isinstance(exc, ConnectionLost):
            return False
        try:
            return bool(self.closed) or self.info.status != _CONNECTION_OK
        except psycopg2.Error:
            return True

    def _raise_connection_lost(self, what: str, exc: psycopg2.Error) -> None:
        """The connection ended under `what`: one line naming the side, the server as
        configured and what the server (or pooler) said, instead of libpq's or the
        driver's words alone ("invalid socket", "error with status PGRES_COPY_OUT and no
        message from the libpq")."""
        if not self._gone(exc):
            return
        said = self.last_words or _first_line(exc)
        if exc.pgcode is None and "no message from the libpq" in said:  # psycopg2's own words
            said = "no error message: the socket was closed"
        self.last_words = None
        outcome = (
            "whether the commit took effect is not known: the next run reads the target's mark and"
            " goes on exactly once either way" if what == "commit"
            else "its transaction is rolled back, nothing of it was committed; the next run goes on"
            " from the last committed batch"
        )
        raise ConnectionLost(
            f"{self.side} {self.server()}: the connection was closed during {what} ({said}): the"
            f" server or a pooler in front of it (a PgBouncer KILL, RECONNECT or restart, a terminated"
            f" backend, a server restart) ended it; {outcome}",
            self.side, self.server(), what,
        ) from exc

    def _raise_aborted(self, what: str, exc: BaseException) -> None:
        if self.aborted is not None:
            raise WaitAborted(
                f"{self.side} {self.server()}: {what} cut short ({self.aborted}): the connection is"
                " closed and its transaction rolled back"
            ) from exc

    def commit(self) -> None:
        self._then = ""
        if self.closed or self.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
            self.run("commit", lambda: self._plain("commit"))

    def commit_after(self, query: Any, vars: Any = None) -> None:  # noqa: A002 - psycopg2's name
        """query, then the commit, in one round trip (an error in query leaves the
        transaction to roll back). A lost connection is told as a commit whose outcome
        is not known."""
        with self.cursor() as cur:
            text = query.as_string(cur) if isinstance(query, sql.Composable) else query
            composed = self.opening(text, vars, cur) + "; commit"
            self.run("commit", lambda: psycopg2.extensions.cursor.execute(cur, composed, vars))
        self._then = ""

    def rollback(self) -> None:
        """A rollback that fails (connection lost, or still inside a broken COPY) closes
        the connection: the server then ends the transaction, so nothing is left open."""
        self._then = ""
        if self.closed:
            super().rollback()  # psycopg2's own error for a closed connection
        if self.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE:
            return
        try:
            self.run("rollback", lambda: self._plain("rollback"), translate=False)  # callers ignore its errors
        except BaseException:
            try:
                self.close()
            except psycopg2.Error:
                pass
            raise


class GuardedCursor(psycopg2.extensions.cursor):
    """Every call that waits for the server runs under the connection's bound."""

    connection: GuardedConnection

    def execute(self, query: Any, vars: Any = None) -> None:  # noqa: A002 - psycopg2's name
        what = f"statement {_statement_text(query, self)!r}"
        if self.name is not None:
            self.connection.open_transaction()
        else:
            query = self.connection.opening(query, vars, self)
        self.connection.run(what, lambda: super(GuardedCursor, self).execute(query, vars))

    def executemany(self, query: Any, vars_list: Any) -> None:
        self.connection.open_transaction()
        self.connection.run(
            f"statement {_statement_text(query, self)!r}",
            lambda: super(GuardedCursor, self).executemany(query, vars_list),
        )

    def copy_expert(self, sql: Any, file: Any, size: int = 8192) -> None:
        """A COPY of the transfer is bounded by its progress (transfer.py), others as statements."""
        conn = self.connection
        what = f"COPY {_statement_text(sql, self)!r}"
        sql = conn.opening(sql, None, self)

        def copy() -> None:
            with DRIVER_STDERR:
                try:
                    super(GuardedCursor, self).copy_expert(sql, file, size)
                finally:
                    conn.last_words = DRIVER_STDERR.take() or conn.last_words

        if conn.streaming:
            conn.run("COPY", copy, timed=False)
        else:
            conn.run(what, copy)

    def _fetch(self, action: Callable[[], T]) -> T:
        if self.name is None:  # a client-side cursor holds its rows already
            return action()
        return self.connection.run(f"fetch from cursor {self.name}", action)

    def fetchone(self) -> Any:
        return self._fetch(lambda: super(GuardedCursor, self).fetchone())

    def fetchmany(self, size: int | None = None) -> Any:
        if size is None:
            return self._fetch(lambda: super(GuardedCursor, self).fetchmany())
        return self._fetch(lambda: super(GuardedCursor, self).fetchmany(size))

    def fetchall(self) -> Any:
        return self._fetch(lambda: super(GuardedCursor, self).fetchall())

    def __iter__(self) -> GuardedCursor:
        return self

    def __next__(self) -> Any:
        return self._fetch(lambda: super(GuardedCursor, self).__next__())


@contextmanager
def autocommit(conn: psycopg2.extensions.connection) -> Iterator[None]:
    """Inside, every string sent is a transaction of its own, committed when it ends
    (an implicit transaction: no BEGIN, no COMMIT, one round trip); the connection must
    not be inside a transaction."""
    if conn.autocommit:
        yield
        return
    conn.autocommit = True
    try:
        yield
    finally:
        if isinstance(conn, GuardedConnection):
            conn._autocommit = False  # a flag of ours: also when a broken COPY left it mid-statement
        elif not conn.closed:
            conn.autocommit = False


# -- aborting on purpose ----------------------------------------------------------------------


def abort(conns: Iterable[psycopg2.extensions.connection | None], reason: str) -> None:
    """Cuts the current wait of each connection short: its socket is shut, so libpq
    stops waiting now and the server ends the statement and rolls back. Safe from any
    thread; a connection that is idle is closed the same way."""
    for conn in conns:
        if conn is None or conn.closed:
            continue
        if isinstance(conn, GuardedConnection):
            conn.aborted = reason
        shut_socket(conn)


@contextmanager
def interrupt_waits_on(
    signals: Iterable[signal.Signals],
    conns: Callable[[], Iterable[psycopg2.extensions.connection | None]],
) -> Iterator[None]:
    """While inside: when one of signals arrives, abort the connections conns() gives
    from a helper thread, so that the main thread's blocked libpq wait
    ends and the Python handler of the signal runs within a moment.

    Python runs signal handlers only between bytecodes of the main thread, never while
    it waits inside libpq (which retries its poll after EINTR). The signal's number
    also reaches the wakeup fd, which a thread can read at once. Only the signals that
    have a Python handler are seen. Outside the main thread this does nothing.
    """
    wanted = {int(s) for s in signals}
    try:
        read_fd, write_fd = os.pipe()
    except OSError:
        yield
        return
    os.set_blocking(write_fd, False)
    try:
        previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except ValueError:  # not the main thread
        os.close(read_fd)
        os.close(write_fd)
        yield
        return
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if not data:
                return
            if previous >= 0:  # whoever listened before still hears every signal
                try:
                    os.write(previous, data)
                except OSError:
                    pass
            hit = [b for b in data if b in wanted]
            if hit and not stop.is_set():
                reason = f"got {signal.Signals(hit[0]).name}"
                abort(conns(), reason)

    thread = threading.Thread(target=watch, name="pgq-signal-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        try:
            signal.set_wakeup_fd(previous)
        except ValueError:
            pass
        os.close(write_fd)  # the thread's read() sees the end
        thread.join(timeout=1.0)
        os.close(read_fd)

