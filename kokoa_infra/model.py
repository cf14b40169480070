"""Stack config → validated, allocated topology of origins and edges (no Pulumi here)."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from kokoa_infra.addressing import (EDGE_INDEX_RANGE, NETWORK_MAX_PREFIX, ORIGIN_HOST, SUBNET_RANGE, edge_interface,
                                    tunnel_address)

# Every pattern is applied with `fullmatch` (never `match` with `$`, which also accepts a
# trailing newline: "blog.example.com\n" would reach nginx.conf and the shell scripts).
NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,30}")
# Lower-case FQDN: at least two labels, letters/digits/hyphens, no leading/trailing hyphen,
# and a top-level label that is not all digits (so "203.0.113.10" is an address, not a domain).
# Also kokoa-dns's rule for a record name.
LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
DOMAIN_RE = re.compile(rf"(?=.{{1,253}}\Z){LABEL}(\.{LABEL})*\.(?![0-9]+\Z){LABEL}")
HOSTNAME_RE = re.compile(rf"(?=.{{1,253}}\Z){LABEL}(\.{LABEL})*")
# A host made only of digits and dots is an IPv4 address, never a host name: resolvers
# (inet_aton) read "203.000.113.010" as 203.0.113.8, and string comparisons miss that it
# is an origin's address.
DIGITS_AND_DOTS_RE = re.compile(r"[0-9.]+")
# What else inet_aton (and so ping, curl, ssh, wg) reads as an IPv4 address: one to four
# parts, each decimal, octal or 0x-hex ("0xcb00710a", "0xcb.0.113.10"). A host name of this
# form would pass for a name while it is an address.
INET_ATON_RE = re.compile(r"((0x[0-9a-f]*|[0-9]+)\.){0,3}(0x[0-9a-f]*|[0-9]+)", re.IGNORECASE)
EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]{1,64}@" + rf"{LABEL}(\.{LABEL})+", re.IGNORECASE)
HOST_KEY_RE = re.compile(r"(?P<type>[A-Za-z0-9@._-]{1,64}) (?P<data>[A-Za-z0-9+/]+={0,3})"
                         r"( [A-Za-z0-9@._-]{1,64})?")
# Host key types pulumi-command can pin (golang.org/x/crypto/ssh), with their curve and
# public point size; ssh-rsa is refused with its reason (RSA_HOST_KEY).
HOST_KEY_TYPES = {"ssh-ed25519": None, "ecdsa-sha2-nistp256": ("nistp256", 65),
                  "ecdsa-sha2-nistp384": ("nistp384", 97), "ecdsa-sha2-nistp521": ("nistp521", 133)}
RSA_HOST_KEY = ("an ssh-rsa host key cannot be pinned: pulumi-command offers only SHA-1 ssh-rsa "
                "signatures for RSA host keys, which OpenSSH 8.8 and later refuse, so the connection "
                "would fail; use the host's ed25519 key ({scan})")
NAME_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
ZONE_ID_RE = re.compile(r"[0-9a-f]{32}")
ACME_SERVER_RE = re.compile(r"https://[A-Za-z0-9.:/_-]+")
UPSTREAM_RE = re.compile(
    r"(?P<scheme>https?)://(?P<host>[A-Za-z0-9.-]+|\[[0-9a-fA-F:]+\])(:(?P<port>[0-9]{1,5}))?"
    r"(?P<path>/[A-Za-z0-9._~/-]*)?")

DEFAULT_NETWORK = "10.100.0.0/16"
DEFAULT_ACME_SERVER = "https://acme-v02.api.letsencrypt.org/directory"
DEFAULT_LISTEN_PORT = 51820
DEFAULT_CERT_REFRESH_INTERVAL = 300
DEFAULT_SSH_ALLOW_FROM = ("0.0.0.0/0",)
EVERYONE = "0.0.0.0/0"
# Mozilla's recommendation: two years. 0 = no Strict-Transport-Security header.
DEFAULT_HSTS_MAX_AGE = 63072000
HSTS_MAX_AGE_RANGE = (0, 2 * DEFAULT_HSTS_MAX_AGE)
PORT_RANGE = (1, 65535)
# What the consuming tools accept (tests/unit/test_model.py and tests/netns/test_model_limits.py check each bound with them).
# nginx: rate=0r/s and burst=0 are "invalid"; limit_conn "must be less 65536". The upper
# bounds of rate and burst are sanity limits (nginx itself accepts more).
REQUESTS_PER_SECOND_RANGE = (1, 100000)
BURST_RANGE = (1, 1000000)
CONNECTIONS_RANGE = (1, 65535)
# nftables `limit rate N/second burst M packets`: a rate of 0 is refused by the kernel,
# "packet limit burst must be > 0".
NEW_CONNECTIONS_PER_SECOND_RANGE = (1, 1000000)
NEW_CONNECTIONS_BURST_RANGE = (1, 1000000)
THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
# Origin capacity and the challenge (docs/security.md, "Distributed floods"). nginx's
# limit_conn takes at most 65535; a share is also an upstream's max_conns.
CONCURRENT_REQUESTS_RANGE = (1, 65535)
UNDER_ATTACK_MODES = ("off", "auto", "on")
# Leading zero bits of SHA-256 a browser must find: 2^16 hashes on average at the default,
# about 0.1 s in desktop Chromium and well under a second on a phone (docs/performance.md).
DEFAULT_CHALLENGE_DIFFICULTY = 16
CHALLENGE_DIFFICULTY_RANGE = (8, 24)
# A prefix nginx takes as a plain `location` and that cannot leave it (no space, brace,
# semicolon, quote or `#`): unreserved URL characters only.
PATH_PREFIX_RE = re.compile(r"/[A-Za-z0-9._~/-]{0,199}")
MAX_EXEMPT_PATHS = 50
MAX_STREAMING_PATHS = 50
# One certificate carries every name of an origin: Let's Encrypt issues at most 100 names per
# certificate, the domain among them.
MAX_NAMES_PER_ORIGIN = 100
# Seconds an upgraded (WebSocket) or streaming connection may stay silent before the edge and
# the gateway close it. nginx takes any time; an hour is a sanity bound (an application that
# keeps a connection open longer sends pings).
DEFAULT_IDLE_TIMEOUT = 60
IDLE_TIMEOUT_RANGE = (1, 3600)
# The largest request body, in nginx's size syntax (client_max_body_size: a number, then k or
# m; g is refused to keep the bound readable). The default is what every edge and gateway
# accepted before the key existed. The bound: a body is held on the edge (docs/security.md,
# "Request bodies") until it is complete, in the edge's body space.
DEFAULT_MAX_BODY_SIZE = "16m"
MAX_BODY_SIZE_RE = re.compile(r"(?P<number>[1-9][0-9]{0,9})(?P<unit>[kKmM]?)")
MAX_BODY_SIZE_RANGE = (1024, 1024 * 1024 * 1024)
MAX_ALLOW_FROM = 100
# An edge's web ports: they go through the flood shield and nginx, never to sshd.
EDGE_WEB_PORTS = (80, 443)

# Every `kokoa:` config key, in one place. Top level: read as strings, or as JSON/YAML values
# (`config.get_object`); the secret one is read apart. Entries: in the order an added entry
# is written (`kokoa add-origin/add-edge`), as stacks/reference.yaml shows them.
STRING_KEYS = ("acmeEmail", "acmeServer", "acmeCaBundle", "network", "sshUser", "cloudflareZoneId")
OBJECT_KEYS = ("origins", "edges", "certRefreshInterval", "sshAllowFrom", "formerNames", "dnsFailover")
SECRET_KEYS = ("sshPrivateKey",)
ORIGIN_KEYS = ("name", "domain", "subnet", "host", "endpoint", "listenPort", "upstream", "sshPort",
               "sshUser", "hostKey", "insecureAnyHostKey", "rateLimit", "capacity", "underAttack",
               "allowFrom", "exemptPaths", "challengeDifficulty", "hstsMaxAge", "idleTimeout",
               "maxBodySize", "streamingPaths", "hostnames", "zoneId", "keyGeneration")
EDGE_KEYS = ("name", "origin", "publicIp", "index", "host", "sshPort", "sshUser", "hostKey",
             "insecureAnyHostKey", "dns", "keyGeneration")
RATE_LIMIT_KEYS = ("requestsPerSecond", "burst", "connections", "newConnectionsPerSecond",
                   "newConnectionsBurst")
CAPACITY_KEYS = ("concurrentRequests",)
HOSTNAME_KEYS = ("name", "upstream", "redirectTo")
# A Cloudflare A record's TTL, whoever writes it (the program's DnsRecords, kokoa-dns).
DNS_TTL = 60


@dataclass(frozen=True)
class RateLimit:
    """Per client address at every edge of an origin.

    nginx: requests per second, burst, concurrent connections. The edge's kernel firewall
    (nftables `limit rate N/second burst M packets`): new TCP connections on 80/443.
    Unset, the connection rate follows the request rate and the connection burst the
    request burst (at least 1).
    """

    requests_per_second: int = 20
    burst: int = 40
    connections: int = 50
    new_connections_per_second: int | None = None
    new_connections_burst: int | None = None

    def __post_init__(self) -> None:
        if self.new_connections_per_second is None:
            object.__setattr__(self, "new_connections_per_second", self.requests_per_second)
        if self.new_connections_burst is None:
            object.__setattr__(self, "new_connections_burst", max(self.burst, 1))


@dataclass(frozen=True)
class Defence:
    """What an origin's edges do beyond the per-address limits (docs/security.md).

    `capacity`: the most requests the application serves at once, split across the
    origin's edges; None = no bound. `under_attack`: "off" (no pass, no challenge), "auto"
    (a challenge for requests without a visitor pass while the origin is full; needs a
    capacity) or "on" (every request without a pass is challenged). `allow_from` (CIDRs)
    and `exempt_paths` (path prefixes) are never challenged.
    """

    capacity: int | None = None
    under_attack: str = "off"
    allow_from: tuple[str, ...] = ()
    exempt_paths: tuple[str, ...] = ()
    challenge_difficulty: int = DEFAULT_CHALLENGE_DIFFICULTY

    @property
    def passes(self) -> bool:
        """Whether the edges issue and check visitor passes (and load njs for it)."""
        return self.under_attack != "off"


@dataclass(frozen=True)
class Ssh:
    """How the program reaches a host over SSH (the private key is global and secret).

    `host_key` is None only when the entry says `insecureAnyHostKey: true`.
    """

    host: str
    port: int
    user: str
    host_key: str | None
    insecure_any_host_key: bool = False


@dataclass(frozen=True)
class Hostname:
    """One more name of an origin (kokoa:origins[].hostnames): served like its domain, sent to an
    application of its own (`upstream`), or answered at the edge with a 301 to `redirect_to`."""

    name: str
    upstream: str | None = None
    redirect_to: str | None = None


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
    hsts_max_age: int = DEFAULT_HSTS_MAX_AGE
    key_generation: int = 1
    defence: Defence = Defence()
    # Seconds an upgraded or streaming connection may stay silent (proxy_read/send_timeout).
    idle_timeout: int = DEFAULT_IDLE_TIMEOUT
    # nginx size syntax ("16m"), as client_max_body_size takes it.
    max_body_size: str = DEFAULT_MAX_BODY_SIZE
    # Path prefixes whose request bodies go to the origin as they arrive (not buffered first).
    streaming_paths: tuple[str, ...] = ()
    # Its other names, all on its one certificate and in DNS beside the domain.
    hostnames: tuple[Hostname, ...] = ()

    interface = "wg0"

    @property
    def names(self) -> tuple[str, ...]:
        """Every name of the origin, its domain first: the certificate's names, each with A records."""
        return (self.domain, *(h.name for h in self.hostnames))

    @property
    def edge_interface(self) -> str:
        """The WireGuard interface each of its edges has to it."""
        return edge_interface(self.subnet)


