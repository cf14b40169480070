"""Traffic you can see, end to end in the lab: a known mix through an edge (N successes, M refused by
the rate limit as the client saw them, a 404) is found exactly in what `kokoa health` collects on
the origin through the tunnel: its JSON, its Prometheus textfile (parsed with prometheus_client's
parser) and its status page, whose charts headless Chromium paints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kokoa_infra.health.html import CHART_HEIGHT
from kokoa_infra.render import COUNTERS_INTERVAL, LOG_FLUSH_S
from tests.support.html_preview import chromium_binary, page_rows, parse_html, screenshot

REPO = Path(__file__).resolve().parents[2]
SUCCESSES = 10
BURST_REQUESTS = 90          # over one HTTP/2 connection: beyond the burst (40) come 429s
DEADLINE_S = 3 * (LOG_FLUSH_S + COUNTERS_INTERVAL) + 15
REQ_COLOUR, REF_COLOUR = (0x09, 0x69, 0xDA), (0xBC, 0x4C, 0x00)   # html.py STYLE --req, --ref


def health(lab, origin: dict, directory: Path) -> dict:
    """One `kokoa health --once` on the origin host (no HTTPS probe: it would add requests to the
    mix), writing the status file (its counters carry to the next run), textfile and page."""
    result = subprocess.run(
        ["ip", "netns", "exec", origin["netns"], sys.executable, "-m", "kokoa_infra.health",
         "--once", "--json", "--checks", "ping", "--outputs", str(lab.outputs_file),
         "--status-file", str(directory / "status.json"), "--prometheus", str(directory / "kokoa.prom"),
         "--html", str(directory / "status.html"), "--html-interval", "5"],
        env=os.environ | {"PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def edge_traffic(document: dict, edge: dict) -> dict:
    node = next(n for n in document["nodes"] if n["role"] == "edge" and n["name"] == edge["name"])
    return node["traffic"]


def counts(traffic: dict, domain: str) -> tuple[float, float, float]:
    """(2xx, 4xx, refused by the limits) of the edge's site."""
    counters = traffic["counters"]
    site = counters["requests"].get(domain, {})
    return site.get("2xx", 0), site.get("4xx", 0), counters["limited"].get("limit", 0)


def client_codes(lab, *args: str) -> list[int]:
    done = lab.on_host(lab.status["client"], "curl", "-s", "--max-time", "20", "-w", "%{http_code}\\n",
                       "--cacert", lab.status["caBundle"], *args, check=False, timeout=60)
    return [int(code) for code in done.stdout.split()]


