"""The tunnel addressing rule, in one place: each origin has a /24 of `kokoa:network` to itself.

Origin with subnet X: <net>.X.1 on its wg0 (a /24); its edge with index N: <net>.X.N (N from
10 to 254) on wg-origin-X. So `kokoa:network` must be a /16 or larger (256 subnets), and a
host on an origin's tunnel network holds an address in that origin's /24.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Mapping

TUNNEL_PREFIX = 24            # each origin's WireGuard network
NETWORK_MAX_PREFIX = 16       # kokoa:network: room for every subnet
SUBNET_RANGE = (0, 255)       # an origin's `subnet`: the third octet within a /16
EDGE_INDEX_RANGE = (10, 254)  # an edge's `index`: the last octet within its origin's /24
ORIGIN_HOST = 1               # the origin's own last octet


def tunnel_address(network: ipaddress.IPv4Network, subnet: int, host: int) -> str:
    """The WireGuard address `host` (ORIGIN_HOST, or an edge's index) in origin `subnet`'s /24."""
    return str(network.network_address + subnet * 2 ** (32 - TUNNEL_PREFIX) + host)


def tunnel_network(address: ipaddress.IPv4Address | str) -> ipaddress.IPv4Network:
    """The origin /24 an address of the tunnel networks belongs to."""
    return ipaddress.IPv4Network(f"{address}/{TUNNEL_PREFIX}", strict=False)


def edge_interface(subnet: int) -> str:
    """The name of an edge's WireGuard interface to the origin with this subnet (unique per origin)."""
    return f"wg-origin-{subnet}"


# Allocation of the next free value, used by `kokoa add-origin` / `add-edge`.

def next_free(used: set[int], low: int, high: int, what: str) -> int:
    for candidate in range(low, high + 1):
        if candidate not in used:
            return candidate
    raise ValueError(f"no free {what} left ({low}..{high} are all taken)")


def next_subnet(origins: list[Mapping[str, Any]]) -> int:
    return next_free({o.get("subnet") for o in origins if isinstance(o.get("subnet"), int)},
                     *SUBNET_RANGE, "subnet")


def next_index(edges: list[Mapping[str, Any]], origin: str) -> int:
    return next_free({e.get("index") for e in edges
                      if e.get("origin") == origin and isinstance(e.get("index"), int)},
                     *EDGE_INDEX_RANGE, f"edge index for origin {origin}")
