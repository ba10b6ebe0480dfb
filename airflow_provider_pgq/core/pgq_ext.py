"""Tracking on the target: install pgq_ext, lock a key, read and write its mark."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import connection as Connection

from airflow_provider_pgq.core.errors import KeyLocked, KeyNotOwned, PgqExtMissing, PgqExtUntrusted

log = logging.getLogger(__name__)

#: What pgq_ext.mover_schema_version() must at least answer for this release.
#: 2: kept event ids; 3: the write side for MOVER_ROLE only, claims proven by rows;
#: 4: staged inserts (stage_events, insert_staged_events); 5: tracking keys have owners,
#: their locks are rows of pgq_ext (lock_key, ensure_key, assign_key); 6: the move journal
#: (move_journal, written with the mark by mark_batch); 7: dead letters (dead_letter,
#: dead_letter_events, replay_dead_letters, list_dead_letters).
REQUIRED_MOVER_SCHEMA = 7

#: The NOLOGIN role install makes: the only one (besides superusers and the installing
#: owner) that may call the write side of pgq_ext. Grant it to the mover's target login.
MOVER_ROLE = "pgq_mover"

#: Functions that move marks, bind keys or write events with chosen times and ids:
#: EXECUTE for MOVER_ROLE only. Everything else in pgq_ext reads, open to PUBLIC as in
#: the classic pgq_ext.
WRITE_FUNCTIONS = (
    "set_last_tick", "set_batch_done", "set_event_done", "bind_source", "unbind_source",
    "insert_event_chunk", "kept_ids_claim", "kept_ids_commit", "kept_ids_release",
    "stage_events", "insert_staged_events", "_require_own_staging", "_require_kept_ids_claim", "begin_batch",
    "lock_key", "ensure_key", "kept_ids_refusal", "dead_letter_events", "replay_dead_letters", "mark_batch",
)

#: Functions that read what one key's owner may see (event payloads): EXECUTE for
#: MOVER_ROLE only; each answers only a writer of the key (or an admin).
MOVER_READ_FUNCTIONS = ("list_dead_letters",)

#: Tables that hold event payloads: readable by their owner (admins) only, never PUBLIC
#: nor MOVER_ROLE (on a target shared by teams it would read every team's); a key's
#: writer reads its own rows through MOVER_READ_FUNCTIONS.
MOVER_TABLES = ("dead_letter",)

#: Functions open to PUBLIC before mover schema 5 that are the mover's since: reading
#: kept_ids_refusal locks the queue's event tables (PgQ then skips their rotation).
#: The upgrade to 5 moves their EXECUTE from PUBLIC to MOVER_ROLE, once.
MOVED_TO_MOVER_IN_5 = ("kept_ids_refusal",)

#: EXECUTE revoked from PUBLIC and granted to nobody: assign_key (it checks for an admin
#: itself) and the helpers the SECURITY DEFINER functions call as their owner.
PRIVATE_FUNCTIONS = (
    "assign_key", "_require_key_writer", "_is_key_admin", "_may_write_key", "_key_owner_name", "_queue_relation",
    "set_journal_retention", "_require_held_key",
)

#: The names our SQL defines; a classic installation's functions of these names are
#: dropped once when install first takes it over (their argument names may differ).
OUR_FUNCTIONS = WRITE_FUNCTIONS + MOVER_READ_FUNCTIONS + PRIVATE_FUNCTIONS + (
    "get_last_tick", "is_batch_done", "is_event_done", "version", "mover_schema_version",
    "kept_ids_seq_position",
)

_INSTALL_LOCK = "airflow_provider_pgq:pgq_ext install"


def _sql(name: str) -> str:
    return files("airflow_provider_pgq.core").joinpath("sql").joinpath(name).read_text(encoding="utf-8")


def _rows(conn: Connection, query: str | sql.Composable, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(query, params)
        return list(cur.fetchall())


def installed_as_extension(conn: Connection) -> bool:
    """A classic pgq_ext created with CREATE EXTENSION owns its functions: we leave them."""
    return bool(_rows(conn, "select 1 from pg_catalog.pg_extension where extname = 'pgq_ext'"))


def mover_schema_version(conn: Connection) -> int | None:
    """None when pgq_ext is absent or lacks what the mover adds (e.g. a classic install)."""
    rows = _rows(conn, "select pg_catalog.to_regproc('pgq_ext.mover_schema_version')")
    if not rows or rows[0][0] is None:
        return None
    rows = _rows(conn, "select pgq_ext.mover_schema_version()")
    return int(rows[0][0]) if rows else None


def classic_present(conn: Connection) -> bool:
    rows = _rows(conn, "select pg_catalog.to_regclass('pgq_ext.completed_tick')")
    return bool(rows and rows[0][0])


# Every object in pgq_ext and who owns it: the schema, its relations and types, its
# functions and operators, and the functions of triggers on its tables (a trigger runs
# as whoever fires it: inside our SECURITY DEFINER functions, as their owner).
_OWNERS = """
select 'schema', n.nspname::text, n.nspowner from pg_catalog.pg_namespace n
 where n.nspname = 'pgq_ext'
