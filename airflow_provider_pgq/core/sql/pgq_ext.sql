-- pgq_ext: how far a consumer got, kept in the database the events are applied to.
--
-- Call-compatible with the classic skytools pgq_ext (same tables, same functions,
-- same argument types), so a target once fed by the classic queue_mover keeps its
-- marks. The functions that write a key's marks check first that the caller may write
-- that key (pgq_ext._require_key_writer, in pgq_ext_mover.sql: the key's owner). Written for airflow-provider-pgq. Runs inside one transaction, after
-- core/pgq_ext.py has checked that every object already in pgq_ext belongs to a
-- role it trusts. Tables are created only when missing (an installation keeps its
-- data); functions are created or replaced (an installation keeps its grants). Rights
-- are not given here: install gives the defaults to what it creates (core/pgq_ext.py).

create schema if not exists pgq_ext;

create table if not exists pgq_ext.completed_tick (
    consumer_id     text    not null,
    subconsumer_id  text    not null default '',
    last_tick_id    bigint  not null,
    primary key (consumer_id, subconsumer_id)
);

create table if not exists pgq_ext.completed_batch (
    consumer_id     text    not null,
    subconsumer_id  text    not null default '',
    last_batch_id   bigint  not null,
    primary key (consumer_id, subconsumer_id)
);

create table if not exists pgq_ext.completed_event (
    consumer_id     text    not null,
    subconsumer_id  text    not null default '',
    batch_id        bigint  not null,
    event_id        bigint  not null,
    primary key (consumer_id, subconsumer_id, batch_id, event_id)
);

create table if not exists pgq_ext.partial_batch (
    consumer_id     text    not null,
    subconsumer_id  text    not null default '',
    cur_batch_id    bigint  not null,
    primary key (consumer_id, subconsumer_id)
);

-- Older layouts, brought to the one above with every row kept. skytools 2 made these
-- tables without subconsumer_id (keys: consumer_id, and consumer_id, batch_id, event_id
-- for completed_event); skytools 3.0 had the column but no default. A row of the old
-- layout belongs to subconsumer '' (what the 2- and 3-argument functions read and write),
-- and the key becomes (consumer_id, subconsumer_id[, batch_id, event_id]).
do $upgrade$
declare
    t record;
    pk name;
begin
    for t in
        select v.tbl, v.keycols
          from (values ('completed_tick', 'consumer_id, subconsumer_id'),
                       ('completed_batch', 'consumer_id, subconsumer_id'),
                       ('partial_batch', 'consumer_id, subconsumer_id'),
                       ('completed_event', 'consumer_id, subconsumer_id, batch_id, event_id'))
               as v (tbl, keycols)
    loop
        if not exists (select 1 from pg_catalog.pg_attribute a
                        where a.attrelid = pg_catalog.format('pgq_ext.%I', t.tbl)::pg_catalog.regclass
                          and a.attname = 'subconsumer_id' and not a.attisdropped) then
            -- fills every existing row with '' and keeps it NOT NULL
            execute pg_catalog.format(
                'alter table pgq_ext.%I add column subconsumer_id text not null default %L', t.tbl, '');
            select c.conname into pk from pg_catalog.pg_constraint c
             where c.conrelid = pg_catalog.format('pgq_ext.%I', t.tbl)::pg_catalog.regclass
               and c.contype = 'p';
            if pk is not null then
                execute pg_catalog.format('alter table pgq_ext.%I drop constraint %I', t.tbl, pk);
            end if;
            -- keycols is one of the fixed lists above, never input
            execute pg_catalog.format('alter table pgq_ext.%I add primary key (%s)', t.tbl, t.keycols);
        elsif not exists (select 1 from pg_catalog.pg_attribute a
                           where a.attrelid = pg_catalog.format('pgq_ext.%I', t.tbl)::pg_catalog.regclass
                             and a.attname = 'subconsumer_id' and a.atthasdef) then
            execute pg_catalog.format(
                'alter table pgq_ext.%I alter column subconsumer_id set default %L', t.tbl, '');
        end if;
    end loop;
end
$upgrade$;

-- A classic installation taken over for the first time may name the arguments of these
-- functions differently, which "create or replace" refuses: install drops those first.

-- ticks -------------------------------------------------------------------

create or replace function pgq_ext.get_last_tick(a_consumer text, a_subconsumer text)
returns bigint language sql stable security definer
set search_path = pg_catalog, pg_temp as $$
    select last_tick_id from pgq_ext.completed_tick
     where consumer_id = a_consumer and subconsumer_id = a_subconsumer;
$$;

create or replace function pgq_ext.get_last_tick(a_consumer text)
returns bigint language sql stable security definer
set search_path = pg_catalog, pg_temp as $$
    select pgq_ext.get_last_tick(a_consumer, '');
$$;

-- A NULL tick forgets the mark.
create or replace function pgq_ext.set_last_tick(a_consumer text, a_subconsumer text, a_tick_id bigint)
returns integer language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
begin
    perform pgq_ext._require_key_writer(a_consumer, a_subconsumer, 'set the mark of', true);
    if a_tick_id is null then
        delete from pgq_ext.completed_tick
         where consumer_id = a_consumer and subconsumer_id = a_subconsumer;
    else
        insert into pgq_ext.completed_tick (consumer_id, subconsumer_id, last_tick_id)
        values (a_consumer, a_subconsumer, a_tick_id)
        on conflict (consumer_id, subconsumer_id)
        do update set last_tick_id = excluded.last_tick_id;
    end if;
    return 1;
end;
$$;

create or replace function pgq_ext.set_last_tick(a_consumer text, a_tick_id bigint)
returns integer language sql security definer
set search_path = pg_catalog, pg_temp as $$
    select pgq_ext.set_last_tick(a_consumer, '', a_tick_id);
$$;

-- batches -----------------------------------------------------------------

create or replace function pgq_ext.is_batch_done(a_consumer text, a_subconsumer text, a_batch_id bigint)
returns boolean language sql stable security definer
set search_path = pg_catalog, pg_temp as $$
    select coalesce((select last_batch_id = a_batch_id from pgq_ext.completed_batch
                      where consumer_id = a_consumer and subconsumer_id = a_subconsumer), false);
$$;

create or replace function pgq_ext.is_batch_done(a_consumer text, a_batch_id bigint)
returns boolean language sql stable security definer
set search_path = pg_catalog, pg_temp as $$
    select pgq_ext.is_batch_done(a_consumer, '', a_batch_id);
$$;

-- False when the batch was already marked done.
create or replace function pgq_ext.set_batch_done(a_consumer text, a_subconsumer text, a_batch_id bigint)
returns boolean language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
begin
    perform pgq_ext._require_key_writer(a_consumer, a_subconsumer, 'mark a batch of', true);
    if pgq_ext.is_batch_done(a_consumer, a_subconsumer, a_batch_id) then
        return false;
    end if;
    -- as the classic: a batch id of 0 or below is answered true but not recorded
    if a_batch_id > 0 then
        insert into pgq_ext.completed_batch (consumer_id, subconsumer_id, last_batch_id)
        values (a_consumer, a_subconsumer, a_batch_id)
        on conflict (consumer_id, subconsumer_id)
        do update set last_batch_id = excluded.last_batch_id;
    end if;
    return true;
end;
$$;

create or replace function pgq_ext.set_batch_done(a_consumer text, a_batch_id bigint)
returns boolean language sql security definer
set search_path = pg_catalog, pg_temp as $$
    select pgq_ext.set_batch_done(a_consumer, '', a_batch_id);
$$;

-- events ------------------------------------------------------------------

create or replace function pgq_ext.is_event_done(a_consumer text, a_subconsumer text,
                                      a_batch_id bigint, a_event_id bigint)
returns boolean language sql stable security definer
set search_path = pg_catalog, pg_temp as $$
    select exists (select 1 from pgq_ext.completed_event
                    where consumer_id = a_consumer and subconsumer_id = a_subconsumer
                      and batch_id = a_batch_id and event_id = a_event_id);
$$;

create or replace function pgq_ext.is_event_done(a_consumer text, a_batch_id bigint, a_event_id bigint)
returns boolean language sql stable security definer
set search_path = pg_catalog, pg_temp as $$
    select pgq_ext.is_event_done(a_consumer, '', a_batch_id, a_event_id);
$$;

-- Events of the previous batch are forgotten when a new batch starts: only the batch
-- in progress can be retried. False (and nothing changed) when the event was already
-- marked done.
create or replace function pgq_ext.set_event_done(a_consumer text, a_subconsumer text,
                                       a_batch_id bigint, a_event_id bigint)
returns boolean language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
declare
    old_batch bigint;
begin
    perform pgq_ext._require_key_writer(a_consumer, a_subconsumer, 'mark an event of', true);
    if pgq_ext.is_event_done(a_consumer, a_subconsumer, a_batch_id, a_event_id) then
        return false;
    end if;
    select cur_batch_id into old_batch from pgq_ext.partial_batch
     where consumer_id = a_consumer and subconsumer_id = a_subconsumer
       for update;
    if not found then
        insert into pgq_ext.partial_batch (consumer_id, subconsumer_id, cur_batch_id)
        values (a_consumer, a_subconsumer, a_batch_id);
    elsif old_batch <> a_batch_id then
        delete from pgq_ext.completed_event
         where consumer_id = a_consumer and subconsumer_id = a_subconsumer
           and batch_id = old_batch;
        update pgq_ext.partial_batch set cur_batch_id = a_batch_id
         where consumer_id = a_consumer and subconsumer_id = a_subconsumer;
    end if;
    insert into pgq_ext.completed_event (consumer_id, subconsumer_id, batch_id, event_id)
    values (a_consumer, a_subconsumer, a_batch_id, a_event_id)
    on conflict do nothing;
    return found;
end;
$$;

create or replace function pgq_ext.set_event_done(a_consumer text, a_batch_id bigint, a_event_id bigint)
returns boolean language sql security definer
set search_path = pg_catalog, pg_temp as $$
    select pgq_ext.set_event_done(a_consumer, '', a_batch_id, a_event_id);
$$;

-- version -----------------------------------------------------------------

create or replace function pgq_ext.version()
returns text language sql immutable security definer
set search_path = pg_catalog, pg_temp as $$ select '3.5.1'::text $$;
