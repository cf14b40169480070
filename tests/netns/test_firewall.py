"""The rendered nftables table on real kernels: it loads, it admits what it should, and the
edge's flood shield throttles one source while another gets through (throwaway namespaces)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
import uuid

import pytest

from tests.support.rendering import bundles, lab_config
from tests.support.stacks import BASE_CONFIG

SERVER, ATTACKER, VISITOR = "10.9.1.1", "10.9.1.2", "10.9.2.2"
LIMITS = {"requestsPerSecond": 5, "burst": 5, "connections": 8,
          "newConnectionsPerSecond": 3, "newConnectionsBurst": 4}


def nft(netns: str, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns, "nft", *argv], input=stdin,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("stack", ["example", "lab"])
def test_every_rendered_table_loads_in_the_kernel(stack, netns):
    config = BASE_CONFIG if stack == "example" else lab_config()
    for node, files in bundles(config).items():
        checked = nft(netns, "-c", "-f", "-", stdin=files["firewall.nft"])
        assert checked.returncode == 0, f"{node}: {checked.stderr}"
        applied = nft(netns, "-f", "-", stdin=files["firewall.nft"])
        assert applied.returncode == 0, f"{node}: {applied.stderr}"
        # Applying again replaces the table instead of adding a second copy of each rule.
        assert nft(netns, "-f", "-", stdin=files["firewall.nft"]).returncode == 0
        listed = nft(netns, "list", "table", "inet", "kokoa").stdout
        assert listed.count("policy drop") == 1, node


def test_nft_refuses_a_broken_table_and_keeps_the_old_one(netns):
    good = bundles(BASE_CONFIG)["edge/edge-tokyo-1"]["firewall.nft"]
    assert nft(netns, "-f", "-", stdin=good).returncode == 0
    broken = good.replace("policy drop;", "policy dorp;")
    assert nft(netns, "-f", "-", stdin=broken).returncode != 0
    assert "policy drop" in nft(netns, "list", "table", "inet", "kokoa").stdout


# --- three namespaces: a shielded edge, an attacker and a visitor on separate links -----------

LISTENER = textwrap.dedent("""
    import socket, sys, threading, time
    held = []
    def serve(port):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port)); s.listen(512)
        while True:
            c, _ = s.accept(); held.append(c)
    for port in map(int, sys.argv[1:]):
        threading.Thread(target=serve, args=(port,), daemon=True).start()
    print("ready", flush=True)
    time.sleep(60)
""")

CONNECTOR = textwrap.dedent("""
    import json, select, socket, sys, time
    host, port, count, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    opened, held = 0, []
    if pause < 0:  # all at once: start every connect, then count what completed within 0.5 s
        socks = [socket.socket() for _ in range(count)]
        for s in socks:
            s.setblocking(False); s.connect_ex((host, port))
        time.sleep(0.5)
        _, writable, _ = select.select([], socks, [], 0)
        print(json.dumps(sum(1 for s in writable if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0)))
        sys.exit(0)
    for _ in range(count):
        s = socket.socket(); s.settimeout(0.4)
        try:
            s.connect((host, port)); opened += 1; held.append(s)
        except OSError:
            s.close()
        time.sleep(pause)
    print(json.dumps(opened))
