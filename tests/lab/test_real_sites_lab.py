"""Real sites in the lab: blog's three names (blog.kokoa.test; www.blog.kokoa.test, redirected by the
edges; api.blog.kokoa.test, the WebSocket echo application behind its own door of the gateway) through
every edge on one certificate; a name added to shop and removed again, each time on a
certificate issued at once and in DNS; a WebSocket through every edge to each origin's second application
(blog's gateway relays TCP, shop's is an HTTP proxy, and so is the door of blog's api name), open
across a `kokoa lab up` that changes nothing; and uploads against blog's maxBodySize: 50m."""

from __future__ import annotations

import copy
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.lab.test_lab_e2e import curl, domain_of, wait_for_certificates
from tests.lab.test_rotation_lab import resolve

WEBSOCKET = str(Path(__file__).resolve().parents[2] / "kokoa_infra" / "lab" / "websocket.py")
BLOG, WWW, API = "blog.kokoa.test", "www.blog.kokoa.test", "api.blog.kokoa.test"


def websocket(lab, edge: dict, *args: str, url: str | None = None, timeout: float = 60):
    """The echo client through `edge`: to its origin's /ws/echo, or to `url`."""
    url = url or f"wss://{domain_of(lab, edge['origin'])}/ws/echo"
    return lab.on_host(lab.status["client"], sys.executable, WEBSOCKET, "echo", url,
                       "--ca", lab.status["caBundle"], "--connect", f"{edge['publicIp']}:443", *args,
                       check=False, timeout=timeout)


def sockets(lab) -> list[tuple[dict, str]]:
    """(edge, URL) of every WebSocket application through every edge: each origin's /ws/echo
    (blog's through the relay, shop's through the HTTP proxy) and blog's api name."""
    return [(edge, f"wss://{domain_of(lab, edge['origin'])}/ws/echo") for edge in lab.status["edges"]] + [
        (edge, f"wss://{API}/") for edge in blog_edges(lab)]


def blog_edges(lab) -> list[dict]:
    return [edge for edge in lab.status["edges"] if edge["origin"] == "blog"]

# The lab's certRefreshInterval is 5 s: every edge has the origin's newest certificate well within this.
CERTIFICATE_AGREEMENT_S = 60


def name_through(lab, edge: dict, name: str, *args: str, path: str = "/") -> subprocess.CompletedProcess:
    return curl(lab, "--cacert", lab.status["caBundle"], "--resolve", f"{name}:443:{edge['publicIp']}", *args,
                f"https://{name}{path}")


def wait_for_every_name(lab, deadline_s: float = 120) -> None:
    """Every name of blog verified through every blog edge (bounded: the certificate with every
    name may still be on its way from the origin to the edges)."""
    deadline = time.monotonic() + deadline_s
    pending = [(edge, name) for edge in blog_edges(lab) for name in (BLOG, WWW, API)]
    while pending and time.monotonic() < deadline:
        pending = [(e, n) for e, n in pending if name_through(lab, e, n, "-o", "/dev/null").returncode != 0]
        if pending:
            time.sleep(2)
    assert not pending, [(e["name"], n) for e, n in pending]


def test_every_name_of_blog_through_every_edge_on_one_certificate(lab):
    blog = next(o for o in lab.status["origins"] if o["name"] == "blog")
    assert (blog["domain"], blog["hostnames"]) == (BLOG, [WWW, API])  # `kokoa lab status --json`
    wait_for_every_name(lab)
    for edge in blog_edges(lab):
        assert name_through(lab, edge, BLOG).stdout == "hello from origin blog\n"
        # api.blog.kokoa.test reaches its own application: the echo server, which tells what it got.
        answer = name_through(lab, edge, API)
        assert answer.stdout.startswith("upgrade=[] connection=[] x-forwarded-proto=[https]"), answer
        moved = name_through(lab, edge, WWW, "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}", path="/a/b?c=d")
        assert moved.stdout == f"301 https://{BLOG}/a/b?c=d", moved
    # One certificate, every name, every edge. After a re-issue (earlier tests add and remove
    # edges, and the origin then replaces its TLS key) each edge takes the new one at its next
    # refresh: until then two good certificates are served, so wait for the edges to agree (bounded).
    deadline = time.monotonic() + CERTIFICATE_AGREEMENT_S
    while True:
        served = {(edge["name"], name): served_certificate(lab, edge, name)
                  for edge in blog_edges(lab) for name in (BLOG, WWW, API)}
        certificates = {fingerprint for fingerprint, _ in served.values()}
        if len(certificates) == 1 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert all(names == sorted([BLOG, WWW, API]) for _, names in served.values()), served
    assert len(certificates) == 1, served


def served_certificate(lab, edge: dict, name: str) -> tuple[str, list[str]]:
    """(SHA-256 fingerprint, names) of the certificate the edge serves for `name`, verified."""
    shown = lab.on_host(lab.status["client"], "sh", "-c",
                        f"openssl s_client -connect {edge['publicIp']}:443 -servername {name} "
                        f"-CAfile {lab.status['caBundle']} -verify_return_error </dev/null 2>/dev/null "
                        "| openssl x509 -noout -fingerprint -sha256 -ext subjectAltName")
    lines = shown.stdout.splitlines()
    names = sorted(part.strip().removeprefix("DNS:") for part in lines[-1].split(",")) if lines else []
    return (lines[0] if lines else ""), names


