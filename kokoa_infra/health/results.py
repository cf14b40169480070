"""What a health sweep found: per node its ping and HTTPS results, and the sweep as a whole (no I/O here)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from kokoa_infra.health.targets import Target

if TYPE_CHECKING:
    from kokoa_infra.health.traffic import TrafficResult

HEALTHY, UNHEALTHY = "healthy", "unhealthy"


@dataclass(frozen=True)
class PingResult:
    """ICMP echo to one node: `via` says whether its WireGuard or public address was used."""

    ok: bool
    address: str
    via: str
    rtt_ms: float | None
    sent: int
    received: int
    error: str | None


@dataclass(frozen=True)
class HttpsResult:
    """GET https://<name>/ through one edge."""

    ok: bool
    code: int | None
    latency_ms: float | None
    cert_days_left: int | None
    error: str | None
    location: str | None = None   # a redirect's Location


@dataclass(frozen=True)
class HostnameResult:
    """The probe of another name of the edge's origin (Target.hostnames)."""

    hostname: str
    https: HttpsResult


@dataclass(frozen=True)
class NodeResult:
    """One node's checks; a check left out of the sweep is None."""

    target: Target
    ping: PingResult | None
    https: HttpsResult | None   # the domain's
    # An edge's traffic metrics (health/traffic.py): None when not asked for. Not a check: an
    # edge whose metrics cannot be scraped is reported as such, and stays as healthy as it is.
    traffic: TrafficResult | None = None
    hostnames: tuple[HostnameResult, ...] = ()   # the origin's other names', in its order

    @property
    def healthy(self) -> bool:
        return all(check.ok for check in (self.ping, self.https, *(h.https for h in self.hostnames))
                   if check is not None)

    def https_by_name(self) -> list[tuple[str, HttpsResult]]:
        """Every name's HTTPS probe through this edge, the domain first (none when not probed)."""
        if self.https is None:
            return []
        return [(self.target.domain, self.https), *((h.hostname, h.https) for h in self.hostnames)]

    @property
    def status(self) -> str:
        return HEALTHY if self.healthy else UNHEALTHY

    @property
    def key(self) -> str:
        # Origin and edge names are unique only within their role.
        return f"{self.target.role}/{self.target.name}"

    def problems(self, *, with_address: bool = True) -> list[str]:
        """Each failed check with its reason; the pinged address only `with_address` (an
        origin's may be secret)."""
        reasons = []
        if self.ping is not None and not self.ping.ok:
            address = f" {self.ping.address}" if with_address else ""
            reasons.append(f"ping{address}: {self.ping.error or 'no reply'}")
        # "https: ..." for the domain, "https NAME: ..." for another name.
        reasons += [f"https{'' if name == self.target.domain else ' ' + name}: {https.error or 'failed'}"
                    for name, https in self.https_by_name() if not https.ok]
        return reasons

    def problem(self) -> str:
        """Why the node is unhealthy ("" when it is not)."""
        return "; ".join(self.problems())


@dataclass(frozen=True)
class Sweep:
    """Every node checked once."""

    checked_at: datetime
    duration_s: float
    checks: tuple[str, ...]
    nodes: list[NodeResult]


def summarize(nodes: list[NodeResult]) -> dict[str, int]:
    healthy = sum(node.healthy for node in nodes)
    return {"total": len(nodes), "healthy": healthy, "unhealthy": len(nodes) - healthy}


def exit_code(sweep: Sweep) -> int:
    """0 when every node is healthy, 1 when some are not."""
    return 0 if all(node.healthy for node in sweep.nodes) else 1


def milliseconds(value: float | None, unit: str = " ms") -> str:
    """A duration in ms as the reports show it: two decimals below 10, one above; "-" unknown."""
    if value is None:
        return "-"
    return f"{value:.2f}{unit}" if value < 10 else f"{value:.1f}{unit}"