@dataclass(frozen=True)
class Edge:
    name: str
    origin: str
    public_ip: str
    index: int
    wireguard_ip: str
    ssh: Ssh
    dns: bool
    key_generation: int = 1



@dataclass(frozen=True)
class Settings:
    acme_email: str | None
    acme_server: str
    acme_ca_bundle: str | None
    network: ipaddress.IPv4Network
    ssh_user: str
    cloudflare_zone_id: str | None
    cert_refresh_interval: int
    # Networks allowed to reach SSH on every host, normalised ("198.51.100.0/24").
    ssh_allow_from: tuple[str, ...] = DEFAULT_SSH_ALLOW_FROM
    # `kokoa health --failover` owns the A records' name and comment (docs/dns.md).
    dns_failover: bool = False

    @property
    def ssh_open_to_everyone(self) -> bool:
        """Whether the allow list covers every address, in one network or several
        (0.0.0.0/1 and 128.0.0.0/1 are everyone too)."""
        networks = [ipaddress.IPv4Network(n) for n in self.ssh_allow_from]
        return list(ipaddress.collapse_addresses(networks)) == [ipaddress.IPv4Network(EVERYONE)]


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


# --- addresses --------------------------------------------------------------------------

def parse_ipv4(value: str) -> ipaddress.IPv4Address | None:
    """The address when `value` is one in canonical dotted-quad form, else None."""
    try:
        address = ipaddress.IPv4Address(value)
    except ipaddress.AddressValueError:
        return None
    return address if str(address) == value else None


