-- What the mover needs beyond the classic pgq_ext API. Installed with pgq_ext.sql,
-- or alone next to a classic pgq_ext that was installed as an extension. Like it, it
-- gives no rights: the write side (bind_source, unbind_source, insert_event_chunk,
-- kept_ids_claim/commit/release) is granted by install to the pgq_mover role only.

-- Which source a tracking key belongs to: a key fed from two sources would mix
-- their tick numbers and lose or double events.
create table if not exists pgq_ext.tracking_source (
    consumer_id       text        not null,
    subconsumer_id    text        not null default '',
    source_system_id  text        not null,
    source_database   text        not null,
    source_queue      text        not null,
    bound_at          timestamptz not null default pg_catalog.now(),
    primary key (consumer_id, subconsumer_id)
);

-- Who may write a tracking key, and the key's lock. A key belongs to the login that
-- first wrote it (session_user: SET ROLE cannot change it, and no setting can), or to
-- the role an admin assigns (assign_key); its owner, the owner's members and an admin
-- (a superuser, or a member of the role that installed pgq_ext) may move, clear, bind,
-- unbind or lock it and use its kept-id claim. owner_role NULL: a key install found
-- already in use (classic marks): writable as before, by whoever may call the write
-- side, until an admin assigns it. The row is also the key's lock: FOR UPDATE (or any
-- row lock, LOCK TABLE beyond ACCESS SHARE, a foreign key to it) needs a right on this
-- table beyond SELECT, which only its owner has (and superusers, pg_write_all_data);
-- PUBLIC may read it, which blocks nobody.
create table if not exists pgq_ext.tracking_key (
    consumer_id     text        not null,
    subconsumer_id  text        not null default '',
    owner_role      oid,
    created_at      timestamptz not null default pg_catalog.now(),
    primary key (consumer_id, subconsumer_id)
);
-- How many journal entries the key has had (mark_batch counts them, and cuts the key to
-- keep_rows once in a while by this count: the journal's ids are shared by every key).
alter table pgq_ext.tracking_key add column if not exists journal_rows bigint not null default 0;

-- The bind lock of a consumer name (one source consumer feeds one key): a row per
-- consumer name, locked FOR UPDATE while one of its keys is bound.
create table if not exists pgq_ext.tracking_consumer (
    consumer_id     text        primary key
);

-- Keys already in use when install runs (the classic consumer's marks, or those of an
-- installation before mover schema 5) are taken over without an owner.
insert into pgq_ext.tracking_key (consumer_id, subconsumer_id, owner_role)
select k.consumer_id, k.subconsumer_id, null
  from (select consumer_id, subconsumer_id from pgq_ext.completed_tick
        union select consumer_id, subconsumer_id from pgq_ext.completed_batch
        union select consumer_id, subconsumer_id from pgq_ext.partial_batch
        union select consumer_id, subconsumer_id from pgq_ext.completed_event
        union select consumer_id, subconsumer_id from pgq_ext.tracking_source) k
on conflict (consumer_id, subconsumer_id) do nothing;
do $kept$
begin
    -- kept_event_ids is made further down on a first install
    if pg_catalog.to_regclass('pgq_ext.kept_event_ids') is not null then
        insert into pgq_ext.tracking_key (consumer_id, subconsumer_id, owner_role)
        select k.consumer_id, k.subconsumer_id, null from pgq_ext.kept_event_ids k
        on conflict (consumer_id, subconsumer_id) do nothing;
    end if;
end
$kept$;

-- An admin of pgq_ext's keys: a superuser, or a member of the role that owns these
-- functions (the installing role). Decided on the login (session_user).
create or replace function pgq_ext._is_key_admin()
returns boolean language sql stable security definer
set search_path = pg_catalog, pg_temp as $$
    select coalesce((select r.rolsuper from pg_catalog.pg_roles r where r.rolname = session_user), false)
        or pg_catalog.pg_has_role(session_user, current_user, 'MEMBER');
$$;

-- May this login act for a key owned by a_owner (NULL: nobody, install took it over)?
create or replace function pgq_ext._may_write_key(a_owner oid)
returns boolean language sql stable security definer
set search_path = pg_catalog, pg_temp as $$
    select a_owner is null
        or pgq_ext._is_key_admin()
        or coalesce((select pg_catalog.pg_has_role(session_user, r.oid, 'MEMBER')
                       from pg_catalog.pg_roles r where r.oid = a_owner), false);
$$;

-- The owner of a key as text for messages (a dropped owner shows as its oid).
create or replace function pgq_ext._key_owner_name(a_owner oid)
returns text language sql stable security definer
set search_path = pg_catalog, pg_temp as $$
    select coalesce((select pg_catalog.quote_literal(r.rolname) from pg_catalog.pg_roles r where r.oid = a_owner),
                    'with oid ' || a_owner::text || ' (dropped)');
$$;

-- Refuses (insufficient_privilege) unless this login may write the key; a_what says
-- what it wanted to do. A key nobody wrote yet becomes this login's when a_create (a
-- key of a consumer name whose keys belong to another role is refused: they would
-- share its bind lock). Reads only: the refusal is decided before any lock.
create or replace function pgq_ext._require_key_writer(a_consumer text, a_subconsumer text, a_what text,
                                                       a_create boolean)
returns void language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
declare
    owner_oid oid;
    other record;
begin
    if a_consumer is null or a_subconsumer is null then
        raise exception 'tracking key consumer % subconsumer %: neither may be NULL',
                        pg_catalog.quote_nullable(a_consumer), pg_catalog.quote_nullable(a_subconsumer)
              using errcode = 'null_value_not_allowed';
    end if;
    select k.owner_role into owner_oid from pgq_ext.tracking_key k
     where k.consumer_id = a_consumer and k.subconsumer_id = a_subconsumer;
    if found then
        if pgq_ext._may_write_key(owner_oid) then
            return;
        end if;
        raise exception 'tracking key consumer % subconsumer % belongs to role %: role % may not % it',
                        pg_catalog.quote_literal(a_consumer), pg_catalog.quote_literal(a_subconsumer),
                        pgq_ext._key_owner_name(owner_oid), pg_catalog.quote_literal(session_user), a_what
              using errcode = 'insufficient_privilege',
                    hint = 'Use a consumer name of your own, or log in as (a member of) the key''s owner;'
                        || ' an admin may reassign the key: select pgq_ext.assign_key('
                        || pg_catalog.quote_literal(a_consumer) || ', ' || pg_catalog.quote_literal(a_subconsumer)
                        || ', <role>)';
    end if;
    select k.subconsumer_id, k.owner_role into other from pgq_ext.tracking_key k
     where k.consumer_id = a_consumer and not pgq_ext._may_write_key(k.owner_role)
     limit 1;
    if found then
        raise exception 'consumer name % belongs to role % (its tracking key with subconsumer %): role %'
                        ' may not % a key of it', pg_catalog.quote_literal(a_consumer),
                        pgq_ext._key_owner_name(other.owner_role), pg_catalog.quote_literal(other.subconsumer_id),
                        pg_catalog.quote_literal(session_user), a_what
              using errcode = 'insufficient_privilege',
                    hint = 'Choose a consumer name of your own; an admin may reassign the keys with'
                        || ' pgq_ext.assign_key';
    end if;
    if not a_create then
        return;
    end if;
    insert into pgq_ext.tracking_key (consumer_id, subconsumer_id, owner_role)
    values (a_consumer, a_subconsumer, (select r.oid from pg_catalog.pg_roles r where r.rolname = session_user))
    on conflict (consumer_id, subconsumer_id) do nothing;
    if not found then  -- made by another transaction meanwhile: decide on its row
        perform pgq_ext._require_key_writer(a_consumer, a_subconsumer, a_what, false);
    end if;
