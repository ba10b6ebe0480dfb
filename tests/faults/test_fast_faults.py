"""The fast fault storm: at least 30 disruptions of every kind while events flow,
then an event-by-event comparison of source and target: 0 lost, 0 doubled.

Seed: PGQ_FAULT_SEED (default 20260101); the soak variant is tests.faults.soak.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from tests.faults.driver import KINDS, Database, Storm
from tests.helpers import Server

FAST_FAULTS = 32


def test_fault_storm_loses_and_doubles_nothing(make_db: Callable[..., Server], storm_target: Database) -> None:
    seed = int(os.environ.get("PGQ_FAULT_SEED", "20260101"))
    src = make_db()
    storm = Storm(Database(src.cluster, src.dbname), storm_target)
    storm.setup()
    try:
        result = storm.run(FAST_FAULTS, seed)
    finally:
        storm.teardown()
    print()
    print(result.table())

    assert result.fired >= FAST_FAULTS, result.table()
    landed = {kind: fired for kind, (_, fired) in result.by_kind().items()}
    assert all(landed[kind] >= 1 for kind in KINDS), landed
    # both write paths were disrupted and both completed batches
    assert {"copy", "insert_event_chunk"} <= set(result.write_paths), result.write_paths
    assert not result.hung, result.hung
    assert not result.unexpected_errors, result.unexpected_errors
    assert not result.invariant_violations, result.invariant_violations
    assert result.produced > 1000
    assert result.produced_missing_in_source == 0
    assert result.source_events == result.target_events == result.produced
    assert result.lost == 0
    assert result.doubled == 0 and result.doubled_midway == 0
    assert result.unexpected == 0 and result.mismatched == 0
    assert result.final_mark_ok
    assert result.ok
