"""Named points between the protocol's steps, where tests make the mover die.

Production code passes through them at no cost: a QueueMover calls a fault hook only
when its caller hands it one (tests and the fault-storm driver do; nothing reads the
environment). ``kill_at("<point>[:<n>]")`` makes the hook that ends the process the
n-th time (default 1st) the point is reached, with ``os._exit(FAULT_EXIT_CODE)``: no
exception, no cleanup, no commit, as a crash or a SIGKILL would leave it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

AFTER_NEXT_BATCH = "after_next_batch"
MID_STREAM = "mid_stream"
BEFORE_TARGET_COMMIT = "before_target_commit"
AFTER_TARGET_COMMIT = "after_target_commit"
BEFORE_SOURCE_COMMIT = "before_source_commit"

POINTS = (AFTER_NEXT_BATCH, MID_STREAM, BEFORE_TARGET_COMMIT, AFTER_TARGET_COMMIT, BEFORE_SOURCE_COMMIT)
FAULT_EXIT_CODE = 77

FaultHook = Callable[[str], None]


def kill_at(spec: str) -> FaultHook:
    """The hook that os._exit()s at the n-th pass of a point, from "<point>[:<n>]"."""
    point, _, nth = spec.partition(":")
    if point not in POINTS or (nth and not nth.isdigit()):
        raise ValueError(f"fault {spec!r}: <point>[:<n>] with point one of {', '.join(POINTS)}")
    remaining = [int(nth) if nth else 1]

    def hook(reached: str) -> None:
        if reached != point:
            return
        remaining[0] -= 1
        if remaining[0] <= 0:
            os._exit(FAULT_EXIT_CODE)

    return hook
