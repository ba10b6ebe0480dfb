"""The state colour of a mover row, and the rule the page prints next to it."""

from __future__ import annotations

from enum import Enum

from airflow_provider_pgq.core.pending import PendingStatus
from airflow_provider_pgq.core.positions import TargetMark

#: Pending events older than this (seconds of lag) make a mover "falling behind";
#: ``[pgq] ui_behind_seconds`` in airflow.cfg overrides it.
DEFAULT_BEHIND_SECONDS = 900.0

#: An open batch PgQ has not seen its consumer touch for longer than this (seconds) makes a
#: mover "stuck"; ``[pgq] ui_stuck_seconds`` overrides it. A batch normally moves within
#: about ``batch_target_seconds`` (10 s), so minutes mean nobody is working on it.
DEFAULT_STUCK_SECONDS = 300.0

#: Task instance states in which no process is moving the mover's open batch.
IDLE_TASK_STATES = frozenset(("up_for_retry", "failed"))


class State(str, Enum):
    KEEPING_UP = "keeping up"
    FALLING_BEHIND = "falling behind"
    STOPPED = "stopped"
    MISMATCH = "position mismatch"
    STUCK = "stuck"
    UNKNOWN = "unknown"


def rules(behind_seconds: float, stuck_seconds: float = DEFAULT_STUCK_SECONDS) -> dict[str, str]:
    """What each colour means, in the order the rule is applied."""
    return {
        State.UNKNOWN.value: "the position cannot be read now: the connection or queue is templated, the"
                             " mapping is known only at run time, or a database did not answer within the"
                             " page's bound (the mover itself may be fine)",
        State.STOPPED.value: "a database cannot be read, a queue is missing, pgq_ext is missing on the target,"
                             " or the consumer is not registered on the source: nothing moves",
        State.MISMATCH.value: "the target's mark is neither the consumer's last tick nor the end of its open"
                              " batch: rewind or reset before the next run (see the mover's reposition)",
        State.STUCK.value: f"a batch is open and has not moved for more than {stuck_seconds:g} s (PgQ has not"
                           " seen the consumer since it took the batch), or the mover's last task is"
                           " up_for_retry or failed: nothing is moving it now (a dead worker, a retry"
                           " not due yet); the next attempt takes the same batch over",
        State.FALLING_BEHIND.value: f"events are pending and the consumer's lag exceeds {behind_seconds:g} s",
        State.KEEPING_UP.value: "none of the above",
    }


def marks_agree(source: PendingStatus, target: TargetMark) -> bool | None:
    """True when the target's mark is the consumer's position; None when nothing was applied yet.

    Between a batch's commit on the target and its finish on the source the mark is the
    open batch's end tick: that is a move in flight, not a mismatch.
    """
    if target.mark is None or source.last_tick is None:
        return None
    if target.mark == source.last_tick:
        return True
    return source.current_batch is not None and target.mark == source.next_tick


def is_stuck(source: PendingStatus, stuck_seconds: float, task_state: str | None) -> bool:
    """An open batch nobody is moving: PgQ last saw the consumer (it took the batch, since an
    open batch is neither re-taken nor finished without it) more than ``stuck_seconds`` ago,
    or the mover's last task instance is not running and will not be before a retry."""
    if source.current_batch is None:
        return False
    if task_state in IDLE_TASK_STATES:
        return True
    return source.last_seen_seconds is not None and source.last_seen_seconds > stuck_seconds


def classify(source: PendingStatus | None, target: TargetMark | None, problem: str | None,
             behind_seconds: float = DEFAULT_BEHIND_SECONDS, unknown: bool = False,
             stuck_seconds: float = DEFAULT_STUCK_SECONDS, task_state: str | None = None) -> State:
    """``problem``: why nothing can move (a row's errors); ``unknown``: the position could
    not be read now (templated values, a database that did not answer in time);
    ``task_state``: the state of the mover's latest task instance, when the page knows it."""
    if unknown:
        return State.UNKNOWN
    if problem or source is None or target is None:
        return State.STOPPED
    if not (target.queue_exists and source.registered):
        return State.STOPPED
    if marks_agree(source, target) is False:
        return State.MISMATCH
    if is_stuck(source, stuck_seconds, task_state):
        return State.STUCK
    if (source.pending_events or 0) > 0 and (source.lag_seconds or 0.0) > behind_seconds:
        return State.FALLING_BEHIND
    return State.KEEPING_UP
