"""Opening psycopg2 connections with errors that never show the password.

Messages are built from the parsed connection parameters, never by looking for the
password in libpq's text: such a search blanks whatever else equals the password
("***entication" for ``password=auth``, the user name when both are the same) and
misses the pieces of a password that libpq split off a string that did not parse.
libpq quotes every value it names, so a quoted fragment is shown only when it is
known not to be secret (a parsed field other than the password, an IP address, a
socket path). Of a connection string that does not parse (and may hold a password)
nothing is quoted: there are no parsed fields to tell a password from the rest.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import pwd
import re
import time
from collections.abc import Callable, Mapping

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import ISOLATION_LEVEL_READ_COMMITTED, parse_dsn
from psycopg2.extensions import connection as Connection

from airflow_provider_pgq.core.errors import ConnectionFailed
from airflow_provider_pgq.core.guard import STATEMENT_GRACE, GuardedConnection, Timeouts

#: Connection parameters whose values are never shown.
SECRET_PARAMETERS = frozenset(("password", "sslpassword"))

#: What stands in a message for a fragment that is not shown.
HIDDEN = '"<hidden>"'

_URI_PREFIXES = ("postgresql://", "postgres://")
_URI_HINT = "in a URI, percent-encode special characters of the user name and password: % as %25, @ as %40, / as %2F"
_KEYWORD_HINT = (
    "in key=value form, quote a value that holds spaces: password='two words' (with \\' for a quote"
    " and \\\\ for a backslash inside)"
)

#: libpq's own words before the fragment it quotes in a complaint about a connection string.
_LIBPQ_PREFIXES = (
    'missing "=" after ',
    'extra key/value separator "=" in URI query parameter: ',
    'missing key/value separator "=" in URI query parameter: ',
    'end of string reached when looking for matching "]" in IPv6 host address in URI: ',
)

#: Where libpq takes a parameter from when the connection string does not set it.
_ENVIRONMENT = {"host": "PGHOST", "hostaddr": "PGHOSTADDR", "port": "PGPORT", "dbname": "PGDATABASE",
                "user": "PGUSER"}

_QUOTED = re.compile(r'"([^"]*)"')
_SOCKET = re.compile(r"(/.*)/\.s\.PGSQL\.\d+")

# For redact(): a password= value (with any unquoted words after it that are not key=value
# themselves), and the user info of a URI up to its last "@".
_PASSWORD_IN_DSN = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+(?:\s+(?![\w.-]+\s*=)[^\s'=]+)*)",
                              re.IGNORECASE)
_PASSWORD_IN_URI = re.compile(r"(postgres(?:ql)?://[^:/@\s]*:)\S*(@)", re.IGNORECASE)


def redact(text: str) -> str:
    """text with the password of any connection string in it replaced by ***.

    A last line of defence for log lines: the messages of this module never hold a
    connection string. Only what follows ``password=`` or sits in a URI's user info is
    replaced, never other text that happens to equal a password.
    """
    text = _PASSWORD_IN_DSN.sub(r"\1***", text)
    return _PASSWORD_IN_URI.sub(r"\1***\2", text)


def _is_uri(dsn: str) -> bool:
    return dsn.startswith(_URI_PREFIXES)


def _check_uri(dsn: str) -> None:
    """Refuses a URI with an "@" after its user info. libpq ends the user info at the
    first "@" (or "/"), so the rest of a password with an unescaped "@" or "/" would
    become the host, port or database name, and be named in libpq's errors."""
    rest = dsn.split("://", 1)[1]
    ends = [i for i in (rest.find("@"), rest.find("/")) if i >= 0]
    if ends and rest[min(ends)] == "@":
        rest = rest[min(ends) + 1:]
    if "@" in rest.split("?", 1)[0]:
        raise ConnectionFailed(f'bad connection string: the URI has an "@" after its user name and password;'
                               f" {_URI_HINT}")


