"""One origin with several names through the real rendered edge and gateway, in throwaway namespaces:
blog.example.com on the origin's application, www.blog.example.com redirected by the edge (behind the
limits, never reaching the origin) and api.blog.example.com on an application of its own (a WebSocket
echo server) at its own door of the gateway, each door in both of the gateway's forms."""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns.test_real_sites import WEBSOCKET, start_gateway, wait_for_port
from tests.support.edge_serving import link_tunnel, start_edge_nginx, throwaway_certificate
from tests.support.rendering import bundles, wireguard_ips
from tests.support.stacks import BASE_CONFIG

BLOG, WWW, API = "blog.example.com", "www.blog.example.com", "api.blog.example.com"
MAIN_PORT, API_PORT = 8080, 9000


@pytest.fixture(params=[("http://127.0.0.1:8080", "http://127.0.0.1:9000/"),
                        ("http://127.0.0.1:8080/", "http://127.0.0.1:9000")],
                ids=["relayed domain, proxied api", "proxied domain, relayed api"])
def site(request, make_netns, tmp_path):
    """The chain for blog with its three names; returns (client namespace, CA, the main application's log,
    the edge's directory)."""
    def build(**blog) -> tuple[str, Path, Path, Path]:
        edge_ns, origin_ns = make_netns(), make_netns()
        main, api = request.param
        config = copy.deepcopy(BASE_CONFIG)
        config["kokoa:origins"][0] |= {"upstream": main, "hostnames": [
            {"name": WWW, "redirectTo": BLOG}, {"name": API, "upstream": api}], **blog}
        rendered = bundles(config)
        ips = wireguard_ips(config)
        link_tunnel(edge_ns, origin_ns, ips["edge-tokyo-1"], ips["blog"])
        # The origin's own application: a static file server that logs every request it gets.
        (tmp_path / "www").mkdir()
        (tmp_path / "www" / "index.html").write_text("the main application\n")
        log = tmp_path / "main.log"
        with log.open("w") as out:
            subprocess.Popen(["ip", "netns", "exec", origin_ns, sys.executable, "-m", "http.server", "--bind",
                              "127.0.0.1", "--directory", str(tmp_path / "www"), str(MAIN_PORT)],
                             stdout=out, stderr=out)
        subprocess.Popen(["ip", "netns", "exec", origin_ns, sys.executable, WEBSOCKET, "serve", "127.0.0.1",
                          str(API_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for port in (MAIN_PORT, API_PORT):
            wait_for_port(origin_ns, port)
        (tmp_path / "origin").mkdir()
        start_gateway(origin_ns, tmp_path / "origin", rendered["origin/blog"]["gateway.conf"])
        edge_dir = tmp_path / "edge"
        edge_dir.mkdir()
        ca = throwaway_certificate(edge_dir, BLOG, WWW, API)
        start_edge_nginx(edge_ns, edge_dir, rendered["edge/edge-tokyo-1"])
        return edge_ns, ca, log, edge_dir
    return build
    # make_netns kills every process left in the namespaces.


def curl(netns: str, ca: Path, name: str, *args: str, path: str = "/") -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns, "curl", "-sS", "--max-time", "20", "--cacert", str(ca),
                           "--resolve", f"{name}:443:127.0.0.1", *args, f"https://{name}{path}"],
                          capture_output=True, text=True, timeout=60)


def test_each_name_reaches_its_own_application_through_its_door(site):
    netns, ca, _, edge_dir = site()
    assert curl(netns, ca, BLOG).stdout == "the main application\n"
    api = curl(netns, ca, API, path="/x?y=1")
    assert api.stdout.startswith("upgrade=[] connection=[] x-forwarded-proto=[https]"), api.stdout + api.stderr
    echoed = subprocess.run(["ip", "netns", "exec", netns, sys.executable, WEBSOCKET, "echo", f"wss://{API}/live",
                             "--ca", str(ca), "--connect", "127.0.0.1:443", "--message", "api", "--count", "2"],
                            capture_output=True, text=True, timeout=60)
    assert echoed.returncode == 0 and echoed.stdout.split() == ["api", "api"], echoed.stderr
    # The domain's application has no WebSocket: the door decides, not the path.
    refused = subprocess.run(["ip", "netns", "exec", netns, sys.executable, WEBSOCKET, "echo", f"wss://{BLOG}/live",
                              "--ca", str(ca), "--connect", "127.0.0.1:443"], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode != 0
    # Each name is its own server: the access log (the edge's traffic metrics) names the one asked for.
    assert curl(netns, ca, WWW, "-o", "/dev/null").returncode == 0
    subprocess.run(["kill", "-USR1", (edge_dir / "run" / "nginx.pid").read_text().strip()], check=True)
    sites = {" ".join(line.split(" kokoa ", 1)[1].split()[:2]) for line in wait_for_log(edge_dir, 5)}
    assert sites >= {f"{BLOG} 2xx", f"{API} 2xx", f"{API} 1xx", f"{BLOG} 4xx", f"{WWW} 3xx"}, sites


def wait_for_log(edge_dir: Path, lines: int) -> list[str]:
    """The edge's access log once it has `lines` lines (nginx writes its buffer on USR1; bounded: 5 s)."""
    log = edge_dir / "log" / "nginx" / "access.log"
    for _ in range(50):
        found = log.read_text().splitlines() if log.exists() else []
        if len(found) >= lines:
            return found
        time.sleep(0.1)
    raise AssertionError(f"the access log has {len(found)} lines")


def test_the_redirect_is_the_edges_own_answer_and_never_reaches_the_origin(site):
    netns, ca, log, _ = site()
    before = log.read_text()
    moved = curl(netns, ca, WWW, "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", path="/a/%2Fb?c=d")
    assert moved.stdout == f"301 https://{BLOG}/a/%2Fb?c=d", moved.stdout + moved.stderr
    posted = curl(netns, ca, WWW, "-o", "/dev/null", "-w", "%{http_code}", "--data", "x=1", path="/form")
    assert posted.stdout == "301"
    assert log.read_text() == before   # the application saw neither
    # Port 80 sends each name to its own HTTPS first.
    plain = subprocess.run(["ip", "netns", "exec", netns, "curl", "-sS", "-o", "/dev/null", "-w",
                            "%{http_code} %{redirect_url}", "-H", f"Host: {WWW}", "http://127.0.0.1/p"],
                           capture_output=True, text=True, timeout=30)
    assert plain.stdout == f"301 https://{WWW}/p"


def test_a_redirecting_name_is_rate_limited_like_the_others(site):
    netns, ca, *_ = site(rateLimit={"requestsPerSecond": 1, "burst": 2})
    # Eight at once: a burst of 2 waits its turn, the rest are refused.
    codes = curl(netns, ca, WWW, "--parallel", "--parallel-immediate", *(["-o", "/dev/null"] * 8),
                 "-w", "%{http_code}\n", *[f"https://{WWW}/{i}" for i in range(7)]).stdout.split()
    assert sorted(set(codes)) == ["301", "429"] and len(codes) == 8, codes


def test_99_more_names_of_the_longest_length_load_on_the_edge_and_the_gateway(make_netns, tmp_path):
    tail = ".blog.example.com"
    names = [f"{'a' * 63}.{'b' * 63}.{'c' * 63}.{i:02d}{'d' * (253 - 3 * 64 - 2 - len(tail))}{tail}"
             for i in range(99)]
    hostnames = [{"name": name} | ({"redirectTo": BLOG} if i % 3 == 0 else {})
                 | ({"upstream": f"http://127.0.0.1:{9000 + i}{'/' if i % 2 else ''}"} if i % 3 == 1 and i < 40 else {})
                 for i, name in enumerate(names)]
    config = copy.deepcopy(BASE_CONFIG)
    config["kokoa:origins"][0] |= {"hostnames": hostnames, "capacity": {"concurrentRequests": 8},
                                   "underAttack": "on"}
    rendered = bundles(config)
    edge_ns, origin_ns = make_netns(), make_netns()
    throwaway_certificate(tmp_path / "edge", BLOG)
    start_edge_nginx(edge_ns, tmp_path / "edge", rendered["edge/edge-tokyo-1"])   # asserts that it started
    link_tunnel(edge_ns, origin_ns, wireguard_ips(config)["edge-tokyo-1"], wireguard_ips(config)["blog"])
    start_gateway(origin_ns, tmp_path / "origin", rendered["origin/blog"]["gateway.conf"])
    doors = {80 + i for i in range(1 + sum("upstream" in h for h in hostnames))}
    assert len(doors) == 14
    for door in doors:
        wait_for_port(origin_ns, door)