def test_a_known_mix_is_counted_exactly_and_shown(lab_env, make_netns, tmp_path):
    lab = lab_env
    origin = lab.status["origins"][0]
    edge = next(e for e in lab.status["edges"] if e["origin"] == origin["name"])
    domain = origin["domain"]
    # The edge's exporter answers the origin through the tunnel (mtail may still be starting).
    deadline = time.monotonic() + DEADLINE_S
    baseline = health(lab, origin, tmp_path)
    while not edge_traffic(baseline, edge)["ok"] and time.monotonic() < deadline:
        time.sleep(1)
        baseline = health(lab, origin, tmp_path)
    assert edge_traffic(baseline, edge)["ok"], edge_traffic(baseline, edge)
    # The baseline once the counters stand still: what earlier tests sent has been flushed and
    # read (mtail runs at the lowest priority and lags on a busy machine), nothing else is sending.
    before, quiet = counts(edge_traffic(baseline, edge), domain), False
    while not quiet and time.monotonic() < deadline + DEADLINE_S:
        time.sleep(LOG_FLUSH_S + 1)
        now = counts(edge_traffic(health(lab, origin, tmp_path), edge), domain)
        before, quiet = now, now == before
    assert quiet, f"the edge's counters kept moving before the mix: {before}"

    resolve = ["--resolve", f"{domain}:443:{edge['publicIp']}", "--resolve", f"{domain}:80:{edge['publicIp']}"]
    seen: list[int] = []
    for _ in range(SUCCESSES):   # paced well below the rate limit: each a success
        seen += client_codes(lab, *resolve, "-o", "/dev/null", f"https://{domain}/")
        time.sleep(0.2)
    # A 404 from the origin through the edge (an ACME token that does not exist).
    missing = client_codes(lab, *resolve, "-o", "/dev/null",
                           f"http://{domain}/.well-known/acme-challenge/kokoa-lab-no-such-token")
    assert missing == [404]
    time.sleep(2.5)   # the limit's bucket refills
    burst = ["--http2", "-Z", "--parallel-max", str(BURST_REQUESTS)]
    for _ in range(BURST_REQUESTS):
        burst += [f"https://{domain}/", "-o", "/dev/null"]
    seen += client_codes(lab, *resolve, *burst)
    assert len(seen) == SUCCESSES + BURST_REQUESTS and set(seen) <= {200, 429}, seen
    successes, limited = seen.count(200), seen.count(429)
    assert seen[:SUCCESSES] == [200] * SUCCESSES and limited > 0
    expected = (before[0] + successes, before[1] + limited + 1, before[2] + limited)

    # The buffered log is flushed within LOG_FLUSH_S; every sweep after the mix scrapes again.
    deadline = time.monotonic() + DEADLINE_S
    time.sleep(LOG_FLUSH_S)
    document = health(lab, origin, tmp_path)
    while counts(edge_traffic(document, edge), domain) != expected and time.monotonic() < deadline:
        time.sleep(2)
        document = health(lab, origin, tmp_path)
    traffic = edge_traffic(document, edge)
    assert counts(traffic, domain) == expected, (traffic, seen)
    time.sleep(2)
    final = health(lab, origin, tmp_path)   # one more sweep: the counts stay (exactly, no overshoot)
    traffic = edge_traffic(final, edge)
    assert counts(traffic, domain) == expected
    assert traffic["counters"]["bytes"]["in"] > 0 and traffic["counters"]["upstream"]["count"] > 0

    # The textfile parses with prometheus_client and says the same.
    families = {f.name: f for f in text_string_to_metric_families((tmp_path / "kokoa.prom").read_text())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in families.values() for s in family.samples}
    labels = (("edge", edge["name"]), ("origin", origin["name"]))
    assert samples[("kokoa_edge_requests_total", (("code_class", "2xx"), labels[0], ("hostname", domain),
                                                  labels[1]))] == expected[0]
    assert samples[("kokoa_edge_requests_total", (("code_class", "4xx"), labels[0], ("hostname", domain),
                                                  labels[1]))] == expected[1]
    assert samples[("kokoa_edge_limited_total", labels + (("reason", "limit"),))] == expected[2]
    assert samples[("kokoa_edge_metrics_up", labels)] == 1
    assert ("kokoa_edge_connections", labels) in samples
    assert families["kokoa_edge_bytes"].type == "counter" and families["kokoa_edge_upstream_seconds"].type == "summary"
    assert "kokoa_node_up" in families

    # The page after the mix: the edge's traffic row has figures and a chart that Chromium paints.
    page = tmp_path / "status.html"
    document_html, _ = parse_html(page.read_text())
    rows = {row.attrs["data-traffic"]: row for row in document_html.iter("tr") if row.attrs.get("data-traffic")}
    row = rows[f"edge/{edge['name']}"]
    assert list(row.iter("polyline")) and "requests per second" in row.first("svg").attrs["aria-label"]
    # The refused line leaves the floor somewhere: the 429s are drawn, not only their key.
    refused = [float(point.split(",")[1]) for line in row.iter("polyline") if line.attrs["class"] == "ref"
               for point in line.attrs["points"].split()]
    assert refused and min(refused) < CHART_HEIGHT - 3
    assert f"origin/{origin['name']}" in rows
    assert page_rows(document_html)[f"edge/{edge['name']}"].state == "serving"
    if chromium_binary() is None:
        pytest.skip("needs chromium for the screenshot (make setup installs it)")
    from PIL import Image
    png = tmp_path / "status.png"
    run = screenshot(page, png, netns=make_netns(), window=(1100, 2400))
    assert run.requested_urls == []
    with Image.open(png) as image:
        data = image.convert("RGB").tobytes()
    pixels = [tuple(data[i:i + 3]) for i in range(0, len(data), 3)]

    def near(pixel, colour, tolerance=40):
        return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour))

    # The legend's keys are 100 pixels each: beyond them, the lines of the charts (a few sweeps
    # long: at least 50 pixels each colour).
    assert sum(near(p, REQ_COLOUR) for p in pixels) > 150    # the requests lines
    assert sum(near(p, REF_COLOUR) for p in pixels) > 150    # the refused lines: the 429s
