"""Stack file editing touches only the lines it means to change: whole files compared.

The file's own indentation (`  - ` or `    - `), comments, blank lines, quoting and wide
lines stay; a list held as a JSON string (which `pulumi.Config.get_object` reads) stays a
JSON string, changed on its one line.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kokoa_infra.cli import main
from kokoa_infra.stackfile import guess_indent, kokoa_config
from kokoa_infra.validate import parse_topology
from tests.support.stacks import BASE_CONFIG

# A wide hostKey line (over 100 characters with its comment) and `  - ` under each list key.
WIDE_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGL1PD1MFLSHFsj6ZYvAaf0idYchw2mywPcxjfuZyrx8 "
            "operator@a-rather-long-host-name.example.com")
FLUSH = f"""\
# The production stack.
config:
  kokoa:acmeEmail: "ops@example.com"   # quoted, with a comment
  kokoa:sshPrivateKey:
    secure: AAABAFakeCiphertext
  kokoa:sshAllowFrom: ["198.51.100.0/24"]
  kokoa:origins:
  - name: blog
    domain: blog.example.com
    subnet: 0
    host: 203.0.113.10
    upstream: http://127.0.0.1:8080
    hostKey: {WIDE_KEY}

  # Tokyo first.
  kokoa:edges:
  - name: edge-1
    origin: blog
    publicIp: 198.51.100.7
    index: 10
    hostKey: 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHWlfEcfu/rR7vL8BL5mkIgaCMqvg96KINyFut7g19WF'
    keyGeneration: 2
  - name: edge-2
    origin: blog
    publicIp: 198.51.100.8
    index: 11
    hostKey: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDd7AtxSHCugrtrMKP/YMzbtnWxfXPvYgySEdfDEVk+n
"""
# The same, indented `    - ` (the editor's own default).
INDENTED = "\n".join(("  " + line) if line.startswith("  ") and not line.startswith(("  kokoa", "  #")) else line
                     for line in FLUSH.split("\n")).replace("      secure:", "    secure:")
JSON_FORM = """\
config:
  kokoa:acmeEmail: ops@example.com
  kokoa:sshPrivateKey:
    secure: AAABAFakeCiphertext
  kokoa:origins: '[{"name": "blog", "domain": "blog.example.com", "subnet": 0, "host": "203.0.113.10", \
"upstream": "http://127.0.0.1:8080", "insecureAnyHostKey": true}]'   # as set with --json
  kokoa:edges: '[{"name":"edge-1","origin":"blog","publicIp":"198.51.100.7","index":10,\
"insecureAnyHostKey":true},{"name":"edge-2","origin":"blog","publicIp":"198.51.100.8","index":11,\
"insecureAnyHostKey":true}]'
  kokoa:formerNames: "{\\"edge-2\\": \\"edge-old\\"}"
