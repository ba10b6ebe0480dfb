-- What the mover needs beyond the classic pgq_ext API. Installed with pgq_ext.sql,
-- or alone next to a classic pgq_ext that was installed as an extension.

-- Which source a tracking key belongs to: a key fed from two sources would mix
-- their tick numbers and lose or double events.
create table if not exists pgq_ext.tracking_source (
    consumer_id       text        not null,
    subconsumer_id    text        not null default '',
    source_system_id  text        not null,
    source_database   text        not null,
    source_queue      text        not null,
    bound_at          timestamptz not null default now(),
    primary key (consumer_id, subconsumer_id)
);
grant select on pgq_ext.tracking_source to public;

-- Binds the key to the source on first use. Returns NULL when the key belongs to
-- this source, else the source it belongs to, as 'system/database/queue'.
drop function if exists pgq_ext.bind_source(text, text, text, text, text);
create function pgq_ext.bind_source(a_consumer text, a_subconsumer text,
                                    a_system_id text, a_database text, a_queue text)
returns text language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
declare
    cur record;
begin
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

drop function if exists pgq_ext.unbind_source(text, text);
create function pgq_ext.unbind_source(a_consumer text, a_subconsumer text)
returns integer language sql security definer
set search_path = pg_catalog, pg_temp as $$
    with d as (delete from pgq_ext.tracking_source
                where consumer_id = a_consumer and subconsumer_id = a_subconsumer
               returning 1)
    select count(*)::integer from d;
$$;

-- Writes a chunk of events into the queue's current event table with their
-- original times, for movers whose role holds only pgq_writer (which may neither
-- write event tables nor set ev_time through pgq.insert_event). Owned by the
-- installing admin; granted to pgq_writer only. ev_txid is left to its default so
-- the rows belong to the target's next batch. Returns the number of rows written.
drop function if exists pgq_ext.insert_event_chunk(text, text[], text[], text[], text[],
                                                   text[], text[], timestamptz[], bigint[]);
create function pgq_ext.insert_event_chunk(
    a_queue text, a_type text[], a_data text[], a_extra1 text[], a_extra2 text[],
    a_extra3 text[], a_extra4 text[], a_time timestamptz[], a_id bigint[] default null)
returns bigint language plpgsql security definer
set search_path = pg_catalog, pg_temp as $$
declare
    tbl text := pgq.current_event_table(a_queue);
    n bigint;
begin
    if a_id is null then
        execute format('insert into %s (ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3,'
                       ' ev_extra4, ev_time) select * from unnest($1, $2, $3, $4, $5, $6, $7)',
                       pgq.quote_fqname(tbl))
          using a_type, a_data, a_extra1, a_extra2, a_extra3, a_extra4, a_time;
    else
        execute format('insert into %s (ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3,'
                       ' ev_extra4, ev_time, ev_id) select * from unnest($1, $2, $3, $4, $5,'
                       ' $6, $7, $8)', pgq.quote_fqname(tbl))
          using a_type, a_data, a_extra1, a_extra2, a_extra3, a_extra4, a_time, a_id;
    end if;
    get diagnostics n = row_count;
    return n;
end;
$$;
revoke all on function pgq_ext.insert_event_chunk(text, text[], text[], text[], text[],
                                                  text[], text[], timestamptz[], bigint[]) from public;
grant execute on function pgq_ext.insert_event_chunk(text, text[], text[], text[], text[],
                                                     text[], text[], timestamptz[], bigint[]) to pgq_writer;

-- The schema version the mover checks for. Bumped with every change of this file.
drop function if exists pgq_ext.mover_schema_version();
create function pgq_ext.mover_schema_version()
returns integer language sql immutable as $$ select 1 $$;