def test_the_redirect_is_answered_by_the_edge_without_touching_the_origin(lab):
    wait_for_every_name(lab)
    origin = next(o for o in lab.status["origins"] if o["name"] == "blog")
    before = lab.lab.demo_requests(origin["netns"])
    for edge in blog_edges(lab):
        for _ in range(3):
            moved = name_through(lab, edge, WWW, "-o", "/dev/null", "-w", "%{http_code}")
            assert moved.stdout == "301", moved
    assert lab.lab.demo_requests(origin["netns"]) == before + 1  # this reading itself, nothing else


def test_a_websocket_echoes_through_every_edge_for_both_gateway_forms(lab):
    wait_for_certificates(lab, lab.status["edges"])
    wait_for_every_name(lab)
    origins = {edge["origin"] for edge in lab.status["edges"]}
    assert origins == {"blog", "shop"}  # a relaying gateway and an HTTP proxy
    for edge, url in sockets(lab):
        echoed = websocket(lab, edge, "--message", f"via {edge['name']}", "--count", "2", url=url)
        assert echoed.returncode == 0, (edge["name"], url, echoed.stderr)
        assert echoed.stdout.split("\n")[:2] == [f"via {edge['name']}"] * 2


def test_open_websockets_survive_an_up_that_changes_nothing(lab):
    wait_for_certificates(lab, lab.status["edges"])
    wait_for_every_name(lab)
    results: dict[tuple[str, str], object] = {}

    def hold(edge: dict, url: str) -> None:
        # One echo every 2 s for at most 2 minutes: longer than the apply takes.
        results[edge["name"], url] = websocket(lab, edge, "--count", "60", "--pause", "2", url=url, timeout=180)

    held = sockets(lab)
    threads = [threading.Thread(target=hold, args=pair, daemon=True) for pair in held]
    for thread in threads:
        thread.start()
    report = lab.apply()
    for thread in threads:
        thread.join(timeout=200)
    assert report.changed == [], f"the apply re-ran {report.changed}"
    for key, result in results.items():
        assert result.returncode == 0, (key, result.stderr)
        assert len(result.stdout.split()) == 60, key
    assert len(results) == len(held)


def test_blog_takes_a_20_mb_upload_and_refuses_60_mb_with_413(lab, tmp_path):
    wait_for_certificates(lab, lab.status["edges"])
    edge = next(e for e in lab.status["edges"] if e["origin"] == "blog")
    domain = domain_of(lab, "blog")
    for megabytes, expected in ((20, "200"), (60, "413")):
        body = tmp_path / f"{megabytes}.bin"
        with body.open("wb") as out:
            out.truncate(megabytes * 1024 * 1024)
        sent = curl(lab, "--cacert", lab.status["caBundle"], "--resolve", f"{domain}:443:{edge['publicIp']}",
                    "--http1.1", "-o", "/dev/null", "-w", "%{http_code}", "--data-binary", f"@{body}",
                    f"https://{domain}/upload", timeout=60)
        assert sent.stdout == expected, (megabytes, sent.stdout, sent.stderr)


def test_a_name_added_to_an_origin_is_on_a_new_certificate_at_once_and_gone_when_removed(lab):
    """Adding a name changes the origin's certificate command (it names every name), so the
    up re-runs it: certbot issues a certificate for the new list at once, whatever the old one's
    expiry (--renew-with-new-domains), the edges take it at their next refresh, and the name
    gets its A records. Removing the name again does the same the other way."""
    wait_for_certificates(lab, lab.status["edges"])
    before = lab.config()["kokoa:origins"]
    origins = copy.deepcopy(before)
    shop = next(o for o in origins if o["name"] == "shop")
    added = f"new.{shop['domain']}"
    shop["hostnames"] = [*shop.get("hostnames", []), {"name": added}]
    edges = [edge for edge in lab.status["edges"] if edge["origin"] == "shop"]
    try:
        report = lab.apply({"kokoa:origins": origins})
        assert "updated shop-certificate" in report.changed, report.changed
        assert resolve(lab, added) == {edge["publicIp"] for edge in edges}
        served = wait_for_names(lab, edges, shop["domain"], [shop["domain"], added])
        assert all(name_through(lab, edge, added).stdout == "hello from origin shop\n" for edge in edges)
    finally:
        report = lab.apply({"kokoa:origins": before})
    assert "updated shop-certificate" in report.changed, report.changed
    assert resolve(lab, added) == set()
    after = wait_for_names(lab, edges, shop["domain"], [shop["domain"]])
    assert {fingerprint for fingerprint, _ in after.values()}.isdisjoint(
        fingerprint for fingerprint, _ in served.values())


def wait_for_names(lab, edges: list[dict], domain: str, names: list[str],
                   deadline_s: float = CERTIFICATE_AGREEMENT_S) -> dict[str, tuple[str, list[str]]]:
    """{edge: (fingerprint, names)} once every edge serves, verified, one certificate for exactly
    `names` (bounded: the certificate is issued during the up, the edges refresh every 5 s)."""
    deadline = time.monotonic() + deadline_s
    while True:
        served = {edge["name"]: served_certificate(lab, edge, domain) for edge in edges}
        if all(sorted(found) == sorted(names) for _, found in served.values()) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert all(sorted(found) == sorted(names) for _, found in served.values()), served
    return served