def canonical_ipv4(value: str) -> str | None:
    """"203.000.113.010" → "203.0.113.10": four decimal numbers 0..255, leading zeros dropped."""
    parts = value.split(".")
    if len(parts) == 4 and all(p.isascii() and p.isdigit() and int(p) <= 255 for p in parts):
        return ".".join(str(int(p)) for p in parts)
    return None


LEADING_ZEROS = "{value!r} has leading zeros, which some tools read as octal; write {canonical}"


def inet_aton_address(value: str) -> ipaddress.IPv4Address | None:
    """The address inet_aton reads in `value` ("0xcb00710a" and "3405803786" are
    203.0.113.10), else None."""
    if not INET_ATON_RE.fullmatch(value):
        return None
    try:
        numbers = [int(p, 16) if p.lower().startswith("0x") else int(p, 8) if p.startswith("0") and p != "0"
                   else int(p) for p in (p if p.lower() != "0x" else "0x0" for p in value.split("."))]
    except ValueError:  # "08": not octal, so inet_aton refuses it and it is no address
        return None
    # inet_aton: the last part fills the bytes the others leave (a.b.c.d, a.b.cd, a.bcd, abcd).
    last_bits = 8 * (5 - len(numbers))
    if any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 1 << last_bits:
        return None
    packed = 0
    for n in numbers[:-1]:
        packed = packed << 8 | n
    return ipaddress.IPv4Address(packed << last_bits | numbers[-1])


def numeric_host_problem(value: str) -> str | None:
    """Why a host of this inet_aton number form is refused, or None."""
    address = inet_aton_address(value)
    if address is None or str(address) == value:
        return None
    return (f"{value!r} is the IPv4 address {address} written as a number, which resolvers read as "
            f"that address; write {address}")


def ipv4_problem(value: str) -> str:
    """Why `value` is not a canonical IPv4 address, with the canonical form when it is clear."""
    canonical = canonical_ipv4(value)
    if canonical is not None:
        return LEADING_ZEROS.format(value=value, canonical=canonical)
    return f"{value!r} is not an IPv4 address like 198.51.100.7"


def _special(address: ipaddress.IPv4Address, *, loopback_ok: bool) -> str | None:
    """What makes `address` unfit as a server's address, or None."""
    if address in THIS_NETWORK:
        return "is unspecified (0.0.0.0/8)"
    if address.is_loopback and not loopback_ok:
        return "is a loopback address (127.0.0.0/8)"
    if address.is_link_local:
        return "is link-local / cloud metadata (169.254.0.0/16)"
    if address.is_multicast:
        return "is multicast (224.0.0.0/4)"
    if address.is_reserved:
        return "is reserved (240.0.0.0/4)"
    return None


def public_address_problem(address: ipaddress.IPv4Address) -> str | None:
    """Where a public address is meant (an edge's publicIp, an origin's endpoint).

    Private ranges stay allowed: origins often sit on private networks (and the lab uses
    172.31.255.0/24).
    """
    problem = _special(address, loopback_ok=False)
    return f"{address} {problem}, not a public address" if problem else None


def ssh_address_problem(address: ipaddress.IPv4Address) -> str | None:
    """Where the program's SSH connection goes (`host`).

    Loopback is allowed: an SSH tunnel on localhost (`ssh -L 2222:server:22 bastion`)
    is a legitimate way to reach a host. Unspecified, link-local (the cloud metadata
    service lives there), multicast and reserved addresses never reach a server's sshd.
    """
    problem = _special(address, loopback_ok=True)
    return f"{address} {problem}, not the address of a server's SSH" if problem else None


def _is_loopback(host: str) -> bool:
    address = parse_ipv4(host)
    return host == "localhost" or (address is not None and address.is_loopback)


def server_identity(ssh: Ssh) -> Any:
    """What identifies the server behind an SSH address: the address; on loopback (a
    tunnel per server) the tunnel's port too."""
    return ("loopback", ssh.port) if _is_loopback(ssh.host) else ssh.host


def _describe(ssh: Ssh) -> str:
    return f"{ssh.host!r} port {ssh.port}" if _is_loopback(ssh.host) else repr(ssh.host)


# --- host keys ----------------------------------------------------------------------------

def _ssh_strings(blob: bytes) -> list[bytes] | None:
    """The SSH wire-format strings (uint32 length + bytes) of `blob`, or None if malformed."""
    fields, position = [], 0
    while position < len(blob):  # each turn consumes at least 4 bytes
        if position + 4 > len(blob):
            return None
        length = int.from_bytes(blob[position:position + 4], "big")
        position += 4
        if position + length > len(blob):
            return None
        fields.append(blob[position:position + length])
        position += length
    return fields


