"""The line each drain leaves in the log."""

from __future__ import annotations

import logging

from airflow_provider_pgq.cli.common import log
from airflow_provider_pgq.core.mover import MoveReport


def log_report(r: MoveReport, single_run: bool) -> None:
    """One line a drain: INFO when it moved something (or is the only drain), else DEBUG,
    so an idle daemon stays quiet without -v."""
    busy = r.events or r.batches or r.skipped or r.stale
    level = logging.INFO if (r.events or r.skipped or r.stale or single_run) else logging.DEBUG
    ticks = f"ticks {r.first_tick}..{r.last_tick}" if r.last_tick is not None else "no ticks"
    extra = ""
    if r.skipped:
        extra += f", {r.skipped} already applied"
    if r.stale:
        extra += f", {r.stale} finished by another mover"
    if r.filtered:
        extra += f", {r.filtered} of other tables consumed (table_filter)"
    if r.dead_lettered:
        extra += f", {r.dead_lettered} refused by the target kept in pgq_ext.dead_letter"
    lag = f"{r.lag_seconds:.1f}s" if r.lag_seconds is not None else "-"
    log.log(
        level,
        "%s %s events in %s batch%s (%s%s) in %.3fs, stopped: %s; lag %s, pending ~%s",
        "moved" if busy else "nothing to move:", r.events, r.batches, "" if r.batches == 1 else "es",
        ticks, extra, r.seconds, r.stop_reason, lag,
        r.pending_events if r.pending_events is not None else "-",
    )
