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
    -- One source consumer feeds one key: two subconsumers of one consumer on one
    -- source queue would both be handed the same batches, under different locks.
    perform pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended('pgq_ext bind:' || a_consumer, 0));
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
returns integer language sql security definer
set search_path = pg_catalog, pg_temp as $$
    with d as (delete from pgq_ext.tracking_source
                where consumer_id = a_consumer and subconsumer_id = a_subconsumer
               returning 1)
    select count(*)::integer from d;
$$;


-- Step 2 and 3 of the move protocol in one round trip: the key's transaction lock (the
-- same one pgq_ext.lock_key in core/pgq_ext.py takes), its source binding, and its
-- mark. other_source is not NULL when the key belongs to another source (then
-- last_tick is not read).
create or replace function pgq_ext.begin_batch(a_consumer text, a_subconsumer text,
                                               a_system_id text, a_database text, a_queue text,
                                               out other_source text, out last_tick bigint)
language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
begin
    -- concat, as core/pgq_ext.py lock_key: the same key, and a NULL part cannot drop the lock
    perform pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(
        pg_catalog.concat('pgq_ext:', a_consumer, pg_catalog.chr(1), a_subconsumer), 0));
    other_source := pgq_ext.bind_source(a_consumer, a_subconsumer, a_system_id, a_database, a_queue);
    if other_source is null then
        last_tick := pgq_ext.get_last_tick(a_consumer, a_subconsumer);
    end if;
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
    tbl text;
    n bigint;
begin
    if a_id is not null then
        perform pgq_ext._require_kept_ids_claim(a_queue);
    end if;
    -- The txid first: PgQ's rotation decides by txid which table a row belongs to.
    perform pg_catalog.txid_current();
    tbl := pgq.current_event_table(a_queue);
    if a_id is null then
        execute pg_catalog.format('insert into %s (ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3,'
                       ' ev_extra4, ev_time) select * from unnest($1, $2, $3, $4, $5, $6, $7)',
                       pgq.quote_fqname(tbl))
          using a_type, a_data, a_extra1, a_extra2, a_extra3, a_extra4, a_time;
    else
        execute pg_catalog.format('insert into %s (ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3,'
                       ' ev_extra4, ev_time, ev_id) select * from unnest($1, $2, $3, $4, $5,'
                       ' $6, $7, $8)', pgq.quote_fqname(tbl))
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
                   pgq.quote_fqname(pgq.current_event_table(a_queue)), cols, cols)
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
    select queue_event_seq into seq_name from pgq.queue where queue_name = a_queue;
    if not found then
        return null;
    end if;
    execute pg_catalog.format('select case when is_called then last_value else last_value - 1 end from %s',
                   pgq.quote_fqname(seq_name))
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
    execute pg_catalog.format('select exists (select 1 from %s)', pgq.quote_fqname(q.queue_data_pfx))
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

-- Start of a kept-id batch, in the mover's target transaction. A refusal is decided
-- before any lock is taken; otherwise it serializes kept-id writers of the queue,
-- blocks other inserts into its current event table until commit (an insert already
-- running is waited for, and shows in the sequence), answers the refusal once more
-- (the state may have changed during the wait) and records the claim.
create or replace function pgq_ext.kept_ids_claim(a_consumer text, a_subconsumer text, a_queue text)
returns text language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
declare
    refusal text;
begin
    refusal := pgq_ext.kept_ids_refusal(a_consumer, a_subconsumer, a_queue);
    if refusal is not null then
        return refusal;
    end if;
    perform pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended('pgq_ext kept ids:' || a_queue, 0));
    execute pg_catalog.format('lock table %s in share row exclusive mode',
                   pgq.quote_fqname(pgq.current_event_table(a_queue)));
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
begin
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
    -- plain setval (is_called true): pgq.seq_setval leaves a fresh sequence's first id free
    seq_now := greatest(a_max_id, seq_now);
    perform setval((select queue_event_seq from pgq.queue where queue_name = a_queue)::regclass, seq_now);
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
create or replace function pgq_ext.kept_ids_release(a_queue text)
returns integer language sql security definer
set search_path = pg_catalog, pg_temp as $$
    delete from pgq_ext.kept_ids_claims where target_queue = a_queue;
    with d as (delete from pgq_ext.kept_event_ids where target_queue = a_queue returning 1)
    select count(*)::integer from d;
$$;

-- The schema version the mover checks for. Bumped with every change of this file.
-- 3: write side for pgq_mover only, kept-id claims proven by a row of the transaction.
-- 4: stage_events / insert_staged_events, the fast path without pgq_admin.
create or replace function pgq_ext.mover_schema_version()
returns integer language sql immutable security definer
set search_path = pg_catalog, pg_temp as $$ select 4 $$;
