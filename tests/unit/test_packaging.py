"""`pip install .` (not editable) into a fresh virtualenv gives working `kokoa` and `kokoa-dns` from any directory,
and the wheel holds only what the product runs (no test support).

The project is copied first (only what a clone has: pyproject.toml and the package), so the
build cannot lean on files of the working tree, and built into a new virtualenv without
its dependencies (the wheel is built offline, without build isolation); those come from
this virtualenv's site-packages through a .pth line placed after the new environment's own
site-packages, so the installed copy of `kokoa_infra` is the one imported, and the
editable install of this checkout is not.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.support.import_graph import import_graph, module_names

PROJECT = Path(__file__).resolve().parents[2]
TIMEOUT = 120


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    # Without PYTHONPATH: only the fresh environment's own site-packages (and its .pth) count.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False, env=env, **kwargs)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip install .` builds, from a copy of what a clone has (pyproject.toml, the package
    and its templates)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    shutil.copy2(PROJECT / "pyproject.toml", source)
    for directory in ("kokoa_infra", "templates"):
        shutil.copytree(PROJECT / directory, source / directory, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # Built by this environment's setuptools (requirements-test.txt), offline.
    built = run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                 "--no-index", "--wheel-dir", str(root / "dist"), str(source)], cwd=root)
    assert built.returncode == 0, built.stdout + built.stderr
    # The source copy goes away: nothing may be read from it any more.
    shutil.rmtree(source)
    found, = (root / "dist").glob("kokoa_proxy-*.whl")
    return found


def used_by_the_product(package: Path, program: Path, scripts: list[str]) -> set[str]:
    """The package's modules that the console scripts and the Pulumi program (`program`) import, directly or
    not, and those the package runs by name (`python -m kokoa_infra...`, a script path beside a module)."""
    modules = module_names(package)
    graph = import_graph(package)
    sources = {name: path.read_text() for name, path in modules.items()}
    roots = {script.split(":")[0] for script in scripts}
    roots |= {m for m in modules if re.search(rf"^(from {re.escape(m)} import|import {re.escape(m)})\b",
                                              program.read_text(), re.M)}
    for name, path in modules.items():
        quoted = [f"{quote}{word}{quote}" for quote in "'\"" for word in (name, path.name)]
        if any(q in text for q in quoted for other, text in sources.items() if other != name):
            roots |= {name, f"{name}.__main__"} & set(modules)
    used, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in used:
            continue
        used.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c imports a and a.b
        todo += graph.get(name, ())
    return used


def test_the_wheel_holds_no_test_support(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path, [n for n in names if n.startswith("kokoa_infra/")])
    assert {n.split("/")[0] for n in names} == {"kokoa_infra", f"{wheel.name.split('-')[0]}-0.1.0.dist-info"}
    scripts = list(tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["scripts"].values())
    shipped = module_names(tmp_path / "kokoa_infra")
    used = used_by_the_product(tmp_path / "kokoa_infra", PROJECT / "__main__.py", scripts)
    assert "kokoa_infra.lab.cloudflare_standin" in used and "kokoa_infra.health.__main__" in used  # run by name
    assert set(shipped) - used == set(), "modules in the wheel that only tests, benchmarks or docs use"
    for name, path in shipped.items():
        assert not re.search(r"^\s*(import|from) (pytest|tests)\b", path.read_text(), re.M), name


def test_the_check_finds_a_module_nothing_uses(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "cli.py").write_text("from pkg import used\n\ndef main():\n    import pkg.lazy\n")
    (package / "used.py").write_text("ARGV = ['python', '-m', 'pkg.server']\n")
    (package / "lazy.py").write_text("")
    (package / "server.py").write_text("")
    (package / "preview.py").write_text("from pkg import used\n")
    program = tmp_path / "__main__.py"
    program.write_text("import pkg.cli\n")
    assert set(module_names(package)) - used_by_the_product(package, program, ["pkg.cli:main"]) == {"pkg.preview"}


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtualenv with the project installed from its wheel; its bin/."""
    root = tmp_path_factory.mktemp("install")
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
    assert found["edge"] == ["cert-refresh.sh", "edge-counters.sh", "edge.mtail", "firewall.nft", "install.sh",
                             "nginx.conf", "uninstall.sh", "wg-origin-0.conf"]
    assert "server_name blog.example.com" in found["nginx"]
    shipped = sorted(p.relative_to(found["templates"]).as_posix() for p in Path(found["templates"]).rglob("*.j2"))
    ours = sorted(p.relative_to(PROJECT / "templates").as_posix()
                  for p in (PROJECT / "templates").rglob("*.j2"))
    assert shipped == ours
