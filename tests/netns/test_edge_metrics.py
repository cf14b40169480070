"""The rendered edge's traffic metrics for real in throwaway namespaces: nginx with its buffered
access log, the root job (edge-counters.sh) and mtail running unprivileged as the install's
no-systemd branch runs it, behind the rendered firewall: requests, refusals, the shield's drops
and the origin's time are counted; the metrics port answers only the origin's tunnel address."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kokoa_infra.health.probes import scrape_edge
from kokoa_infra.health.traffic import parse_edge_metrics
from kokoa_infra.render import COUNTERS_INTERVAL, LOG_FLUSH_S, METRICS_PORT, METRICS_STATE_DIR
from tests.support.rendering import bundles, wireguard_ips
from tests.support.stacks import BASE_CONFIG

DOMAIN = "blog.example.com"
EDGE = "edge-tokyo-1"
CLIENT, CLIENT_EDGE_SIDE = "198.51.100.200", "198.51.100.7"
STRANGER_IN_TUNNEL = "10.100.0.99"   # an address on the tunnel's network that is not the origin's
APP = '''
import http.server, socketserver, sys
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        code = 404 if self.path.startswith("/missing") else 200
        body = b"app\\n"
        self.send_response(code); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args): pass
class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True; allow_reuse_address = True
Server((sys.argv[1], 80), Handler).serve_forever()
'''

pytestmark = pytest.mark.skipif(shutil.which("mtail") is None or shutil.which("nft") is None,
                                reason="needs mtail and nftables (make setup installs them)")


def in_ns(netns: str, *argv: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, done.stderr
    return done


@pytest.fixture
def edge(make_netns, tmp_path):
    """edge-tokyo-1 rendered with a small shield, serving from its own namespace; the origin's
    namespace at the other end of `wg-origin-0` (a veth standing in for WireGuard); a client
    namespace on the public side."""
    config = copy.deepcopy(BASE_CONFIG)
    config["kokoa:origins"][0]["rateLimit"] = {"requestsPerSecond": 5, "burst": 4, "connections": 100,
                                               "newConnectionsPerSecond": 5, "newConnectionsBurst": 10}
    files = bundles(config)[f"edge/{EDGE}"]
    ips = wireguard_ips(config)
    edge_ns, origin_ns, client_ns = make_netns(), make_netns(), make_netns()
    tunnel = next(name for name in files if name.startswith("wg-origin-")).removesuffix(".conf")
    subprocess.run(["ip", "-n", edge_ns, "link", "add", tunnel, "type", "veth", "peer", "name", "tun0",
                    "netns", origin_ns], check=True)
    subprocess.run(["ip", "-n", origin_ns, "addr", "add", f"{ips['blog']}/24", "dev", "tun0"], check=True)
    subprocess.run(["ip", "-n", origin_ns, "addr", "add", f"{STRANGER_IN_TUNNEL}/24", "dev", "tun0"], check=True)
    subprocess.run(["ip", "-n", edge_ns, "addr", "add", f"{ips[EDGE]}/24", "dev", tunnel], check=True)
    subprocess.run(["ip", "-n", edge_ns, "link", "add", "pub0", "type", "veth", "peer", "name", "pub0",
                    "netns", client_ns], check=True)
    subprocess.run(["ip", "-n", edge_ns, "addr", "add", f"{CLIENT_EDGE_SIDE}/24", "dev", "pub0"], check=True)
    subprocess.run(["ip", "-n", client_ns, "addr", "add", f"{CLIENT}/24", "dev", "pub0"], check=True)
    for ns, link in ((edge_ns, tunnel), (origin_ns, "tun0"), (edge_ns, "pub0"), (client_ns, "pub0")):
        subprocess.run(["ip", "-n", ns, "link", "set", link, "up"], check=True)
    subprocess.run(["ip", "-n", client_ns, "route", "add", f"{ips[EDGE]}/32", "via", CLIENT_EDGE_SIDE], check=True)
    app = tmp_path / "app.py"
    app.write_text(APP)
    subprocess.Popen(["ip", "netns", "exec", origin_ns, sys.executable, str(app), ips["blog"]],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    live = tmp_path / "letsencrypt" / "live" / DOMAIN
    live.mkdir(parents=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", f"/CN={DOMAIN}", "-addext", f"subjectAltName=DNS:{DOMAIN}",
                    "-keyout", str(live / "privkey.pem"), "-out", str(live / "fullchain.pem")],
                   check=True, capture_output=True)
    for sub in ("log/nginx", "run/metrics-progs"):
        (tmp_path / sub).mkdir(parents=True)
    for path in (tmp_path / "log", tmp_path / "log" / "nginx", tmp_path / "run", tmp_path / "run" / "metrics-progs"):
        path.chmod(0o755)
    (tmp_path / "run" / "metrics-progs" / "edge.mtail").write_text(files["edge.mtail"])
    for name in ("nginx.conf", "firewall.nft", "edge-counters.sh"):
        (tmp_path / name).write_text(files[name])
    (tmp_path / "edge-counters.sh").chmod(0o755)
    in_ns(edge_ns, "nft", "-f", str(tmp_path / "firewall.nft"))
    # As install.sh's no-systemd branch: mtail as nobody (group adm, no capabilities), restarted
    # by a loop, on the WireGuard address only; the mounts stand in for the edge's own files.
    mtail = ("setsid nice -n 19 setpriv --reuid=nobody --regid=nogroup --groups=adm "
             "--inh-caps=-all --bounding-set=-all "
             f"--no-new-privs sh -c 'echo 19 > /proc/self/autogroup 2>/dev/null; exec \"$@\"' kokoa-edge-metrics "
             f"mtail --progs /run/metrics-progs --logs /var/log/nginx/access.log "
             f"--logs {METRICS_STATE_DIR}/counters.log --address {ips[EDGE]} --port {METRICS_PORT} "
             f"--emit_prog_label=false --logtostderr >{tmp_path / 'mtail.log'} 2>&1 </dev/null &")
    script = (f"mkdir -p /etc/letsencrypt && mount --bind {tmp_path / 'letsencrypt'} /etc/letsencrypt && "
              f"mount --bind {tmp_path / 'log'} /var/log && mount --bind {tmp_path / 'run'} /run && "
              f"nginx -c {tmp_path / 'nginx.conf'} && {tmp_path / 'edge-counters.sh'} && {mtail} "
              "echo $!")
    started = in_ns(edge_ns, "unshare", "--mount", "--propagation", "private", "sh", "-c", script)
    mtail_pid = started.stdout.split()[-1]
    for _ in range(100):   # mtail listening
        if in_ns(edge_ns, "ss", "-ltnH", f"sport = :{METRICS_PORT}").stdout.strip():
            break
        time.sleep(0.1)
    yield {"edge": edge_ns, "origin": origin_ns, "client": client_ns, "ip": ips[EDGE], "origin_ip": ips["blog"],
           "ca": live / "fullchain.pem", "mtail_pid": mtail_pid, "dir": tmp_path}
    # make_netns ends every process left in the namespaces


def counters_job(edge: dict) -> None:
    """The root job, run now in the edge's mounts (the timer runs it every few seconds)."""
    subprocess.run(["nsenter", "--mount", "--net", "-t", edge["mtail_pid"], str(edge["dir"] / "edge-counters.sh")],
                   check=True, timeout=30)


