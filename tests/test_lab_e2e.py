"""The whole system on one machine, deployed by the program's own SSH commands, checked by real traffic.

All traffic runs between the lab's own namespaces (the client namespace is the internet).
That `kokoa lab down` leaves nothing behind is asserted by the `lab` fixture's teardown.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest

pytestmark = pytest.mark.lab


def curl(lab, *args: str, timeout: int = 10) -> subprocess.CompletedProcess:
    return lab.on_host(lab.status["client"], "curl", "-sS", "--max-time", str(timeout), *args, check=False)


def https_get(lab, edge: dict, domain: str, path: str = "/") -> subprocess.CompletedProcess:
    return curl(lab, "--cacert", lab.status["caBundle"], "--resolve", f"{domain}:443:{edge['publicIp']}",
                "-w", "\n%{http_code}", f"https://{domain}{path}")


def domain_of(lab, origin_name: str) -> str:
    return next(o["domain"] for o in lab.status["origins"] if o["name"] == origin_name)


def wait_for_certificates(lab, edges, deadline_s: float = 120) -> None:
    """Edges serve a placeholder until they fetch the origin's certificate (bounded wait)."""
    deadline = time.monotonic() + deadline_s
    pending = list(edges)
    while pending and time.monotonic() < deadline:
        pending = [e for e in pending if https_get(lab, e, domain_of(lab, e["origin"])).returncode != 0]
        if pending:
            time.sleep(2)
    assert not pending, f"no verified certificate on {[e['name'] for e in pending]}"


def test_every_edge_serves_its_origin_over_verified_https(lab):
    wait_for_certificates(lab, lab.status["edges"])
    for edge in lab.status["edges"]:
        result = https_get(lab, edge, domain_of(lab, edge["origin"]))
        assert result.returncode == 0, result.stderr
        body, code = result.stdout.rsplit("\n", 1)
        assert code == "200"
        assert f"origin {edge['origin']}" in body


