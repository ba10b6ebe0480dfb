"""Named points between the protocol's steps, where tests make the mover die.

Production code passes through them at no cost. A test either hands the mover a
callback, or sets ``PGQ_MOVER_FAULT=<point>[:<n>]`` in a child process's
environment: the n-th time (default 1st) the point is reached, the process ends
with ``os._exit(FAULT_EXIT_CODE)``: no exception, no cleanup, no commit, as a
crash or a SIGKILL would leave it.
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
ENV_VAR = "PGQ_MOVER_FAULT"

FaultHook = Callable[[str], None]


def from_environment() -> FaultHook | None:
    """The hook PGQ_MOVER_FAULT asks for, or None when it is unset."""
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return None
    point, _, nth = spec.partition(":")
    if point not in POINTS:
        raise ValueError(f"{ENV_VAR}={spec!r}: point must be one of {', '.join(POINTS)}")
    remaining = [int(nth) if nth else 1]

    def hook(reached: str) -> None:
        if reached != point:
            return
        remaining[0] -= 1
        if remaining[0] <= 0:
            os._exit(FAULT_EXIT_CODE)

    return hook
