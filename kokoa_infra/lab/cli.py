"""`kokoa lab up | status | down`: the whole system on this machine, deployed by the program's own SSH commands."""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import click
from ruamel.yaml import YAML

from kokoa_infra.atomic_file import write_private
from kokoa_infra.lab.deployment import apply_resources, lab_dns_config
from kokoa_infra.lab.executor import ExecutorError, Report
from kokoa_infra.lab.hosts import DEFAULT_INIT, INIT_SYSTEMS, PREFIX, Topology, topology
from kokoa_infra.lab.lab import LAB_DIR, Lab, lab_unavailable
from kokoa_infra.lab.processes import LabError
from kokoa_infra.mockrun import PROJECT_DIR, ProgramFailed, run_program

STACK_FILE = PROJECT_DIR / "stacks" / "Pulumi.lab.yaml"


def load_stack(path: Path = STACK_FILE) -> dict[str, Any]:
    """The `config:` mapping of a stack file, as plain Python values."""
    data = YAML(typ="safe").load(Path(path).read_text()) or {}
    return dict(data.get("config") or {})


def generated_config(base: Mapping[str, Any], topo: Topology, lab: Lab) -> dict[str, Any]:
    """The stack config with what only exists once the hosts do: the SSH key, host keys, the ACME CA."""
    config = {k: copy.deepcopy(v) for k, v in base.items() if not k.startswith("lab:")}
    config["kokoa:sshPrivateKey"] = lab.operator_key.read_text()
    if topo.one("acme") is not None:
        config["kokoa:acmeCaBundle"] = lab.acme_cert.read_text()
    for key, role in (("kokoa:origins", "origin"), ("kokoa:edges", "edge")):
        for entry in config.get(key, []):
            entry["hostKey"] = lab.host_key(topo.server(role, entry["name"]).netns)
    return config


def lab_status(topo: Topology, lab: Lab) -> dict[str, Any]:
    """What `kokoa lab status --json` prints, and what tests use to reach the lab."""
    return {
        "client": topo.one("client").netns,
        "caBundle": str(lab.ca_bundle),
        "resolver": topo.one("acme").ip if topo.one("acme") else None,
        "origins": [{"name": h.name, "domain": h.domain, "netns": h.netns, "publicIp": h.ip,
                     "init": lab.init_system(h.netns)} for h in topo.of_role("origin")],
        "edges": [{"name": h.name, "origin": h.origin, "netns": h.netns, "publicIp": h.ip,
                   "init": lab.init_system(h.netns)} for h in topo.of_role("edge")],
    }


@dataclass(frozen=True)
class Deployment:
    """The outcome of one `up`: the lab status, what the executor ran, the stack outputs."""

    status: dict[str, Any]
    report: Report
    outputs: dict[str, Any]


def up(lab: Lab, overrides: Mapping[str, Any] | None = None, stack_file: Path = STACK_FILE,
       echo=click.echo, prune: bool = True) -> Deployment:
    """Hosts up, program evaluated, its commands applied over SSH. Safe to repeat and to resume.

    `prune=False` keeps the hosts of removed nodes (after their delete commands ran), to look at them.
    """
    base = {**load_stack(stack_file), **(overrides or {})}
    topo = topology(base, lab.prefix)
    echo(f"hosts ({lab.dir})")
    lab.ensure(topo, echo)
    config = {**generated_config(base, topo, lab), **lab_dns_config(lab, topo, echo)}
    buffer = io.StringIO()
    YAML().dump({"config": config}, buffer)
    write_private(lab.dir / "Pulumi.lab.yaml", buffer.getvalue())
    echo("program")
    try:
        program = run_program(config, stack="lab", seed=lab.seed())
    except ProgramFailed as exc:
        details = "".join(f"\n  {error}" for error in exc.errors)
        raise LabError(f"the program failed on {lab.dir / 'Pulumi.lab.yaml'}: {exc}{details}") from exc
    # The A records Cloudflare would hold, served by the lab's DNS for pebble's validation.
    lab.set_dns(topo, program.outputs.get("dnsRecords", {}))
    echo("commands")
    report = apply_resources(lab, topo, program.resources, echo)
    echo("  " + (", ".join(f"{n} {action}" for action, n in sorted(report.counts.items())) or "no commands"))
    if prune:
        lab.prune(topo, echo)
    write_private(lab.dir / "outputs.json", json.dumps(program.outputs, indent=1, sort_keys=True))
    status = lab_status(topo, lab)
    (lab.dir / "status.json").write_text(json.dumps(status, indent=1) + "\n")
    return Deployment(status, report, program.outputs)


