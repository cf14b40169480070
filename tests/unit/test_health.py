"""Unit tests of `kokoa health`: targets, routing rule, aggregation, output, files, CLI, HTTPS probe on loopback."""

from __future__ import annotations

import errno
import io
import json
import os
import select
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address
from pathlib import Path

import click
import ping3
import pytest
from click.testing import CliRunner

from kokoa_infra.atomic_file import write_atomically
from kokoa_infra.health import command as health_cli
from kokoa_infra.health import probes as health_probes
from kokoa_infra.health.command import Reporter, health, parse_checks, run_interval
from kokoa_infra.health.probes import SweepOptions, fit_file_descriptors, probe_https, run_sweep
from kokoa_infra.health.report import (
    render_prometheus,
    render_summary_line,
    render_table,
    statuses,
    statuses_from_document,
    sweep_document,
    transitions,
)
from kokoa_infra.health.results import HttpsResult, NodeResult, PingResult, Sweep, exit_code, summarize
from kokoa_infra.health.targets import (
    LocalNetwork,
    Target,
    TargetsError,
    parse_local_network,
    parse_targets,
    ping_address,
    wireguard_routable,
)

ORIGIN = {"name": "blog", "role": "origin", "origin": "blog", "domain": "blog.example.test",
          "wireguardIp": "10.100.0.1", "publicIp": "203.0.113.10"}
EDGE = {"name": "edge-1", "role": "edge", "origin": "blog", "domain": "blog.example.test",
        "wireguardIp": "10.100.0.10", "publicIp": "198.51.100.7"}
CHECKED_AT = datetime(2025, 5, 1, 12, 0, 0, tzinfo=timezone.utc)


def target(entry: dict) -> Target:
    return parse_targets({"healthTargets": [entry]})[0]


def ping_ok(address: str = "10.100.0.10") -> PingResult:
    return PingResult(ok=True, address=address, via="wireguard", rtt_ms=0.4, sent=1, received=1,
                      error=None)


def ping_lost(address: str = "10.100.0.10") -> PingResult:
    return PingResult(ok=False, address=address, via="wireguard", rtt_ms=None, sent=1,
                      received=0, error="timeout")


def https_result(code: int | None, error: str | None = None) -> HttpsResult:
    ok = code is not None and code < 500
    return HttpsResult(ok=ok, code=code, latency_ms=12.5 if code else None,
                       cert_days_left=60 if code else None,
                       error=error if error else (None if ok else f"HTTP {code}"))


def make_sweep(*nodes: NodeResult) -> Sweep:
    return Sweep(checked_at=CHECKED_AT, duration_s=1.02, checks=("ping", "https"), nodes=list(nodes))


def origin_node(ping: PingResult | None = None) -> NodeResult:
    return NodeResult(target=target(ORIGIN), ping=ping or ping_ok("10.100.0.1"), https=None)


def edge_node(ping: PingResult | None = None, https: HttpsResult | None = None) -> NodeResult:
    return NodeResult(target=target(EDGE), ping=ping or ping_ok(), https=https or https_result(200))


# --- healthTargets ---------------------------------------------------------------------------

def test_parse_targets_reads_every_field():
    origin, edge = parse_targets({"healthTargets": [ORIGIN, EDGE], "origins": {}})
    assert origin == Target(name="blog", role="origin", origin="blog", domain="blog.example.test",
                            wireguard_ip=IPv4Address("10.100.0.1"), public_ip="203.0.113.10")
    assert (edge.role, edge.public_ip) == ("edge", "198.51.100.7")


def test_an_origin_endpoint_may_be_a_hostname():
    assert target({**ORIGIN, "publicIp": "origin.example.test"}).public_ip == "origin.example.test"


@pytest.mark.parametrize("outputs, message", [
    ({}, "no `healthTargets`"),
    ({"healthTargets": {"blog": ORIGIN}}, "must be a list"),
    ({"healthTargets": ["blog"]}, "healthTargets[0]: must be an object"),
    ({"healthTargets": [{**EDGE, "role": "cache"}]}, "healthTargets[0] (edge-1): `role` must be one of"),
    ({"healthTargets": [{**EDGE, "wireguardIp": "10.100.0"}]}, "`wireguardIp` '10.100.0' is not an IPv4"),
    ({"healthTargets": [{k: v for k, v in EDGE.items() if k != "domain"}]}, "`domain` must be a non-empty"),
    ({"healthTargets": [EDGE, EDGE]}, "healthTargets[1] (edge-1): duplicate edge name"),
])
def test_bad_health_targets_name_entry_and_key(outputs, message):
    with pytest.raises(TargetsError) as caught:
        parse_targets(outputs)
    assert message in str(caught.value)


