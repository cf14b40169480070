"""`kokoa lab health --failover` in the lab: an edge whose nginx stops leaves DNS, a DNS-following
client sees no failure once it has, and the record comes back when nginx does; with one agent and two.

Every wait is bounded; the agents are stopped (their own process groups) and nginx started again
whatever happens. Traffic stays inside the lab's namespaces; the stand-in listens on loopback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kokoa_infra.lab.dns import LabDns
from tests.lab.test_health_lab import on_edge
from tests.lab.test_rotation_lab import DnsFollowingClient, resolve
from tests.support.lab_fixture import TEST_LAB_DIR, TEST_PREFIX

REPO = Path(__file__).resolve().parents[2]
INTERVAL_S, FAIL_AFTER, RECOVER_AFTER = 2, 2, 2
WAIT_S = 60


class Agents:
    """`kokoa lab health --failover` processes, each in its own process group; always stopped."""

    def __init__(self, names: list[str], tmp_path: Path) -> None:
        self.procs: list[subprocess.Popen] = []
        self.argvs = [[sys.executable, "-m", "kokoa_infra.cli", "lab", "health", "--lab-dir", str(TEST_LAB_DIR),
                       "--prefix", TEST_PREFIX, "--failover", "--interval", str(INTERVAL_S), "--checks", "https",
                       "--fail-after", str(FAIL_AFTER), "--recover-after", str(RECOVER_AFTER),
                       "--agent", name, "--failover-state", str(tmp_path / f"{name}.json")]
                      for name in names]
        self.logs = [tmp_path / f"{name}.log" for name in names]

    def __enter__(self) -> "Agents":
        for argv, log in zip(self.argvs, self.logs):
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                   stderr=out, start_new_session=True,
                                                   env=os.environ | {"PYTHONPATH": str(REPO)}))
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def text(self) -> str:
        return "\n".join(log.read_text() for log in self.logs)


def until(condition, seconds: float = WAIT_S, step: float = 0.25) -> float | None:
    """The time.time() at which condition() first held, or None after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return time.time()
        time.sleep(step)
    return None


def votes_recorded(lab, agents: list[str]) -> bool:
    records = [r for r in LabDns(lab.lab).records()
               if r["type"] == "A" and "kokoa edge edge-blog" in (r["comment"] or "")]
    return bool(records) and all(f"{a}=up" in r["comment"] for r in records for a in agents)


@pytest.mark.parametrize("agent_names", [["a"], ["a", "b"]], ids=["one-agent", "two-agents"])
def test_failover_takes_a_stopped_edge_out_of_dns_and_puts_it_back(lab, tmp_path, agent_names):
    blog = next(o for o in lab.status["origins"] if o["name"] == "blog")
    edge1, edge2 = [e for e in lab.status["edges"] if e["origin"] == "blog"][:2]
    domain = blog["domain"]
    both = {edge1["publicIp"], edge2["publicIp"]}
    assert resolve(lab, domain) == both
    try:
        with Agents(agent_names, tmp_path) as agents:
            assert until(lambda: votes_recorded(lab, agent_names)), agents.text()
            # Both of blog's edges stopped: every edge of the origin fails, nothing is removed.
            for edge in (edge1, edge2):
                on_edge(lab, edge, "systemctl stop nginx", "nginx -s stop")
            time.sleep(INTERVAL_S * (FAIL_AFTER + 3))
            assert resolve(lab, domain) == both
            assert "every edge of blog fails from here" in agents.text()
            on_edge(lab, edge2, "systemctl start nginx", "nginx")
            on_edge(lab, edge1, "systemctl start nginx", "nginx")
            time.sleep(INTERVAL_S * (RECOVER_AFTER + 2))

            with DnsFollowingClient(lab, domain) as client:
                client.wait_for(10)
                failed_at = time.time()
                on_edge(lab, edge1, "systemctl stop nginx", "nginx -s stop")
                removed_at = until(lambda: edge1["publicIp"] not in resolve(lab, domain))
                assert removed_at is not None, agents.text()
                # A deploy during the failover leaves the record out.
                lab.apply()
                assert resolve(lab, domain) == {edge2["publicIp"]}
                client.wait_for(client.ok + 20)
                on_edge(lab, edge1, "systemctl start nginx", "nginx")
                restored_at = until(lambda: resolve(lab, domain) == both)
                assert restored_at is not None, agents.text()
                client.wait_for(client.ok + 10)
            # The client resolves before every request (TTL 0 for it): after the record left, no failure.
            after = [line for line in client.failures if line[0] > removed_at + 0.5]
            before = [line for line in client.failures if failed_at <= line[0] <= removed_at + 0.5]
            report = (f"{'+'.join(agent_names)}: record left the resolver {removed_at - failed_at:.1f} s after "
                      f"nginx stopped; {len(before)} failed requests before, {len(after)} after; "
                      f"back {restored_at - removed_at:.1f} s later")
            print(report)
            (REPO / "tests" / "lab" / f".failover-{'-'.join(agent_names)}.txt").write_text(report + "\n")
            assert after == [], report
            assert client.ok > 40
    finally:
        for edge in (edge1, edge2):
            on_edge(lab, edge, "systemctl start nginx", "nginx")
