"""`kokoa lab up | status | health | down | rotate-ssh-key`: the whole system on this machine.

Deploying (`up`) imports the program and Pulumi's SDK; they are imported when a command
runs, so that `kokoa --help` and `kokoa health` never load them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import click

from kokoa_infra.conventions import CONTEXT, CouldNotRun, Failed, epilog, heartbeat
from kokoa_infra.lab import ORDER_SEED_ENV
from kokoa_infra.lab.hosts import DEFAULT_INIT, INIT_SYSTEMS, PREFIX
from kokoa_infra.lab.lab import LAB_DIR, Lab, lab_unavailable
from kokoa_infra.lab.processes import LabError
from kokoa_infra.project import PROJECT_DIR, PROJECT_DIR_ENV
from kokoa_infra.tables import format_table

# Also deploy.STACK_FILE (that module imports Pulumi; this one is read for --help).
STACK_FILE = PROJECT_DIR / "stacks" / "Pulumi.lab.yaml"
LAB_ENVIRONMENT = {
    PROJECT_DIR_ENV: "the project whose stacks/Pulumi.lab.yaml and program the lab uses (default: "
                     "this checkout, else the current directory)",
    ORDER_SEED_ENV: "`kokoa lab up`: replay the command order of an earlier run (each up prints its seed)",
}
COULD_NOT_RUN = "not root, a tool or namespace support missing, or another up or down runs on the lab"


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
            raise CouldNotRun(f"another `kokoa lab up` or `down` is running on {lab_dir}; "
                              "wait for it to finish") from None
        yield


def _lab(lab_dir: str, prefix: str, init: str = DEFAULT_INIT) -> Lab:
    if os.geteuid() != 0:
        raise CouldNotRun("kokoa lab needs root (network namespaces, mounts, /var/lib)")
    try:
        return Lab(Path(lab_dir), prefix, init)
    except LabError as exc:
        raise CouldNotRun(str(exc)) from exc


lab_dir_option = click.option("--lab-dir", default=str(LAB_DIR), show_default=True,
                              help="Where the lab keeps its keys, state, per-host dirs and outputs.")
prefix_option = click.option("--prefix", default=PREFIX, show_default=True,
                             help="Name prefix of the lab's network namespaces.")


@click.group(context_settings=CONTEXT, epilog=epilog("the command failed", COULD_NOT_RUN, LAB_ENVIRONMENT))
def lab() -> None:
    """Run the whole system on this machine: namespace hosts, SSH, WireGuard, nginx, a local ACME server.

    Progress goes to stderr, results to stdout.
    """


@lab.command("up", epilog=epilog("a step of the deployment failed, or a site did not answer over verified "
                                 "HTTPS in time (`kokoa lab up` again carries on)", COULD_NOT_RUN,
                                 LAB_ENVIRONMENT))
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
    from kokoa_infra.lab.deploy import how_to_reach, up, verify_sites
    from kokoa_infra.lab.executor import ExecutorError

    started = time.monotonic()
    the_lab = _lab(lab_dir, prefix, init)
    reason = lab_unavailable(f"{prefix}probe", init)
    if reason:
        raise CouldNotRun(reason)
    try:
        with exclusive(the_lab.dir), heartbeat() as say:
            status = up(the_lab, stack_file=Path(stack_file), echo=say).status
            say("sites (verified HTTPS from the client, through each edge)")
            answers = verify_sites(the_lab, status, echo=say)
    except ExecutorError as exc:
        # A remote command's own exit code stays in the message: the command's is 1.
        raise Failed(f"{exc}\ncommand logs: {the_lab.dir / 'logs'}; `kokoa lab up` again carries on") from exc
    except LabError as exc:
        raise Failed(str(exc)) from exc
    for edge, answer in answers.items():
        click.echo(f"{edge}: {answer}")
    click.echo(f"\nThe lab is up ({time.monotonic() - started:.0f}s).")
    click.echo(how_to_reach(status))


@lab.command("status", epilog=epilog("the lab has a problem (without --json)", "no lab here, or not root",
                                     LAB_ENVIRONMENT))
@click.option("--json", "as_json", is_flag=True, help="Print the status JSON (hosts and CA bundle).")
@lab_dir_option
@prefix_option
def status_command(as_json: bool, lab_dir: str, prefix: str) -> None:
    """Show the lab's hosts and whether each namespace and sshd is alive."""
    from kokoa_infra.lab.deploy import how_to_reach

    the_lab = _lab(lab_dir, prefix)
    status_file = the_lab.dir / "status.json"
    if not status_file.exists():
        raise CouldNotRun(f"no lab in {the_lab.dir}: run `kokoa lab up`")
    status = json.loads(status_file.read_text())
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    live = the_lab.liveness()
    word = {True: "up", False: "DOWN"}
    rows = []
    roles = ("client", "acme", "origin", "edge")
    for netns, host in sorted(live.items(), key=lambda item: (roles.index(item[1]["role"]), item[0])):
        sshd = word[host["sshd"]] if "sshd" in host else "-"
        rows.append((host["role"], host["name"], netns, host["ip"], host.get("init", "plain"),
                     word[host["netns"]], sshd))
    click.echo(format_table(("ROLE", "NAME", "NETNS", "ADDRESS", "INIT", "NAMESPACE", "SSHD"), rows))
    problems = the_lab.problems()
    click.echo("health: " + ("ok" if not problems else "; ".join(problems) + " (run `kokoa lab up`)"))
    click.echo(f"CA bundle: {status['caBundle']}")
    click.echo(how_to_reach(status))
    if problems:
        sys.exit(1)