""")


def link(server: str, peer: str, subnet: str, default_route: bool = False) -> None:
    """A veth between two namespaces: `<subnet>.1` on the server's side, `<subnet>.2` on the peer's."""
    name = f"v{subnet.rsplit('.', 1)[1]}"
    subprocess.run(["ip", "-n", server, "link", "add", name, "type", "veth", "peer", "name", "eth0",
                    "netns", peer], check=True)
    for ns, dev, host in ((server, name, 1), (peer, "eth0", 2)):
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{subnet}.{host}/24", "dev", dev], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
    if default_route:
        subprocess.run(["ip", "-n", peer, "route", "add", "default", "via", f"{subnet}.1"], check=True)


@pytest.fixture
def shielded_edge(make_netns, tmp_path):
    """(server, attacker, visitor) namespaces; the server runs an edge's table and listeners."""
    server, attacker, visitor = make_netns(), make_netns(), make_netns()
    # Both reach the server's one address, as two visitors of one public IP would.
    link(server, attacker, "10.9.1", default_route=True)
    link(server, visitor, "10.9.2", default_route=True)
    config = copy.deepcopy(BASE_CONFIG)
    config["kokoa:origins"][0]["rateLimit"] = dict(LIMITS)
    config["kokoa:sshAllowFrom"] = ["10.9.2.0/24"]
    table = bundles(config)["edge/edge-tokyo-1"]["firewall.nft"]
    applied = nft(server, "-f", "-", stdin=table)
    assert applied.returncode == 0, applied.stderr
    script = tmp_path / "listener.py"
    script.write_text(LISTENER)
    listener = subprocess.Popen(["ip", "netns", "exec", server, sys.executable, str(script), "22", "80", "443",
                                 "8081"], stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "ready"
        yield server, attacker, visitor
    finally:
        listener.kill()
        listener.wait(timeout=10)


def connect(netns: str, port: int, count: int = 1, pause: float = 0.0, host: str = SERVER) -> int:
    """How many of `count` TCP connections from `netns` were accepted (each held open).

    One after another with `pause` seconds between them, or all at once with `pause` < 0.
    """
    result = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", CONNECTOR, host, str(port),
                             str(count), str(pause)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_shield_throttles_one_source_while_another_gets_through(shielded_edge):
    server, attacker, visitor = shielded_edge
    # 40 connections at once: the burst passes, the rest is dropped at the SYN.
    flood = connect(attacker, 443, count=40, pause=-1)
    assert 1 <= flood <= LIMITS["newConnectionsBurst"] + 2, flood
    # Meanwhile another address gets its own full allowance (the burst, on either port).
    assert connect(visitor, 443, count=2) == 2
    assert connect(visitor, 80, count=2) == 2


def test_the_shield_caps_connections_held_open_by_one_source(shielded_edge):
    _, attacker, visitor = shielded_edge
    # Slower than the rate limit, so only the cap on open connections can stop it.
    opened = connect(attacker, 443, count=14, pause=0.4)
    assert opened == LIMITS["connections"], opened
    assert connect(visitor, 443, count=2) == 2


def test_only_web_ports_are_public_and_ssh_only_from_the_allow_list(shielded_edge):
    _, attacker, visitor = shielded_edge
    assert connect(visitor, 22) == 1  # 10.9.2.0/24 is in kokoa:sshAllowFrom
    assert connect(attacker, 22) == 0  # 10.9.1.2 is not
    assert connect(visitor, 8081) == 0 and connect(attacker, 8081) == 0  # nothing else is open
    ping = subprocess.run(["ip", "netns", "exec", visitor, "ping", "-c1", "-W2", SERVER],
                          capture_output=True, text=True, timeout=10)
    assert ping.returncode == 0, ping.stdout  # the health checker's ICMP echo


def test_an_origin_admits_wireguard_only_from_its_edges(make_netns, tmp_path):
    origin, edge, stranger = make_netns(), make_netns(), make_netns()
    link(origin, edge, "10.9.1")
    link(origin, stranger, "10.9.2")
    config = copy.deepcopy(BASE_CONFIG)
    config["kokoa:origins"][0]["host"] = "10.9.1.1"
    config["kokoa:edges"][0]["publicIp"] = ATTACKER  # the one edge: 10.9.1.2
    config["kokoa:edges"][1]["publicIp"] = "10.9.3.9"
    table = bundles(config)["origin/blog"]["firewall.nft"]
    assert nft(origin, "-f", "-", stdin=table).returncode == 0
    echo = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', 51820)); "
            "s.settimeout(8)\nwhile True:\n d, a = s.recvfrom(64); s.sendto(d, a)")
    server = subprocess.Popen(["ip", "netns", "exec", origin, sys.executable, "-c", echo])
    probe = ("import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.5)\n"
             "for _ in range(6):\n s.sendto(b'hi', (sys.argv[1], 51820))\n"
             " try: s.recvfrom(64); print('answered'); break\n"
             " except OSError: pass\nelse: print('silent')")
    try:
        answers = {ns: subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", probe,
                                       "10.9.1.1" if ns == edge else "10.9.2.1"],
                                      capture_output=True, text=True, timeout=30).stdout.strip()
                   for ns in (edge, stranger)}
    finally:
        server.kill()
        server.wait(timeout=10)
    assert answers == {edge: "answered", stranger: "silent"}
    # The gateway port is for the tunnel only: from the edge's public side it is closed.
    assert connect(edge, 80, host="10.9.1.1") == 0


# --- issue 18: routing through an origin, a full shield, the edge's WireGuard port -----------

def veth(ns_a: str, name_a: str, address_a: str, ns_b: str, name_b: str, address_b: str) -> None:
    """A veth pair between two namespaces, each end named and addressed (CIDR) as given."""
    temporary = f"kv{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "-n", ns_a, "link", "add", temporary, "type", "veth", "peer", "name", name_b,
                    "netns", ns_b], check=True)
    subprocess.run(["ip", "-n", ns_a, "link", "set", temporary, "name", name_a], check=True)
    for ns, dev, address in ((ns_a, name_a, address_a), (ns_b, name_b, address_b)):
        subprocess.run(["ip", "-n", ns, "addr", "add", address, "dev", dev], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)