def test_plain_http_redirects_to_https(lab):
    edge = lab.status["edges"][0]
    domain = domain_of(lab, edge["origin"])
    result = curl(lab, "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                  "--resolve", f"{domain}:80:{edge['publicIp']}", f"http://{domain}/some/page?x=1")
    assert result.stdout == f"301 https://{domain}/some/page?x=1"


def test_each_origin_sees_a_recent_handshake_from_each_of_its_edges(lab):
    outputs = json.loads(lab.outputs_file.read_text())
    for origin in lab.status["origins"]:
        shown = lab.on_host(origin["netns"], "wg", "show", "wg0", "latest-handshakes").stdout
        handshakes = dict(line.split("\t") for line in shown.strip().splitlines())
        for edge_name in outputs["origins"][origin["name"]]["edges"]:
            key = outputs["edges"][edge_name]["publicKey"]
            assert key in handshakes, f"{edge_name} is not a peer of {origin['name']}"
            assert int(handshakes[key]) > time.time() - 180, f"no recent handshake from {edge_name}"


def test_the_origin_application_is_not_reachable_from_the_client(lab):
    for origin in lab.status["origins"]:
        for url in (f"http://{origin['publicIp']}:8080/", f"http://{origin['publicIp']}/"):
            result = curl(lab, "-o", "/dev/null", url, timeout=3)
            assert result.returncode != 0, f"{url} answered the client"
    # Nor is the tunnel network: the client has no route into it.
    result = curl(lab, "-o", "/dev/null", "http://10.100.0.1/", timeout=3)
    assert result.returncode != 0


class RequestLoop:
    """GETs through one edge until stopped (bounded by count and time); counts failures."""

    def __init__(self, lab, edge: dict, max_requests: int = 2000, max_seconds: float = 240) -> None:
        self.lab, self.edge = lab, edge
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.ok = self.failed = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        domain = domain_of(self.lab, self.edge["origin"])
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and self.ok + self.failed < self.max_requests \
                and time.monotonic() < deadline:
            result = https_get(self.lab, self.edge, domain)
            if result.returncode == 0 and result.stdout.endswith("\n200"):
                self.ok += 1
            else:
                self.failed += 1
                self.errors.append(result.stderr.strip() or result.stdout[-80:])
            time.sleep(0.05)

    def __enter__(self) -> "RequestLoop":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_reapplying_changes_nothing_and_drops_no_request(lab):
    wait_for_certificates(lab, lab.status["edges"])
    before = {o["name"]: lab.on_host(o["netns"], "wg", "show", "wg0", "public-key").stdout
              for o in lab.status["origins"]}
    with RequestLoop(lab, lab.status["edges"][0]) as loop:
        report = lab.apply()
        time.sleep(1)
    assert loop.failed == 0, loop.errors[:3]
    assert loop.ok > 5
    assert report.changed == [], f"a second apply re-ran {report.changed}"
    after = {o["name"]: lab.on_host(o["netns"], "wg", "show", "wg0", "public-key").stdout
             for o in lab.status["origins"]}
    assert after == before


def test_running_install_again_on_a_host_changes_nothing(lab):
    """install.sh is idempotent: a second run succeeds, rewrites no file and restarts nothing."""
    wait_for_certificates(lab, lab.status["edges"])
    edge = lab.status["edges"][0]
    origin = next(o for o in lab.status["origins"] if o["name"] == edge["origin"])
    snapshot = ("stat -c '%n %i %.9Y %a' /etc/nginx/nginx.conf /etc/wireguard/*.conf /etc/kokoa/bundle/*; "
                "cat /run/nginx.pid 2>/dev/null; cat /run/kokoa-gateway.pid 2>/dev/null; "
                "pgrep -x wireguard-go")
    hosts = (edge["netns"], origin["netns"])
    before = {ns: lab.on_host(ns, "sh", "-c", snapshot).stdout for ns in hosts}
    with RequestLoop(lab, edge) as loop:
        for ns in hosts:
            lab.on_host(ns, "bash", "/etc/kokoa/bundle/install.sh")
        time.sleep(1)
    assert loop.failed == 0, loop.errors[:3]
    assert {ns: lab.on_host(ns, "sh", "-c", snapshot).stdout for ns in hosts} == before

def test_adding_an_edge_reaches_it_without_failing_requests_on_the_others(lab):
    wait_for_certificates(lab, lab.status["edges"])
    spare = lab.spare_edge_host()
    origin = lab.status["origins"][0]["name"]
    existing = [e for e in lab.status["edges"] if e["origin"] == origin]
    with RequestLoop(lab, existing[0]) as loop:
        lab.add_edge(name="edge-added", origin=origin, host=spare)
        time.sleep(1)
    assert loop.failed == 0, loop.errors[:3]
    added = next(e for e in lab.status["edges"] if e["name"] == "edge-added")
    wait_for_certificates(lab, [added])
    result = https_get(lab, added, domain_of(lab, origin))
    assert result.stdout.endswith("\n200") and f"origin {origin}" in result.stdout



def test_a_bundle_whose_nginx_conf_fails_keeps_the_site_up(lab):
    """install.sh refuses an nginx.conf that fails `nginx -t` and keeps serving the previous one."""
    wait_for_certificates(lab, lab.status["edges"])
    edge = lab.status["edges"][-1]
    before = lab.on_host(edge["netns"], "cat", "/etc/nginx/nginx.conf").stdout
    deployed = lab.on_host(edge["netns"], "sh", "-c", "cat /etc/kokoa/bundle/*").stdout
    broken = ("set -e; rm -rf /tmp/kokoa-broken; cp -a /etc/kokoa/bundle /tmp/kokoa-broken; "
              "sed -i 's/server_tokens off;/server_tokens off; this_is_no_directive;/' "
              "/tmp/kokoa-broken/nginx.conf; bash /tmp/kokoa-broken/install.sh")
    try:
        result = lab.on_host(edge["netns"], "sh", "-c", broken, check=False)
        assert result.returncode != 0
        assert "does not pass 'nginx -t'; the previous configuration was kept" in result.stderr
        assert lab.on_host(edge["netns"], "cat", "/etc/nginx/nginx.conf").stdout == before
        # The failed bundle did not replace the deployed one either.
        assert lab.on_host(edge["netns"], "sh", "-c", "cat /etc/kokoa/bundle/*").stdout == deployed
        served = https_get(lab, edge, domain_of(lab, edge["origin"]))
        assert served.returncode == 0 and served.stdout.endswith("\n200")
    finally:
        lab.on_host(edge["netns"], "rm", "-rf", "/tmp/kokoa-broken", check=False)
