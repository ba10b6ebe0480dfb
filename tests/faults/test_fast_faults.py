"""The fast fault storm: every kind at least once (network faults through the fault
proxies, server crashes with recovery, a full target disk where a tmpfs can be
mounted) while events flow, then an event-by-event comparison of source and
target: 0 lost, 0 doubled, overall and for the events of each kind's faults.

Seed: PGQ_FAULT_SEED (default 20260101); the soak variant is tests.faults.soak.
"""

from __future__ import annotations

import os

from tests.faults.driver import KINDS, Database, Storm

FAST_FAULTS = 32


def test_fault_storm_loses_and_doubles_nothing(storm_source: Database, storm_target: Database) -> None:
    seed = int(os.environ.get("PGQ_FAULT_SEED", "20260101"))
    storm = Storm(storm_source, storm_target)
    storm.setup()
    try:
        result = storm.run(FAST_FAULTS, seed)
    finally:
        storm.teardown()
    print()
    print(result.table())

    assert result.fired >= FAST_FAULTS, result.table()
    landed = {kind: fired for kind, (_, fired) in result.by_kind().items()}
    # every kind; the full disk needs a tmpfs, which only a root allowed to mount can make
    # (a container without CAP_SYS_ADMIN cannot: the storm then says so in its log)
    expected = KINDS if storm.disk is not None else tuple(k for k in KINDS if k != "full_disk_target")
    if storm.disk is None:
        print("full_disk_target left out: no tmpfs can be mounted on this machine")
    assert set(expected) <= set(result.kinds), (expected, result.kinds)
    assert all(landed[kind] >= 1 for kind in result.kinds), landed
    # the events committed while each kind's faults were injected: all there, once
    assert all(ev.lost == 0 and ev.doubled == 0 and ev.in_target == ev.produced
               for ev in result.events_by_kind.values()), result.summary()
    assert sum(ev.produced for ev in result.events_by_kind.values()) == result.produced
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
