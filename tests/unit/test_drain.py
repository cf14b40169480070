"""`kokoa drain`, `kokoa undrain`, `kokoa remove-edge`: edit one edge's entry, keep comments,
refuse the last serving edge."""

from __future__ import annotations

from pathlib import Path

import pytest
from ruamel.yaml import YAML

from tests.support.stacks import BASE_CONFIG, kokoa, stack_in

HOST_KEY = BASE_CONFIG["kokoa:edges"][0]["hostKey"]
ORIGIN_KEY = BASE_CONFIG["kokoa:origins"][0]["hostKey"]

STACK = f"""\
# Production stack: keep this comment.
config:
  kokoa:acmeEmail: ops@example.com
  kokoa:cloudflareZoneId: 023e105f4ecef8ad9ca31a8372d0c353
  kokoa:origins:
    - name: blog          # the blog
      domain: blog.example.com
      subnet: 0
      host: 203.0.113.10
      upstream: http://127.0.0.1:8080
      hostKey: {ORIGIN_KEY}
  kokoa:edges:
    # Tokyo, the first edge
    - name: edge-1
      origin: blog
      publicIp: 198.51.100.7
      index: 10
      hostKey: {HOST_KEY}
    - name: edge-2        # Osaka
      origin: blog
      publicIp: 198.51.100.8
      index: 11
      hostKey: {HOST_KEY}
"""


@pytest.fixture
def stack_file(tmp_path, monkeypatch) -> Path:
    return stack_in(tmp_path, monkeypatch, STACK)


invoke = kokoa


def edges(path) -> dict[str, dict]:
    config = YAML(typ="safe").load(path.read_text())["config"]
    return {e["name"]: e for e in config["kokoa:edges"]}


def test_drain_sets_dns_false_keeps_comments_and_says_what_up_will_do(stack_file):
    result = invoke("drain", "--stack", "prod", "edge-2")
    assert result.exit_code == 0, result.output
    assert edges(stack_file)["edge-2"]["dns"] is False
    text = stack_file.read_text()
    for comment in ("# Production stack: keep this comment.", "# the blog", "# Tokyo, the first edge", "# Osaka"):
        assert comment in text
    assert text.index("dns: false") > text.index("publicIp: 198.51.100.8")
    assert "deletes the A record blog.example.com → 198.51.100.8 (TTL 60 s)" in result.output
    assert "served by edge-1" in result.output and "wait out the TTL" in result.output


def test_drain_refuses_the_last_serving_edge_unless_forced(stack_file):
    assert invoke("drain", "--file", str(stack_file), "edge-2").exit_code == 0
    before = stack_file.read_text()
    refused = invoke("drain", "--file", str(stack_file), "edge-1")
    assert refused.exit_code == 1
    assert "nothing changed" in refused.output and "last serving edge of blog" in refused.output
    assert stack_file.read_text() == before
    forced = invoke("drain", "--file", str(stack_file), "edge-1", "--force")
    assert forced.exit_code == 0
    assert "WARNING: blog.example.com then has no serving edge" in forced.output
    assert edges(stack_file)["edge-1"]["dns"] is False


def test_undrain_removes_dns_false_and_repeats_are_harmless(stack_file):
    invoke("drain", "--stack", "prod", "edge-2")
    result = invoke("undrain", "--stack", "prod", "edge-2")
    assert result.exit_code == 0
    assert "dns" not in edges(stack_file)["edge-2"]
    assert "creates the A record blog.example.com → 198.51.100.8" in result.output
    again = invoke("undrain", "--stack", "prod", "edge-2")
    assert again.exit_code == 0 and "already serving" in again.output
    assert stack_file.read_text() == STACK


def test_remove_edge_deletes_the_entry_and_tells_about_the_uninstall(stack_file):
    invoke("drain", "--stack", "prod", "edge-2")
    result = invoke("remove-edge", "--stack", "prod", "edge-2")
    assert result.exit_code == 0, result.output
    assert set(edges(stack_file)) == {"edge-1"}
    assert "# Tokyo, the first edge" in stack_file.read_text()
    assert "runs its uninstall.sh on root@198.51.100.8" in result.output
    assert "WARNING" not in result.output


def test_remove_edge_refuses_the_last_serving_edge_and_warns_about_a_serving_one(stack_file):
    invoke("drain", "--stack", "prod", "edge-2")
    before = stack_file.read_text()
    refused = invoke("remove-edge", "--stack", "prod", "edge-1")
    assert refused.exit_code == 1 and "last serving edge" in refused.output
    assert stack_file.read_text() == before
    invoke("undrain", "--stack", "prod", "edge-2")
    serving = invoke("remove-edge", "--stack", "prod", "edge-1")
    assert serving.exit_code == 0
    assert "deletes the A record blog.example.com → 198.51.100.7" in serving.output
    assert "WARNING: it was still serving" in serving.output


def test_problems_change_nothing(stack_file):
    unknown = invoke("drain", "--stack", "prod", "edge-9")
    assert unknown.exit_code == 2 and "no edge is named 'edge-9' (edges: edge-1, edge-2)" in unknown.output
    stack_file.write_text(STACK.replace("origin: blog\n      publicIp: 198.51.100.8",
                                        "origin: nope\n      publicIp: 198.51.100.8"))
    broken = stack_file.read_text()
    result = invoke("drain", "--stack", "prod", "edge-2")
    assert result.exit_code == 2 and "its origin 'nope' is not in the stack" in result.output
    assert stack_file.read_text() == broken
    stack_file.write_text("config: [")
    assert invoke("drain", "--stack", "prod", "edge-2").exit_code == 2
    assert stack_file.read_text() == "config: ["
    missing = invoke("drain", "-s", "nope", "edge-2")
    assert missing.exit_code == 2 and "cannot read" in missing.output


def test_without_a_zone_the_record_is_named_for_kokoa_dns(stack_file):
    stack_file.write_text(STACK.replace("  kokoa:cloudflareZoneId: 023e105f4ecef8ad9ca31a8372d0c353\n", ""))
    result = invoke("drain", "--stack", "prod", "edge-2")
    assert "kokoa-dns remove --ip 198.51.100.8 --name blog.example.com" in result.output


def test_the_lab_stack_file_can_be_drained_without_host_keys(tmp_path):
    """The lab's stack file leaves hostKey to `kokoa lab up`: one edge's edit does not need them."""
    from kokoa_infra.project import PROJECT_DIR

    path = tmp_path / "Pulumi.lab.yaml"
    path.write_text((PROJECT_DIR / "stacks" / "Pulumi.lab.yaml").read_text())
    result = invoke("drain", "edge-blog-2", "--file", str(path))
    assert result.exit_code == 0, result.output
    assert edges(path)["edge-blog-2"]["dns"] is False
    assert "# the internet user" in path.read_text()
