"""The local cluster (scripts/cluster.sh) is a real one: three nodes that see one another, quorum
queues on all three, messages that cross nodes, and a queue that outlives its leader.

Raw pika, one connection per node: these test the cluster, not multillm.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pika
import pytest

from multillm.testbed.cluster import LocalCluster
from multillm.testbed.rabbitmq import vhost_of

T = TypeVar("T")


# The local cluster is one per run and its nodes have fixed ports: never two of its tests at once.
pytestmark = pytest.mark.serial


def eventually(probe: Callable[[], T | None], timeout: float = 30.0) -> T:
    """The first truthy value of `probe`, which may raise meanwhile: the cluster takes a moment to notice
    a death or elect a leader."""
    deadline = time.monotonic() + timeout
    value = None
    while True:
        try:
            value = probe()
            if value:
                return value
        except Exception:
            if time.monotonic() > deadline:
                raise
        assert time.monotonic() < deadline, f"still {value!r} after {timeout} s"
        time.sleep(0.2)


@contextmanager
def channel_on(url: str) -> Iterator[Any]:
    """A channel with publisher confirms on the one node of `url`."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        opened = connection.channel()
        opened.confirm_delivery()
        yield opened
    finally:
        if connection.is_open:
            connection.close()


def declare_quorum_queue(channel: Any, name: str) -> None:
    channel.queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})


def publish(channel: Any, queue: str, body: bytes) -> None:
    """Confirmed (pika raises on a nack or a return): the message is on a majority of the queue's members."""
    channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2), mandatory=True)


def get_one(url: str, queue: str, timeout: float = 30.0) -> bytes:
    """The next message of `queue`, read through the one node of `url`."""
    with channel_on(url) as channel:

        def fetch() -> bytes | None:
            method, _properties, body = channel.basic_get(queue, auto_ack=True)
            return bytes(body) if method else None

        return eventually(fetch, timeout)


def test_every_node_sees_three_running_nodes(rabbit_cluster: LocalCluster, cluster_url: str) -> None:
    assert len(rabbit_cluster.names) == 3
    for node in rabbit_cluster.names:
        assert rabbit_cluster.running_nodes(node) == sorted(rabbit_cluster.names), node


def test_a_quorum_queue_declared_on_node_2_has_three_members_and_a_leader(
    rabbit_cluster: LocalCluster, cluster_url: str
) -> None:
    urls = cluster_url.split(";")
    with channel_on(urls[1]) as channel:
        declare_quorum_queue(channel, "replicated")
    info = rabbit_cluster.queue_info("replicated", vhost_of(urls[0]), ("type", "leader", "members", "online"))
    assert info["type"] == "quorum"
    assert sorted(info["members"]) == sorted(rabbit_cluster.names)
    assert sorted(info["online"]) == sorted(rabbit_cluster.names)
    assert info["leader"] in rabbit_cluster.names


def test_a_message_published_to_node_1_is_consumed_from_node_3(cluster_url: str) -> None:
    urls = cluster_url.split(";")
    with channel_on(urls[0]) as channel:
        declare_quorum_queue(channel, "across")
        publish(channel, "across", b"from node 1")
    assert get_one(urls[2], "across") == b"from node 1"


def test_a_confirmed_message_outlives_the_leader_of_its_queue(rabbit_cluster: LocalCluster, cluster_url: str) -> None:
    urls = cluster_url.split(";")
    vhost = vhost_of(urls[0])
    with channel_on(urls[0]) as channel:
        declare_quorum_queue(channel, "survivor")
        publish(channel, "survivor", b"published before the kill")
    leader = eventually(lambda: rabbit_cluster.leader_of("survivor", vhost))
    others = [node for node in rabbit_cluster.names if node != leader]

    rabbit_cluster.kill(leader)

    assert eventually(lambda: rabbit_cluster.running_nodes(others[0]) == others)
    new_leader = eventually(lambda: (node := rabbit_cluster.leader_of("survivor", vhost)) in others and node)
    info = rabbit_cluster.queue_info("survivor", vhost)
    assert leader in info["members"]
    assert leader not in info["online"]
    assert new_leader in info["online"]
    # Read through a node that never led the queue.
    reader = next(node for node in others if node != new_leader)
    assert get_one(urls[rabbit_cluster.names.index(reader)], "survivor") == b"published before the kill"
    # The killed node stays down: `cluster_url` starts it again before the vhost goes.


def test_restart_brings_a_killed_node_back(rabbit_cluster: LocalCluster, cluster_url: str) -> None:
    # Whole at the start, whatever an earlier test killed: `cluster_url` saw to it.
    assert rabbit_cluster.running_nodes() == sorted(rabbit_cluster.names)
    urls = cluster_url.split(";")
    victim = rabbit_cluster.names[2]

    rabbit_cluster.kill(victim)
    assert eventually(lambda: victim not in rabbit_cluster.running_nodes(rabbit_cluster.names[0]))
    rabbit_cluster.restart(victim)

    assert rabbit_cluster.running_nodes(victim) == sorted(rabbit_cluster.names)
    assert rabbit_cluster.running_nodes(rabbit_cluster.names[0]) == sorted(rabbit_cluster.names)
    with channel_on(urls[2]) as channel:
        declare_quorum_queue(channel, "after-restart")
        publish(channel, "after-restart", b"on the restarted node")
    assert get_one(urls[0], "after-restart") == b"on the restarted node"
