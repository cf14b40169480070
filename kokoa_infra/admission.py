"""An origin's capacity split across its edges: how many requests each edge lets through at once (no Pulumi)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from kokoa_infra.model import Edge, Origin


@dataclass(frozen=True)
class Admission:
    """What one edge admits towards its origin at once.

    `share`: requests in flight from this edge (nginx `max_conns` of the upstream).
    `open`: of those, the most that may come without a visitor pass (a `limit_conn` on
    the requests that have none); the rest of the share is held for pass holders, so a
    full origin keeps serving the visitors who were already there.
    """

    share: int
    open: int


def reserve(share: int) -> int:
    """The part of a share held for pass holders: a quarter, at least 1 where the share
    has room for it (a share of 1 cannot hold one back)."""
    return 0 if share < 2 else max(1, share // 4)


def split_capacity(capacity: int, edges: Iterable[Edge]) -> dict[str, Admission]:
    """Each edge's admission, by name.

    Every edge that runs gets at least 1. A drained edge (`dns: false`) gets exactly 1: it
    only sees the clients that still hold its address until the DNS TTL passes. The
    serving edges share the rest evenly, the lower indexes taking the remainder, so the
    shares add up to `capacity` whenever it is at least the number of edges (otherwise
    each edge still gets 1, and the origin may see one request per edge).
    """
    edges = sorted(edges, key=lambda e: e.index)
    serving = [e for e in edges if e.dns]
    shares = {e.name: 1 for e in edges if not e.dns}
    if serving:
        left = max(capacity - len(shares), 0)
        each, extra = divmod(left, len(serving))
        for position, edge in enumerate(serving):
            shares[edge.name] = max(1, each + (1 if position < extra else 0))
    return {name: Admission(share=share, open=share - reserve(share)) for name, share in shares.items()}


def admissions(origin: Origin, edges: Iterable[Edge]) -> dict[str, Admission | None]:
    """Each of the origin's edges' admission by name; None for all when it has no capacity."""
    edges = list(edges)
    if origin.defence.capacity is None:
        return {edge.name: None for edge in edges}
    return split_capacity(origin.defence.capacity, edges)
