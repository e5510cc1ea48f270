"""Fixtures for tests against the local three-node cluster (scripts/cluster.sh).

`rabbit_cluster` starts the cluster at the first test that asks for it, once a run, and stops
it at the end of the run (unless it was up before); runs that ask for no cluster never start one. `cluster_url` gives a
test a vhost of its own on it, and the cluster whole: a node an earlier test killed is
started again first, and again before the vhost is deleted.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from multillm.testbed.cluster import LocalCluster


@pytest.fixture(scope="session")
def rabbit_cluster() -> Iterator[LocalCluster]:
    """The cluster, up and whole: one a run, since starting it takes seconds a test should not pay."""
    cluster = LocalCluster()
    was_up = cluster.answering() == list(cluster.names)  # `make cluster` before the run: left up
    cluster.start()
    try:
        yield cluster
    finally:
        if not was_up:
            cluster.stop()


@pytest.fixture
def cluster_url(rabbit_cluster: LocalCluster) -> Iterator[str]:
    """Every node's URL on a fresh vhost of this test's own, joined by ';' (kombu's failover form)."""
    rabbit_cluster.heal()
    with rabbit_cluster.scratch_vhost("multillm-cluster-test") as urls:
        yield urls
        # Deleting a vhost deletes its quorum queues, whose members must all be up.
        rabbit_cluster.heal()
