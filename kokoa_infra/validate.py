"""The `kokoa:` config → a Topology, or every problem at once (one per value, naming entry and key).

First every key declared in kokoa_infra/model.py is read and checked by its kind (schema.py);
then the rules that join keys and entries: what defaults to another key (an origin's endpoint
to its host, an edge's host to its publicIp), a host key with its scan command, an edge's
origin and its server, unique values (one step for origins and edges), formerNames, the SSH
key. Only a config without problems is built into the dataclasses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from kokoa_infra.addressing import ORIGIN_HOST, tunnel_address
from kokoa_infra.host_keys import host_key_problem, keyscan_command
from kokoa_infra.model import (
    EDGE_WEB_PORTS,
    MAX_NAMES_PER_ORIGIN,
    InvalidConfig,
    Problem,
    Ssh,
    Topology,
    describe_server,
    server_identity,
)
from kokoa_infra.schema import INVALID, declared, declared_keys
from kokoa_infra.values import NAME_RE, parse_ipv4, public_address_problem

SSH_PRIVATE_KEY_MISSING = ("is required to reach the hosts: "
                           "pulumi config set --secret kokoa:sshPrivateKey < ~/.ssh/id_ed25519")


@dataclass
class Values:
    """One entry as read: each declared field's checked value (INVALID when reported), its
    label in messages and its raw mapping."""

    cls: type
    entry: str
    raw: Mapping[str, Any]
    values: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def __setitem__(self, name: str, value: Any) -> None:
        self.values[name] = value

    def valid(self, name: str) -> Any:
        """The value, or None when it is absent or was reported."""
        value = self.values[name]
        return None if value is INVALID else value


@dataclass
class _Checker:
    """Collects every problem instead of stopping at the first."""

    problems: list[Problem] = field(default_factory=list)
    # Entries in the order they were read: problems are listed entry by entry.
    order: dict[str, int] = field(default_factory=dict)

    def fail(self, entry: str, key: str, message: str) -> Any:
        self.order.setdefault(entry, len(self.order))
        self.problems.append(Problem(entry, key, message))
        return INVALID

    def read(self, cls: type, raw: Mapping[str, Any], entry: str, *, known: bool = True) -> Values:
        """Every key declared by `cls` in `raw`: checked, its default when absent. `known`: report
        keys that `cls` does not declare."""
        self.order.setdefault(entry, len(self.order))
        if known:
            allowed = declared_keys(cls)
            for name in sorted(set(raw) - set(allowed)):
                self.fail(entry, name, f"unknown key (allowed: {', '.join(sorted(allowed))})")
        values: dict[str, Any] = {}
        for name, spec in declared(cls):
            if isinstance(spec, type):  # its keys sit at this level
                values[name] = self.read(spec, raw, entry, known=False)
                continue
            value = raw.get(spec.name)
            if value is None:
                values[name] = self.fail(entry, spec.name, "is required") if spec.required else spec.default
            else:
                values[name] = spec.kind.check(value, _Where(self, entry, spec.name))
        return Values(cls, entry, raw, values)

    def unique(self, items: list[tuple[str, Any, str]], key: str, what: str,
               quiet: set[str] = frozenset(), by_position: bool = False) -> set[str]:
        """`items` are (entry, identity, shown) triples; every identity after its first use is
        a problem that names the entry of the first use, except for `quiet` entries (already
        reported for the same value). `by_position`: the first use is named by its position
        alone ("kokoa:origins[0]", not "kokoa:origins[0] (blog)"), for a duplicated name, which
        both labels would otherwise show alike. Returns the entries reported."""
        seen: dict[Any, str] = {}
        reported = set()
        for entry, identity, shown in items:
            if identity is None:
                continue
            if identity not in seen:
                seen[identity] = entry
            elif entry not in quiet:
                first = seen[identity].split(" (", 1)[0] if by_position else seen[identity]
                self.fail(entry, key, f"{what} {shown} is already used by {first}")
                reported.add(entry)
        return reported

    def sorted_problems(self) -> list[Problem]:
        return sorted(self.problems, key=lambda p: self.order[p.entry])


@dataclass
class _Where:
    checker: _Checker
    entry: str
    key: str

    def fail(self, message: str, *, key: str | None = None, entry: str | None = None) -> Any:
        return self.checker.fail(entry or self.entry, key or self.key, message)

    def read(self, cls: type, raw: Mapping[str, Any], entry: str) -> Values:
        return self.checker.read(cls, raw, entry)


# --- rules that join keys of one entry -------------------------------------------------------------

def _ssh(c: _Checker, node: Values, default_user: str) -> Ssh | None:
    """The node's SSH user (default kokoa:sshUser) and host key (required, checked with the
    host and port its scan command names, unless insecureAnyHostKey); its Ssh when the host
    is known."""
    if node["ssh_user"] is None:
        node["ssh_user"] = default_user
    host, port = node.valid("host"), node.valid("ssh_port") or 22
    scan = keyscan_command(host, port)
    insecure, host_key = node["insecure_any_host_key"], node.raw.get("hostKey")
    if insecure is True:
        if host_key is not None:
            node["host_key"] = c.fail(node.entry, "hostKey", "must be absent when insecureAnyHostKey is true (keep "
                                                             "the pinned key and remove insecureAnyHostKey: it is "
                                                             "the safe one)")
    elif insecure is INVALID:
        pass  # reported: the key's own checks would only add noise
    elif host_key is None:
        c.fail(node.entry, "hostKey", f"is required: pin the server's SSH host key ({scan} prints it; "
                                      "kokoa add-origin/add-edge --scan-host-key records it), or set "
                                      "insecureAnyHostKey: true for a throwaway host")
    else:
        problem = host_key_problem(host_key, scan)
        if problem:
            node["host_key"] = c.fail(node.entry, "hostKey", problem)
    return Ssh(host, port, node["ssh_user"], None) if host else None


def _origin(c: _Checker, origin: Values, default_user: str) -> None:
    ssh = _ssh(c, origin, default_user)
    if origin["endpoint"] is None:
        address = parse_ipv4(ssh.host) if ssh else None
        if address and public_address_problem(address):
            # Fine for SSH (a tunnel on loopback), not as the address edges dial.
            origin["endpoint"] = c.fail(origin.entry, "endpoint",
                                        f"is required when host is {ssh.host}: edges dial the endpoint, "
                                        "which must be a public address (default: host)")
        else:
            origin["endpoint"] = origin["host"]
    capacity = origin.raw.get("capacity")
    if origin["under_attack"] is None:
        origin["under_attack"] = "auto" if capacity is not None else "off"
    elif origin["under_attack"] == "auto" and capacity is None:
        c.fail(origin.entry, "underAttack", "auto challenges visitors only while the origin is at its capacity: "
                                            "set capacity: {concurrentRequests: N} (the most requests the "
                                            "application serves at once), or use on or off")


def _hostnames(c: _Checker, origin: Values) -> None:
    """An origin's other names: at most what one certificate carries beside the domain; each
    served, on an application of its own or redirected, and a redirect goes to a name of the same
    origin that is served (so there is no chain and no loop)."""
    hostnames = origin.valid("hostnames") or []
    if len(hostnames) >= MAX_NAMES_PER_ORIGIN:
        c.fail(origin.entry, "hostnames", f"has {len(hostnames)} names; with the domain an origin has at most "
                                          f"{MAX_NAMES_PER_ORIGIN} (all on one certificate): at most "
                                          f"{MAX_NAMES_PER_ORIGIN - 1} here")
        return
    domain = origin.valid("domain")
    for h in hostnames:
        if h.raw.get("upstream") is not None and h.raw.get("redirectTo") is not None:
            h["redirect_to"] = c.fail(h.entry, "redirectTo", "cannot go with upstream: a redirected name never "
                                                             "reaches an application; keep one of the two")
    redirects = {h.valid("name"): h.valid("redirect_to") for h in hostnames if h.valid("redirect_to")}
    names = {domain, *(h.valid("name") for h in hostnames)} - {None}
    for h in hostnames:
        target = h.valid("redirect_to")
        if target is None or h.valid("name") is None:
            continue
        if target == h["name"]:
            c.fail(h.entry, "redirectTo", f"{target} is this name itself; redirect to a name that is served, "
                                          f"such as {domain}")
        elif target in redirects:
            c.fail(h.entry, "redirectTo", f"{target} is redirected itself (to {redirects[target]}); redirect "
                                          f"straight to a name that is served, such as {domain}")
        elif target not in names:
            c.fail(h.entry, "redirectTo", f"{target} is not a name of this origin (its domain {domain} or one "
                                          "of its hostnames)")


def _unique_names(c: _Checker, origins: list[Values]) -> None:
    """Every domain and hostname once in the whole stack: a hostname is reported, not the domain
    it takes; two equal domains are the domain check's to report."""
    seen = {o.valid("domain"): o.entry for o in reversed(origins) if o.valid("domain")}
    for origin in origins:
        for h in origin.valid("hostnames") or []:
            name = h.valid("name")
            if name is None:
                continue
            if name in seen:
                c.fail(h.entry, "name", f"{name} is already a name of {seen[name]}; a name belongs to one "
                                        "origin, once")
            else:
                seen[name] = h.entry


