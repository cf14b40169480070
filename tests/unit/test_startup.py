"""`kokoa --help`, `--version`, `kokoa health` and `kokoa-dns` start without importing Pulumi.

Each command runs as its console script under `python -X importtime`, which lists on
stderr every module the process imported; none may be `pulumi` or a provider SDK.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
PULUMI_PACKAGES = ("pulumi", "pulumi_cloudflare", "pulumi_command", "pulumi_random")


def imported_modules(script: str, *args: str, cwd: Path | None = None,
                     env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, set[str]]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CLOUDFLARE_")}, **(env or {})}
    proc = subprocess.run([sys.executable, "-X", "importtime", str(BIN / script), *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd, env=env)
    modules = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
               if line.startswith("import time:") and line.count("|") == 2}
    return proc, modules


def pulumi_modules(modules: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] in PULUMI_PACKAGES}


@pytest.mark.parametrize("argv", [
    ("kokoa", "--help"), ("kokoa", "--version"), ("kokoa", "health", "--help"), ("kokoa", "lab", "--help"),
    ("kokoa", "dns", "--help"), ("kokoa-dns", "--help"),
])
def test_help_and_version_import_no_pulumi(argv):
    proc, modules = imported_modules(*argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "click" in modules  # the listing works
    assert not pulumi_modules(modules)


def test_a_health_sweep_imports_no_pulumi(tmp_path):
    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps({"healthTargets": []}))
    proc, modules = imported_modules("kokoa", "health", "--once", "--json", "--checks", "https",
                                     "--outputs", str(outputs), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["summary"]["total"] == 0
    assert "kokoa_infra.health.probes" in modules
    assert not pulumi_modules(modules)


def test_kokoa_dns_imports_no_pulumi():
    # A request to a closed port on loopback: everything a real call needs is imported, then it fails (1).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"CLOUDFLARE_API_TOKEN": "t0ken", "CLOUDFLARE_ZONE_ID": "0" * 32,
           "CLOUDFLARE_API_BASE_URL": f"http://127.0.0.1:{port}/client/v4"}
    proc, modules = imported_modules("kokoa-dns", "list", "--attempts", "1", "--timeout", "2", env=env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "could not connect" in proc.stderr
    assert "requests" in modules
    assert not pulumi_modules(modules)


def test_the_listing_would_show_pulumi():
    """The check itself: a command that deploys does import Pulumi, and the listing shows it."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import kokoa_infra.mocked_program"],
                          capture_output=True, text=True, timeout=60)
    modules = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
               if line.startswith("import time:") and line.count("|") == 2}
    assert "pulumi" in pulumi_modules(modules)
