"""Rendered bundles checked by the real tools: wg, wg-quick, wireguard-go, nginx -t, bash -n, shellcheck."""

from __future__ import annotations

import base64
import shutil
import subprocess

import pytest
from nacl.public import PrivateKey

from kokoa_infra.keys import public_key
from kokoa_infra.render import EdgePeer, render_edge_bundle, render_origin_bundle
from kokoa_infra.stackfile import kokoa_config
from kokoa_infra.validate import parse_topology
from tests.support.rendering import wireguard_ips
from tests.support.stacks import BASE_CONFIG

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


def test_each_bundle_holds_exactly_its_files(bundles):
    assert set(bundles["origin/blog"]) == {"wg0.conf", "gateway.conf", "certificate.sh", "install.sh",
                                           "uninstall.sh", "acme-ca.pem", "firewall.nft", "logrotate.conf"}
    assert set(bundles["edge/edge-tokyo-2"]) == {"wg-origin-1.conf", "nginx.conf", "cert-refresh.sh",
                                                 "install.sh", "uninstall.sh", "firewall.nft",
                                                 "edge-counters.sh", "edge.mtail"}


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


def test_edge_nginx_conf_has_the_protections(bundles):
    ips = wireguard_ips(BASE_CONFIG)
    conf = bundles["edge/edge-tokyo-2"]["nginx.conf"]
    for expected in ("server_name shop.example.com;", "return 301 https://$host$request_uri;",
                     "ssl_certificate /etc/letsencrypt/live/shop.example.com/fullchain.pem;",
                     f"server {ips['shop']}:80;", "keepalive 128;", "rate=50r/s;", "burst=100 delay=50;",
                     "limit_conn kokoa_connections 100;", "server_tokens off;",
                     "location /.well-known/acme-challenge/", "proxy_set_header X-Forwarded-For",
                     "client_header_timeout 10s;", "listen 443 ssl http2;"):
        assert expected in conf, expected
    gateway = bundles["origin/shop"]["gateway.conf"]
    assert f"listen {ips['shop']}:80;" in gateway and f"allow {ips['edge-tokyo-2']};" in gateway
    assert "server localhost:3000;" in gateway and "proxy_pass https://kokoa_application/app$uri;" in gateway


def test_the_gateway_relays_tcp_unless_the_upstream_has_a_path(bundles):
    from kokoa_infra.render import STREAM_MODULE, STREAM_PACKAGE
    ips = wireguard_ips(BASE_CONFIG)
    relay, http = bundles["origin/blog"], bundles["origin/shop"]  # http://127.0.0.1:8080, https://localhost:3000/app
    stream = relay["gateway.conf"].split("\nstream {\n", 1)[1]
    assert relay["gateway.conf"].startswith("#") and f"load_module {STREAM_MODULE};" in relay["gateway.conf"]
    assert f"listen {ips['blog']}:80;" in stream and "server 127.0.0.1:8080;" in stream
    assert f"allow {ips['edge-tokyo-1']};\n        allow {ips['edge-osaka-1']};\n        deny all;" in stream
    assert f"{STREAM_MODULE}:{STREAM_PACKAGE}" in relay["install.sh"]
    assert "stream {" not in http["gateway.conf"] and "load_module" not in http["gateway.conf"]
    assert STREAM_PACKAGE not in http["install.sh"]
    # Either way, the ACME challenges are served on the certificate port, where the edges relay them.
    for origin, bundle in (("blog", relay), ("shop", http)):
        cert_server = bundle["gateway.conf"].split(f"listen {ips[origin]}:9080;", 1)[1]
        assert "location /.well-known/acme-challenge/ {\n            root /var/lib/kokoa/acme-webroot;" in cert_server
    assert f"proxy_pass http://{ips['blog']}:9080;" in bundles["edge/edge-tokyo-1"]["nginx.conf"]


def test_rendering_is_deterministic_for_the_same_keys():
    topology = parse_topology(kokoa_config(BASE_CONFIG))
    origin = topology.origins[0]
    keys = [_key() for _ in range(3)]
    peers = [EdgePeer(e, public_key(keys[1]), keys[2]) for e in topology.edges_of(origin)]
    first = render_origin_bundle(topology.settings, origin, keys[0], peers)
    assert render_origin_bundle(topology.settings, origin, keys[0], list(reversed(peers))) == first
