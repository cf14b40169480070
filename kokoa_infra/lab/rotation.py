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
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping

import click

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
                   echo=click.echo):
    """Rotate the lab's operator key with the lab up; returns the deployment made with the new key."""
    from kokoa_infra.lab import cli as lab_cli  # its `up` deploys; it also registers this command

    stack_file = Path(stack_file or lab_cli.STACK_FILE)
    base = {**lab_cli.load_stack(stack_file), **(overrides or {})}
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
    deployment = lab_cli.up(lab, overrides, stack_file, echo=echo)
    echo("revoke the old key (over SSH with the new key)")
    revoke(lab, servers, runner, current, _public_line(old), echo)
    for suffix in ("", ".pub"):
        Path(f"{old}{suffix}").unlink(missing_ok=True)
    return deployment


@click.command("rotate-ssh-key")
@click.option("--stack-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Lab stack config (default: stacks/Pulumi.lab.yaml).")
@click.option("--lab-dir", default=None, help="The lab's directory (default: /var/lib/kokoa-lab).")
@click.option("--prefix", default=None, help="Name prefix of the lab's network namespaces (default: kokoa-).")
def rotate_ssh_key_command(stack_file: str | None, lab_dir: str | None, prefix: str | None) -> None:
    """New operator SSH key: authorize it on every server, deploy with it, revoke the old one."""
    from kokoa_infra.lab import cli as lab_cli

    started = time.monotonic()
    the_lab = lab_cli._lab(lab_dir or str(lab_cli.LAB_DIR), prefix or lab_cli.PREFIX)
    if not (the_lab.dir / "status.json").exists():
        raise click.ClickException(f"no lab in {the_lab.dir}: run `kokoa lab up` first")
    # Deploy the servers the way they already run (a lab running the other way would be rebuilt).
    modes = {h.get("mode", "plain") for h in the_lab.record()["hosts"].values() if h["role"] in ("origin", "edge")}
    if len(modes) == 1:
        the_lab.init = modes.pop()
    if shutil.which("ssh-keygen") is None:
        raise click.ClickException("ssh-keygen is missing (`make setup` installs it)")
    try:
        with lab_cli.exclusive(the_lab.dir):
            rotate_ssh_key(the_lab, stack_file=Path(stack_file) if stack_file else None)
    except LabError as exc:
        raise click.ClickException(f"{exc}\n`kokoa lab rotate-ssh-key` again carries on") from exc
    click.echo(f"The operator key is rotated ({time.monotonic() - started:.0f}s); the old one is revoked.")
