"""The lab's hosts: a network namespace per client, ACME server, origin and edge, read from a lab stack config."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit

from kokoa_infra.lab.processes import LabError

PREFIX = "kokoa-"
DEFAULT_NETWORK = "172.31.255.0/24"
RESERVED = ("net", "client", "acme", "probe")  # names of the lab's own namespaces
# How servers (origins and edges) run: `systemd` boots each as a systemd machine
# (machines.py), as real servers run; `plain` starts sshd as the init of its own namespaces.
INIT_SYSTEMS = ("systemd", "plain")
DEFAULT_INIT = "systemd"


@dataclass(frozen=True)
class Host:
    """One machine of the lab: a network namespace at one address on the lab's internet."""

    name: str
    role: str  # origin, edge, client, acme
    ip: str
    netns: str
    origin: str = ""  # edges: the origin they serve
    domain: str = ""
    upstream: str = ""  # origins: where the demo application listens
    # Origins: their other names (kokoa:origins[].hostnames), for `lab status`. Not what the host
    # is: a changed list rebuilds no host.
    hostnames: tuple[str, ...] = field(default=(), compare=False)

    @property
    def is_server(self) -> bool:
        return self.role in ("origin", "edge")


@dataclass(frozen=True)
class LabTopology:
    """Every host of the lab: its origins and edges as the program's model has them, its client and ACME host."""

    network: ipaddress.IPv4Network
    hosts: tuple[Host, ...]

    def of_role(self, role: str) -> list[Host]:
        return [h for h in self.hosts if h.role == role]

    def one(self, role: str) -> Host | None:
        found = self.of_role(role)
        return found[0] if found else None

    def server(self, role: str, name: str) -> Host:
        return next(h for h in self.hosts if h.role == role and h.name == name)


def model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The `kokoa:` keys as `parse_topology` reads them, for a lab stack config without host keys.

    `kokoa lab up` pins each server's own key once the server exists; until then an entry
    without one is read as `insecureAnyHostKey: true`, which only the host-key checks see.
    The operator's SSH key is made by `kokoa lab up` too: read as set.
    """
    from kokoa_infra.stackfile import kokoa_config  # (ruamel): only when a lab is read, not for --help

    kokoa = kokoa_config(dict(config))
    kokoa.setdefault("sshPrivateKey", "made by kokoa lab up")
    for key in ("origins", "edges"):
        entries = kokoa.get(key)
        if isinstance(entries, list):
            kokoa[key] = [{**entry, "insecureAnyHostKey": True}
                          if isinstance(entry, dict) and "hostKey" not in entry and "insecureAnyHostKey" not in entry
                          else entry for entry in entries]
    return kokoa


def topology(config: Mapping[str, Any], prefix: str = PREFIX) -> LabTopology:
    """The hosts a lab stack config describes: its origins and edges from the program's own model
    (`parse_topology`: the same validation, defaults and addresses as `pulumi up`), one namespace
    each, at their one address; the client (`lab:clientIp`) and the ACME host (`kokoa:acmeServer`)."""
    from kokoa_infra.model import InvalidConfig
    from kokoa_infra.validate import parse_topology

    try:
        model = parse_topology(model_config(config))
    except InvalidConfig as exc:
        raise LabError("invalid lab stack config:\n  " + "\n  ".join(map(str, exc.problems))) from None
    problems: list[str] = []
    network = ipaddress.ip_network(config.get("lab:network", DEFAULT_NETWORK))
    hosts = [Host("client", "client", str(config.get("lab:clientIp", "")), f"{prefix}client")]
    # An ACME host when the stack names its own ACME server (the lab's pebble), not the default.
    acme = urlsplit(model.settings.acme_server).hostname if "kokoa:acmeServer" in config else None
    if acme:
        hosts.append(Host("acme", "acme", acme, f"{prefix}acme"))
    for o in model.origins:
        if o.endpoint != o.ssh.host:
            problems.append(f"origin {o.name}: a lab origin has one address; drop endpoint or make it equal to host")
        hosts.append(Host(o.name, "origin", o.ssh.host, f"{prefix}{o.name}", domain=o.domain, upstream=o.upstream,
                          hostnames=tuple(h.name for h in o.hostnames)))
    for e in model.edges:
        if e.ssh.host != e.public_ip:
            problems.append(f"edge {e.name}: a lab edge has one address; drop host or make it equal to publicIp")
        hosts.append(Host(e.name, "edge", e.public_ip, f"{prefix}{e.name}", origin=e.origin,
                          domain=model.origin(e.origin).domain))
    seen_ip: dict[str, str] = {}
    seen_ns: set[str] = set()
    for h in hosts:
        label = f"{h.role} {h.name}" if h.is_server else h.role
        try:
            ip = ipaddress.ip_address(h.ip)
        except ValueError:
            problems.append(f"{label}: address {h.ip!r} is not an IP address"
                            + (" (set lab:clientIp)" if h.role == "client" else ""))
            continue
        if ip not in network or ip in (network.network_address, network.broadcast_address):
            problems.append(f"{label}: {ip} is not a host address of the lab network {network}")
        if h.ip in seen_ip:
            problems.append(f"{label}: {ip} is already used by {seen_ip[h.ip]}")
        seen_ip[h.ip] = label
        if h.netns in seen_ns or (h.is_server and h.name in RESERVED):
            problems.append(f"{label}: namespace {h.netns} is taken; lab host names must differ across roles "
                            f"and from {', '.join(RESERVED)}")
        seen_ns.add(h.netns)
    if problems:
        raise LabError("invalid lab topology:\n  " + "\n  ".join(problems))
    return LabTopology(network, tuple(hosts))