end;
$$;

-- Makes the key (this login's, when new) and its consumer's bind-lock row, so that
-- they exist committed before a batch waits for them: a waiter can then name the
-- session holding the lock. Refuses a key this login may not write. Returns the key's
-- owner, NULL for a key nobody owns (install took it over).
create or replace function pgq_ext.ensure_key(a_consumer text, a_subconsumer text)
returns text language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
declare
    owner_oid oid;
begin
    perform pgq_ext._require_key_writer(a_consumer, a_subconsumer, 'use', true);
    insert into pgq_ext.tracking_consumer (consumer_id) values (a_consumer) on conflict do nothing;
    select k.owner_role into owner_oid from pgq_ext.tracking_key k
     where k.consumer_id = a_consumer and k.subconsumer_id = a_subconsumer;
    return case when owner_oid is null then null else pg_catalog.pg_get_userbyid(owner_oid)::text end;
end;
$$;

-- The key's transaction lock (step 2 of the move protocol): the key's row FOR UPDATE,
-- after the refusal; the owner is checked again on the locked row (an admin may have
-- reassigned it meanwhile).
create or replace function pgq_ext.lock_key(a_consumer text, a_subconsumer text)
returns void language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
declare
    owner_oid oid;
begin
    perform pgq_ext._require_key_writer(a_consumer, a_subconsumer, 'lock', true);
    select k.owner_role into owner_oid from pgq_ext.tracking_key k
     where k.consumer_id = a_consumer and k.subconsumer_id = a_subconsumer
       for update;
    if not pgq_ext._may_write_key(owner_oid) then
        perform pgq_ext._require_key_writer(a_consumer, a_subconsumer, 'lock', false);
    end if;
end;
$$;

-- An admin gives the key (made when missing) to a role, whose members may then write
-- it; NULL: to nobody (writable by any caller of the write side, as a key install took
-- over). Returns the previous owner's name.
create or replace function pgq_ext.assign_key(a_consumer text, a_subconsumer text, a_role name)
returns text language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
declare
    new_owner oid;
    old_owner oid;
begin
    if not pgq_ext._is_key_admin() then
        raise exception 'role % may not assign tracking keys: a superuser or a member of role % may',
                        pg_catalog.quote_literal(session_user), pg_catalog.quote_literal(current_user)
              using errcode = 'insufficient_privilege';
    end if;
    if a_role is not null then
        select r.oid into new_owner from pg_catalog.pg_roles r where r.rolname = a_role;
        if not found then
            raise exception 'role % does not exist', pg_catalog.quote_literal(a_role)
                  using errcode = 'undefined_object';
        end if;
    end if;
    select k.owner_role into old_owner from pgq_ext.tracking_key k
     where k.consumer_id = a_consumer and k.subconsumer_id = a_subconsumer for update;
    if found then
        update pgq_ext.tracking_key set owner_role = new_owner
         where consumer_id = a_consumer and subconsumer_id = a_subconsumer;
    else
        insert into pgq_ext.tracking_key (consumer_id, subconsumer_id, owner_role)
        values (a_consumer, a_subconsumer, new_owner);
    end if;
    return case when old_owner is null then null else pgq_ext._key_owner_name(old_owner) end;
end;
$$;

-- Binds the key to the source on first use. Returns NULL when the key belongs to
-- this source, else the source it belongs to, as 'system/database/queue'.
create or replace function pgq_ext.bind_source(a_consumer text, a_subconsumer text,
                                    a_system_id text, a_database text, a_queue text)
returns text language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
declare
    cur record;
    other text;
begin
    perform pgq_ext._require_key_writer(a_consumer, a_subconsumer, 'bind', true);
    -- One source consumer feeds one key: two subconsumers of one consumer on one
    -- source queue would both be handed the same batches, under different locks. The
    -- consumer's row is the lock: only keys of the consumer name's owner get here.
    insert into pgq_ext.tracking_consumer (consumer_id) values (a_consumer) on conflict do nothing;
    perform 1 from pgq_ext.tracking_consumer c where c.consumer_id = a_consumer for update;
    select subconsumer_id into other from pgq_ext.tracking_source
     where consumer_id = a_consumer and subconsumer_id <> a_subconsumer
       and (source_system_id, source_database, source_queue) = (a_system_id, a_database, a_queue);
    if found then
        return a_system_id || '/' || a_database || '/' || a_queue
            || ' under subconsumer ' || quote_literal(other)
            || ' (one source consumer can feed only one tracking key)';
    end if;
    select source_system_id, source_database, source_queue into cur
      from pgq_ext.tracking_source
     where consumer_id = a_consumer and subconsumer_id = a_subconsumer;
    if not found then
        insert into pgq_ext.tracking_source
            (consumer_id, subconsumer_id, source_system_id, source_database, source_queue)
        values (a_consumer, a_subconsumer, a_system_id, a_database, a_queue);
        return null;
    end if;
    if (cur.source_system_id, cur.source_database, cur.source_queue)
       = (a_system_id, a_database, a_queue) then
        return null;
    end if;
    return cur.source_system_id || '/' || cur.source_database || '/' || cur.source_queue;
end;
$$;

create or replace function pgq_ext.unbind_source(a_consumer text, a_subconsumer text)
returns integer language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
declare
    n integer;
begin
    perform pgq_ext._require_key_writer(a_consumer, a_subconsumer, 'unbind', false);
    delete from pgq_ext.tracking_source
     where consumer_id = a_consumer and subconsumer_id = a_subconsumer;
    get diagnostics n = row_count;
    return n;
end;
$$;


-- Step 2 and 3 of the move protocol in one round trip: the key's transaction lock
-- (lock_key), its source binding, and its mark. other_source is not NULL when the key
-- belongs to another source (then last_tick is not read).
create or replace function pgq_ext.begin_batch(a_consumer text, a_subconsumer text,
                                               a_system_id text, a_database text, a_queue text,
                                               out other_source text, out last_tick bigint)
language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
begin
    perform pgq_ext.lock_key(a_consumer, a_subconsumer);
    other_source := pgq_ext.bind_source(a_consumer, a_subconsumer, a_system_id, a_database, a_queue);
    if other_source is null then
        last_tick := pgq_ext.get_last_tick(a_consumer, a_subconsumer);
    end if;
end;
$$;

-- A relation of a queue, resolved from the text pgq.queue holds (which pgq_admin may
-- change) to a relation of PgQ's own: in schema pgq, owned by the owner of pgq.queue,
-- of the right kind. a_kind 'data': the queue's parent event table; 'seq': its event id
-- sequence; 'current': the current event table (inherits 'data'), which pgq_ext writes,
-- so it must carry no trigger or rule either (their code would run with this owner's
-- rights). Refused (insufficient_privilege) otherwise, before anything is read from it.
create or replace function pgq_ext._queue_relation(a_queue text, a_kind text)
returns pg_catalog.regclass language plpgsql stable security definer
set search_path = pg_catalog, pg_temp as $$
declare
    relname_text text;
    rel pg_catalog.regclass;
    parent pg_catalog.regclass;
    c record;
    pgq_owner oid := (select t.relowner from pg_catalog.pg_class t where t.oid = 'pgq.queue'::pg_catalog.regclass);
    why text;
begin
    select case a_kind when 'seq' then q.queue_event_seq else q.queue_data_pfx end into relname_text
      from pgq.queue q where q.queue_name = a_queue;
    if not found then
        raise exception 'target queue % does not exist', pg_catalog.quote_literal(a_queue)
              using errcode = 'undefined_object';
    end if;
    if a_kind = 'current' then
        parent := pgq_ext._queue_relation(a_queue, 'data');
        relname_text := pgq.current_event_table(a_queue);
    end if;
    rel := pg_catalog.to_regclass(relname_text);
    select x.relnamespace, x.relowner, x.relkind, x.relhastriggers, x.relhasrules into c
      from pg_catalog.pg_class x where x.oid = rel;
    if not found then
        why := 'which does not exist';
    elsif c.relnamespace <> 'pgq'::pg_catalog.regnamespace then
        why := 'which is not in schema pgq';
    elsif c.relowner is distinct from pgq_owner then
        why := pg_catalog.format('which is owned by %L, not by %L, the owner of pgq.queue',
                                 pg_catalog.pg_get_userbyid(c.relowner), pg_catalog.pg_get_userbyid(pgq_owner));
    elsif c.relkind <> (case a_kind when 'seq' then 'S' else 'r' end) then
        why := pg_catalog.format('which is of kind %L, not a %s', c.relkind,
                                 case a_kind when 'seq' then 'sequence' else 'table' end);
    elsif a_kind = 'current' and not exists (select 1 from pg_catalog.pg_inherits i
                                              where i.inhrelid = rel and i.inhparent = parent) then
        why := pg_catalog.format('which does not inherit %s', parent);
    elsif a_kind = 'current' and exists (select 1 from pg_catalog.pg_trigger t
                                          where t.tgrelid = rel and not t.tgisinternal) then
        why := 'which carries triggers (' || (select pg_catalog.string_agg(pg_catalog.quote_ident(t.tgname), ', ')
                                               from pg_catalog.pg_trigger t
                                              where t.tgrelid = rel and not t.tgisinternal) || ')';
    elsif a_kind = 'current' and c.relhasrules then
        why := 'which carries rules';
    end if;
    if why is not null then
        raise exception 'target queue %: pgq.queue names % as its % table, %: pgq_ext reads and writes only'
                        ' PgQ''s own relations, refused', pg_catalog.quote_literal(a_queue),
                        pg_catalog.quote_literal(relname_text),
                        case a_kind when 'seq' then 'event id sequence' when 'data' then 'event' else 'current event' end,
                        why
              using errcode = 'insufficient_privilege',
                    hint = 'An admin should check pgq.queue and the queue''s event tables (owner, triggers, rules):'
                        || ' PgQ makes them owned by the owner of pgq.queue, without triggers.';
    end if;
    return rel;
end;
$$;

-- Writes a chunk of events into the queue's current event table with their
-- original times, for movers whose role may not write event tables (PgQ keeps that,
-- and setting ev_time or ev_id, for pgq_admin). Owned by the installing admin and
-- granted to pgq_mover only: every producer holds pgq_writer, and none of them may
-- backdate events or choose ids. Explicit ids (keep_event_id) only from the key that
-- holds the queue's kept-id claim in this very transaction (kept_ids_claim). ev_txid
-- is left to its default so the rows belong to the target's next batch. Returns the
-- number of rows written.
create or replace function pgq_ext.insert_event_chunk(
    a_queue text, a_type text[], a_data text[], a_extra1 text[], a_extra2 text[],
    a_extra3 text[], a_extra4 text[], a_time timestamptz[], a_id bigint[] default null)
returns bigint language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
declare
    tbl pg_catalog.regclass;
    n bigint;
begin
    if a_id is not null then
        perform pgq_ext._require_kept_ids_claim(a_queue);
    end if;
    -- The txid first: PgQ's rotation decides by txid which table a row belongs to.
    perform pg_catalog.txid_current();
    tbl := pgq_ext._queue_relation(a_queue, 'current');
    if a_id is null then
        execute pg_catalog.format('insert into %s (ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3,'
                       ' ev_extra4, ev_time) select * from unnest($1, $2, $3, $4, $5, $6, $7)',
                       tbl)
          using a_type, a_data, a_extra1, a_extra2, a_extra3, a_extra4, a_time;
    else
        execute pg_catalog.format('insert into %s (ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3,'
                       ' ev_extra4, ev_time, ev_id) select * from unnest($1, $2, $3, $4, $5,'
                       ' $6, $7, $8)', tbl)
          using a_type, a_data, a_extra1, a_extra2, a_extra3, a_extra4, a_time, a_id;
    end if;
    get diagnostics n = row_count;
    return n;
end;
$$;

-- The fast path for movers without pgq_admin: the batch is streamed by COPY into this
-- session's temporary table pg_temp.pgq_mover_rows, then moved into the event table by
-- one INSERT ... SELECT (insert_staged_events). The table is made here, so it belongs
-- to this function's owner: the caller may add and read rows (granted to PUBLIC: no
-- other session can see a temporary table) but cannot give it triggers, indexes,
-- constraints, row security or statistics whose code would run with the owner's
-- rights. Returns the last ord handed out so far (rows of an earlier batch in this
-- transaction are at or below it), or NULL when the owner may not create temporary
-- tables (then the mover falls back to insert_event_chunk).
create or replace function pgq_ext.stage_events()
returns bigint language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
declare
    rel oid := pg_catalog.to_regclass('pg_temp.pgq_mover_rows');
