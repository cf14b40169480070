"""Rendered bundles checked by the real tools: wg, wg-quick, wireguard-go, nginx -t, bash -n, shellcheck."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from nacl.public import PrivateKey

from conftest import BASE_CONFIG
from kokoa_infra.keys import public_key
from kokoa_infra.model import parse_topology
from kokoa_infra.render import GATEWAY_USER, EdgePeer, render_edge_bundle, render_origin_bundle
from kokoa_infra.stackfile import kokoa_config

CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def _key() -> str:
    return base64.b64encode(bytes(PrivateKey.generate())).decode()


def render_all(config: dict) -> dict[str, dict[str, str]]:
    """Every bundle of a config, with fresh random keys (the Pulumi layer is not needed)."""
    topology = parse_topology(kokoa_config(config))
    bundles: dict[str, dict[str, str]] = {}
    for origin in topology.origins:
        origin_key = _key()
        peers = []
        for edge in topology.edges_of(origin):
            edge_key, psk = _key(), _key()
            peers.append(EdgePeer(edge, public_key(edge_key), psk))
            bundles[f"edge/{edge.name}"] = render_edge_bundle(topology.settings, origin, edge, edge_key, psk,
                                                              public_key(origin_key))
        bundles[f"origin/{origin.name}"] = render_origin_bundle(topology.settings, origin, origin_key, peers)
    return bundles


@pytest.fixture(scope="module")
def bundles() -> dict[str, dict[str, str]]:
    config = dict(BASE_CONFIG) | {"kokoa:acmeCaBundle": CA_PEM}
    return render_all(config)


def scripts(bundles):
    return [(node, name, text) for node, files in bundles.items()
            for name, text in files.items() if name.endswith(".sh")]


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (make setup installs it)")


def test_file_names_follow_the_contract(bundles):
    assert set(bundles["origin/blog"]) == {"wg0.conf", "gateway.conf", "certificate.sh", "install.sh",
                                           "uninstall.sh", "acme-ca.pem", "firewall.nft"}
    assert set(bundles["edge/edge-tokyo-2"]) == {"wg-origin-1.conf", "nginx.conf", "cert-refresh.sh",
                                                 "install.sh", "uninstall.sh", "firewall.nft"}


def test_every_script_parses_with_bash(bundles, tmp_path):
    for node, name, text in scripts(bundles):
        path = tmp_path / f"{node.replace('/', '-')}-{name}"
        path.write_text(text)
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, f"{node} {name}: {result.stderr}"


def test_every_script_passes_shellcheck(bundles, tmp_path):
    need("shellcheck")
    paths = []
    for node, name, text in scripts(bundles):
        path = tmp_path / f"{node.replace('/', '-')}-{name}"
        path.write_text(text)
        paths.append(str(path))
    result = subprocess.run(["shellcheck", "--severity=style", *paths], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_shellcheck_would_catch_a_broken_script(tmp_path):
    need("shellcheck")
    path = tmp_path / "broken.sh"
    path.write_text("#!/bin/bash\nrm -rf $DIR/*\n")
    assert subprocess.run(["shellcheck", str(path)], capture_output=True).returncode != 0


def wg_files(bundles):
    return [(node, name, text) for node, files in bundles.items()
            for name, text in files.items() if name.startswith("wg") and name.endswith(".conf")]


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


def test_public_keys_equal_what_wg_pubkey_prints():
    need("wg")
    for _ in range(5):
        private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
        expected = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True,
                                  check=True).stdout.strip()
        assert public_key(private) == expected
    # Unclamped random bytes too: WireGuard clamps them exactly as X25519 does.
    raw = base64.b64encode(bytes(range(1, 33))).decode()
    expected = subprocess.run(["wg", "pubkey"], input=raw, capture_output=True, text=True, check=True)
    assert public_key(raw) == expected.stdout.strip()


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
                               "10.100.0.1"], capture_output=True, text=True, timeout=20)
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
    if os.geteuid() != 0:
        pytest.skip("needs root for a private mount namespace")
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
    for address in ("10.100.0.1/24", "10.100.1.1/24"):
        subprocess.run(["ip", "-n", netns, "addr", "add", address, "dev", "lo"], check=True)
    for node in ("origin/blog", "origin/shop"):
        result = nginx_test(bundles[node]["gateway.conf"], [], tmp_path, netns)
        assert result.returncode == 0, f"{node}: {result.stderr}"


def test_nginx_t_would_reject_a_missing_certificate(bundles, tmp_path, netns):
    result = nginx_test(bundles["edge/edge-tokyo-1"]["nginx.conf"], [], tmp_path, netns)
    assert result.returncode != 0 and "fullchain.pem" in result.stderr


def test_edge_nginx_conf_has_the_protections(bundles):
    conf = bundles["edge/edge-tokyo-2"]["nginx.conf"]
    for expected in ("server_name shop.example.com;", "return 301 https://$host$request_uri;",
                     "ssl_certificate /etc/letsencrypt/live/shop.example.com/fullchain.pem;",
                     "server 10.100.1.1:80;", "keepalive 128;", "rate=50r/s;", "burst=100 delay=50;",
                     "limit_conn kokoa_connections 100;", "server_tokens off;",
                     "location /.well-known/acme-challenge/", "proxy_set_header X-Forwarded-For",
                     "client_header_timeout 10s;", "listen 443 ssl http2;"):
        assert expected in conf, expected
    gateway = bundles["origin/shop"]["gateway.conf"]
    assert "listen 10.100.1.1:80;" in gateway and "allow 10.100.1.10;" in gateway
    assert "server localhost:3000;" in gateway and "proxy_pass https://kokoa_application/app$uri;" in gateway


def test_rendering_is_deterministic_for_the_same_keys():
    topology = parse_topology(kokoa_config(BASE_CONFIG))
    origin = topology.origins[0]
    keys = [_key() for _ in range(3)]
    peers = [EdgePeer(e, public_key(keys[1]), keys[2]) for e in topology.edges_of(origin)]
    first = render_origin_bundle(topology.settings, origin, keys[0], peers)
    assert render_origin_bundle(topology.settings, origin, keys[0], list(reversed(peers))) == first
