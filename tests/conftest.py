"""Shared fixtures: a valid stack config and the program evaluated under Pulumi's mocks."""

from __future__ import annotations

import copy
import ipaddress
import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from kokoa_infra.mocked_program import ProgramRun, run_program

# The session-wide `lab` fixture (the whole lab, up once, always torn down).
pytest_plugins = ["tests.lab_fixture"]

SSH_KEY = ("-----BEGIN OPENSSH PRIVATE KEY-----\n"
           "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
           "-----END OPENSSH PRIVATE KEY-----\n")
ZONE = "023e105f4ecef8ad9ca31a8372d0c353"
OTHER_ZONE = "99999999999999999999999999999999"

BASE_CONFIG: dict[str, Any] = {
    "kokoa:acmeEmail": "ops@example.com",
    "kokoa:sshPrivateKey": SSH_KEY,
    "kokoa:cloudflareZoneId": ZONE,
    "cloudflare:apiToken": "test-token",
    "kokoa:origins": [
        {"name": "blog", "domain": "blog.example.com", "subnet": 0, "host": "203.0.113.10",
         "upstream": "http://127.0.0.1:8080",
         "hostKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGL1PD1MFLSHFsj6ZYvAaf0idYchw2mywPcxjfuZyrx8"},
        {"name": "shop", "domain": "shop.example.com", "subnet": 1, "host": "203.0.113.20",
         "endpoint": "203.0.113.21", "listenPort": 51821, "upstream": "https://localhost:3000/app",
         "hostKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBMpJjAOxGMt1Dbof+121TTjPflStl3yIj5fXXRKPXbr",
         "rateLimit": {"requestsPerSecond": 50, "burst": 100, "connections": 100}},
    ],
    "kokoa:edges": [
        {"name": "edge-tokyo-1", "origin": "blog", "publicIp": "198.51.100.7", "index": 10,
         "hostKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHWlfEcfu/rR7vL8BL5mkIgaCMqvg96KINyFut7g19WF"},
        {"name": "edge-osaka-1", "origin": "blog", "publicIp": "198.51.100.8", "index": 11, "dns": False,
         "hostKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDXZEJALjOAMgrQVEFQ3lW2UUezmFO7B75k59lqArZoR"},
        {"name": "edge-tokyo-2", "origin": "shop", "publicIp": "198.51.100.9", "index": 10,
         "sshPort": 2222,
         "hostKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGehPblXXl5+QyOrE4XwuGC0iaPlLB3UXuEcpaYaWmTI"},
    ],
}


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
            misplaced.append(f"{item.nodeid}: a unit test using {', '.join(sorted(ROOT_FIXTURES & set(item.fixturenames)))}")
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


def blog_with(**values: Any) -> dict[str, Any]:
    """The `kokoa:` keys of BASE_CONFIG (without the prefix) with blog's entry updated by `values`."""
    from kokoa_infra.stackfile import kokoa_config

    config = kokoa_config(copy.deepcopy(BASE_CONFIG))
    config["origins"][0].update(values)
    return config


def blog_problems(**values: Any) -> list[str]:
    """The validation's messages for BASE_CONFIG with blog's entry updated by `values`."""
    from kokoa_infra.model import InvalidConfig
    from kokoa_infra.validate import parse_topology

    with pytest.raises(InvalidConfig) as raised:
        parse_topology(blog_with(**values))
    return [str(p) for p in raised.value.problems]


def kokoa(*args: str):
    """`kokoa ARGS` through click's test runner; exceptions propagate."""
    from click.testing import CliRunner

    from kokoa_infra.cli import main
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def stack_in(directory: Path, monkeypatch, text: str) -> Path:
    """`text` as Pulumi.prod.yaml in `directory`, which becomes the working directory (`--stack prod`)."""
    monkeypatch.chdir(directory)
    path = directory / "Pulumi.prod.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def config() -> dict[str, Any]:
    """A fresh deep copy of a valid stack config: tests change it freely."""
    return copy.deepcopy(BASE_CONFIG)


@pytest.fixture
def program() -> ProgramRun:
    return run_program(BASE_CONFIG)


def require_root_netns() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a network namespace")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2")


def _remove_netns(name: str) -> None:
    for pid in subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split():
        subprocess.run(["kill", "-9", pid], capture_output=True)
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
