"""The classic baseline for bench_mover's scenario (f): a queue mover in the skytools style.

Built on PyPI's ``pgq`` (python-pgq 3.8, which brings ``skytools``): a
``pgq.SerialConsumer`` run by skytools' own script loop from an ini file, so it
behaves as the classic tool does:

- per batch, ``pgq.next_batch_custom`` on the source, then the batch's events read
  through ``pgq.get_batch_cursor`` (300 rows a fetch) as ``pgq.Event`` objects;
- in one target transaction: ``pgq_ext.get_last_tick`` (skip a batch the target
  already holds), every event turned into a row of the classic field list (type,
  data, extra1..4, time), ``pgq.bulk_insert_events`` (skytools ``magic_insert``: a
  text COPY built in memory) into the target queue's current event table,
  ``pgq_ext.set_last_tick``, commit;
- then ``pgq.finish_batch`` and the source commit.

One tick is one batch (no ``pgq_batch_collect_events``), the whole batch is held in
Python before it is written. Written for the benchmark, not for use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pgq  # python-pgq: pip install pgq

#: The classic field list, in bulk_insert_events' short names.
FIELDS = ("type", "data", "extra1", "extra2", "extra3", "extra4", "time")


class ClassicMover(pgq.SerialConsumer):  # type: ignore[misc]
    """Reads src_db, pgq_queue_name, pgq_consumer_id, dst_db, dst_queue_name from the ini."""

    def __init__(self, args: Sequence[str]) -> None:
        super().__init__("classic_mover", "src_db", "dst_db", list(args))
        self.dst_queue_name = self.cf.get("dst_queue_name")
        self.moved = 0
        self.batches = 0

    def process_remote_batch(self, db: Any, batch_id: int, event_list: Any, dst_db: Any) -> None:
        rows = [
            [ev.type, ev.data, ev.extra1, ev.extra2, ev.extra3, ev.extra4, ev.time]
            for ev in event_list
        ]
        if rows:
            pgq.bulk_insert_events(dst_db.cursor(), rows, FIELDS, self.dst_queue_name)
        self.moved += len(rows)
        self.batches += 1


def ini_text(src_db: str, dst_db: str, source_queue: str, target_queue: str, consumer: str,
             logfile: str) -> str:
    """The skytools-style config: loop_delay 0 moves what there is, then exits."""
    return (
        "[classic_mover]\n"
        "job_name = bench_classic_mover\n"
        f"src_db = {src_db}\n"
        f"dst_db = {dst_db}\n"
        f"pgq_queue_name = {source_queue}\n"
        f"pgq_consumer_id = {consumer}\n"
        f"dst_queue_name = {target_queue}\n"
        f"logfile = {logfile}\n"
        "loop_delay = 0\n"
        "use_skylog = 0\n"
    )
