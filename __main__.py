"""Kokoa Proxy: origins hidden behind disposable edges; `pulumi up` provisions them all."""

import pulumi

from kokoa_infra.model import InvalidConfig
from kokoa_infra.program import deploy, read_config
from kokoa_infra.validate import parse_topology

raw_config, ssh_private_key = read_config(pulumi.Config("kokoa"))
try:
    topology = parse_topology(raw_config)
except InvalidConfig as invalid:
    for problem in invalid.problems:
        pulumi.log.error(str(problem))
    raise pulumi.RunError(f"kokoa: {len(invalid.problems)} configuration problem(s); "
                          "nothing was declared. Fix the stack config and run again.") from None

for output_name, value in deploy(topology, ssh_private_key, pulumi.get_stack()).items():
    pulumi.export(output_name, value)