def test_every_problem_is_listed():
    with pytest.raises(TargetsError) as caught:
        parse_targets({"healthTargets": [{**EDGE, "role": "x"}, {**ORIGIN, "publicIp": ""}]})
    assert "healthTargets[0]" in str(caught.value) and "healthTargets[1]" in str(caught.value)


# --- which address to ping -------------------------------------------------------------------

ORIGIN_HOST = parse_local_network(
    json.dumps([{"ifname": "lo", "addr_info": [{"family": "inet", "local": "127.0.0.1"}]},
                {"ifname": "eth0", "addr_info": [{"family": "inet", "local": "203.0.113.10"}]},
                {"ifname": "wg0", "addr_info": [{"family": "inet", "local": "10.100.0.1"}]}]),
    json.dumps([{"dst": "default", "gateway": "203.0.113.1", "dev": "eth0"},
                {"dst": "10.100.0.0/24", "dev": "wg0", "protocol": "kernel"},
                {"type": "blackhole", "dst": "10.200.0.0/16"}]))
EDGE_HOST = parse_local_network(
    json.dumps([{"ifname": "eth0", "addr_info": [{"family": "inet", "local": "198.51.100.7"}]},
                {"ifname": "wg-origin-0", "addr_info": [{"family": "inet", "local": "10.100.0.10"}]}]),
    json.dumps([{"dst": "default", "gateway": "198.51.100.1", "dev": "eth0"},
                {"dst": "10.100.0.1", "dev": "wg-origin-0"}]))


def test_origin_host_reaches_its_own_edges_by_wireguard_ip():
    assert wireguard_routable(IPv4Address("10.100.0.10"), ORIGIN_HOST)
    assert wireguard_routable(IPv4Address("10.100.0.1"), ORIGIN_HOST)


def test_another_origins_tunnel_network_is_not_routable():
    assert not wireguard_routable(IPv4Address("10.100.1.10"), ORIGIN_HOST)


def test_edge_host_reaches_its_origin_but_not_a_sibling_edge_behind_the_default_route():
    assert wireguard_routable(IPv4Address("10.100.0.1"), EDGE_HOST)
    assert wireguard_routable(IPv4Address("10.100.0.10"), EDGE_HOST)   # itself
    assert not wireguard_routable(IPv4Address("10.100.0.11"), EDGE_HOST)


def test_ping_address_reports_which_address_and_honours_the_override():
    edge = target(EDGE)
    assert ping_address(edge, ORIGIN_HOST) == ("10.100.0.10", "wireguard")
    assert ping_address(edge, LocalNetwork(addresses={}, routes=())) == ("198.51.100.7", "public")
    assert ping_address(edge, ORIGIN_HOST, via="public") == ("198.51.100.7", "public")
    assert ping_address(edge, LocalNetwork(addresses={}, routes=()), via="wireguard") == \
        ("10.100.0.10", "wireguard")


def test_unparsable_route_entries_are_skipped():
    local = parse_local_network("[]", json.dumps([{"dst": "not-a-prefix", "dev": "x"}, {"dst": "1.2.3.0/24"}]))
    assert local.routes == ()


# --- aggregation and exit code ---------------------------------------------------------------

def test_a_node_is_healthy_only_if_every_selected_check_passed():
    assert edge_node().healthy
    assert not edge_node(ping=ping_lost()).healthy
    assert not edge_node(https=https_result(502)).healthy
    assert edge_node(https=https_result(404)).healthy   # a response below 500 proves the path
    assert NodeResult(target=target(EDGE), ping=None, https=https_result(200)).healthy


