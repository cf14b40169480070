"""Stack config → validated, allocated topology of origins and edges (no Pulumi here)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
# Lower-case FQDN: at least two labels, letters/digits/hyphens, no leading/trailing hyphen.
LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
DOMAIN_RE = re.compile(rf"^(?=.{{1,253}}$){LABEL}(\.{LABEL})+$")
HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}$){LABEL}(\.{LABEL})*$")
EMAIL_RE = re.compile(r"^[A-Za-z0-9._%+-]{1,64}@" + rf"{LABEL}(\.{LABEL})+$", re.IGNORECASE)
HOST_KEY_RE = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com) "
    r"[A-Za-z0-9+/]+={0,3}( [A-Za-z0-9@._-]{1,64})?$")
NAME_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
ZONE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
UPSTREAM_RE = re.compile(
    r"^(?P<scheme>https?)://(?P<host>[A-Za-z0-9.-]+|\[[0-9a-fA-F:]+\])(:(?P<port>[0-9]{1,5}))?"
    r"(?P<path>/[A-Za-z0-9._~/-]*)?$")

DEFAULT_NETWORK = "10.100.0.0/16"
DEFAULT_ACME_SERVER = "https://acme-v02.api.letsencrypt.org/directory"
DEFAULT_LISTEN_PORT = 51820
DEFAULT_CERT_REFRESH_INTERVAL = 300
EDGE_INDEX_RANGE = (10, 254)
SUBNET_RANGE = (0, 255)

ORIGIN_KEYS = {"name", "domain", "subnet", "host", "endpoint", "listenPort", "upstream",
               "sshPort", "sshUser", "hostKey", "rateLimit", "zoneId"}
EDGE_KEYS = {"name", "origin", "publicIp", "index", "host", "sshPort", "sshUser", "hostKey", "dns"}
RATE_LIMIT_KEYS = {"requestsPerSecond", "burst", "connections"}


@dataclass(frozen=True)
class RateLimit:
    requests_per_second: int = 20
    burst: int = 40
    connections: int = 50


@dataclass(frozen=True)
class Ssh:
    """How the program reaches a host over SSH (the private key is global and secret)."""

    host: str
    port: int
    user: str
    host_key: str | None


@dataclass(frozen=True)
class Origin:
    name: str
    domain: str
    subnet: int
    wireguard_ip: str
    endpoint: str
    listen_port: int
    upstream: str
    ssh: Ssh
    rate_limit: RateLimit
    zone_id: str | None

    interface = "wg0"


@dataclass(frozen=True)
class Edge:
    name: str
    origin: str
    public_ip: str
    index: int
    wireguard_ip: str
    ssh: Ssh
    dns: bool

    def interface(self, origin: Origin) -> str:
        return f"wg-origin-{origin.subnet}"


@dataclass(frozen=True)
class Settings:
    acme_email: str | None
    acme_server: str
    acme_ca_bundle: str | None
    network: ipaddress.IPv4Network
    ssh_user: str
    cloudflare_zone_id: str | None
    cert_refresh_interval: int


@dataclass(frozen=True)
class Topology:
    settings: Settings
    origins: tuple[Origin, ...]
    edges: tuple[Edge, ...]

    def origin(self, name: str) -> Origin:
        return next(o for o in self.origins if o.name == name)

    def edges_of(self, origin: Origin) -> tuple[Edge, ...]:
        """In index order, so that reordering the config changes nothing."""
        return tuple(sorted((e for e in self.edges if e.origin == origin.name), key=lambda e: e.index))

    def zone_for(self, origin: Origin) -> str | None:
        return origin.zone_id or self.settings.cloudflare_zone_id


@dataclass(frozen=True)
class Problem:
    """One invalid value: where it is and what is wrong with it."""

    entry: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.entry}: {self.key}: {self.message}"


class InvalidConfig(Exception):
    """The stack config has problems; nothing may be declared."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass
class _Checker:
    """Collects every problem instead of stopping at the first."""

    problems: list[Problem] = field(default_factory=list)

    def fail(self, entry: str, key: str, message: str) -> None:
        self.problems.append(Problem(entry, key, message))

    def string(self, entry: str, raw: Mapping[str, Any], key: str, pattern: re.Pattern[str],
               what: str, required: bool = True, default: str | None = None) -> str | None:
        value = raw.get(key)
        if value is None:
            if required:
                self.fail(entry, key, "is required")
            return default
        if not isinstance(value, str) or not pattern.match(value):
            self.fail(entry, key, f"{value!r} is not {what}")
            return default
        return value

    def integer(self, entry: str, raw: Mapping[str, Any], key: str, low: int, high: int,
                required: bool = True, default: int | None = None) -> int | None:
        value = raw.get(key)
        if value is None:
            if required:
                self.fail(entry, key, "is required")
            return default
        # YAML `true` is an int in Python; a port or allocation is never a boolean.
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(entry, key, f"{value!r} is not a whole number from {low} to {high}")
            return default
        return value

    def ipv4(self, entry: str, raw: Mapping[str, Any], key: str, required: bool = True) -> str | None:
        value = raw.get(key)
        if value is None:
            if required:
                self.fail(entry, key, "is required")
            return None
        try:
            address = ipaddress.IPv4Address(value) if isinstance(value, str) else None
        except ipaddress.AddressValueError:
            address = None
        if address is None or str(address) != value:
            self.fail(entry, key, f"{value!r} is not an IPv4 address like 198.51.100.7")
            return None
        if address.is_unspecified or address.is_loopback or address.is_multicast or address.is_reserved:
            self.fail(entry, key, f"{value} cannot be a public address (unspecified, loopback, "
                                  "multicast or reserved)")
            return None
        return value

    def host(self, entry: str, raw: Mapping[str, Any], key: str, default: str | None) -> str | None:
        value = raw.get(key, default)
        if value is None:
            self.fail(entry, key, "is required")
            return None
        if not isinstance(value, str) or not (_is_ipv4(value) or HOSTNAME_RE.match(value)):
            self.fail(entry, key, f"{value!r} is not an IPv4 address or host name")
            return None
        return value

    def keys(self, entry: str, raw: Mapping[str, Any], allowed: set[str]) -> None:
        for key in sorted(set(raw) - allowed):
            self.fail(entry, key, f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def unique(self, items: list[tuple[str, Any]], key: str, what: str) -> None:
        """`items` are (entry, value) pairs; every value after its first use is a problem."""
        seen: dict[Any, str] = {}
        for entry, value in items:
            if value is None:
                continue
            if value in seen:
                self.fail(entry, key, f"{what} {value!r} is already used by {seen[value]}")
            else:
                seen[value] = entry


def _is_ipv4(value: str) -> bool:
    try:
        return str(ipaddress.IPv4Address(value)) == value
    except ipaddress.AddressValueError:
        return False


def _entries(checker: _Checker, config: Mapping[str, Any], key: str) -> list[tuple[str, Mapping[str, Any]]]:
    """Label every list entry `kokoa:origins[i] (name)` so messages point at it."""
    raw = config.get(key, [])
    if raw is None:
        return []
    if not isinstance(raw, list):
        checker.fail(f"kokoa:{key}", key, "must be a list of entries")
        return []
    labelled = []
    for i, item in enumerate(raw):
        name = item.get("name") if isinstance(item, dict) else None
        label = f"kokoa:{key}[{i}]" + (f" ({name})" if isinstance(name, str) else "")
        if not isinstance(item, dict):
            checker.fail(label, key, "must be a mapping of keys to values")
            continue
        labelled.append((label, item))
    return labelled


def _settings(c: _Checker, config: Mapping[str, Any], needs_acme: bool) -> Settings:
    entry = "kokoa"
    network = ipaddress.IPv4Network(DEFAULT_NETWORK)
    raw_network = config.get("network", DEFAULT_NETWORK)
    try:
        candidate = ipaddress.IPv4Network(raw_network) if isinstance(raw_network, str) else None
    except ValueError:
        candidate = None
    if candidate is None or not candidate.is_private or candidate.prefixlen > 16:
        c.fail(entry, "network", f"{raw_network!r} is not a private IPv4 network of /16 or larger "
                                 "(origin X gets <net>.X.1), e.g. 10.100.0.0/16")
    else:
        network = candidate
    acme_email = c.string(entry, config, "acmeEmail", EMAIL_RE, "an e-mail address",
                          required=needs_acme)
    acme_server = c.string(entry, config, "acmeServer", re.compile(r"^https://[A-Za-z0-9.:/_-]+$"),
                           "an https:// ACME directory URL", required=False,
                           default=DEFAULT_ACME_SERVER)
    ca_bundle = config.get("acmeCaBundle")
    if ca_bundle is not None and (not isinstance(ca_bundle, str)
                                  or "-----BEGIN CERTIFICATE-----" not in ca_bundle):
        c.fail(entry, "acmeCaBundle", "must be PEM text with at least one CERTIFICATE block")
        ca_bundle = None
    return Settings(
        acme_email=acme_email,
        acme_server=acme_server,
        acme_ca_bundle=ca_bundle,
        network=network,
        ssh_user=c.string(entry, config, "sshUser", NAME_USER_RE, "a user name",
                          required=False, default="root"),
        cloudflare_zone_id=c.string(entry, config, "cloudflareZoneId", ZONE_ID_RE,
                                    "a 32-character hex Cloudflare zone id", required=False),
        cert_refresh_interval=c.integer(entry, config, "certRefreshInterval", 5, 86400,
                                        required=False, default=DEFAULT_CERT_REFRESH_INTERVAL),
    )


def _ssh(c: _Checker, entry: str, raw: Mapping[str, Any], default_host: str | None,
         default_user: str) -> Ssh:
    return Ssh(
        host=c.host(entry, raw, "host", default_host) or "",
        port=c.integer(entry, raw, "sshPort", 1, 65535, required=False, default=22),
        user=c.string(entry, raw, "sshUser", NAME_USER_RE, "a user name", required=False,
                      default=default_user),
        host_key=c.string(entry, raw, "hostKey", HOST_KEY_RE,
                          "an OpenSSH public host key like 'ssh-ed25519 AAAA...'", required=False),
    )


def _rate_limit(c: _Checker, entry: str, raw: Any) -> RateLimit:
    if raw is None:
        return RateLimit()
    if not isinstance(raw, dict):
        c.fail(entry, "rateLimit", "must be a mapping like {requestsPerSecond: 20, burst: 40, connections: 50}")
        return RateLimit()
    c.keys(f"{entry} rateLimit", raw, RATE_LIMIT_KEYS)
    defaults = RateLimit()
    return RateLimit(
        requests_per_second=c.integer(f"{entry} rateLimit", raw, "requestsPerSecond", 1, 100000,
                                      False, defaults.requests_per_second),
        burst=c.integer(f"{entry} rateLimit", raw, "burst", 0, 1000000, False, defaults.burst),
        connections=c.integer(f"{entry} rateLimit", raw, "connections", 1, 100000, False,
                              defaults.connections),
    )


def _address(network: ipaddress.IPv4Network, subnet: int, host: int) -> str:
    return str(network.network_address + subnet * 256 + host)


def parse_topology(config: Mapping[str, Any]) -> Topology:
    """Validate the `kokoa:` config (keys without the `kokoa:` prefix) and allocate addresses.

    Raises InvalidConfig listing every problem; returns a Topology only when there is none.
    """
    c = _Checker()
    origin_entries = _entries(c, config, "origins")
    edge_entries = _entries(c, config, "edges")
    settings = _settings(c, config, needs_acme=bool(origin_entries))

    origins: list[Origin] = []
    for entry, raw in origin_entries:
        c.keys(entry, raw, ORIGIN_KEYS)
        name = c.string(entry, raw, "name", NAME_RE, "a name matching ^[a-z][a-z0-9-]{0,30}$")
        domain = c.string(entry, raw, "domain", DOMAIN_RE, "a lower-case domain name like blog.example.com")
        subnet = c.integer(entry, raw, "subnet", *SUBNET_RANGE)
        ssh = _ssh(c, entry, raw, None, settings.ssh_user)
        endpoint = c.host(entry, raw, "endpoint", raw.get("host"))
        listen_port = c.integer(entry, raw, "listenPort", 1, 65535, False, DEFAULT_LISTEN_PORT)
        upstream = c.string(entry, raw, "upstream", UPSTREAM_RE,
                            "an http(s)://host[:port][/path] URL of the application")
        zone_id = c.string(entry, raw, "zoneId", ZONE_ID_RE, "a 32-character hex Cloudflare zone id",
                           required=False)
        rate_limit = _rate_limit(c, entry, raw.get("rateLimit"))
        if None in (name, domain, subnet, endpoint, listen_port, upstream) or not ssh.host:
            continue
        origins.append(Origin(name=name, domain=domain, subnet=subnet,
                              wireguard_ip=_address(settings.network, subnet, 1),
                              endpoint=endpoint, listen_port=listen_port, upstream=upstream,
                              ssh=ssh, rate_limit=rate_limit, zone_id=zone_id))

    labels = {o.name: e for (e, raw) in origin_entries for o in origins if raw.get("name") == o.name}
    c.unique([(labels[o.name], o.name) for o in origins], "name", "origin name")
    c.unique([(labels[o.name], o.domain) for o in origins], "domain", "domain")
    c.unique([(labels[o.name], o.subnet) for o in origins], "subnet", "subnet")
    # One wg0 per host: two origins on one server would overwrite each other's tunnel.
    c.unique([(labels[o.name], o.ssh.host) for o in origins], "host", "origin host")
    c.unique([(labels[o.name], (o.endpoint, o.listen_port)) for o in origins], "listenPort",
             "endpoint and port")

    origin_names = {o.name for o in origins}
    declared_origins = {raw.get("name") for _, raw in origin_entries}
    origin_addresses = {o.endpoint: o.name for o in origins} | {o.ssh.host: o.name for o in origins}
    edges: list[Edge] = []
    edge_labels: dict[int, str] = {}
    for entry, raw in edge_entries:
        c.keys(entry, raw, EDGE_KEYS)
        name = c.string(entry, raw, "name", NAME_RE, "a name matching ^[a-z][a-z0-9-]{0,30}$")
        origin_name = c.string(entry, raw, "origin", NAME_RE, "an origin name")
        if origin_name is not None and origin_name not in declared_origins:
            known = ", ".join(sorted(n for n in declared_origins if isinstance(n, str))) or "none"
            c.fail(entry, "origin", f"no origin is named {origin_name!r} (origins: {known})")
        public_ip = c.ipv4(entry, raw, "publicIp")
        index = c.integer(entry, raw, "index", *EDGE_INDEX_RANGE)
        ssh = _ssh(c, entry, raw, public_ip, settings.ssh_user)
        dns = raw.get("dns", True)
        if not isinstance(dns, bool):
            c.fail(entry, "dns", f"{dns!r} is not true or false")
        # The whole point of the product: an origin's address never goes into DNS.
        for key in ("publicIp", "host"):
            address = public_ip if key == "publicIp" else raw.get("host")
            if address in origin_addresses:
                c.fail(entry, key, f"{address} is the address of origin {origin_addresses[address]}; "
                                   "an edge must run on its own server")
        if None in (name, origin_name, public_ip, index) or not ssh.host or origin_name not in origin_names:
            continue
        origin = next(o for o in origins if o.name == origin_name)
        edge_labels[len(edges)] = entry
        edges.append(Edge(name=name, origin=origin_name, public_ip=public_ip, index=index,
                          wireguard_ip=_address(settings.network, origin.subnet, index),
                          ssh=ssh, dns=dns is not False))

    numbered = [(edge_labels[i], e) for i, e in enumerate(edges)]
    c.unique([(label, e.name) for label, e in numbered], "name", "edge name")
    c.unique([(label, e.public_ip) for label, e in numbered], "publicIp", "public IP")
    c.unique([(label, e.ssh.host) for label, e in numbered], "host", "edge host")
    c.unique([(label, (e.origin, e.index)) for label, e in numbered], "index", "origin and index")

    if c.problems:
        raise InvalidConfig(c.problems)
    return Topology(settings=settings, origins=tuple(origins), edges=tuple(edges))


# Allocation of the next free value, used by `kokoa add-origin` / `add-edge`.

def next_free(used: set[int], low: int, high: int, what: str) -> int:
    for candidate in range(low, high + 1):
        if candidate not in used:
            return candidate
    raise ValueError(f"no free {what} left ({low}..{high} are all taken)")


def next_subnet(origins: list[Mapping[str, Any]]) -> int:
    return next_free({o.get("subnet") for o in origins if isinstance(o.get("subnet"), int)},
                     *SUBNET_RANGE, "subnet")


def next_index(edges: list[Mapping[str, Any]], origin: str) -> int:
    return next_free({e.get("index") for e in edges
                      if e.get("origin") == origin and isinstance(e.get("index"), int)},
                     *EDGE_INDEX_RANGE, f"edge index for origin {origin}")

