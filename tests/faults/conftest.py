"""A second throwaway cluster for the target side, so that restarting the target
server leaves the source (producer, ticker) running."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.faults.driver import Database
from tests.support.cluster import ThrowawayCluster


@pytest.fixture(scope="module")
def target_cluster() -> Iterator[ThrowawayCluster]:
    c = ThrowawayCluster(in_memory=True).start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def storm_target(target_cluster: ThrowawayCluster) -> Iterator[Database]:
    """A fresh database with pgq in the target cluster."""
    name = f"storm_{uuid.uuid4().hex[:10]}"
    target_cluster.create_database(name)
    target_cluster.execute(name, "create extension pgq")
    try:
        yield Database(target_cluster, name)
    finally:
        target_cluster.drop_database(name)