def test_summary_and_exit_code():
    all_good = make_sweep(origin_node(), edge_node())
    assert summarize(all_good.nodes) == {"total": 2, "healthy": 2, "unhealthy": 0}
    assert exit_code(all_good) == 0
    one_bad = make_sweep(origin_node(), edge_node(https=https_result(None, "connect failed: Connection refused")))
    assert summarize(one_bad.nodes) == {"total": 2, "healthy": 1, "unhealthy": 1}
    assert exit_code(one_bad) == 1
    assert exit_code(make_sweep()) == 0


def test_problem_names_the_failed_checks():
    node = edge_node(ping=ping_lost(), https=https_result(502))
    assert node.problem() == "ping 10.100.0.10: timeout; https: HTTP 502"
    assert edge_node().problem() == ""


# --- JSON, table, Prometheus -----------------------------------------------------------------

def test_json_document_shape():
    document = sweep_document(make_sweep(origin_node(), edge_node(https=https_result(502))))
    assert set(document) >= {"checkedAt", "nodes", "summary"}
    assert document["checkedAt"] == "2025-05-01T12:00:00Z"
    origin, edge = document["nodes"]
    assert {k: origin[k] for k in ("name", "role", "origin", "status")} == \
        {"name": "blog", "role": "origin", "origin": "blog", "status": "healthy"}
    assert set(origin["checks"]) == {"ping"}   # origins are only pinged
    assert set(origin["checks"]["ping"]) >= {"ok", "address", "rttMs"}
    assert edge["status"] == "unhealthy"
    assert edge["checks"]["https"] == {"ok": False, "code": 502, "latencyMs": 12.5,
                                       "certDaysLeft": 60, "error": "HTTP 502"}
    assert document["summary"] == {"total": 2, "healthy": 1, "unhealthy": 1}
    json.dumps(document)   # serialisable as is


def test_table_lists_unhealthy_nodes_first_with_the_reason():
    table = render_table(make_sweep(origin_node(), edge_node(ping=ping_lost())))
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["NAME", "ROLE", "ORIGIN", "STATUS"]
    assert lines[1].startswith("edge-1") and "UNHEALTHY" in lines[1] and "timeout" in lines[1]
    assert lines[2].startswith("blog") and "healthy" in lines[2]
    assert "1/2 healthy" in lines[-1]


def test_summary_line_names_unhealthy_nodes():
    line = render_summary_line(make_sweep(origin_node(), edge_node(https=https_result(504))))
    assert line.startswith("2025-05-01T12:00:00Z 1/2 healthy")
    assert "edge/edge-1 [https: HTTP 504]" in line


def test_prometheus_textfile():
    text = render_prometheus(make_sweep(origin_node(), edge_node(https=https_result(502))))
    assert 'kokoa_node_up{name="blog",role="origin",origin="blog"} 1' in text
    assert 'kokoa_node_up{name="edge-1",role="edge",origin="blog"} 0' in text
    assert 'kokoa_ping_rtt_seconds{name="edge-1",role="edge",origin="blog"} 0.000400' in text
    assert 'kokoa_https_latency_seconds{name="edge-1",role="edge",origin="blog"} 0.012500' in text
    assert 'kokoa_cert_days_left{name="edge-1",role="edge",origin="blog"} 60' in text
    assert 'kokoa_health_nodes{status="unhealthy"} 1' in text
    assert "# TYPE kokoa_node_up gauge" in text
    for line in text.splitlines():
        assert line.startswith("#") or len(line.rsplit(" ", 1)) == 2


def test_prometheus_label_values_are_escaped():
    odd = NodeResult(target=target({**ORIGIN, "name": 'a"b\\c'}), ping=ping_ok(), https=None)
    assert 'name="a\\"b\\\\c"' in render_prometheus(make_sweep(odd))


# --- transitions -----------------------------------------------------------------------------

def test_transitions_are_logged_once_each_way():
    previous: dict[str, str] = {}
    sweeps = [make_sweep(edge_node()), make_sweep(edge_node(https=https_result(502))),
              make_sweep(edge_node(https=https_result(502))), make_sweep(edge_node())]
    logged = []
    for sweep in sweeps:
        logged.append(transitions(previous, sweep))
        previous = statuses(sweep)
    assert logged[0] == []                       # first seen and healthy: nothing to say
    assert len(logged[1]) == 1 and "edge/edge-1 (origin blog) healthy -> unhealthy: https: HTTP 502" in logged[1][0]
    assert logged[1][0].startswith("2025-05-01T12:00:00Z ")
    assert logged[2] == []                       # still unhealthy: not repeated
    assert len(logged[3]) == 1 and "unhealthy -> healthy" in logged[3][0]


