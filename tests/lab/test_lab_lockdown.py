"""The firewalls on the running lab: what an outsider and an edge can reach, the operator
never locked out, nothing left by uninstall.sh, and a short flood that legitimate visitors
do not notice."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kokoa_infra.lab.executor import ExecutorError
from kokoa_infra.lab.hosts import topology
from kokoa_infra.render import CERT_PORT, GATEWAY_PORT
from tests.netns.test_firewall import CONNECTOR

REPO = Path(__file__).resolve().parents[2]
PROBE_PORT = 8081
LISTENER = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16); s.settimeout(1)
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        try:
            s.accept()[0].close()
        except OSError:
            pass
""")


def site(lab, origin_name: str = "shop") -> tuple[dict, dict]:
    origin = next(o for o in lab.status["origins"] if o["name"] == origin_name)
    edge = next(e for e in lab.status["edges"] if e["origin"] == origin_name)
    return origin, edge


def wireguard_ip(lab, origin_name: str) -> str:
    return json.loads(lab.outputs_file.read_text())["origins"][origin_name]["wireguardIp"]


def reachable(lab, netns: str, host: str, port: int, visitor: bool = False) -> bool:
    argv = [sys.executable if visitor else "python3", "-c", CONNECTOR, host, str(port), "1", "0"]
    if visitor:
        proc = subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=30)
    else:
        proc = lab.on_host(netns, *argv, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout) == 1


@pytest.fixture
def outsider(lab):
    """A namespace on the lab's internet that is neither client, edge nor origin."""
    host = lab.lab.add_visitor(topology(lab.config(), lab.lab.prefix), "outsider", lab.spare_edge_host())
    try:
        yield host.netns
    finally:
        lab.lab.remove_visitor(host)


@pytest.fixture
def probe_listeners(lab):
    """A listener the test itself binds on 0.0.0.0:8081 of shop's origin and edge (bounded: 40 s)."""
    origin, edge = site(lab)
    for netns in (origin["netns"], edge["netns"]):
        lab.on_host(netns, "setsid", "-f", "sh", "-c", 'exec python3 -c "$0" "$1" >/dev/null 2>&1', LISTENER,
                    str(PROBE_PORT), stdin=subprocess.DEVNULL)
    time.sleep(0.5)
    yield origin, edge
    for netns in (origin["netns"], edge["netns"]):
        lab.on_host(netns, "pkill", "-f", f"^python3 -c .*{PROBE_PORT}$", check=False)


def test_an_outsider_reaches_only_ssh_and_the_edges_web_ports(lab, outsider, probe_listeners):
    origin, edge = probe_listeners
    # The listeners are there: on the host itself they answer.
    assert reachable(lab, origin["netns"], "127.0.0.1", PROBE_PORT)
    assert reachable(lab, edge["netns"], "127.0.0.1", PROBE_PORT)
    found = {(name, port): reachable(lab, outsider, host["publicIp"], port, visitor=True)
             for name, host in (("origin", origin), ("edge", edge))
             for port in (22, 80, 443, PROBE_PORT)}
    assert found == {("origin", 22): True, ("origin", 80): False, ("origin", 443): False,
                     ("origin", PROBE_PORT): False,
                     ("edge", 22): True, ("edge", 80): True, ("edge", 443): True, ("edge", PROBE_PORT): False}


def test_through_the_tunnel_an_edge_reaches_only_the_gateway_and_certificate_ports(lab, probe_listeners):
    origin, edge = probe_listeners
    address = wireguard_ip(lab, "shop")
    found = {port: reachable(lab, edge["netns"], address, port)
             for port in (GATEWAY_PORT, CERT_PORT, 22, PROBE_PORT)}
    assert found == {GATEWAY_PORT: True, CERT_PORT: True, 22: False, PROBE_PORT: False}


def test_rules_that_would_lock_the_operator_out_are_rolled_back(lab):
    client_ip = lab.config()["lab:clientIp"]
    before = lab.config().get("kokoa:sshAllowFrom", ["0.0.0.0/0"])
    with pytest.raises(ExecutorError) as failed:
        # The operator (the lab client) is not in this network.
        lab.apply({"kokoa:sshAllowFrom": ["172.31.255.128/25"]})
    assert f"comes from {client_ip} to port 22, which the new firewall would not admit" in str(failed.value)
    assert "the previous rules were restored" in str(failed.value)
    try:
        for host in lab.status["origins"] + lab.status["edges"]:
            rules = lab.on_host(host["netns"], "nft", "list", "set", "inet", "kokoa", "ssh_allowed").stdout
            assert "172.31.255.128/25" not in rules, host["netns"]
    finally:
        # SSH still works: the next deployment goes through.
        lab.apply({"kokoa:sshAllowFrom": before})


