"""The edges' traffic in `kokoa health`: scraped from each edge's mtail over the tunnel, turned into
rates and the origin's response-time quantiles over the last interval, and written with
prometheus_client (docs/health.md, "Traffic")."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from kokoa_infra.health.results import NodeResult, Sweep

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

EDGE_METRICS = {   # the edge's mtail names (kokoa_infra/templates/edge/edge.mtail)
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


def scrape_edge(address: str, port: int = METRICS_PORT, timeout_s: float = 3.0) -> TrafficResult:
    """GET http://address:port/metrics (through the tunnel) within `timeout_s`; every failure is a result."""
    import urllib3

    where = f"{address}:{port}"
    pool = urllib3.HTTPConnectionPool(address, port, maxsize=1, retries=False,
                                      timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s))
    try:
        response = pool.urlopen("GET", METRICS_PATH, headers={"User-Agent": "kokoa-health"},
                                preload_content=False, redirect=False, retries=False)
        try:
            body = response.read(MAX_METRICS_BYTES + 1, decode_content=True)
        finally:
            response.release_conn()
        if response.status != 200:
            return TrafficResult(ok=False, address=where, error=f"metrics: HTTP {response.status}")
        if len(body) > MAX_METRICS_BYTES:
            return TrafficResult(ok=False, address=where, error="metrics: answer too large")
        return TrafficResult(ok=True, address=where, counters=parse_edge_metrics(body.decode("utf-8", "replace")))
    except MetricsFormatError as exc:
        return TrafficResult(ok=False, address=where, error=f"metrics: {exc}")
    except Exception as exc:  # unreachable, refused, timed out: reported, never zero traffic
        from kokoa_infra.health.probes import _https_error_text
        return TrafficResult(ok=False, address=where, error=f"metrics: {_https_error_text(exc)}")
    finally:
        pool.close()


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
        from datetime import datetime, timezone
        memory = cls()
        try:
            at = datetime.strptime(document["checkedAt"], "%Y-%m-%dT%H:%M:%SZ").replace(
                tzinfo=timezone.utc).timestamp()
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


# --- the textfile --------------------------------------------------------------------------------

class SweepCollector:
    """A prometheus_client collector of one sweep: the node series of report.render_prometheus
    (re-read, names and labels as they were) and the edges' traffic."""

    def __init__(self, sweep: Sweep, extra: str = "") -> None:
        self.sweep = sweep
        self.extra = extra  # more series as Prometheus text (the failover agent's)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
        from prometheus_client.parser import text_string_to_metric_families

        from kokoa_infra.health.report import render_prometheus

        yield from text_string_to_metric_families(render_prometheus(self.sweep))
        if self.extra:
            yield from text_string_to_metric_families(self.extra)
        edges = [n for n in self.sweep.nodes if n.target.role == "edge" and n.traffic is not None]
        up = GaugeMetricFamily("kokoa_edge_metrics_up", "1 when the edge's traffic metrics were scraped "
                               "through the tunnel this sweep; 0 when not (its traffic is unknown, not zero).",
                               labels=["origin", "edge"])
        requests = CounterMetricFamily("kokoa_edge_requests", "Requests the edge answered, by site and "
                                       "status class (its access log, since its mtail started).",
                                       labels=["origin", "edge", "hostname", "code_class"])
        limited = CounterMetricFamily("kokoa_edge_limited", "Requests the edge refused itself, by reason: "
                                      "limit (429), capacity (503 over the share), challenge (503 challenge "
                                      "page); shield_new, shield_open, shield_untracked: new connections the "
                                      "kernel firewall dropped (packets, since the firewall was loaded).",
                                      labels=["origin", "edge", "reason"])
        sent = CounterMetricFamily("kokoa_edge_bytes", "Bytes of requests (in) and responses (out), "
                                   "headers included.", labels=["origin", "edge", "direction"])
        connections = GaugeMetricFamily("kokoa_edge_connections", "Client connections open at the edge "
                                        "(nginx stub_status, sampled every few seconds).",
                                        labels=["origin", "edge"])
        upstream = Metric("kokoa_edge_upstream_seconds", "The origin's response time through the "
                          "tunnel: quantiles over the last sweep interval (from the edge's histogram "
                          "buckets), count and sum since the edge's mtail started.", "summary")
        for node in edges:
            traffic = node.traffic
            assert traffic is not None
            base = [node.target.origin, node.target.name]
            up.add_metric(base, 1.0 if traffic.ok else 0.0)
            counters = traffic.counters
            if not traffic.ok or counters is None:
                continue
            for (hostname, code), value in sorted(counters.requests.items()):
                requests.add_metric(base + [hostname, code], value)
            for reason, value in sorted(counters.limited.items()):
                limited.add_metric(base + [reason], value)
            for direction, value in sorted(counters.bytes.items()):
                sent.add_metric(base + [direction], value)
            if counters.connections is not None:
                connections.add_metric(base, counters.connections)
            labels = {"origin": base[0], "edge": base[1]}
            if traffic.rates is not None:
                for q, value in traffic.rates.upstream_seconds.items():
                    upstream.add_sample("kokoa_edge_upstream_seconds", labels | {"quantile": f"{q:g}"}, value)
            upstream.add_sample("kokoa_edge_upstream_seconds_count", labels, counters.upstream_count)
            upstream.add_sample("kokoa_edge_upstream_seconds_sum", labels, counters.upstream_sum)
        if edges:
            yield from (up, requests, limited, sent, connections, upstream)


