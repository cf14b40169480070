"""The whole deployment: validated config → Origin components (with their edges) → stack outputs."""

from __future__ import annotations

from typing import Any

import pulumi

from kokoa_infra.components import Origin, OriginArgs, gathered, secret_of, server_key
from kokoa_infra.model import (NAME_RE, OBJECT_KEYS, SECRET_KEYS, STRING_KEYS, InvalidConfig, Problem, Topology, keyscan_command,
                               parse_topology)


def read_config(config: pulumi.Config) -> tuple[dict[str, Any], pulumi.Output[str] | None]:
    """The `kokoa:` keys as plain values, and the SSH key as a secret Output."""
    raw: dict[str, Any] = {key: config.get(key) for key in STRING_KEYS}
    raw |= {key: config.get_object(key) for key in OBJECT_KEYS}
    secret, = SECRET_KEYS
    return {k: v for k, v in raw.items() if v is not None}, config.get_secret(secret)


def former_names(value: Any, topology: Topology) -> dict[str, tuple[str, ...]]:
    """`kokoa:formerNames` ({node: old name or [old names]}) checked against the topology.

    A renamed node keeps its resources through these aliases: without them the engine
    creates the new name's resources and then deletes the old ones, whose uninstall would
    wipe the server the node stays on.
    """
    if value is None:
        return {}
    where = "kokoa:formerNames"
    if not isinstance(value, dict):
        raise InvalidConfig([Problem("kokoa", "formerNames", "must be a mapping {node: former name or [names]}")])
    nodes = {o.name for o in topology.origins} | {e.name for e in topology.edges}
    problems, result, claimed = [], {}, {}
    for node, names in value.items():
        names = [names] if isinstance(names, str) else names
        if node not in nodes:
            problems.append(Problem(where, str(node), "names no origin or edge of this stack"))
            continue
        if not isinstance(names, list) or not names:
            problems.append(Problem(where, node, "must be a former name or a list of them"))
            continue
        for name in names:
            if not isinstance(name, str) or not NAME_RE.fullmatch(name):
                problems.append(Problem(where, node, f"{name!r} is not a node name"))
            elif name in nodes:
                problems.append(Problem(where, node, f"{name} is the name of a node of this stack; "
                                                     "a former name must be free"))
            elif name in claimed:
                problems.append(Problem(where, node, f"{name} is already the former name of {claimed[name]}"))
            else:
                claimed[name] = node
        result[node] = tuple(n for n in names if isinstance(n, str))
    if problems:
        raise InvalidConfig(problems)
    return result


def validate(raw: dict[str, Any], ssh_private_key: pulumi.Output[str] | None) -> Topology:
    problems: list[Problem] = []
    try:
        topology = parse_topology(raw)
        former_names(raw.get("formerNames"), topology)
    except InvalidConfig as exc:
        problems = exc.problems
    if ssh_private_key is None and (raw.get("origins") or raw.get("edges")):
        problems.append(Problem("kokoa", "sshPrivateKey",
                                "is required to reach the hosts: "
                                "pulumi config set --secret kokoa:sshPrivateKey < ~/.ssh/id_ed25519"))
    if problems:
        raise InvalidConfig(problems)
    return topology


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
    renamed = former_names(pulumi.Config("kokoa").get_object("formerNames"), topology)
    key = server_key()
    origins = {}
    for spec in topology.origins:  # (a loop: a comprehension is one more frame in every resource's stack trace)
        origins[spec.name] = Origin(spec.name, OriginArgs(
            origin=spec, edges=topology.edges_of(spec), settings=topology.settings, zone_id=topology.zone_for(spec),
            ssh_private_key=ssh_private_key, stack=stack, server_key=key,
            former_names=renamed.get(spec.name, ()),
            edge_former_names={e.name: renamed[e.name] for e in topology.edges_of(spec) if e.name in renamed}))
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
        # Whether `kokoa health --failover` may take records out of DNS (it refuses otherwise).
        "dnsFailover": topology.settings.dns_failover,
        "dnsRecords": {
            o.domain: [e.public_ip for e in topology.edges_of(o) if e.dns] for o in topology.origins
        },
        "healthTargets": [
            {"name": o.name, "role": "origin", "origin": o.name, "domain": o.domain,
             "wireguardIp": o.wireguard_ip, "publicIp": pulumi.Output.secret(o.endpoint)}
            for o in topology.origins
        ] + [
            {"name": e.name, "role": "edge", "origin": e.origin,
             "domain": topology.origin(e.origin).domain,
             "wireguardIp": e.wireguard_ip, "publicIp": e.public_ip} for e in topology.edges
        ],
        "bundles": secret_of(gathered(bundles)),
        # What `kokoa health` sends so that its probes are never challenged (secret).
        "healthTokens": pulumi.Output.secret({name: origin.health_token for name, origin in origins.items()}),
    }
