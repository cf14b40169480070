"""`kokoa lab rotate-ssh-key`: a new operator key, authorized everywhere, deployed with, the old one revoked.

The same steps as for a real stack (docs/operations.md): authorize the new public key
on every server over SSH with the old key; deploy with the new key (`pulumi up` with
the new `kokoa:sshPrivateKey`: every command is an in-place update on the new
connection, so nothing is uninstalled or restarted); revoke the old key over SSH with
the new one. Each step can be repeated; an interrupted rotation carries on from where
it stopped (`operator/id_ed25519.new` and `.old` say where that was).
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import Any, Mapping

from kokoa_infra.lab.deploy import STACK_FILE, load_stack, up
from kokoa_infra.lab.executor import Completed, SshRunner
from kokoa_infra.lab.hosts import topology
from kokoa_infra.lab.lab import Lab
from kokoa_infra.lab.processes import LabError


def _public_line(key: Path) -> str:
    """`type base64` of a key pair's public half (the comment left out, so lines compare)."""
    return " ".join(Path(f"{key}.pub").read_text().split()[:2])


def authorized_keys_path(lab: Lab, netns: str) -> str:
    """Where the server's sshd reads root's keys: ~/.ssh on a systemd machine, the lab's file on a plain host."""
    if lab.init_system(netns) == "plain":
        return str(lab.host_dir(netns) / "authorized_keys")
    return "/root/.ssh/authorized_keys"


def _on_server(lab: Lab, runner: SshRunner, host, key: Path, script: str) -> Completed:
    connection = {"host": host.ip, "port": 22, "user": "root", "privateKey": key.read_text(),
                  "hostKey": lab.host_key(host.netns)}
    result = runner.run(connection, script, None, {})
    if result.returncode != 0:
        raise LabError(f"{host.name}: `{script.splitlines()[0]}...` over SSH failed ({result.returncode}): "
                       f"{result.stderr.strip()}")
    return result


def authorize(lab: Lab, servers, runner: SshRunner, key: Path, public: str, echo) -> None:
    for host in servers:
        path = shlex.quote(authorized_keys_path(lab, host.netns))
        line = shlex.quote(public)
        _on_server(lab, runner, host, key,
                   f"f={path}; mkdir -p \"$(dirname \"$f\")\"; touch \"$f\"; chmod 600 \"$f\"; "
                   f"grep -qF {line} \"$f\" || printf '%s\\n' {line} >> \"$f\"")
        echo(f"  authorized the new key on {host.name}")


def revoke(lab: Lab, servers, runner: SshRunner, key: Path, public: str, echo) -> None:
    for host in servers:
        path = shlex.quote(authorized_keys_path(lab, host.netns))
        # Rewritten in place (same file, mode and owner); the key's line only goes.
        _on_server(lab, runner, host, key,
                   f"f={path}; kept=$(grep -vF {shlex.quote(public)} \"$f\" || true); "
                   "printf '%s\\n' \"$kept\" > \"$f\"")
        echo(f"  revoked the old key on {host.name}")


def rotate_ssh_key(lab: Lab, overrides: Mapping[str, Any] | None = None, stack_file: Path | None = None,
                   echo=print):
    """Rotate the lab's operator key with the lab up; returns the deployment made with the new key."""
    stack_file = Path(stack_file or STACK_FILE)
    base = {**load_stack(stack_file), **(overrides or {})}
    topo = topology(base, lab.prefix)
    servers = [h for h in topo.hosts if h.is_server]
    runner = SshRunner(topo.one("client").netns, lab.dir / "tmp")
    current, new, old = lab.operator_key, Path(f"{lab.operator_key}.new"), Path(f"{lab.operator_key}.old")
    if not old.exists():
        if not new.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "kokoa-lab-operator",
                            "-f", str(new)], check=True, capture_output=True)
        echo("authorize the new key (over SSH with the current key)")
        authorize(lab, servers, runner, current, _public_line(new), echo)
        # The old pair is kept as .old (hard links) until it is revoked; then the new one takes its name.
        for suffix in ("", ".pub"):
            Path(f"{old}{suffix}").unlink(missing_ok=True)
            os.link(f"{current}{suffix}", f"{old}{suffix}")
        os.replace(f"{new}.pub", f"{current}.pub")
        os.replace(new, current)
    echo("deploy with the new key")
    deployment = up(lab, overrides, stack_file, echo=echo)
    echo("revoke the old key (over SSH with the new key)")
    revoke(lab, servers, runner, current, _public_line(old), echo)
    for suffix in ("", ".pub"):
        Path(f"{old}{suffix}").unlink(missing_ok=True)
    return deployment
