"""`kokoa add-origin`, `kokoa add-edge` and `kokoa bundle`."""

from __future__ import annotations

import json
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from kokoa_infra.host_keys import RSA_HOST_KEY
from tests.support.stacks import kokoa, stack_in

STACK = """\
# Production stack: keep this comment.
config:
  kokoa:acmeEmail: ops@example.com   # who hears from Let's Encrypt
  kokoa:sshPrivateKey:
    secure: AAABAFakeCiphertext
  kokoa:origins:
    # the blog
    - name: blog
      domain: blog.example.com
      subnet: 0
      host: 203.0.113.10
      upstream: http://127.0.0.1:8080
      hostKey: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGL1PD1MFLSHFsj6ZYvAaf0idYchw2mywPcxjfuZyrx8
    - name: wiki
      domain: wiki.example.com
      subnet: 2
      host: 203.0.113.30
      upstream: http://127.0.0.1:8080
      hostKey: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBMpJjAOxGMt1Dbof+121TTjPflStl3yIj5fXXRKPXbr
  kokoa:edges:
    - name: edge-1
      origin: blog
      publicIp: 198.51.100.7
      index: 10
      hostKey: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHWlfEcfu/rR7vL8BL5mkIgaCMqvg96KINyFut7g19WF
"""
# Real ed25519 public keys (ssh-keygen), for the entries the tests add.
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDd7AtxSHCugrtrMKP/YMzbtnWxfXPvYgySEdfDEVk+n"
OTHER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPowORvosOn8lf/cameLjUW3dnXMoGIMVmMc0AKt0AOe"


@pytest.fixture
def stack_file(tmp_path, monkeypatch) -> Path:
    return stack_in(tmp_path, monkeypatch, STACK)


invoke = kokoa


def test_add_origin_takes_the_next_free_subnet_and_keeps_comments(stack_file):
    result = invoke("add-origin", "--stack", "prod", "--name", "shop", "--domain", "shop.example.com",
                    "--host", "203.0.113.20", "--upstream", "http://127.0.0.1:3000", "--host-key", KEY)
    assert result.exit_code == 0, result.output
    assert "subnet 1" in result.output
    text = stack_file.read_text()
    assert text.startswith(STACK.split("  kokoa:edges:")[0].split("    - name: wiki")[0])
    assert "# Production stack: keep this comment." in text and "# the blog" in text
    assert "# who hears from Let's Encrypt" in text and "secure: AAABAFakeCiphertext" in text
    assert ("    - name: shop\n      domain: shop.example.com\n      subnet: 1\n      host: 203.0.113.20\n"
            f"      upstream: http://127.0.0.1:3000\n      hostKey: {KEY}\n") in text


def test_add_edge_takes_the_next_free_index_of_its_origin(stack_file):
    result = invoke("add-edge", "--stack", "prod", "--name", "edge-2", "--origin", "blog",
                    "--public-ip", "198.51.100.8", "--drained", "--host-key", KEY)
    assert result.exit_code == 0, result.output
    result = invoke("add-edge", "--stack", "prod", "--name", "edge-3", "--origin", "wiki",
                    "--public-ip", "198.51.100.9", "--insecure-any-host-key")
    assert result.exit_code == 0, result.output
    text = stack_file.read_text()
    assert ("- name: edge-2\n      origin: blog\n      publicIp: 198.51.100.8\n      index: 11\n"
            f"      hostKey: {KEY}\n      dns: false\n") in text
    assert ("- name: edge-3\n      origin: wiki\n      publicIp: 198.51.100.9\n      index: 10\n"
            "      insecureAnyHostKey: true\n") in text


@pytest.mark.parametrize("args, message", [
    (["add-edge", "--name", "edge-2", "--origin", "nope", "--public-ip", "198.51.100.8"],
     "origin: no origin is named 'nope'"),
    (["add-edge", "--name", "edge-2", "--origin", "blog", "--public-ip", "198.51.100.7"],
     "publicIp: public IP '198.51.100.7' is already used"),
    (["add-edge", "--name", "edge-2", "--origin", "blog", "--public-ip", "203.0.113.10"],
     "is the address of origin blog"),
    (["add-origin", "--name", "shop", "--domain", "shop.example.com;x", "--host", "203.0.113.20",
      "--upstream", "http://127.0.0.1:1"], "domain: 'shop.example.com;x' is not"),
    (["add-origin", "--name", "blog", "--domain", "b.example.com", "--host", "203.0.113.21",
      "--upstream", "http://127.0.0.1:1"], "name: origin name 'blog' is already used"),
])
def test_invalid_additions_change_nothing(stack_file, args, message):
    result = invoke(*args, "--stack", "prod", "--host-key", OTHER_KEY)
    assert result.exit_code == 1
    assert "nothing changed" in result.output and message in result.output
    assert stack_file.read_text() == STACK


