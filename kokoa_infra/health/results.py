"""What a health sweep found: per node its ping and HTTPS results, and the sweep as a whole (no I/O here)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from kokoa_infra.health.targets import Target
from kokoa_infra.health.traffic import EdgeCounters, Rates, TrafficResult, rates_between

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


TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"   # UTC, to the second, as every report and record writes it


def timestamp(moment: datetime) -> str:
    return moment.strftime(TIMESTAMP_FORMAT)


def parse_timestamp(text: str) -> datetime:
    """A timestamp() back; ValueError when it is not one."""
    return datetime.strptime(text, TIMESTAMP_FORMAT).replace(tzinfo=timezone.utc)


def milliseconds(value: float | None, unit: str = " ms") -> str:
    """A duration in ms as the reports show it: two decimals below 10, one above; "-" unknown."""
    if value is None:
        return "-"
    return f"{value:.2f}{unit}" if value < 10 else f"{value:.1f}{unit}"


@dataclass
class TrafficMemory:
    """The previous sweep's counters per edge (from the status file at start, then in memory),
    against which each sweep's rates are taken."""

    seen: dict[str, tuple[float, EdgeCounters]] = field(default_factory=dict)   # key -> (unix time, counters)

    def apply(self, sweep: Sweep) -> Sweep:
        """The sweep with each scraped edge's rates since the previous scrape; remembers this one."""
        at = sweep.checked_at.timestamp()
        nodes = []
        for node in sweep.nodes:
            traffic = node.traffic
            if traffic is not None and traffic.ok and traffic.counters is not None:
                before = self.seen.get(node.key)
                if before is not None and at > before[0]:
                    traffic = replace(traffic, rates=rates_between(traffic.counters, before[1], at - before[0]))
                self.seen[node.key] = (at, traffic.counters)
                node = replace(node, traffic=traffic)
            nodes.append(node)
        return replace(sweep, nodes=nodes)

    @classmethod
    def from_status_document(cls, document: Mapping[str, Any]) -> TrafficMemory:
        """What an earlier `--status-file` recorded; nothing when it recorded none or is malformed."""
        memory = cls()
        try:
            at = parse_timestamp(document["checkedAt"]).timestamp()
            for node in document["nodes"]:
                counters = (node.get("traffic") or {}).get("counters")
                if counters:
                    memory.seen[f"{node['role']}/{node['name']}"] = (at, EdgeCounters.from_document(counters))
        except (KeyError, TypeError, ValueError, AttributeError):
            return cls()
        return memory


# --- per origin ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class OriginTraffic:
    """An origin's edges together: their rates summed, the response time over all their answers."""

    origin: str
    edges: int              # edges whose traffic was collected this sweep
    unscraped: list[str]    # edges whose metrics could not be had
    rates: Rates | None     # None until two sweeps scraped an edge

    def document(self) -> dict[str, Any]:
        return {"edgesScraped": self.edges, "edgesNotScraped": self.unscraped,
                "rates": None if self.rates is None else self.rates.document()}


def origin_traffic(sweep: Sweep) -> dict[str, OriginTraffic]:
    """Per origin (only origins with an edge whose traffic was asked for)."""
    grouped: dict[str, list[NodeResult]] = {}
    for node in sweep.nodes:
        if node.target.role == "edge" and node.traffic is not None:
            grouped.setdefault(node.target.origin, []).append(node)
    result = {}
    for origin, nodes in grouped.items():
        scraped = [n for n in nodes if n.traffic is not None and n.traffic.ok]
        with_rates = [n.traffic.rates for n in scraped if n.traffic is not None and n.traffic.rates is not None]
        rates = None
        if with_rates:
            interval = max(r.interval_s for r in with_rates)
            rates = Rates(interval_s=interval,
                          requests_per_s=sum(r.requests_per_s for r in with_rates),
                          refused_per_s=sum(r.refused_per_s for r in with_rates),
                          errors_per_s=sum(r.errors_per_s for r in with_rates),
                          upstream_seconds=_origin_quantiles(scraped))
        result[origin] = OriginTraffic(origin, len(scraped), [n.target.name for n in nodes if n not in scraped], rates)
    return result


def _origin_quantiles(scraped: list[NodeResult]) -> dict[float, float]:
    # The edges' quantiles cannot be averaged: weight each edge's by its answers instead, as
    # the interval's buckets are not kept here. Exact when one edge served the interval.
    weighted: dict[float, list[tuple[float, float]]] = {}
    for node in scraped:
        rates = node.traffic.rates if node.traffic else None
        if rates is None or not rates.upstream_seconds:
            continue
        weight = max(rates.requests_per_s - rates.refused_per_s, 1e-9)
        for q, value in rates.upstream_seconds.items():
            weighted.setdefault(q, []).append((value, weight))
    return {q: sum(v * w for v, w in pairs) / sum(w for _, w in pairs) for q, pairs in weighted.items()}