def _edge(c: _Checker, edge: Values, default_user: str, origins: set[Any],
          origin_servers: dict[Any, str]) -> None:
    name = edge.valid("origin")
    if name is not None and name not in origins:
        known = ", ".join(sorted(n for n in origins if isinstance(n, str))) or "none"
        c.fail(edge.entry, "origin", f"no origin is named {name!r} (origins: {known})")
    defaulted = edge["host"] is None
    if defaulted:  # publicIp, already checked: when it was reported, not again as host
        edge["host"] = edge.valid("public_ip")
    ssh = _ssh(c, edge, default_user)
    if ssh and ssh.port in EDGE_WEB_PORTS:
        # The firewall admits SSH before the flood shield: on 80/443 it would bypass it.
        c.fail(edge.entry, "sshPort", f"{ssh.port} is one of the edge's web ports (80, 443), which go "
                                      "through the flood shield to nginx; give SSH another port")
    # The whole point of the product: an origin's address never goes into DNS.
    public_ip = edge.valid("public_ip")
    if public_ip is not None and public_ip in origin_servers:
        c.fail(edge.entry, "publicIp", f"{public_ip} is the address of origin {origin_servers[public_ip]}; an "
                                       "edge must run on its own server")
    elif not defaulted and ssh and server_identity(ssh) in origin_servers:
        c.fail(edge.entry, "host", f"{ssh.host} is the address of origin {origin_servers[server_identity(ssh)]}; "
                                   "an edge must run on its own server")


