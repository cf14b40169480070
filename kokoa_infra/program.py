"""The whole deployment: validated config → Origin components (with their edges) → stack outputs."""

from __future__ import annotations

from typing import Any

import pulumi

from kokoa_infra.components import Origin, OriginArgs
from kokoa_infra.model import InvalidConfig, Problem, Topology, parse_topology

# Config keys read as JSON/YAML values; every other kokoa: key is a string.
OBJECT_KEYS = ("origins", "edges", "certRefreshInterval")
STRING_KEYS = ("acmeEmail", "acmeServer", "acmeCaBundle", "network", "sshUser", "cloudflareZoneId")


def read_config(config: pulumi.Config) -> tuple[dict[str, Any], pulumi.Output[str] | None]:
    """The `kokoa:` keys as plain values, and the SSH key as a secret Output."""
    raw: dict[str, Any] = {key: config.get(key) for key in STRING_KEYS}
    raw |= {key: config.get_object(key) for key in OBJECT_KEYS}
    return {k: v for k, v in raw.items() if v is not None}, config.get_secret("sshPrivateKey")


def validate(raw: dict[str, Any], ssh_private_key: pulumi.Output[str] | None) -> Topology:
    problems: list[Problem] = []
    try:
        topology = parse_topology(raw)
    except InvalidConfig as exc:
        problems = exc.problems
    if ssh_private_key is None and (raw.get("origins") or raw.get("edges")):
        problems.append(Problem("kokoa", "sshPrivateKey",
                                "is required to reach the hosts: "
                                "pulumi config set --secret kokoa:sshPrivateKey < ~/.ssh/id_ed25519"))
    if problems:
        raise InvalidConfig(problems)
    return topology


def deploy(topology: Topology, ssh_private_key: pulumi.Output[str] | None, stack: str) -> dict[str, Any]:
    """Declare every resource; return the stack outputs of CONTRACT.md."""
    if ssh_private_key is not None:
        ssh_private_key = pulumi.Output.secret(ssh_private_key)
    origins = {
        spec.name: Origin(spec.name, OriginArgs(topology=topology, origin=spec,
                                                ssh_private_key=ssh_private_key, stack=stack))
        for spec in topology.origins
    }
    without_zone = [o.name for o in topology.origins if not topology.zone_for(o)]
    if without_zone:
        pulumi.log.info(f"kokoa: no Cloudflare zone for {', '.join(without_zone)} "
                        "(kokoa:cloudflareZoneId unset): no A records are managed; "
                        "dnsRecords lists the ones to create by hand")

    bundles: dict[str, Any] = {}
    for name, origin in origins.items():
        bundles[f"origin/{name}"] = origin.bundle
        for edge_name, node in origin.edges.items():
            bundles[f"edge/{edge_name}"] = node.bundle

    return {
        "origins": {
            o.name: {
                "domain": o.domain,
                "subnet": o.subnet,
                "wireguardIp": o.wireguard_ip,
                "publicKey": origins[o.name].public_key,
                "endpoint": o.endpoint,
                "listenPort": o.listen_port,
                "edges": [e.name for e in topology.edges_of(o)],
            } for o in topology.origins
        },
        "edges": {
            e.name: {
                "origin": e.origin,
                "domain": topology.origin(e.origin).domain,
                "publicIp": e.public_ip,
                "wireguardIp": e.wireguard_ip,
                "publicKey": origins[e.origin].edges[e.name].public_key,
                "dns": e.dns,
            } for e in topology.edges
        },
        "dnsRecords": {
            o.domain: [e.public_ip for e in topology.edges_of(o) if e.dns] for o in topology.origins
        },
        "healthTargets": [
            {"name": o.name, "role": "origin", "origin": o.name, "domain": o.domain,
             "wireguardIp": o.wireguard_ip, "publicIp": o.endpoint} for o in topology.origins
        ] + [
            {"name": e.name, "role": "edge", "origin": e.origin,
             "domain": topology.origin(e.origin).domain,
             "wireguardIp": e.wireguard_ip, "publicIp": e.public_ip} for e in topology.edges
        ],
        "bundles": pulumi.Output.secret(bundles),
    }