def test_a_node_first_seen_unhealthy_is_logged():
    assert "new -> unhealthy" in transitions({}, make_sweep(edge_node(ping=ping_lost())))[0]


def test_statuses_survive_a_round_trip_through_the_status_file():
    sweep = make_sweep(origin_node(), edge_node(https=https_result(502)))
    assert statuses_from_document(json.dumps(sweep_document(sweep))) == \
        {"origin/blog": "healthy", "edge/edge-1": "unhealthy"}
    assert statuses_from_document("{not json") == {}
    assert statuses_from_document('{"nodes": 3}') == {}


# --- atomic files ----------------------------------------------------------------------------

def test_write_atomically_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "status.json"
    path.write_text("old")
    write_atomically(path, "new")
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["status.json"]


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failed_write_keeps_the_old_content(tmp_path, monkeypatch, failing):
    path = tmp_path / "status.json"
    path.write_text("old")

    def fail(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(OSError):
        write_atomically(path, "new" * 1000)
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["status.json"]


# --- sweep orchestration (no network) --------------------------------------------------------

def many_targets(count: int) -> list[Target]:
    return parse_targets({"healthTargets": [
        {**(EDGE if index % 2 else ORIGIN), "name": f"n{index}", "publicIp": f"127.0.0.{index % 250 + 1}",
         "wireguardIp": f"10.99.0.{index % 250 + 1}"} for index in range(count)]})


def test_a_sweep_of_slow_targets_takes_one_timeout_and_respects_the_pool_bound():
    in_flight, peak, lock = 0, 0, threading.Lock()

    def slow_ping(address, via, timeout_s, count, first_seq):
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.2)
        with lock:
            in_flight -= 1
        return PingResult(ok=False, address=address, via=via, rtt_ms=None, sent=count,
                          received=0, error="timeout")

    options = SweepOptions(checks=("ping",), concurrency=50)
    started = time.monotonic()
    sweep = run_sweep(many_targets(100), options, LocalNetwork({}, ()), ping=slow_ping)
    elapsed = time.monotonic() - started
    assert len(sweep.nodes) == 100 and exit_code(sweep) == 1
    assert peak <= 50
    assert elapsed < 1.0   # two rounds of 0.2 s, not 100 of them


def test_https_probes_only_edges_and_a_https_only_sweep_leaves_origins_out():
    probed = []

    def fake_https(domain, address, timeout_s, ca_bundle, port, health_token=None, redirect_to=None):
        probed.append(address)
        return https_result(200)

    sweep = run_sweep(many_targets(6), SweepOptions(checks=("https",)), LocalNetwork({}, ()),
                      https=fake_https)
    assert sorted(probed) == ["127.0.0.2", "127.0.0.4", "127.0.0.6"]
    assert [node.target.role for node in sweep.nodes] == ["edge"] * 3
    assert all(node.ping is None for node in sweep.nodes)


def test_sequence_numbers_differ_between_targets_and_attempts():
    seqs = []

    def record(address, via, timeout_s, count, first_seq):
        seqs.extend(range(first_seq, first_seq + count))
        return ping_ok(address)

    run_sweep(many_targets(5), SweepOptions(checks=("ping",), count=3), LocalNetwork({}, ()), ping=record)
    assert sorted(seqs) == list(range(15))


def test_pools_shrink_to_fit_a_low_open_files_limit(monkeypatch):
    monkeypatch.setattr(health_probes.resource, "getrlimit", lambda _which: (256, 256))
    options = fit_file_descriptors(SweepOptions(concurrency=1000, https_concurrency=100))
    assert options.concurrency + options.https_concurrency + 64 <= 256
    assert options.https_concurrency >= 1


