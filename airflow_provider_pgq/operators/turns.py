"""One mover at a time per task and map index, across the DAG's runs.

The queue hands one consumer its batches strictly in order, so two runs of the same
mover draining at once only race for the same batches: the target's key lock keeps
every batch exactly once, but the loser waits on it (up to lock_timeout) batch after
batch, and a backfill's intervals are moved in whatever order the runs happen to start.
A plain task gets ``max_active_tis_per_dag=1`` from the operator. A mapped task cannot:
the scheduler's limit counts every map index of the task together (the partitions would
move one after the other), and ``.partial()`` never runs the operator's ``__init__``.

So a mover looks, before it connects, at the same task and map index in the other runs.
It steps back when one of them is running, or when one of an earlier run is about to run
(scheduled, queued, rescheduled, up for retry): it gives its worker slot back and is
rescheduled (Airflow's ``up_for_reschedule``, as a sensor in reschedule mode; not a
retry, the try number stays). Task instances are ``running`` before their ``execute``
starts, so two that start together each see the other and both step back: never two at
once. The one whose run comes first comes back sooner (``turn_poll``), a later one after
twice that, and a later run never overtakes an earlier one that is waiting: a
backfill's intervals move oldest first. Only instances that run hold a slot, so waiting
instances cannot starve the earlier ones of worker slots.

Keep ``turn_poll`` well above the scheduler's loop time: Airflow 3.3's scheduler can take
the exit of a rescheduled attempt, read late under load, for the end of the attempt that
already runs again with the same try number and fail it (a retry then follows; seen with
polls of 2 and 5 s on a saturated machine, where that report came 10 s late; default 15 s).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from airflow.sdk.exceptions import AirflowRescheduleException
from airflow.sdk.types import RuntimeTaskInstanceProtocol as TaskInstance


def run_order(run_id: str) -> tuple[str, str]:
    """Sort key of a run: Airflow's run ids end with the run's timestamp after ``__``."""
    _, sep, stamp = run_id.rpartition("__")
    return (stamp if sep else run_id), run_id


#: an earlier run's instance in one of these states goes first
_ABOUT_TO_RUN = frozenset({"running", "scheduled", "queued", "up_for_reschedule", "up_for_retry", "restarting"})


def runs_ahead(ti: TaskInstance) -> list[str]:
    """The other runs whose instance of this task (this map index) goes first, oldest first."""
    map_index = ti.map_index if ti.map_index is not None and ti.map_index >= 0 else None
    key = ti.task_id if map_index is None else f"{ti.task_id}_{map_index}"
    # map_index=None asks for every map index; a plain task has only -1
    states = ti.get_task_states(dag_id=ti.dag_id, map_index=map_index, task_ids=[ti.task_id])
    return ahead_of(ti.run_id, {run_id: tasks.get(key) for run_id, tasks in states.items()})


def ahead_of(run_id: str, states: Mapping[str, str | None]) -> list[str]:
    """Of the runs' states of one task instance, the runs that go before ``run_id``: one
    that runs, or one of an earlier run that is about to."""
    mine = run_order(run_id)
    return sorted(
        (other for other, state in states.items() if other != run_id and (
            state == "running" or (state in _ABOUT_TO_RUN and run_order(other) < mine))),
        key=run_order,
    )


def take_turn(ti: TaskInstance, log: Any, turn_poll: float) -> None:
    """Returns when it is this instance's turn; else reschedules the task (raises
    AirflowRescheduleException). Where the Airflow version cannot say, it does not wait:
    the target's key lock still keeps every batch exactly once."""
    try:
        others = runs_ahead(ti)
    except Exception as exc:  # any failure to ask: the Task SDK's own errors are no RuntimeError
        log.warning("cannot read the other runs' task states (%s): not waiting for a turn", exc)
        return
    if not others:
        return
    first = run_order(ti.run_id) < run_order(others[0])
    delay = turn_poll if first else 2 * turn_poll
    index = "" if ti.map_index is None or ti.map_index < 0 else f"[{ti.map_index}]"
    log.info(
        "%s%s goes first in run(s) %s: one run at a time moves this queue, oldest first;"
        " rescheduled in %.0fs (not a retry)", ti.task_id, index, ", ".join(others), delay,
    )
    raise AirflowRescheduleException(  # type: ignore[no-untyped-call]
        dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=delay))
