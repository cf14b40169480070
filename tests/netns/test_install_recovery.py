"""A first install that stops at any step leaves a host that removing the node cleans.

Each case runs a rendered install.sh for real, with one tool made to fail, and then the
program's own delete command (what `pulumi up` runs when the node is removed), in a
throwaway host: a fresh network namespace (nftables, WireGuard, listeners), a mount
namespace where /etc and /var are overlays on a tmpfs and /run is a tmpfs (nothing the
scripts write reaches this machine; no systemd there, so the scripts take their plain
path), and a PID namespace (the daemons they start end with it).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from kokoa_infra.mocked_program import run_program
from kokoa_infra.render import CERT_EXPORT_DIR, INSTALL_DIR
from tests.support.stacks import BASE_CONFIG

HARNESS = r"""
set -u
mount -t tmpfs tmpfs "$SANDBOX"
mkdir -p "$SANDBOX"/etc-upper "$SANDBOX"/etc-work "$SANDBOX"/var-upper "$SANDBOX"/var-work
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$SANDBOX/etc-upper,workdir=$SANDBOX/etc-work" /etc
mount -t overlay overlay -o "lowerdir=/var,upperdir=$SANDBOX/var-upper,workdir=$SANDBOX/var-work" /var
mount -t tmpfs tmpfs /run
cp -p /etc/nginx/nginx.conf "$SANDBOX/nginx.conf.before"

KOKOA_TEST_BREAK=1 bash ${KOKOA_TEST_TRACE:+-x} "$BUNDLE/install.sh" >"$SANDBOX/install.log" 2>&1
echo "install=$?"
sed 's/^/install: /' "$SANDBOX/install.log"
[ -z "$CHECK" ] || bash -c "$CHECK" 2>&1 | sed 's/^/check: /'
sh -c "$DELETE" >"$SANDBOX/delete.log" 2>&1
echo "delete=$?"
sed 's/^/delete: /' "$SANDBOX/delete.log"

