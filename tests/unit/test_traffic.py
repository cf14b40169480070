"""The edges' traffic in `kokoa health`: the edge's exposition parsed, rates and quantiles between
sweeps, an edge that cannot be scraped, the textfile through prometheus_client, the --metrics table,
the JSON, and the status page's charts."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from dataclasses import replace
from datetime import timedelta
from ipaddress import IPv4Address

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kokoa_infra.health import command as health_cli
from kokoa_infra.health.html import History, history_document, parse_history, render_page, update_history
from kokoa_infra.health.probes import SweepOptions, run_sweep, scrape_edge
from kokoa_infra.health.report import (
    render_prometheus,
    render_textfile,
    render_traffic_table,
    sweep_document,
    write_textfile,
)
from kokoa_infra.health.results import HttpsResult, NodeResult, PingResult, Sweep, TrafficMemory, origin_traffic
from kokoa_infra.health.targets import LocalNetwork, Target
from kokoa_infra.health.traffic import (
    EdgeCounters,
    MetricsFormatError,
    TrafficResult,
    bucket_deltas,
    parse_edge_metrics,
    quantile,
)
from kokoa_infra.render import TEMPLATES_DIR
from tests.support.html_preview import parse_html, sample_history
from tests.unit.test_health import CHECKED_AT

EDGE = Target("edge-1", "edge", "blog", "blog.example.test", IPv4Address("10.100.0.10"), "192.0.2.10")
EDGE2 = Target("edge-2", "edge", "blog", "blog.example.test", IPv4Address("10.100.0.11"), "192.0.2.11")
ORIGIN = Target("blog", "origin", "blog", "blog.example.test", IPv4Address("10.100.0.1"), "198.51.100.1")

# What the edge's mtail serves (mtail 3.0 with --emit_prog_label=false).
EDGE_TEXT = """# HELP kokoa_edge_bytes_total defined at edge.mtail:12:9-30
# TYPE kokoa_edge_bytes_total counter
kokoa_edge_bytes_total{direction="in"} 3200
kokoa_edge_bytes_total{direction="out"} 150000
# TYPE kokoa_edge_connections gauge
kokoa_edge_connections 3
# TYPE kokoa_edge_limited_total counter
kokoa_edge_limited_total{reason="limit"} 7
kokoa_edge_limited_total{reason="shield_new"} 12
# TYPE kokoa_edge_requests_total counter
kokoa_edge_requests_total{code_class="2xx",hostname="blog.example.test"} 90
kokoa_edge_requests_total{code_class="4xx",hostname="blog.example.test"} 8
kokoa_edge_requests_total{code_class="5xx",hostname="blog.example.test"} 2
kokoa_edge_requests_total{code_class="4xx",hostname="-"} 1
# TYPE kokoa_edge_upstream_response_seconds histogram
kokoa_edge_upstream_response_seconds_bucket{le="0.01"} 50
kokoa_edge_upstream_response_seconds_bucket{le="0.1"} 90
kokoa_edge_upstream_response_seconds_bucket{le="1"} 92
kokoa_edge_upstream_response_seconds_bucket{le="+Inf"} 92
kokoa_edge_upstream_response_seconds_sum 1.5
kokoa_edge_upstream_response_seconds_count 92
"""


def counters(**changes) -> EdgeCounters:
    return replace(parse_edge_metrics(EDGE_TEXT), **changes)


def edge_node(traffic: TrafficResult | None, target: Target = EDGE) -> NodeResult:
    return NodeResult(target=target, ping=PingResult(True, str(target.wireguard_ip), "wireguard", 0.4, 1, 1, None),
                      https=HttpsResult(True, 200, 5.0, 60, None), traffic=traffic)


def sweep_of(*nodes: NodeResult, at=CHECKED_AT) -> Sweep:
    return Sweep(checked_at=at, duration_s=0.5, checks=("ping", "https"), nodes=list(nodes))


def scraped(c: EdgeCounters, target: Target = EDGE) -> NodeResult:
    return edge_node(TrafficResult(ok=True, address=f"{target.wireguard_ip}:3903", counters=c), target)


def unscraped(target: Target = EDGE2) -> NodeResult:
    return edge_node(TrafficResult(ok=False, address=f"{target.wireguard_ip}:3903",
                                   error="metrics: connect failed: Connection refused"), target)


# --- the edge's exposition ------------------------------------------------------------------------

def test_the_edges_exposition_is_parsed():
    c = parse_edge_metrics(EDGE_TEXT)
    assert c.requests == {("blog.example.test", "2xx"): 90, ("blog.example.test", "4xx"): 8,
                          ("blog.example.test", "5xx"): 2, ("-", "4xx"): 1}
    assert c.limited == {"limit": 7, "shield_new": 12}
    assert c.bytes == {"in": 3200, "out": 150000} and c.connections == 3
    assert c.buckets == ((0.01, 50), (0.1, 90), (1.0, 92), (math.inf, 92))
    assert (c.upstream_count, c.upstream_sum) == (92, 1.5)
    assert (c.requests_total, c.refused_total, c.errors_total) == (101, 19, 2)
    assert EdgeCounters.from_document(json.loads(json.dumps(c.document()))) == c


def test_an_edge_with_no_traffic_yet_is_zero_and_a_stranger_is_an_error():
    declared = "# TYPE kokoa_edge_requests_total counter\n# TYPE kokoa_edge_connections gauge\n"
    assert parse_edge_metrics(declared).requests_total == 0
    with pytest.raises(MetricsFormatError):
        parse_edge_metrics("<html>hello</html>\n")
    with pytest.raises(MetricsFormatError):
        parse_edge_metrics("go_goroutines 12\n")


@pytest.mark.skipif(shutil.which("mtail") is None, reason="needs mtail (make setup installs it)")
def test_the_shipped_mtail_program_counts_a_log_as_the_parser_expects(tmp_path):
    """mtail itself (one-shot) on log lines in the edge's format: what the origin then parses."""
    progs = tmp_path / "progs"
    progs.mkdir()
    shutil.copy(TEMPLATES_DIR / "edge" / "edge.mtail", progs / "edge.mtail")
    combined = '10.9.1.5 - - [01/May/2025:12:00:00 +0000] "GET / HTTP/1.1" {s} 12 "-" "curl/7.88.1 kokoa x 2xx 1 1 1 -"'
    lines = [combined.format(s=200) + " kokoa blog.example.test 2xx 80 900 0.004 -",
             combined.format(s=200) + " kokoa blog.example.test 2xx 80 900 0.040, 0.002 : 0.001 -",
             combined.format(s=429) + " kokoa blog.example.test 4xx 80 200 - limit",
             combined.format(s=503) + " kokoa blog.example.test 5xx 70 300 - capacity",
             combined.format(s=503) + " kokoa blog.example.test 5xx 70 3000 - challenge",
             combined.format(s=404) + " kokoa blog.example.test 4xx 60 150 0.002 -",
             combined.format(s=444) + " kokoa - 4xx 50 0 - -",
             combined.format(s=200) + " kokoa blog.example.test 2xx 1 1 -",   # not ours: ignored
             "kokoa-shield shield_new 41", "kokoa-shield shield_open 2", "kokoa-connections 5"]
    log = tmp_path / "access.log"
    log.write_text("\n".join(lines) + "\n")
    done = subprocess.run(["mtail", "--progs", str(progs), "--logs", str(log), "--one_shot", "--one_shot_format",
                           "prometheus", "--emit_prog_label=false", "--logtostderr"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    c = parse_edge_metrics(done.stdout)
    assert c.requests == {("blog.example.test", "2xx"): 2, ("blog.example.test", "4xx"): 2,
                          ("blog.example.test", "5xx"): 2, ("-", "4xx"): 1}
    assert c.limited == {"limit": 1, "capacity": 1, "challenge": 1, "shield_new": 41, "shield_open": 2}
    assert c.bytes == {"in": 80 * 3 + 70 * 2 + 60 + 50, "out": 900 * 2 + 200 + 300 + 3000 + 150}
    assert c.connections == 5
    assert c.upstream_count == 3 and c.upstream_sum == pytest.approx(0.046)


# --- rates and quantiles --------------------------------------------------------------------------

def test_quantiles_interpolate_within_buckets_as_histogram_quantile_does():
    buckets = ((0.01, 50), (0.1, 90), (1.0, 100), (math.inf, 100))
    assert quantile(0.5, buckets) == pytest.approx(0.01)
    assert quantile(0.25, buckets) == pytest.approx(0.005)
    assert quantile(0.7, buckets) == pytest.approx(0.01 + 0.09 * 20 / 40)
    assert quantile(0.99, buckets) == pytest.approx(0.1 + 0.9 * 9 / 10)
    assert quantile(0.99, ((0.01, 1), (math.inf, 10))) == 0.01   # in +Inf: the highest bound
    assert quantile(0.5, ((0.01, 0), (math.inf, 0))) is None
    assert quantile(0.5, ()) is None


def test_bucket_deltas_take_the_interval_and_a_restart_counts_from_zero():
    before = ((0.01, 50), (math.inf, 60))
    assert bucket_deltas(((0.01, 70), (math.inf, 90)), before) == ((0.01, 20), (math.inf, 30))
    assert bucket_deltas(((0.01, 5), (math.inf, 6)), before) == ((0.01, 5), (math.inf, 6))


def test_rates_and_quantiles_are_over_the_last_interval():
    memory = TrafficMemory()
    first = memory.apply(sweep_of(scraped(counters())))
    assert first.nodes[0].traffic.rates is None   # one scrape: no rate yet
    later = counters(requests={("blog.example.test", "2xx"): 90 + 300, ("blog.example.test", "5xx"): 2 + 30},
                     limited={"limit": 7 + 60, "shield_new": 12},
                     buckets=((0.01, 50), (0.1, 90 + 300), (1.0, 92 + 300), (math.inf, 92 + 300)))
    second = memory.apply(sweep_of(scraped(later), at=CHECKED_AT + timedelta(seconds=30)))
    rates = second.nodes[0].traffic.rates
    assert rates.interval_s == 30
    assert rates.requests_per_s == pytest.approx((390 + 32 - 101) / 30)
    assert rates.refused_per_s == pytest.approx(2.0) and rates.errors_per_s == pytest.approx(1.0)
    # All 300 answers of the interval were in (0.01, 0.1]: the old 50 below 10 ms do not count.
    assert rates.upstream_seconds[0.5] == pytest.approx(0.01 + 0.09 * 0.5)
    assert not rates.under_attack
    flood = replace(later, limited={"limit": 67 + 3000, "shield_new": 12})
    third = memory.apply(sweep_of(scraped(flood), at=CHECKED_AT + timedelta(seconds=60)))
    assert third.nodes[0].traffic.rates.under_attack
    assert third.nodes[0].traffic.rates.upstream_seconds == {}   # no answer in that interval


def test_the_status_file_carries_the_counters_to_the_next_run(tmp_path):
    first = TrafficMemory().apply(sweep_of(scraped(counters())))
    document = json.loads(json.dumps(sweep_document(first)))
    memory = TrafficMemory.from_status_document(document)
    more = counters(requests={("blog.example.test", "2xx"): 190})
    rates = memory.apply(sweep_of(scraped(more), at=CHECKED_AT + timedelta(seconds=60))).nodes[0].traffic.rates
    assert rates.requests_per_s == pytest.approx((190 - 101) / 60)
    assert TrafficMemory.from_status_document({"nodes": "odd"}).seen == {}


def test_an_unscrapable_edge_is_reported_never_zero(tmp_path):
    memory = TrafficMemory()
    memory.apply(sweep_of(scraped(counters()), scraped(counters(), EDGE2)))
    sweep = memory.apply(sweep_of(scraped(counters(), EDGE), unscraped(EDGE2),
                                  at=CHECKED_AT + timedelta(seconds=30)))
    assert sweep.nodes[0].healthy and sweep.nodes[1].healthy   # traffic is not a health check
    document = sweep_document(sweep)
    assert document["nodes"][1]["traffic"] == {"ok": False, "address": "10.100.0.11:3903",
                                               "error": "metrics: connect failed: Connection refused",
                                               "rates": None}
    assert document["traffic"]["blog"]["edgesNotScraped"] == ["edge-2"]
    text = render_textfile(sweep)
    assert 'kokoa_edge_metrics_up{edge="edge-2",origin="blog"} 0.0' in text
    assert 'edge="edge-2"' not in "".join(line for line in text.splitlines() if "metrics_up" not in line)
    table = render_traffic_table(sweep)
    assert "not scraped (metrics: connect failed: Connection refused): traffic unknown" in table


def test_a_sweep_scrapes_the_edges_it_reaches_through_the_tunnel_in_the_https_pool():
    asked = []

    def scrape(address, port, timeout):
        asked.append((address, port, timeout))
        return TrafficResult(ok=True, address=f"{address}:{port}", counters=counters())

    local = LocalNetwork(addresses={IPv4Address("10.100.0.1"): "wg0"},
                         routes=((__import__("ipaddress").IPv4Network("10.100.0.0/24"), "wg0"),))
    far = Target("edge-9", "edge", "shop", "shop.example.test", IPv4Address("10.100.1.10"), "192.0.2.99")
    options = SweepOptions(checks=("https",), traffic="auto", https_timeout_s=2.0)
    https = lambda *a, **k: HttpsResult(True, 200, 1.0, 60, None)  # noqa: E731
    sweep = run_sweep([ORIGIN, EDGE, far], options, local, https=https, scrape=scrape)
    assert asked == [("10.100.0.10", 3903, 2.0)]
    # The origin (not probed by https) is left out; the far edge is another origin's tunnel.
    assert [(n.target.name, n.traffic is not None) for n in sweep.nodes] == [("edge-1", True), ("edge-9", False)]
    sweep = run_sweep([EDGE, far], replace(options, traffic="off"), local, https=https, scrape=scrape)
    assert all(n.traffic is None for n in sweep.nodes)


def test_scraping_a_closed_port_is_an_error_within_the_timeout():
    result = scrape_edge("127.0.0.1", 9, timeout_s=1.0)
    assert not result.ok and result.error.startswith("metrics: ") and result.counters is None


# --- the textfile --------------------------------------------------------------------------------

def test_the_textfile_parses_with_prometheus_client_and_keeps_the_node_series(tmp_path):
    memory = TrafficMemory()
    memory.apply(sweep_of(scraped(counters())))
    later = counters(requests={("blog.example.test", "2xx"): 390}, buckets=((0.01, 50), (0.1, 390), (1.0, 392),
                                                                           (math.inf, 392)))
    sweep = memory.apply(sweep_of(NodeResult(ORIGIN, PingResult(True, "10.100.0.1", "wireguard", 0.2, 1, 1, None),
                                             None), scraped(later), at=CHECKED_AT + timedelta(seconds=30)))
    path = tmp_path / "kokoa.prom"
    write_textfile(str(path), sweep)
    text = path.read_text()
    assert text == render_textfile(sweep)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # The node series of the hand-written renderer, same names and labels.
    legacy = {f.name: f for f in text_string_to_metric_families(render_prometheus(sweep))}
    for name, family in legacy.items():
        assert [(s.name, s.labels, s.value) for s in families[name].samples] == \
            [(s.name, s.labels, s.value) for s in family.samples]
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    base = (("edge", "edge-1"), ("origin", "blog"))
    assert families["kokoa_edge_requests"].type == "counter"
    assert samples[("kokoa_edge_requests_total", (("code_class", "2xx"), ("edge", "edge-1"),
                                                  ("hostname", "blog.example.test"), ("origin", "blog")))] == 390
    assert samples[("kokoa_edge_limited_total", base + (("reason", "shield_new"),))] == 12
    assert samples[("kokoa_edge_bytes_total", (("direction", "out"),) + base)] == 150000
    assert samples[("kokoa_edge_connections", base)] == 3
    assert families["kokoa_edge_upstream_seconds"].type == "summary"
    assert samples[("kokoa_edge_upstream_seconds", base + (("quantile", "0.5"),))] == pytest.approx(0.055)
    assert samples[("kokoa_edge_upstream_seconds_count", base)] == 92
    assert samples[("kokoa_edge_metrics_up", base)] == 1
    assert list(tmp_path.iterdir()) == [path]   # written through a temporary file, renamed


def test_without_traffic_the_textfile_is_the_node_series_alone():
    sweep = sweep_of(edge_node(None))
    text = render_textfile(sweep)
    assert "kokoa_node_up" in text and "kokoa_edge_" not in text


# --- the CLI -------------------------------------------------------------------------------------

def test_cli_metrics_prints_the_traffic_table(monkeypatch, tmp_path):
    from tests.unit.test_health import EDGE as EDGE_ENTRY
    from tests.unit.test_health import ORIGIN as ORIGIN_ENTRY
    from tests.unit.test_health import invoke

    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps({"healthTargets": [ORIGIN_ENTRY, EDGE_ENTRY]}))
    seen = {}

    def fake(targets, options, local):
        seen["traffic"] = options.traffic
        edge = next(t for t in targets if t.role == "edge")
        return sweep_of(scraped(counters(), edge))

    monkeypatch.setattr(health_cli, "run_sweep", fake)
    monkeypatch.setattr(health_cli, "check_ping_permission", lambda: None)
    status = tmp_path / "status.json"
    result = invoke("--outputs", str(outputs), "--metrics", "--status-file", str(status), "--traffic", "on")
    assert result.exit_code == 0, result.stderr
    assert seen["traffic"] == "on"
    assert result.stdout.splitlines()[0].split()[:5] == ["EDGE", "ORIGIN", "REQUESTS", "REFUSED", "5XX"]
    assert "edge-1" in result.stdout and "101" in result.stdout
    assert "rates from the next sweep on" in result.stdout
    assert json.loads(status.read_text())["nodes"][0]["traffic"]["counters"]["connections"] == 3
    assert invoke("--outputs", str(outputs), "--metrics", "--json").exit_code == 2
    assert invoke("--outputs", str(outputs), "--metrics", "--traffic", "off").exit_code == 2


# --- the page ------------------------------------------------------------------------------------

def test_the_page_charts_traffic_with_text_alternatives_and_marks_an_attack():
    sweep, history = sample_history()
    page = render_page(sweep, history, 30)
    document, _ = parse_html(page)
    charts = list(document.iter("svg"))
    assert len(charts) >= 5
    for chart in charts:
        assert chart.attrs["role"] == "img" and "requests per second" in chart.attrs["aria-label"]
        assert chart.first("title").text() == chart.attrs["aria-label"]
        assert list(chart.iter("polyline"))
    rows = {row.attrs["data-traffic"]: row for row in document.iter("tr") if row.attrs.get("data-traffic")}
    assert set(rows) >= {"origin/blog", "edge/edge-tokyo-1", "edge/edge-seoul-1", "origin/shop"}
    assert rows["edge/edge-tokyo-1"].attrs["data-under-attack"] == "true"
    assert rows["origin/blog"].attrs["data-under-attack"] == "true"
    assert rows["origin/shop"].attrs["data-under-attack"] == "false"
    assert "under attack" in rows["edge/edge-tokyo-1"].text()
    assert "not scraped" in rows["edge/edge-seoul-1"].text() and "traffic unknown" in rows["edge/edge-seoul-1"].text()
    assert "p50" in rows["origin/blog"].text()
    # The history file keeps the points; a page written from it draws the same.
    again = parse_history(json.dumps(history_document(history)))
    assert again.traffic == history.traffic


def test_the_first_sweep_has_no_rates_yet():
    sweep = TrafficMemory().apply(sweep_of(scraped(counters())))
    page = render_page(sweep, update_history(History(), sweep, 5), 30)
    assert "first scrape: rates from the next sweep on" in page
    assert origin_traffic(sweep)["blog"].rates is None
