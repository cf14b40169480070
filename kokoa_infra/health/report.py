"""Everything made from a sweep's results: JSON, table, Prometheus text, transitions."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Iterator

from kokoa_infra.health.results import (
    HEALTHY,
    UNHEALTHY,
    HttpsResult,
    NodeResult,
    Sweep,
    milliseconds,
    origin_traffic,
    summarize,
    timestamp,
)
from kokoa_infra.health.traffic import Rates
from kokoa_infra.tables import format_table


def node_document(node: NodeResult) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    if node.ping is not None:
        checks["ping"] = {"ok": node.ping.ok, "address": node.ping.address, "via": node.ping.via,
                          "rttMs": node.ping.rtt_ms, "sent": node.ping.sent,
                          "received": node.ping.received, "error": node.ping.error}
    if node.https is not None:
        checks["https"] = _https_document(node.https)
    if node.hostnames:
        # The origin's other names through this edge; `https` stays the domain's.
        redirects = {h.name: h.redirect_to for h in node.target.hostnames}
        checks["hostnames"] = [{"hostname": h.hostname, "redirectTo": redirects.get(h.hostname),
                                **_https_document(h.https), "location": h.https.location} for h in node.hostnames]
    target = node.target
    document = {"name": target.name, "role": target.role, "origin": target.origin,
                "domain": target.domain, "status": node.status, "checks": checks}
    if node.traffic is not None:
        document["traffic"] = node.traffic.document()
    return document


def _https_document(https: HttpsResult) -> dict[str, Any]:
    return {"ok": https.ok, "code": https.code, "latencyMs": https.latency_ms,
            "certDaysLeft": https.cert_days_left, "error": https.error}


def sweep_document(sweep: Sweep) -> dict[str, Any]:
    """The `--json` / `--status-file` document."""
    return {"checkedAt": timestamp(sweep.checked_at),
            "durationMs": round(sweep.duration_s * 1000, 1),
            "checks": list(sweep.checks),
            "nodes": [node_document(node) for node in sweep.nodes],
            "summary": summarize(sweep.nodes)} | _traffic_document(sweep)


def _traffic_document(sweep: Sweep) -> dict[str, Any]:
    origins = origin_traffic(sweep)
    return {"traffic": {name: total.document() for name, total in origins.items()}} if origins else {}


def _table_row(node: NodeResult) -> list[str]:
    ping, https = node.ping, node.https
    return [
        node.target.name, node.target.role, node.target.origin,
        "healthy" if node.healthy else "UNHEALTHY",
        "-" if ping is None else f"{ping.address} ({ping.via})",
        "-" if ping is None else (milliseconds(ping.rtt_ms) if ping.ok else "no reply"),
        "-" if https is None else (str(https.code) if https.code is not None else "fail"),
        "-" if https is None else milliseconds(https.latency_ms),
        "-" if https is None or https.cert_days_left is None else f"{https.cert_days_left} d",
        node.problem(),
    ]


def render_table(sweep: Sweep) -> str:
    """A table of every node, unhealthy ones first, and a summary line."""
    header = ["NAME", "ROLE", "ORIGIN", "STATUS", "PING ADDRESS", "RTT", "HTTPS", "LATENCY",
              "CERT", "PROBLEM"]
    ordered = sorted(sweep.nodes, key=lambda node: node.healthy)   # stable: keeps output order
    table = format_table(header, [_table_row(node) for node in ordered])
    return "\n".join([table, "", render_summary_line(sweep)]) + "\n"


def render_summary_line(sweep: Sweep) -> str:
    """One line per sweep, for logs and pipes."""
    counts = summarize(sweep.nodes)
    line = (f"{timestamp(sweep.checked_at)} {counts['healthy']}/{counts['total']} healthy "
            f"({sweep.duration_s:.2f} s)")
    unhealthy = [f"{node.key} [{node.problem()}]" for node in sweep.nodes if not node.healthy]
    return line + (": unhealthy " + ", ".join(unhealthy) if unhealthy else "")


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(node: NodeResult, **extra: str) -> str:
    pairs = {"name": node.target.name, "role": node.target.role, "origin": node.target.origin,
             **extra}
    return "{" + ",".join(f'{key}="{_label_value(value)}"' for key, value in pairs.items()) + "}"


_METRICS = {
    "kokoa_node_up": "1 when every selected check of the node passed.",
    "kokoa_ping_up": "1 when the node answered ICMP echo.",
    "kokoa_ping_rtt_seconds": "Mean ICMP echo round trip.",
    "kokoa_https_up": "1 when GET https://<domain>/ through the edge returned a status below 500.",
    "kokoa_https_status_code": "HTTP status of the probe through the edge.",
    "kokoa_https_latency_seconds": "Time from connect to response headers through the edge.",
    "kokoa_cert_days_left": "Whole days until the edge's certificate expires.",
    "kokoa_hostname_up": ("1 when GET https://<hostname>/ through the edge passed (below 500; a redirecting "
                          "name: its 301), for every name of the origin."),
    "kokoa_health_nodes": "Nodes by status in the last sweep.",
    "kokoa_health_last_sweep_timestamp_seconds": "When the last sweep started (Unix time).",
    "kokoa_health_sweep_duration_seconds": "How long the last sweep took.",
}


def render_prometheus(sweep: Sweep) -> str:
    """The sweep in the node-exporter textfile format."""
    samples: dict[str, list[str]] = {name: [] for name in _METRICS}
    for node in sweep.nodes:
        samples["kokoa_node_up"].append(f"{_labels(node)} {int(node.healthy)}")
        if node.ping is not None:
            samples["kokoa_ping_up"].append(
                f"{_labels(node, address=node.ping.address, via=node.ping.via)} {int(node.ping.ok)}")
            if node.ping.rtt_ms is not None:
                samples["kokoa_ping_rtt_seconds"].append(f"{_labels(node)} {node.ping.rtt_ms / 1000:.6f}")
        if node.https is not None:
            samples["kokoa_https_up"].append(f"{_labels(node)} {int(node.https.ok)}")
            if node.https.code is not None:
                samples["kokoa_https_status_code"].append(f"{_labels(node)} {node.https.code}")
            if node.https.latency_ms is not None:
                samples["kokoa_https_latency_seconds"].append(
                    f"{_labels(node)} {node.https.latency_ms / 1000:.6f}")
            if node.https.cert_days_left is not None:
                samples["kokoa_cert_days_left"].append(f"{_labels(node)} {node.https.cert_days_left}")
        samples["kokoa_hostname_up"] += [f"{_labels(node, hostname=name)} {int(https.ok)}"
                                         for name, https in node.https_by_name()]
    counts = summarize(sweep.nodes)
    samples["kokoa_health_nodes"] = [f'{{status="{status}"}} {counts[status]}'
                                     for status in (HEALTHY, UNHEALTHY)]
    samples["kokoa_health_last_sweep_timestamp_seconds"] = [f" {sweep.checked_at.timestamp():.0f}"]
    samples["kokoa_health_sweep_duration_seconds"] = [f" {sweep.duration_s:.3f}"]
    lines: list[str] = []
    for name, help_text in _METRICS.items():
        if samples[name]:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            lines += [f"{name}{sample}" for sample in samples[name]]
    return "\n".join(lines) + "\n"


def statuses(sweep: Sweep) -> dict[str, str]:
    """node key ("edge/<name>") -> "healthy" | "unhealthy"."""
    return {node.key: node.status for node in sweep.nodes}


def statuses_from_document(text: str) -> dict[str, str]:
    """The statuses recorded in an earlier status file; {} when it cannot be read as one."""
    try:
        document = json.loads(text)
        return {f"{node['role']}/{node['name']}": node["status"] for node in document["nodes"]
                if node.get("status") in (HEALTHY, UNHEALTHY)}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def transitions(previous: Mapping[str, str], sweep: Sweep) -> list[str]:
    """Log lines for nodes whose status changed; a node seen for the first time counts only if unhealthy."""
    lines = []
    for node in sweep.nodes:
        before = previous.get(node.key)
        if before == node.status or (before is None and node.healthy):
            continue
        change = f"{before or 'new'} -> {node.status}"
        detail = f": {node.problem()}" if not node.healthy else ""
        lines.append(f"{timestamp(sweep.checked_at)} kokoa-health {node.key} "
                     f"(origin {node.target.origin}) {change}{detail}")
    return lines


def dumps(document: dict[str, Any], pretty: bool) -> str:
    return json.dumps(document, indent=2 if pretty else None) + "\n"


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


def _registry(sweep: Sweep, extra: str) -> Any:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SweepCollector(sweep, extra))  # type: ignore[arg-type]
    return registry


def render_textfile(sweep: Sweep, extra: str = "") -> str:
    """The whole textfile, as write_textfile writes it."""
    from prometheus_client import generate_latest

    return generate_latest(_registry(sweep, extra)).decode()


def write_textfile(path: str, sweep: Sweep, extra: str = "") -> None:
    """Write the sweep's series, and `extra` ones given as Prometheus text, to `path` (atomically:
    prometheus_client writes a temporary file beside it and renames it)."""
    from prometheus_client import write_to_textfile

    write_to_textfile(path, _registry(sweep, extra))


# --- the --metrics table -------------------------------------------------------------------------

def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _seconds(rates: Rates | None, q: float) -> str:
    if rates is None or q not in rates.upstream_seconds:
        return "-"
    return f"{rates.upstream_seconds[q] * 1000:.1f} ms"


def render_traffic_table(sweep: Sweep) -> str:
    """`kokoa health --metrics`: each edge's traffic and each origin's total."""
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
        rows.append([f"(origin total, {total.edges} scraped)", origin, "", "", "",
                     _rate(rates and rates.requests_per_s),
                     _rate(rates and rates.refused_per_s), _rate(rates and rates.errors_per_s), "",
                     _seconds(rates, 0.5), _seconds(rates, 0.99), note.strip()])
    if not rows:
        return "no edge traffic collected: run on an origin (its tunnel reaches its edges) or give --traffic on\n"
    return format_table(header, rows) + "\n"
