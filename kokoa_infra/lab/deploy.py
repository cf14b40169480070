"""`kokoa lab up`: the hosts made, the program evaluated under mocks, its commands and A records applied
over SSH and to the Cloudflare stand-in, in parallel, refreshed as Pulumi.yaml says; then the sites checked.
"""

from __future__ import annotations

import copy
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ruamel.yaml import YAML

from kokoa_infra.atomic_file import write_private
from kokoa_infra.lab import ORDER_SEED_ENV
from kokoa_infra.lab.dns import LabDns
from kokoa_infra.lab.executor import (
    COMMAND,
    DEFAULT_PARALLEL,
    DNS_RECORD,
    CommandHandler,
    Report,
    SshRunner,
    apply,
    project_refreshes_always,
)
from kokoa_infra.lab.hosts import LabTopology, topology
from kokoa_infra.lab.lab import Lab
from kokoa_infra.lab.processes import LabError
from kokoa_infra.mocked_program import DeclaredResource, ProgramFailed, run_program
from kokoa_infra.project import PROJECT_DIR

STACK_FILE = PROJECT_DIR / "stacks" / "Pulumi.lab.yaml"

def load_stack(path: Path = STACK_FILE) -> dict[str, Any]:
    """The `config:` mapping of a stack file, as plain Python values."""
    data = YAML(typ="safe").load(Path(path).read_text()) or {}
    return dict(data.get("config") or {})


def generated_config(base: Mapping[str, Any], topo: LabTopology, lab: Lab) -> dict[str, Any]:
    """The stack config with what only exists once the hosts do: the SSH key, host keys, the ACME CA."""
    config = {k: copy.deepcopy(v) for k, v in base.items() if not k.startswith("lab:")}
    config["kokoa:sshPrivateKey"] = lab.operator_key.read_text()
    if topo.one("acme") is not None:
        config["kokoa:acmeCaBundle"] = lab.acme_cert.read_text()
    for key, role in (("kokoa:origins", "origin"), ("kokoa:edges", "edge")):
        for entry in config.get(key, []):
            entry["hostKey"] = lab.host_key(topo.server(role, entry["name"]).netns)
    return config


def lab_status(topo: LabTopology, lab: Lab) -> dict[str, Any]:
    """What `kokoa lab status --json` prints, and what tests use to reach the lab."""
    return {
        "client": topo.one("client").netns,
        "caBundle": str(lab.ca_bundle),
        "resolver": topo.one("acme").ip if topo.one("acme") else None,
        "origins": [{"name": h.name, "domain": h.domain, "hostnames": list(h.hostnames), "netns": h.netns,
                     "publicIp": h.ip, "init": lab.init_system(h.netns)} for h in topo.of_role("origin")],
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
       echo=print, prune: bool = True) -> Deployment:
    """Hosts up, program evaluated, its commands applied over SSH. Safe to repeat and to resume.

    `prune=False` keeps the hosts of removed nodes (after their delete commands ran), to look at them.
    """
    base = {**load_stack(stack_file), **(overrides or {})}
    topo = topology(base, lab.prefix)
    echo(f"hosts ({lab.dir})")
    lab.ensure(topo, echo)
    dns = LabDns(lab)
    config = {**generated_config(base, topo, lab), **dns.stack_config()}
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
    dns.set_acme_records(topo, program.outputs.get("dnsRecords", {}))
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
    """A curl line for every name of every origin through each of its edges."""
    lines = [f"From the client namespace ({status['client']}), through each edge:"]
    names = {o["name"]: [o["domain"], *o.get("hostnames", [])] for o in status["origins"]}
    for edge in status["edges"]:
        for name in names[edge["origin"]]:
            lines.append(f"  ip netns exec {status['client']} curl --cacert {status['caBundle']} "
                         f"--resolve {name}:443:{edge['publicIp']} https://{name}/")
    return "\n".join(lines)


def verify_sites(lab: Lab, status: Mapping[str, Any], seconds: int = 90, echo=None) -> dict[str, str]:
    """Wait (bounded) until every edge serves its site with a certificate the lab CA verifies.

    Edges serve a placeholder until their refresh job fetches the origin's certificate,
    so right after the deployment this may take one refresh interval. Returns
    {edge: first line of the body, or the last error}. `echo` hears which edges it still
    waits for, and why, after each round that leaves some.
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
        if echo is not None:
            echo("  waiting for " + ", ".join(f"{e['name']} ({results[e['name']] or 'no answer'})"
                                              for e in pending))
        time.sleep(2)
    if pending:
        failed = ", ".join(f"{e['name']} ({results[e['name']]})" for e in pending)
        raise LabError(f"no verified HTTPS after {seconds}s through {failed}")
    return results


def apply_resources(lab: Lab, topo: LabTopology, resources: list[DeclaredResource], echo=print) -> Report:
    """What `pulumi up` would do with the declared resources, against the lab's hosts and stand-in."""
    commands = CommandHandler(SshRunner(topo.one("client").netns, lab.dir / "tmp"), echo, lab.dir / "logs")
    handlers = {COMMAND: commands, DNS_RECORD: LabDns(lab).handler(echo)}
    seed = int(os.environ[ORDER_SEED_ENV]) if os.environ.get(ORDER_SEED_ENV) else None
    report = apply(resources, lab.dir / "commands.json", echo=echo, handlers=handlers, seed=seed,
                   parallel=DEFAULT_PARALLEL, refresh=project_refreshes_always(PROJECT_DIR / "Pulumi.yaml"))
    echo(f"  order seed {report.seed} ({ORDER_SEED_ENV}={report.seed} replays it)")
    return report
