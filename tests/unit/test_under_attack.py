"""`kokoa under-attack on|off|auto ORIGIN`: edit one origin's underAttack, keep comments, refuse
auto without capacity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from kokoa_infra.stackfile import kokoa_config
from kokoa_infra.validate import parse_topology
from tests.support.stacks import BASE_CONFIG, kokoa, stack_in

HOST_KEY = BASE_CONFIG["kokoa:edges"][0]["hostKey"]
ORIGIN_KEY = BASE_CONFIG["kokoa:origins"][0]["hostKey"]

STACK = f"""\
# Production stack: keep this comment.
config:
  kokoa:acmeEmail: ops@example.com
  kokoa:sshPrivateKey: not-checked-here
  kokoa:origins:
    - name: blog          # the blog
      domain: blog.example.com
      subnet: 0
      host: 203.0.113.10
      upstream: http://127.0.0.1:8080
      hostKey: {ORIGIN_KEY}
      rateLimit: {{requestsPerSecond: 20, burst: 40, connections: 50}}
      exemptPaths: [/api/]   # the mobile app
      hstsMaxAge: 0
    - name: shop
      domain: shop.example.com
      subnet: 1
      host: 203.0.113.20
      upstream: http://127.0.0.1:8080
      hostKey: {ORIGIN_KEY}
      capacity: {{concurrentRequests: 8}}
  kokoa:edges:
    - name: edge-1
      origin: blog
      publicIp: 198.51.100.7
      index: 10
      hostKey: {HOST_KEY}
"""


@pytest.fixture
def stack_file(tmp_path, monkeypatch) -> Path:
    return stack_in(tmp_path, monkeypatch, STACK)


invoke = kokoa


def origin(path, name: str) -> dict:
    config = YAML(typ="safe").load(path.read_text())["config"]
    return next(o for o in config["kokoa:origins"] if o["name"] == name)


def test_on_inserts_the_key_in_writing_order_keeps_comments_and_says_what_up_will_do(stack_file):
    result = invoke("under-attack", "--stack", "prod", "on", "blog")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "set underAttack: on for origin blog in Pulumi.prod.yaml",
        "The next `pulumi up`:",
        "  - on edge-1: every request without a visitor pass gets the challenge (/api/ and the health checker "
        "excepted); visitors who solve it, or came with a pass, go through",
        "  - reloads nginx on each edge (open connections finish); installs libnginx-mod-http-js where it is missing",
    ]
    text = stack_file.read_text()
    assert text == STACK.replace("      exemptPaths: [/api/]   # the mobile app\n",
                                 "      underAttack: on\n      exemptPaths: [/api/]   # the mobile app\n")
    topology = parse_topology(kokoa_config(YAML(typ="safe").load(text)["config"]))
    assert topology.origin("blog").defence.under_attack == "on"


def test_back_to_the_default_removes_the_key_and_the_file_is_as_before(stack_file):
    assert invoke("under-attack", "--file", str(stack_file), "on", "shop").exit_code == 0
    assert origin(stack_file, "shop")["underAttack"] == "on"
    result = invoke("under-attack", "--file", str(stack_file), "auto", "shop")
    assert result.exit_code == 0 and "only while shop is at its capacity (8 requests at once)" in result.output
    assert stack_file.read_text() == STACK
    off = invoke("under-attack", "--file", str(stack_file), "off", "shop")
    assert "over shop's capacity (8 requests at once) a 503 with Retry-After" in off.output
    assert origin(stack_file, "shop")["underAttack"] == "off"


def test_the_same_mode_again_changes_nothing(stack_file):
    result = invoke("under-attack", "--file", str(stack_file), "auto", "shop")
    assert result.exit_code == 0
    assert result.output == f"origin shop is already underAttack: auto; {stack_file} is unchanged\n"
    assert stack_file.read_text() == STACK


def test_auto_without_capacity_is_refused_and_nothing_changes(stack_file):
    result = invoke("under-attack", "--file", str(stack_file), "auto", "blog")
    assert result.exit_code == 1
    assert "origin blog has no capacity: auto challenges visitors only while the origin is full" in result.output
    assert stack_file.read_text() == STACK


def test_an_unknown_origin_or_mode_is_a_usage_error(stack_file):
    unknown = invoke("under-attack", "--file", str(stack_file), "on", "wiki")
    assert unknown.exit_code == 2 and "no origin is named 'wiki' (origins: blog, shop)" in unknown.output
    assert invoke("under-attack", "--file", str(stack_file), "maybe", "blog").exit_code == 2
    assert stack_file.read_text() == STACK


def test_origins_held_as_a_json_string_change_on_their_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    origins = [{"name": "blog", "domain": "blog.example.com", "subnet": 0, "host": "203.0.113.10",
                "upstream": "http://127.0.0.1:8080", "hostKey": ORIGIN_KEY}]
    path = tmp_path / "Pulumi.prod.yaml"
    path.write_text(f"config:\n  kokoa:origins: '{json.dumps(origins)}'\n  kokoa:acmeEmail: ops@example.com\n")
    assert invoke("under-attack", "--file", str(path), "on", "blog").exit_code == 0
    lines = path.read_text().splitlines()
    assert json.loads(lines[1].split(": ", 1)[1].strip("'"))[0]["underAttack"] == "on"
    assert lines[2] == "  kokoa:acmeEmail: ops@example.com"
