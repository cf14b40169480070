"""A valid stack config for the tests, and the helpers that vary it or run `kokoa` on a stack file."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

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
