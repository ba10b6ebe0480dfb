"""Installs without a superuser (issue 22): a database owner with CREATEROLE installs
pgq_ext, and the documented least-privilege logins then move; what the installer needs
(pgq_admin) is said by install itself; pgq_mover made a login stops the mover; the
errors for a member without inheritance and for a second database owner who may not
grant pgq_mover (PostgreSQL 16+) name the fix.

A cluster of its own (the tier's version, PGQ_TEST_PG): the first install in it creates
pgq_mover, as in a fresh estate, and its role changes touch no other test.
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg2
import pytest
from psycopg2 import sql

from airflow_provider_pgq.core import pgq_ext
from airflow_provider_pgq.core.errors import PgqError, PgqExtMissing, PgqExtUntrusted
from airflow_provider_pgq.core.mover import CHUNK_PATH, COPY_PATH, MoverOptions, QueueMover
from tests.helpers import Server, create_queue, mark_of, produce, queue_events, register, simple_events, tick
from tests.support.chroot import new_cluster
from tests.support.cluster import ThrowawayCluster


@dataclass
class Role:
    name: str
    password: str

    def dsn(self, server: Server) -> str:
        return server.cluster.dsn(server.dbname, user=self.name, password=self.password)

    def connect(self, server: Server) -> Any:
        return psycopg2.connect(self.dsn(server))


@pytest.fixture(scope="module")
def own() -> Iterator[ThrowawayCluster]:
    if os.environ.get("PGQ_TEST_DSN"):
        pytest.skip("PGQ_TEST_DSN names a shared server: these tests need a cluster of their own (its first"
                    " install creates pgq_mover, and they alter that role)")
    c = new_cluster(in_memory=True)
    try:
        yield c
    finally:
        c.stop()


def _role(c: ThrowawayCluster, prefix: str, options: str = "", in_role: str | None = None) -> Role:
    role = Role(f"{prefix}_{uuid.uuid4().hex[:8]}", "pw-" + secrets.token_urlsafe(10))
    query = sql.SQL("create role {} login password %s " + options).format(sql.Identifier(role.name))
    if in_role:
        query = sql.SQL("{} in role {}").format(query, sql.Identifier(in_role))
    c.execute("postgres", query, (role.password,))
    return role


def _as(role: Role, server: Server, query: Any, params: tuple[Any, ...] = ()) -> None:
    conn = role.connect(server)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(query, params)
    finally:
        conn.close()


def _owned_database(c: ThrowawayCluster, owner: Role) -> Server:
    """A database owned by `owner`, with pgq and queue dst_q made by the superuser (PgQ
    is no trusted extension)."""
    name = f"own_{uuid.uuid4().hex[:10]}"
    c.create_database(name)
    c.execute("postgres", sql.SQL("alter database {} owner to {}").format(sql.Identifier(name),
                                                                          sql.Identifier(owner.name)))
    c.execute(name, "create extension pgq")
    server = Server(c, name)
    create_queue(server, "dst_q")
    return server


def _superuser_target(c: ThrowawayCluster) -> Server:
    """A target whose pgq_ext a superuser installed (trusted by every login)."""
    name = f"su_{uuid.uuid4().hex[:10]}"
    c.create_database(name)
    c.execute(name, "create extension pgq")
    server = Server(c, name)
    create_queue(server, "dst_q")
    conn = psycopg2.connect(server.dsn)
    try:
        pgq_ext.install(conn)
    finally:
        conn.close()
    return server


def _install_as(role: Role, server: Server) -> pgq_ext.InstallReport:
    conn = role.connect(server)
    try:
        return pgq_ext.install(conn)
    finally:
        conn.close()


def _source(c: ThrowawayCluster, consumer: str, n: int = 300) -> tuple[Server, int]:
    name = f"src_{uuid.uuid4().hex[:10]}"
    c.create_database(name)
    c.execute(name, "create extension pgq")
    source = Server(c, name)
    create_queue(source, "src_q")
    register(source, "src_q", consumer)
    produce(source, "src_q", simple_events(n))
    return source, tick(source, "src_q")


def _move(source: Server, target_dsn: str, consumer: str) -> Any:
    s, t = psycopg2.connect(source.dsn), psycopg2.connect(target_dsn)
    try:
        return QueueMover(s, t, MoverOptions(source_queue="src_q", target_queue="dst_q", consumer=consumer,
                                             chunk_size=64)).drain()
    finally:
        s.close()
        t.close()


def _grant(c: ThrowawayCluster, role: str, to: str) -> None:
    c.execute("postgres", sql.SQL("grant {} to {}").format(sql.Identifier(role), sql.Identifier(to)))


def _major(c: ThrowawayCluster) -> int:
    return int(c.execute("postgres", "select current_setting('server_version_num')::int")[0][0]) // 10000


@pytest.fixture(scope="module")
def first_owner(own: ThrowawayCluster) -> tuple[Role, Server]:
    """The estate's first database owner with CREATEROLE (and pgq_admin from a
    superuser): its install creates pgq_mover."""
    owner = _role(own, "owner", "createrole")
    target = _owned_database(own, owner)  # create extension pgq makes pgq_admin
    _grant(own, "pgq_admin", owner.name)
    report = _install_as(owner, target)
    assert report.role_created
    return owner, target


def test_a_database_owner_installs_and_the_documented_logins_move(
    own: ThrowawayCluster, first_owner: tuple[Role, Server]
) -> None:
    """The owner's objects are trusted by the logins it makes (`in role pgq_mover`: the
    chunk path) and by itself (pgq_admin: COPY); every event once, marks at the tick."""
    owner, target = first_owner
    login = Role(f"mover_{uuid.uuid4().hex[:8]}", "pw-" + secrets.token_urlsafe(10))
    _as(owner, target, sql.SQL("create role {} login password %s in role pgq_mover").format(
        sql.Identifier(login.name)), (login.password,))
    source, last = _source(own, "by_login")
    report = _move(source, login.dsn(target), "by_login")
    assert report.write_path == CHUNK_PATH and report.events == 300
    assert mark_of(target, "by_login") == last
    source2, last2 = _source(own, "by_owner", 200)
    report = _move(source2, owner.dsn(target), "by_owner")
    assert report.write_path == COPY_PATH and report.events == 200
    assert mark_of(target, "by_owner") == last2
    assert queue_events(target, "dst_q") == queue_events(source, "src_q") + queue_events(source2, "src_q")


def test_an_installer_without_pgq_admin_is_told_what_it_needs(own: ThrowawayCluster,
                                                              first_owner: tuple[Role, Server]) -> None:
    """pgq_ext's write functions run as their owner: without pgq_admin every batch would
    fail with "permission denied for function current_event_table"; install says so
    and leaves nothing behind."""
    owner = _role(own, "bare", "createrole")
    target = _owned_database(own, owner)
    with pytest.raises(PgqExtMissing) as info:
        _install_as(owner, target)
    text = str(info.value)
    assert f"grant pgq_admin to {owner.name}" in text and "SECURITY DEFINER" in text, text
    assert target.execute("select pg_catalog.to_regnamespace('pgq_ext')") == [(None,)]


def test_another_role_of_the_database_is_still_not_trusted(own: ThrowawayCluster,
                                                           first_owner: tuple[Role, Server]) -> None:
    """The owner is trusted, not whoever may create in the database: a pgq_ext made by a
    role with CREATE (and pgq_admin) is refused to the mover's logins."""
    owner = _role(own, "dbowner")
    target = _owned_database(own, owner)
    maker = _role(own, "maker")
    _grant(own, "pgq_admin", maker.name)
    own.execute("postgres", sql.SQL("grant create on database {} to {}").format(
        sql.Identifier(target.dbname), sql.Identifier(maker.name)))
    _install_as(maker, target)
    login = _role(own, "mover", in_role="pgq_mover")
    source, _ = _source(own, "x")
    with pytest.raises(PgqExtUntrusted) as info:
        _move(source, login.dsn(target), "x")
    assert repr(maker.name) in str(info.value) and "the database's owner" in str(info.value)
    assert not queue_events(target, "dst_q")