union all
select case when c.relkind in ('r', 'p') then 'table' else 'relation' end,
       c.oid::pg_catalog.regclass::text, c.relowner from pg_catalog.pg_class c
 where c.relnamespace = pg_catalog.to_regnamespace('pgq_ext')
union all
select 'function', p.oid::pg_catalog.regprocedure::text, p.proowner from pg_catalog.pg_proc p
 where p.pronamespace = pg_catalog.to_regnamespace('pgq_ext')
union all
select 'type', t.oid::pg_catalog.regtype::text, t.typowner from pg_catalog.pg_type t
 where t.typnamespace = pg_catalog.to_regnamespace('pgq_ext')
union all
select 'operator', o.oid::pg_catalog.regoperator::text, o.oprowner from pg_catalog.pg_operator o
 where o.oprnamespace = pg_catalog.to_regnamespace('pgq_ext')
union all
select 'trigger', t.tgname::text || ' on ' || t.tgrelid::pg_catalog.regclass::text, p.proowner
  from pg_catalog.pg_trigger t
  join pg_catalog.pg_class c on c.oid = t.tgrelid
  join pg_catalog.pg_proc p on p.oid = t.tgfoid
 where c.relnamespace = pg_catalog.to_regnamespace('pgq_ext') and not t.tgisinternal
"""

UNTRUSTED = sql.SQL("""
select o.kind, o.name, pg_catalog.pg_get_userbyid(o.owner)
  from ({owners}) o (kind, name, owner)
  join pg_catalog.pg_roles r on r.oid = o.owner
 where not r.rolsuper
   and r.rolname <> current_user
   and o.owner is distinct from (select e.extowner from pg_catalog.pg_extension e
                                  where e.extname = 'pgq_ext')
   and o.owner is distinct from (select d.datdba from pg_catalog.pg_database d
                                  where d.datname = pg_catalog.current_database())
 order by 1, 2
 limit 1