# wireguard-go ends once its interface is gone.
for _ in 1 2 3 4 5 6 7 8 9 10; do pgrep -x wireguard-go >/dev/null || break; sleep 0.2; done
nft list table inet kokoa >/dev/null 2>&1 && echo "left: table inet kokoa"
ip link show dev "$IFACE" >/dev/null 2>&1 && echo "left: interface $IFACE"
pgrep -x wireguard-go >/dev/null && echo "left: wireguard-go"
pgrep -x nginx >/dev/null && echo "left: nginx"
pgrep -f '^kokoa-' >/dev/null && echo "left: a scheduled job"
for path in $PATHS; do [ -e "$path" ] && echo "left: $path"; done
cmp -s /etc/nginx/nginx.conf "$SANDBOX/nginx.conf.before" || echo "left: a changed /etc/nginx/nginx.conf"
exit 0
"""

STUB = """#!/bin/sh
if [ -n "${{KOKOA_TEST_BREAK:-}}" ]; then echo "broken for the test: {name}" >&2; exit 1; fi
exec {real} "$@"
"""

DOMAIN = BASE_CONFIG["kokoa:origins"][0]["domain"]
NODES = {
    "edge": ("edge/edge-tokyo-1", "edge-tokyo-1-install", "wg-origin-0",
             [INSTALL_DIR, "/etc/wireguard/wg-origin-0.conf", "/etc/kokoa/firewall.nft",
              f"/etc/letsencrypt/live/{DOMAIN}", "/etc/nginx/nginx.conf.kokoa-original"]),
    "origin": ("origin/blog", "blog-install", "wg0",
               [INSTALL_DIR, "/etc/wireguard/wg0.conf", "/etc/kokoa/firewall.nft", "/etc/kokoa/gateway.conf",
                CERT_EXPORT_DIR, "/var/lib/kokoa/tls-key-holders", "/etc/logrotate.d/kokoa-gateway"]),
}
# Each step of the install, in order, broken by making its first tool fail.
STEPS = {"edge": ["nft", "wg-quick", "openssl", "nginx", None],
         "origin": ["nft", "wg-quick", "useradd", "nginx", None]}


@pytest.fixture(scope="module")
def program():
    return run_program(BASE_CONFIG)


def install_then_remove(program, role: str, broken: str | None, netns: str, tmp_path: Path,
                        check: str = "") -> tuple[list[str], list[str]]:
    """(what is left after the install, with `broken` failing, and the delete command; the
    lines `check` printed, run between the two). KOKOA_TEST_TRACE=1 traces the install (bash -x)."""
    for tool in ("unshare", "wg-quick", "wireguard-go", "nginx", "nft", "pgrep", "logrotate"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (make setup installs it)")
    node, command, iface, paths = NODES[role]
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name, text in program.outputs["bundles"][node].items():
        (bundle / name).write_text(text)
        (bundle / name).chmod(0o755 if name.endswith(".sh") else 0o600)
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    # Never apt: every package is already here, and the test leaves no network.
    (stubs / "apt-get").write_text("#!/bin/sh\necho 'no apt in this test' >&2\nexit 1\n")
    if broken:
        (stubs / broken).write_text(STUB.format(name=broken, real=shutil.which(broken)))
    for stub in stubs.iterdir():
        stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "sandbox").mkdir()
    (tmp_path / "harness.sh").write_text(HARNESS)
    env = {"PATH": f"{stubs}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "SANDBOX": str(tmp_path / "sandbox"), "BUNDLE": str(bundle), "IFACE": iface,
           "PATHS": " ".join(paths), "KOKOA_TEST_TRACE": os.environ.get("KOKOA_TEST_TRACE", ""),
           "DELETE": program.named(command).inputs["delete"], "CHECK": check}
    result = subprocess.run(["ip", "netns", "exec", netns, "unshare", "--mount", "--pid", "--fork", "--mount-proc",
                             "--propagation", "private", "env", "-i", *(f"{k}={v}" for k, v in env.items()),
                             "bash", str(tmp_path / "harness.sh")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    install_status = next(line for line in lines if line.startswith("install="))
    if broken:
        # The install reached the broken step and stopped there.
        assert any(line.startswith("install: ") and f"broken for the test: {broken}" in line for line in lines), \
            result.stdout
        assert install_status != "install=0", result.stdout
    else:
        assert install_status == "install=0", result.stdout
    assert "delete=0" in lines, result.stdout
    return ([line for line in lines if line.startswith("left: ")],
            [line[len("check: "):] for line in lines if line.startswith("check: ")])


@pytest.mark.parametrize("role, broken", [(role, step) for role, steps in STEPS.items() for step in steps],
                         ids=[f"{role}-{step or 'complete'}" for role, steps in STEPS.items() for step in steps])
def test_removing_a_node_cleans_a_host_whose_install_stopped_at_any_step(program, role, broken, netns, tmp_path):
    left, _ = install_then_remove(program, role, broken, netns, tmp_path)
    assert left == []



LOGS = "/var/log/kokoa"
GATEWAY_LOGS_CHECK = f"""
stat -c 'dir %a %U:%G' {LOGS}
for f in {LOGS}/gateway-*.log; do stat -c 'file %n %a' "$f"; done
for f in {LOGS}/gateway-*.log; do echo "a line to rotate" >> "$f"; done
logrotate -f -s "$SANDBOX/logrotate.state" /etc/logrotate.d/kokoa-gateway && echo rotated
sleep 0.5
for f in {LOGS}/gateway-*.log {LOGS}/gateway-*.log.1; do stat -c 'after %n %a' "$f"; done
kill -0 "$(cat /run/kokoa-gateway.pid)" && echo "gateway running"
"""


def test_the_gateways_logs_are_0640_in_a_0750_directory_and_rotate(program, netns, tmp_path):
    left, checked = install_then_remove(program, "origin", None, netns, tmp_path, check=GATEWAY_LOGS_CHECK)
    assert left == []
    logs = ("gateway-access.log", "gateway-error.log", "gateway-relay.log")  # blog relays
    assert checked[0] == "dir 750 root:adm", checked
    assert sorted(line for line in checked if line.startswith("file ")) == [
        f"file {LOGS}/{name} 640" for name in logs]
    assert "rotated" in checked and "gateway running" in checked, checked
    after = sorted(line for line in checked if line.startswith("after "))
    # Each log rotated to .1, and a new one made 0640 (never 0644, whoever creates it).
    assert after == sorted([f"after {LOGS}/{name} 640" for name in logs]
                           + [f"after {LOGS}/{name}.1 640" for name in logs]), checked