def host_key_blob_ok(key_type: str, data: str) -> bool:
    """Whether `data` (base64) holds a public key of `key_type` of the right size."""
    try:
        blob = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return False
    fields = _ssh_strings(blob)
    if not fields or fields[0] != key_type.encode():
        return False
    curve = HOST_KEY_TYPES[key_type]
    if curve is None:
        return len(fields) == 2 and len(fields[1]) == 32
    name, point_size = curve
    return (len(fields) == 3 and fields[1] == name.encode() and len(fields[2]) == point_size
            and fields[2][:1] == b"\x04")


def keyscan_command(host: str | None, port: int | None) -> str:
    """The command that prints a host's ed25519 key, for messages."""
    port_option = f" -p {port}" if port not in (None, 22) else ""
    return f"ssh-keyscan -t ed25519{port_option} {host or 'HOST'}"


def host_key_problem(value: Any, scan: str) -> str | None:
    """Why `value` cannot pin a host's SSH key, or None (`scan`: see keyscan_command)."""
    match = HOST_KEY_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return f"{value!r} is not an OpenSSH public host key like 'ssh-ed25519 AAAA...'"
    key_type = match["type"]
    if key_type == "ssh-rsa" or key_type.startswith("rsa-sha2-"):
        return RSA_HOST_KEY.format(scan=scan)
    if key_type not in HOST_KEY_TYPES:
        return (f"key type {key_type!r} is not accepted: use the host's ssh-ed25519 (or "
                f"ecdsa-sha2-nistp256/384/521) key ({scan})")
    if not host_key_blob_ok(key_type, match["data"]):
        return f"the key data of {key_type} {match['data']!r} does not hold an {key_type} key"
    return None