begin
    if rel is null then
        if not pg_catalog.has_database_privilege(pg_catalog.current_database(), 'TEMPORARY') then
            return null;
        end if;
        -- No index: maintaining one costs more than sorting the batch once (measured).
        create temporary table pgq_mover_rows (
            ord bigint generated always as identity,
            ev_type text, ev_data text, ev_extra1 text, ev_extra2 text, ev_extra3 text,
            ev_extra4 text, ev_time timestamptz, ev_id bigint
        ) on commit delete rows;
        grant insert, select on pg_temp.pgq_mover_rows to pgq_mover;
        return 0;
    end if;
    perform pgq_ext._require_own_staging(rel);
    return coalesce(pg_catalog.pg_sequence_last_value(pg_catalog.pg_get_serial_sequence('pg_temp.pgq_mover_rows', 'ord')), 0);
end;
$$;

-- The staging table must be the one stage_events made: a temporary table of this
-- session owned by the function owner (a table the caller made could run the caller's
-- code with the owner's rights while it is read).
create or replace function pgq_ext._require_own_staging(a_rel oid)
returns void language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
begin
    if not exists (select 1 from pg_catalog.pg_class c
                    where c.oid = a_rel and c.relkind = 'r' and c.relpersistence = 't'
                      and c.relnamespace = pg_catalog.pg_my_temp_schema()
                      and c.relowner = (select r.oid from pg_catalog.pg_roles r where r.rolname = current_user)) then
        raise exception 'pg_temp.pgq_mover_rows was not made by pgq_ext.stage_events: drop it (it is'
                        ' this session''s own temporary table) and retry'
              using errcode = 'insufficient_privilege';
    end if;
end;
$$;

-- Explicit event ids only under the queue's kept-id claim taken in this transaction:
-- a row of kept_ids_claims stamped with this transaction's txid, which only
-- kept_ids_claim writes and no other transaction can have.
create or replace function pgq_ext._require_kept_ids_claim(a_queue text)
returns void language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
begin
    if not exists (select 1 from pgq_ext.kept_ids_claims
                    where target_queue = a_queue and claim_txid = pg_catalog.txid_current()) then
        raise exception 'explicit event ids into queue % need the queue''s kept-id claim in this'
                        ' transaction (pgq_ext.kept_ids_claim)', a_queue
              using errcode = 'insufficient_privilege';
    end if;
end;
$$;

-- Moves the staged rows after a_after_ord into the queue's current event table, in
-- staging order, with their times (and ids, under this transaction's kept-id claim).
create or replace function pgq_ext.insert_staged_events(a_queue text, a_after_ord bigint, a_with_ids boolean)
returns bigint language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
declare
    rel oid := pg_catalog.to_regclass('pg_temp.pgq_mover_rows');
    cols text := 'ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4, ev_time';
    n bigint;
begin
    if rel is null then
        raise exception 'insert_staged_events: no staging table: call pgq_ext.stage_events() first';
    end if;
    perform pgq_ext._require_own_staging(rel);
    if a_with_ids then
        perform pgq_ext._require_kept_ids_claim(a_queue);
        cols := cols || ', ev_id';
    end if;
    -- The txid first: PgQ's rotation decides by txid which table a row belongs to.
    perform pg_catalog.txid_current();
    execute pg_catalog.format('insert into %s (%s) select %s from only pg_temp.pgq_mover_rows'
                   ' where ord > $1 order by ord',
                   pgq_ext._queue_relation(a_queue, 'current'), cols, cols)
      using a_after_ord;
    get diagnostics n = row_count;
    return n;
end;
$$;

-- Kept event ids (keep_event_id): the target events carry the source's ev_id. PgQ
-- enforces no uniqueness, so such a queue must have exactly one writer: one tracking
-- key, and no local producer. This table names that key per target queue and the
-- value it left the queue's event-id sequence at; any other id allocation in the
-- queue moves the sequence away from it and the next batch is refused.
create table if not exists pgq_ext.kept_event_ids (
    target_queue      text        primary key,
    consumer_id       text        not null,
    subconsumer_id    text        not null default '',
    seq_high          bigint      not null,
    updated_at        timestamptz not null default pg_catalog.now()
);

-- How many ids the queue's event sequence has handed out (last_value, or one less while
-- is_called is false: a fresh sequence's first nextval must show too). NULL: no queue.
create or replace function pgq_ext.kept_ids_seq_position(a_queue text)
returns bigint language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
declare
    seq_name text;
    pos bigint;
begin
    perform 1 from pgq.queue where queue_name = a_queue;
    if not found then
        return null;
    end if;
    seq_name := pgq_ext._queue_relation(a_queue, 'seq');
    execute pg_catalog.format('select case when is_called then last_value else last_value - 1 end from %s',
                   seq_name)
       into pos;
    return pos;
end;
$$;

-- Why the key may not write the queue with kept ids now, or NULL when it may. Read-only.
create or replace function pgq_ext.kept_ids_refusal(a_consumer text, a_subconsumer text, a_queue text)
returns text language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
declare
    q record;
    owner record;
    seq_now bigint;
    has_events boolean;
begin
    select queue_data_pfx into q from pgq.queue where queue_name = a_queue;
    if not found then
        return pg_catalog.format('target queue %L does not exist', a_queue);
    end if;
    seq_now := pgq_ext.kept_ids_seq_position(a_queue);
    select consumer_id, subconsumer_id, seq_high into owner
      from pgq_ext.kept_event_ids where target_queue = a_queue;
    if found then
        if (owner.consumer_id, owner.subconsumer_id) <> (a_consumer, a_subconsumer) then
            return pg_catalog.format('target queue %L already receives kept event ids from tracking key'
                          ' consumer %L subconsumer %L: two sources would collide',
                          a_queue, owner.consumer_id, owner.subconsumer_id);
        end if;
        if seq_now <> owner.seq_high then
            return pg_catalog.format('the event id sequence of target queue %L moved from %s to %s since this'
                          ' key last wrote: something else allocates ids there (a local producer,'
                          ' another mover without kept ids, or pgq.force_tick on the target)',
                          a_queue, owner.seq_high, seq_now);
        end if;
        return null;
    end if;
    execute pg_catalog.format('select exists (select 1 from %s)', pgq_ext._queue_relation(a_queue, 'data'))
       into has_events;
    if has_events then
        return pg_catalog.format('target queue %L already holds events not written with kept ids by this key:'
                      ' their ids could collide with the source''s', a_queue);
    end if;
    return null;
end;
$$;

-- The open kept-id claim of each target queue: which key claimed it, in which
-- transaction, and where the queue's id sequence stood then. A row is proof for
-- insert_event_chunk and kept_ids_commit that the claim was taken in their own
-- transaction: only kept_ids_claim writes it, and no other transaction has that txid.
create table if not exists pgq_ext.kept_ids_claims (
    target_queue      text    primary key,
    consumer_id       text    not null,
    subconsumer_id    text    not null,
    claim_txid        bigint  not null,
    seq_at_claim      bigint  not null
);

-- One row per target queue that kept ids were claimed for: its row, locked FOR UPDATE,
-- serializes the kept-id writers of the queue (an advisory lock anyone could hold).
create table if not exists pgq_ext.kept_ids_queue (
    target_queue      text    primary key
);

-- Start of a kept-id batch, in the mover's target transaction. A refusal is decided
-- before any lock is taken; otherwise it serializes kept-id writers of the queue (its
-- row in kept_ids_queue),
-- blocks other inserts into its current event table until commit (an insert already
-- running is waited for, and shows in the sequence), answers the refusal once more
-- (the state may have changed during the wait) and records the claim.
create or replace function pgq_ext.kept_ids_claim(a_consumer text, a_subconsumer text, a_queue text)
returns text language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
declare
    refusal text;
begin
    perform pgq_ext._require_key_writer(a_consumer, a_subconsumer, 'claim kept event ids with', false);
    refusal := pgq_ext.kept_ids_refusal(a_consumer, a_subconsumer, a_queue);
    if refusal is not null then
        return refusal;
    end if;
    -- the queue's row in kept_ids_queue: a lock no login without pgq_mover can take
    insert into pgq_ext.kept_ids_queue (target_queue) values (a_queue) on conflict do nothing;
    perform 1 from pgq_ext.kept_ids_queue k where k.target_queue = a_queue for update;
    execute pg_catalog.format('lock table %s in share row exclusive mode',
                   pgq_ext._queue_relation(a_queue, 'current'));
    refusal := pgq_ext.kept_ids_refusal(a_consumer, a_subconsumer, a_queue);
    if refusal is null then
        insert into pgq_ext.kept_ids_claims as c
               (target_queue, consumer_id, subconsumer_id, claim_txid, seq_at_claim)
        values (a_queue, a_consumer, a_subconsumer, pg_catalog.txid_current(),
                pgq_ext.kept_ids_seq_position(a_queue))
        on conflict (target_queue) do update
           set consumer_id = excluded.consumer_id, subconsumer_id = excluded.subconsumer_id,
               claim_txid = excluded.claim_txid, seq_at_claim = excluded.seq_at_claim;
    end if;
    return refusal;
end;
$$;

-- End of a kept-id batch, same transaction, after its events are written: checks that
-- no id was allocated in between, moves the sequence past a_max_id (never back) so
-- later inserts cannot collide and the ticker sees the new events, and records the
-- key's claim. Returns the sequence's new value. Raises when the sequence moved, or
-- when this transaction holds no claim of this key on the queue.
create or replace function pgq_ext.kept_ids_commit(a_consumer text, a_subconsumer text, a_queue text,
                                                   a_max_id bigint)
returns bigint language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
declare
    claimed bigint;
    seq_now bigint;
    written bigint;
    seq_max bigint;
begin
    perform pgq_ext._require_key_writer(a_consumer, a_subconsumer, 'commit kept event ids with', false);
    select seq_at_claim into claimed from pgq_ext.kept_ids_claims
     where target_queue = a_queue and consumer_id = a_consumer and subconsumer_id = a_subconsumer
       and claim_txid = pg_catalog.txid_current();
    if not found then
        raise exception 'kept_ids_commit(%) without kept_ids_claim of this key in this transaction', a_queue
              using errcode = 'insufficient_privilege';
    end if;
    seq_now := pgq_ext.kept_ids_seq_position(a_queue);
    if seq_now <> claimed then
        raise exception 'the event id sequence of target queue % moved from % to % during the batch:'
                        ' something else allocates ids there (a local producer, or pgq.force_tick'
                        ' on the target)', a_queue, claimed, seq_now;
    end if;
    -- The sequence moves only as far as ids this transaction really wrote into the queue
    -- (under this claim nobody else writes it), and never to where fewer than 2^32 ids
    -- would be left: a sequence at its maximum makes every later insert_event fail.
    execute pg_catalog.format('select pg_catalog.max(ev_id) from %s where ev_txid = pg_catalog.txid_current()',
                              pgq_ext._queue_relation(a_queue, 'data'))
       into written;
    if a_max_id > coalesce(written, seq_now) then
        raise exception 'kept_ids_commit(%, %, %, %): % is beyond the largest event id this transaction wrote'
                        ' into target queue % (%): the sequence moves only past ids really written',
                        pg_catalog.quote_literal(a_consumer), pg_catalog.quote_literal(a_subconsumer),
                        pg_catalog.quote_literal(a_queue), a_max_id, a_max_id, pg_catalog.quote_literal(a_queue),
                        coalesce(written::text, 'none')
              using errcode = 'insufficient_privilege';
    end if;
    select s.seqmax into seq_max from pg_catalog.pg_sequence s
     where s.seqrelid = pgq_ext._queue_relation(a_queue, 'seq');
    if a_max_id > seq_max - 4294967296 then
        raise exception 'kept_ids_commit: event id % written into target queue % leaves its id sequence'
                        ' fewer than 2^32 ids (maximum %): refused, later inserts into the queue would fail',
                        a_max_id, pg_catalog.quote_literal(a_queue), seq_max
              using errcode = 'insufficient_privilege',
                    hint = 'Move without keep_event_id: the source''s ids are too close to the end of the range';
    end if;
    -- plain setval (is_called true): pgq.seq_setval leaves a fresh sequence's first id free
    seq_now := greatest(a_max_id, seq_now);
    perform pg_catalog.setval(pgq_ext._queue_relation(a_queue, 'seq'), seq_now);
    insert into pgq_ext.kept_event_ids as k (target_queue, consumer_id, subconsumer_id, seq_high)
    values (a_queue, a_consumer, a_subconsumer, seq_now)
    on conflict (target_queue) do update
       set seq_high = excluded.seq_high, updated_at = pg_catalog.now()
     where k.consumer_id = excluded.consumer_id and k.subconsumer_id = excluded.subconsumer_id;
    if not found then
        raise exception 'target queue % receives kept event ids from another tracking key', a_queue;
    end if;
    update pgq_ext.kept_ids_claims set seq_at_claim = seq_now where target_queue = a_queue;
    return seq_now;
end;
$$;

-- Forgets which key writes kept ids into the queue (after emptying or recreating it).
-- Only the key's owner (or an admin) may: another team could otherwise free the queue
-- for its own kept ids.
create or replace function pgq_ext.kept_ids_release(a_queue text)
returns integer language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
declare
    k record;
    n integer;
begin
    for k in select consumer_id, subconsumer_id from pgq_ext.kept_event_ids where target_queue = a_queue
             union select consumer_id, subconsumer_id from pgq_ext.kept_ids_claims where target_queue = a_queue
    loop
        perform pgq_ext._require_key_writer(k.consumer_id, k.subconsumer_id,
                                            'release the kept event ids of queue ' || pg_catalog.quote_literal(a_queue)
                                            || ' held by', false);
    end loop;
    delete from pgq_ext.kept_ids_claims where target_queue = a_queue;
    delete from pgq_ext.kept_event_ids where target_queue = a_queue;
    get diagnostics n = row_count;
    return n;
end;
$$;

-- The move journal: one row per batch a mover applied, written by mark_batch in the
-- batch's own target transaction together with its mark (a batch's row exists exactly
-- when its mark moved). Says what moved (tick range, events, left out by table_filter,
-- dead-lettered), when (the transaction's time), by which login, and who ran it: the
-- Airflow task instance (dag_id, run_id, task_id, map_index, try_number) for the
-- operator, the job name for the CLI, and the host and pid of the process. "who" is
-- what the caller says (a writer of the key could say anything about its own key);
-- login_role is session_user, which no caller can choose. Readable by PUBLIC like the
-- marks; written only through mark_batch (pgq_mover), pruned as move_journal_retention says.
create table if not exists pgq_ext.move_journal (
    journal_id      bigint      generated always as identity primary key,
    consumer_id     text        not null,
    subconsumer_id  text        not null default '',
    batch_id        bigint      not null,
    prev_tick_id    bigint,
    cur_tick_id     bigint      not null,
    events          bigint      not null,
    filtered        bigint      not null default 0,
    dead_lettered   bigint      not null default 0,
    applied_at      timestamptz not null default pg_catalog.now(),
    login_role      text        not null,
    dag_id          text,
    run_id          text,
    task_id         text,
    map_index       integer,
    try_number      integer,
    job             text,
    host            text,
    pid             integer
);
-- a key's entries by time: the reads of a key, and the retention's range deletes
create index if not exists move_journal_key_time
    on pgq_ext.move_journal (consumer_id, subconsumer_id, applied_at);
-- the entries of one Airflow run (the operator's report across its attempts)
create index if not exists move_journal_run
    on pgq_ext.move_journal (dag_id, run_id, task_id, map_index) where dag_id is not null;

-- How long the journal keeps a key's entries: younger than keep_for, and at most
-- keep_rows per key (NULL: no bound of that kind). One row; an admin changes it with
-- set_journal_retention.
create table if not exists pgq_ext.move_journal_retention (
    only_row    boolean     primary key default true check (only_row),
    keep_for    interval    default '30 days',
    keep_rows   integer     default 100000 check (keep_rows > 0)
);
insert into pgq_ext.move_journal_retention (only_row) values (true) on conflict do nothing;

-- Step 5 of the move protocol: the key's mark := a_cur_tick (refused for a key this
-- login may not write, as set_last_tick refuses it) and the batch's journal row, in the caller's
-- transaction (the mover sends the COMMIT in the same round trip). Then the key's
-- entries older than the retention's keep_for go (a range of the key's index), and,
-- once in greatest(32, keep_rows / 100) of the key's rows (its own count, in
-- tracking_key), those beyond its keep_rows newest: that cut walks keep_rows index
-- entries, so done that seldom it costs a batch about as much as 100 entries (measured:
-- benchmarks/bench_journal.py), and a key holds fewer than keep_rows + greatest(32,
-- keep_rows / 100) entries. Returns the row's journal_id.
create or replace function pgq_ext.mark_batch(a_consumer text, a_subconsumer text, a_batch_id bigint,
                                              a_prev_tick bigint, a_cur_tick bigint, a_events bigint,
                                              a_filtered bigint, a_dead_lettered bigint, a_who jsonb)
