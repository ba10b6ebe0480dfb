"""Step 3 of the protocol as a pure function: no database needed."""

from __future__ import annotations

import pytest

from airflow_provider_pgq.core.mover import Decision, decide


def never() -> bool:
    raise AssertionError("the source was asked although mark and batch agree")


@pytest.mark.parametrize(
    ("mark", "expected"),
    [(None, Decision.APPLY), (10, Decision.APPLY), (15, Decision.SKIP)],
    ids=["no-mark", "mark-at-start", "mark-at-end"],
)
def test_agreeing_positions_decide_without_asking_the_source(mark: int | None, expected: Decision) -> None:
    assert decide(mark, 10, 15, never) is expected


@pytest.mark.parametrize("mark", [3, 12, 20], ids=["behind", "inside", "ahead"])
def test_disagreeing_positions_are_stale_or_a_mismatch_by_the_batch_state(mark: int) -> None:
    assert decide(mark, 10, 15, lambda: False) is Decision.STALE  # finished by another mover
    assert decide(mark, 10, 15, lambda: True) is Decision.MISMATCH  # still open: never guess
