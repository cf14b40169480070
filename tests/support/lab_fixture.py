"""Pytest plugin: the session-scoped `lab` fixture, the whole lab up once and always torn down."""

from __future__ import annotations

import copy
import ipaddress
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

from kokoa_infra.lab.deploy import STACK_FILE, load_stack, up
from kokoa_infra.lab.executor import Report
from kokoa_infra.lab.hosts import INIT_SYSTEMS
from kokoa_infra.lab.lab import Lab, lab_unavailable

# Not the CLI's directory and prefix: the tests never touch a lab someone brought up by hand.
# KOKOA_TEST_LAB_TAG (a few letters) keeps two test runs on one machine apart.
TAG = os.environ.get("KOKOA_TEST_LAB_TAG", "")
if not TAG.isalnum() and TAG:
    raise ValueError(f"KOKOA_TEST_LAB_TAG={TAG!r}: letters and digits only")
TEST_LAB_DIR = Path(f"/var/lib/kokoa-lab-test{TAG}")
TEST_PREFIX = f"kokoat{TAG}-"
# How the test lab's origins and edges run: systemd machines, as real servers (the default,
# and what CI runs), or KOKOA_TEST_LAB_INIT=plain for namespace hosts without systemd.
INIT = os.environ.get("KOKOA_TEST_LAB_INIT", "systemd")
if INIT not in INIT_SYSTEMS:
    raise ValueError(f"KOKOA_TEST_LAB_INIT={INIT!r}: one of {', '.join(INIT_SYSTEMS)}")


class LabHandle:
    """The running lab as tests see it: status, outputs, commands on hosts, re-deployments."""

    def __init__(self, lab: Lab, stack_file: Path = STACK_FILE) -> None:
        self.lab = lab
        self.stack_file = stack_file
        self.overrides: dict[str, Any] = {}
        self.status: dict[str, Any] = {}
        self.is_down = True

    @property
    def state_dir(self) -> Path:
        return self.lab.dir

    @property
    def outputs_file(self) -> Path:
        return self.lab.dir / "outputs.json"

    def config(self) -> dict[str, Any]:
        """The stack config now deployed (the lab stack file plus every override so far)."""
        return {**load_stack(self.stack_file), **copy.deepcopy(self.overrides)}

    def on_host(self, netns: str, *argv: str, check: bool = True, timeout: float = 120,
                **kwargs) -> subprocess.CompletedProcess:
        """Run argv on a lab host (the view its own SSH sessions have); text output captured."""
        if self.is_down:
            raise RuntimeError("the lab was taken down (LabHandle.down) by an earlier test; "
                               "tests that need it must run before that one")
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        proc = subprocess.run(self.lab.host_argv(netns, list(argv)), timeout=timeout, check=False, **kwargs)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} on {netns} exited {proc.returncode}\n"
                                 f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def systemctl(self, netns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`systemctl ARGS` on a systemd machine (its own systemd, as an SSH session there would)."""
        return self.on_host(netns, "systemctl", *args, check=check)

    def power_off(self, netns: str) -> None:
        """Power a systemd machine off; its directory (everything installed) stays."""
        self.lab.power_off(netns)

    def boot(self, netns: str) -> None:
        """Boot a powered-off machine again from its directory, without deploying anything."""
        self.lab.boot(netns)

    def apply(self, stack_config_overrides: dict[str, Any] | None = None) -> Report:
        """Deploy again (`kokoa lab up`); overrides replace top-level config keys and stay in effect."""
        self.overrides.update(copy.deepcopy(stack_config_overrides or {}))
        self.is_down = False
        deployment = up(self.lab, self.overrides, self.stack_file, echo=print)
        self.status = deployment.status
        return deployment.report

    def spare_edge_host(self) -> str:
        """A lab address no host uses yet, for a new edge."""
        config = self.config()
        used = {config["lab:clientIp"]} | {o["host"] for o in config["kokoa:origins"]}
        used |= {e["publicIp"] for e in config["kokoa:edges"]}
        used.add(config["kokoa:acmeServer"].split("//", 1)[1].split(":", 1)[0])
        after = max(ipaddress.ip_address(e["publicIp"]) for e in config["kokoa:edges"])
        network = ipaddress.ip_network(config["lab:network"])
        return str(next(ip for ip in network.hosts() if ip > after and str(ip) not in used))

    def add_edge(self, name: str, origin: str, host: str, **extra: Any) -> Report:
        """Add an edge for `origin` at address `host` with the next free index, and deploy."""
        edges = self.config()["kokoa:edges"]
        index = max([e["index"] for e in edges if e["origin"] == origin], default=9) + 1
        edges.append({"name": name, "origin": origin, "publicIp": host, "index": index, **extra})
        return self.apply({"kokoa:edges": edges})

    def down(self) -> list[str]:
        """Tear the lab down; returns what is left (expected: nothing). Safe to repeat."""
        self.is_down = True
        return self.lab.down(echo=print)


@pytest.fixture(scope="session")
def lab() -> Iterator[LabHandle]:
    reason = lab_unavailable(f"{TEST_PREFIX}probe", INIT)
    if reason:
        pytest.skip(reason)
    handle = LabHandle(Lab(TEST_LAB_DIR, TEST_PREFIX, INIT))
    try:
        handle.apply()
    except BaseException:
        handle.down()
        raise
    yield handle
    left = handle.down()
    assert not left, f"the lab left behind: {left}"


@pytest.fixture(scope="module")
def lab_env(request):
    """The `lab`, or the test skipped where it cannot come up."""
    try:
        return request.getfixturevalue("lab")
    except pytest.FixtureLookupError:
        pytest.skip("the `lab` fixture is not available")
