"""`kokoa health` sweeping a few hundred answering and silent targets inside namespaces made here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.html_preview import page_rows, parse_html
from tests.support.target_network import TargetNetwork, target_network

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 1.0
NOBODY = "65534"


@pytest.fixture(scope="module")
def network() -> Iterator[TargetNetwork]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 (`ip`)")
    try:
        manager = target_network(answering=200, silent=60, tunnel=40)
        net = manager.__enter__()
    except (subprocess.CalledProcessError, OSError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        pytest.skip(f"cannot create network namespaces here: {detail}")
    try:
        yield net
    finally:
        manager.__exit__(None, None, None)


@pytest.fixture(scope="module")
def outputs_file(network: TargetNetwork) -> Iterator[Path]:
    """healthTargets for every address; the file sits where an unprivileged user can read it."""
    nodes = []
    # Public-address nodes: their WireGuard IPs are on no network the prober has.
    for index, address in enumerate(network.answering + network.silent):
        nodes.append({"name": f"n{index}", "role": "edge" if index % 2 else "origin",
                      "origin": "o", "domain": f"n{index}.test",
                      "wireguardIp": f"10.99.{index // 250}.{index % 250 + 1}",
                      "publicIp": address})
    # Tunnel nodes: the prober holds 10.100.7.1/24, so their WireGuard IP must be used; their
    # public addresses are silent, so picking the wrong one would show.
    for index, address in enumerate(network.tunnel):
        nodes.append({"name": f"t{index}", "role": "edge", "origin": "o", "domain": "t.test",
                      "wireguardIp": address, "publicIp": network.silent[index % len(network.silent)]})
    directory = Path(tempfile.mkdtemp(prefix="kh-outputs-"))
    try:
        directory.chmod(0o755)
        path = directory / "outputs.json"
        path.write_text(json.dumps({"healthTargets": nodes}))
        path.chmod(0o644)
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def sweep(network: TargetNetwork, outputs_file: Path, *prefix: str,
          extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", "netns", "exec", network.prober, *prefix, sys.executable, "-m", "kokoa_infra.health",
         "--once", "--json", "--outputs", str(outputs_file), "--checks", "ping",
         "--timeout", str(TIMEOUT_S), *extra],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})


def assert_results(network: TargetNetwork, result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 1, result.stderr
    document = json.loads(result.stdout)
    nodes = {node["name"]: node for node in document["nodes"]}
    answering = set(network.answering)
    for index, address in enumerate(network.answering + network.silent):
        ping = nodes[f"n{index}"]["checks"]["ping"]
        assert (ping["address"], ping["via"]) == (address, "public")
        assert ping["ok"] is (address in answering), (address, ping)
        assert nodes[f"n{index}"]["status"] == ("healthy" if address in answering else "unhealthy")
    for index, address in enumerate(network.tunnel):
        ping = nodes[f"t{index}"]["checks"]["ping"]
        assert (ping["address"], ping["via"], ping["ok"]) == (address, "wireguard", True)
    total = len(network.answering) + len(network.silent) + len(network.tunnel)
    assert document["summary"] == {"total": total, "healthy": total - len(network.silent),
                                   "unhealthy": len(network.silent)}
    return document


def test_sweep_as_root_is_correct_and_takes_about_one_timeout(network, outputs_file):
    document = assert_results(network, sweep(network, outputs_file))
    assert document["durationMs"] < 3 * TIMEOUT_S * 1000


def test_unprivileged_user_needs_ping_group_range_then_gets_the_same_results(network, outputs_file):
    as_nobody = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to drop root")
    # A new namespace starts with ping_group_range "1 0": nobody may open a ping socket.
    refused = sweep(network, outputs_file, *as_nobody)
    assert refused.returncode == 2
    assert "ping_group_range" in refused.stderr and "Traceback" not in refused.stderr
    subprocess.run(["ip", "netns", "exec", network.prober, "sysctl", "-q", "-w",
                    "net.ipv4.ping_group_range=0 2147483647"], check=True, timeout=30)
    document = assert_results(network, sweep(network, outputs_file, *as_nobody))
    assert document["durationMs"] < 3 * TIMEOUT_S * 1000


def test_the_status_page_of_a_real_sweep_shows_every_node_as_its_json_does(network, outputs_file, tmp_path):
    page = tmp_path / "status.html"
    document = assert_results(network, sweep(network, outputs_file, extra=("--html", str(page))))
    rows = page_rows(parse_html(page.read_text())[0])
    assert len(rows) == len(document["nodes"]) == 300
    for node in document["nodes"]:
        row, ping = rows[f"{node['role']}/{node['name']}"], node["checks"]["ping"]
        assert row.state == ("serving" if node["status"] == "healthy" else "unhealthy")
        if ping["ok"]:
            rtt = ping["rttMs"]
            assert row.cells["Ping RTT"].startswith(f"{rtt:.2f} ms" if rtt < 10 else f"{rtt:.1f} ms")
            assert "ping:" not in row.cells["State"]
        else:
            assert row.cells["Ping RTT"].startswith("no reply")
            assert f"ping: {ping['error']}" in row.cells["State"]
        # An origin's public address is hidden; an edge's and any WireGuard address are shown.
        shown = "address hidden" if (node["role"], ping["via"]) == ("origin", "public") else ping["address"]
        assert row.cells["Ping RTT"].endswith(f"via {ping['via']} {shown}")
        assert row.cells["HTTPS"] == ("not probed (origin)" if node["role"] == "origin" else "not checked")
    history = json.loads((tmp_path / "status.html.history.json").read_text())
    assert len(history["sweeps"]) == 1 and len(history["nodes"]) == 300