def get(edge: dict, path: str, count: int) -> list[int]:
    """`count` HTTPS requests from the client at once (one curl, in parallel); the codes it saw."""
    argv = ["curl", "-s", "-Z", "--parallel-immediate", "--parallel-max", "20", "-w", "%{http_code}\\n",
            "--max-time", "5", "--cacert", str(edge["ca"]), "--resolve", f"{DOMAIN}:443:{edge['ip']}"]
    for _ in range(count):
        argv += [f"https://{DOMAIN}{path}", "-o", "/dev/null"]
    done = in_ns(edge["client"], *argv, check=False)
    return [int(code) for code in done.stdout.split()]


def scrape_from_origin(edge: dict, source: str | None = None) -> subprocess.CompletedProcess:
    argv = ["curl", "-sS", "--max-time", "3", f"http://{edge['ip']}:{METRICS_PORT}/metrics"]
    if source:
        argv[1:1] = ["--interface", source]
    return in_ns(edge["origin"], *argv, check=False)


def test_the_edge_counts_what_its_clients_saw_and_serves_it_only_to_its_origin(edge):
    codes = get(edge, "/", 20) + get(edge, "/missing", 1)
    assert len(codes) == 21 and codes.count(200) >= 4 and codes.count(429) >= 1 and codes[-1] in (404, 429)
    # The shield: many new connections at once from one address; some are dropped.
    in_ns(edge["client"], "sh", "-c",
          f"for i in $(seq 40); do curl -s -o /dev/null --connect-timeout 1 --max-time 2 -k "
          f"--resolve {DOMAIN}:443:{edge['ip']} https://{DOMAIN}/ & done; wait", timeout=30)
    time.sleep(LOG_FLUSH_S + 1.5)   # the access log's buffer is flushed
    counters_job(edge)
    time.sleep(1)
    # From the origin's tunnel address: the metrics.
    scraped = scrape_from_origin(edge)
    assert scraped.returncode == 0, scraped.stderr
    counters = parse_edge_metrics(scraped.stdout)
    seen_2xx = counters.requests.get((DOMAIN, "2xx"), 0)
    assert seen_2xx >= codes.count(200)
    assert counters.limited.get("limit", 0) >= codes.count(429) >= 1
    assert counters.requests.get((DOMAIN, "4xx"), 0) >= codes.count(429) + codes.count(404)
    assert counters.limited.get("shield_new", 0) > 0
    assert counters.bytes["in"] > 0 and counters.bytes["out"] > 0
    assert counters.connections is not None and counters.connections >= 1   # the stub_status request itself
    assert counters.upstream_count >= codes.count(200)
    # The same through kokoa health's own scraper, run in the origin's namespace.
    probe = in_ns(edge["origin"], sys.executable, "-c",
                  "import sys; from kokoa_infra.health.probes import scrape_edge; "
                  f"r = scrape_edge({edge['ip']!r}, {METRICS_PORT}, 3.0); print(r.ok, r.error)")
    assert probe.stdout.split()[0] == "True", probe.stdout
    # mtail runs as nobody and listens on the WireGuard address alone.
    user = subprocess.run(["ps", "-o", "user=", "-p", edge["mtail_pid"]], capture_output=True, text=True).stdout
    assert user.strip() == "nobody"
    # At the lowest priority, also as a session (the kernel's autogroup) where there is one.
    assert subprocess.run(["ps", "-o", "ni=", "-p", edge["mtail_pid"]], capture_output=True,
                          text=True).stdout.strip() == "19"
    autogroup = Path(f"/proc/{edge['mtail_pid']}/autogroup")
    if autogroup.exists():
        assert autogroup.read_text().split()[-1] == "19"
    listening = in_ns(edge["edge"], "ss", "-ltnH", f"sport = :{METRICS_PORT}").stdout.split()
    assert f"{edge['ip']}:{METRICS_PORT}" in listening and f"0.0.0.0:{METRICS_PORT}" not in listening
    # Another address through the tunnel, and anyone on the public side, get nothing.
    assert scrape_from_origin(edge, STRANGER_IN_TUNNEL).returncode != 0
    public = in_ns(edge["client"], "curl", "-sS", "--max-time", "2",
                   f"http://{edge['ip']}:{METRICS_PORT}/metrics", check=False)
    assert public.returncode != 0
    # The counters job's interval is what install.sh schedules.
    assert COUNTERS_INTERVAL <= 15


def test_an_edge_without_its_exporter_is_reported_not_zero(edge):
    subprocess.run(["kill", "-TERM", edge["mtail_pid"]], check=True)
    time.sleep(0.5)
    probe = in_ns(edge["origin"], sys.executable, "-c",
                  "from kokoa_infra.health.probes import scrape_edge; "
                  f"r = scrape_edge({edge['ip']!r}, {METRICS_PORT}, 2.0); print(r.ok, r.counters, r.error)")
    ok, counters, *error = probe.stdout.split()
    assert (ok, counters) == ("False", "None") and " ".join(error).startswith("metrics: connect failed")
    assert scrape_edge is not None