@lab.command("health", context_settings={**CONTEXT, "ignore_unknown_options": True},
             epilog=epilog("some node is unhealthy (as kokoa health)", "no lab here, or kokoa health could not run",
                           LAB_ENVIRONMENT))
@lab_dir_option
@prefix_option
@click.argument("health_args", nargs=-1, type=click.UNPROCESSED)
def health_command(lab_dir: str, prefix: str, health_args: tuple[str, ...]) -> None:
    """Run `kokoa health [HEALTH_ARGS]` against the lab.

    From the first origin's network (it reaches every node), with the lab's outputs, CA
    bundle and Cloudflare stand-in; `--failover` keeps its state in the lab directory.
    Example: `kokoa lab health --failover --interval 2`.
    """
    from kokoa_infra.lab.dns import LabDns
    from kokoa_infra.lab.health import run_health

    the_lab = _lab(lab_dir, prefix)
    status_file = the_lab.dir / "status.json"
    if not status_file.exists() or not (the_lab.dir / "outputs.json").exists():
        raise CouldNotRun(f"no lab in {the_lab.dir}: run `kokoa lab up`")
    status = json.loads(status_file.read_text())
    if not status.get("origins"):
        raise CouldNotRun("the lab has no origin to run the sweep from")
    dns = LabDns(the_lab)
    if not dns.url_file.exists():
        raise CouldNotRun("the lab's Cloudflare stand-in is not running: run `kokoa lab up`")
    try:
        code = run_health(status["origins"][0]["netns"], the_lab.dir / "outputs.json", status["caBundle"],
                          dns.environment(), the_lab.dir, health_args, PROJECT_DIR)
    except OSError as exc:
        raise CouldNotRun(str(exc)) from exc
    sys.exit(code)


@lab.command("down", epilog=epilog("something the lab made is still there", COULD_NOT_RUN, LAB_ENVIRONMENT))
@lab_dir_option
@prefix_option
def down_command(lab_dir: str, prefix: str) -> None:
    """Remove every namespace, process and file of the lab. Safe to run twice."""
    the_lab = _lab(lab_dir, prefix)
    with exclusive(the_lab.dir), heartbeat() as say:
        left = the_lab.down(echo=say)
    if left:
        raise Failed("still there after down: " + ", ".join(left))
    click.echo("The lab is down.")


@lab.command("rotate-ssh-key", epilog=epilog(
    "a step failed (`kokoa lab rotate-ssh-key` again carries on)", "no lab here, not root, or ssh-keygen missing",
    LAB_ENVIRONMENT))
@click.option("--stack-file", type=click.Path(exists=True, dir_okay=False), default=str(STACK_FILE),
              show_default=True, help="Lab stack config (topology).")
@lab_dir_option
@prefix_option
def rotate_ssh_key_command(stack_file: str, lab_dir: str, prefix: str) -> None:
    """New operator SSH key: authorize it on every server, deploy with it, revoke the old one."""
    from kokoa_infra.lab.executor import ExecutorError
    from kokoa_infra.lab.rotation import rotate_ssh_key

    started = time.monotonic()
    the_lab = _lab(lab_dir, prefix)
    if not (the_lab.dir / "status.json").exists():
        raise CouldNotRun(f"no lab in {the_lab.dir}: run `kokoa lab up` first")
    # Deploy the servers the way they already run (a lab running the other way would be rebuilt).
    modes = {h.get("mode", "plain") for h in the_lab.record()["hosts"].values() if h["role"] in ("origin", "edge")}
    if len(modes) == 1:
        the_lab.init = modes.pop()
    if shutil.which("ssh-keygen") is None:
        raise CouldNotRun("ssh-keygen is missing (`make setup` installs it)")
    try:
        with exclusive(the_lab.dir), heartbeat() as say:
            rotate_ssh_key(the_lab, stack_file=Path(stack_file), echo=say)
    except (LabError, ExecutorError) as exc:
        raise Failed(f"{exc}\n`kokoa lab rotate-ssh-key` again carries on") from exc
    click.echo(f"The operator key is rotated ({time.monotonic() - started:.0f}s); the old one is revoked.")