def how_to_reach(status: Mapping[str, Any]) -> str:
    lines = [f"From the client namespace ({status['client']}), through each edge:"]
    domains = {o["name"]: o["domain"] for o in status["origins"]}
    for edge in status["edges"]:
        domain = domains[edge["origin"]]
        lines.append(f"  ip netns exec {status['client']} curl --cacert {status['caBundle']} "
                     f"--resolve {domain}:443:{edge['publicIp']} https://{domain}/")
    return "\n".join(lines)


def verify_sites(lab: Lab, status: Mapping[str, Any], seconds: int = 90) -> dict[str, str]:
    """Wait (bounded) until every edge serves its site with a certificate the lab CA verifies.

    Edges serve a placeholder until their refresh job fetches the origin's certificate,
    so right after the deployment this may take one refresh interval. Returns
    {edge: first line of the body, or the last error}.
    """
    domains = {o["name"]: o["domain"] for o in status["origins"]}
    results: dict[str, str] = {}
    pending = list(status["edges"])
    deadline = time.monotonic() + seconds
    while pending:
        for edge in list(pending):
            domain = domains[edge["origin"]]
            proc = lab.on_host(status["client"], [
                "curl", "-sS", "--max-time", "5", "--cacert", status["caBundle"],
                "--resolve", f"{domain}:443:{edge['publicIp']}", f"https://{domain}/"])
            body = (proc.stdout or "").strip().splitlines()
            results[edge["name"]] = body[0] if proc.returncode == 0 and body else (proc.stderr or "").strip()
            if proc.returncode == 0:
                pending.remove(edge)
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(2)
    if pending:
        failed = ", ".join(f"{e['name']} ({results[e['name']]})" for e in pending)
        raise LabError(f"no verified HTTPS after {seconds}s through {failed}")
    return results


def lock_path(lab_dir: Path) -> Path:
    return Path("/run/lock") / f"kokoa-lab-{hashlib.sha256(str(lab_dir.resolve()).encode()).hexdigest()[:12]}.lock"