def test_an_edge_cannot_take_a_name_that_formernames_keeps_for_another_node(tmp_path, monkeypatch):
    """`pulumi up` would refuse the file (a former name must be free): so does add-edge, first."""
    text = STACK + "  kokoa:formerNames: {edge-1: edge-old}\n"
    stack_file = stack_in(tmp_path, monkeypatch, text)
    result = invoke("add-edge", "--stack", "prod", "--name", "edge-old", "--origin", "blog",
                    "--public-ip", "198.51.100.8", "--host-key", KEY)
    assert result.exit_code == 1
    assert result.output == ("Error: nothing changed:\nkokoa:formerNames: edge-1: edge-old is the name of a node "
                             "of this stack; a former name must be free\n")
    assert stack_file.read_text() == text
    result = invoke("add-edge", "--stack", "prod", "--name", "edge-new", "--origin", "blog",
                    "--public-ip", "198.51.100.8", "--host-key", KEY)
    assert result.exit_code == 0, result.output


def test_a_stack_without_its_ssh_key_takes_no_entry(tmp_path, monkeypatch):
    """`pulumi up` needs kokoa:sshPrivateKey to reach any host: add-origin says so before writing."""
    text = STACK.replace("  kokoa:sshPrivateKey:\n    secure: AAABAFakeCiphertext\n", "")
    stack_file = stack_in(tmp_path, monkeypatch, text)
    result = invoke("add-origin", "--stack", "prod", "--name", "shop", "--domain", "shop.example.com",
                    "--host", "203.0.113.20", "--upstream", "http://127.0.0.1:3000", "--host-key", KEY)
    assert result.exit_code == 1
    assert ("kokoa: sshPrivateKey: is required to reach the hosts: pulumi config set --secret "
            "kokoa:sshPrivateKey < ~/.ssh/id_ed25519") in result.output
    assert stack_file.read_text() == text


def test_add_needs_a_stack_or_file(stack_file, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no `pulumi` to ask for the selected stack
    monkeypatch.delenv("KOKOA_STACK", raising=False)
    args = ("add-edge", "--name", "e", "--origin", "blog", "--public-ip", "198.51.100.8", "--host-key", KEY)
    result = invoke(*args)
    assert result.exit_code == 2
    assert ("name the stack (-s NAME edits Pulumi.NAME.yaml; or $KOKOA_STACK, or `pulumi stack select NAME`) "
            "or the file (--file PATH)") in result.output
    assert stack_file.read_text() == STACK
    monkeypatch.setenv("KOKOA_STACK", "prod")
    assert invoke(*args).exit_code == 0
    assert "name: e\n" in stack_file.read_text()
    monkeypatch.setenv("KOKOA_STACK", "other")
    assert invoke("add-edge", "-s", "prod", "--name", "f", "--origin", "blog", "--public-ip", "198.51.100.9",
                  "--host-key", OTHER_KEY).exit_code == 0
    assert "name: f\n" in stack_file.read_text()


OUTPUTS = {
    "origins": {}, "edges": {}, "dnsRecords": {}, "healthTargets": [],
    "bundles": {"edge/edge-1": {"wg-origin-0.conf": "[Interface]\nPrivateKey = x\n",
                                "nginx.conf": "events {}\n", "install.sh": "#!/bin/bash\necho hi\n"}},
}


def test_bundle_writes_a_tarball_with_the_right_modes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps(OUTPUTS))
    result = invoke("bundle", "edge/edge-1", "--outputs", str(outputs), "-o", "edge-1.tar.gz")
    assert result.exit_code == 0, result.output
    archive = tmp_path / "edge-1.tar.gz"
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    with tarfile.open(archive) as tar:
        modes = {m.name: stat.S_IMODE(m.mode) for m in tar.getmembers()}
        assert modes == {"install.sh": 0o755, "nginx.conf": 0o644, "wg-origin-0.conf": 0o600}
        # Extraction filters came with Python 3.11.4; Debian 12's python3 is 3.11.2. The archive
        # was just checked member by member: plain files with these names.
        safe = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
        tar.extractall(tmp_path / "unpacked", **safe)
    assert (tmp_path / "unpacked" / "install.sh").read_text() == "#!/bin/bash\necho hi\n"
    assert stat.S_IMODE((tmp_path / "unpacked" / "wg-origin-0.conf").stat().st_mode) == 0o600


def test_bundle_default_name_and_unknown_node(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps(OUTPUTS))
    assert invoke("bundle", "edge/edge-1", "--outputs", str(outputs)).exit_code == 0
    assert (tmp_path / "kokoa-edge-edge-1.tar.gz").exists()
    result = invoke("bundle", "edge/nope", "--outputs", str(outputs))
    assert result.exit_code == 2 and "no bundle 'edge/nope'; known: edge/edge-1" in result.output


