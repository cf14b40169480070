"""Every bundle of a stack config, rendered with a fixed key (no Pulumi): for the tests that check
the rendered files with real tools (tests/unit/test_gixy.py, tests/netns/test_firewall.py)."""

from __future__ import annotations

from kokoa_infra.admission import admissions
from kokoa_infra.render import EdgePeer, render_edge_bundle, render_origin_bundle
from kokoa_infra.stackfile import kokoa_config
from kokoa_infra.validate import parse_topology
from tests.support.stacks import BASE_CONFIG

KEY = "YAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
PASS_KEY = "0123456789abcdef" * 4


def bundles(config: dict) -> dict[str, dict[str, str]]:
    topology = parse_topology(kokoa_config(config))
    found = {}
    for origin in topology.origins:
        edges = topology.edges_of(origin)
        found[f"origin/{origin.name}"] = render_origin_bundle(
            topology.settings, origin, KEY, [EdgePeer(e, KEY, KEY) for e in edges])
        shares = admissions(origin, edges)
        for edge in edges:
            found[f"edge/{edge.name}"] = render_edge_bundle(topology.settings, origin, edge, KEY, KEY, KEY,
                                                            pass_key=PASS_KEY, admission=shares[edge.name])
    return found


def wireguard_ips(config: dict) -> dict[str, str]:
    """Each node's WireGuard address, as the model allocates it (the `wireguardIp` outputs)."""
    topology = parse_topology(kokoa_config(config))
    return {node.name: node.wireguard_ip for node in (*topology.origins, *topology.edges)}


def lab_config(stack_file=None) -> dict:
    from kokoa_infra.lab.deploy import STACK_FILE, load_stack
    config = {k: v for k, v in load_stack(stack_file or STACK_FILE).items() if not k.startswith("lab:")}
    for entry in config["kokoa:origins"] + config["kokoa:edges"]:
        entry["hostKey"] = BASE_CONFIG["kokoa:origins"][0]["hostKey"]
    return config | {"kokoa:sshPrivateKey": BASE_CONFIG["kokoa:sshPrivateKey"]}