def test_pgq_mover_made_a_login_stops_the_mover(own: ThrowawayCluster, first_owner: tuple[Role, Server]) -> None:
    """On 15 any CREATEROLE role may alter pgq_mover (16+: only with ADMIN OPTION): the
    mover refuses to run while it can log in, whoever made it so."""
    target = _superuser_target(own)
    other = _role(own, "other", "createrole")
    pw = "pw-" + secrets.token_urlsafe(10)
    alter = sql.SQL("alter role pgq_mover login password %s")
    try:
        if _major(own) < 16:
            _as(other, target, alter, (pw,))  # PostgreSQL 15 lets it
        else:
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                _as(other, target, alter, (pw,))
            own.execute("postgres", alter, (pw,))  # a superuser's mistake, then
        source, _ = _source(own, "after_takeover")
        with pytest.raises(PgqExtUntrusted) as info:
            _move(source, target.dsn, "after_takeover")
        assert "'pgq_mover' may log in" in str(info.value) and "alter role pgq_mover nologin" in str(info.value)
        assert mark_of(target, "after_takeover") is None
    finally:
        own.execute("postgres", "alter role pgq_mover nologin password null")


def test_a_member_without_inheritance_is_told_the_fix(own: ThrowawayCluster, first_owner: tuple[Role, Server]) -> None:
    """A member of pgq_mover that does not inherit its rights has none of them: the
    error says how to let it inherit (the role attribute on 15, the grant on 16+)."""
    owner, _ = first_owner
    target = _superuser_target(own)
    if _major(own) < 16:
        login = _role(own, "noinh", "noinherit", in_role="pgq_mover")
        fix = f"alter role {login.name} inherit"
    else:
        login = _role(own, "noinh")
        _as(owner, target, sql.SQL("grant pgq_mover to {} with inherit false").format(sql.Identifier(login.name)))
        fix = f"grant pgq_mover to {login.name} with inherit true"
    source, _ = _source(own, "noinh")
    with pytest.raises(PgqError) as info:
        _move(source, login.dsn(target), "noinh")
    assert fix in str(info.value), str(info.value)
    assert not queue_events(target, "dst_q") and mark_of(target, "noinh") is None


