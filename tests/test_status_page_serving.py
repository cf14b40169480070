"""Deploying the status page: the nginx block in docs/health.md passes `nginx -t` and serves only the page, with basic auth; the systemd units verify."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from kokoa_infra.health.html_preview import sample_page

REPO = Path(__file__).resolve().parent.parent
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


def test_the_documented_nginx_block_passes_nginx_t(site):
    result = run("nginx", "-t", "-q", "-c", str(site / "nginx.conf"), "-p", str(site))
    assert result.returncode == 0, result.stderr


def test_nginx_serves_only_the_page_and_only_with_the_password(site, make_netns):
    """In a namespace of its own (port 443 on its loopback); curl runs there too."""
    netns = make_netns()
    server = subprocess.Popen(["ip", "netns", "exec", netns, "nginx", "-c", str(site / "nginx.conf"),
                               "-p", str(site), "-g", "daemon off;"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def fetch(path: str, *auth: str) -> tuple[str, str, str]:
        result = run("ip", "netns", "exec", netns, "curl", "-sk", "--max-time", "5", *auth,
                     "-D", "-", "-o", str(site / "body"), "-w", "%{http_code}",
                     "--resolve", "status.example.com:443:127.0.0.1",
                     f"https://status.example.com{path}")
        body = (site / "body").read_text() if (site / "body").exists() else ""
        return result.stdout[-3:], result.stdout[:-3].lower(), body

    try:
        deadline = time.monotonic() + 20
        while fetch("/")[0] == "000" and time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.1)
        credentials = ("-u", f"{USER}:{PASSWORD}")
        assert fetch("/status.html")[0] == "401"
        assert fetch("/status.html", "-u", f"{USER}:wrong")[0] == "401"
        code, headers, body = fetch("/status.html", *credentials)
        assert code == "200" and body == (site / "state" / "status.html").read_text()
        assert "content-type: text/html" in headers and "cache-control: no-store" in headers
        assert "frame-ancestors 'none'" in headers
        for other in ("/status.json", "/status.html.history.json", "/kokoa.prom", "/state/status.json"):
            assert fetch(other, *credentials)[0] == "404", other
        code, headers, _ = fetch("/", *credentials)
        assert code == "302" and "/status.html" in headers
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


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
