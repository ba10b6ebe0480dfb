"""PgQ's own SECURITY DEFINER functions set no search_path: the hardening docs/security.md
gives an admin closes that, and the mover still works on a hardened PgQ."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg2
from psycopg2 import sql

from tests.helpers import ROOT, Server, produce, queue_events, register, run_mover, simple_events, tick
from tests.support.cluster import ThrowawayCluster

# PgQ's consumer info joins its tables on integer ids: a look-alike integer "=" runs
# inside it, with the rights of PgQ's owner.
PLANT = """
create function public.evil_int4eq(a integer, b integer) returns boolean language plpgsql as $$
begin
    if exists (select 1 from pg_catalog.pg_roles where rolname = current_user and rolsuper) then
        execute pg_catalog.format('alter role %I superuser', {attacker});
    end if;
    return pg_catalog.int4eq(a, b);
end $$;
create operator public.= (leftarg = integer, rightarg = integer, function = public.evil_int4eq);
"""


def _hardening_sql() -> str:
    """The statement of docs/security.md, as a user would copy it."""
    text = (Path(ROOT) / "docs" / "security.md").read_text()
    start = text.index("select format('alter function %s set search_path")
    return text[start:text.index("\\gexec", start)].strip()


def _attack(cluster: ThrowawayCluster, db: Server, name: str, password: str) -> bool:
    """The attacker's own session calls PgQ with public first; True when it became superuser."""
    conn = psycopg2.connect(cluster.dsn(db.dbname, user=name, password=password))
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("set search_path = public, pg_catalog")
            cur.execute("select * from pgq.get_consumer_info()")
    finally:
        conn.close()
    return bool(db.execute("select rolsuper from pg_roles where rolname = %s", (name,))[0][0])


def test_hardening_pgq_closes_its_search_path_hole_and_the_mover_still_works(
    cluster: ThrowawayCluster, source: Server, make_db: Callable[..., Server]
) -> None:
    name, password = f"atk_{uuid.uuid4().hex[:10]}", "Zq" + secrets.token_hex(8)
    cluster.execute("postgres", sql.SQL("create role {} login password %s").format(sql.Identifier(name)),
                    (password,))
    source.execute(sql.SQL("grant create on schema public to {}").format(sql.Identifier(name)))
    register(source, "src_q", "mover")  # get_consumer_info compares names once a consumer exists
    conn = psycopg2.connect(cluster.dsn(source.dbname, user=name, password=password))
    try:
        with conn.cursor() as cur:
            cur.execute(PLANT.replace("{attacker}", sql.Literal(name).as_string(conn)))
        conn.commit()
    finally:
        conn.close()

    assert _attack(cluster, source, name, password), "the premise: unhardened PgQ runs the plant as its owner"
    source.execute(sql.SQL("alter role {} nosuperuser").format(sql.Identifier(name)))

    for statement, in source.execute(_hardening_sql().replace("%", "%%")):  # no parameters
        source.execute(statement)
    assert not _attack(cluster, source, name, password)

    target = make_db(queue="dst_q", ext=True)
    produce(source, "src_q", simple_events(20))
    tick(source, "src_q")
    assert run_mover(source, target).events == 20
    assert queue_events(target, "dst_q") == queue_events(source, "src_q")