# --- rules across entries -------------------------------------------------------------------------

def _server(node: Values) -> Ssh | None:
    host = node.valid("host")
    return Ssh(host, node.valid("ssh_port") or 22, "", None) if host else None


def _server_identity(node: Values) -> Any:
    """The server the node's SSH reaches (model.server_identity), or None when its host was reported."""
    server = _server(node)
    return server and server_identity(server)


def _server_shown(node: Values) -> str | None:
    server = _server(node)
    return server and describe_server(server)


def _all_valid(node: Values, *names: str) -> tuple[Any, ...] | None:
    values = tuple(node.valid(name) for name in names)
    return None if None in values else values


# (key reported, what is repeated, identity of an entry or None, how it is shown, first named by position)
Uniqueness = tuple[str, str, Callable[[Values], Any], Callable[[Values], str], bool]

ORIGIN_UNIQUE: tuple[Uniqueness, ...] = (
    ("name", "origin name", lambda o: o.valid("name"), lambda o: repr(o["name"]), True),
    ("domain", "domain", lambda o: o.valid("domain"), lambda o: repr(o["domain"]), False),
    ("subnet", "subnet", lambda o: o.valid("subnet"), lambda o: repr(o["subnet"]), False),
    # One wg0 per host: two origins on one server would overwrite each other's tunnel.
    ("host", "origin host", _server_identity, _server_shown, False),
    ("listenPort", "endpoint and port", lambda o: _all_valid(o, "endpoint", "listen_port"),
     lambda o: repr(_all_valid(o, "endpoint", "listen_port")), False),
)


def _unique_edges(c: _Checker, edges: list[Values], origins: set[Any]) -> None:
    c.unique([(e.entry, e.valid("name"), repr(e["name"])) for e in edges], "name", "edge name", by_position=True)
    same_ip = c.unique([(e.entry, e.valid("public_ip"), repr(e["public_ip"])) for e in edges], "publicIp",
                       "public IP")
    # An edge without `host` uses its publicIp: a duplicate publicIp is reported once, as such.
    c.unique([(e.entry, _server_identity(e), _server_shown(e)) for e in edges], "host", "edge host",
             quiet={e.entry for e in edges if e.entry in same_ip and e.raw.get("host") is None})

    def origin_and_index(e: Values) -> Any:
        both = _all_valid(e, "origin", "index")
        return both if both and both[0] in origins else None
    c.unique([(e.entry, origin_and_index(e), repr(origin_and_index(e))) for e in edges], "index",
             "origin and index")