def test_echo_filter_lets_a_raw_socket_see_only_its_own_reply():
    try:
        watcher = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    except PermissionError:
        pytest.skip("needs a raw socket (root)")
    ours, theirs = 7, 8
    with watcher, socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sender:
        health_probes._attach_echo_filter(watcher, health_probes.ICMP_ID, ours)
        for seq in (theirs, ours):   # to loopback only
            ping3.send_one_ping(sender, "127.0.0.1", health_probes.ICMP_ID, seq, 56)
        received = []
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            ready, _, _ = select.select([watcher], [], [], deadline - time.monotonic())
            if ready:
                packet = watcher.recv(1500)
                header_len = (packet[0] & 0x0F) * 4
                received.append((packet[header_len], int.from_bytes(packet[header_len + 6:header_len + 8], "big")))
    assert received == [(0, ours)]   # no echo requests, no reply to the other sequence


def test_real_echo_to_loopback():
    try:
        health_probes.check_ping_permission()
    except health_probes.PingPermissionError:
        pytest.skip("this user may not open ICMP sockets")
    result = health_probes.ping_target("127.0.0.1", "public", 1.0, 2, 0)
    assert result.ok and result.received == 2 and result.rtt_ms is not None


# --- HTTPS probe against a local TLS server --------------------------------------------------

DOMAIN = "health.test"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "3", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
            cwd=directory)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    make_ca(directory, "ca")
    make_ca(directory, "other-ca")
    (directory / "leaf.ext").write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        f"extendedKeyUsage=serverAuth\nsubjectAltName=DNS:{DOMAIN}\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", f"/CN={DOMAIN}", cwd=directory)
    openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "30", "-extfile", "leaf.ext", "-out", "leaf.pem",
            cwd=directory)
    return directory


class TlsSite:
    """An HTTPS server on 127.0.0.1 that records SNI and Host and answers with `status`."""

    def __init__(self, certificates: Path) -> None:
        self.status = 200
        self.location: str | None = None
        self.server_names: list[str | None] = []
        self.hosts: list[str | None] = []
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                site.hosts.append(self.headers.get("Host"))
                self.send_response(site.status)
                if site.location:
                    self.send_header("Location", site.location)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_args) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificates / "leaf.pem", certificates / "leaf.key")
        context.sni_callback = lambda _sock, name, _ctx: self.server_names.append(name)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def site(certificates):
    tls_site = TlsSite(certificates)
    yield tls_site
    tls_site.close()


def test_https_probe_sends_sni_and_host_and_reads_certificate_days(site, certificates):
    result = probe_https(DOMAIN, "127.0.0.1", 5.0, str(certificates / "ca.pem"), port=site.port)
    assert result.ok and result.code == 200 and result.error is None
    assert result.cert_days_left in (29, 30)
    assert result.latency_ms is not None and result.latency_ms > 0
    assert site.server_names == [DOMAIN]
    assert site.hosts == [DOMAIN]


def test_https_probe_fails_with_the_wrong_ca(site, certificates):
    result = probe_https(DOMAIN, "127.0.0.1", 5.0, str(certificates / "other-ca.pem"), port=site.port)
    assert not result.ok and result.code is None
    assert "certificate verify failed" in result.error


def test_https_probe_fails_when_the_certificate_is_for_another_name(site, certificates):
    result = probe_https("other.test", "127.0.0.1", 5.0, str(certificates / "ca.pem"), port=site.port)
    assert not result.ok and "certificate verify failed" in result.error


@pytest.mark.parametrize("status, ok", [(404, True), (301, True), (502, False), (504, False)])
def test_https_ok_means_a_status_below_500(site, certificates, status, ok):
    site.status = status
    result = probe_https(DOMAIN, "127.0.0.1", 5.0, str(certificates / "ca.pem"), port=site.port)
    assert (result.ok, result.code) == (ok, status)
    assert result.error == (None if ok else f"HTTP {status}")


@pytest.mark.parametrize("status, location, ok", [
    (301, "https://blog.example.com/", True), (302, "https://blog.example.com/", False),
    (301, "https://elsewhere.example.com/", False), (301, None, False), (200, None, False)])
def test_a_redirecting_name_is_ok_on_its_301_to_the_right_place_alone(site, certificates, status, location, ok):
    site.status, site.location = status, location
    result = probe_https(DOMAIN, "127.0.0.1", 5.0, str(certificates / "ca.pem"), port=site.port,
                         redirect_to="blog.example.com")
    assert (result.ok, result.code, result.location) == (ok, status, location)
    assert result.error == (None if ok else f"HTTP {status} to {location or 'nowhere'}, not a 301 to "
                                            "https://blog.example.com/")