def test_a_second_database_owner_learns_who_may_grant_pgq_mover(
    own: ThrowawayCluster, first_owner: tuple[Role, Server]
) -> None:
    """16+: only a superuser or a role with ADMIN OPTION (the first owner, whose install
    created it) may grant pgq_mover: install's report and the mover's error say who and
    how. 15: any CREATEROLE role may, so the second owner's login moves."""
    first, _ = first_owner
    owner = _role(own, "owner2", "createrole")
    target = _owned_database(own, owner)
    _grant(own, "pgq_admin", owner.name)
    report = _install_as(owner, target)
    login = _role(own, "mover2")
    grant = sql.SQL("grant pgq_mover to {}").format(sql.Identifier(login.name))
    source, last = _source(own, "second")
    if _major(own) < 16:
        assert report.notes == []
        _as(owner, target, grant)
        assert _move(source, login.dsn(target), "second").events == 300
        assert mark_of(target, "second") == last
        return
    assert len(report.notes) == 1, report.notes
    note = report.notes[0]
    assert f"role {owner.name!r} cannot grant pgq_mover" in note and repr(first.name) in note, note
    assert f"grant pgq_mover to {owner.name} with admin option" in note and note in report.summary()
    with pytest.raises(psycopg2.errors.InsufficientPrivilege):
        _as(owner, target, grant)
    with pytest.raises(PgqError) as info:
        _move(source, login.dsn(target), "second")
    text = str(info.value)
    assert f"a superuser or a role with ADMIN OPTION on it ({first.name})" in text, text
    assert f"grant pgq_mover to {login.name}" in text