def listen(netns: str, tmp_path, *ports: int) -> subprocess.Popen:
    script = tmp_path / "listener.py"
    script.write_text(LISTENER)
    process = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, str(script), *map(str, ports)],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def test_an_edge_cannot_route_through_its_origin(make_netns, tmp_path):
    """An origin that forwards (as Docker turns on) with a network behind it: a taken-over
    edge, through the tunnel interface, reaches the gateway's ports on the origin's tunnel
    address and nothing else: not the network behind, not the origin's other addresses;
    and nothing behind the origin reaches the edge."""
    origin, edge, behind = make_netns(), make_netns(), make_netns()
    # The tunnel as the firewall sees it: an interface named wg0 on the origin, the edge at
    # its tunnel address beyond it (a taken-over edge routes what it likes into it).
    veth(origin, "wg0", "10.100.0.1/24", edge, "eth0", "10.100.0.10/24")
    veth(origin, "v77", "192.168.77.1/24", behind, "eth0", "192.168.77.2/24")
    subprocess.run(["ip", "-n", edge, "route", "add", "192.168.77.0/24", "via", "10.100.0.1"], check=True)
    subprocess.run(["ip", "-n", behind, "route", "add", "default", "via", "192.168.77.1"], check=True)
    subprocess.run(["ip", "netns", "exec", origin, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
    servers = [listen(ns, tmp_path, 80, 9080, 8081) for ns in (origin, behind, edge)]
    try:
        # Without the table the origin routes: the drops below are the firewall's doing.
        assert connect(edge, 80, host="192.168.77.2") == 1
        table = bundles(copy.deepcopy(BASE_CONFIG))["origin/blog"]["firewall.nft"]
        applied = nft(origin, "-f", "-", stdin=table)
        assert applied.returncode == 0, applied.stderr
        assert connect(edge, 80, host="10.100.0.1") == 1  # the gateway
        assert connect(edge, 9080, host="10.100.0.1") == 1  # the certificate export
        assert connect(edge, 80, host="192.168.77.2") == 0  # a container or routed network
        assert connect(edge, 80, host="192.168.77.1") == 0  # the origin's other address
        assert connect(behind, 8081, host="10.100.0.10") == 0  # forwarded into the tunnel
    finally:
        for server in servers:
            server.kill()
            server.wait(timeout=10)


def test_a_full_shield_meters_newcomers_with_one_budget(shielded_edge):
    """Sets that cannot take another source (as after a flood of spoofed sources) leave a
    new source metered by the shared budget, and a source tracked before keeps its own
    allowance."""
    server, attacker, visitor = shielded_edge
    config = copy.deepcopy(BASE_CONFIG)
    config["kokoa:origins"][0]["rateLimit"] = dict(LIMITS)
    config["kokoa:sshAllowFrom"] = ["10.9.2.0/24"]
    table = bundles(config)["edge/edge-tokyo-1"]["firewall.nft"]
    # Small sets and a small budget, so that a test fills and exhausts them.
    small = table.replace("size 65535\n        flags dynamic", "size 8\n        flags dynamic")
    small = small.replace("limit rate over 1000/second burst 1000 packets", "limit rate over 1/second burst 3 packets")
    assert nft(server, "-f", "-", stdin=small).returncode == 0
    assert connect(visitor, 443, count=2) == 2  # tracked while the sets have room
    spoofed = ", ".join(f"10.77.0.{i}" for i in range(1, 8))
    for shield_set in ("web_new", "web_open"):
        added = nft(server, "add", "element", "inet", "kokoa", shield_set, f"{{ {spoofed} }}")
        assert added.returncode == 0, added.stderr
    full = nft(server, "add", "element", "inet", "kokoa", "web_new", "{ 10.77.0.99 }")
    assert full.returncode != 0  # the set holds 8 sources: no room for another
    # A newcomer floods: it cannot be tracked, so the budget (burst 3) meters it.
    flood = connect(attacker, 443, count=40, pause=-1)
    assert 1 <= flood <= 3 + 2, flood
    # The source tracked before keeps its own allowance (its burst of 4).
    assert connect(visitor, 443, count=2) == 2


def test_an_edge_admits_its_origins_wireguard_on_its_wireguard_port_only(make_netns):
    edge, origin = make_netns(), make_netns()
    link(edge, origin, "10.9.1")  # the edge 10.9.1.1, the origin 10.9.1.2
    config = copy.deepcopy(BASE_CONFIG)
    config["kokoa:origins"][0]["host"] = "10.9.1.2"
    table = bundles(config)["edge/edge-tokyo-1"]["firewall.nft"]
    assert nft(edge, "-f", "-", stdin=table).returncode == 0
    echo = ("import socket, sys, threading\n"
            "def serve(port):\n"
            " s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', port)); s.settimeout(10)\n"
            " while True:\n  d, a = s.recvfrom(64); s.sendto(d, a)\n"
            "threads = [threading.Thread(target=serve, args=(p,), daemon=True) for p in (51820, 40000)]\n"
            "[t.start() for t in threads]; [t.join(12) for t in threads]")
    server = subprocess.Popen(["ip", "netns", "exec", edge, sys.executable, "-c", echo])
    # From the origin's address and WireGuard port, as anyone who spoofs it would send.
    probe = ("import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.5)\n"
             "s.bind(('0.0.0.0', 51820))\n"
             "for _ in range(6):\n s.sendto(b'hi', ('10.9.1.1', int(sys.argv[1])))\n"
             " try: s.recvfrom(64); print('answered'); break\n except OSError: pass\nelse: print('silent')")
    try:
        answers = {port: subprocess.run(["ip", "netns", "exec", origin, sys.executable, "-c", probe, str(port)],
                                        capture_output=True, text=True, timeout=30).stdout.strip()
                   for port in (51820, 40000)}
    finally:
        server.kill()
        server.wait(timeout=10)
    assert answers == {51820: "answered", 40000: "silent"}