def render_textfile(sweep: Sweep, extra: str = "") -> str:
    """The whole textfile, as write_textfile writes it."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SweepCollector(sweep, extra))  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def write_textfile(path: str, sweep: Sweep, extra: str = "") -> None:
    """Write the sweep's series, and `extra` ones given as Prometheus text, to `path` (atomically:
    prometheus_client writes a temporary file beside it and renames it)."""
    from prometheus_client import CollectorRegistry, write_to_textfile

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SweepCollector(sweep, extra))  # type: ignore[arg-type]
    write_to_textfile(path, registry)


# --- the --metrics table -------------------------------------------------------------------------

def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _seconds(rates: Rates | None, q: float) -> str:
    if rates is None or q not in rates.upstream_seconds:
        return "-"
    return f"{rates.upstream_seconds[q] * 1000:.1f} ms"


def render_traffic_table(sweep: Sweep) -> str:
    """`kokoa health --metrics`: each edge's traffic and each origin's total."""
    from kokoa_infra.tables import format_table

    header = ["EDGE", "ORIGIN", "REQUESTS", "REFUSED", "5XX", "REQ/S", "REFUSED/S", "5XX/S", "CONNS",
              "ORIGIN P50", "ORIGIN P99", "NOTE"]
    rows = []
    for node in sweep.nodes:
        traffic = node.traffic
        if node.target.role != "edge" or traffic is None:
            continue
        if not traffic.ok or traffic.counters is None:
            rows.append([node.target.name, node.target.origin] + ["?"] * 7 + ["-", "-",
                         f"not scraped ({traffic.error}): traffic unknown"])
            continue
        counters, rates = traffic.counters, traffic.rates
        note = "UNDER ATTACK" if rates is not None and rates.under_attack else (
            "" if rates is not None else "rates from the next sweep on")
        rows.append([node.target.name, node.target.origin, f"{counters.requests_total:.0f}",
                     f"{counters.refused_total:.0f}", f"{counters.errors_total:.0f}",
                     _rate(rates and rates.requests_per_s), _rate(rates and rates.refused_per_s),
                     _rate(rates and rates.errors_per_s),
                     "-" if counters.connections is None else f"{counters.connections:.0f}",
                     _seconds(rates, 0.5), _seconds(rates, 0.99), note])
    for origin, total in origin_traffic(sweep).items():
        rates = total.rates
        note = ("UNDER ATTACK" if rates is not None and rates.under_attack else "") + (
            f" {len(total.unscraped)} edge(s) not scraped" if total.unscraped else "")
        rows.append([f"(origin total, {total.edges} scraped)", origin, "", "", "", _rate(rates and rates.requests_per_s),
                     _rate(rates and rates.refused_per_s), _rate(rates and rates.errors_per_s), "",
                     _seconds(rates, 0.5), _seconds(rates, 0.99), note.strip()])
    if not rows:
        return "no edge traffic collected: run on an origin (its tunnel reaches its edges) or give --traffic on\n"
    return format_table(header, rows) + "\n"
