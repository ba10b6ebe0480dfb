"""Throwaway clusters of the storm's own for the source and the target side: the
storm restarts and crashes them (kill -9 of the postmaster), which must leave the
session's shared cluster alone, and restarting one side leaves the other running."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.faults.driver import Database
from tests.support.chroot import new_cluster
from tests.support.cluster import ThrowawayCluster


@pytest.fixture(scope="module")
def target_cluster() -> Iterator[ThrowawayCluster]:
    c = new_cluster(in_memory=True)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def source_cluster() -> Iterator[ThrowawayCluster]:
    c = new_cluster(in_memory=False)
    try:
        yield c
    finally:
        c.stop()


def _fresh_database(cluster: ThrowawayCluster) -> Iterator[Database]:
    name = f"storm_{uuid.uuid4().hex[:10]}"
    cluster.create_database(name)
    cluster.execute(name, "create extension pgq")
    try:
        yield Database(cluster, name)
    finally:
        cluster.drop_database(name)


@pytest.fixture
def storm_target(target_cluster: ThrowawayCluster) -> Iterator[Database]:
    """A fresh database with pgq in the target cluster."""
    yield from _fresh_database(target_cluster)


@pytest.fixture
def storm_source(source_cluster: ThrowawayCluster) -> Iterator[Database]:
    """A fresh database with pgq in the source cluster."""
    yield from _fresh_database(source_cluster)
