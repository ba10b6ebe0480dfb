"""The fault storm behind a real PgBouncer in transaction pooling: every mover reaches
source and target through the pooler (both write paths, superuser and least-privilege
logins), while movers are killed, signalled, raced, their target backend terminated,
the target server restarted, the pooler restarted and its console KILLs a database
mid-batch. Then source and target are compared event by event: 0 lost, 0 doubled,
every error one line naming its side or the server.

Seed: PGQ_FAULT_SEED (default 20260101).
"""

from __future__ import annotations

import os

from tests.faults.driver import POOLED_KINDS, Database, Storm
from tests.support.pgbouncer import PgBouncer

POOLED_FAULTS = 20


def test_pooled_fault_storm_loses_and_doubles_nothing(storm_source: Database, storm_target: Database) -> None:
    seed = int(os.environ.get("PGQ_FAULT_SEED", "20260101"))
    # four server sessions per database and login: three racing movers, each holding both sides
    with PgBouncer(storm_target.cluster, "transaction", pool_size=4,
                   routes={storm_source.dbname: storm_source.cluster}) as bouncer:
        storm = Storm(storm_source, storm_target, bouncer=bouncer)
        try:
            storm.setup()
            result = storm.run(POOLED_FAULTS, seed)
        finally:
            storm.teardown()
    print()
    print(result.table())

    assert set(result.kinds) == set(POOLED_KINDS)
    landed = {kind: fired for kind, (_, fired) in result.by_kind().items()}
    assert all(landed[kind] >= 1 for kind in POOLED_KINDS), landed
    assert all(ev.lost == 0 and ev.doubled == 0 and ev.in_target == ev.produced
               for ev in result.events_by_kind.values()), result.summary()
    assert {"copy", "insert_event_chunk"} <= set(result.write_paths), result.write_paths
    assert not result.hung, result.hung
    assert not result.unexpected_errors, result.unexpected_errors
    assert not result.invariant_violations, result.invariant_violations
    assert result.produced > 1000 and result.produced_missing_in_source == 0
    assert result.source_events == result.target_events == result.produced
    assert result.lost == 0 and result.doubled == 0 and result.doubled_midway == 0
    assert result.unexpected == 0 and result.mismatched == 0
    assert result.final_mark_ok and result.ok