""").format(owners=sql.SQL(_OWNERS))


_MOVER_ROLE_STATE = "select rolcanlogin, rolsuper from pg_catalog.pg_roles where rolname = %s"


def require_trusted(conn: Connection) -> None:
    """Refuses a pgq_ext that a role other than us, a superuser, the database's owner
    or the classic extension's owner controls: its tables could carry triggers and its
    functions run as our role. We never adopt such objects. The database's owner is
    the one installer besides a superuser that every mover login may trust: only a
    superuser (or the owner itself) can make a role the owner, so no other role can
    pass for it. Refuses too when the NOLOGIN role pgq_mover was made a login (or a
    superuser): whoever logs in as it may have written the marks."""
    state = _rows(conn, _MOVER_ROLE_STATE, (MOVER_ROLE,))
    if state and (state[0][0] or state[0][1]):
        raise PgqExtUntrusted(
            f"role {MOVER_ROLE!r} may log in or is a superuser: it must stay a NOLOGIN group role, as"
            " whoever logs in as it writes the marks of every database of this server (on PostgreSQL 15"
            " every role with CREATEROLE may alter it so). A superuser runs alter role"
            f" {MOVER_ROLE} nologin nosuperuser, finds out who changed it and checks the marks"
            " (docs/security.md); then run again"
        )
    rows = _rows(conn, UNTRUSTED)
    if not rows:
        return
    kind, name, owner = rows[0]
    me, db = _rows(conn, "select current_user::text, pg_catalog.current_database()::text")[0]
    raise PgqExtUntrusted(
        f"pgq_ext in database {db!r} is not ours to use: {kind} {name} is owned by role"
        f" {owner!r}, which is neither {me!r}, a superuser, the database's owner, nor the owner of a"
        " pgq_ext extension; code of that role could run with this session's rights. Find out who"
        " made it; if it is not yours, a superuser should move the marks aside and drop it"
        f" (drop schema pgq_ext cascade), or, if it is, alter its owner to {me!r}; then install"
        " again"
    )


@dataclass
class InstallReport:
    """What install changed, so that an admin can see that their grants were kept."""

    created: list[str] = field(default_factory=list)
    taken_over: list[str] = field(default_factory=list)
    granted: list[str] = field(default_factory=list)
    role_created: bool = False
    #: what the installer still has to have done before a mover can use it
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [
            f"created {len(self.created)} objects" if self.created else "created nothing",
            f"rights given: {'; '.join(self.granted)}" if self.granted else "kept every existing grant",
        ]
        if self.taken_over:
            parts.append(f"took over {len(self.taken_over)} classic functions")
        if self.role_created:
            parts.append(f"created role {MOVER_ROLE}")
        return "; ".join([", ".join(parts), *self.notes])


def _objects(conn: Connection) -> dict[str, str]:
    """identity -> kind of the schema, tables and functions in pgq_ext."""
    return {name: kind for kind, name, _ in _rows(conn, _OWNERS) if kind in ("schema", "table", "function")}


def _ensure_mover_role(conn: Connection) -> bool:
    """Creates the NOLOGIN mover role when missing; True when it did."""
    rows = _rows(conn, "select rolcanlogin, rolsuper from pg_catalog.pg_roles where rolname = %s", (MOVER_ROLE,))
    if rows:
        if rows[0][0] or rows[0][1]:
            raise PgqExtUntrusted(
                f"role {MOVER_ROLE!r} exists but may log in or is a superuser: it must be a NOLOGIN"
                f" group role that mover logins are granted. alter role {MOVER_ROLE} nologin"
                " nosuperuser (and grant it to the mover's login), then install again"
            )
        return False
    may = _rows(conn, "select rolsuper or rolcreaterole from pg_catalog.pg_roles where rolname = current_user")
    if not (may and may[0][0]):
        raise PgqExtMissing(
            f"role {MOVER_ROLE!r} does not exist and this role may not create roles: a superuser"
            f" (or a role with CREATEROLE) runs create role {MOVER_ROLE} nologin once; then install"
            " pgq_ext again"
        )
    with conn.cursor() as cur:
        cur.execute(sql.SQL("create role {} nologin").format(sql.Identifier(MOVER_ROLE)))
    return True


# Who installs: pgq_ext's write functions run as their owner (SECURITY DEFINER) and
# write the target queue's event tables and event-id sequences, which PgQ grants to
# pgq_admin; and mover logins need pgq_mover granted, which on PostgreSQL 16+ only a
# superuser or a role with ADMIN OPTION on it may do (on 15 any CREATEROLE role).
_INSTALLER = """
select r.rolname::text, r.rolsuper,
       case when pg_catalog.to_regrole('pgq_admin') is null then false
            else pg_catalog.pg_has_role(r.oid, 'pgq_admin', 'USAGE') end,
       r.rolsuper
         or (pg_catalog.current_setting('server_version_num')::int < 160000 and r.rolcreaterole)
         or pg_catalog.pg_has_role(r.oid, %s, 'MEMBER WITH ADMIN OPTION')
  from pg_catalog.pg_roles r where r.rolname = current_user
