"""The documented nginx block for the status page: `nginx -t` (it binds port 443: root), and it serves the page,
only with the password (nginx and curl in a throwaway namespace)."""

from __future__ import annotations

import subprocess
import time

from tests.unit.test_status_page_serving import PASSWORD, USER, run, site  # noqa: F401 (site: a fixture)


def test_the_documented_nginx_block_passes_nginx_t(site, netns):
    # `nginx -t` binds the listen addresses: in a namespace of its own, not the machine's.
    result = run("ip", "netns", "exec", netns, "nginx", "-t", "-q", "-c", str(site / "nginx.conf"), "-p", str(site))
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
