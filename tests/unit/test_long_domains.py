"""Every domain the validation accepts (up to 253 characters) gets through the edge's install:
its placeholder certificate names it in subjectAltName, where a common name would stop at 64."""

from __future__ import annotations

import copy
import subprocess

import pytest

from tests.support.rendering import bundles
from tests.support.stacks import BASE_CONFIG


def domain_of(length: int) -> str:
    """A valid lower-case domain of exactly `length` characters (labels of 63 at most)."""
    labels, left = [], length - len(".example.com")
    while left > 0:
        size = min(63, left)
        if left - size == 1:  # a label of 0 characters cannot follow
            size -= 1
        labels.append("a" * size)
        left -= size + 1
    domain = ".".join(labels) + ".example.com"
    assert len(domain) == length
    return domain


def config_with_domain(domain: str) -> dict:
    config = copy.deepcopy(BASE_CONFIG)
    config["kokoa:origins"][0]["domain"] = domain
    return config


def placeholder_block(install_sh: str) -> str:
    """The part of the edge's install.sh that makes the placeholder certificate."""
    start = install_sh.index('if [ ! -s "$TLS_DIR/fullchain.pem" ]')
    return install_sh[start:install_sh.index("\nfi\n", start) + 4]


@pytest.mark.parametrize("length", [46, 64, 65, 100, 253])
def test_the_placeholder_certificate_names_any_valid_domain(length, tmp_path):
    domain = domain_of(length)
    install = bundles(config_with_domain(domain))["edge/edge-tokyo-1"]["install.sh"]
    script = ('set -euo pipefail\nlog() { echo "$*"; }\ndie() { echo "error: $*" >&2; exit 1; }\n'
              f'TLS_DIR={tmp_path}/live\n' + placeholder_block(install))
    made = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    checked = subprocess.run(["openssl", "x509", "-noout", "-checkhost", domain, "-in",
                              str(tmp_path / "live" / "fullchain.pem")], capture_output=True, text=True)
    assert "does match" in checked.stdout, checked.stdout + checked.stderr


def test_a_failing_placeholder_says_why(tmp_path):
    install = bundles(BASE_CONFIG)["edge/edge-tokyo-1"]["install.sh"]
    # A directory where the key should go: openssl cannot write it.
    (tmp_path / "live" / "privkey.pem").mkdir(parents=True)
    script = ('set -euo pipefail\nlog() { echo "$*"; }\ndie() { echo "error: $*" >&2; exit 1; }\n'
              f'TLS_DIR={tmp_path}/live\n' + placeholder_block(install))
    made = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert made.returncode != 0
    assert made.stderr.startswith("error: could not make the placeholder certificate for blog.example.com: ")
    assert "privkey.pem" in made.stderr  # openssl's own words, not silence