def _may_hold_password(dsn: str) -> bool:
    """Whether a string that did not parse may hold a password: only then are the
    fragments libpq quotes from it hidden, so a typo elsewhere stays readable."""
    return "password" in dsn.lower() or "@" in dsn or "%" in dsn


def _hide_fragment(message: str) -> str:
    """libpq's complaint about a connection string without the fragment of it that it
    quotes: from the first quote after libpq's own words to the last quote, since a
    fragment of a password may hold quotes itself."""
    start = next((len(p) for p in _LIBPQ_PREFIXES if message.startswith(p)), 0)
    first, last = message.find('"', start), message.rfind('"')
    if first < 0:
        return message
    return message[:first] + HIDDEN + message[last + 1:]


def _bad_dsn(dsn: str, exc: psycopg2.Error) -> ConnectionFailed:
    """The error for a string that libpq cannot parse, with a hint what to fix."""
    message = " ".join(str(exc).split()).removeprefix("invalid dsn: ")
    if _may_hold_password(dsn):
        message = _hide_fragment(message)
    return ConnectionFailed(f"bad connection string: {message}; {_URI_HINT if _is_uri(dsn) else _KEYWORD_HINT}")


def connection_parameters(dsn: str = "", **extra: str) -> dict[str, str]:
    """The parameters of a connection string, with the keyword arguments over them (as
    psycopg2.connect merges them); ConnectionFailed, quoting no part of the string,
    when it does not parse."""
    if _is_uri(dsn):
        _check_uri(dsn)
    try:
        parts: dict[str, str] = parse_dsn(dsn)
    except psycopg2.ProgrammingError as exc:
        raise _bad_dsn(dsn, exc) from None
    parts.update(extra)
    return parts


def _os_user() -> str | None:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return None


def _visible(parts: Mapping[str, str]) -> dict[str, str]:
    """The parameters that may be shown, with libpq's defaults (environment, OS user)
    for those not set; a value that looks like a connection string itself is left out."""
    shown = {key: os.environ[var] for key, var in _ENVIRONMENT.items() if os.environ.get(var)}
    user = _os_user()
    if user is not None:
        shown.setdefault("user", user)
    shown.update((k, v) for k, v in parts.items() if k not in SECRET_PARAMETERS)
    return {k: v for k, v in shown.items() if "=" not in v and "://" not in v}


def _server(parts: Mapping[str, str]) -> str:
    shown = _visible(parts)
    host = shown.get("host", shown.get("hostaddr", "local socket"))
    return f"{host}:{shown.get('port', '5432')}/{shown.get('dbname', shown.get('user', '?'))}"


def describe(dsn: str = "", **extra: str) -> str:
    """host:port/dbname of a connection string and keyword arguments, for messages;
    never any part of the password."""
    try:
        return _server(connection_parameters(dsn, **extra))
    except ConnectionFailed:
        return "<unparsable connection string>"


def _failure(parts: Mapping[str, str], exc: psycopg2.Error) -> ConnectionFailed:
    """The error for a failed connect: the server from the parsed fields, then libpq's
    message with only the quoted fragments that are known not to be secret."""
    shown = _visible(parts)
    values = {piece for value in shown.values() for piece in value.split(",")}
    hosts = {h for h in shown.get("host", "").split(",") if h}

    def safe(fragment: str) -> bool:
        if fragment in values or fragment in parts:  # a non-secret field, or an option's name
            return True
        socket = _SOCKET.fullmatch(fragment)
        if socket is not None:
            return not hosts or socket.group(1) in hosts
        try:
            ipaddress.ip_address(fragment)
        except ValueError:
            return False
        return True

    message = _hide_quoted(str(exc).strip(), safe)
    user = f" as {shown['user']}" if "user" in shown else ""
    return ConnectionFailed(f"cannot connect to {_server(parts)}{user}: {message}")