def test_https_probe_reports_a_refused_connection(certificates):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    result = probe_https(DOMAIN, "127.0.0.1", 2.0, str(certificates / "ca.pem"), port=port)
    assert not result.ok and result.error == "connect failed: Connection refused"


# --- command line ----------------------------------------------------------------------------

@pytest.fixture
def outputs_file(tmp_path) -> Path:
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps({"healthTargets": [ORIGIN, EDGE]}))
    return path


class FakeSweep:
    """Stands in for the network: returns `result`, records the options it was given."""

    def __init__(self) -> None:
        self.result = make_sweep(origin_node(), edge_node())
        self.options: list[SweepOptions] = []

    def __call__(self, targets, options, local):
        self.options.append(options)
        return self.result


@pytest.fixture
def fake_sweep(monkeypatch) -> FakeSweep:
    """The CLI with no network and ICMP allowed."""
    fake = FakeSweep()
    monkeypatch.setattr(health_cli, "run_sweep", fake)
    monkeypatch.setattr(health_cli, "check_ping_permission", lambda: None)
    return fake


def invoke(*args: str):
    return CliRunner().invoke(health, list(args))


def test_cli_exits_0_when_all_healthy_and_prints_json(outputs_file, fake_sweep):
    result = invoke("--once", "--json", "--outputs", str(outputs_file))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["summary"] == {"total": 2, "healthy": 2, "unhealthy": 0}
    assert fake_sweep.options[0].checks == ("ping", "https")
    assert fake_sweep.options[0].timeout_s == 1.0 and fake_sweep.options[0].count == 1


def test_cli_exits_1_when_some_node_is_unhealthy(outputs_file, fake_sweep):
    fake_sweep.result = make_sweep(origin_node(), edge_node(https=https_result(502)))
    result = invoke("--outputs", str(outputs_file))
    assert result.exit_code == 1
    assert "UNHEALTHY" in result.stdout


def test_cli_writes_status_and_prometheus_files(outputs_file, fake_sweep, tmp_path):
    status, metrics = tmp_path / "status.json", tmp_path / "kokoa.prom"
    result = invoke("--outputs", str(outputs_file), "--status-file", str(status),
                    "--prometheus", str(metrics))
    assert result.exit_code == 0
    assert json.loads(status.read_text())["summary"]["healthy"] == 2
    assert "kokoa_node_up" in metrics.read_text()


def test_cli_logs_a_transition_against_the_previous_status_file(outputs_file, fake_sweep, tmp_path):
    status = tmp_path / "status.json"
    assert invoke("--outputs", str(outputs_file), "--status-file", str(status)).stderr == ""
    fake_sweep.result = make_sweep(origin_node(), edge_node(ping=ping_lost()))
    first = invoke("--outputs", str(outputs_file), "--status-file", str(status))
    assert "edge/edge-1 (origin blog) healthy -> unhealthy" in first.stderr
    again = invoke("--outputs", str(outputs_file), "--status-file", str(status))
    assert again.stderr == "" and again.exit_code == 1


def test_cli_exits_2_when_the_status_file_cannot_be_written(outputs_file, fake_sweep, tmp_path):
    result = invoke("--outputs", str(outputs_file), "--status-file", str(tmp_path / "no" / "s.json"))
    assert result.exit_code == 2 and "cannot write" in result.stderr


@pytest.mark.parametrize("content, message", [
    ('{"healthTargets": [', "is not valid JSON"),
    ('{"origins": {}}', "no `healthTargets`"),
    ('[1, 2]', "must hold a JSON object"),
    ('{"healthTargets": [{"name": "x"}]}', "`role` must be a non-empty string"),
])
def test_cli_exits_2_on_bad_outputs(tmp_path, fake_sweep, content, message):
    path = tmp_path / "outputs.json"
    path.write_text(content)
    result = invoke("--outputs", str(path))
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output
    assert fake_sweep.options == []


def test_cli_exits_2_on_a_missing_outputs_file(tmp_path, fake_sweep):
    result = invoke("--outputs", str(tmp_path / "absent.json"))
    assert result.exit_code == 2 and "cannot read outputs file" in result.stderr


