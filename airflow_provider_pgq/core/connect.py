"""Opening psycopg2 connections with errors that never show the password."""

from __future__ import annotations

import re

import psycopg2
from psycopg2.extensions import ISOLATION_LEVEL_READ_COMMITTED, parse_dsn
from psycopg2.extensions import connection as Connection

from airflow_provider_pgq.core.errors import ConnectionFailed

_PASSWORD_IN_DSN = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_PASSWORD_IN_URI = re.compile(r"(postgres(?:ql)?://[^:/@\s]*:)([^@\s]*)(@)", re.IGNORECASE)


def redact(text: str, password: str | None = None) -> str:
    """text with any password (from a DSN, a URI, or the one given) replaced by ***."""
    text = _PASSWORD_IN_DSN.sub(r"\1***", text)
    text = _PASSWORD_IN_URI.sub(r"\1***\3", text)
    if password:
        text = text.replace(password, "***")
    return text


def describe(dsn: str) -> str:
    """host:port/dbname of a connection string, for messages; never the password."""
    try:
        parts = parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "<unparsable connection string>"
    host = parts.get("host", "local socket")
    port = parts.get("port", "5432")
    return f"{host}:{port}/{parts.get('dbname', parts.get('user', '?'))}"


def connect(dsn: str, application_name: str = "pgq-queue-mover", **extra: str) -> Connection:
    """A psycopg2 connection with autocommit off; ConnectionFailed with a clean message."""
    try:
        password = parse_dsn(dsn).get("password")
    except psycopg2.ProgrammingError as exc:
        raise ConnectionFailed(f"bad connection string: {redact(str(exc).strip())}") from None
    password = extra.get("password", password)
    try:
        conn: Connection = psycopg2.connect(dsn, None, None, application_name=application_name, **extra)
    except psycopg2.Error as exc:
        message = redact(str(exc).strip(), password)
        raise ConnectionFailed(f"cannot connect to {describe(dsn)}: {message}") from None
    # The protocol's "lock, then read" steps need a fresh snapshot per statement.
    conn.set_session(isolation_level=ISOLATION_LEVEL_READ_COMMITTED, autocommit=False)
    return conn
