"""A 3-node Redis Cluster of private ``redis-server`` processes."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from support.processes import ProcessStartError, RedisProcess, free_port


def _free_cluster_port() -> int:
    """A port whose cluster-bus port (port + 10000) is free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise ProcessStartError("no free port pair for a cluster node")


class RedisClusterNode(RedisProcess):
    @property
    def argv(self) -> list[str]:
        return [
            *super().argv,
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(self.dir / "nodes.conf"),
            "--cluster-node-timeout", "2000",
        ]  # fmt: skip


class RedisCluster:
    def __init__(self, data_dir: Path, size: int = 3, replicas: int = 0) -> None:
        self.nodes = [
            RedisClusterNode(data_dir, port=_free_cluster_port(), name=f"cluster{i}")
            for i in range(size)
        ]
        self.replicas = replicas

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, timeout: float = 20.0) -> RedisCluster:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli")
        if cli is None:
            raise ProcessStartError("redis-cli not found (.ci/run installs redis-tools)")
        addresses = [f"{n.host}:{n.port}" for n in self.nodes]
        replicas = ["--cluster-replicas", str(self.replicas)]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, *replicas, "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        deadline = time.monotonic() + timeout
        while True:
            # Every node, not the first alone: each learns the slot map by
            # gossip and answers CLUSTERDOWN until it has (seen under load).
            infos = [
                subprocess.run(
                    [cli, "-p", str(node.port), "cluster", "info"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                for node in self.nodes
            ]
            if all("cluster_state:ok" in info for info in infos) and self._replicas_in_sync():
                return self
            if time.monotonic() > deadline:
                raise ProcessStartError("cluster did not become ok:\n" + "\n".join(infos))
            time.sleep(0.1)

    def add_node(self, data_dir: Path, timeout: float = 20.0) -> RedisClusterNode:
        """Start an empty node and have the cluster meet it (a scale-out
        before slots move to it); returns once every node knows it and it
        knows the slot map."""
        node = RedisClusterNode(
            data_dir, port=_free_cluster_port(), name=f"cluster{len(self.nodes)}"
        )
        node.start()
        self.nodes.append(node)
        with redis.Redis(host=self.nodes[0].host, port=self.nodes[0].port) as first:
            first.execute_command("CLUSTER", "MEET", node.host, node.port)
        deadline = time.monotonic() + timeout
        while True:
            views = []
            for member in self.nodes:
                with redis.Redis(host=member.host, port=member.port) as client:
                    views.append(client.execute_command("CLUSTER", "NODES"))
            text = [v.decode() if isinstance(v, bytes) else str(v) for v in views]
            with redis.Redis(host=node.host, port=node.port) as client:
                state = client.cluster("INFO").get("cluster_state")
            # Every node knows it, and it knows the slot map (else CLUSTERDOWN).
            if all(f":{node.port}@" in view for view in text) and state == "ok":
                return node
            if time.monotonic() > deadline:
                raise ProcessStartError(f"the cluster did not meet {node.name}")
            time.sleep(0.1)

    def _replicas_in_sync(self) -> bool:
        """Every replica attached and its link to its primary up: a replica
        that never synced does not take over when its primary dies."""
        expected = len(self.nodes) * self.replicas // (self.replicas + 1)
        in_sync = 0
        for node in self.nodes:
            with redis.Redis(host=node.host, port=node.port) as client:
                info = client.info("replication")
            in_sync += info.get("role") == "slave" and info.get("master_link_status") == "up"
        return in_sync == expected

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(grace=5.0)

    def primary_of(self, slot: int) -> RedisClusterNode:
        """The node serving ``slot`` now, as a running node sees the cluster."""
        for node in self.nodes:
            if not node.running:
                continue
            with redis.Redis(host=node.host, port=node.port) as client:
                for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        port = int(primary[1])
                        return next(n for n in self.nodes if n.port == port)
        raise AssertionError(f"no running node knows slot {slot}")

    def move_slot(self, slot: int, source: RedisClusterNode, target: RedisClusterNode) -> None:
        """Move ``slot`` and its keys from ``source`` to ``target`` the way
        ``redis-cli --cluster reshard`` does; the source learns last, and
        unsubscribes the slot's shard channels then."""
        clients = {node.port: redis.Redis(host=node.host, port=node.port) for node in self.nodes}
        try:
            src, dst = clients[source.port], clients[target.port]
            source_id, target_id = (
                src.execute_command("CLUSTER", "MYID"),
                dst.execute_command("CLUSTER", "MYID"),
            )
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                src.execute_command("MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)
            others = [c for port, c in clients.items() if port not in (source.port, target.port)]
            for client in [dst, *others, src]:
                client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        finally:
            for client in clients.values():
                client.close()
