"""``--ini``: a commented sample config, with the keys given by --set filled in."""

from __future__ import annotations

from collections.abc import Mapping

from airflow_provider_pgq.core.guard import Timeouts

_SAMPLE_INI = """\
; pgq-queue-mover: moves the events of a PgQ queue into a queue of another database,
; exactly once. Uncomment and edit; docs/cli.md explains every key.

; -- required --------------------------------------------------------------------
src_db = dbname=sourcedb
dst_db = dbname=targetdb
pgq_queue_name = source_queue
dst_queue_name = target_queue

; -- the job -----------------------------------------------------------------------
; job_name defaults to the config file's name without extension
;job_name = queue_mover
;pgq_consumer_id = %(job_name)s
;subconsumer =
;pidfile = ~/pid/%(job_name)s.pid
;logfile = ~/log/%(job_name)s.log

; > 0: seconds to sleep when idle; 0: move what there is, then exit; < 0: one batch, then exit
;loop_delay = 1.0
;connection_lifetime = 1200
;exception_sleep = 1.0

; -- what moves --------------------------------------------------------------------
; only events whose ev_extra1 names one of these tables (no schema: public)
;table_filter = public.orders, public.users
; stay this far behind the source (a PostgreSQL interval)
;pgq_keep_lag = 5 minutes
;keep_event_id = false

; -- batch size ----------------------------------------------------------------------
;min_batch_events =
;min_batch_interval =
; catching up, pending ticks become batches of about this many events and seconds
; (1: one tick a batch, as the classic tool)
;batch_target_events = 200000
;batch_target_seconds = 10
; catching up, at most this many events a second on average (spares a busy OLTP source)
;max_events_per_second =
;max_batches =
;max_events =
;max_runtime =

; -- ticks and setup -----------------------------------------------------------------
;force_tick = false
;run_ticker = false
;register_consumer = false
; where a new consumer starts: now (what comes after; PgQ's rule) or oldest (also
; the events the queue still holds)
;register_at = now
;install_pgq_ext = false

; events the target refuses (an encoding error): stop (the default: the mover stops
; and names them) or dead_letter (the rest moves; they are kept in pgq_ext.dead_letter
; on the target, for --replay-dead-letters once fixed)
;invalid_events = stop

; -- network bounds (seconds) --------------------------------------------------------
;connect_timeout = {connect_timeout:g}
;network_timeout = {network_timeout:g}
;statement_timeout = {statement_timeout:g}
;lock_timeout = {lock_timeout:g}
"""


def sample_ini(section: str = "queue_mover", overrides: Mapping[str, str] | None = None) -> str:
    """A commented sample config (the CLI's --ini); keys given with --set appear set."""
    body = _SAMPLE_INI.format(
        connect_timeout=Timeouts.connect_timeout, network_timeout=Timeouts.network_timeout,
        statement_timeout=Timeouts.statement_timeout, lock_timeout=Timeouts.lock_timeout,
    )
    wanted = dict(overrides or {})
    lines = []
    for line in body.splitlines():
        key = line.lstrip(";").split("=", 1)[0].strip() if "=" in line and not line.startswith("; ") else ""
        if key in wanted:
            lines.append(f"{key} = {wanted.pop(key)}")
        else:
            lines.append(line)
    lines += [f"{key} = {value}" for key, value in wanted.items()]
    return f"[{section}]\n" + "\n".join(lines) + "\n"
