"""The lab's own pieces: real hosts (systemd machines and plain namespace hosts) with sshd, driven
by the executor over SSH."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
from pathlib import Path

import pytest

from kokoa_infra.lab.executor import COMMAND, ExecutorError, SshRunner, apply
from kokoa_infra.lab.hosts import INIT_SYSTEMS, Host, LabTopology
from kokoa_infra.lab.lab import Lab, lab_unavailable
from kokoa_infra.lab.processes import namespaces
from kokoa_infra.mocked_program import DeclaredResource
from tests.support.lab_fixture import TAG

STACK = "urn:pulumi:lab::kokoa::pulumi:pulumi:Stack::kokoa-lab"


def urn(name: str, typ: str = COMMAND) -> str:
    return f"urn:pulumi:lab::kokoa::{typ}::{name}"


# Executor semantics (fake SSH): tests/unit/test_executor.py.


HOSTTEST_PREFIX = f"kokoah{TAG}-"


@pytest.mark.parametrize("init", INIT_SYSTEMS)
def test_two_hosts_run_commands_over_ssh_from_the_operator_namespace_and_leave_nothing(init):
    reason = lab_unavailable(f"{HOSTTEST_PREFIX}probe", init)
    if reason:
        pytest.skip(reason)
    lab = Lab(Path(f"/var/lib/kokoa-lab-hosttest{TAG}"), HOSTTEST_PREFIX, init)
    hosts = (Host("client", "client", "172.31.255.2", f"{HOSTTEST_PREFIX}client"),
             Host("one", "edge", "172.31.255.21", f"{HOSTTEST_PREFIX}one", origin="x"),
             Host("two", "edge", "172.31.255.22", f"{HOSTTEST_PREFIX}two", origin="x"))
    topo = LabTopology(ipaddress.ip_network("172.31.255.0/24"), hosts)
    try:
        lab.ensure(topo, echo=lambda _: None)

        def hello(host: Host, host_key_of: Host | None = None) -> DeclaredResource:
            conn = {"host": host.ip, "port": 22.0, "user": "root", "privateKey": lab.operator_key.read_text(),
                    "hostKey": lab.host_key((host_key_of or host).netns)}
            create = 'echo "hello from $(hostname)" > /run/kokoa-hello && mkdir -p /etc/kokoa && cat > /etc/kokoa/stdin'
            return DeclaredResource(urn=urn(f"hello-{host.name}"), type=COMMAND, name=f"hello-{host.name}",
                                    inputs={"connection": conn, "create": create, "stdin": f"to {host.name}"},
                                    secret_paths=frozenset({"connection"}), dependencies=(), parent=STACK,
                                    delete_before_replace=False)

        runner = SshRunner(f"{HOSTTEST_PREFIX}client", lab.dir / "tmp")
        report = apply([hello(hosts[1]), hello(hosts[2])], lab.dir / "commands.json", runner, echo=lambda _: None)
        assert report.counts == {"created": 2}
        for host in hosts[1:]:
            hello_file = lab.on_host(host.netns, ["cat", "/run/kokoa-hello"], check=True).stdout
            assert hello_file == f"hello from {host.name}\n"
            assert lab.on_host(host.netns, ["cat", "/etc/kokoa/stdin"], check=True).stdout == f"to {host.name}"
            # Its own pid namespace, with the machine's systemd or sshd as init.
            assert lab.on_host(host.netns, ["cat", "/proc/1/comm"], check=True).stdout == \
                {"systemd": "systemd\n", "plain": "sshd\n"}[init]
            assert lab.init_system(host.netns) == init
        assert not Path("/run/kokoa-hello").exists() and not Path("/etc/kokoa/stdin").exists()

        # The pinned host key is checked: host one's key does not let us into host two.
        with pytest.raises(ExecutorError) as refused:
            apply([hello(hosts[2], host_key_of=hosts[1])], lab.dir / "other.json", runner, echo=lambda _: None)
        assert refused.value.exit_code == 255
    finally:
        left = lab.down(echo=lambda _: None)
    assert left == []
    assert not {h.netns for h in hosts} & namespaces()


def test_a_lab_of_the_other_init_mode_is_rebuilt_and_the_cli_takes_the_mode():
    from click.testing import CliRunner

    from kokoa_infra.lab.cli import lab as lab_command

    topo = LabTopology(ipaddress.ip_network("172.31.255.0/24"),
                    (Host("one", "edge", "172.31.255.21", "kokoa-unused-one", origin="x"),))
    # A lab directory may not be under /tmp (servers have their own); only its record is written.
    recorded = Lab(Path(f"/var/lib/kokoa-lab-modetest{TAG}"), "kokoa-unused-")
    if os.geteuid() != 0:
        pytest.skip("writes a lab record under /var/lib")
    recorded.dir.mkdir(exist_ok=True)
    try:
        check_modes(recorded, topo)
    finally:
        shutil.rmtree(recorded.dir)
    refused = CliRunner().invoke(lab_command, ["up", "--init", "docker"])
    assert refused.exit_code == 2 and "'systemd', 'plain'" in refused.output


def check_modes(recorded: Lab, topo: LabTopology) -> None:
    recorded.record_file.write_text(json.dumps({
        "prefix": "kokoa-unused-", "namespaces": [], "processes": {},
        "hosts": {"kokoa-unused-one": {"role": "edge", "mode": "plain", "ready": True,
                                       "host": {"name": "one", "role": "edge", "ip": "172.31.255.21",
                                                "netns": "kokoa-unused-one", "origin": "x"}}}}))
    assert "kokoa-unused-one runs plain, not systemd" in Lab(recorded.dir, "kokoa-unused-", "systemd").problems(topo)
    assert not any("runs" in p for p in Lab(recorded.dir, "kokoa-unused-", "plain").problems(topo))
    assert recorded.init_system("kokoa-unused-one") == "plain"
