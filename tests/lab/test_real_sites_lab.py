"""Real sites in the lab: a WebSocket through every edge to each origin's second application
(blog's gateway relays TCP, shop's is an HTTP proxy), open across a `kokoa lab up` that changes
nothing, and uploads against blog's maxBodySize: 50m."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from tests.lab.test_lab_e2e import curl, domain_of, wait_for_certificates

WEBSOCKET = str(Path(__file__).resolve().parents[2] / "kokoa_infra" / "lab" / "websocket.py")


def websocket(lab, edge: dict, *args: str, timeout: float = 60):
    domain = domain_of(lab, edge["origin"])
    return lab.on_host(lab.status["client"], sys.executable, WEBSOCKET, "echo", f"wss://{domain}/ws/echo",
                       "--ca", lab.status["caBundle"], "--connect", f"{edge['publicIp']}:443", *args,
                       check=False, timeout=timeout)


def test_a_websocket_echoes_through_every_edge_for_both_gateway_forms(lab):
    wait_for_certificates(lab, lab.status["edges"])
    origins = {edge["origin"] for edge in lab.status["edges"]}
    assert origins == {"blog", "shop"}  # a relaying gateway and an HTTP proxy
    for edge in lab.status["edges"]:
        echoed = websocket(lab, edge, "--message", f"via {edge['name']}", "--count", "2")
        assert echoed.returncode == 0, (edge["name"], echoed.stderr)
        assert echoed.stdout.split("\n")[:2] == [f"via {edge['name']}"] * 2


def test_open_websockets_survive_an_up_that_changes_nothing(lab):
    wait_for_certificates(lab, lab.status["edges"])
    results: dict[str, object] = {}

    def hold(edge: dict) -> None:
        # One echo every 2 s for at most 2 minutes: longer than the apply takes.
        results[edge["name"]] = websocket(lab, edge, "--count", "60", "--pause", "2", timeout=180)

    threads = [threading.Thread(target=hold, args=(edge,), daemon=True) for edge in lab.status["edges"]]
    for thread in threads:
        thread.start()
    report = lab.apply()
    for thread in threads:
        thread.join(timeout=200)
    assert report.changed == [], f"the apply re-ran {report.changed}"
    for name, result in results.items():
        assert result.returncode == 0, (name, result.stderr)
        assert len(result.stdout.split()) == 60, name
    assert len(results) == len(lab.status["edges"])


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