def _hide_quoted(message: str, safe: Callable[[str], bool]) -> str:
    """message with each quoted fragment that is not safe replaced by HIDDEN; once the
    quotes do not pair up, everything from there to the last quote goes."""
    out: list[str] = []
    pos = 0
    for match in _QUOTED.finditer(message):
        out.append(message[pos:match.start()])
        out.append(match.group(0) if safe(match.group(1)) else HIDDEN)
        pos = match.end()
    rest = message[pos:]
    if '"' in rest:
        rest = rest[:rest.find('"')] + HIDDEN + rest[rest.rfind('"') + 1:]
    return "".join(out) + rest


#: Environment variables through which libpq takes a bound parameter: set, they win too.
_BOUND_ENVIRONMENT = {"connect_timeout": "PGCONNECT_TIMEOUT"}


def connect(
    dsn: str,
    application_name: str = "pgq-queue-mover",
    timeouts: Timeouts | None = None,
    side: str = "database",
    **extra: str,
) -> GuardedConnection:
    """A psycopg2 connection with autocommit off, every wait bounded (guard.Timeouts:
    what the connection string, the keyword arguments or the environment set wins);
    ConnectionFailed with a clean message. side names it in timeout messages."""
    return _connect(dsn, application_name, timeouts, side, True, extra)


def connect_unsettled(
    dsn: str,
    application_name: str = "pgq-queue-mover",
    timeouts: Timeouts | None = None,
    side: str = "database",
    **extra: str,
) -> GuardedConnection:
    """connect() without its statement: which bounds the user chose is not read in a
    round trip of its own now; each transaction decides that in SQL until the caller
    settles the connection with what its first read returned (settle_columns and
    settle_with: the mover's checks do), or ensure_settled does. Until then a
    statement is bounded like the login (connect_timeout)."""
    return _connect(dsn, application_name, timeouts, side, False, extra)


def _connect(dsn: str, application_name: str, timeouts: Timeouts | None, side: str, settle: bool,
             extra: dict[str, str]) -> GuardedConnection:
    timeouts = timeouts or Timeouts()
    parts = connection_parameters(dsn, **extra)
    bounds = {
        key: value for key, value in timeouts.libpq_parameters().items()
        if key not in parts and not os.environ.get(_BOUND_ENVIRONMENT.get(key, "-"))
    }
    started = time.monotonic()
    try:
        conn = psycopg2.connect(
            dsn, GuardedConnection, None, application_name=application_name, **{**bounds, **extra}
        )
    except psycopg2.Error as exc:
        limit = float({**bounds, **parts}.get("connect_timeout") or os.environ.get("PGCONNECT_TIMEOUT") or 0)
        failure = _failure(parts, exc)
        if limit and time.monotonic() - started >= limit - 0.5:
            failure = ConnectionFailed(
                f"{failure}: no answer within connect_timeout={limit:g}s: the server, or a pooler in front of"
                " it, did not let the login through in time (a PAUSEd PgBouncer pool holds new logins until"
                " RESUME); raise connect_timeout if that is legitimately slow")
        raise failure from None
    assert isinstance(conn, GuardedConnection)
    conn.side = side
    # The setup statements below: bounded like the connect itself.
    conn.bound_name = "connect_timeout"
    conn.statement_bound = timeouts.connect_timeout + min(STATEMENT_GRACE, timeouts.network_timeout)
    conn.stream_bound = timeouts.network_timeout
    # The protocol's "lock, then read" steps need a fresh snapshot per statement
    # (said in each transaction's BEGIN, guard.GuardedConnection: nothing is set on the session).
    conn.set_session(isolation_level=ISOLATION_LEVEL_READ_COMMITTED, autocommit=False)
    conn.set_transaction_settings({"search_path": SAFE_SEARCH_PATH})
    if settle:
        settle_bounds(conn, timeouts)
    else:
        conn.unsettled = timeouts
        conn.set_transaction_defaults(timeouts.server_settings(), list(_CHOSEN))
    return conn


#: Where a setting comes from when the user chose it for this login, database or
#: connection (ALTER ROLE/DATABASE SET, options in the connection string): there the
#: user's value stays. Anything else (the server's configuration, or a SET another
#: client of a pooled server session left behind) gives way to the mover's bounds.
_CHOSEN = ("client", "database", "user", "database user")


