"""A private LAN for tests: host network namespaces joined by a bridge that lives in its own namespace.

Nothing touches the machine's own interfaces: the bridge sits in namespace nc-lan-TAG, and each host
namespace nc-hN-TAG has one veth into it (10.X.Y.N/24, multicast on). Needs root; `lan()` raises
LanUnavailable (tests skip) otherwise. Names start with nc- so they never clash with other users'.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from dataclasses import dataclass


class LanUnavailable(Exception):
    """Network namespaces cannot be made here (not root, or no ip/bridge support)."""


@dataclass(frozen=True)
class Host:
    ns: str
    ip: str

    def argv(self, *cmd: str) -> list[str]:
        """cmd run inside this host's namespace."""
        return ["ip", "netns", "exec", self.ns, *cmd]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=20)


@contextlib.contextmanager
def lan(n_hosts: int, addresses: list[str] | None = None):
    """Yields n_hosts Hosts on one bridged /24 (at the given addresses, else a random 10.x subnet);
    everything is deleted afterwards."""
    if os.geteuid() != 0:
        raise LanUnavailable("network namespaces need root (ip netns add)")
    tag = secrets.token_hex(3)
    bridge_ns = f"nc-lan-{tag}"
    subnet = f"10.{150 + secrets.randbelow(50)}.{secrets.randbelow(256)}"
    made: list[str] = []
    ips = addresses or [f"{subnet}.{i + 1}" for i in range(n_hosts)]
    hosts = [Host(f"nc-h{i + 1}-{tag}", ips[i]) for i in range(n_hosts)]
    try:
        ip("netns", "add", bridge_ns)
        made.append(bridge_ns)
        ip("-n", bridge_ns, "link", "add", "br0", "type", "bridge")
        ip("-n", bridge_ns, "link", "set", "br0", "up")
        for i, host in enumerate(hosts, start=1):
            ip("netns", "add", host.ns)
            made.append(host.ns)
            here, there = f"nc{tag}h{i}", f"nc{tag}b{i}"
            ip("link", "add", here, "type", "veth", "peer", "name", there)
            ip("link", "set", here, "netns", host.ns)
            ip("link", "set", there, "netns", bridge_ns)
            ip("-n", bridge_ns, "link", "set", there, "master", "br0")
            ip("-n", bridge_ns, "link", "set", there, "up")
            ip("-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", here)
            ip("-n", host.ns, "link", "set", here, "up", "multicast", "on")
            ip("-n", host.ns, "link", "set", "lo", "up")
    except (subprocess.SubprocessError, OSError) as e:
        _delete(made)
        raise LanUnavailable(f"cannot build a bridged LAN of namespaces: {getattr(e, 'stderr', '') or e}") from e
    try:
        yield hosts
    finally:
        _delete(made)


def _delete(namespaces: list[str]) -> None:
    for ns in namespaces:  # deleting a namespace destroys the veth ends in it, and so their pairs
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