def test_uninstall_leaves_no_rule_no_kokoa_nginx_conf_and_no_visitor_log(lab):
    _, edge = site(lab, "blog")
    netns = edge["netns"]
    saved = "/root/kokoa-bundle-copy"
    lab.on_host(netns, "sh", "-c", f"rm -rf {saved} && cp -a /etc/kokoa/bundle {saved}")
    try:
        assert lab.on_host(netns, "nft", "list", "table", "inet", "kokoa").returncode == 0
        lab.on_host(netns, "bash", "/etc/kokoa/bundle/uninstall.sh")
        assert lab.on_host(netns, "nft", "list", "table", "inet", "kokoa", check=False).returncode != 0
        conf = lab.on_host(netns, "cat", "/etc/nginx/nginx.conf", check=False).stdout
        assert "# Kokoa edge" not in conf
        assert lab.on_host(netns, "sh", "-c", "ls /var/log/nginx/access.log* 2>/dev/null",
                           check=False).stdout == ""
    finally:
        lab.on_host(netns, "bash", f"{saved}/install.sh")
        lab.on_host(netns, "rm", "-rf", saved)
    assert lab.on_host(netns, "nft", "list", "table", "inet", "kokoa").returncode == 0


def test_a_short_flood_from_one_address_leaves_legitimate_visitors_served(lab, outsider):
    origin, edge = site(lab)
    limits = next(o for o in lab.config()["kokoa:origins"] if o["name"] == "shop").get("rateLimit", {})
    rate, burst = limits.get("requestsPerSecond", 20), limits.get("burst", 40)
    hosts = Path("/etc/netns") / outsider / "hosts"
    hosts.parent.mkdir(parents=True, exist_ok=True)
    hosts.write_text(f"127.0.0.1 localhost\n{edge['publicIp']} {origin['domain']}\n")
    before = lab.lab.demo_requests(origin["netns"])
    started = time.monotonic()
    flood = subprocess.Popen(["timeout", "20", "ip", "netns", "exec", outsider, "wrk", "-t1", "-c200", "-d5s",
                              "--timeout", "2s", f"https://{origin['domain']}/"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1)
        visitor = subprocess.run(
            ["ip", "netns", "exec", lab.status["client"], "python3", str(REPO / "bench" / "legit_client.py"),
             "--host", origin["domain"], "--address", edge["publicIp"], "--cafile", lab.status["caBundle"],
             "--rate", "10", "--count", "30"], capture_output=True, text=True, timeout=60)
    finally:
        attack = flood.communicate(timeout=30)[0]
    elapsed = time.monotonic() - started
    result = json.loads(visitor.stdout)
    assert result["errors"] == [], result["errors"]
    assert "requests in" in attack, attack
    reached = lab.lab.demo_requests(origin["netns"]) - before
    # The attacker reaches the application at no more than its configured rate.
    assert reached <= 30 + burst + rate * elapsed, (reached, attack)


def public_key_digest(lab, netns: str, command: str) -> str:
    pipeline = f"set -o pipefail; {command} | openssl pkey -pubin -pubout | sha256sum"
    return lab.on_host(netns, "bash", "-c", pipeline).stdout


def test_an_edge_that_leaves_takes_no_usable_key_with_it(lab):
    origin = next(o for o in lab.status["origins"] if o["name"] == "blog")
    staying = next(e for e in lab.status["edges"] if e["origin"] == "blog")
    key_file = f"/etc/letsencrypt/live/{origin['domain']}/privkey.pem"

    def origin_key() -> str:
        return public_key_digest(lab, origin["netns"], f"openssl pkey -in {key_file} -pubout")

    def served_key() -> str:
        return public_key_digest(lab, lab.status["client"],
                                 f"openssl s_client -connect {staying['publicIp']}:443 -servername {origin['domain']}"
                                 " </dev/null 2>/dev/null | openssl x509 -noout -pubkey")

    before = origin_key()
    lab.add_edge(name="edge-leaving", origin="blog", host=lab.spare_edge_host())
    assert origin_key() == before  # a new edge is no reason for a new key
    lab.apply({"kokoa:edges": [e for e in lab.config()["kokoa:edges"] if e["name"] != "edge-leaving"]})
    after = origin_key()
    assert after != before
    # The edges that stay fetch the new pair at their next refresh (every 5 s in the lab).
    deadline = time.monotonic() + 60
    while served_key() != after and time.monotonic() < deadline:
        time.sleep(2)
    assert served_key() == after


def test_an_application_running_as_www_data_cannot_read_the_exported_tls_key(lab):
    origin = next(o for o in lab.status["origins"] if o["name"] == "blog")
    export = "/var/lib/kokoa/cert-export"
    listing = lab.on_host(origin["netns"], "stat", "-c", "%n %U:%G %a", export, f"{export}/privkey.pem").stdout
    assert listing.split("\n")[:2] == [f"{export} root:kokoa-gateway 750",
                                       f"{export}/privkey.pem root:kokoa-gateway 640"]
    as_app = lab.on_host(origin["netns"], "runuser", "-u", "www-data", "--", "cat", f"{export}/privkey.pem",
                         check=False)
    assert as_app.returncode != 0 and "Permission denied" in as_app.stderr
    # The gateway's own workers can, which is what serves the edges.
    as_gateway = lab.on_host(origin["netns"], "runuser", "-u", "kokoa-gateway", "--", "head", "-c", "5",
                             f"{export}/privkey.pem", check=False)
    assert as_gateway.stdout == "-----"
