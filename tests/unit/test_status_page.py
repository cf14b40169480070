"""`kokoa health --html`: the page's content, secrecy and structure, its bounded history, the CLI
and deployment lines."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shlex
import stat
import threading
from datetime import datetime, timedelta, timezone
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from click.testing import CliRunner

from kokoa_infra.health import command as health_cli
from kokoa_infra.health.command import Reporter, health, run_interval
from kokoa_infra.health.html import (
    DRAINED,
    SERVING,
    UNHEALTHY,
    History,
    StatusPage,
    history_document,
    measured_interval,
    node_state,
    parse_history,
    render_page,
    update_history,
)
from kokoa_infra.health.probes import SweepOptions
from kokoa_infra.health.results import HttpsResult, NodeResult, PingResult, Sweep
from kokoa_infra.health.targets import LocalNetwork, Target, parse_targets
from tests.support.html_preview import (
    SAMPLE_END,
    SAMPLE_INTERVAL_S,
    page_rows,
    parse_html,
    sample_history,
    sample_sweep,
    sample_targets,
)

REPO = Path(__file__).resolve().parents[2]
STATE_WORDS = {SERVING: "\u2713 serving", DRAINED: "\u2013 drained", UNHEALTHY: "\u2717 unhealthy"}


def named(name: str) -> Target:
    return next(target for target in sample_targets() if target.name == name)


def ms(value: float) -> str:
    return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms"


@pytest.fixture(scope="module")
def sample():
    """The sample story (48 sweeps, the last with edge-nagoya-1 and edge-seoul-1 down) and its page."""
    sweep, history = sample_history()
    page = render_page(sweep, history, SAMPLE_INTERVAL_S)
    document, doctype = parse_html(page)
    return sweep, history, page, document, doctype


# --- what the page shows ---------------------------------------------------------------------

def test_every_node_has_a_row_with_its_state_reason_and_figures(sample):
    sweep, history, _page, document, _ = sample
    rows = page_rows(document)
    assert set(rows) == {node.key for node in sweep.nodes}
    states = {}
    for node in sweep.nodes:
        row, state = rows[node.key], node_state(node)
        states[node.key] = state
        assert row.state == state
        assert row.cells["State"].startswith(STATE_WORDS[state])   # text, not colour alone
        assert row.header.startswith(node.target.name)
        if node.ping.ok:
            assert row.cells["Ping RTT"].startswith(ms(node.ping.rtt_ms))
        else:
            assert row.cells["Ping RTT"].startswith("no reply")
            assert f"ping: {node.ping.error}" in row.cells["State"]
        if node.target.role == "edge":
            https = node.https
            if https.code is not None:
                assert row.cells["HTTPS"] == f"HTTP {https.code} \u00b7 {ms(https.latency_ms)}"
                assert row.cells["Certificate"] == f"{https.cert_days_left} days left"
            else:
                assert row.cells["HTTPS"] == f"no response {https.error}"
                assert row.cells["Certificate"] == "\u2014"
            if not https.ok:
                assert f"https: {https.error}" in row.cells["State"]
        else:
            assert row.cells["HTTPS"] == "not probed (origin)"
        if state != UNHEALTHY:
            assert "ping:" not in row.cells["State"] and "https:" not in row.cells["State"]
    # The story the sample tells: two edges down for different reasons, one drained.
    assert {key for key, state in states.items() if state == UNHEALTHY} == \
        {"edge/edge-nagoya-1", "edge/edge-seoul-1"}
    assert states["edge/edge-osaka-1"] == DRAINED
    assert "https: HTTP 502" in rows["edge/edge-nagoya-1"].cells["State"]
    assert "ping: timeout" in rows["edge/edge-seoul-1"].cells["State"]
    assert rows["edge/edge-tokyo-2"].cells["Certificate"] == "9 days left"
    assert any("warn" in span.classes() for span in rows["edge/edge-tokyo-2"].element.iter("span"))


def test_state_since_is_when_the_state_last_changed(sample):
    _sweep, _history, _page, document, _ = sample
    rows = page_rows(document)
    # edge-nagoya-1 has returned 502 for 10 sweeps of 30 s: it changed 9 x 30 s before the last one.
    assert rows["edge/edge-nagoya-1"].cells["State since"] == "for 4 min since 11:55:30 UTC"
    assert rows["edge/edge-seoul-1"].cells["State since"] == "for 90 s since 11:58:30 UTC"
    # shop flapped 20 sweeps ago and recovered 19 ago; edge-tokyo-1 never changed.
    assert rows["origin/shop"].cells["State since"] == "for 9 min since 11:50:30 UTC"
    assert rows["edge/edge-tokyo-1"].cells["State since"] == "for 23 min first seen 11:36:30 UTC"
    since = rows["edge/edge-nagoya-1"].element.first("time")
    assert since.attrs["datetime"] == "2025-05-01T11:55:30Z"


def test_history_strip_has_a_cell_per_sweep_in_order_with_text(sample):
    sweep, history, _page, document, _ = sample
    rows = page_rows(document)
    letters = {SERVING: "s", DRAINED: "d", UNHEALTHY: "u"}
    for node in sweep.nodes:
        strip = next(span for span in rows[node.key].element.iter("span") if "strip" in span.classes())
        cells = [cell for cell in strip.children if not isinstance(cell, str)]
        assert len(cells) == 48
        assert "".join("".join(cell.classes()) for cell in cells) == history.node(node.key).strip
        assert cells[-1].classes() == {letters[node_state(node)]}
        assert strip.attrs["role"] == "img" and strip.attrs["aria-label"].startswith("Last 48 sweeps")
    nagoya = next(span for span in rows["edge/edge-nagoya-1"].element.iter("span") if "strip" in span.classes())
    assert nagoya.attrs["aria-label"] == \
        "Last 48 sweeps, oldest first: 38 serving from 11:36:30, then 10 unhealthy from 11:55:30 (UTC)"
    shop = next(span for span in rows["origin/shop"].element.iter("span") if "strip" in span.classes())
    assert shop.attrs["aria-label"] == ("Last 48 sweeps, oldest first: 26 serving from 11:36:30, "
                                        "then 2 unhealthy from 11:49:30, then 20 serving from 11:50:30 (UTC)")


def test_origins_group_their_edges_with_domain_and_serving_count(sample):
    _sweep, _history, _page, document, _ = sample
    sections = list(document.iter("section"))
    assert [section.first("h2").text() for section in sections] == \
        ["blog blog.example.com", "shop shop.example.com"]
    blog_keys = [row.attrs["data-node"] for row in sections[0].iter("tr") if "data-node" in row.attrs]
    assert blog_keys == ["origin/blog", "edge/edge-tokyo-1", "edge/edge-osaka-1", "edge/edge-nagoya-1"]
    assert sections[0].first("p").text() == "Serving edges: 1 of 3 (1 drained, 1 unhealthy)"
    assert sections[1].first("p").text() == "Serving edges: 1 of 2 (1 unhealthy)"


def test_an_origin_with_no_serving_edge_says_so():
    blog, edge = named("blog"), named("edge-osaka-1")   # drained
    sweep = Sweep(SAMPLE_END, 0.5, ("ping", "https"),
                  [NodeResult(blog, ok_ping(blog), None), NodeResult(edge, ok_ping(edge), ok_https())])
    document, _ = parse_html(render_page(sweep, update_history(History(), sweep, 5), 30))
    line = document.first("section").first("p")
    assert line.text() == "Serving edges: 0 of 1 (1 drained): no edge serves this site"
    assert "none" in line.classes()


def test_header_says_when_the_sweep_ran_how_long_it_took_and_what_is_wrong(sample):
    sweep, _history, _page, document, _ = sample
    header = document.first("header").text()
    assert "Sweep at 2025-05-01 12:00:00 UTC, took 1.05 s." in header
    assert "Nodes: 4 serving, 1 drained, 2 unhealthy." in header
    assert "2 of 7 nodes unhealthy" in header
    problems = [item.text() for item in document.first("ul").iter("li")]
    assert problems == ["edge/edge-nagoya-1: https: HTTP 502",
                        "edge/edge-seoul-1: ping: timeout; https: timeout while connecting"]
    links = [a.attrs["href"] for a in document.first("ul").iter("a")]
    ids = {row.attrs.get("id") for row in document.iter("tr")}
    assert all(link.startswith("#") and link[1:] in ids for link in links)
    assert document.first("title").text() == "Kokoa status: 2 of 7 unhealthy"


def test_freshness_data_says_when_written_and_when_stale(sample):
    sweep, _history, _page, document, _ = sample
    body = document.first("body")
    written = sweep.checked_at + timedelta(seconds=sweep.duration_s)
    assert body.attrs["data-generated-at"] == written.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert body.attrs["data-stale-after-s"] == "90"   # 3 intervals of 30 s
    refresh = [m for m in document.iter("meta") if m.attrs.get("http-equiv") == "refresh"]
    assert [m.attrs["content"] for m in refresh] == ["30"]
    # Without a script the reader still learns the rule.
    assert "rewritten about every 30 s" in document.first("header").text()
    assert "more than 90 s ago (3 intervals), the page is stale" in document.first("header").text()


# --- a page that stands alone, accessible --------------------------------------------------------

URL_ATTRIBUTES = ("src", "href", "action", "srcset", "poster", "data", "formaction", "background",
                  "manifest", "ping", "xlink:href")


def test_the_page_loads_nothing_and_its_csp_admits_only_its_own_style_and_script(sample):
    _sweep, _history, page, document, doctype = sample
    assert doctype == "DOCTYPE html"
    for element in document.iter():
        for attribute in URL_ATTRIBUTES:
            value = element.attrs.get(attribute)
            assert value is None or value.startswith("#"), (element.tag, attribute, value)
    assert not list(document.iter("link")) and not list(document.iter("img"))
    assert not list(document.iter("iframe")) and not list(document.iter("form"))
    (style,), (script,) = list(document.iter("style")), list(document.iter("script"))
    assert "src" not in script.attrs
    style_text, script_text = "".join(style.children), "".join(script.children)
    assert "url(" not in style_text and "@import" not in style_text and "@font-face" not in style_text
    assert not re.search(r"fetch|XMLHttpRequest|WebSocket|import\(|\.src\s*=|location\s*=", script_text)
    assert not re.search(r"(?i)https?://|//[a-z0-9]", page.replace("http-equiv", ""))

    def sha(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    (csp,) = [m.attrs["content"] for m in document.iter("meta")
              if m.attrs.get("http-equiv") == "Content-Security-Policy"]
    policy = dict(part.strip().split(" ", 1) for part in csp.split(";"))
    assert policy["default-src"] == "'none'"
    assert policy["style-src"] == sha(style_text)
    assert policy["script-src"] == sha(script_text)


def test_the_page_is_accessible_by_structure(sample):
    _sweep, _history, _page, document, _ = sample
    html = document.first("html")
    assert html.attrs["lang"] == "en"
    assert document.first("title").text()
    assert [m.attrs["content"] for m in document.iter("meta") if m.attrs.get("name") == "viewport"] == \
        ["width=device-width, initial-scale=1"]
    assert len(list(document.iter("h1"))) == 1
    for table in document.iter("table"):
        assert table.first("caption").text()
        header = [th.attrs.get("scope") for th in table.first("thead").iter("th")]
        assert header == ["col"] * (6 if "traffic" in table.classes() else 7)
        for row in table.first("tbody").iter("tr"):
            (row_header,) = list(row.iter("th"))
            assert row_header.attrs["scope"] == "row"
            assert all(cell.attrs.get("data-label") for cell in row.iter("td"))
    section_labels = [s.attrs["aria-labelledby"] for s in document.iter("section")]
    assert section_labels == [s.first("h2").attrs["id"] for s in document.iter("section")]
    assert document.first("body").first("header")   # landmarks
    assert list(document.iter("main")) and list(document.iter("footer"))


def test_names_and_errors_are_escaped():
    hostile = Target("<script>alert(1)</script>", "edge", "o&o", 'x"><b>.test', IPv4Address("10.1.0.10"),
                     "127.0.0.1")
    sweep = Sweep(SAMPLE_END, 0.1, ("ping", "https"), [
        NodeResult(hostile, ok_ping(hostile),
                   HttpsResult(False, None, None, None, "TLS error: <img src=x onerror=alert(1)>"))])
    page = render_page(sweep, update_history(History(), sweep, 3), 30)
    document, _ = parse_html(page)
    assert len(list(document.iter("script"))) == 1 and not list(document.iter("img"))
    assert not list(document.iter("b"))
    row = page_rows(document)["edge/<script>alert(1)</script>"]
    assert row.header.startswith("<script>alert(1)</script>")
    assert "TLS error: <img src=x onerror=alert(1)>" in row.cells["State"]


# --- no secrets --------------------------------------------------------------------------------

ORIGIN_ENDPOINT = "203.0.113.10"


def ok_ping(target: Target, via: str = "wireguard") -> PingResult:
    address = str(target.wireguard_ip) if via == "wireguard" else target.public_ip
    return PingResult(True, address, via, 0.5, 1, 1, None)


def ok_https() -> HttpsResult:
    return HttpsResult(True, 200, 5.0, 60, None)


def public_origin_sweep() -> Sweep:
    """The origin pinged on its public address, and an error text that quotes it."""
    origin, edge = named("blog"), named("edge-tokyo-1")
    failed = PingResult(False, origin.public_ip, "public", None, 1, 0,
                        f"no route to {origin.public_ip}")
    return Sweep(SAMPLE_END, 0.3, ("ping", "https"), [
        NodeResult(origin, failed, None),
        NodeResult(edge, ok_ping(edge), HttpsResult(False, None, None, None,
                                                    f"upstream {origin.public_ip} refused"))])


def test_origin_public_addresses_never_appear_unless_asked():
    sweep = public_origin_sweep()
    assert sweep.nodes[0].target.public_ip == ORIGIN_ENDPOINT
    page = render_page(sweep, update_history(History(), sweep, 3), 30)
    assert ORIGIN_ENDPOINT not in page
    rows = page_rows(parse_html(page)[0])
    assert rows["origin/blog"].cells["Ping RTT"] == "no reply via public address hidden"
    assert rows["origin/blog"].cells["State"] == "\u2717 unhealthy ping: no route to [origin address hidden]"
    assert "198.51.100.7" in rows["edge/edge-tokyo-1"].header   # an edge's address is in DNS anyway
    shown = render_page(sweep, update_history(History(), sweep, 3), 30, show_origin_addresses=True)
    rows = page_rows(parse_html(shown)[0])
    assert rows["origin/blog"].cells["Ping RTT"] == f"no reply via public {ORIGIN_ENDPOINT}"
    assert ORIGIN_ENDPOINT in rows["origin/blog"].header


def test_hiding_an_origin_address_leaves_a_longer_edge_address_whole():
    origin = Target("o", "origin", "o", "o.test", IPv4Address("10.100.0.1"), "172.31.255.1")
    edge = Target("e", "edge", "o", "o.test", IPv4Address("10.100.0.10"), "172.31.255.12")
    sweep = Sweep(SAMPLE_END, 0.1, ("ping", "https"), [
        NodeResult(origin, PingResult(False, "172.31.255.1", "public", None, 1, 0,
                                      "172.31.255.1 unreachable"), None),
        NodeResult(edge, PingResult(False, "172.31.255.12", "public", None, 1, 0,
                                    "172.31.255.12 unreachable"), ok_https())])
    page = render_page(sweep, update_history(History(), sweep, 3), 30)
    rows = page_rows(parse_html(page)[0])
    assert rows["origin/o"].cells["State"].endswith("ping: [origin address hidden] unreachable")
    assert rows["edge/e"].cells["State"].endswith("ping: 172.31.255.12 unreachable")
    assert rows["edge/e"].cells["Ping RTT"] == "no reply via public 172.31.255.12"
    assert not re.search(r"172\.31\.255\.1(?![0-9])", page)


def test_the_page_offers_no_bundle_and_says_why(sample):
    _sweep, _history, page, document, _ = sample
    assert "kokoa bundle" in document.first("footer").text()
    assert ".tar.gz" not in page and "PrivateKey" not in page and "download" not in page.lower()


# --- history -------------------------------------------------------------------------------------

def test_history_keeps_the_last_n_sweeps_and_only_current_nodes():
    history = History()
    for step in range(200):
        history = update_history(history, sample_sweep(step, 200), 48)
    assert len(history.sweeps) == 48
    assert history.sweeps[-1][0] == "2025-05-01T12:00:00Z"
    assert all(len(node.strip) == 48 for node in history.nodes.values())
    fewer = sample_sweep(0, 1)
    fewer = Sweep(fewer.checked_at + timedelta(seconds=30), 1.0, fewer.checks, fewer.nodes[:3])
    history = update_history(history, fewer, 10)
    assert set(history.nodes) == {node.key for node in fewer.nodes}   # removed nodes are dropped
    assert len(history.sweeps) == 10 and all(len(n.strip) == 10 for n in history.nodes.values())


def test_since_moves_only_when_the_state_changes_and_first_seen_is_flagged():
    target = named("edge-tokyo-1")
    at = [SAMPLE_END + timedelta(seconds=30 * step) for step in range(4)]
    https = [ok_https(), HttpsResult(False, 502, 3.0, 60, "HTTP 502"),
             HttpsResult(False, 504, 3.0, 60, "HTTP 504"), ok_https()]
    history, seen = History(), []
    for moment, result in zip(at, https):
        sweep = Sweep(moment, 0.1, ("ping", "https"), [NodeResult(target, ok_ping(target), result)])
        history = update_history(history, sweep, 48)
        node = history.node("edge/edge-tokyo-1")
        seen.append((node.state, node.since, node.first_seen, node.strip))
    assert seen == [
        (SERVING, "2025-05-01T12:00:00Z", True, "s"),
        (UNHEALTHY, "2025-05-01T12:00:30Z", False, "su"),
        (UNHEALTHY, "2025-05-01T12:00:30Z", False, "suu"),   # still unhealthy, another reason
        (SERVING, "2025-05-01T12:01:30Z", False, "suus"),
    ]


def test_history_file_round_trip_and_refusals():
    _sweep, history = sample_history(steps=5)
    assert parse_history(json.dumps(history_document(history))) == history
    for bad in ("{", "[]", '{"version": 2, "sweeps": [], "nodes": {}}',
                '{"version": 1, "sweeps": [{"checkedAt": "yesterday", "durationMs": 1}], "nodes": {}}',
                '{"version": 1, "sweeps": [], "nodes": {"edge/x": {"state": "on", "since": "2025-05-01T12:00:00Z", '
                '"firstSeen": true, "strip": "s"}}}'):
        with pytest.raises(ValueError):
            parse_history(bad)


def test_the_interval_is_measured_from_the_recorded_sweeps():
    _sweep, history = sample_history(steps=12)
    assert measured_interval(history) == 30
    assert measured_interval(History()) is None


def test_status_page_writes_atomically_and_the_history_file_stays_bounded(tmp_path):
    page = StatusPage(str(tmp_path / "status.html"), history_limit=48)
    sizes = []
    for step in range(120):
        failed, warnings = page.write(sample_sweep(step, 120))
        assert failed == [] and warnings == []
        sizes.append((tmp_path / "status.html.history.json").stat().st_size)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.html", "status.html.history.json"]
    # Full after 48 sweeps: it grows no more (a few bytes move with the durations' digits).
    assert max(sizes[60:]) <= max(sizes[40:60]) + 50 and max(sizes) < 8000
    document = json.loads((tmp_path / "status.html.history.json").read_text())
    assert len(document["sweeps"]) == 48
    assert stat.S_IMODE((tmp_path / "status.html").stat().st_mode) == 0o644
    # A new process picks the history up from the file.
    again = StatusPage(str(tmp_path / "status.html"), history_limit=48)
    again.write(sample_sweep(120, 121, SAMPLE_END + timedelta(seconds=30)))
    assert len(json.loads((tmp_path / "status.html.history.json").read_text())["sweeps"]) == 48
    # Measured from the sweeps 30 s apart, although no interval was given.
    assert 'data-stale-after-s="90"' in (tmp_path / "status.html").read_text()


def test_an_unreadable_history_file_is_replaced_with_a_warning(tmp_path):
    (tmp_path / "s.html.history.json").write_text("not json")
    failed, warnings = StatusPage(str(tmp_path / "s.html")).write(sample_sweep(0, 1))
    assert failed == [] and len(warnings) == 1 and "starting a new history" in warnings[0]
    assert len(json.loads((tmp_path / "s.html.history.json").read_text())["sweeps"]) == 1


# --- drained comes from the `edges` output --------------------------------------------------------

def test_an_edge_with_dns_false_is_drained():
    targets = parse_targets({
        "healthTargets": [
            {"name": "blog", "role": "origin", "origin": "blog", "domain": "b.test",
             "wireguardIp": "10.100.0.1", "publicIp": "203.0.113.10"},
            {"name": "e1", "role": "edge", "origin": "blog", "domain": "b.test",
             "wireguardIp": "10.100.0.10", "publicIp": "198.51.100.7"},
            {"name": "e2", "role": "edge", "origin": "blog", "domain": "b.test",
             "wireguardIp": "10.100.0.11", "publicIp": "198.51.100.8"}],
        "edges": {"e1": {"dns": True}, "e2": {"dns": False}}})
    assert [t.drained for t in targets] == [False, False, True]
    assert parse_targets({"healthTargets": [], "edges": "odd"}) == []


# --- the command -------------------------------------------------------------------------------

SECRET_MARK = "PrivateKey = SECRET-KEY-MATERIAL-0123456789"


@pytest.fixture
def outputs_file(tmp_path) -> Path:
    """Stack outputs as `pulumi stack output --json --show-secrets` would give, bundles and all."""
    targets = sample_targets()
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps({
        "healthTargets": [{"name": t.name, "role": t.role, "origin": t.origin, "domain": t.domain,
                           "wireguardIp": str(t.wireguard_ip), "publicIp": t.public_ip}
                          for t in targets],
        "origins": {t.name: {"endpoint": t.public_ip} for t in targets if t.role == "origin"},
        "edges": {t.name: {"origin": t.origin, "dns": not t.drained} for t in targets if t.role == "edge"},
        "bundles": {"edge/edge-tokyo-1": {"wg-origin-0.conf": f"[Interface]\n{SECRET_MARK}\n"}}}))
    return path


class StoryNetwork:
    """Stands in for the network: each sweep is the next one of the sample story, for the nodes asked."""

    def __init__(self, steps: int = 48) -> None:
        self.steps, self.step = steps, 0

    def __call__(self, targets, options, local):
        sweep = sample_sweep(min(self.step, self.steps - 1), self.steps,
                             end=datetime.now(timezone.utc).replace(microsecond=0))
        self.step += 1
        by_key = {node.key: node for node in sweep.nodes}
        nodes = [NodeResult(t, by_key[f"{t.role}/{t.name}"].ping, by_key[f"{t.role}/{t.name}"].https)
                 for t in targets]
        return Sweep(sweep.checked_at, sweep.duration_s, options.checks, nodes)


@pytest.fixture
def network(monkeypatch) -> StoryNetwork:
    story = StoryNetwork()
    monkeypatch.setattr(health_cli, "run_sweep", story)
    monkeypatch.setattr(health_cli, "check_ping_permission", lambda: None)
    return story


def invoke(*args: str):
    return CliRunner().invoke(health, list(args))


def test_cli_writes_the_page_and_its_history_every_run(outputs_file, network, tmp_path):
    page = tmp_path / "status.html"
    for run in range(5):
        result = invoke("--once", "--outputs", str(outputs_file), "--html", str(page), "--html-history", "3")
        assert result.exit_code == 0, result.output
    history = json.loads((tmp_path / "status.html.history.json").read_text())
    assert len(history["sweeps"]) == 3 and all(len(n["strip"]) == 3 for n in history["nodes"].values())
    text = page.read_text()
    rows = page_rows(parse_html(text)[0])
    assert rows["edge/edge-osaka-1"].state == DRAINED      # from the `edges` output's dns: false
    assert rows["edge/edge-tokyo-1"].state == SERVING
    assert SECRET_MARK.split(" = ")[1] not in text and "[Interface]" not in text
    for endpoint in ("203.0.113.10", "203.0.113.21"):
        assert endpoint not in text


def test_cli_exit_code_follows_the_nodes_and_the_page_shows_them_down(outputs_file, network, tmp_path):
    network.step = 47   # the end of the story: two edges down
    page = tmp_path / "status.html"
    result = invoke("--once", "--outputs", str(outputs_file), "--html", str(page))
    assert result.exit_code == 1
    rows = page_rows(parse_html(page.read_text())[0])
    assert {k for k, r in rows.items() if r.state == UNHEALTHY} == {"edge/edge-nagoya-1", "edge/edge-seoul-1"}


def test_cli_show_origin_addresses(outputs_file, network, tmp_path, monkeypatch):
    page = tmp_path / "status.html"
    assert invoke("--outputs", str(outputs_file), "--html", str(page),
                  "--html-show-origin-addresses").exit_code == 0
    assert "203.0.113.10" in page.read_text()


def test_cli_exits_2_when_the_page_cannot_be_written(outputs_file, network, tmp_path):
    result = invoke("--outputs", str(outputs_file), "--html", str(tmp_path / "absent" / "s.html"))
    assert result.exit_code == 2 and "cannot write" in result.stderr


@pytest.mark.parametrize("option", [("--html-show-origin-addresses",), ("--html-interval", "30")])
def test_cli_html_options_need_html(outputs_file, network, option):
    result = invoke("--outputs", str(outputs_file), *option)
    assert result.exit_code == 2 and "need --html" in result.stderr


def test_interval_mode_rewrites_the_page_every_sweep_with_its_interval(tmp_path):
    page = tmp_path / "status.html"
    story = StoryNetwork()
    reporter = Reporter(as_json=False, live=False, status_file=None, prometheus_file=None,
                        previous={}, interval_s=0.01, status_page=StatusPage(str(page), interval_s=20),
                        out=io.StringIO(), err=io.StringIO())
    targets = sample_targets()
    run_interval(lambda: story(targets, SweepOptions(), LocalNetwork({}, ())), reporter.report,
                 0.01, threading.Event(), max_sweeps=3)
    history = json.loads((tmp_path / "status.html.history.json").read_text())
    assert len(history["sweeps"]) == 3
    assert 'data-stale-after-s="60"' in page.read_text()


# --- the deployment lines run as written --------------------------------------------------------

def exec_start(unit: Path) -> list[str]:
    text = unit.read_text()
    line = re.search(r"^ExecStart=(.*?)(?<!\\)$", text, re.M | re.S).group(1)
    return shlex.split(line.replace("\\\n", " "))


def cron_command() -> list[str]:
    block = re.search(r"```cron\n(.*?)```", (REPO / "docs/health.md").read_text(), re.S).group(1)
    line = next(line for line in block.splitlines() if "kokoa health" in line)
    return shlex.split(line.split(" root ", 1)[1].split(">", 1)[0])


@pytest.mark.parametrize("command", [exec_start(REPO / "deploy/systemd/kokoa-health.service"),
                                     cron_command()], ids=["systemd", "cron"])
def test_the_deployed_command_lines_write_the_page(command, outputs_file, network, tmp_path):
    assert command[:2] == ["/usr/local/bin/kokoa", "health"]
    assert "--html" in command
    state = str(tmp_path / "state")
    Path(state).mkdir()
    args = [arg.replace("/etc/kokoa/outputs.json", str(outputs_file)).replace("/var/lib/kokoa-health", state)
            for arg in command[2:]]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in Path(state).iterdir())
    html = command[command.index("--html") + 1].rsplit("/", 1)[1]
    assert html in written and f"{html}.history.json" in written
    assert "status.json" in written