def test_cli_exits_2_on_an_unknown_check(outputs_file, fake_sweep):
    result = invoke("--outputs", str(outputs_file), "--checks", "ping,dns")
    assert result.exit_code == 2 and "unknown check 'dns'" in result.stderr


def test_cli_exits_2_on_once_with_interval(outputs_file, fake_sweep):
    assert invoke("--outputs", str(outputs_file), "--once", "--interval", "30").exit_code == 2


def test_cli_exits_2_with_the_fix_when_icmp_is_not_allowed(outputs_file, monkeypatch):
    def no_icmp(family, kind, proto=0, *_args):
        if proto == socket.IPPROTO_ICMP:
            raise PermissionError(errno.EPERM if kind == socket.SOCK_RAW else errno.EACCES,
                                  "Operation not permitted" if kind == socket.SOCK_RAW else "Permission denied")
        return real_socket(family, kind, proto)

    real_socket = socket.socket
    monkeypatch.setattr(health_probes.socket, "socket", no_icmp)
    fake = FakeSweep()
    monkeypatch.setattr(health_cli, "run_sweep", fake)   # the ICMP check itself stays real
    result = invoke("--outputs", str(outputs_file))
    assert result.exit_code == 2
    assert 'sysctl -w net.ipv4.ping_group_range="0 2147483647"' in result.stderr
    assert "Traceback" not in result.output
    assert fake.options == []
    assert invoke("--outputs", str(outputs_file), "--checks", "https").exit_code == 0


def test_parse_checks_orders_and_rejects():
    assert parse_checks(None, None, "https, ping") == ("ping", "https")
    assert parse_checks(None, None, "https") == ("https",)
    with pytest.raises(click.BadParameter) as refused:
        parse_checks(None, None, " , ")
    assert refused.value.message == "unknown check (none given): choose from ping, https, comma-separated"
    with pytest.raises(click.BadParameter) as refused:
        parse_checks(None, None, "ping,icmp,http")
    assert refused.value.message == "unknown check 'icmp', 'http': choose from ping, https, comma-separated"


# --- interval mode ---------------------------------------------------------------------------

def test_interval_mode_prints_a_line_per_sweep_and_logs_each_change_once():
    sweeps = iter([make_sweep(edge_node()), make_sweep(edge_node(ping=ping_lost())),
                   make_sweep(edge_node(ping=ping_lost())), make_sweep(edge_node())])
    out, err = io.StringIO(), io.StringIO()
    reporter = Reporter(as_json=False, live=False, status_file=None, prometheus_file=None,
                        previous={}, interval_s=0.01, out=out, err=err)
    code = run_interval(lambda: next(sweeps), reporter.report, 0.01, threading.Event(), max_sweeps=4)
    assert code == 0
    assert len(out.getvalue().splitlines()) == 4
    changes = err.getvalue().splitlines()
    assert len(changes) == 2
    assert "healthy -> unhealthy" in changes[0] and "unhealthy -> healthy" in changes[1]


def test_interval_mode_live_view_redraws_and_json_mode_prints_json_lines():
    live_out = io.StringIO()
    live = Reporter(as_json=False, live=True, status_file=None, prometheus_file=None,
                    previous={}, interval_s=30, out=live_out, err=io.StringIO())
    live.report(make_sweep(edge_node(ping=ping_lost())))
    assert live_out.getvalue().startswith("\x1b[H\x1b[2J")
    assert "recent changes:" in live_out.getvalue() and "next sweep in 30 s" in live_out.getvalue()
    json_out = io.StringIO()
    as_json = Reporter(as_json=True, live=True, status_file=None, prometheus_file=None,
                       previous={}, interval_s=30, out=json_out, err=io.StringIO())
    as_json.report(make_sweep(edge_node()))
    as_json.report(make_sweep(edge_node()))
    assert [json.loads(line)["summary"]["total"] for line in json_out.getvalue().splitlines()] == [1, 1]


def test_ctrl_c_ends_the_loop_cleanly_with_0():
    def interrupted() -> Sweep:
        raise KeyboardInterrupt

    assert run_interval(interrupted, lambda _sweep: None, 30, threading.Event()) == 0