# --- checks -------------------------------------------------------------------------------

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
        if not isinstance(value, str) or not pattern.fullmatch(value):
            self.fail(entry, key, f"{value!r} is not {what}")
            return default
        return value

    def integer(self, entry: str, raw: Mapping[str, Any], key: str, low: int, high: int | None,
                required: bool = True, default: int | None = None) -> int | None:
        value = raw.get(key)
        if value is None:
            if required:
                self.fail(entry, key, "is required")
            return default
        # YAML `true` is an int in Python; a port or allocation is never a boolean.
        if (isinstance(value, bool) or not isinstance(value, int) or value < low
                or (high is not None and value > high)):
            bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
            self.fail(entry, key, f"{value!r} is not a whole number {bounds}")
            return default
        return value

    def boolean(self, entry: str, raw: Mapping[str, Any], key: str, default: bool) -> bool | None:
        """The value, `default` when absent, None (reported) when not a boolean."""
        value = raw.get(key, default)
        if not isinstance(value, bool):
            self.fail(entry, key, f"{value!r} is not true or false")
            return None
        return value

    def public_ipv4(self, entry: str, raw: Mapping[str, Any], key: str) -> str | None:
        value = raw.get(key)
        if value is None:
            self.fail(entry, key, "is required")
            return None
        if not isinstance(value, str):
            self.fail(entry, key, f"{value!r} is not an IPv4 address like 198.51.100.7")
            return None
        address = parse_ipv4(value)
        if address is None:
            self.fail(entry, key, ipv4_problem(value))
            return None
        problem = public_address_problem(address)
        if problem:
            self.fail(entry, key, problem)
            return None
        return str(address)

    def host(self, entry: str, key: str, value: Any, public: bool) -> str | None:
        """An IPv4 address (normalised, checked as public or as SSH) or a host name."""
        if not isinstance(value, str):
            self.fail(entry, key, f"{value!r} is not an IPv4 address or host name")
            return None
        if DIGITS_AND_DOTS_RE.fullmatch(value):
            address = parse_ipv4(value)
            if address is None:
                self.fail(entry, key, ipv4_problem(value))
                return None
            problem = public_address_problem(address) if public else ssh_address_problem(address)
            if problem:
                self.fail(entry, key, problem)
                return None
            return str(address)
        numeric = numeric_host_problem(value)
        if numeric:
            self.fail(entry, key, numeric)
            return None
        if not HOSTNAME_RE.fullmatch(value):
            self.fail(entry, key, f"{value!r} is not an IPv4 address or host name")
            return None
        return value

    def keys(self, entry: str, raw: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
        for key in sorted(set(raw) - set(allowed)):
            self.fail(entry, key, f"unknown key (allowed: {', '.join(sorted(allowed))})")

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
        # A name with a newline or control character would break the one-line message.
        label = f"kokoa:{key}[{i}]" + (f" ({name})" if isinstance(name, str) and name.isprintable() else "")
        if not isinstance(item, dict):
            checker.fail(label, key, "must be a mapping of keys to values")
            continue
        labelled.append((label, item))
    return labelled


def _ssh_allow_from(c: _Checker, config: Mapping[str, Any]) -> tuple[str, ...]:
    """`kokoa:sshAllowFrom`: IPv4 networks that may reach SSH on every host."""
    raw = config.get("sshAllowFrom")
    if raw is None:
        return DEFAULT_SSH_ALLOW_FROM
    if not isinstance(raw, list):
        c.fail("kokoa", "sshAllowFrom", f"{raw!r} is not a list of IPv4 networks like "
                                        "[\"198.51.100.0/24\", \"203.0.113.5/32\"]")
        return DEFAULT_SSH_ALLOW_FROM
    if not raw:
        c.fail("kokoa", "sshAllowFrom", "is empty, which would lock the operator out of SSH on every "
                                        "host; list the networks you administer from, or remove the "
                                        "key to allow everyone (0.0.0.0/0)")
        return DEFAULT_SSH_ALLOW_FROM
    networks = _ipv4_networks(c, "kokoa", "sshAllowFrom", raw)
    return networks if networks is not None else DEFAULT_SSH_ALLOW_FROM


def _ipv4_networks(c: _Checker, entry: str, key: str, raw: list) -> tuple[str, ...] | None:
    """Each of `raw` as a normalised IPv4 network ("198.51.100.0/24"), or None when one is
    not (each reported as `key[i]`). A bare address is its /32."""
    networks = []
    for i, value in enumerate(raw):
        where = f"{key}[{i}]"
        if not isinstance(value, str):
            c.fail(entry, where, f"{value!r} is not an IPv4 network like 198.51.100.0/24")
            continue
        address, slash, prefix = value.partition("/")
        if slash and not (prefix.isascii() and prefix.isdigit() and str(int(prefix)) == prefix
                          and int(prefix) <= 32):
            c.fail(entry, where, f"{value!r} is not an IPv4 network like 198.51.100.0/24 "
                                 "(prefix length 0 to 32)")
            continue
        if parse_ipv4(address) is None:
            canonical = canonical_ipv4(address)
            c.fail(entry, where, LEADING_ZEROS.format(value=value, canonical=canonical + slash + prefix)
                   if canonical else f"{value!r} is not an IPv4 network like 198.51.100.0/24")
            continue
        try:
            network = ipaddress.IPv4Network(value)
        except ValueError:
            network = ipaddress.IPv4Network(value, strict=False)
            c.fail(entry, where, f"{value!r} has host bits set; write {network}")
            continue
        networks.append(str(network))
    return tuple(networks) if len(networks) == len(raw) else None


def _settings(c: _Checker, config: Mapping[str, Any], needs_acme: bool) -> Settings:
    entry = "kokoa"
    network = ipaddress.IPv4Network(DEFAULT_NETWORK)
    raw_network = config.get("network", DEFAULT_NETWORK)
    try:
        candidate = ipaddress.IPv4Network(raw_network) if isinstance(raw_network, str) else None
    except ValueError:
        candidate = None
    # Python counts loopback, link-local and 0.0.0.0/8 as private; no tunnel can use them.
    special = candidate and _special(candidate.network_address, loopback_ok=False)
    if candidate is None or not candidate.is_private or candidate.prefixlen > NETWORK_MAX_PREFIX:
        c.fail(entry, "network", f"{raw_network!r} is not a private IPv4 network of /{NETWORK_MAX_PREFIX} or larger "
                                 "(origin X gets <net>.X.1), e.g. 10.100.0.0/16")
    elif special:
        c.fail(entry, "network", f"{raw_network!r} {special}: tunnel addresses there do not route; use a "
                                 "private network such as 10.100.0.0/16")
    else:
        network = candidate
    acme_email = c.string(entry, config, "acmeEmail", EMAIL_RE, "an e-mail address",
                          required=needs_acme)
    acme_server = c.string(entry, config, "acmeServer", ACME_SERVER_RE,
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
        ssh_allow_from=_ssh_allow_from(c, config),
        dns_failover=bool(c.boolean(entry, config, "dnsFailover", False)),
    )


def _ssh(c: _Checker, entry: str, raw: Mapping[str, Any], default_user: str,
         default_host: str | None = None, has_default: bool = False) -> Ssh:
    """The entry's SSH settings. An edge's `host` defaults to its publicIp (`default_host`,
    already checked: when it is None its own problem is reported, not again as `host`)."""
    if raw.get("host") is not None:
        host = c.host(entry, "host", raw["host"], public=False)
    elif has_default:
        host = default_host
    else:
        c.fail(entry, "host", "is required")
        host = None
    port = c.integer(entry, raw, "sshPort", *PORT_RANGE, required=False, default=22)
    user = c.string(entry, raw, "sshUser", NAME_USER_RE, "a user name", required=False,
                    default=default_user)
    scan = keyscan_command(host, port)
    insecure = c.boolean(entry, raw, "insecureAnyHostKey", False)
    host_key = raw.get("hostKey")
    if insecure:
        if host_key is not None:
            c.fail(entry, "hostKey", "must be absent when insecureAnyHostKey is true (keep the "
                                     "pinned key and remove insecureAnyHostKey: it is the safe one)")
        host_key = None
    elif insecure is None:  # not a boolean, reported: the key's own checks would only add noise
        host_key = None
    elif host_key is None:
        c.fail(entry, "hostKey", f"is required: pin the server's SSH host key ({scan} prints it; "
                                 "kokoa add-origin/add-edge --scan-host-key records it), or set "
                                 "insecureAnyHostKey: true for a throwaway host")
    else:
        problem = host_key_problem(host_key, scan)
        if problem:
            c.fail(entry, "hostKey", problem)
            host_key = None
    return Ssh(host=host or "", port=port, user=user, host_key=host_key,
               insecure_any_host_key=bool(insecure))


def _rate_limit(c: _Checker, entry: str, raw: Any) -> RateLimit:
    if raw is None:
        return RateLimit()
    if not isinstance(raw, dict):
        c.fail(entry, "rateLimit", "must be a mapping like {requestsPerSecond: 20, burst: 40, connections: 50}")
        return RateLimit()
    where = f"{entry} rateLimit"
    c.keys(where, raw, RATE_LIMIT_KEYS)
    defaults = RateLimit()
    requests_per_second = c.integer(where, raw, "requestsPerSecond", *REQUESTS_PER_SECOND_RANGE,
                                    False, defaults.requests_per_second)
    burst = c.integer(where, raw, "burst", *BURST_RANGE, False, defaults.burst)
    return RateLimit(
        requests_per_second=requests_per_second,
        burst=burst,
        connections=c.integer(where, raw, "connections", *CONNECTIONS_RANGE, False,
                              defaults.connections),
        # None: derived from the request rate and burst (RateLimit.__post_init__).
        new_connections_per_second=c.integer(where, raw, "newConnectionsPerSecond",
                                             *NEW_CONNECTIONS_PER_SECOND_RANGE, False, None),
        new_connections_burst=c.integer(where, raw, "newConnectionsBurst",
                                        *NEW_CONNECTIONS_BURST_RANGE, False, None),
    )


def _defence(c: _Checker, entry: str, raw: Mapping[str, Any]) -> Defence:
    """capacity, underAttack, allowFrom, exemptPaths and challengeDifficulty of an origin."""
    capacity = None
    raw_capacity = raw.get("capacity")
    if raw_capacity is not None:
        if not isinstance(raw_capacity, dict):
            c.fail(entry, "capacity", "must be a mapping like {concurrentRequests: 8}")
        else:
            where = f"{entry} capacity"
            c.keys(where, raw_capacity, CAPACITY_KEYS)
            capacity = c.integer(where, raw_capacity, "concurrentRequests", *CONCURRENT_REQUESTS_RANGE)
    mode = raw.get("underAttack", "auto" if raw_capacity is not None else "off")
    if mode not in UNDER_ATTACK_MODES:
        c.fail(entry, "underAttack", f"{mode!r} is not one of {', '.join(UNDER_ATTACK_MODES)}")
        mode = "off"
    elif mode == "auto" and raw_capacity is None:
        c.fail(entry, "underAttack", "auto challenges visitors only while the origin is at its capacity: "
                                     "set capacity: {concurrentRequests: N} (the most requests the "
                                     "application serves at once), or use on or off")
    return Defence(
        capacity=capacity,
        under_attack=mode,
        allow_from=_origin_list(c, entry, raw, "allowFrom", MAX_ALLOW_FROM, "IPv4 networks like "
                                "[\"192.0.2.0/24\"]", lambda items: _ipv4_networks(c, entry, "allowFrom", items)),
        exempt_paths=_origin_list(c, entry, raw, "exemptPaths", MAX_EXEMPT_PATHS, "path prefixes like "
                                  "[\"/api/\"]", lambda items: _path_prefixes(c, entry, items)),
        challenge_difficulty=c.integer(entry, raw, "challengeDifficulty", *CHALLENGE_DIFFICULTY_RANGE, False,
                                       DEFAULT_CHALLENGE_DIFFICULTY),
    )


def _origin_list(c: _Checker, entry: str, raw: Mapping[str, Any], key: str, most: int, what: str,
                 parse) -> tuple[str, ...]:
    """An optional list `key` of at most `most` distinct items, each checked by `parse`."""
    value = raw.get(key)
    if value is None:
        return ()
    if not isinstance(value, list):
        c.fail(entry, key, f"{value!r} is not a list of {what}")
        return ()
    if len(value) > most:
        c.fail(entry, key, f"has {len(value)} entries; at most {most}")
        return ()
    items = parse(value)
    if items is None:
        return ()
    repeated = sorted({item for item in items if items.count(item) > 1})
    if repeated:
        c.fail(entry, key, f"lists {', '.join(repeated)} more than once")
        return ()
    return items


def _path_prefixes(c: _Checker, entry: str, raw: list, key: str = "exemptPaths") -> tuple[str, ...] | None:
    """Path prefixes that nginx takes as `location` prefixes and that match what they say."""
    prefixes = []
    for i, value in enumerate(raw):
        where = f"{key}[{i}]"
        if not isinstance(value, str) or not PATH_PREFIX_RE.fullmatch(value):
            c.fail(entry, where, f"{value!r} is not a path prefix like /api/ (a leading /, then at most "
                                 "199 of A-Z a-z 0-9 . _ ~ / -)")
        elif value == "/" and key == "exemptPaths":
            c.fail(entry, where, "'/' exempts every path, which is underAttack: off")
        elif "//" in value or any(part in (".", "..") for part in value.split("/")):
            # nginx matches the normalised path: such a prefix would never match anything.
            c.fail(entry, where, f"{value!r} has an empty, . or .. segment, which a normalised path never has")
        elif value.startswith("/.well-known/acme-challenge") and key == "exemptPaths":
            c.fail(entry, where, "ACME challenges are never challenged already")
        else:
            prefixes.append(value)
    return tuple(prefixes) if len(prefixes) == len(raw) else None


def _max_body_size(c: _Checker, entry: str, raw: Mapping[str, Any]) -> str:
    """maxBodySize: nginx's size syntax, within MAX_BODY_SIZE_RANGE."""
    value = raw.get("maxBodySize")
    if value is None:
        return DEFAULT_MAX_BODY_SIZE
    match = MAX_BODY_SIZE_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        c.fail(entry, "maxBodySize", f"{value!r} is not a size like 10m or 512k (a number, then k or m)")
        return DEFAULT_MAX_BODY_SIZE
    size = int(match["number"]) * {"": 1, "k": 1024, "m": 1024 * 1024}[match["unit"].lower()]
    low, high = MAX_BODY_SIZE_RANGE
    if not low <= size <= high:
        c.fail(entry, "maxBodySize", f"{value!r} is not from 1k to 1024m")
        return DEFAULT_MAX_BODY_SIZE
    return value


def _streaming_paths(c: _Checker, entry: str, raw: Mapping[str, Any]) -> tuple[str, ...]:
    """streamingPaths: path prefixes of the HTTPS server ("/" streams every body)."""
    return _origin_list(c, entry, raw, "streamingPaths", MAX_STREAMING_PATHS, "path prefixes like [\"/upload/\"]",
                        lambda items: _path_prefixes(c, entry, items, "streamingPaths"))


def _hostnames(c: _Checker, entry: str, raw: Mapping[str, Any],
               domain: str | None) -> list[tuple[str, Hostname]]:
    """hostnames: the origin's other names, each `{name, upstream?, redirectTo?}`; a redirect goes to
    a name of the same origin that is served (so there is no chain and no loop). The names that
    passed their own checks, each with its entry's label: whether all did, the checker's problems say."""
    value = raw.get("hostnames")
    if value is None:
        return []
    if not isinstance(value, list):
        c.fail(entry, "hostnames", f"{value!r} is not a list of names like [{{name: www.blog.example.com}}]")
        return []
    if len(value) >= MAX_NAMES_PER_ORIGIN:
        c.fail(entry, "hostnames", f"has {len(value)} names; with the domain an origin has at most "
                                   f"{MAX_NAMES_PER_ORIGIN} (all on one certificate): at most "
                                   f"{MAX_NAMES_PER_ORIGIN - 1} here")
        return []
    named: list[tuple[str, Hostname]] = []  # every entry whose name is valid, with where it is
    for i, item in enumerate(value):
        where = f"{entry} hostnames[{i}]"
        if not isinstance(item, dict):
            c.fail(entry, f"hostnames[{i}]", f"{item!r} is not a mapping like {{name: www.blog.example.com}}")
            continue
        c.keys(where, item, HOSTNAME_KEYS)
        name = c.string(where, item, "name", DOMAIN_RE, "a lower-case domain name like www.blog.example.com")
        upstream = _upstream(c, where, item) if item.get("upstream") is not None else None
        redirect_to = c.string(where, item, "redirectTo", DOMAIN_RE, "a name of this origin, like blog.example.com",
                               required=False)
        if item.get("upstream") is not None and item.get("redirectTo") is not None:
            c.fail(where, "redirectTo", "cannot go with upstream: a redirected name never reaches an "
                                        "application; keep one of the two")
        elif name is not None:
            named.append((where, Hostname(name, upstream, redirect_to)))
    redirects = {h.name: h.redirect_to for _, h in named if h.redirect_to}
    names = {domain, *(h.name for _, h in named)}
    for where, h in named:
        target = h.redirect_to
        if target is None:
            continue
        if target == h.name:
            c.fail(where, "redirectTo", f"{target} is this name itself; redirect to a name that is served, "
                                        f"such as {domain}")
        elif target in redirects:
            c.fail(where, "redirectTo", f"{target} is redirected itself (to {redirects[target]}); redirect "
                                        f"straight to a name that is served, such as {domain}")
        elif target not in names:
            c.fail(where, "redirectTo", f"{target} is not a name of this origin (its domain {domain} or one "
                                        "of its hostnames)")
    return named


def _unique_names(c: _Checker, names: list[tuple[str, str, str, bool]]) -> None:
    """Every domain and hostname once in the whole stack: `names` are (entry, key, name, is the
    domain), domains first, so that a hostname is reported, not the domain it takes. Two equal
    domains are the domain check's to report."""
    seen: dict[str, tuple[str, bool]] = {}
    for entry, key, name, is_domain in names:
        if name not in seen:
            seen[name] = (entry, is_domain)
        elif not (is_domain and seen[name][1]):
            c.fail(entry, key, f"{name} is already a name of {seen[name][0]}; a name belongs to one origin, once")


def _upstream(c: _Checker, entry: str, raw: Mapping[str, Any]) -> str | None:
    value = c.string(entry, raw, "upstream", UPSTREAM_RE,
                     "an http(s)://host[:port][/path] URL of the application")
    if value is None:
        return None
    match = UPSTREAM_RE.fullmatch(value)
    host, port = match["host"], match["port"]
    if DIGITS_AND_DOTS_RE.fullmatch(host) and parse_ipv4(host) is None:
        c.fail(entry, "upstream", f"{value!r}: host {ipv4_problem(host)}")
        return None
    if port is not None and not PORT_RANGE[0] <= int(port) <= PORT_RANGE[1]:
        c.fail(entry, "upstream", f"{value!r}: port {port} is not from 1 to 65535")
        return None
    numeric = numeric_host_problem(host)
    if numeric:
        c.fail(entry, "upstream", f"{value!r}: host {numeric}")
        return None
    problem = upstream_address_problem(host)
    if problem:
        c.fail(entry, "upstream", f"{value!r}: host {problem}")
        return None
    return value


def upstream_address_problem(host: str) -> str | None:
    """Why an upstream's address cannot be the application's (the gateway would proxy the
    edges' requests there), or None. Loopback is the usual application; the cloud metadata
    service (link-local), unspecified, multicast and reserved addresses never are."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None  # a host name
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif address.is_unspecified:
            return f"{address} is unspecified (::), not the address of an application"
        elif address.is_link_local:
            return f"{address} is link-local (fe80::/10), not the address of an application"
        elif address.is_multicast:
            return f"{address} is multicast (ff00::/8), not the address of an application"
        else:
            return None
    problem = _special(address, loopback_ok=True)
    return f"{address} {problem}, not the address of an application" if problem else None


def parse_topology(config: Mapping[str, Any]) -> Topology:
    """Validate the `kokoa:` config (keys without the `kokoa:` prefix) and allocate addresses.

    Raises InvalidConfig listing every problem; returns a Topology only when there is none.
    """
    c = _Checker()
    origin_entries = _entries(c, config, "origins")
    edge_entries = _entries(c, config, "edges")
    settings = _settings(c, config, needs_acme=bool(origin_entries))

    origins: list[Origin] = []
    # Every entry's values that passed their own checks, also of entries with problems
    # elsewhere: a duplicate is reported with the rest, not after the other fix.
    seen_origins: list[tuple[str, Any, Any, Any, Ssh, Any, Any]] = []
    other_names: list[tuple[str, str, str, bool]] = []  # the hostnames' (see _unique_names)
    for entry, raw in origin_entries:
        c.keys(entry, raw, ORIGIN_KEYS)
        name = c.string(entry, raw, "name", NAME_RE, "a name matching ^[a-z][a-z0-9-]{0,30}$")
        domain = c.string(entry, raw, "domain", DOMAIN_RE, "a lower-case domain name like blog.example.com")
        subnet = c.integer(entry, raw, "subnet", *SUBNET_RANGE)
        ssh = _ssh(c, entry, raw, settings.ssh_user)
        if raw.get("endpoint") is not None:
            endpoint = c.host(entry, "endpoint", raw["endpoint"], public=True)
        elif ssh.host and parse_ipv4(ssh.host) and public_address_problem(parse_ipv4(ssh.host)):
            # Fine for SSH (a tunnel on loopback), not as the address edges dial.
            c.fail(entry, "endpoint", f"is required when host is {ssh.host}: edges dial the endpoint, "
                                      "which must be a public address (default: host)")
            endpoint = None
        else:
            endpoint = ssh.host or None
        listen_port = c.integer(entry, raw, "listenPort", *PORT_RANGE, False, DEFAULT_LISTEN_PORT)
        upstream = _upstream(c, entry, raw)
        zone_id = c.string(entry, raw, "zoneId", ZONE_ID_RE, "a 32-character hex Cloudflare zone id",
                           required=False)
        rate_limit = _rate_limit(c, entry, raw.get("rateLimit"))
        hsts_max_age = c.integer(entry, raw, "hstsMaxAge", *HSTS_MAX_AGE_RANGE, False,
                                 DEFAULT_HSTS_MAX_AGE)
        key_generation = c.integer(entry, raw, "keyGeneration", 1, None, False, 1)
        defence = _defence(c, entry, raw)
        idle_timeout = c.integer(entry, raw, "idleTimeout", *IDLE_TIMEOUT_RANGE, False, DEFAULT_IDLE_TIMEOUT)
        max_body_size = _max_body_size(c, entry, raw)
        streaming_paths = _streaming_paths(c, entry, raw)
        hostnames = _hostnames(c, entry, raw, domain)
        other_names += [(where, "name", h.name, False) for where, h in hostnames]
        seen_origins.append((entry, name, domain, subnet, ssh, endpoint, listen_port))
        if None in (name, domain, subnet, endpoint, listen_port, upstream) or not ssh.host:
            continue
        origins.append(Origin(name=name, domain=domain, subnet=subnet,
                              wireguard_ip=tunnel_address(settings.network, subnet, ORIGIN_HOST),
                              endpoint=endpoint, listen_port=listen_port, upstream=upstream,
                              ssh=ssh, rate_limit=rate_limit, zone_id=zone_id,
                              hsts_max_age=hsts_max_age, key_generation=key_generation, defence=defence,
                              idle_timeout=idle_timeout, max_body_size=max_body_size,
                              streaming_paths=streaming_paths,
                              hostnames=tuple(h for _, h in hostnames)))

    c.unique([(label, name, repr(name)) for label, name, *_ in seen_origins], "name", "origin name",
             by_position=True)
    c.unique([(label, domain, repr(domain)) for label, _, domain, *_ in seen_origins], "domain", "domain")
    _unique_names(c, [(label, "domain", domain, True) for label, _, domain, *_ in seen_origins if domain]
                  + other_names)
    c.unique([(label, subnet, repr(subnet)) for label, _, _, subnet, *_ in seen_origins], "subnet", "subnet")
    # One wg0 per host: two origins on one server would overwrite each other's tunnel.
    c.unique([(label, server_identity(ssh) if ssh.host else None, _describe(ssh))
              for label, _, _, _, ssh, *_ in seen_origins], "host", "origin host")
    c.unique([(label, (endpoint, port) if None not in (endpoint, port) else None, repr((endpoint, port)))
              for label, _, _, _, _, endpoint, port in seen_origins], "listenPort", "endpoint and port")

    origin_names = {o.name for o in origins}
    declared_origins = {raw.get("name") for _, raw in origin_entries}
    # Addresses that are an origin's server: its endpoint, and its SSH host (on loopback
    # with the tunnel's port). An edge on any of them would put the origin into DNS.
    origin_addresses: dict[Any, str] = {}
    for o in origins:
        origin_addresses.setdefault(o.endpoint, o.name)
        origin_addresses.setdefault(server_identity(o.ssh), o.name)
    edges: list[Edge] = []
    seen_edges: list[tuple[str, Any, Any, Any, Any, Ssh]] = []
    defaulted_host: set[str] = set()
    for entry, raw in edge_entries:
        c.keys(entry, raw, EDGE_KEYS)
        name = c.string(entry, raw, "name", NAME_RE, "a name matching ^[a-z][a-z0-9-]{0,30}$")
        origin_name = c.string(entry, raw, "origin", NAME_RE, "an origin name")
        if origin_name is not None and origin_name not in declared_origins:
            known = ", ".join(sorted(n for n in declared_origins if isinstance(n, str))) or "none"
            c.fail(entry, "origin", f"no origin is named {origin_name!r} (origins: {known})")
        public_ip = c.public_ipv4(entry, raw, "publicIp")
        index = c.integer(entry, raw, "index", *EDGE_INDEX_RANGE)
        ssh = _ssh(c, entry, raw, settings.ssh_user, public_ip, has_default=True)
        dns = c.boolean(entry, raw, "dns", True)
        key_generation = c.integer(entry, raw, "keyGeneration", 1, None, False, 1)
        if ssh.port in EDGE_WEB_PORTS:
            # The firewall admits SSH before the flood shield: on 80/443 it would bypass it.
            c.fail(entry, "sshPort", f"{ssh.port} is one of the edge's web ports (80, 443), which go "
                                     "through the flood shield to nginx; give SSH another port")
        # The whole point of the product: an origin's address never goes into DNS.
        if public_ip is not None and public_ip in origin_addresses:
            c.fail(entry, "publicIp", f"{public_ip} is the address of origin "
                                      f"{origin_addresses[public_ip]}; an edge must run on its own server")
        elif raw.get("host") is not None and ssh.host and server_identity(ssh) in origin_addresses:
            c.fail(entry, "host", f"{ssh.host} is the address of origin "
                                  f"{origin_addresses[server_identity(ssh)]}; an edge must run on its own server")
        seen_edges.append((entry, name, origin_name if origin_name in declared_origins else None, public_ip,
                           index, ssh))
        if raw.get("host") is None:
            defaulted_host.add(entry)
        if None in (name, origin_name, public_ip, index, dns) or not ssh.host or origin_name not in origin_names:
            continue
        origin = next(o for o in origins if o.name == origin_name)
        edges.append(Edge(name=name, origin=origin_name, public_ip=public_ip, index=index,
                          wireguard_ip=tunnel_address(settings.network, origin.subnet, index),
                          ssh=ssh, dns=dns, key_generation=key_generation))

    c.unique([(label, name, repr(name)) for label, name, *_ in seen_edges], "name", "edge name", by_position=True)
    same_ip = c.unique([(label, ip, repr(ip)) for label, _, _, ip, *_ in seen_edges], "publicIp", "public IP")
    # An edge without `host` uses its publicIp: a duplicate publicIp is reported once, as such.
    c.unique([(label, server_identity(ssh) if ssh.host else None, _describe(ssh))
              for label, *_, ssh in seen_edges], "host", "edge host",
             quiet={label for label in same_ip if label in defaulted_host})
    c.unique([(label, (origin, index) if None not in (origin, index) else None, repr((origin, index)))
              for label, _, origin, _, index, _ in seen_edges], "index", "origin and index")

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

