"""How `kokoa lab up` applies the program: SSH commands and A records, in parallel, refreshed as Pulumi.yaml says."""

from __future__ import annotations

import os
from typing import Any

from kokoa_infra.lab.dns import LabDns
from kokoa_infra.lab.executor import (COMMAND, COPY_TO_REMOTE, DEFAULT_PARALLEL, DNS_RECORD, CommandHandler, Report,
                                      SshRunner, apply, project_refreshes_always)
from kokoa_infra.lab.hosts import Topology
from kokoa_infra.lab.lab import Lab
from kokoa_infra.mockrun import PROJECT_DIR, DeclaredResource

# Set it to replay the order of an earlier `up` (each `up` prints the seed it used).
ORDER_SEED_ENV = "KOKOA_LAB_ORDER_SEED"


def lab_dns_config(lab: Lab, topo: Topology, echo=print) -> dict[str, Any]:
    """Start the stand-in and resolver if needed; the config keys that point the program at them."""
    dns = LabDns(lab)
    dns.ensure(topo, echo)
    return dns.stack_config()


def apply_resources(lab: Lab, topo: Topology, resources: list[DeclaredResource], echo=print) -> Report:
    """What `pulumi up` would do with the declared resources, against the lab's hosts and stand-in."""
    commands = CommandHandler(SshRunner(topo.one("client").netns, lab.dir / "tmp"), echo, lab.dir / "logs")
    handlers = {COMMAND: commands, COPY_TO_REMOTE: commands, DNS_RECORD: LabDns(lab).handler(echo)}
    seed = int(os.environ[ORDER_SEED_ENV]) if os.environ.get(ORDER_SEED_ENV) else None
    report = apply(resources, lab.dir / "commands.json", echo=echo, handlers=handlers, seed=seed,
                   parallel=DEFAULT_PARALLEL, refresh=project_refreshes_always(PROJECT_DIR / "Pulumi.yaml"))
    echo(f"  order seed {report.seed} ({ORDER_SEED_ENV}={report.seed} replays it)")
    return report