def _former_names(c: _Checker, value: Any, nodes: set[str]) -> dict[str, tuple[str, ...]]:
    """`kokoa:formerNames` against the nodes: each names a node, each former name is free."""
    where, result, claimed = "kokoa:formerNames", {}, {}
    for node, names in (value or {}).items():
        if node not in nodes:
            c.fail(where, node, "names no origin or edge of this stack")
            continue
        if not isinstance(names, list) or not names:
            c.fail(where, node, "must be a former name or a list of them")
            continue
        for name in names:
            if not isinstance(name, str) or not NAME_RE.fullmatch(name):
                c.fail(where, node, f"{name!r} is not a node name")
            elif name in nodes:
                c.fail(where, node, f"{name} is the name of a node of this stack; a former name must be free")
            elif name in claimed:
                c.fail(where, node, f"{name} is already the former name of {claimed[name]}")
            else:
                claimed[name] = node
        result[node] = tuple(n for n in names if isinstance(n, str))
    return result


def _entries(value: Any) -> list[Values]:
    return value if isinstance(value, list) else []


def check_entry(cls: type, raw: Mapping[str, Any], entry: str) -> Any:
    """One entry of the keys declared by `cls` (nested groups and lists included), built, or
    InvalidConfig: what the whole config's reading does for each entry before its rules."""
    c = _Checker()
    values = c.read(cls, raw, entry)
    if c.problems:
        raise InvalidConfig(c.sorted_problems())
    return _build_values(values)


def parse_topology(config: Mapping[str, Any]) -> Topology:
    """Validate the `kokoa:` config (keys without the `kokoa:` prefix; a secret key is set
    when it has any value) and allocate addresses.

    Raises InvalidConfig listing every problem; returns a Topology only when there is none.
    """
    c = _Checker()
    root = c.read(Topology, config, "kokoa")
    settings: Values = root["settings"]
    origins, edges = _entries(root["origins"]), _entries(root["edges"])
    if origins and settings["acme_email"] is None:
        c.fail("kokoa", "acmeEmail", "is required")
    if not root["ssh_private_key_set"] and (config.get("origins") or config.get("edges")):
        c.fail("kokoa", "sshPrivateKey", SSH_PRIVATE_KEY_MISSING)
    default_user = settings.valid("ssh_user") or "root"

    for origin in origins:
        _origin(c, origin, default_user)
        _hostnames(c, origin)
    for key, what, identity, shown, by_position in ORIGIN_UNIQUE:
        c.unique([(o.entry, identity(o), shown(o)) for o in origins], key, what, by_position=by_position)
    _unique_names(c, origins)

    # Addresses that are an origin's server: its endpoint, and its SSH host (on loopback with
    # the tunnel's port). An edge on any of them would put the origin into DNS.
    origin_servers: dict[Any, str] = {}
    for o in origins:
        if o.valid("name") is not None:
            for address in (o.valid("endpoint"), _server_identity(o)):
                if address is not None:
                    origin_servers.setdefault(address, o["name"])
    declared_origins = {o.raw.get("name") for o in origins}
    for edge in edges:
        _edge(c, edge, default_user, declared_origins, origin_servers)
    _unique_edges(c, edges, declared_origins)

    nodes = {n.valid("name") for n in (*origins, *edges)} - {None}
    root["former_names"] = _former_names(c, root.valid("former_names"), nodes)

    if c.problems:
        raise InvalidConfig(c.sorted_problems())
    return _build(root, settings)


# --- building the dataclasses -----------------------------------------------------------------

def _built(value: Any) -> Any:
    if isinstance(value, Values):
        return _build_values(value)
    if isinstance(value, list):  # Entries
        return tuple(_build_values(v) for v in value)
    return value


def _build_values(values: Values, **derived: Any) -> Any:
    names = {f.name for f in dataclasses.fields(values.cls)}
    return values.cls(**{name: _built(value) for name, value in values.values.items() if name in names}, **derived)


def _build(root: Values, settings: Values) -> Topology:
    built_settings = _build_values(settings)
    network = built_settings.network
    origins = tuple(_build_values(o, wireguard_ip=tunnel_address(network, o["subnet"], ORIGIN_HOST))
                    for o in _entries(root["origins"]))
    subnets = {o.name: o.subnet for o in origins}
    edges = tuple(_build_values(e, wireguard_ip=tunnel_address(network, subnets[e["origin"]], e["index"]))
                  for e in _entries(root["edges"]))
    return Topology(settings=built_settings, ssh_private_key_set=root["ssh_private_key_set"], origins=origins,
                    edges=edges, former_names=root["former_names"])