returns bigint language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
declare
    id bigint;
    n bigint;
    keep record;
    cutoff timestamptz;
begin
    if a_cur_tick is null or a_batch_id is null or a_events is null then
        raise exception 'mark_batch(%, %): batch id, tick and event count must not be NULL',
                        pg_catalog.quote_nullable(a_consumer), pg_catalog.quote_nullable(a_subconsumer)
              using errcode = 'null_value_not_allowed';
    end if;
    -- the mark as set_last_tick writes it, checked here: next to a classic pgq_ext made
    -- with CREATE EXTENSION, set_last_tick is the extension's, which checks nothing
    perform pgq_ext._require_key_writer(a_consumer, a_subconsumer, 'set the mark of', true);
    insert into pgq_ext.completed_tick (consumer_id, subconsumer_id, last_tick_id)
    values (a_consumer, a_subconsumer, a_cur_tick)
    on conflict (consumer_id, subconsumer_id) do update set last_tick_id = excluded.last_tick_id;
    insert into pgq_ext.move_journal
           (consumer_id, subconsumer_id, batch_id, prev_tick_id, cur_tick_id, events, filtered, dead_lettered,
            login_role, dag_id, run_id, task_id, map_index, try_number, job, host, pid)
    values (a_consumer, a_subconsumer, a_batch_id, a_prev_tick, a_cur_tick, a_events,
            coalesce(a_filtered, 0), coalesce(a_dead_lettered, 0), session_user::text,
            pg_catalog.left(a_who ->> 'dag_id', 250), pg_catalog.left(a_who ->> 'run_id', 250),
            pg_catalog.left(a_who ->> 'task_id', 250), (a_who ->> 'map_index')::integer,
            (a_who ->> 'try_number')::integer, pg_catalog.left(a_who ->> 'job', 250),
            pg_catalog.left(a_who ->> 'host', 250), (a_who ->> 'pid')::integer)
    returning journal_id into id;
    select r.keep_for, r.keep_rows into keep from pgq_ext.move_journal_retention r;
    if keep.keep_for is not null then
        delete from pgq_ext.move_journal j
         where j.consumer_id = a_consumer and j.subconsumer_id = a_subconsumer
           and j.applied_at < pg_catalog.now() - keep.keep_for;
    end if;
    -- the key's row is locked by this transaction already (begin_batch): no new wait
    update pgq_ext.tracking_key k set journal_rows = k.journal_rows + 1
     where k.consumer_id = a_consumer and k.subconsumer_id = a_subconsumer
    returning k.journal_rows into n;
    if keep.keep_rows is not null and n % greatest(32, keep.keep_rows / 100) = 0 then
        select j.applied_at into cutoff from pgq_ext.move_journal j
         where j.consumer_id = a_consumer and j.subconsumer_id = a_subconsumer
         order by j.applied_at desc, j.journal_id desc offset keep.keep_rows limit 1;
        if cutoff is not null then
            delete from pgq_ext.move_journal j
             where j.consumer_id = a_consumer and j.subconsumer_id = a_subconsumer
               and j.applied_at <= cutoff and j.journal_id <> id;
        end if;
    end if;
    return id;
