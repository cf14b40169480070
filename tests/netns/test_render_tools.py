"""Rendered bundles on the real tools that need a namespace: wg setconf on a wireguard-go
interface, a WireGuard handshake between two namespaces, nginx -t binding the listen addresses."""

from __future__ import annotations

import copy
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from kokoa_infra.addressing import TUNNEL_PREFIX
from kokoa_infra.render import GATEWAY_USER
from tests.support.rendering import bundles as render_bundles
from tests.support.rendering import wireguard_ips
from tests.support.stacks import BASE_CONFIG
from tests.unit.test_render import bundles, need, render_all, wg_files  # noqa: F401 (bundles: a fixture)


def test_wireguard_files_pass_wg_quick_strip_and_wg_setconf_on_a_real_interface(bundles, netns, tmp_path):
    need("wg-quick")
    need("wireguard-go")
    for node, name, text in wg_files(bundles):
        conf = tmp_path / name  # wg-quick derives the interface name from the file name
        conf.write_text(text)
        conf.chmod(0o600)
        stripped = subprocess.run(["wg-quick", "strip", str(conf)], capture_output=True, text=True)
        assert stripped.returncode == 0, f"{node} {name}: {stripped.stderr}"
        assert "Address" not in stripped.stdout and "PrivateKey" in stripped.stdout
        (tmp_path / "stripped.conf").write_text(stripped.stdout)

        # A unique name: wireguard-go's control socket lives in the shared /run.
        iface = f"kt{uuid.uuid4().hex[:10]}"
        env = os.environ | {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
        subprocess.run(["ip", "netns", "exec", netns, "wireguard-go", iface], check=True, env=env,
                       capture_output=True)
        try:
            loaded = subprocess.run(["ip", "netns", "exec", netns, "wg", "setconf", iface,
                                     str(tmp_path / "stripped.conf")], capture_output=True, text=True)
            assert loaded.returncode == 0, f"{node} {name}: {loaded.stderr}"
            peers = subprocess.run(["ip", "netns", "exec", netns, "wg", "show", iface, "peers"],
                                   capture_output=True, text=True, check=True).stdout.split()
            assert len(peers) == text.count("[Peer]")
        finally:
            subprocess.run(["ip", "-n", netns, "link", "del", iface], capture_output=True)


def test_origin_and_edge_configs_complete_a_handshake(tmp_path, make_netns):
    """The two halves of one tunnel, brought up with wg-quick in two namespaces, really talk."""
    need("wg-quick")
    need("wireguard-go")
    config = dict(BASE_CONFIG)
    config["kokoa:origins"] = [dict(BASE_CONFIG["kokoa:origins"][0], host="172.31.250.1")]
    config["kokoa:edges"] = [dict(BASE_CONFIG["kokoa:edges"][0], publicIp="172.31.250.2")]
    rendered = render_all(config)
    origin_ns, edge_ns = make_netns(), make_netns()
    veth = f"kv{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "link", "add", veth, "netns", origin_ns, "type", "veth", "peer", "name", "eth0",
                    "netns", edge_ns], check=True)
    subprocess.run(["ip", "-n", origin_ns, "link", "set", veth, "name", "eth0"], check=True)
    tag = uuid.uuid4().hex[:6]
    # Unique interface names: wireguard-go sockets share this machine's /run.
    origin_conf, edge_conf = tmp_path / f"ko{tag}.conf", tmp_path / f"ke{tag}.conf"
    origin_conf.write_text(rendered["origin/blog"]["wg0.conf"])
    edge_conf.write_text(rendered["edge/edge-tokyo-1"]["wg-origin-0.conf"])
    env = os.environ | {"WG_QUICK_USERSPACE_IMPLEMENTATION": "wireguard-go",
                        "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
    try:
        for ns, address in ((origin_ns, "172.31.250.1/24"), (edge_ns, "172.31.250.2/24")):
            subprocess.run(["ip", "-n", ns, "addr", "add", address, "dev", "eth0"], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "eth0", "up"], check=True)
        for ns, conf in ((origin_ns, origin_conf), (edge_ns, edge_conf)):
            up = subprocess.run(["ip", "netns", "exec", ns, "wg-quick", "up", str(conf)],
                                capture_output=True, text=True, env=env)
            assert up.returncode == 0, up.stderr
        ping = subprocess.run(["ip", "netns", "exec", edge_ns, "ping", "-c", "3", "-i", "0.2", "-W", "2",
                               wireguard_ips(config)["blog"]], capture_output=True, text=True, timeout=20)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        handshake = subprocess.run(["ip", "netns", "exec", origin_ns, "wg", "show", f"ko{tag}",
                                    "latest-handshakes"], capture_output=True, text=True, check=True)
        assert int(handshake.stdout.split()[1]) > time.time() - 60
    finally:
        # The namespaces go with the fixture; wireguard-go's sockets live in the shared /run.
        for tag_name in (f"ko{tag}", f"ke{tag}"):
            Path(f"/var/run/wireguard/{tag_name}.sock").unlink(missing_ok=True)


