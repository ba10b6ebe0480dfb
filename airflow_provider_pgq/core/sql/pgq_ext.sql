-- pgq_ext: how far a consumer got, kept in the database the events are applied to.
--
-- Call-compatible with the classic skytools pgq_ext (same tables, same functions,
-- same argument types), so a target once fed by the classic queue_mover keeps its
-- marks. Written for airflow-provider-pgq. Runs inside one transaction; tables are
-- created only when missing, so an existing installation keeps its data.

create schema if not exists pgq_ext;
grant usage on schema pgq_ext to public;

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

grant select on pgq_ext.completed_tick, pgq_ext.completed_batch,
    pgq_ext.completed_event, pgq_ext.partial_batch to public;

-- Functions are dropped and created again (not "create or replace"): an older
-- installation may name its arguments differently, which "replace" refuses.

-- ticks -------------------------------------------------------------------

drop function if exists pgq_ext.get_last_tick(text, text);
create function pgq_ext.get_last_tick(a_consumer text, a_subconsumer text)
returns bigint language sql stable security definer
set search_path = pg_catalog, pg_temp as $$
    select last_tick_id from pgq_ext.completed_tick
     where consumer_id = a_consumer and subconsumer_id = a_subconsumer;
$$;

drop function if exists pgq_ext.get_last_tick(text);
create function pgq_ext.get_last_tick(a_consumer text)
returns bigint language sql stable security definer
set search_path = pg_catalog, pg_temp as $$
    select pgq_ext.get_last_tick(a_consumer, '');
$$;

-- A NULL tick forgets the mark.
drop function if exists pgq_ext.set_last_tick(text, text, bigint);
create function pgq_ext.set_last_tick(a_consumer text, a_subconsumer text, a_tick_id bigint)
returns integer language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
begin
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

drop function if exists pgq_ext.set_last_tick(text, bigint);
create function pgq_ext.set_last_tick(a_consumer text, a_tick_id bigint)
returns integer language sql security definer
set search_path = pg_catalog, pg_temp as $$
    select pgq_ext.set_last_tick(a_consumer, '', a_tick_id);
$$;

-- batches -----------------------------------------------------------------

drop function if exists pgq_ext.is_batch_done(text, text, bigint);
create function pgq_ext.is_batch_done(a_consumer text, a_subconsumer text, a_batch_id bigint)
returns boolean language sql stable security definer
set search_path = pg_catalog, pg_temp as $$
    select coalesce((select last_batch_id = a_batch_id from pgq_ext.completed_batch
                      where consumer_id = a_consumer and subconsumer_id = a_subconsumer), false);
$$;

drop function if exists pgq_ext.is_batch_done(text, bigint);
create function pgq_ext.is_batch_done(a_consumer text, a_batch_id bigint)
returns boolean language sql stable security definer
set search_path = pg_catalog, pg_temp as $$
    select pgq_ext.is_batch_done(a_consumer, '', a_batch_id);
$$;

-- False when the batch was already marked done.
drop function if exists pgq_ext.set_batch_done(text, text, bigint);
create function pgq_ext.set_batch_done(a_consumer text, a_subconsumer text, a_batch_id bigint)
returns boolean language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
begin
    if pgq_ext.is_batch_done(a_consumer, a_subconsumer, a_batch_id) then
        return false;
    end if;
    insert into pgq_ext.completed_batch (consumer_id, subconsumer_id, last_batch_id)
    values (a_consumer, a_subconsumer, a_batch_id)
    on conflict (consumer_id, subconsumer_id)
    do update set last_batch_id = excluded.last_batch_id;
    return true;
end;
$$;

drop function if exists pgq_ext.set_batch_done(text, bigint);
create function pgq_ext.set_batch_done(a_consumer text, a_batch_id bigint)
returns boolean language sql security definer
set search_path = pg_catalog, pg_temp as $$
    select pgq_ext.set_batch_done(a_consumer, '', a_batch_id);
$$;

-- events ------------------------------------------------------------------

drop function if exists pgq_ext.is_event_done(text, text, bigint, bigint);
create function pgq_ext.is_event_done(a_consumer text, a_subconsumer text,
                                      a_batch_id bigint, a_event_id bigint)
returns boolean language sql stable security definer
set search_path = pg_catalog, pg_temp as $$
    select exists (select 1 from pgq_ext.completed_event
                    where consumer_id = a_consumer and subconsumer_id = a_subconsumer
                      and batch_id = a_batch_id and event_id = a_event_id);
$$;

drop function if exists pgq_ext.is_event_done(text, bigint, bigint);
create function pgq_ext.is_event_done(a_consumer text, a_batch_id bigint, a_event_id bigint)
returns boolean language sql stable security definer
set search_path = pg_catalog, pg_temp as $$
    select pgq_ext.is_event_done(a_consumer, '', a_batch_id, a_event_id);
$$;

-- Events of older batches are forgotten when a new batch starts: only the batch
-- in progress can be retried. False when the event was already marked done.
drop function if exists pgq_ext.set_event_done(text, text, bigint, bigint);
create function pgq_ext.set_event_done(a_consumer text, a_subconsumer text,
                                       a_batch_id bigint, a_event_id bigint)
returns boolean language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
declare
    old_batch bigint;
begin
    select cur_batch_id into old_batch from pgq_ext.partial_batch
     where consumer_id = a_consumer and subconsumer_id = a_subconsumer
       for update;
    if not found then
        insert into pgq_ext.partial_batch (consumer_id, subconsumer_id, cur_batch_id)
        values (a_consumer, a_subconsumer, a_batch_id);
    elsif old_batch <> a_batch_id then
        delete from pgq_ext.completed_event
         where consumer_id = a_consumer and subconsumer_id = a_subconsumer;
        update pgq_ext.partial_batch set cur_batch_id = a_batch_id
         where consumer_id = a_consumer and subconsumer_id = a_subconsumer;
    end if;
    insert into pgq_ext.completed_event (consumer_id, subconsumer_id, batch_id, event_id)
    values (a_consumer, a_subconsumer, a_batch_id, a_event_id)
    on conflict do nothing;
    return found;
end;
$$;

drop function if exists pgq_ext.set_event_done(text, bigint, bigint);
create function pgq_ext.set_event_done(a_consumer text, a_batch_id bigint, a_event_id bigint)
returns boolean language sql security definer
set search_path = pg_catalog, pg_temp as $$
    select pgq_ext.set_event_done(a_consumer, '', a_batch_id, a_event_id);
$$;

-- version -----------------------------------------------------------------

drop function if exists pgq_ext.version();
create function pgq_ext.version()
returns text language sql immutable as $$ select '3.5.1'::text $$;

-- rights ------------------------------------------------------------------
-- Reading marks is open to all; writing them (security definer functions) only
-- to roles that may produce into queues: otherwise any login role could move or
-- clear a mover's position.

revoke execute on function
    pgq_ext.set_last_tick(text, text, bigint), pgq_ext.set_last_tick(text, bigint),
    pgq_ext.set_batch_done(text, text, bigint), pgq_ext.set_batch_done(text, bigint),
    pgq_ext.set_event_done(text, text, bigint, bigint), pgq_ext.set_event_done(text, bigint, bigint)
  from public;
grant execute on function
    pgq_ext.set_last_tick(text, text, bigint), pgq_ext.set_last_tick(text, bigint),
    pgq_ext.set_batch_done(text, text, bigint), pgq_ext.set_batch_done(text, bigint),
    pgq_ext.set_event_done(text, text, bigint, bigint), pgq_ext.set_event_done(text, bigint, bigint)
  to pgq_writer;
