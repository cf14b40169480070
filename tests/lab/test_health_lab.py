"""`kokoa health` end to end in the lab: run on an origin host, break one edge two ways, watch it recover."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.html_preview import PageRow, page_rows, parse_html

REPO = Path(__file__).resolve().parents[2]
POLL_DEADLINE_S = 40
USERSPACE_WG = ("WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go",
                "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1")


@pytest.fixture(scope="module")
def origin(lab_env) -> dict:
    return lab_env.status["origins"][0]


@pytest.fixture(scope="module")
def edge(lab_env, origin) -> dict:
    """An edge of the origin we run on, so its WireGuard IP is what gets pinged."""
    return next(e for e in lab_env.status["edges"] if e["origin"] == origin["name"])


def run_health(lab, origin: dict, *extra: str) -> dict[str, dict]:
    """One `kokoa health --once --json` in the origin host's network; nodes by "role/name".

    Only the network namespace: a lab host's private /tmp would hide a checkout under /tmp.
    """
    result = subprocess.run(
        ["ip", "netns", "exec", origin["netns"], sys.executable, "-m", "kokoa_infra.health",
         "--once", "--json", "--outputs", str(lab.outputs_file),
         "--ca-bundle", lab.status["caBundle"], "--https-timeout", "5", *extra],
        env=os.environ | {"PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert result.returncode in (0, 1), result.stderr
    return {f"{node['role']}/{node['name']}": node for node in json.loads(result.stdout)["nodes"]}


def run_health_with_page(lab, origin: dict, page: Path) -> tuple[dict[str, dict], dict[str, PageRow]]:
    """One sweep written both as JSON and as the status page."""
    nodes = run_health(lab, origin, "--html", str(page))
    return nodes, page_rows(parse_html(page.read_text())[0])


def wait_for(lab, origin: dict, condition: Callable[[dict[str, dict]], bool]) -> dict[str, dict]:
    deadline = time.monotonic() + POLL_DEADLINE_S
    nodes = run_health(lab, origin)
    while not condition(nodes) and time.monotonic() < deadline:
        time.sleep(1)
        nodes = run_health(lab, origin)
    return nodes


def on_edge(lab, edge: dict, systemd: str, plain: str) -> None:
    """`systemd` on a systemd machine (daemons belong to their units there), else `plain`."""
    lab.on_host(edge["netns"], "sh", "-c", f"if [ -d /run/systemd/system ]; then {systemd}; else {plain}; fi")


def all_healthy(nodes: dict[str, dict]) -> bool:
    return all(node["status"] == "healthy" for node in nodes.values())


def unhealthy(nodes: dict[str, dict]) -> set[str]:
    return {key for key, node in nodes.items() if node["status"] != "healthy"}


def test_all_nodes_healthy_from_an_origin(lab_env, origin):
    nodes = wait_for(lab_env, origin, all_healthy)
    assert unhealthy(nodes) == set()
    own_edges = [n for n in nodes.values() if n["role"] == "edge" and n["origin"] == origin["name"]]
    assert own_edges and all(n["checks"]["ping"]["via"] == "wireguard" for n in own_edges)
    assert all(n["checks"]["https"]["ok"] for n in nodes.values() if n["role"] == "edge")


def test_stopped_nginx_makes_only_that_edge_unhealthy_by_https_and_the_page_shows_it(
        lab_env, origin, edge, tmp_path):
    key = f"edge/{edge['name']}"
    page = tmp_path / "status.html"
    lab_env.on_host(edge["netns"], "sh", "-c", "nginx -s stop")
    try:
        wait_for(lab_env, origin, lambda n: key in unhealthy(n))
        nodes, rows = run_health_with_page(lab_env, origin, page)
        assert unhealthy(nodes) == {key}
        assert nodes[key]["checks"]["https"]["ok"] is False
        assert nodes[key]["checks"]["ping"]["ok"] is True
    finally:
        on_edge(lab_env, edge, "systemctl start nginx", "nginx")
    # The page of that sweep: the stopped edge unhealthy by HTTPS, every other node serving.
    assert set(rows) == set(nodes)
    assert rows[key].state == "unhealthy"
    assert f"https: {nodes[key]['checks']['https']['error']}" in rows[key].cells["State"]
    assert "ping:" not in rows[key].cells["State"]
    assert {k for k, row in rows.items() if row.state != "serving"} == {key}
    for other, node in nodes.items():
        https = node["checks"].get("https")
        if https and https["ok"]:
            assert rows[other].cells["HTTPS"].startswith(f"HTTP {https['code']}")
            assert rows[other].cells["Certificate"] == f"{https['certDaysLeft']} days left"
    text = page.read_text()
    for node in json.loads(Path(lab_env.outputs_file).read_text())["healthTargets"]:
        if node["role"] == "origin":
            # Origin endpoints stay off the page (whole addresses: an edge's may extend one).
            assert not re.search(rf"(?<![\d.]){re.escape(node['publicIp'])}(?![\d])", text)
    assert all_healthy(wait_for(lab_env, origin, all_healthy))


def test_wireguard_down_makes_that_edge_unhealthy_by_ping(lab_env, origin, edge):
    key = f"edge/{edge['name']}"
    outputs = json.loads(Path(lab_env.outputs_file).read_text())
    interface = f"wg-origin-{outputs['origins'][origin['name']]['subnet']}"
    userspace = " ".join(USERSPACE_WG)
    on_edge(lab_env, edge, f"systemctl stop wg-quick@{interface}", f"env {userspace} wg-quick down {interface}")
    try:
        nodes = wait_for(lab_env, origin, lambda n: key in unhealthy(n))
        assert key in unhealthy(nodes)
        assert nodes[key]["checks"]["ping"]["ok"] is False
        assert unhealthy(nodes) == {key}
    finally:
        on_edge(lab_env, edge, f"systemctl start wg-quick@{interface}", f"env {userspace} wg-quick up {interface}")
    assert all_healthy(wait_for(lab_env, origin, all_healthy))