@contextlib.contextmanager
def exclusive(lab_dir: Path):
    """One `up` or `down` at a time per lab: two at once would fight over the same hosts.

    The lock lives in /run/lock (gone at reboot), not in the lab directory that `down` removes.
    """
    path = lock_path(lab_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise click.ClickException(f"another `kokoa lab up` or `down` is running on {lab_dir}; "
                                       "wait for it to finish") from None
        yield


def _lab(lab_dir: str, prefix: str, init: str = DEFAULT_INIT) -> Lab:
    if os.geteuid() != 0:
        raise click.ClickException("kokoa lab needs root (network namespaces, mounts, /var/lib)")
    try:
        return Lab(Path(lab_dir), prefix, init)
    except LabError as exc:
        raise click.ClickException(str(exc)) from exc


lab_dir_option = click.option("--lab-dir", default=str(LAB_DIR), show_default=True,
                              help="Where the lab keeps its keys, state, per-host dirs and outputs.")
prefix_option = click.option("--prefix", default=PREFIX, show_default=True,
                             help="Name prefix of the lab's network namespaces.")


@click.group()
def lab() -> None:
    """Run the whole system on this machine: namespace hosts, SSH, WireGuard, nginx, a local ACME server."""


@lab.command("up")
@click.option("--stack-file", type=click.Path(exists=True, dir_okay=False), default=str(STACK_FILE),
              show_default=True, help="Lab stack config (topology); secrets are generated, not read.")
@lab_dir_option
@prefix_option
@click.option("--init", "init", type=click.Choice(INIT_SYSTEMS), default=DEFAULT_INIT, show_default=True,
              help="How origins and edges run: `systemd` boots each as a systemd machine (systemd-nspawn), "
                   "as real servers run; `plain` makes sshd the init of its namespaces (no systemd). "
                   "A lab running the other way is rebuilt.")
def up_command(stack_file: str, lab_dir: str, prefix: str, init: str) -> None:
    """Bring the lab up (or bring it back in line): hosts, then the program's commands over SSH."""
    started = time.monotonic()
    the_lab = _lab(lab_dir, prefix, init)
    reason = lab_unavailable(f"{prefix}probe", init)
    if reason:
        raise click.ClickException(reason)
    try:
        with exclusive(the_lab.dir):
            status = up(the_lab, stack_file=Path(stack_file)).status
            click.echo("sites (verified HTTPS from the client, through each edge)")
            for edge, answer in verify_sites(the_lab, status).items():
                click.echo(f"  {edge}: {answer}")
    except ExecutorError as exc:
        click.echo(f"error: {exc}", err=True)
        click.echo(f"command logs: {the_lab.dir / 'logs'}; `kokoa lab up` again carries on", err=True)
        sys.exit(exc.exit_code if 0 < exc.exit_code < 256 else 1)
    except LabError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"\nThe lab is up ({time.monotonic() - started:.0f}s).")
    click.echo(how_to_reach(status))


@lab.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status JSON (hosts and CA bundle).")
@lab_dir_option
@prefix_option
def status_command(as_json: bool, lab_dir: str, prefix: str) -> None:
    """Show the lab's hosts and whether each namespace and sshd is alive."""
    the_lab = _lab(lab_dir, prefix)
    status_file = the_lab.dir / "status.json"
    if not status_file.exists():
        raise click.ClickException(f"no lab in {the_lab.dir}: run `kokoa lab up`")
    status = json.loads(status_file.read_text())
    if as_json:
        click.echo(json.dumps(status, indent=1))
        return
    live = the_lab.liveness()
    word = {True: "up", False: "DOWN"}
    rows = [("ROLE", "NAME", "NETNS", "ADDRESS", "INIT", "NAMESPACE", "SSHD")]
    roles = ("client", "acme", "origin", "edge")
    for netns, host in sorted(live.items(), key=lambda item: (roles.index(item[1]["role"]), item[0])):
        sshd = word[host["sshd"]] if "sshd" in host else "-"
        rows.append((host["role"], host["name"], netns, host["ip"], host.get("init", "plain"),
                     word[host["netns"]], sshd))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    problems = the_lab.problems()
    click.echo("health: " + ("ok" if not problems else "; ".join(problems) + " (run `kokoa lab up`)"))
    click.echo(f"CA bundle: {status['caBundle']}")
    click.echo(how_to_reach(status))


@lab.command("down")
@lab_dir_option
@prefix_option
def down_command(lab_dir: str, prefix: str) -> None:
    """Remove every namespace, process and file of the lab. Safe to run twice."""
    the_lab = _lab(lab_dir, prefix)
    with exclusive(the_lab.dir):
        left = the_lab.down()
    if left:
        raise click.ClickException("still there after down: " + ", ".join(left))
    click.echo("The lab is down.")


# `kokoa lab rotate-ssh-key` (it deploys with `up` above).
from kokoa_infra.lab.rotation import rotate_ssh_key_command  # noqa: E402

lab.add_command(rotate_ssh_key_command)
