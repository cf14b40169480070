"""The edges' traffic in `kokoa health`: scraped from each edge's mtail over the tunnel, turned into
rates and the origin's response-time quantiles over the last interval, and written with
prometheus_client (docs/health.md, "Traffic")."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# The edge's mtail (kokoa_infra/render.py METRICS_PORT): on its WireGuard address only.
METRICS_PORT = 3903
METRICS_PATH = "/metrics"
MAX_METRICS_BYTES = 4 << 20
QUANTILES = (0.5, 0.9, 0.99)
CODE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
# Refused answers a second (limits, capacity, challenges, the shield's drops) from which
# the status page marks an edge, and the origin, "under attack".
ATTACK_REFUSED_PER_S = 10.0
TRAFFIC_MODES = ("auto", "on", "off")

EDGE_METRICS = {   # the edge's mtail names (templates/edge/edge.mtail)
    "requests": "kokoa_edge_requests_total",
    "limited": "kokoa_edge_limited_total",
    "bytes": "kokoa_edge_bytes_total",
    "connections": "kokoa_edge_connections",
    "upstream": "kokoa_edge_upstream_response_seconds",
}


class MetricsFormatError(ValueError):
    """The edge answered something that is not its metrics."""


@dataclass(frozen=True)
class EdgeCounters:
    """One scrape of an edge: counters since its mtail started, and the connections now."""

    requests: Mapping[tuple[str, str], float]      # (hostname, code class) -> requests
    limited: Mapping[str, float]                    # reason -> refused requests (or dropped packets)
    bytes: Mapping[str, float]                      # "in" / "out" -> bytes
    connections: float | None
    buckets: tuple[tuple[float, float], ...] = ()   # (upper bound, cumulative count), +Inf last
    upstream_count: float = 0.0
    upstream_sum: float = 0.0

    @property
    def requests_total(self) -> float:
        return sum(self.requests.values())

    @property
    def refused_total(self) -> float:
        return sum(self.limited.values())

    @property
    def errors_total(self) -> float:
        return sum(count for (_, code), count in self.requests.items() if code == "5xx")

    def document(self) -> dict[str, Any]:
        hostnames: dict[str, dict[str, float]] = {}
        for (hostname, code), count in sorted(self.requests.items()):
            hostnames.setdefault(hostname, {})[code] = count
        return {"requests": hostnames, "limited": dict(sorted(self.limited.items())),
                "bytes": dict(sorted(self.bytes.items())), "connections": self.connections,
                "upstream": {"buckets": [[_le_text(le), count] for le, count in self.buckets],
                             "count": self.upstream_count, "sum": self.upstream_sum}}

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> EdgeCounters:
        """The counters a status file recorded (ValueError/KeyError/TypeError when malformed)."""
        upstream = document["upstream"]
        return cls(requests={(str(host), str(code)): float(count)
                             for host, codes in document["requests"].items() for code, count in codes.items()},
                   limited={str(k): float(v) for k, v in document["limited"].items()},
                   bytes={str(k): float(v) for k, v in document["bytes"].items()},
                   connections=None if document["connections"] is None else float(document["connections"]),
                   buckets=tuple((float(le), float(count)) for le, count in upstream["buckets"]),
                   upstream_count=float(upstream["count"]), upstream_sum=float(upstream["sum"]))


def _le_text(le: float) -> str:
    return "+Inf" if math.isinf(le) else f"{le:g}"


@dataclass(frozen=True)
class Rates:
    """What an edge (or an origin's edges together) did between two sweeps."""

    interval_s: float
    requests_per_s: float
    refused_per_s: float
    errors_per_s: float              # 5xx answers a second
    upstream_seconds: Mapping[float, float] = field(default_factory=dict)   # quantile -> s; {} without answers

    @property
    def under_attack(self) -> bool:
        return self.refused_per_s >= ATTACK_REFUSED_PER_S

    def document(self) -> dict[str, Any]:
        return {"intervalS": round(self.interval_s, 3), "requestsPerS": round(self.requests_per_s, 3),
                "refusedPerS": round(self.refused_per_s, 3), "errorsPerS": round(self.errors_per_s, 3),
                "upstreamSeconds": {f"{q:g}": round(v, 6) for q, v in self.upstream_seconds.items()},
                "underAttack": self.under_attack}


@dataclass(frozen=True)
class TrafficResult:
    """An edge's metrics endpoint in one sweep: its counters, or why they could not be had
    (never zero traffic). `rates` is filled in against the previous sweep's counters."""

    ok: bool
    address: str
    error: str | None = None
    counters: EdgeCounters | None = None
    rates: Rates | None = None

    def document(self) -> dict[str, Any]:
        document: dict[str, Any] = {"ok": self.ok, "address": self.address, "error": self.error}
        if self.counters is not None:
            document["counters"] = self.counters.document()
        document["rates"] = None if self.rates is None else self.rates.document()
        return document


# --- the edge's exposition -----------------------------------------------------------------------

def parse_edge_metrics(text: str) -> EdgeCounters:
    """The edge's mtail exposition -> EdgeCounters (MetricsFormatError when it is not one)."""
    from prometheus_client.parser import text_string_to_metric_families

    requests: dict[tuple[str, str], float] = {}
    limited: dict[str, float] = {}
    sent: dict[str, float] = {}
    connections: float | None = None
    buckets: dict[float, float] = {}
    count = total = 0.0
    seen = False
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name, labels, value = sample.name, sample.labels, float(sample.value)
                if name == EDGE_METRICS["requests"]:
                    key = (labels.get("hostname", "-"), labels.get("code_class", ""))
                    requests[key] = requests.get(key, 0.0) + value
                elif name == EDGE_METRICS["limited"]:
                    limited[labels.get("reason", "")] = limited.get(labels.get("reason", ""), 0.0) + value
                elif name == EDGE_METRICS["bytes"]:
                    sent[labels.get("direction", "")] = sent.get(labels.get("direction", ""), 0.0) + value
                elif name == EDGE_METRICS["connections"]:
                    connections = value
                elif name == EDGE_METRICS["upstream"] + "_bucket":
                    le = float(labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + value
                elif name == EDGE_METRICS["upstream"] + "_count":
                    count += value
                elif name == EDGE_METRICS["upstream"] + "_sum":
                    total += value
                else:
                    continue
                seen = True
    except (ValueError, KeyError, TypeError) as exc:
        raise MetricsFormatError(f"not Prometheus text: {exc}") from exc
    if not seen and text.strip():
        # mtail before its first line exports the declarations alone (no samples): that is
        # an edge with no traffic yet. Anything else without a Kokoa series is not the edge's.
        if "kokoa_edge_" not in text:
            raise MetricsFormatError("no kokoa_edge_ series in the answer")
    return EdgeCounters(requests=requests, limited=limited, bytes=sent, connections=connections,
                        buckets=tuple(sorted(buckets.items())), upstream_count=count, upstream_sum=total)


# --- rates and quantiles over the last interval ------------------------------------------------

def _delta(now: float, before: float) -> float:
    """A counter's increase; a smaller value means the exporter restarted: count from zero."""
    return now - before if now >= before else now


def bucket_deltas(now: Iterable[tuple[float, float]], before: Iterable[tuple[float, float]]
                  ) -> tuple[tuple[float, float], ...]:
    """Cumulative bucket counts of the interval (each bucket's increase; a reset counts from zero)."""
    earlier = dict(before)
    current = tuple(now)
    if any(count < earlier.get(le, 0.0) for le, count in current):
        return current   # mtail restarted: everything it has is new
    return tuple((le, count - earlier.get(le, 0.0)) for le, count in current)


def quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The q-quantile of cumulative buckets, interpolated linearly within its bucket as Prometheus'
    histogram_quantile does (from 0 in the first; the highest finite bound in +Inf); None when empty."""
    ordered = sorted(buckets)
    if not ordered or not math.isinf(ordered[-1][0]) or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for le, count in ordered:
        if count >= rank:
            if math.isinf(le):
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


def _merge_buckets(many: Iterable[Iterable[tuple[float, float]]]) -> tuple[tuple[float, float], ...]:
    merged: dict[float, float] = {}
    for buckets in many:
        for le, count in buckets:
            merged[le] = merged.get(le, 0.0) + count
    return tuple(sorted(merged.items()))


def rates_between(now: EdgeCounters, before: EdgeCounters, interval_s: float) -> Rates:
    interval_s = max(interval_s, 1e-3)
    deltas = bucket_deltas(now.buckets, before.buckets)
    return Rates(interval_s=interval_s,
                 requests_per_s=_delta(now.requests_total, before.requests_total) / interval_s,
                 refused_per_s=_delta(now.refused_total, before.refused_total) / interval_s,
                 errors_per_s=_delta(now.errors_total, before.errors_total) / interval_s,
                 upstream_seconds=_quantiles(deltas))


def _quantiles(buckets: tuple[tuple[float, float], ...]) -> dict[float, float]:
    found = {q: quantile(q, buckets) for q in QUANTILES}
    return {q: value for q, value in found.items() if value is not None}
