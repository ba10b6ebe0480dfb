"""Tracking on the target: install pgq_ext, lock a key, read and write its mark."""

from __future__ import annotations

import logging
from importlib.resources import files

from psycopg2.extensions import connection as Connection

from airflow_provider_pgq.core.errors import PgqExtMissing

log = logging.getLogger(__name__)

#: What pgq_ext.mover_schema_version() must at least answer for this release.
REQUIRED_MOVER_SCHEMA = 2  # 2: kept event ids (pgq_ext.kept_event_ids, kept_ids_*)

_INSTALL_LOCK = "airflow_provider_pgq:pgq_ext install"


def _sql(name: str) -> str:
    return files("airflow_provider_pgq.core").joinpath("sql").joinpath(name).read_text(encoding="utf-8")


def installed_as_extension(conn: Connection) -> bool:
    """A classic pgq_ext created with CREATE EXTENSION owns its functions: we leave them."""
    with conn.cursor() as cur:
        cur.execute("select 1 from pg_extension where extname = 'pgq_ext'")
        return cur.fetchone() is not None


def mover_schema_version(conn: Connection) -> int | None:
    """None when pgq_ext is absent or lacks what the mover adds (e.g. a classic install)."""
    with conn.cursor() as cur:
        cur.execute("select to_regproc('pgq_ext.mover_schema_version')")
        row = cur.fetchone()
        if row is None or row[0] is None:
            return None
        cur.execute("select pgq_ext.mover_schema_version()")
        row = cur.fetchone()
    return int(row[0]) if row else None


def classic_present(conn: Connection) -> bool:
    with conn.cursor() as cur:
        cur.execute("select to_regclass('pgq_ext.completed_tick')")
        row = cur.fetchone()
    return bool(row and row[0])


def install(conn: Connection) -> None:
    """Installs or upgrades pgq_ext in one transaction and commits; marks are kept.

    Safe to run any number of times and next to a classic installation.
    """
    try:
        with conn.cursor() as cur:
            cur.execute("select pg_advisory_xact_lock(hashtextextended(%s, 0))", (_INSTALL_LOCK,))
            if not installed_as_extension(conn):
                cur.execute(_sql("pgq_ext.sql"))
            cur.execute(_sql("pgq_ext_mover.sql"))
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    log.info("pgq_ext installed (mover schema %s)", REQUIRED_MOVER_SCHEMA)


def require(conn: Connection, install_if_missing: bool = False) -> None:
    """Raises PgqExtMissing unless pgq_ext is usable; installs it first when asked."""
    have = mover_schema_version(conn)
    if have is not None and have >= REQUIRED_MOVER_SCHEMA:
        return
    if install_if_missing:
        conn.rollback()
        install(conn)
        return
    with conn.cursor() as cur:
        cur.execute("select current_database()")
        row = cur.fetchone()
    db = row[0] if row else "?"
    if have is None and not classic_present(conn):
        what = "is not installed"
    else:
        schema = "classic" if have is None else have
        what = f"is older than this mover needs (schema {schema} < {REQUIRED_MOVER_SCHEMA})"
    raise PgqExtMissing(
        f"pgq_ext {what} in the target database {db!r}: install it with "
        "install_pgq_ext=True (operator), --install-pgq-ext (CLI) or "
        "PgqHook.install_pgq_ext(); existing marks are kept"
    )


def lock_key(conn: Connection, consumer: str, subconsumer: str) -> None:
    """Transaction-scoped lock that serializes movers sharing a tracking key."""
    with conn.cursor() as cur:
        cur.execute(
            "select pg_advisory_xact_lock(hashtextextended('pgq_ext:' || %s || chr(1) || %s, 0))",
            (consumer, subconsumer),
        )


def get_last_tick(conn: Connection, consumer: str, subconsumer: str) -> int | None:
    with conn.cursor() as cur:
        cur.execute("select pgq_ext.get_last_tick(%s, %s)", (consumer, subconsumer))
        row = cur.fetchone()
    return None if row is None or row[0] is None else int(row[0])


def set_last_tick(conn: Connection, consumer: str, subconsumer: str, tick_id: int | None) -> None:
    """None forgets the mark."""
    with conn.cursor() as cur:
        cur.execute("select pgq_ext.set_last_tick(%s, %s, %s)", (consumer, subconsumer, tick_id))


def bind_source(
    conn: Connection, consumer: str, subconsumer: str, system_id: str, database: str, queue: str
) -> str | None:
    """Binds the key to this source; returns the other source it belongs to, if any."""
    with conn.cursor() as cur:
        cur.execute(
            "select pgq_ext.bind_source(%s, %s, %s, %s, %s)",
            (consumer, subconsumer, system_id, database, queue),
        )
        row = cur.fetchone()
    return None if row is None else row[0]


def unbind_source(conn: Connection, consumer: str, subconsumer: str) -> None:
    with conn.cursor() as cur:
        cur.execute("select pgq_ext.unbind_source(%s, %s)", (consumer, subconsumer))
