"""Deploying the status page: the nginx block in docs/health.md passes `nginx -t` and serves only
the page, with basic auth; the systemd units verify."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.html_preview import sample_page

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "health.md"
USER, PASSWORD = "ops", "correct-horse"
STATE_FILES = {"status.html": None, "status.json": '{"secret": "not for the web"}\n',
               "status.html.history.json": "{}\n", "kokoa.prom": "kokoa_node_up 1\n"}


def nginx_block() -> str:
    return re.search(r"```nginx\n(.*?)```", DOCS.read_text(), re.S).group(1)


def run(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, **kwargs)


@pytest.fixture
def site(tmp_path) -> Path:
    """The docs' server block with its paths moved under tmp_path, in a complete nginx.conf."""
    if shutil.which("nginx") is None or shutil.which("openssl") is None:
        pytest.skip("needs nginx and openssl")
    state = tmp_path / "state"
    state.mkdir()
    for name, content in STATE_FILES.items():
        (state / name).write_text(content if content is not None else sample_page())
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem"),
        "-days", "2", "-subj", "/CN=status.example.com", check=True)
    hashed = run("openssl", "passwd", "-apr1", PASSWORD, check=True).stdout.strip()
    (tmp_path / "htpasswd").write_text(f"{USER}:{hashed}\n")
    block = nginx_block()
    replacements = {"/etc/ssl/certs/status.example.com.pem": tmp_path / "cert.pem",
                    "/etc/ssl/private/status.example.com.key": tmp_path / "key.pem",
                    "/etc/nginx/kokoa-status.htpasswd": tmp_path / "htpasswd",
                    "/var/lib/kokoa-health": state}
    for original, moved in replacements.items():
        assert original in block
        block = block.replace(original, str(moved))
    (tmp_path / "kokoa-status.conf").write_text(block)
    temp = tmp_path / "temp"
    temp.mkdir()
    (tmp_path / "nginx.conf").write_text(f"""
user root;
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{ worker_connections 64; }}
http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    include {tmp_path}/kokoa-status.conf;
}}
""")
    return tmp_path


def test_the_systemd_units_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze")
    for unit in ("kokoa-health.service", "kokoa-health.timer"):
        text = (REPO / "deploy" / "systemd" / unit).read_text()
        # The unit names /usr/local/bin/kokoa, which a test machine need not have.
        (tmp_path / unit).write_text(text.replace("/usr/local/bin/kokoa", "/bin/true"))
    result = run("systemd-analyze", "verify", str(tmp_path / "kokoa-health.service"),
                 str(tmp_path / "kokoa-health.timer"), cwd=tmp_path)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