"""


def _check_installer(conn: Connection, report: InstallReport) -> None:
    """Refuses an installer whose functions could not write the events (they run as
    it); notes when it cannot grant pgq_mover to the mover's logins."""
    me, superuser, admin, may_grant = _rows(conn, _INSTALLER, (MOVER_ROLE,))[0]
    if superuser:
        return
    if not admin:
        raise PgqExtMissing(
            f"role {me!r} may not install pgq_ext for movers: pgq_ext's write functions run as the role"
            " that installs them (SECURITY DEFINER) and write the target queue's event tables and"
            " event-id sequences, which PgQ grants to pgq_admin. Install as a superuser, or have a"
            f" superuser run grant pgq_admin to {me} (docs/security.md); then install again"
        )
    if not may_grant:
        holders = [r[0] for r in _rows(
            conn,
            "select pg_catalog.pg_get_userbyid(m.member)::text from pg_catalog.pg_auth_members m"
            " where m.roleid = pg_catalog.to_regrole(%s) and m.admin_option order by 1",
            (MOVER_ROLE,),
        )]
        by = f" or role {', '.join(repr(h) for h in holders)} (ADMIN OPTION)" if holders else ""
        report.notes.append(
            f"role {me!r} cannot grant {MOVER_ROLE} to the mover's target logins (PostgreSQL 16+: only a"
            f" superuser or a role with ADMIN OPTION on {MOVER_ROLE} may): a superuser{by} runs"
            f" grant {MOVER_ROLE} to <login>, or grant {MOVER_ROLE} to {me} with admin option"
        )


def _take_over_classic(conn: Connection) -> list[str]:
    """Drops a classic (not extension) installation's functions of our names, once."""
    names = [r[0] for r in _rows(
        conn,
        "select p.oid::pg_catalog.regprocedure::text from pg_catalog.pg_proc p"
        " where p.pronamespace = pg_catalog.to_regnamespace('pgq_ext') and p.proname = any(%s)",
        (list(OUR_FUNCTIONS),),
    )]
    for name in names:
        _execute_formatted(conn, "drop function %s", name, "pg_catalog.regprocedure")
    return names


def _execute_formatted(conn: Connection, template: str, obj: str, cast: str, role: str | None = None) -> None:
    """Runs a DDL statement whose object name the server quotes (format over a reg* cast)."""
    query = sql.SQL("select pg_catalog.format(%s, %s::{}, %s)").format(sql.SQL(cast))
    rows = _rows(conn, query.as_string(conn), (template, obj, role))
    with conn.cursor() as cur:
        cur.execute(rows[0][0])


def _default_rights(conn: Connection, name: str, kind: str) -> list[str]:
    """The rights an object gets when install creates it (never again afterwards)."""
    if kind == "schema":
        with conn.cursor() as cur:
            cur.execute("grant usage on schema pgq_ext to public")
        return ["usage on schema pgq_ext to public"]
    if kind == "table" and name.rsplit(".", 1)[-1] in MOVER_TABLES:
        _execute_formatted(conn, "revoke all on table %s from public", name, "pg_catalog.regclass")
        return [f"select on {name} to its owner only ({MOVER_ROLE} through list_dead_letters)"]
    if kind == "table":
        _execute_formatted(conn, "grant select on table %s to public", name, "pg_catalog.regclass")
        return []  # tables are readable by all, as the classic had them: not worth a line
    if _function_name(name) in PRIVATE_FUNCTIONS:
        _execute_formatted(conn, "revoke all on function %s from public", name, "pg_catalog.regprocedure")
        return [f"{name} to nobody"]
    if _function_name(name) not in WRITE_FUNCTIONS + MOVER_READ_FUNCTIONS:
        return []  # PostgreSQL's default: EXECUTE for PUBLIC
    _execute_formatted(conn, "revoke all on function %s from public", name, "pg_catalog.regprocedure")
    _execute_formatted(conn, "grant execute on function %s to %I", name, "pg_catalog.regprocedure", MOVER_ROLE)
    return [f"{name} to {MOVER_ROLE} only"]


