"""The nodes `kokoa health` checks: parsed from the `healthTargets` stack output, with the address to ping."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Literal

from kokoa_infra.addressing import tunnel_network

ROLES = ("origin", "edge")
# What `pulumi stack output --json` shows for a secret value without --show-secrets.
SECRET_PLACEHOLDER = "[secret]"
PingVia = Literal["auto", "wireguard", "public"]


HEALTH_TOKEN_RE = re.compile(r"[0-9a-f]{64}")


class TargetsError(Exception):
    """`healthTargets` is missing or malformed; the message names the entry and key."""


@dataclass(frozen=True)
class HostnameTarget:
    """Another name of a node's origin (`hostnames` of its `healthTargets` entry): probed through
    each edge too, a redirecting one for its 301 to `redirect_to`."""

    name: str
    redirect_to: str | None = None


@dataclass(frozen=True)
class Target:
    """One node as listed in `healthTargets`."""

    name: str
    role: str
    origin: str
    domain: str
    wireguard_ip: IPv4Address
    public_ip: str   # an edge's IPv4 address; an origin's endpoint, which may be a hostname
    drained: bool = False   # an edge with `dns: false` in the `edges` output: running, no A record
    # Sent in `Kokoa-Health` so that the edge never challenges the probe (its origin's entry of
    # the secret `healthTokens` output; None when the outputs were read without secrets).
    health_token: str | None = None
    # Its origin's other names (the domain is `domain`).
    hostnames: tuple[HostnameTarget, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """Every name of its origin, the domain first: each has this edge's A record."""
        return (self.domain, *(h.name for h in self.hostnames))


@dataclass(frozen=True)
class LocalNetwork:
    """This host's IPv4 addresses (address -> interface) and main-table routes (prefix -> interface)."""

    addresses: dict[IPv4Address, str]
    routes: tuple[tuple[IPv4Network, str], ...]


def parse_targets(outputs: dict[str, Any]) -> list[Target]:
    """Validate `healthTargets` from the stack outputs; raise TargetsError listing every problem."""
    raw = outputs.get("healthTargets")
    if raw is None:
        raise TargetsError(
            "the stack outputs have no `healthTargets`: run `pulumi up` with a program that "
            "exports it, or pass --outputs FILE holding it")
    if not isinstance(raw, list):
        raise TargetsError("`healthTargets` must be a list of nodes")
    targets: list[Target] = []
    problems: list[str] = []
    seen: set[tuple[str, str]] = set()
    drained = drained_edges(outputs)
    tokens = health_tokens(outputs)
    for index, entry in enumerate(raw):
        where = f"healthTargets[{index}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be an object")
            continue
        where = f"{where} ({entry.get('name', '?')})"
        entry_problems: list[str] = []
        for key in ("name", "role", "origin", "domain", "wireguardIp", "publicIp"):
            value = entry.get(key)
            if not isinstance(value, str) or not value:
                entry_problems.append(f"{where}: `{key}` must be a non-empty string")
        if entry_problems:
            problems += entry_problems
            continue
        if entry["publicIp"] == SECRET_PLACEHOLDER:
            problems.append(f"{where}: `publicIp` is {SECRET_PLACEHOLDER}: an origin's address is a secret "
                            "output; read it with `pulumi stack output healthTargets --json --show-secrets`")
            continue
        if entry["role"] not in ROLES:
            problems.append(f"{where}: `role` must be one of {', '.join(ROLES)}, not {entry['role']!r}")
            continue
        try:
            wireguard_ip = IPv4Address(entry["wireguardIp"])
        except ValueError:
            problems.append(f"{where}: `wireguardIp` {entry['wireguardIp']!r} is not an IPv4 address")
            continue
        hostnames = _hostnames(entry.get("hostnames", []), where, problems)
        if hostnames is None:
            continue
        key = (entry["role"], entry["name"])
        if key in seen:
            problems.append(f"{where}: duplicate {entry['role']} name {entry['name']!r}")
            continue
        seen.add(key)
        targets.append(Target(name=entry["name"], role=entry["role"], origin=entry["origin"],
                              domain=entry["domain"], wireguard_ip=wireguard_ip,
                              public_ip=entry["publicIp"],
                              drained=entry["role"] == "edge" and entry["name"] in drained,
                              health_token=tokens.get(entry["origin"]), hostnames=hostnames))
    if problems:
        raise TargetsError("invalid `healthTargets`:\n  " + "\n  ".join(problems))
    return targets


