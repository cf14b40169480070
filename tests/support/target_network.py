"""Throwaway network namespaces full of answering and silent ping targets, for the health tests and benchmark."""

from __future__ import annotations

import ipaddress
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

# Address plan, all of it inside the two namespaces made here (neither has a default
# route, so nothing sent from them can leave for the root namespace or beyond).
LINK_PROBER = "10.201.0.1/30"
LINK_TARGETS = "10.201.0.2"
ANSWERING_NET = ipaddress.ip_network("10.202.0.0/16")   # held on `lo` of the targets namespace
SILENT_NET = ipaddress.ip_network("10.203.0.0/16")      # routed to the targets namespace, held by nobody
TUNNEL_PROBER = "10.100.7.1/24"                         # stands in for an origin's wg0 address
TUNNEL_NET = ipaddress.ip_network("10.100.7.0/24")
COMMAND_TIMEOUT_S = 60


@dataclass
class TargetNetwork:
    """Two namespaces: `prober` runs the sweep, `targets` answers for some addresses."""

    prober: str
    targets: str
    answering: list[str] = field(default_factory=list)
    silent: list[str] = field(default_factory=list)
    tunnel: list[str] = field(default_factory=list)   # answering, on the prober's "tunnel" /24


def _ip(*args: str, stdin: str | None = None) -> None:
    subprocess.run(["ip", *args], input=stdin, text=True, check=True, capture_output=True,
                   timeout=COMMAND_TIMEOUT_S)


def _hosts(network: ipaddress.IPv4Network, count: int, first: int = 1) -> list[str]:
    hosts = network.hosts()
    addresses = [str(next(hosts)) for _ in range(first - 1 + count)]
    return addresses[first - 1:]


def _delete_namespace(name: str) -> None:
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False,
                   timeout=COMMAND_TIMEOUT_S)


@contextmanager
def target_network(answering: int, silent: int, tunnel: int = 0) -> Iterator[TargetNetwork]:
    """Build the namespaces, yield their description, and always delete them afterwards."""
    if tunnel > 200:
        raise ValueError("at most 200 tunnel targets fit the /24")
    tag = secrets.token_hex(3)
    net = TargetNetwork(prober=f"kh-{tag}-p", targets=f"kh-{tag}-t")
    created: list[str] = []
    try:
        for name in (net.prober, net.targets):
            _ip("netns", "add", name)
            created.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", net.prober, "link", "add", "kp0", "type", "veth", "peer", "name", "kt0",
            "netns", net.targets)
        _ip("-n", net.prober, "addr", "add", LINK_PROBER, "dev", "kp0")
        _ip("-n", net.prober, "link", "set", "kp0", "up")
        _ip("-n", net.targets, "addr", "add", f"{LINK_TARGETS}/30", "dev", "kt0")
        _ip("-n", net.targets, "link", "set", "kt0", "up")
        for routed in (ANSWERING_NET, SILENT_NET):
            _ip("-n", net.prober, "route", "add", str(routed), "via", LINK_TARGETS)
        # The targets namespace does not forward (a new namespace's default), so an echo
        # to an address it does not hold is dropped without any ICMP error: a silent host.
        net.answering = _hosts(ANSWERING_NET, answering)
        net.silent = _hosts(SILENT_NET, silent)
        _ip("-n", net.targets, "-batch", "-",
            stdin="".join(f"addr add {a}/32 dev lo\n" for a in net.answering))
        if tunnel:
            _ip("-n", net.prober, "link", "add", "kw0", "type", "veth", "peer", "name", "kw1",
                "netns", net.targets)
            _ip("-n", net.prober, "addr", "add", TUNNEL_PROBER, "dev", "kw0")
            _ip("-n", net.prober, "link", "set", "kw0", "up")
            net.tunnel = _hosts(TUNNEL_NET, tunnel, first=10)
            _ip("-n", net.targets, "-batch", "-",
                stdin="".join(f"addr add {a}/24 dev kw1\n" for a in net.tunnel))
            _ip("-n", net.targets, "link", "set", "kw1", "up")
        yield net
    finally:
        for name in created:
            _delete_namespace(name)