def _function_name(identity: str) -> str:
    return identity.split("(", 1)[0].rsplit(".", 1)[-1]


def _move_writer_grants(conn: Connection, objects: dict[str, str]) -> list[str]:
    """Mover schema 2 granted the write side to pgq_writer, which every producer holds:
    that grant goes to the mover role instead (the one change to existing grants)."""
    moved = []
    for name, kind in objects.items():
        if kind != "function" or _function_name(name) not in WRITE_FUNCTIONS:
            continue
        _execute_formatted(conn, "revoke all on function %s from pgq_writer", name, "pg_catalog.regprocedure")
        _execute_formatted(conn, "revoke all on function %s from public", name, "pg_catalog.regprocedure")
        _execute_formatted(conn, "grant execute on function %s to %I", name, "pg_catalog.regprocedure", MOVER_ROLE)
        moved.append(f"{name} from pgq_writer to {MOVER_ROLE}")
    return moved


def _move_public_grants(conn: Connection, objects: dict[str, str], names: tuple[str, ...]) -> list[str]:
    """EXECUTE on these functions from PUBLIC to the mover role (an upgrade's one change)."""
    moved = []
    for name, kind in objects.items():
        if kind != "function" or _function_name(name) not in names:
            continue
        _execute_formatted(conn, "revoke all on function %s from public", name, "pg_catalog.regprocedure")
        _execute_formatted(conn, "grant execute on function %s to %I", name, "pg_catalog.regprocedure", MOVER_ROLE)
        moved.append(f"{name} from public to {MOVER_ROLE}")
    return moved


def _revoke_mover_table_reads(conn: Connection, objects: dict[str, str], created: list[str]) -> list[str]:
    """An install of mover schema 7 before list_dead_letters granted SELECT on the
    payload tables to MOVER_ROLE: revoked once, when that function is first made."""
    if not any(_function_name(n) in MOVER_READ_FUNCTIONS for n in created if objects[n] == "function"):
        return []
    revoked = []
    for name, kind in objects.items():
        if kind == "table" and name not in created and name.rsplit(".", 1)[-1] in MOVER_TABLES:
            _execute_formatted(conn, "revoke select on table %s from %I", name, "pg_catalog.regclass", MOVER_ROLE)
            revoked.append(f"{MOVER_ROLE}'s SELECT on {name} revoked (list_dead_letters instead)")
    return revoked


def install(conn: Connection) -> InstallReport:
    """Installs or upgrades pgq_ext in one transaction and commits; marks are kept.

    Safe to run any number of times and next to a classic installation. Refuses
    objects another role owns. Functions are replaced, not dropped, so every grant
    and revoke an admin made on them stays; default rights go only to objects this
    run creates.
    """
    report = InstallReport()
    try:
        with conn.cursor() as cur:
            cur.execute(
                "select pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(%s::text, 0::bigint))",
                (_INSTALL_LOCK,),
            )
        require_trusted(conn)
        report.role_created = _ensure_mover_role(conn)
        _check_installer(conn, report)
        previous = mover_schema_version(conn)
        extension = installed_as_extension(conn)
        if previous is None and not extension and classic_present(conn):
            report.taken_over = _take_over_classic(conn)
        before = _objects(conn)
        if not extension:
            with conn.cursor() as cur:
                cur.execute(_sql("pgq_ext.sql"))
        with conn.cursor() as cur:
            cur.execute(_sql("pgq_ext_mover.sql"))
        after = _objects(conn)
        report.created = sorted(set(after) - set(before))
        for name in report.created:
            report.granted += _default_rights(conn, name, after[name])
        if previous is not None and previous < 3:
            report.granted += _move_writer_grants(conn, after)
        if previous is not None and previous < 5:
            report.granted += _move_public_grants(
                conn, {n: k for n, k in after.items() if n not in report.created}, MOVED_TO_MOVER_IN_5)
        report.granted += _revoke_mover_table_reads(conn, after, report.created)
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    log.info("pgq_ext installed (mover schema %s): %s", REQUIRED_MOVER_SCHEMA, report.summary())
    for note in report.notes:
        log.warning("pgq_ext install: %s", note)
    return report


