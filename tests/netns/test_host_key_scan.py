"""`kokoa add-edge/add-origin --scan-host-key` against real sshd servers in a throwaway namespace."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kokoa_infra.host_keys import RSA_HOST_KEY
from tests.unit.test_cli import stack_file  # noqa: F401 (a fixture)

# A real sshd per test server, in a throwaway namespace; ssh-keyscan (run by the kokoa CLI
# in the same namespace) reaches it on an address of that namespace's loopback device.
EDGE_IP, ORIGIN_IP, RSA_ONLY_IP = "198.51.100.50", "203.0.113.60", "198.51.100.51"


KOKOA = Path(sys.executable).with_name("kokoa")


def start_sshd(netns: str, directory: Path, address: str, port: int, key_types: list[str]) -> subprocess.Popen:
    directory.mkdir()
    config = [f"Port {port}", f"ListenAddress {address}", f"PidFile {directory}/sshd.pid", "UsePAM no",
              "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitRootLogin no"]
    for key_type in key_types:
        key = directory / f"ssh_host_{key_type}_key"
        subprocess.run(["ssh-keygen", "-q", "-t", key_type, "-N", "", "-C", "", "-f", str(key)], check=True,
                       timeout=60)
        config.append(f"HostKey {key}")
    (directory / "sshd_config").write_text("\n".join(config) + "\n")
    # sshd needs /run/sshd (privilege separation): a private /run, so the machine's is untouched.
    script = (f"mount -t tmpfs tmpfs /run && mkdir -m 0755 /run/sshd && "
              f"exec /usr/sbin/sshd -D -f {directory}/sshd_config -E {directory}/sshd.log")
    server = subprocess.Popen(["ip", "netns", "exec", netns, "unshare", "--mount", "--propagation", "private",
                               "sh", "-c", script])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # bounded: 10 s
        listening = subprocess.run(["ip", "netns", "exec", netns, "ss", "-Hltn", f"sport = :{port}"],
                                   capture_output=True, text=True, timeout=10).stdout
        if f"{address}:{port}" in listening:
            return server
        if server.poll() is not None:
            break
        time.sleep(0.1)
    server.kill()
    log = directory / "sshd.log"
    pytest.fail(f"sshd on port {port} did not start: {log.read_text() if log.exists() else 'no log'}")


def kokoa_in(netns: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns, str(KOKOA), *args], capture_output=True, text=True,
                          timeout=120)


def public_key(directory: Path, key_type: str) -> str:
    return " ".join((directory / f"ssh_host_{key_type}_key.pub").read_text().split()[:2])


def fingerprint(directory: Path, key_type: str) -> str:
    result = subprocess.run(["ssh-keygen", "-lf", str(directory / f"ssh_host_{key_type}_key.pub")],
                            capture_output=True, text=True, check=True, timeout=30)
    return result.stdout.split()[1]  # SHA256:...


def test_scan_host_key_reads_a_real_sshd(netns, stack_file, tmp_path):
    for tool in ("sshd", "ssh-keyscan", "ssh-keygen", "unshare", "ss"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            pytest.skip(f"{tool} is not installed (make setup installs it)")
    servers = {"all": (EDGE_IP, 2222, ["ed25519", "ecdsa", "rsa"]), "ecdsa": (ORIGIN_IP, 2223, ["ecdsa"]),
               "rsa": (RSA_ONLY_IP, 2224, ["rsa"])}
    for address, _, _ in servers.values():
        subprocess.run(["ip", "-n", netns, "addr", "add", f"{address}/32", "dev", "lo"], check=True)
    started = []
    try:
        for name, (address, port, key_types) in servers.items():
            started.append(start_sshd(netns, tmp_path / name, address, port, key_types))

        # ed25519 first, whatever else the server offers; its fingerprint on stderr.
        result = kokoa_in(netns, "add-edge", "--file", str(stack_file), "--name", "edge-2", "--origin", "blog",
                          "--public-ip", EDGE_IP, "--ssh-port", "2222", "--scan-host-key")
        assert result.returncode == 0, result.stderr
        ed25519 = public_key(tmp_path / "all", "ed25519")
        assert (f"    - name: edge-2\n      origin: blog\n      publicIp: {EDGE_IP}\n      index: 11\n"
                f"      sshPort: 2222\n      hostKey: {ed25519}\n") in stack_file.read_text()
        assert (f"host key of {EDGE_IP} port 2222: 256 {fingerprint(tmp_path / 'all', 'ed25519')} "
                "no comment (ED25519)\ncompare it with the server's console "
                "(ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub) before `pulumi up`\n") in result.stderr
        assert "SHA256:" not in result.stdout

        # ECDSA when there is no ed25519 key (add-origin scans --host).
        result = kokoa_in(netns, "add-origin", "--file", str(stack_file), "--name", "shop",
                          "--domain", "shop.example.com", "--host", ORIGIN_IP,
                          "--ssh-port", "2223", "--upstream", "http://127.0.0.1:3000", "--scan-host-key")
        assert result.returncode == 0, result.stderr
        ecdsa = public_key(tmp_path / "ecdsa", "ecdsa")
        assert ecdsa.startswith("ecdsa-sha2-nistp256 ") and f"      hostKey: {ecdsa}\n" in stack_file.read_text()
        assert (f"host key of {ORIGIN_IP} port 2223: 256 {fingerprint(tmp_path / 'ecdsa', 'ecdsa')} "
                "no comment (ECDSA)\ncompare it with the server's console "
                "(ssh-keygen -lf /etc/ssh/ssh_host_ecdsa_key.pub) before `pulumi up`\n") in result.stderr

        before = stack_file.read_text()
        # Only RSA: refused, saying why.
        result = kokoa_in(netns, "add-edge", "--file", str(stack_file), "--name", "edge-3", "--origin", "wiki",
                          "--public-ip", RSA_ONLY_IP, "--ssh-port", "2224",
                          "--scan-host-key")
        assert result.returncode == 1
        reason = RSA_HOST_KEY.format(scan=f"ssh-keyscan -t ed25519 -p 2224 {RSA_ONLY_IP}")
        assert (f"Error: nothing changed: {RSA_ONLY_IP} port 2224 offers only an RSA host key: {reason}. Give the "
                "server an ed25519 host key (ssh-keygen -A, then reload sshd), or pass --insecure-any-host-key "
                "for a throwaway host\n") in result.stderr
        # Nothing listening: refused, saying what to check.
        result = kokoa_in(netns, "add-edge", "--file", str(stack_file), "--name", "edge-3", "--origin", "wiki",
                          "--public-ip", "198.51.100.52", "--host", EDGE_IP, "--ssh-port", "2225",
                          "--scan-host-key")
        assert result.returncode == 1
        assert (f"Error: nothing changed: ssh-keyscan read no ed25519 or ECDSA host key from {EDGE_IP} port "
                "2225 within 5 s") in result.stderr
        assert "is sshd running there and reachable from here? Or pass the key with --host-key" in result.stderr
        assert stack_file.read_text() == before
    finally:
        for server in started:
            server.kill()
            server.wait(timeout=10)
