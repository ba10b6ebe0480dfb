"""What an attacker's session does in the security tests: one statement at a time,
each in its own transaction."""

from __future__ import annotations

import psycopg2
import pytest
from psycopg2.extensions import connection as Connection


def call(conn: Connection, query: str, params: tuple[object, ...] = ()) -> object:
    """One statement in its own transaction, as an attacker's session sends it."""
    try:
        with conn.cursor() as cur:
            cur.execute(query, params or None)
            row = cur.fetchone() if cur.description else None
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return None if row is None else row[0]


def denied(conn: Connection, query: str, params: tuple[object, ...] = ()) -> str:
    """The refusal's message; fails the test when the statement was allowed."""
    with pytest.raises(psycopg2.errors.InsufficientPrivilege) as info:
        call(conn, query, params)
    return str(info.value)
