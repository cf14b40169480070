"""Shared fixtures: a valid stack config and the program evaluated under Pulumi's mocks."""

from __future__ import annotations

import copy
import ipaddress
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

# The session-wide `lab` fixture (the whole lab, up once, always torn down). Shared code lives in
# tests/support and is imported as `tests.support...` (pyproject.toml puts the project on the path).
pytest_plugins = ["tests.support.lab_fixture"]

# Tests by cost, one directory each: tests/unit need neither root nor namespaces (`pytest -m
# "not netns and not lab"` runs them anywhere), tests/netns need root and make their own
# throwaway namespaces, tests/lab use the whole lab (the session `lab` fixture).
TIERS = ("unit", "netns", "lab")
ROOT_FIXTURES = {"netns", "make_netns", "lab"}


def pytest_collection_modifyitems(config, items):
    """Mark each test with its directory's tier; refuse a unit test that needs root."""
    here = Path(__file__).resolve().parent
    misplaced = []
    for item in items:
        parts = Path(str(item.fspath)).resolve().relative_to(here).parts
        tier = parts[0] if len(parts) > 1 else None
        if tier not in TIERS:
            misplaced.append(f"{item.nodeid}: outside tests/{{{','.join(TIERS)}}}")
        elif tier != "unit":
            item.add_marker(getattr(pytest.mark, tier))
        elif ROOT_FIXTURES & set(item.fixturenames):
            needs = ", ".join(sorted(ROOT_FIXTURES & set(item.fixturenames)))
            misplaced.append(f"{item.nodeid}: a unit test using {needs}")
    if misplaced:
        raise pytest.UsageError("tests in the wrong tier:\n  " + "\n  ".join(misplaced))


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Fail any in-process connect/sendto beyond loopback (traffic stays inside: README, "Tests").

    Tests that need other addresses run their traffic in namespaces they create, through
    subprocesses (`ip netns exec`), which this guard does not see and does not need to.
    """
    def guard(method):
        def call(sock, *args):
            address = args[-1]
            if sock.family == socket.AF_INET and isinstance(address, tuple):
                try:
                    allowed = ipaddress.IPv4Address(address[0]).is_loopback
                except ValueError:  # a host name: resolving it would already leave loopback
                    allowed = False
                if not allowed:
                    raise AssertionError(f"test traffic to {address[0]}: only loopback is allowed")
            return method(sock, *args)
        return call

    monkeypatch.setattr(socket.socket, "connect", guard(socket.socket.connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guard(socket.socket.connect_ex))
    monkeypatch.setattr(socket.socket, "sendto", guard(socket.socket.sendto))


@pytest.fixture
def config() -> dict[str, Any]:
    """A fresh deep copy of a valid stack config: tests change it freely."""
    from tests.support.stacks import BASE_CONFIG

    return copy.deepcopy(BASE_CONFIG)


@pytest.fixture
def program():
    """The program evaluated under Pulumi's mocks for that config (a ProgramRun)."""
    from kokoa_infra.mocked_program import run_program
    from tests.support.stacks import BASE_CONFIG

    return run_program(BASE_CONFIG)


def require_root_netns() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a network namespace")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2")


def _remove_netns(name: str) -> None:
    """Kill every process in the namespace, then delete it. Again until none is left (bounded): an
    nginx master in the middle of a reload forks new workers after the first list was taken, and
    a worker whose master is gone lives on."""
    for _ in range(20):
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        if not pids:
            break
        subprocess.run(["kill", "-9", *pids], capture_output=True)
        time.sleep(0.05)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def make_netns() -> Iterator[Callable[[], str]]:
    """Makes throwaway network namespaces (only loopback, up); all deleted after the test, even on failure."""
    require_root_netns()
    made: list[str] = []

    def make() -> str:
        name = f"kokoa-t-{uuid.uuid4().hex[:8]}"
        result = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot create a network namespace here: {result.stderr.strip()}")
        made.append(name)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        return name

    try:
        yield make
    finally:
        for name in made:
            _remove_netns(name)


@pytest.fixture
def netns(make_netns) -> str:
    """One throwaway network namespace."""
    return make_netns()