end;
$$;

-- An admin sets how long the journal keeps entries (NULL: no bound of that kind).
-- Returns the setting as it was, as text.
create or replace function pgq_ext.set_journal_retention(a_keep_for interval, a_keep_rows integer)
returns text language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
declare
    old record;
begin
    if not pgq_ext._is_key_admin() then
        raise exception 'role % may not change the move journal''s retention: a superuser or a member of role %'
                        ' may', pg_catalog.quote_literal(session_user), pg_catalog.quote_literal(current_user)
              using errcode = 'insufficient_privilege';
    end if;
    if a_keep_for is not null and a_keep_for <= interval '0' then
        raise exception 'keep_for must be above zero or NULL, got %', a_keep_for
              using errcode = 'invalid_parameter_value';
    end if;
    select r.keep_for, r.keep_rows into old from pgq_ext.move_journal_retention r for update;
    update pgq_ext.move_journal_retention set keep_for = a_keep_for, keep_rows = a_keep_rows;
    return pg_catalog.format('keep_for %s, keep_rows %s', coalesce(old.keep_for::text, 'NULL'),
                             coalesce(old.keep_rows::text, 'NULL'));
end;
$$;

-- Dead letters (invalid_events = dead_letter): the events of a batch that the target
-- refused (an encoding error, 22021 / 22P05, or another refusal of a row's content),
-- written here in the same transaction as the rest of the batch and its mark. Every
-- text field is kept as the source stored it, byte for byte (bytea), with the source
-- database's encoding, so that nothing is lost or re-encoded on the way; replay_dead_letters
-- puts them into the target queue once the target (or the transformation) can take them.
-- It holds event payloads: readable directly by its owner (admins) only, never PUBLIC nor
-- pgq_mover (a target shared by teams would show one team's payloads to the other); a
-- writer of the key reads its own through list_dead_letters, writes only through the
-- functions below.
create table if not exists pgq_ext.dead_letter (
    dl_id             bigint      generated always as identity primary key,
    consumer_id       text        not null,
    subconsumer_id    text        not null default '',
    source_queue      text        not null,
    target_queue      text        not null,
    prev_tick_id      bigint      not null,
    cur_tick_id       bigint      not null,
    ev_id             bigint      not null,
    ev_time           timestamptz not null,
    ev_type           bytea,
    ev_data           bytea,
    ev_extra1         bytea,
    ev_extra2         bytea,
    ev_extra3         bytea,
    ev_extra4         bytea,
    source_encoding   text        not null,
    error_sqlstate    text        not null,
    error_message     text        not null,
    dead_lettered_at  timestamptz not null default pg_catalog.now(),
    replayed_at       timestamptz,
    replayed_by       text
);
create index if not exists dead_letter_key_idx
    on pgq_ext.dead_letter (consumer_id, subconsumer_id, dl_id);

-- Refuses (insufficient_privilege) unless the key exists and this login may write it
-- (a_what: what it wanted to do); with a_locked, also unless this transaction holds the
-- key's row lock (lock_key, begin_batch): the row's xmax (or, once this transaction
-- updated it, its xmin) is this transaction's xid, which no other transaction can make it. Dead letters are written only under a key someone
-- owns, in the batch that refused them: none planted under a key another team makes later.
create or replace function pgq_ext._require_held_key(a_consumer text, a_subconsumer text, a_what text,
                                                     a_locked boolean)
returns void language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
declare
    k record;
begin
    select t.owner_role, t.xmax::text as locker, t.xmin::text as writer into k from pgq_ext.tracking_key t
     where t.consumer_id = a_consumer and t.subconsumer_id = a_subconsumer;
    if not found then
        raise exception 'tracking key consumer % subconsumer % does not exist: role % may not % it',
                        pg_catalog.quote_nullable(a_consumer), pg_catalog.quote_nullable(a_subconsumer),
                        pg_catalog.quote_literal(session_user), a_what
              using errcode = 'insufficient_privilege',
                    hint = 'A mover makes its key (pgq_ext.ensure_key) before its first batch';
    end if;
    if not pgq_ext._may_write_key(k.owner_role) then
        perform pgq_ext._require_key_writer(a_consumer, a_subconsumer, a_what, false);
    end if;
    -- (xmin too: a row version this transaction wrote is held by it; PostgreSQL keeps the
    -- locker's xid in xmax across such an update, tested, so this is only a second proof)
    if a_locked and pg_catalog.txid_current() % 4294967296 not in (k.locker::bigint, k.writer::bigint) then
        raise exception 'role % may not % tracking key consumer % subconsumer % outside its batch:'
                        ' this transaction does not hold the key''s lock (pgq_ext.begin_batch)',
                        pg_catalog.quote_literal(session_user), a_what, pg_catalog.quote_literal(a_consumer),
                        pg_catalog.quote_literal(a_subconsumer)
              using errcode = 'insufficient_privilege';
    end if;
end;
$$;

-- Writes the refused events of a batch of the key (arrays of one element per event),
-- in the mover's target transaction: they commit with the batch's mark or not at all.
-- Only a writer of an existing key may, in a transaction holding the key's lock.
-- Returns the number of rows written.
create or replace function pgq_ext.dead_letter_events(
    a_consumer text, a_subconsumer text, a_source_queue text, a_target_queue text,
    a_prev_tick bigint, a_cur_tick bigint, a_source_encoding text,
    a_id bigint[], a_time timestamptz[], a_type bytea[], a_data bytea[], a_extra1 bytea[],
    a_extra2 bytea[], a_extra3 bytea[], a_extra4 bytea[], a_sqlstate text[], a_error text[])
returns bigint language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
declare
    n bigint;
begin
    perform pgq_ext._require_held_key(a_consumer, a_subconsumer, 'dead-letter events of', true);
    if a_source_queue is null or a_target_queue is null or a_prev_tick is null or a_cur_tick is null
       or a_source_encoding is null then
        raise exception 'dead_letter_events: queues, ticks and encoding must not be NULL'
              using errcode = 'null_value_not_allowed';
    end if;
    insert into pgq_ext.dead_letter (consumer_id, subconsumer_id, source_queue, target_queue, prev_tick_id,
                                     cur_tick_id, ev_id, ev_time, ev_type, ev_data, ev_extra1, ev_extra2,
                                     ev_extra3, ev_extra4, source_encoding, error_sqlstate, error_message)
    select a_consumer, a_subconsumer, a_source_queue, a_target_queue, a_prev_tick, a_cur_tick,
           u.id, u.tm, u.ty, u.da, u.e1, u.e2, u.e3, u.e4, a_source_encoding, u.st, u.er
      -- unnest(a, b, ...) is unqualifiable syntax for this ROWS FROM of one-array unnests
      from rows from (pg_catalog.unnest(a_id), pg_catalog.unnest(a_time), pg_catalog.unnest(a_type),
                      pg_catalog.unnest(a_data), pg_catalog.unnest(a_extra1), pg_catalog.unnest(a_extra2),
                      pg_catalog.unnest(a_extra3), pg_catalog.unnest(a_extra4), pg_catalog.unnest(a_sqlstate),
                      pg_catalog.unnest(a_error)) as u (id, tm, ty, da, e1, e2, e3, e4, st, er)
     order by u.id;
    get diagnostics n = row_count;
    return n;
end;
$$;

-- The key's dead letters (those not replayed yet unless a_include_replayed), in dl_id
-- order: for a writer of the key (its owner's members) or an admin only. pgq_mover may
-- not read the table itself: on a target shared by teams it would read all of them.
create or replace function pgq_ext.list_dead_letters(a_consumer text, a_subconsumer text,
                                                     a_include_replayed boolean)
returns setof pgq_ext.dead_letter language plpgsql stable security definer
set search_path = pg_catalog, pg_temp as $$
begin
    if not pgq_ext._is_key_admin() then
        perform pgq_ext._require_held_key(a_consumer, a_subconsumer, 'read the dead letters of', false);
    end if;
    return query
        select d.* from pgq_ext.dead_letter d
         where d.consumer_id = a_consumer and d.subconsumer_id = a_subconsumer
           and (coalesce(a_include_replayed, false) or d.replayed_at is null)
         order by d.dl_id;
end;
$$;

-- Puts the key's dead letters not replayed yet (all, or those of a_dl_ids) into the target
-- queue each was meant for, with their times, decoded from a_from_encoding (NULL: the
-- source's own encoding) into this database's; each row is marked replayed in the same
-- transaction, so an event is replayed once (a concurrent replay waits for the rows and
-- then skips them). A byte sequence the target still cannot take fails the whole call,
-- replaying nothing. Returns the number of events replayed.
create or replace function pgq_ext.replay_dead_letters(a_consumer text, a_subconsumer text,
                                                       a_dl_ids bigint[], a_from_encoding text)
returns bigint language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
declare
    ids bigint[];
    queues text[];
    q text;
    tbl pg_catalog.regclass;
    n bigint := 0;
    m bigint;
begin
    perform pgq_ext._require_held_key(a_consumer, a_subconsumer, 'replay the dead letters of', false);
    if a_from_encoding is not null and pg_catalog.pg_char_to_encoding(a_from_encoding) < 0 then
        raise exception 'replay_dead_letters: % is not an encoding PostgreSQL knows',
                        pg_catalog.quote_literal(a_from_encoding)
              using errcode = 'invalid_parameter_value';
    end if;
    -- Every refusal first, for every target queue, before any row is locked or written.
    select pg_catalog.array_agg(distinct d.target_queue order by d.target_queue) into queues
      from pgq_ext.dead_letter d
     where d.consumer_id = a_consumer and d.subconsumer_id = a_subconsumer and d.replayed_at is null
       and (a_dl_ids is null or d.dl_id = any(a_dl_ids));
    foreach q in array coalesce(queues, '{}'::text[]) loop
        perform pgq_ext._queue_relation(q, 'data');  -- a queue gone or not PgQ's own: refused here
        if exists (select 1 from pgq_ext.kept_event_ids k where k.target_queue = q) then
            raise exception 'replay_dead_letters: target queue % receives kept event ids (keep_event_id):'
                            ' a replayed event would take an id from its sequence, which the mover then'
                            ' refuses; replay into it is not possible', pg_catalog.quote_literal(q)
                  using errcode = 'object_not_in_prerequisite_state';
        end if;
        if exists (select 1 from pgq.queue pq where pq.queue_name = q and pq.queue_disable_insert) then
            raise exception 'replay_dead_letters: target queue % does not take inserts (queue_disable_insert):'
                            ' nothing was replayed', pg_catalog.quote_literal(q)
                  using errcode = 'object_not_in_prerequisite_state',
                        hint = 'Replay once the queue takes inserts again (pgq.queue.queue_disable_insert false)';
        end if;
    end loop;
    foreach q in array coalesce(queues, '{}'::text[]) loop
        select pg_catalog.array_agg(s.dl_id order by s.ev_id, s.dl_id) into ids
          from (select d.dl_id, d.ev_id from pgq_ext.dead_letter d
                 where d.consumer_id = a_consumer and d.subconsumer_id = a_subconsumer
                   and d.target_queue = q and d.replayed_at is null
                   and (a_dl_ids is null or d.dl_id = any(a_dl_ids))
                   for update) s;
        continue when ids is null;
        -- The txid first: PgQ's rotation decides by txid which table a row belongs to.
        perform pg_catalog.txid_current();
        tbl := pgq_ext._queue_relation(q, 'current');
        execute pg_catalog.format(
            'insert into %s (ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4, ev_time)'
            ' select pg_catalog.convert_from(d.ev_type, e.enc), pg_catalog.convert_from(d.ev_data, e.enc),'
            ' pg_catalog.convert_from(d.ev_extra1, e.enc), pg_catalog.convert_from(d.ev_extra2, e.enc),'
            ' pg_catalog.convert_from(d.ev_extra3, e.enc), pg_catalog.convert_from(d.ev_extra4, e.enc), d.ev_time'
            ' from pgq_ext.dead_letter d cross join lateral'
            ' (select coalesce($2, d.source_encoding)::pg_catalog.name as enc) e'
            ' where d.dl_id = any($1) order by d.ev_id, d.dl_id', tbl)
          using ids, a_from_encoding;
        get diagnostics m = row_count;
        update pgq_ext.dead_letter d set replayed_at = pg_catalog.now(), replayed_by = session_user
         where d.dl_id = any(ids);
        n := n + m;
    end loop;
    return n;
end;
$$;

-- The schema version the mover checks for. Bumped with every change of this file.
-- 3: write side for pgq_mover only, kept-id claims proven by a row of the transaction.
-- 4: stage_events / insert_staged_events, the fast path without pgq_admin.
-- 5: tracking keys have owners (tracking_key, assign_key), the key, bind and kept-id
--    locks are rows of pgq_ext (lock_key, ensure_key, tracking_consumer, kept_ids_queue),
--    kept_ids_commit bounded by what it wrote, names from pgq.queue resolved to PgQ's own
--    relations (_queue_relation), kept_ids_refusal for pgq_mover only.
-- 6: the move journal (move_journal, written with the mark by mark_batch; its retention).
-- 7: dead letters (dead_letter, dead_letter_events, replay_dead_letters, list_dead_letters).
create or replace function pgq_ext.mover_schema_version()
returns integer language sql immutable security definer
set search_path = pg_catalog, pg_temp as $$ select 7 $$;