def require(conn: Connection, install_if_missing: bool = False) -> None:
    """Raises PgqExtMissing unless pgq_ext is usable; installs it first when asked.

    PgqExtUntrusted when another role controls it: nothing of it is called then."""
    require_trusted(conn)
    have = mover_schema_version(conn)
    if have is not None and have >= REQUIRED_MOVER_SCHEMA:
        return
    if install_if_missing:
        conn.rollback()
        install(conn)
        return
    db = _rows(conn, "select pg_catalog.current_database()")[0][0]
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


def _idle(conn: Connection) -> bool:
    return bool(conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE)


def ensure_key(conn: Connection, consumer: str, subconsumer: str) -> str | None:
    """Makes the tracking key (this login's when new) and its consumer's bind-lock row,
    and commits: afterwards a mover waiting for either lock can name its holder (an
    uncommitted new row shows nobody). Returns the key's owner, None when nobody owns it
    (a key install took over: any pgq_mover member may write it until an admin assigns
    it). KeyNotOwned when the key, or its consumer name, belongs to another role."""
    try:
        with conn.cursor() as cur:
            cur.execute("select pgq_ext.ensure_key(%s::text, %s::text)", (consumer, subconsumer))
            row = cur.fetchone()
    except psycopg2.errors.InsufficientPrivilege as exc:
        _quiet_rollback(conn)
        diag = exc.diag
        if diag.message_hint is None:  # no refusal of ours: EXECUTE itself was denied
            raise
        raise KeyNotOwned(f"{diag.message_primary}. {diag.message_hint}") from exc
    conn.commit()
    return None if row is None or row[0] is None else str(row[0])


def lock_key(conn: Connection, consumer: str, subconsumer: str) -> None:
    """Transaction-scoped lock that serializes movers sharing a tracking key: the key's
    row in pgq_ext.tracking_key FOR UPDATE (pgq_ext.lock_key), which no login without
    pgq_mover, and no member of it but the key's owner, can take. Called outside a
    transaction, it first makes the key's row (ensure_key, committed)."""
    if _idle(conn):
        ensure_key(conn, consumer, subconsumer)
    try:
        with conn.cursor() as cur:
            cur.execute("select pgq_ext.lock_key(%s::text, %s::text)", (consumer, subconsumer))
    except psycopg2.errors.LockNotAvailable as exc:
        raise key_locked(conn, consumer, subconsumer, exc) from exc