def nginx_test(conf_text: str, domains: list[str], tmp_path: Path, netns: str) -> subprocess.CompletedProcess:
    """`nginx -t` with throwaway certificates at the real paths, in a private mount namespace.

    It runs in `netns` because `nginx -t` binds listen addresses (the gateway's is the
    WireGuard address, which the test adds there).
    """
    need("nginx")
    need("unshare")
    letsencrypt, logs = tmp_path / "letsencrypt", tmp_path / "log"
    letsencrypt.mkdir(exist_ok=True)
    for sub in ("nginx", "kokoa"):
        (logs / sub).mkdir(parents=True, exist_ok=True)
    for domain in domains:
        live = letsencrypt / "live" / domain
        live.mkdir(parents=True, exist_ok=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "1", "-subj", f"/CN={domain}", "-keyout", str(live / "privkey.pem"),
                        "-out", str(live / "fullchain.pem")], check=True, capture_output=True)
    conf = tmp_path / "nginx-under-test.conf"
    conf.write_text(conf_text)
    # The gateway's workers run as the user its install.sh creates; this machine has none.
    passwd, group = tmp_path / "passwd", tmp_path / "group"
    passwd.write_text(Path("/etc/passwd").read_text() + f"{GATEWAY_USER}:x:999:999::/nonexistent:/usr/sbin/nologin\n")
    group.write_text(Path("/etc/group").read_text() + f"{GATEWAY_USER}:x:999:\n")
    script = (f"mkdir -p /etc/letsencrypt && mount --bind {letsencrypt} /etc/letsencrypt && "
              f"mount --bind {passwd} /etc/passwd && mount --bind {group} /etc/group && "
              f"mount --bind {logs} /var/log && exec nginx -t -c {conf}")
    return subprocess.run(["ip", "netns", "exec", netns, "unshare", "--mount", "--propagation", "private",
                           "sh", "-c", script], capture_output=True, text=True)


def test_edge_nginx_conf_passes_nginx_t(bundles, tmp_path, netns):
    for node in ("edge/edge-tokyo-1", "edge/edge-tokyo-2"):
        conf = bundles[node]["nginx.conf"]
        result = nginx_test(conf, ["blog.example.com", "shop.example.com"], tmp_path, netns)
        assert result.returncode == 0, f"{node}: {result.stderr}"


def test_origin_gateway_conf_passes_nginx_t(bundles, tmp_path, netns):
    for origin in ("blog", "shop"):
        address = f"{wireguard_ips(BASE_CONFIG)[origin]}/{TUNNEL_PREFIX}"
        subprocess.run(["ip", "-n", netns, "addr", "add", address, "dev", "lo"], check=True)
    for node in ("origin/blog", "origin/shop"):
        result = nginx_test(bundles[node]["gateway.conf"], [], tmp_path, netns)
        assert result.returncode == 0, f"{node}: {result.stderr}"


def test_nginx_t_would_reject_a_missing_certificate(bundles, tmp_path, netns):
    result = nginx_test(bundles["edge/edge-tokyo-1"]["nginx.conf"], [], tmp_path, netns)
    assert result.returncode != 0 and "fullchain.pem" in result.stderr


def test_an_edges_wireguard_listens_on_its_origins_port(bundles, netns, tmp_path):
    """The port the edge's firewall admits its origin on is the one its interface listens on
    (wg setconf on a real wireguard-go interface, read back with `wg show`)."""
    need("wg-quick")
    need("wireguard-go")
    expected = {"edge/edge-tokyo-1": "51820", "edge/edge-osaka-1": "51820", "edge/edge-tokyo-2": "51821"}
    env = os.environ | {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
    for node, name, text in wg_files(bundles):
        if node not in expected:
            continue
        conf = tmp_path / name
        conf.write_text(text)
        conf.chmod(0o600)
        stripped = tmp_path / "stripped.conf"
        stripped.write_text(subprocess.run(["wg-quick", "strip", str(conf)], capture_output=True, text=True,
                                           check=True).stdout)
        iface = f"kt{uuid.uuid4().hex[:10]}"
        subprocess.run(["ip", "netns", "exec", netns, "wireguard-go", iface], check=True, env=env, capture_output=True)
        try:
            subprocess.run(["ip", "netns", "exec", netns, "wg", "setconf", iface, str(stripped)], check=True)
            port = subprocess.run(["ip", "netns", "exec", netns, "wg", "show", iface, "listen-port"],
                                  capture_output=True, text=True, check=True).stdout.strip()
        finally:
            subprocess.run(["ip", "-n", netns, "link", "del", iface], capture_output=True)
            Path(f"/var/run/wireguard/{iface}.sock").unlink(missing_ok=True)
        assert port == expected[node], node
        assert f"udp dport {port} accept" in bundles[node]["firewall.nft"], node


@pytest.mark.parametrize("keys", [
    {"idleTimeout": 1, "maxBodySize": "1k", "streamingPaths": ["/"]},
    {"idleTimeout": 3600, "maxBodySize": "1024m", "exemptPaths": ["/up/", "/api/"],
     "streamingPaths": ["/up/", "/" + "a" * 199]},
], ids=["lower bounds", "upper bounds"])
def test_the_site_keys_at_their_bounds_pass_nginx_t(keys, tmp_path, netns):
    config = copy.deepcopy(BASE_CONFIG)
    config["kokoa:origins"][0] |= {"upstream": "http://127.0.0.1:8080/app"} | keys
    rendered = render_bundles(config)
    subprocess.run(["ip", "-n", netns, "addr", "add", f"{wireguard_ips(BASE_CONFIG)['blog']}/{TUNNEL_PREFIX}",
                    "dev", "lo"], check=True)
    for node, name, domains in (("edge/edge-tokyo-1", "nginx.conf", ["blog.example.com"]),
                                ("origin/blog", "gateway.conf", [])):
        result = nginx_test(rendered[node][name], domains, tmp_path, netns)
        assert result.returncode == 0, f"{node}: {result.stderr}"