def _hostnames(raw: Any, where: str, problems: list[str]) -> tuple[HostnameTarget, ...] | None:
    """`hostnames` of one entry: [{name, redirectTo?}] (outputs of before it existed have none)."""
    if not isinstance(raw, list):
        problems.append(f"{where}: `hostnames` must be a list of {{name, redirectTo?}}")
        return None
    found = []
    for i, item in enumerate(raw):
        name = item.get("name") if isinstance(item, dict) else None
        redirect_to = item.get("redirectTo") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name or not (redirect_to is None or isinstance(redirect_to, str)):
            problems.append(f"{where}: `hostnames[{i}]` must be {{name, redirectTo?}} with strings, not {item!r}")
            return None
        found.append(HostnameTarget(name, redirect_to))
    return tuple(found)


def health_tokens(outputs: dict[str, Any]) -> dict[str, str]:
    """Each origin's health token from the `healthTokens` output; none when it is absent or
    hidden (`pulumi stack output` without --show-secrets prints "[secret]")."""
    tokens = outputs.get("healthTokens")
    if not isinstance(tokens, dict):
        return {}
    return {origin: token for origin, token in tokens.items()
            if isinstance(token, str) and HEALTH_TOKEN_RE.fullmatch(token)}


def drained_edges(outputs: dict[str, Any]) -> set[str]:
    """Names of the edges the `edges` output marks `dns: false`; none when that output is absent or odd."""
    edges = outputs.get("edges")
    if not isinstance(edges, dict):
        return set()
    return {name for name, edge in edges.items() if isinstance(edge, dict) and edge.get("dns") is False}


def parse_local_network(addr_json: str, route_json: str) -> LocalNetwork:
    """Build a LocalNetwork from `ip -j -4 addr show` and `ip -j -4 route show table main`."""
    addresses: dict[IPv4Address, str] = {}
    for link in json.loads(addr_json or "[]"):
        for info in link.get("addr_info", []):
            if info.get("family") == "inet" and "local" in info:
                addresses[IPv4Address(info["local"])] = link.get("ifname", "")
    routes: list[tuple[IPv4Network, str]] = []
    for route in json.loads(route_json or "[]"):
        dst, dev = route.get("dst"), route.get("dev")
        if not dev or not dst or route.get("type", "unicast") != "unicast":
            continue
        prefix = "0.0.0.0/0" if dst == "default" else dst
        try:
            routes.append((IPv4Network(prefix, strict=False), dev))
        except ValueError:
            continue
    return LocalNetwork(addresses=addresses, routes=tuple(routes))


def read_local_network() -> LocalNetwork:
    """Ask iproute2 for this host's addresses and routes; without `ip`, know none (ping public IPs)."""
    try:
        addr = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True,
                              text=True, check=True, timeout=10).stdout
        route = subprocess.run(["ip", "-j", "-4", "route", "show", "table", "main"],
                               capture_output=True, text=True, check=True, timeout=10).stdout
        return parse_local_network(addr, route)
    except (OSError, subprocess.SubprocessError, ValueError):
        return LocalNetwork(addresses={}, routes=())


def _longest_match(address: IPv4Address,
                   routes: Iterable[tuple[IPv4Network, str]]) -> tuple[IPv4Network, str] | None:
    matches = [route for route in routes if address in route[0]]
    return max(matches, key=lambda route: route[0].prefixlen, default=None)


def wireguard_routable(wireguard_ip: IPv4Address, local: LocalNetwork) -> bool:
    """True when this host sits on the node's tunnel network and routes to it through the tunnel.

    Sitting on it: an interface holds an address in the same /24 as the node's WireGuard IP
    (an origin's wg0 has <net>.X.1/24, an edge's wg-origin-X has <net>.X.<index>/32).
    Routing through it: the longest-prefix route to that IP leaves by one of those interfaces,
    so an edge whose tunnel only carries its origin's address does not send a sibling edge's
    WireGuard IP out of its default route.
    """
    if wireguard_ip in local.addresses:
        return True
    tunnel_interfaces = {
        interface for address, interface in local.addresses.items()
        if wireguard_ip in tunnel_network(address)}
    if not tunnel_interfaces:
        return False
    route = _longest_match(wireguard_ip, local.routes)
    return route is not None and route[1] in tunnel_interfaces


def ping_address(target: Target, local: LocalNetwork, via: PingVia = "auto") -> tuple[str, str]:
    """Return (address, "wireguard"|"public") to ping for this node."""
    if via == "wireguard" or (via == "auto" and wireguard_routable(target.wireguard_ip, local)):
        return str(target.wireguard_ip), "wireguard"
    return target.public_ip, "public"
