"""Hosts as Linux network namespaces on private bridges, and the faults a network can have.

Each host is a namespace with three interfaces, one per network, each a veth pair whose other end sits on a
bridge inside a namespace of its own (the switch): nothing is routed from the machine's own namespace into
any of them, and the addresses (10.213.0.0/24) exist only inside these namespaces.

    peer   10.213.0.N      etcd members among themselves
    store  10.213.0.64+N   clients (agents, routers, controllers, the client host) to etcd
    data   10.213.0.128+N  calls: client host -> routers -> containers, and zero-hop calls

A partition takes the switch's end of a host's veth down: the host's own interface stays up with no carrier,
so its packets are dropped without a reset or an error (a silent partition), while its processes still
reach their own host's addresses. Cutting one network and not the others cuts a host off from etcd only,
or one etcd member from the other members only. This kernel has no netem: no delay is added between hosts.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field

NETWORKS = {"peer": 0, "store": 64, "data": 128}
SUBNET = "10.213.0"


class NetworkUnavailable(RuntimeError):
    """`ip netns` cannot be used here (not root, no iproute2, no namespace support)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def netns_available() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    name = f"myc-probe-{secrets.token_hex(3)}"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


@dataclass
class Host:
    name: str
    index: int  # the last byte of its addresses is this plus the network's offset
    namespace: str

    def address(self, network: str) -> str:
        return f"{SUBNET}.{self.index + NETWORKS[network]}"


@dataclass
class Network:
    """Namespaces for `hosts` (named h1.. in order) on three bridges; `close()` removes everything."""

    host_names: list[str]
    token: str = field(default_factory=lambda: secrets.token_hex(2))
    hosts: dict[str, Host] = field(default_factory=dict)
    switch: str = ""
    _links: dict[tuple[str, str], str] = field(default_factory=dict)  # (host, network) -> switch-side veth
    cut: set[tuple[str, str]] = field(default_factory=set)

    def start(self) -> None:
        prefix = f"myc-{self.token}"
        self.switch = f"{prefix}-sw"
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "set", "lo", "up")
            for network in NETWORKS:
                _ip("-n", self.switch, "link", "add", f"br-{network}", "type", "bridge")
                _ip("-n", self.switch, "link", "set", f"br-{network}", "up")
            for i, name in enumerate(self.host_names, 1):
                host = Host(name, i, f"{prefix}-{name}")
                _ip("netns", "add", host.namespace)
                _ip("-n", host.namespace, "link", "set", "lo", "up")
                self.hosts[name] = host
                for network, offset in NETWORKS.items():
                    inside, outside = f"m{self.token}{i}{network[0]}a", f"m{self.token}{i}{network[0]}b"
                    _ip("link", "add", inside, "netns", host.namespace, "type", "veth",
                        "peer", "name", outside, "netns", self.switch)  # fmt: skip
                    _ip("-n", self.switch, "link", "set", outside, "master", f"br-{network}", "up")
                    _ip("-n", host.namespace, "link", "set", inside, "name", f"{network}0")
                    _ip(
                        "-n", host.namespace, "addr", "add", f"{SUBNET}.{i + offset}/26", "dev", f"{network}0"
                    )
                    _ip("-n", host.namespace, "link", "set", f"{network}0", "up")
                    self._links[(name, network)] = outside
        except BaseException:
            self.close()
            raise

    def exec_prefix(self, host: str) -> list[str]:
        """What runs a command on `host`: `ip netns exec` replaces itself with the command (same PID)."""
        return ["ip", "netns", "exec", self.hosts[host].namespace]

    def address(self, host: str, network: str) -> str:
        return self.hosts[host].address(network)

    def partition(self, host: str, networks: tuple[str, ...] = tuple(NETWORKS)) -> None:
        """Drops everything `host` sends or is sent on `networks`, silently."""
        for network in networks:
            _ip("-n", self.switch, "link", "set", self._links[(host, network)], "down")
            self.cut.add((host, network))

    def heal(self, host: str | None = None) -> None:
        """Brings back the links of `host` (default: of every host)."""
        for link in sorted(self.cut):
            if host is None or link[0] == host:
                _ip("-n", self.switch, "link", "set", self._links[link], "up")
                self.cut.discard(link)

    def close(self) -> None:
        """Removes every namespace made here (their veths go with them); tolerates a half-made network."""
        for host in self.hosts.values():
            _ip("netns", "del", host.namespace, check=False)
        if self.switch:
            _ip("netns", "del", self.switch, check=False)
        self.hosts.clear()
