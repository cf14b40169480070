"""`pip install .` (not editable) into a fresh virtualenv gives working `kokoa` and `kokoa-dns` from any directory.

The project is copied first (only what a clone has: pyproject.toml and the package), so the
build cannot lean on files of the working tree, and built into a new virtualenv without
its dependencies (the wheel is built offline, without build isolation); those come from
this virtualenv's site-packages through a .pth line placed after the new environment's own
site-packages, so the installed copy of `kokoa_infra` is the one imported, and the
editable install of this checkout is not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]
TIMEOUT = 120


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    # Without PYTHONPATH: only the fresh environment's own site-packages (and its .pth) count.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False, env=env, **kwargs)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtualenv with the project installed from a copy of its sources; its bin/."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    source.mkdir()
    shutil.copy2(PROJECT / "pyproject.toml", source)
    shutil.copytree(PROJECT / "kokoa_infra", source / "kokoa_infra",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # Built by this environment's setuptools (requirements-test.txt), offline.
    built = run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                 "--no-index", "--wheel-dir", str(root / "dist"), str(source)], cwd=root)
    assert built.returncode == 0, built.stdout + built.stderr
    wheel, = (root / "dist").glob("kokoa_proxy-*.whl")
    venv = root / "venv"
    made = run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    pip = run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
               "--no-index", str(wheel)], cwd=root)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    # The dependencies: this environment's site-packages directories, after the new one's own
    # (path lines; the .pth files there, such as this checkout's editable install, are not run).
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    ours = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    (Path(site) / "kokoa-test-dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    # The source copy goes away: nothing may be read from it any more.
    shutil.rmtree(source)
    return venv / "bin"


def test_console_scripts_run_from_the_root_directory(installed):
    for argv in (["kokoa", "--help"], ["kokoa", "--version"], ["kokoa-dns", "--help"],
                 ["kokoa", "health", "--help"]):
        result = run([str(installed / argv[0]), *argv[1:]], cwd="/")
        assert result.returncode == 0, f"{argv}: {result.stderr}"
        assert "Traceback" not in result.stderr
    assert run([str(installed / "kokoa"), "--version"], cwd="/").stdout.strip() == "kokoa, version 0.1.0"
    assert "Usage: kokoa-dns" in run([str(installed / "kokoa-dns"), "--help"], cwd="/").stdout


def test_the_installed_package_renders_bundles_from_its_own_templates(installed):
    script = textwrap.dedent("""
        import json, pathlib, kokoa_infra, kokoa_infra.render as render
        from kokoa_infra.validate import parse_topology
        key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGL1PD1MFLSHFsj6ZYvAaf0idYchw2mywPcxjfuZyrx8"
        topology = parse_topology({
            "acmeEmail": "ops@example.com", "sshPrivateKey": "set",
            "origins": [{"name": "blog", "domain": "blog.example.com", "subnet": 0, "host": "203.0.113.10",
                         "upstream": "http://127.0.0.1:8080", "hostKey": key}],
            "edges": [{"name": "edge-1", "origin": "blog", "publicIp": "198.51.100.7", "index": 10,
                       "hostKey": key}]})
        wg = "4HuFrvJqQCFDgDQ8Y8Ae0mArxaDs9UvxbUc9JIm+6WY="
        origin = render.render_origin_bundle(topology.settings, topology.origins[0], wg, [])
        edge = render.render_edge_bundle(topology.settings, topology.origins[0], topology.edges[0], wg, wg, wg)
        print(json.dumps({"package": kokoa_infra.__file__, "templates": str(render.TEMPLATES_DIR),
                          "origin": sorted(origin), "edge": sorted(edge),
                          "nginx": edge["nginx.conf"]}))
    """)
    result = run([str(installed / "python"), "-c", script], cwd="/")
    assert result.returncode == 0, result.stderr
    import json
    found = json.loads(result.stdout)
    venv = installed.parent
    assert Path(found["package"]).is_relative_to(venv), found["package"]
    assert Path(found["templates"]).is_relative_to(venv)
    assert found["origin"] == ["certificate.sh", "firewall.nft", "gateway.conf", "install.sh",
                               "logrotate.conf", "uninstall.sh", "wg0.conf"]
    assert found["edge"] == ["cert-refresh.sh", "firewall.nft", "install.sh", "nginx.conf", "uninstall.sh",
                             "wg-origin-0.conf"]
    assert "server_name blog.example.com" in found["nginx"]
    shipped = sorted(p.relative_to(found["templates"]).as_posix() for p in Path(found["templates"]).rglob("*.j2"))
    ours = sorted(p.relative_to(PROJECT / "kokoa_infra" / "templates").as_posix()
                  for p in (PROJECT / "kokoa_infra" / "templates").rglob("*.j2"))
    assert shipped == ours