"""


@pytest.fixture
def stack(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "Pulumi.prod.yaml"

    def write(text: str):
        path.write_text(text)
        return path
    return write


def kokoa(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def replace_lines(text: str, old: list[str], new: list[str]) -> str:
    assert "\n".join(old) + "\n" in text
    return text.replace("\n".join(old) + "\n", "".join(f"{line}\n" for line in new), 1)


def test_the_indentation_is_read_from_the_file():
    assert guess_indent(FLUSH) == (2, 2, 0)
    assert guess_indent(INDENTED) == (2, 4, 2)
    assert guess_indent("config:\n  kokoa:acmeEmail: a@b.c\n") == (2, 4, 2)


@pytest.mark.parametrize("text, dash", [(FLUSH, "  - "), (INDENTED, "    - ")], ids=["flush", "indented"])
def test_drain_adds_one_line_and_undrain_takes_it_away(stack, text, dash):
    path = stack(text)
    key = " " * len(dash)
    kokoa("drain", "-s", "prod", "edge-2")
    hostkey = f"{key}hostKey: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDd7AtxSHCugrtrMKP/YMzbtnWxfXPvYgySEdfDEVk+n"
    assert path.read_text() == replace_lines(text, [hostkey], [hostkey, f"{key}dns: false"])
    kokoa("undrain", "-s", "prod", "edge-2")
    assert path.read_text() == text
    # Before a key that comes after `dns` in an entry: keyGeneration.
    kokoa("drain", "-s", "prod", "edge-1")
    assert path.read_text() == replace_lines(text, [f"{key}keyGeneration: 2"],
                                             [f"{key}dns: false", f"{key}keyGeneration: 2"])


@pytest.mark.parametrize("text, dash", [(FLUSH, "  - "), (INDENTED, "    - ")], ids=["flush", "indented"])
def test_add_origin_appends_its_lines_in_the_files_style_before_the_blank_line(stack, text, dash):
    path = stack(text)
    kokoa("add-origin", "-s", "prod", "--name", "shop", "--domain", "shop.example.com", "--host", "203.0.113.20",
          "--upstream", "http://127.0.0.1:8080", "--insecure-any-host-key")
    key = " " * len(dash)
    last = f"{key}hostKey: {WIDE_KEY}"
    assert path.read_text() == replace_lines(text, [last], [
        last, f"{dash}name: shop", f"{key}domain: shop.example.com", f"{key}subnet: 1", f"{key}host: 203.0.113.20",
        f"{key}upstream: http://127.0.0.1:8080", f"{key}insecureAnyHostKey: true"])


@pytest.mark.parametrize("text, dash", [(FLUSH, "  - "), (INDENTED, "    - ")], ids=["flush", "indented"])
def test_remove_edge_takes_away_its_lines_only(stack, text, dash):
    path = stack(text)
    kokoa("remove-edge", "-s", "prod", "edge-2")
    key = " " * len(dash)
    assert path.read_text() == replace_lines(text, [
        f"{dash}name: edge-2", f"{key}origin: blog", f"{key}publicIp: 198.51.100.8", f"{key}index: 11",
        f"{key}hostKey: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDd7AtxSHCugrtrMKP/YMzbtnWxfXPvYgySEdfDEVk+n"], [])


def test_removing_the_last_entry_keeps_what_followed_it(stack):
    text = (FLUSH.replace("  # Tokyo first.\n  kokoa:edges:", "  kokoa:edges:")
            + "\n  # the end\n  kokoa:sshUser: root\n")
    path = stack(text)
    kokoa("remove-edge", "-s", "prod", "edge-2")
    assert path.read_text() == replace_lines(text, [
        "  - name: edge-2", "    origin: blog", "    publicIp: 198.51.100.8", "    index: 11",
        "    hostKey: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDd7AtxSHCugrtrMKP/YMzbtnWxfXPvYgySEdfDEVk+n"], [])


def edges_line(edges: list[dict]) -> str:
    return "  kokoa:edges: '" + json.dumps(edges, separators=(",", ":")) + "'"


def test_the_json_string_form_is_read_as_get_object_reads_it():
    topology = parse_topology(kokoa_config({"kokoa:origins": json.dumps(BASE_CONFIG["kokoa:origins"]),
                                            **{k: v for k, v in BASE_CONFIG.items() if k != "kokoa:origins"}}))
    assert [o.name for o in topology.origins] == ["blog", "shop"]


def test_the_json_string_form_changes_on_its_one_line(stack):
    path = stack(JSON_FORM)
    edges = json.loads(JSON_FORM.split("kokoa:edges: '")[1].split("'\n")[0])
    old_line = edges_line(edges)
    kokoa("drain", "-s", "prod", "edge-1")
    drained = [dict(edges[0], dns=False), edges[1]]
    assert path.read_text() == JSON_FORM.replace(old_line, edges_line(drained))
    kokoa("add-edge", "-s", "prod", "--name", "edge-3", "--origin", "blog", "--public-ip", "198.51.100.9",
          "--insecure-any-host-key")
    added = drained + [{"name": "edge-3", "origin": "blog", "publicIp": "198.51.100.9", "index": 12,
                        "insecureAnyHostKey": True}]
    assert path.read_text() == JSON_FORM.replace(old_line, edges_line(added))
    kokoa("remove-edge", "-s", "prod", "edge-2")
    assert path.read_text() == JSON_FORM.replace(old_line, edges_line([added[0], added[2]])).replace(
        '"{\\"edge-2\\": \\"edge-old\\"}"', '"{}"')


def test_an_invalid_json_string_is_reported_not_overwritten(stack):
    path = stack(JSON_FORM.replace('"insecureAnyHostKey":true}]', '"insecureAnyHostKey":true}'))
    before = path.read_text()
    result = CliRunner().invoke(main, ["drain", "-s", "prod", "edge-1"])
    assert result.exit_code == 2
    assert "kokoa:edges is neither YAML nor a JSON string" in result.stderr
    assert path.read_text() == before