#: The sessions holding the key's lock (its row in tracking_key) and its consumer's bind
#: lock (its row in tracking_consumer): a row locked FOR UPDATE carries the locking
#: transaction in xmax, and that transaction's backend holds the ExclusiveLock on its
#: id. What pg_stat_activity shows of another role's session depends on the caller's
#: rights (pg_read_all_stats); the role (usename) shows always.
_KEY_HOLDER = (
    "with k (lock, xmax) as ("
    " select 'key', t.xmax from pgq_ext.tracking_key t where t.consumer_id = %s::text and t.subconsumer_id = %s::text"
    " union all"
    " select 'bind', c.xmax from pgq_ext.tracking_consumer c where c.consumer_id = %s::text)"
    " select k.lock, l.pid, a.usename::text, a.application_name, pg_catalog.host(a.client_addr), a.state,"
    " a.wait_event, pg_catalog.round(extract(epoch from pg_catalog.now() - a.state_change))::bigint"
    " from k join pg_catalog.pg_locks l on l.locktype = 'transactionid' and l.transactionid = k.xmax"
    " and l.mode = 'ExclusiveLock' and l.granted"
    " left join pg_catalog.pg_stat_activity a on a.pid = l.pid"
    " where l.pid <> pg_catalog.pg_backend_pid()"
    " order by k.lock = 'key' desc"
)


def key_locked(conn: Connection, consumer: str, subconsumer: str, exc: psycopg2.Error) -> KeyLocked:
    """The error for a key whose lock (or whose consumer's bind lock) was not granted
    within lock_timeout, naming the holder: lock, pid, role, application. Rolls back the
    failed transaction (it is lost anyway) to look it up."""
    key = f"{consumer}/{subconsumer}" if subconsumer else consumer
    holder = None
    try:
        conn.rollback()
        holder = _rows(conn, _KEY_HOLDER, (consumer, subconsumer, consumer))
        conn.rollback()
    except psycopg2.Error:
        _quiet_rollback(conn)
        holder = None
    side = getattr(conn, "side", "target")
    server_of = getattr(conn, "server", None)
    server = server_of() if callable(server_of) else ""
    where = f"{side} {server}" if server else side
    if not holder:
        return KeyLocked(
            f"{where}: the lock of tracking key {key!r} was not granted within lock_timeout"
            f" ({str(exc).strip()}); no session holds it or its consumer's bind lock now (its holder"
            " has let go since): the next try should get it",
            side=side, server=server, what="lock")
    lock, pid, role, app, client, state, wait_event, seconds = holder[0]
    about = ", ".join(part for part in (
        f"application {app!r}" if app else "",
        f"client {client}" if client else "",
        f"{state}" + (f" (waiting for {wait_event})" if wait_event else "") if state else "",
        f"for {seconds} s" if seconds is not None else "",
    ) if part)
    what = (f"the lock of tracking key {key!r}" if lock == "key" else
            f"the bind lock of consumer {consumer!r} (held while a key of it is bound to its source)")
    return KeyLocked(
        f"{where}: {what} was not granted within lock_timeout: backend pid {pid} of role {role!r}"
        f" holds it ({about or 'no details visible to this role'}). Another run of this mover is"
        f" working, or one that vanished left its session behind (a proxy or middlebox that keeps the"
        f" server's side of a dead connection open, a COPY waiting for data that never comes); if no"
        f" mover of this key is running, end it: select pg_terminate_backend({pid})",
        side=side, server=server, what="lock", holder_pid=int(pid))


def _quiet_rollback(conn: Connection) -> None:
    try:
        conn.rollback()
    except psycopg2.Error:
        pass


def get_last_tick(conn: Connection, consumer: str, subconsumer: str) -> int | None:
    with conn.cursor() as cur:
        cur.execute("select pgq_ext.get_last_tick(%s::text, %s::text)", (consumer, subconsumer))
        row = cur.fetchone()
    return None if row is None or row[0] is None else int(row[0])


def set_last_tick(conn: Connection, consumer: str, subconsumer: str, tick_id: int | None,
                  commit: bool = False) -> None:
    """None forgets the mark. commit: and commit the transaction, in the same round trip
    where the connection can (GuardedConnection.commit_after)."""
    _run_then_commit(conn, "select pgq_ext.set_last_tick(%s::text, %s::text, %s::bigint)",
                     (consumer, subconsumer, tick_id), commit)