def settle_bounds(conn: GuardedConnection, timeouts: Timeouts) -> None:
    """Adds the bounds of timeouts to the connection's transaction settings, each where
    the user did not choose a value; then the client's statement bound from the
    statement_timeout in force (0: none). One statement, in autocommit: no transaction
    is left open and nothing is set on the session."""
    wanted = timeouts.server_settings()
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(
                "select s.name, s.source = any(%s::text[]),"
                " pg_catalog.current_setting('statement_timeout')::pg_catalog.interval"
                " from pg_catalog.pg_settings s where s.name = any(%s::text[])",
                (list(_CHOSEN), list(wanted)),
            )
            rows = cur.fetchall()
        conn.autocommit = False
    except BaseException:
        conn.close()
        raise
    chosen = {str(name) for name, is_chosen, _ in rows if is_chosen}
    _settle(conn, timeouts, chosen, rows[0][2] if rows else None)


def _settle(conn: GuardedConnection, timeouts: Timeouts, chosen: set[str], effective: dt.timedelta | None) -> None:
    """The transaction settings: the bounds the user did not choose (chosen: their
    names); the client's statement bound from effective (the statement_timeout in force
    where the user chose it)."""
    wanted = timeouts.server_settings()
    settings = {"search_path": SAFE_SEARCH_PATH, **conn.transaction_settings}
    settings.update((name, value) for name, value in wanted.items() if name not in chosen)
    conn.set_transaction_settings(settings)  # the SQL-decided defaults of an unsettled connection go
    conn.unsettled = None
    conn.own_statement_timeout = "statement_timeout" not in chosen
    conn.bound_name = "statement_timeout"
    if conn.own_statement_timeout:
        seconds = timeouts.statement_timeout
    else:
        seconds = effective.total_seconds() if effective is not None else 0.0
    conn.statement_bound = seconds + min(STATEMENT_GRACE, timeouts.network_timeout) if seconds > 0 else None


def settle_columns(conn: Connection) -> sql.Composable | None:
    """Two columns a read may add (", chosen, statement_timeout") so that settling a
    connection of connect_unsettled() costs no round trip of its own: the names of
    the bounds the user chose, and the statement_timeout in force. Read in a
    transaction of the unsettled connection, where the bounds the user did not choose
    were set by the transaction itself (their source is then "session", not one of
    the chosen). None when conn needs no settling."""
    if not isinstance(conn, GuardedConnection) or conn.unsettled is None:
        return None
    return sql.SQL(
        ", (select pg_catalog.array_agg(s.name::text) from pg_catalog.pg_settings s"
        " where s.name = any({}::text[]) and s.source = any({}::text[])),"
        " pg_catalog.current_setting('statement_timeout')::pg_catalog.interval"
    ).format(sql.Literal(list(conn.unsettled.server_settings())), sql.Literal(list(_CHOSEN)))


def settle_with(conn: Connection, chosen: list[str] | None, effective: dt.timedelta | None) -> None:
    """Settles conn with what settle_columns read."""
    if isinstance(conn, GuardedConnection) and conn.unsettled is not None:
        _settle(conn, conn.unsettled, set(chosen or ()), effective)


def ensure_settled(conn: Connection) -> None:
    """Settles a connection of connect_unsettled() by a statement of its own, where
    no read carried settle_columns (the checks' step-by-step path)."""
    if isinstance(conn, GuardedConnection) and conn.unsettled is not None:
        settle_bounds(conn, conn.unsettled)


#: The only schemas an unqualified name may resolve to in our sessions: nobody but a
#: superuser can create in pg_catalog, and pg_temp is this session's own (PostgreSQL
#: never looks functions or operators up there). A role or database default that puts
#: a writable schema such as public first is overridden, in every transaction.
SAFE_SEARCH_PATH = "pg_catalog, pg_temp"
