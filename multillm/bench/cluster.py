"""Scenario 7: the same worker on one node and on a three-node cluster: what replication costs.

On the cluster (scripts/cluster.sh, the three nodes on this same machine) the caller and the
leader of `multillm.requests` are on the first node and the worker on the second, as most
workers of a fleet are: not on the node that leads their queue. Each message is then written
by two nodes of three before it is confirmed, and crosses from one node to another twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from multillm.bench.common import ONE, Section, Sizes, ms, primary
from multillm.bench.drive import Run, interleaved, keep_in_flight, percentile, requests_for
from multillm.bench.harness import Bench
from multillm.config import ENV_BROKER_URL
from multillm.producers import Client
from multillm.testbed.cluster import LocalCluster

CONCURRENCY = 8


def cluster_cost(bench: Bench, sizes: Sizes) -> Section:
    """Latency one request at a time, then throughput, on this machine's node and on the cluster."""
    make = requests_for(ONE)
    bench.set_latency(0)
    with _on_local_cluster(bench) as clustered:
        benches = {"one node": bench, "three-node cluster": clustered}
        for each in benches.values():
            each.declare(ONE)
        with (
            Client(bench.broker_url) as single,
            Client(clustered.broker_url) as replicated,
            primary(bench, CONCURRENCY),
            primary(clustered, CONCURRENCY),
        ):
            clients = {"one node": single, "three-node cluster": replicated}
            latencies = dict(
                zip(
                    clients,
                    interleaved(
                        lambda i: single.create(make(i)), lambda i: replicated.create(make(i)), sizes.overhead_samples
                    ),
                    strict=True,
                )
            )
            best: dict[str, Run] = {}
            for _ in range(sizes.rounds):
                for name, client in clients.items():
                    run = keep_in_flight(
                        client, make, total=sizes.throughput_requests, in_flight=sizes.throughput_in_flight
                    )
                    if name not in best or run.per_second > best[name].per_second:
                        best[name] = run
                    benches[name].purge()
    base_rate = best["one node"].per_second
    base_p50 = percentile(latencies["one node"], 0.5)
    rows = [
        [
            name,
            ms(percentile(latencies[name], 0.5)),
            ms(percentile(latencies[name], 0.99)),
            f"{percentile(latencies[name], 0.5) / base_p50:.2f}",
            f"{best[name].per_second:.0f}",
            f"{best[name].per_second / base_rate:.2f}",
        ]
        for name in clients
    ]
    return Section(
        name="cluster",
        title="7. Cluster: the same worker on one node and on a three-node cluster (mock latency 0)",
        headers=["broker", "p50 ms", "p99 ms", "p50 vs one node", "requests/s", "throughput vs one node"],
        rows=rows,
        notes=[
            f"One model; `worker primary --concurrency {CONCURRENCY}` with an SQLite sink on each broker. Latency: "
            f"{sizes.overhead_samples} requests one at a time, the two brokers alternately; throughput: "
            f"{sizes.throughput_requests} requests, {sizes.throughput_in_flight} in flight, best of {sizes.rounds}. "
            "The cluster's three nodes run on this same machine (scripts/cluster.sh) beside the system's "
            "node: replication here costs CPU of the same two cores, not network round trips; on "
            "machines of their own each hop adds the network's latency instead.",
        ],
        samples={f"{name} (one model)": latencies[name] for name in clients},
    )


@contextmanager
def _on_local_cluster(bench: Bench) -> Iterator[Bench]:
    """A Bench on a scratch vhost of the local cluster (started if down, and then stopped afterwards),
    sharing `bench`'s mock; callers on the first node, workers on the second."""
    cluster = LocalCluster()
    was_up = cluster.answering() == list(cluster.names)
    cluster.start()
    try:
        with cluster.scratch_vhost("multillm-bench") as urls:
            folder = bench.folder / "cluster"
            folder.mkdir()
            clustered = Bench(
                urls,
                bench.mock_url,
                folder,
                f"sqlite:///{folder / 'records.db'}",
                bench.mock_pid,
                rabbitmqctl=cluster.rabbitmqctl_any,
            )
            nodes = urls.split(";")
            clustered.worker_env[ENV_BROKER_URL] = nodes[1]
            yield clustered
    finally:
        if not was_up:
            cluster.stop()
