"""Every domain the validation accepts (up to 253 characters) passes `nginx -t` in the
rendered files: nginx's default server_names_hash_bucket_size (64 here) fails from 47."""

from __future__ import annotations

import subprocess

import pytest

from kokoa_infra.addressing import TUNNEL_PREFIX
from tests.netns.test_render_tools import nginx_test
from tests.support.rendering import bundles, wireguard_ips
from tests.unit.test_long_domains import config_with_domain, domain_of

LENGTHS = [46, 47, 100, 253]


def certificate(tmp_path, domain: str) -> None:
    """A throwaway certificate where nginx_test mounts /etc/letsencrypt (the name in SAN: a
    CN holds 64 characters)."""
    live = tmp_path / "letsencrypt" / "live" / domain
    live.mkdir(parents=True, exist_ok=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=test", "-addext", f"subjectAltName=DNS:{domain}",
                    "-keyout", str(live / "privkey.pem"), "-out", str(live / "fullchain.pem")],
                   check=True, capture_output=True)


@pytest.mark.parametrize("length", LENGTHS)
def test_the_edge_nginx_conf_passes_nginx_t_with_a_long_domain(length, tmp_path, netns):
    domain = domain_of(length)
    certificate(tmp_path, domain)
    conf = bundles(config_with_domain(domain))["edge/edge-tokyo-1"]["nginx.conf"]
    result = nginx_test(conf, [], tmp_path, netns)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("upstream", ["http://127.0.0.1:8080", "http://127.0.0.1:8080/app"], ids=["relay", "proxy"])
@pytest.mark.parametrize("length", LENGTHS)
def test_the_gateway_passes_nginx_t_with_a_long_domain(length, upstream, tmp_path, netns):
    config = config_with_domain(domain_of(length))
    config["kokoa:origins"][0]["upstream"] = upstream
    address = f"{wireguard_ips(config)['blog']}/{TUNNEL_PREFIX}"
    subprocess.run(["ip", "-n", netns, "addr", "add", address, "dev", "lo"], check=True)
    result = nginx_test(bundles(config)["origin/blog"]["gateway.conf"], [], tmp_path, netns)
    assert result.returncode == 0, result.stderr
