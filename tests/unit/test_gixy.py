"""gixy (gixy-ng) on every rendered nginx file of the example and the lab stacks: no finding but one, on purpose."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.rendering import bundles, lab_config
from tests.support.stacks import BASE_CONFIG

GIXY = Path(sys.executable).with_name("gixy")
# The edge's HTTPS server ends a connection after twice the burst of requests (at least 100):
# a 429 cannot end an HTTP/2 connection, and without this bound one handshake buys an
# attacker unlimited answers (docs/security.md). gixy wants at least 1000 so that clients
# reconnect less; browsers reconnect after GOAWAY by themselves.
ON_PURPOSE = {"nginx.conf": "low_keepalive_requests: The keepalive_requests directive should be at least 1000."}


def rendered_nginx_files(tmp_path: Path) -> list[Path]:
    paths = []
    for stack, config in (("example", BASE_CONFIG), ("lab", lab_config())):
        for node, files in bundles(config).items():
            for name in ("nginx.conf", "gateway.conf"):
                if name in files:
                    path = tmp_path / f"{stack}-{node.replace('/', '-')}-{name}"
                    path.write_text(files[name])
                    paths.append(path)
    return paths


def gixy(path: Path) -> list[dict]:
    # No --nginx-version: the checks are about the configuration, not the installed nginx's CVEs.
    result = subprocess.run([str(GIXY), "--format", "json", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.strip(), result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module", autouse=True)
def need_gixy():
    if not GIXY.exists() and shutil.which("gixy") is None:
        pytest.skip("gixy is not installed (make setup installs it)")


def test_every_rendered_nginx_file_has_no_gixy_finding(tmp_path):
    paths = rendered_nginx_files(tmp_path)
    assert len(paths) == 10  # 2 + 3 nodes in each stack, one nginx file each
    findings = {path.name: [f"{f['plugin']}: {f['summary']}" for f in gixy(path)] for path in paths}
    unexpected = {name: [f for f in found if f != ON_PURPOSE.get(name.rsplit("-", 1)[-1])]
                  for name, found in findings.items()}
    assert {name: found for name, found in unexpected.items() if found} == {}
    # Only on the edges' HTTPS server, and only once per file.
    assert all(findings[p.name] == [ON_PURPOSE["nginx.conf"]] for p in paths if p.name.endswith("nginx.conf"))


def test_gixy_would_report_the_old_return_that_bypassed_the_allow_list(tmp_path):
    gateway = bundles(BASE_CONFIG)["origin/blog"]["gateway.conf"]
    broken = gateway.replace("        location / {\n            deny all;\n        }",
                             "        location / {\n            return 404;\n        }")
    assert broken != gateway
    path = tmp_path / "gateway.conf"
    path.write_text(broken)
    assert "return_bypasses_allow_deny" in {f["plugin"] for f in gixy(path)}
