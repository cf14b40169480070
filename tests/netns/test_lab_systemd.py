"""Lab servers as systemd machines: what a machine is, power-off and boot, and a teardown that leaves nothing."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from kokoa_infra.lab import machines
from kokoa_infra.lab.hosts import Host, LabTopology
from kokoa_infra.lab.lab import Lab, lab_unavailable
from kokoa_infra.lab.processes import LabError, alive, namespaces
from tests.support.lab_fixture import TAG

PREFIX = f"kokoam{TAG}-"


@pytest.fixture
def machine_lab() -> Iterator[tuple[Lab, LabTopology]]:
    """A client, an origin and an edge, the servers as systemd machines; always taken down."""
    reason = lab_unavailable(f"{PREFIX}probe", "systemd")
    if reason:
        pytest.skip(reason)
    lab = Lab(Path(f"/var/lib/kokoa-lab-machines{TAG}"), PREFIX, "systemd")
    topo = LabTopology(ipaddress.ip_network("172.31.255.0/24"), (
        Host("client", "client", "172.31.255.2", f"{PREFIX}client"),
        Host("web", "origin", "172.31.255.11", f"{PREFIX}web", domain="web.kokoa.test",
             upstream="http://127.0.0.1:8080"),
        Host("edge", "edge", "172.31.255.21", f"{PREFIX}edge", origin="web", domain="web.kokoa.test")))
    try:
        lab.ensure(topo, echo=lambda _: None)
        yield lab, topo
    finally:
        lab.down(echo=lambda _: None)


def ssh(lab: Lab, topo: LabTopology, server: Host, command: str) -> subprocess.CompletedProcess:
    """The operator's SSH from the client namespace, host key pinned, as the executor connects."""
    known = lab.dir / "known_hosts"
    known.write_text(f"{server.ip} {lab.host_key(server.netns)}\n")
    return subprocess.run(
        ["ip", "netns", "exec", topo.one("client").netns, "ssh", "-F", "/dev/null", "-i", str(lab.operator_key),
         "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "StrictHostKeyChecking=yes",
         "-o", f"UserKnownHostsFile={known}", "-o", "SendEnv=KOKOA_CHECK", "-l", "root", server.ip, "--", command],
        env={**os.environ, "KOKOA_CHECK": "sent"}, capture_output=True, text=True, timeout=60, check=False)


def test_a_server_is_a_booted_systemd_machine_with_sshd_as_a_unit(machine_lab):
    lab, topo = machine_lab
    origin, edge = topo.one("origin"), topo.one("edge")
    for server in (origin, edge):
        assert lab.on_host(server.netns, ["cat", "/proc/1/comm"]).stdout == "systemd\n"
        assert lab.on_host(server.netns, ["systemctl", "is-system-running"]).stdout == "running\n"
        assert lab.on_host(server.netns, ["systemctl", "is-active", "ssh.service"]).stdout == "active\n"
        # The operator's key, this host's pinned key; like a stock sshd, it accepts no
        # environment variable from the client (the executor must not rely on any).
        shown = ssh(lab, topo, server, 'echo "$(hostname) [${KOKOA_CHECK:-}]"')
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.split() == [server.name, "[]"]
        # Its own machine: its own machine-id, and none of the host's processes in sight.
        assert lab.on_host(server.netns, ["cat", "/etc/machine-id"]).stdout != Path("/etc/machine-id").read_text()
        seen = lab.on_host(server.netns, ["ps", "-eo", "args"]).stdout
        assert "pytest" not in seen and "process_api" not in seen
        # Inside, relative paths and the working directory are the machine's, not the host's.
        assert lab.on_host(server.netns, ["sh", "-c", "pwd; cat etc/hostname"]).stdout == f"/\n{server.name}\n"
        # The install scripts' test for systemd.
        assert lab.on_host(server.netns, ["test", "-d", "/run/systemd/system"]).returncode == 0
    # The key of one machine does not open the other.
    known = lab.dir / "known_hosts"
    known.write_text(f"{edge.ip} {lab.host_key(origin.netns)}\n")
    refused = subprocess.run(
        ["ip", "netns", "exec", topo.one("client").netns, "ssh", "-F", "/dev/null", "-i", str(lab.operator_key),
         "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known}",
         "-l", "root", edge.ip, "true"], capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 255
    # The demo application is a unit of the origin machine, counted on its socket.
    assert lab.on_host(origin.netns, ["systemctl", "is-enabled", "kokoa-demo.service"]).stdout == "enabled\n"
    before = lab.demo_requests(origin.netns)
    assert lab.on_host(origin.netns, ["curl", "-fsS", "http://127.0.0.1:8080/"]).stdout == "hello from origin web\n"
    assert lab.demo_requests(origin.netns) == before + 2  # the request, and this reading itself


def test_power_off_and_boot_keep_the_machines_files_and_nothing_else(machine_lab):
    lab, topo = machine_lab
    edge = topo.one("edge")
    lab.on_host(edge.netns, ["sh", "-c", "echo kept > /etc/kokoa-kept; echo gone > /run/kokoa-gone"], check=True)
    record = lab.record()["hosts"][edge.netns]
    init, launcher = record["init"], record["launcher"]
    lab.power_off(edge.netns)
    assert not alive(init) and not alive(launcher)
    assert not machines.mounted_under(lab.host_dir(edge.netns))
    assert not machines.cgroup_processes(edge.netns)
    with pytest.raises(LabError, match="not running"):
        lab.host_argv(edge.netns, ["true"])
    lab.boot(edge.netns)
    assert lab.record()["hosts"][edge.netns]["init"] != init
    assert lab.on_host(edge.netns, ["cat", "/etc/kokoa-kept"]).stdout == "kept\n"
    assert lab.on_host(edge.netns, ["test", "-e", "/run/kokoa-gone"]).returncode != 0
    assert ssh(lab, topo, edge, "hostname").stdout == "edge\n"
    with pytest.raises(LabError, match="is running"):
        lab.boot(edge.netns)  # never a second systemd on the same root
    # The other machine was not touched.
    assert lab.on_host(topo.one("origin").netns, ["systemctl", "is-system-running"]).stdout == "running\n"


def test_down_leaves_no_machine_process_mount_overlay_cgroup_or_namespace(machine_lab):
    lab, topo = machine_lab
    servers = [h for h in topo.hosts if h.is_server]
    record = lab.record()["hosts"]
    pids = [record[s.netns][k] for s in servers for k in ("init", "launcher")]
    inside = [p for s in servers for p in machines.cgroup_processes(s.netns)]
    assert all(alive(p) for p in pids) and inside
    # Another mount namespace made while the overlays are mounted holds copies of them (as
    # another lab's namespace host would); down must not leave them there either.
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "120"])
    try:
        assert machines.foreign_mounts(lab.dir)
        left = lab.down(echo=lambda _: None)
        assert left == []
        assert not [p for p in pids + inside if alive(p)]
        assert not machines.foreign_mounts(lab.dir), "an overlay is still mounted somewhere"
        assert not [c for s in servers for c in machines.cgroups(s.netns) if c.exists()]
        assert not {h.netns for h in topo.hosts} & namespaces()
        assert not [s for s in servers if (Path("/run/systemd/nspawn/propagate") / s.netns).exists()]
        assert not lab.dir.exists()
        assert holder.poll() is None  # the holder was not disturbed, only its copies went
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