def test_bundle_refuses_hidden_secrets_and_bad_files(tmp_path):
    hidden = tmp_path / "hidden.json"
    hidden.write_text(json.dumps(OUTPUTS | {"bundles": "[secret]"}))
    result = invoke("bundle", "edge/edge-1", "--outputs", str(hidden))
    assert result.exit_code == 2 and "--show-secrets" in result.output
    result = invoke("bundle", "edge/edge-1", "--outputs", str(tmp_path / "missing.json"))
    assert result.exit_code == 2 and "cannot read outputs file" in result.output
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    result = invoke("bundle", "edge/edge-1", "--outputs", str(broken))
    assert result.exit_code == 2 and "not valid JSON" in result.output


def test_bundle_without_pulumi_cli_says_what_to_do(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    result = invoke("bundle", "edge/edge-1")
    assert result.exit_code == 2 and "--outputs FILE" in result.output


# --- host keys of added entries -------------------------------------------------------------

ADD_EDGE = ["add-edge", "--stack", "prod", "--name", "edge-2", "--origin", "blog", "--public-ip", "198.51.100.8"]


def test_add_requires_a_host_key_choice(stack_file):
    result = invoke(*ADD_EDGE)
    assert result.exit_code == 2
    assert ("Error: pin the server's SSH host key: pass --host-key 'ssh-ed25519 AAAA...', --scan-host-key "
            "(reads it with ssh-keyscan), or --insecure-any-host-key (throwaway hosts only)") in result.output
    result = invoke("add-origin", "--stack", "prod", "--name", "shop", "--domain", "shop.example.com",
                    "--host", "203.0.113.20", "--upstream", "http://127.0.0.1:3000")
    assert result.exit_code == 2 and "pass --host-key 'ssh-ed25519 AAAA...', --scan-host-key" in result.output
    result = invoke(*ADD_EDGE, "--host-key", KEY, "--insecure-any-host-key")
    assert result.exit_code == 2
    assert "Error: pass only one of --host-key, --insecure-any-host-key" in result.output
    assert stack_file.read_text() == STACK


def test_add_refuses_an_rsa_host_key_saying_why(stack_file, tmp_path):
    key_file = tmp_path / "rsa"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(key_file)], check=True,
                   timeout=60)
    rsa = " ".join(Path(f"{key_file}.pub").read_text().split()[:2])
    result = invoke(*ADD_EDGE, "--host-key", rsa)
    assert result.exit_code == 1
    assert ("kokoa:edges[1] (edge-2): hostKey: "
            + RSA_HOST_KEY.format(scan="ssh-keyscan -t ed25519 198.51.100.8")) in result.output
    assert stack_file.read_text() == STACK


def test_scan_refuses_what_could_read_as_an_option(stack_file):
    result = invoke("add-origin", "--stack", "prod", "--name", "shop", "--domain", "shop.example.com",
                    "--host", "-oProxyCommand=touch /tmp/x", "--upstream", "http://127.0.0.1:3000",
                    "--scan-host-key")
    assert result.exit_code == 1
    assert ("nothing changed: '-oProxyCommand=touch /tmp/x' is not an IPv4 address or host name to scan"
            in result.output)


def test_scan_without_ssh_keyscan_or_past_its_time_says_so(stack_file, tmp_path, monkeypatch):
    from kokoa_infra import host_keys

    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    result = invoke(*ADD_EDGE, "--scan-host-key")
    assert result.exit_code == 1
    assert ("Error: nothing changed: ssh-keyscan is not installed (Debian: apt-get install openssh-client); "
            "or pass the key with --host-key") in result.output
    # A scan that hangs is cut off (ssh-keyscan -T bounds each connection, this the whole run).
    slow = tmp_path / "slow-bin"
    slow.mkdir()
    (slow / "ssh-keyscan").write_text("#!/bin/sh\nexec sleep 30\n")
    (slow / "ssh-keyscan").chmod(0o755)
    monkeypatch.setenv("PATH", f"{slow}:/usr/bin:/bin")
    monkeypatch.setattr(host_keys, "PROCESS_TIMEOUT", 1)
    started = time.monotonic()
    result = invoke(*ADD_EDGE, "--scan-host-key")
    assert time.monotonic() - started < 10
    assert result.exit_code == 1
    assert ("Error: nothing changed: `ssh-keyscan -T 5 -p 22 -t ed25519,ecdsa 198.51.100.8` did not finish "
            "within 1 s") in result.output
    assert stack_file.read_text() == STACK
