"""The whole deployment: validated config → Origin components (with their edges) → stack outputs."""

from __future__ import annotations

from typing import Any

import pulumi

from kokoa_infra.components import Origin, OriginArgs, gathered, secret_of, server_key
from kokoa_infra.host_keys import keyscan_command
from kokoa_infra.model import Origin as OriginSpec
from kokoa_infra.model import Topology
from kokoa_infra.schema import Secret, top_level


def read_config(config: pulumi.Config) -> tuple[dict[str, Any], pulumi.Output[str] | None]:
    """Every declared `kokoa:` key as the model reads it (a string, or a JSON/YAML value, as its
    kind says), and the SSH key as a secret Output (in the config as well: the model checks
    that it is set)."""
    raw: dict[str, Any] = {}
    secret = None
    for spec in top_level(Topology):
        if isinstance(spec.kind, Secret):
            raw[spec.name] = secret = config.get_secret(spec.name)
        else:
            raw[spec.name] = config.get(spec.name) if spec.kind.text else config.get_object(spec.name)
    return {k: v for k, v in raw.items() if v is not None}, secret


def warn_about_exposure(topology: Topology) -> None:
    """Loud warnings, at every preview and up, for what the config leaves open on purpose."""
    nodes = [("origin", o.name, o.ssh) for o in topology.origins] + \
            [("edge", e.name, e.ssh) for e in topology.edges]
    for role, name, ssh in nodes:
        if ssh.insecure_any_host_key:
            pulumi.log.warn(f"kokoa: INSECURE: {role} {name} has insecureAnyHostKey: true: SSH to "
                            f"{ssh.host} accepts ANY host key, so whoever answers there receives "
                            f"its bundle and WireGuard keys; pin hostKey ({keyscan_command(ssh.host, ssh.port)}) "
                            "unless this host is throwaway")
    for origin in topology.origins:
        capacity, edges = origin.defence.capacity, topology.edges_of(origin)
        if capacity is not None and len(edges) > capacity:
            pulumi.log.warn(f"kokoa: origin {origin.name} has capacity {capacity} for {len(edges)} edges: each edge "
                            f"still lets 1 request through at once, so the origin may get {len(edges)}; raise "
                            "capacity.concurrentRequests or remove edges")
    if topology.settings.ssh_open_to_everyone:
        pulumi.log.warn("kokoa: SSH on every host is open to the internet; set kokoa:sshAllowFrom "
                        "to the networks you administer from (e.g. [\"198.51.100.0/24\"])")


def deploy(topology: Topology, ssh_private_key: pulumi.Output[str] | None, stack: str) -> dict[str, Any]:
    """Declare every resource; return the stack outputs (README, "Stack outputs")."""
    if ssh_private_key is not None:
        ssh_private_key = pulumi.Output.secret(ssh_private_key)
    renamed = topology.former_names
    key = server_key()
    # Each origin's spec and its edges (in index order), looked up once for everything below.
    specs = {o.name: o for o in topology.origins}
    edges_of = {o.name: topology.edges_of(o) for o in topology.origins}
    origins = {}
    for spec in topology.origins:  # (a loop: a comprehension is one more frame in every resource's stack trace)
        origins[spec.name] = Origin(spec.name, OriginArgs(
            origin=spec, edges=edges_of[spec.name], settings=topology.settings, zone_id=topology.zone_for(spec),
            ssh_private_key=ssh_private_key, stack=stack, server_key=key,
            former_names=renamed.get(spec.name, ()),
            edge_former_names={e.name: renamed[e.name] for e in edges_of[spec.name] if e.name in renamed}))
    warn_about_exposure(topology)
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
                # The one address Kokoa hides: secret in state, previews and CI logs.
                "endpoint": pulumi.Output.secret(o.endpoint),
                "listenPort": o.listen_port,
                "edges": [e.name for e in edges_of[o.name]],
                "hostnames": [h.name for h in o.hostnames],
            } for o in topology.origins
        },
        "edges": {
            e.name: {
                "origin": e.origin,
                "domain": specs[e.origin].domain,
                "hostnames": [h.name for h in specs[e.origin].hostnames],
                "publicIp": e.public_ip,
                "wireguardIp": e.wireguard_ip,
                "publicKey": origins[e.origin].edges[e.name].public_key,
                "dns": e.dns,
            } for e in topology.edges
        },
        # Whether `kokoa health --failover` may take records out of DNS (it refuses otherwise).
        "dnsFailover": topology.settings.dns_failover,
        "dnsRecords": {
            name: [e.public_ip for e in edges_of[o.name] if e.dns] for o in topology.origins for name in o.names
        },
        "healthTargets": [
            {"name": o.name, "role": "origin", "origin": o.name, "domain": o.domain,
             "hostnames": _hostname_targets(o),
             "wireguardIp": o.wireguard_ip, "publicIp": pulumi.Output.secret(o.endpoint)}
            for o in topology.origins
        ] + [
            {"name": e.name, "role": "edge", "origin": e.origin,
             "domain": specs[e.origin].domain, "hostnames": _hostname_targets(specs[e.origin]),
             "wireguardIp": e.wireguard_ip, "publicIp": e.public_ip} for e in topology.edges
        ],
        "bundles": secret_of(gathered(bundles)),
        # What `kokoa health` sends so that its probes are never challenged (secret).
        "healthTokens": pulumi.Output.secret({name: origin.health_token for name, origin in origins.items()}),
    }


def _hostname_targets(origin: OriginSpec) -> list[dict[str, str]]:
    """What `kokoa health` probes of an origin's other names: each name, and where it redirects."""
    return [{"name": h.name, **({"redirectTo": h.redirect_to} if h.redirect_to else {})} for h in origin.hostnames]
