"""The one-shot admin commands (--install-pgq-ext, --register, --unregister, --reset,
--rewind, --status, --dead-letters, --replay-dead-letters) and what they print."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from airflow_provider_pgq.cli.common import EXIT_OK
from airflow_provider_pgq.cli.config import MoverConfig
from airflow_provider_pgq.cli.connections import Connections
from airflow_provider_pgq.cli.daemon import PidFile
from airflow_provider_pgq.core import journal, pgq, pgq_ext, poison
from airflow_provider_pgq.core.connect import describe
from airflow_provider_pgq.core.mover import QueueMover
from airflow_provider_pgq.core.pending import MoverStatus


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}s"
    return str(value)


def admin(config: MoverConfig, args: argparse.Namespace) -> int:
    """--install-pgq-ext, --register, --reset, --rewind, --status, --dead-letters,
    --replay-dead-letters, in that order."""
    conns = Connections(config)
    out = sys.stdout
    try:
        if args.install_pgq_ext:
            report = pgq_ext.install(conns.target)
            print(f"pgq_ext is installed and current in {describe(config.dst_db)} (marks kept):"
                  f" {report.summary()}", file=out)
        if args.register:
            pgq.require_queue(conns.source, config.pgq_queue_name, "source")
            options = dataclasses.replace(config.options(), register_consumer=True)
            new = QueueMover(conns.source, conns.target, options).ensure_registered()
            state = "registered" if new else "was already registered"
            print(f"consumer {config.pgq_consumer_id!r} {state} on queue {config.pgq_queue_name!r}", file=out)
        if args.unregister:
            _unregister(config, conns, out)
        if args.reset or args.rewind or args.status:
            mover = QueueMover(conns.source, conns.target, config.options())
            if args.reset:
                old = mover.reset()
                print(
                    f"target mark of consumer {config.pgq_consumer_id!r} cleared (was {_fmt(old)}):"
                    " the next run continues from the source consumer's position", file=out,
                )
            if args.rewind:
                tick = mover.rewind()
                print(
                    f"consumer {config.pgq_consumer_id!r} on queue {config.pgq_queue_name!r}"
                    f" rewound to the target's mark, tick {tick}", file=out,
                )
            if args.status:
                pgq_ext.require(conns.target)
                conns.target.rollback()
                _print_status(config, mover.status(), poison.pending_count(
                    conns.target, config.pgq_consumer_id, config.subconsumer))
                _print_journal(config, conns)
        if args.dead_letters or args.replay_dead_letters:
            pgq_ext.require(conns.target)
            conns.target.rollback()
            if args.dead_letters:
                _print_dead_letters(config, conns)
            else:
                n = poison.replay(conns.target, config.pgq_consumer_id, config.subconsumer,
                                  from_encoding=args.from_encoding)
                print(f"replayed {n} dead letter(s) of consumer {config.pgq_consumer_id!r} into their target"
                      " queue (each once)", file=out)
    finally:
        conns.close()
    return EXIT_OK


def _unregister(config: MoverConfig, conns: Connections, out: Any) -> None:
    """--unregister, as skytools' SerialConsumer did it: the consumer leaves the source
    queue, and the target forgets its mark (and the source it was bound to), so that a
    later --register starts clean instead of meeting a mark that no longer fits."""
    pgq.require_queue(conns.source, config.pgq_queue_name, "source")
    was = pgq.is_registered(conns.source, config.pgq_queue_name, config.pgq_consumer_id)
    if was:
        pgq.unregister_consumer(conns.source, config.pgq_queue_name, config.pgq_consumer_id)
    conns.source.commit()
    old = QueueMover(conns.source, conns.target, config.options()).reset()
    state = "unregistered from" if was else "was not registered on"
    print(
        f"consumer {config.pgq_consumer_id!r} {state} queue {config.pgq_queue_name!r}; target mark"
        f" cleared (was {_fmt(old)}): events queued from now on are not moved until it registers again",
        file=out,
    )


def _print_dead_letters(config: MoverConfig, conns: Connections) -> None:
    """One line a dead letter waiting for replay; its payload is not printed (it may be
    large or binary; the table holds it byte for byte)."""
    letters = poison.list_dead_letters(conns.target, config.pgq_consumer_id, config.subconsumer)
    conns.target.rollback()
    for d in letters:
        print(f"dl_id {d.dl_id}: ev_id {d.ev_id} of queue {d.source_queue} (ticks {d.prev_tick_id}..{d.cur_tick_id},"
              f" ev_time {d.ev_time.isoformat()}, ev_type {poison.shown(d.ev_type, d.source_encoding)!r})"
              f" for {d.target_queue}: {d.error_sqlstate} {d.error_message} (at {d.dead_lettered_at.isoformat()})")
    print(f"{len(letters)} dead letter(s) of consumer {config.pgq_consumer_id!r} wait for --replay-dead-letters")


def _print_status(config: MoverConfig, status: MoverStatus, dead_letters: int | None = None) -> None:
    running = "-"
    if config.pidfile is not None:
        pid = PidFile(config.pidfile).running_pid()
        running = f"yes, pid {pid}" if pid else "no"
    rows = [
        ("job", config.job_name),
        ("running", running),
        ("source", f"{describe(config.src_db)} queue {status.queue_name}"),
        ("target", f"{describe(config.dst_db)} queue {status.target_queue}"),
        ("consumer", status.consumer_name + (f" / {status.subconsumer}" if status.subconsumer else "")),
        ("registered", _fmt(status.registered)),
        ("consumer last tick", _fmt(status.last_tick)),
        ("current batch", _fmt(status.current_batch)),
        ("source newest tick", _fmt(status.newest_tick)),
        ("target mark", _fmt(status.target_mark)),
        ("lag", _fmt(status.lag_seconds)),
        ("pending events", _fmt(status.pending_events)),
        ("dead letters", _fmt(dead_letters)),
    ]
    width = max(len(name) for name, _ in rows) + 1
    for name, value in rows:
        print(f"{name + ':':<{width}} {value}")


#: How many of the key's journal entries --status shows.
STATUS_JOURNAL_ENTRIES = 10


def _print_journal(config: MoverConfig, conns: Connections) -> None:
    """The key's last entries of the target's move journal, newest first: which batch,
    how many events, when, and who applied it (a job and host, or an Airflow task)."""
    try:
        entries = journal.last_entries(conns.target, config.pgq_consumer_id, config.subconsumer,
                                       STATUS_JOURNAL_ENTRIES)
    finally:
        conns.target.rollback()
    if not entries:
        print("journal: no batch applied (the move journal of pgq_ext holds no entry of this key)")
        return
    print(f"journal: the last {len(entries)} batches applied, newest first:")
    for e in entries:
        w = e.who
        if w.dag_id is not None:
            who = f"airflow {w.dag_id}.{w.task_id}" + (f"[{w.map_index}]" if w.map_index not in (None, -1) else "")
            who += f" run {w.run_id} try {w.try_number}"
        else:
            who = f"job {w.job}" if w.job else "-"
        where = f" on {w.host}" + (f" pid {w.pid}" if w.pid is not None else "") if w.host else ""
        extra = "".join(f", {n} {what}" for n, what in ((e.filtered, "filtered"), (e.dead_lettered, "dead-lettered"))
                        if n)
        print(f"  {e.applied_at.isoformat(timespec='seconds')}  batch {e.batch_id} ticks"
              f" {_fmt(e.prev_tick_id)}..{e.cur_tick_id}: {e.events} events{extra}; {who}{where}"
              f" as {e.login_role}")