def _run_then_commit(conn: Connection, query: str, params: tuple[Any, ...], commit: bool) -> None:
    """Runs the statement; with commit, commits too, in the same round trip where the
    connection can (GuardedConnection.commit_after)."""
    if commit and hasattr(conn, "commit_after"):
        conn.commit_after(query, params)
        return
    with conn.cursor() as cur:
        cur.execute(query, params)
    if commit:
        conn.commit()


def mark_batch(conn: Connection, consumer: str, subconsumer: str, batch: tuple[int, int | None, int],
               counts: tuple[int, int, int], who: dict[str, Any], commit: bool = False) -> None:
    """Step 5: the key's mark := the batch's cur tick, and its row in the move journal
    (pgq_ext.mark_batch), in this transaction; batch is (batch id, prev tick, cur tick),
    counts (events, filtered, dead_lettered). commit: and commit, in the same round trip
    where the connection can (GuardedConnection.commit_after): the journal costs no
    round trip of its own."""
    batch_id, prev_tick, cur_tick = batch
    events, filtered, dead_lettered = counts
    query = ("select pgq_ext.mark_batch(%s::text, %s::text, %s::bigint, %s::bigint, %s::bigint, %s::bigint,"
             " %s::bigint, %s::bigint, %s::jsonb)")
    _run_then_commit(conn, query, (consumer, subconsumer, batch_id, prev_tick, cur_tick, events, filtered,
                                   dead_lettered, json.dumps(who)), commit)


def bind_source(
    conn: Connection, consumer: str, subconsumer: str, system_id: str, database: str, queue: str
) -> str | None:
    """Binds the key to this source; returns the other source it belongs to, if any.
    Called outside a transaction, it first makes the key's rows (ensure_key)."""
    if _idle(conn):
        ensure_key(conn, consumer, subconsumer)
    with conn.cursor() as cur:
        cur.execute(
            "select pgq_ext.bind_source(%s::text, %s::text, %s::text, %s::text, %s::text)",
            (consumer, subconsumer, system_id, database, queue),
        )
        row = cur.fetchone()
    return None if row is None else row[0]


_BEGIN_BATCH = ("select b.other_source, b.last_tick, null::bigint"
                " from pgq_ext.begin_batch(%s::text, %s::text, %s::text, %s::text, %s::text) b")
_BEGIN_STAGED_BATCH = ("select b.other_source, b.last_tick,"
                       " case when b.other_source is null then pgq_ext.stage_events() end"
                       " from pgq_ext.begin_batch(%s::text, %s::text, %s::text, %s::text, %s::text) b")


@dataclass(frozen=True)
class Staged:
    """pgq_ext.stage_events()' answer, asked in the batch's transaction: the staging
    table's last ordinal, or None where pgq_ext's owner may not make temporary tables."""

    after: int | None


def begin_batch(
    conn: Connection, consumer: str, subconsumer: str, system_id: str, database: str, queue: str,
    stage: bool = False,
) -> tuple[str | None, int | None, Staged | None]:
    """lock_key, bind_source and get_last_tick in one round trip: (the other source the
    key belongs to, or None; the key's mark; with ``stage``, for the chunk path,
    stage_events' answer, else None). The staging table is made (once a session) after
    the key's lock, in the batch's transaction, also for a batch that is then skipped: it
    holds nothing until the COPY."""
    try:
        rows = _rows(conn, _BEGIN_STAGED_BATCH if stage else _BEGIN_BATCH,
                     (consumer, subconsumer, system_id, database, queue))
    except psycopg2.errors.LockNotAvailable as exc:
        raise key_locked(conn, consumer, subconsumer, exc) from exc
    other, mark, after = rows[0]
    staged = Staged(None if after is None else int(after)) if stage else None
    return other, None if mark is None else int(mark), staged


def unbind_source(conn: Connection, consumer: str, subconsumer: str) -> None:
    with conn.cursor() as cur:
        cur.execute("select pgq_ext.unbind_source(%s::text, %s::text)", (consumer, subconsumer))
