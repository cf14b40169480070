"""A real site through the whole chain, in throwaway namespaces: a client, the rendered edge,
the tunnel, the rendered gateway (both forms: a TCP relay and an HTTP proxy) and an application
(kokoa_infra/lab/websocket.py) that echoes WebSocket frames and tells what headers and body it got.
WebSockets, request bodies (maxBodySize, streamingPaths) and the headers the edge drops."""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.edge_serving import link_tunnel, start_edge_nginx, throwaway_certificate
from tests.support.rendering import bundles, wireguard_ips
from tests.support.stacks import BASE_CONFIG

DOMAIN = "blog.example.com"
PROJECT = Path(__file__).resolve().parents[2]
WEBSOCKET = str(PROJECT / "kokoa_infra" / "lab" / "websocket.py")
APP_PORT = 8080


def start_gateway(netns: str, directory: Path, conf: str) -> None:
    """The origin's gateway in `netns` with its paths in `directory` (as test_edge_nginx's)."""
    from kokoa_infra.render import ACME_WEBROOT, CERT_EXPORT_DIR, GATEWAY_USER
    var_lib = directory / "var-lib"
    for path in (var_lib / Path(CERT_EXPORT_DIR).relative_to("/var/lib"),
                 var_lib / Path(ACME_WEBROOT).relative_to("/var/lib"), var_lib / "nginx",
                 directory / "log" / "kokoa", directory / "run"):
        path.mkdir(parents=True, exist_ok=True)
    (directory / "gateway.conf").write_text(conf)
    passwd, group = directory / "passwd", directory / "group"
    passwd.write_text(Path("/etc/passwd").read_text() + f"{GATEWAY_USER}:x:0:0::/nonexistent:/usr/sbin/nologin\n")
    group.write_text(Path("/etc/group").read_text() + f"{GATEWAY_USER}:x:0:\n")
    script = (f"mount --bind {var_lib} /var/lib && mount --bind {passwd} /etc/passwd && "
              f"mount --bind {group} /etc/group && mount --bind {directory / 'log'} /var/log && "
              f"mount --bind {directory / 'run'} /run && exec nginx -c {directory / 'gateway.conf'}")
    started = subprocess.run(["ip", "netns", "exec", netns, "unshare", "--mount", "--propagation", "private",
                              "sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert started.returncode == 0, started.stderr


def wait_for_port(netns: str, port: int) -> None:
    for _ in range(50):  # bounded: 5 s
        if subprocess.run(["ip", "netns", "exec", netns, "ss", "-Htln", f"sport = :{port}"],
                          capture_output=True, text=True).stdout.strip():
            return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port} in {netns}")


@pytest.fixture(params=["http://127.0.0.1:8080", "http://127.0.0.1:8080/"], ids=["relay", "http-proxy"])
def site(request, make_netns, tmp_path):
    """Builds the chain for an origin config (blog's keys updated with the given ones); returns
    (client namespace, CA, the origin's namespace, the edge's directory)."""
    def build(**keys) -> tuple[str, Path, str, Path]:
        edge_ns, origin_ns = make_netns(), make_netns()
        config = copy.deepcopy(BASE_CONFIG)
        # "http://…:8080/" has a path ("/"), which the gateway serves as an HTTP proxy (prefix "").
        config["kokoa:origins"][0] |= {"upstream": request.param, **keys}
        rendered = bundles(config)
        ips = wireguard_ips(config)
        link_tunnel(edge_ns, origin_ns, ips["edge-tokyo-1"], ips["blog"])
        subprocess.Popen(["ip", "netns", "exec", origin_ns, sys.executable, WEBSOCKET, "serve", "127.0.0.1",
                          str(APP_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(origin_ns, APP_PORT)
        (tmp_path / "origin").mkdir()
        start_gateway(origin_ns, tmp_path / "origin", rendered["origin/blog"]["gateway.conf"])
        edge_dir = tmp_path / "edge"
        edge_dir.mkdir()
        ca = throwaway_certificate(edge_dir, DOMAIN)
        start_edge_nginx(edge_ns, edge_dir, {"nginx.conf": rendered["edge/edge-tokyo-1"]["nginx.conf"]})
        return edge_ns, ca, origin_ns, edge_dir
    return build
    # make_netns kills every process left in the namespaces.


def websocket(netns: str, ca: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns, sys.executable, WEBSOCKET, "echo", f"wss://{DOMAIN}/socket",
                           "--ca", str(ca), "--connect", "127.0.0.1:443", *args],
                          capture_output=True, text=True, timeout=60)


def curl(netns: str, ca: Path, *args: str, path: str = "/") -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns, "curl", "-sS", "--max-time", "30", "--cacert", str(ca),
                           "--resolve", f"{DOMAIN}:443:127.0.0.1", *args, f"https://{DOMAIN}{path}"],
                          capture_output=True, text=True, timeout=60)


def test_a_websocket_echoes_through_the_edge_and_the_gateway(site):
    netns, ca, *_ = site()
    echoed = websocket(netns, ca, "--message", "hello kokoa", "--count", "3")
    assert echoed.returncode == 0, echoed.stderr
    assert echoed.stdout.split("\n")[:3] == ["hello kokoa"] * 3


def test_an_upgraded_connection_outlives_the_request_timeouts_up_to_idle_timeout(site):
    # Silent for 3 s between frames: an idleTimeout of 2 s ends it, one of 5 s keeps it.
    netns, ca, *_ = site(idleTimeout=5)
    kept = websocket(netns, ca, "--count", "2", "--pause", "3")
    assert kept.returncode == 0, kept.stderr


def test_idle_timeout_ends_a_silent_websocket(site):
    netns, ca, *_ = site(idleTimeout=2)
    cut = websocket(netns, ca, "--count", "2", "--pause", "3")
    assert cut.returncode != 0 and "closed after 1 echoes" in cut.stderr, cut.stdout + cut.stderr


def test_only_a_websocket_upgrade_reaches_the_application(site):
    netns, ca, *_ = site()
    # h2c (or anything but websocket) and the client's own Connection header stay at the edge.
    plain = curl(netns, ca, "--http1.1", "-H", "Upgrade: h2c", "-H", "Connection: Upgrade, HTTP2-Settings")
    assert plain.returncode == 0, plain.stderr
    assert "upgrade=[] connection=[]" in plain.stdout


def test_the_edge_drops_what_frameworks_read_as_client_address_or_path(site):
    netns, ca, *_ = site()
    answer = curl(netns, ca, "-H", "True-Client-IP: 6.6.6.6", "-H", "X-Client-IP: 6.6.6.6",
                  "-H", "CF-Connecting-IP: 6.6.6.6", "-H", "X-Original-URL: /admin", "-H", "X-Rewrite-URL: /admin",
                  "-H", "X-Forwarded-Scheme: http", "-H", "X-Forwarded-Proto: http", "-H", "X-Forwarded-For: 6.6.6.6")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() == ("upgrade=[] connection=[] x-forwarded-proto=[https] x-forwarded-scheme=[] "
                                     "true-client-ip=[] x-client-ip=[] cf-connecting-ip=[] x-original-url=[] "
                                     "x-rewrite-url=[] x-real-ip=[127.0.0.1] x-forwarded-for=[127.0.0.1] body=0")


def upload(netns: str, ca: Path, tmp_path: Path, megabytes: int, path: str = "/upload") -> subprocess.CompletedProcess:
    body = tmp_path / f"body-{megabytes}"
    if not body.exists():
        with body.open("wb") as out:
            out.truncate(megabytes * 1024 * 1024)
    return curl(netns, ca, "--http1.1", "-o", "-", "-w", "%{http_code}", "--data-binary", f"@{body}", path=path)


def test_max_body_size_admits_a_20_mb_upload_and_refuses_60_mb_with_413(site, tmp_path):
    netns, ca, *_ = site(maxBodySize="50m")
    passed = upload(netns, ca, tmp_path, 20)
    assert passed.stdout.endswith(f"body={20 * 1024 * 1024}\n200"), passed.stdout[-200:] + passed.stderr
    refused = upload(netns, ca, tmp_path, 60)
    assert refused.stdout.endswith("413"), refused.stdout[-200:] + refused.stderr


def held_bodies(netns: str) -> int:
    """Request bodies the edge's nginx holds in its body space (open, already unlinked files)."""
    held = 0
    for pid in subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split():
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                held += "/var/lib/nginx/body/" in str(fd.readlink())
            except OSError:
                continue
    return held


def slow_upload(netns: str, ca: Path, path: str) -> subprocess.Popen:
    """A 3 MB body sent at 1 MB/s: for about 3 s the edge holds it, or passes it on."""
    return subprocess.Popen(["ip", "netns", "exec", netns, "sh", "-c",
                             f"head -c 3145728 /dev/zero | curl -sS --max-time 30 --cacert {ca} --http1.1 "
                             f"--resolve {DOMAIN}:443:127.0.0.1 --limit-rate 1M -H 'Content-Length: 3145728' "
                             f"--data-binary @- https://{DOMAIN}{path}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_edge_buffers_a_body_except_under_streaming_paths(site):
    netns, ca, origin_ns, edge_dir = site(streamingPaths=["/stream/"])
    for path, buffered in (("/upload", True), ("/stream/x", False)):
        sender = slow_upload(netns, ca, path)
        try:
            time.sleep(1.5)
            # Buffered: the body waits in the edge's body space and no request reached the
            # application yet; streamed: the application is already reading it.
            at_origin = subprocess.run(["ip", "netns", "exec", origin_ns, "ss", "-Htn", "state", "established",
                                        f"sport = :{APP_PORT}"], capture_output=True, text=True).stdout
            assert (held_bodies(netns) == 1) == buffered, path
            assert (at_origin.strip() == "") == buffered, (path, at_origin)
            out, err = sender.communicate(timeout=30)
        finally:
            sender.kill()
        assert out.endswith(f"body={3 * 1024 * 1024}\n"), (path, out, err)


def test_a_websocket_survives_reloads_of_the_edge_and_the_gateway(site, tmp_path):
    # A reload hands open connections to the old workers, which worker_shutdown_timeout ends:
    # the relay's 10 s of before cut a WebSocket 10 s after any gateway reload.
    netns, ca, origin_ns, edge_dir = site()
    client = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, WEBSOCKET, "echo", f"wss://{DOMAIN}/s",
                               "--ca", str(ca), "--connect", "127.0.0.1:443", "--count", "2", "--pause", "13"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
        for pidfile in (edge_dir / "run" / "nginx.pid", tmp_path / "origin" / "run" / "kokoa-gateway.pid"):
            subprocess.run(["kill", "-HUP", pidfile.read_text().strip()], check=True)
        out, err = client.communicate(timeout=40)
    finally:
        client.kill()
    assert client.returncode == 0, err
    assert out.split() == ["hello", "hello"]