# Runs the real command in a child process with the network replaced by an empty sweep.
FAKE_NETWORK_RUN = """
import datetime, kokoa_infra.health.command as cli, kokoa_infra.health.results as results
cli.check_ping_permission = lambda: None
cli.run_sweep = lambda targets, options, local: results.Sweep(
    datetime.datetime.now(datetime.timezone.utc), 0.0, options.checks, [])
cli.health(prog_name="kokoa health")
"""


def test_sigterm_ends_the_interval_command_with_0(outputs_file, tmp_path):
    status = tmp_path / "status.json"
    repo = Path(__file__).resolve().parents[2]
    process = subprocess.Popen(
        [sys.executable, "-c", FAKE_NETWORK_RUN, "--interval", "1", "--outputs", str(outputs_file),
         "--status-file", str(status)],
        cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not status.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert status.exists()
        process.terminate()
        _out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert process.returncode == 0, err
    assert "Traceback" not in err


def test_each_edge_probe_carries_its_origins_health_token_when_the_outputs_hold_it():
    token = "ab" * 32
    sent = {}

    def fake_https(domain, address, timeout_s, ca_bundle, port, health_token=None, redirect_to=None):
        sent[address] = health_token
        return https_result(200)

    edges = [{**EDGE, "name": "e1", "publicIp": "127.0.0.2", "wireguardIp": "10.99.0.2"},
             {**EDGE, "name": "e2", "origin": "other", "publicIp": "127.0.0.3", "wireguardIp": "10.99.0.3"}]
    targets = parse_targets({"healthTargets": edges, "healthTokens": {EDGE["origin"]: token, "other": "[secret]"}})
    run_sweep(targets, SweepOptions(checks=("https",)), LocalNetwork({}, ()), https=fake_https)
    # Read without secrets, a token is "[secret]": the probe goes without one (and may be challenged).
    assert sent == {"127.0.0.2": token, "127.0.0.3": None}


# --- the origins' addresses are secret outputs (issue 18, item 3) ----------------------------

FAKE_PULUMI = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/calls"
case "$5" in
  --show-secrets) ;;
  *) echo "error: the test's pulumi shows secrets only" >&2; exit 1 ;;
esac
case "$3" in
  healthTargets) cat "$(dirname "$0")/healthTargets.json" ;;
  edges) cat "$(dirname "$0")/edges.json" ;;
  healthTokens) cat "$(dirname "$0")/healthTokens.json" ;;
  *) echo "error: not asked for in this test: $3" >&2; exit 1 ;;
esac
"""


def test_health_reads_the_secret_origin_addresses_and_no_bundle(tmp_path, monkeypatch):
    """`kokoa health` asks for healthTargets and edges with --show-secrets (an origin's
    publicIp is a secret output), never for every output (the bundles hold private keys);
    the targets it gets are the program's own, under the mocks."""
    from kokoa_infra.mocked_program import run_program
    from tests.support.stacks import BASE_CONFIG

    outputs = run_program(BASE_CONFIG).outputs
    for name in ("healthTargets", "edges", "healthTokens"):
        (tmp_path / f"{name}.json").write_text(json.dumps(outputs[name]))
    pulumi = tmp_path / "pulumi"
    pulumi.write_text(FAKE_PULUMI)
    pulumi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    targets = health_cli.read_targets("prod", None)
    assert [t.public_ip for t in targets if t.role == "origin"] == ["203.0.113.10", "203.0.113.21"]
    assert (tmp_path / "calls").read_text().splitlines() == [
        "stack output healthTargets --json --show-secrets --stack prod",
        "stack output edges --json --show-secrets --stack prod",
        "stack output healthTokens --json --show-secrets --stack prod"]
    assert {t.health_token for t in targets} == set(outputs["healthTokens"].values())


def test_a_hidden_origin_address_is_named_with_its_fix():
    outputs = {"healthTargets": [{"name": "blog", "role": "origin", "origin": "blog", "domain": "blog.example.com",
                                  "wireguardIp": "10.100.0.1", "publicIp": "[secret]"}]}
    with pytest.raises(TargetsError) as raised:
        parse_targets(outputs)
    assert str(raised.value) == (
        "invalid `healthTargets`:\n  healthTargets[0] (blog): `publicIp` is [secret]: an origin's address is a "
        "secret output; read it with `pulumi stack output healthTargets --json --show-secrets`")
