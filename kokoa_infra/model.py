"""A topology of origins and edges, and every `kokoa:` config key, declared once each.

Each field declared with `key(...)` is a key of the stack config: its name (the field's, in
camelCase), kind, default and doc line are all there is to it (kokoa_infra/schema.py says how
a declaration drives validation, the stack file editor, stacks/reference.yaml and
docs/configuration.md). kokoa_infra/validate.py turns a config into these (no Pulumi here).
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Any, Iterable

from kokoa_infra.addressing import EDGE_INDEX_RANGE, SUBNET_RANGE, edge_interface
from kokoa_infra.schema import (
    Choice,
    Entries,
    Flag,
    FormerNames,
    Group,
    Host,
    HostKey,
    Ipv4Network,
    ListOf,
    PathPrefix,
    Pem,
    PrivateNetwork,
    PublicAddress,
    Secret,
    Size,
    Text,
    Upstream,
    Whole,
    derived,
    inline,
    key,
)
from kokoa_infra.values import (
    ACME_SERVER_RE,
    DOMAIN_RE,
    EMAIL_RE,
    EVERYONE,
    NAME_RE,
    NAME_USER_RE,
    PORT_RANGE,
    ZONE_ID_RE,
    is_loopback,
)

# A Cloudflare A record's TTL, whoever writes it (the program's DnsRecords, kokoa-dns).
DNS_TTL = 60
DEFAULT_NETWORK = "10.100.0.0/16"
DEFAULT_SSH_ALLOW_FROM = (EVERYONE,)
# Mozilla's recommendation: two years. 0 = no Strict-Transport-Security header.
DEFAULT_HSTS_MAX_AGE = 63072000
# Leading zero bits of SHA-256 a browser must find: 2^16 hashes on average at the default,
# about 0.1 s in desktop Chromium and well under a second on a phone (docs/performance.md).
DEFAULT_CHALLENGE_DIFFICULTY = 16
UNDER_ATTACK_MODES = ("off", "auto", "on")
# An edge's web ports: they go through the flood shield and nginx, never to sshd.
EDGE_WEB_PORTS = (80, 443)
EDGE_HOST_KEY_EXAMPLE = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHWlfEcfu/rR7vL8BL5mkIgaCMqvg96KINyFut7g19WF"
HOST_KEY_EXAMPLE = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ"

NAME = Text(NAME_RE, "a name matching ^[a-z][a-z0-9-]{0,30}$")
ZONE_ID = Text(ZONE_ID_RE, "a 32-character hex Cloudflare zone id")
USER = Text(NAME_USER_RE, "a user name")
PORT = Whole(*PORT_RANGE)
KEY_GENERATION = Whole(1)
HOST_KEY_DOC = ("the server's SSH host key, ssh-ed25519 or ecdsa-sha2-nistp256/384/521 (`ssh-keyscan -t ed25519 "
                "HOST`, or kokoa add-origin/add-edge --scan-host-key); ssh-rsa is refused: pulumi-command signs "
                "RSA with SHA-1 ssh-rsa, which OpenSSH >= 8.8 refuses")
INSECURE_DOC = ("instead of hostKey, for a throwaway host only: accept ANY host key (every preview and up "
                "warns, naming the node)")


@dataclass(frozen=True, kw_only=True)
class RateLimit:
    """Per client address at every edge of an origin.

    nginx: requests per second, burst, concurrent connections. The edge's kernel firewall
    (nftables `limit rate N/second burst M packets`): new TCP connections on 80/443.
    Unset, the connection rate follows the request rate and the connection burst the
    request burst (at least 1).
    """

    # What the consuming tools accept (tests/unit/test_model.py and tests/netns/test_model_limits.py
    # check each bound with them). nginx: rate=0r/s and burst=0 are "invalid"; limit_conn "must be
    # less 65536". The upper bounds of rate and burst are sanity limits (nginx itself accepts more).
    requests_per_second: int = key(Whole(1, 100000), default=20, doc="nginx limit_req rate per client address")
    burst: int = key(Whole(1, 1000000), default=40, doc="nginx limit_req burst")
    connections: int = key(Whole(1, 65535), default=50, doc="nginx limit_conn: concurrent connections per address")
    # nftables `limit rate N/second burst M packets`: a rate of 0 is refused by the kernel,
    # "packet limit burst must be > 0".
    new_connections_per_second: int | None = key(
        Whole(1, 1000000), default_doc="requestsPerSecond", example=20,
        doc="new TCP connections a second on 80/443 the edge's firewall (nftables) accepts from one address")
    new_connections_burst: int | None = key(Whole(1, 1000000), default_doc="burst", example=40,
                                            doc="their burst")

    def __post_init__(self) -> None:
        if self.new_connections_per_second is None:
            object.__setattr__(self, "new_connections_per_second", self.requests_per_second)
        if self.new_connections_burst is None:
            object.__setattr__(self, "new_connections_burst", max(self.burst, 1))


@dataclass(frozen=True, kw_only=True)
class Capacity:
    # nginx's limit_conn takes at most 65535; a share is also an upstream's max_conns.
    concurrent_requests: int = key(Whole(1, 65535), required=True, example=8,
                                   doc="the most requests the application serves at once; over it a fast 503 "
                                       "(Retry-After), or the challenge, never a queue")


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


class _ReachedOverSsh:
    """A node's SSH keys (host, sshPort, sshUser, hostKey, insecureAnyHostKey) as one Ssh."""

    @functools.cached_property
    def ssh(self) -> Ssh:
        return Ssh(self.host, self.ssh_port, self.ssh_user, self.host_key, self.insecure_any_host_key)


# One certificate carries every name of an origin: Let's Encrypt issues at most 100 names per
# certificate, the domain among them.
MAX_NAMES_PER_ORIGIN = 100


@dataclass(frozen=True, kw_only=True)
class Hostname:
    """One more name of an origin: served like its domain, sent to an application of its own
    (`upstream`), or answered at the edge with a 301 to `redirect_to`."""

    name: str = key(Text(DOMAIN_RE, "a lower-case domain name like www.blog.example.com"), required=True,
                    example="www.blog.example.com",
                    doc="another name of the origin, on its certificate and in DNS beside its domain; unique in "
                        "the stack")
    upstream: str | None = key(Upstream(), default_doc="the origin's upstream", example="http://127.0.0.1:9000",
                               shown=False, doc="this name's own application, as the origin's upstream")
    redirect_to: str | None = key(Text(DOMAIN_RE, "a name of this origin, like blog.example.com"),
                                  example="blog.example.com",
                                  doc="answered at the edge with a 301 to https://<that name>$request_uri: a "
                                      "served name of the same origin (not with upstream)")


@dataclass(frozen=True, kw_only=True)
class Origin(_ReachedOverSsh):
    name: str = key(NAME, required=True, example="blog", doc="unique among origins")
    domain: str = key(Text(DOMAIN_RE, "a lower-case domain name like blog.example.com"), required=True,
                      example="blog.example.com", doc="the site's domain, unique among origins")
    subnet: int = key(Whole(*SUBNET_RANGE), required=True, example=0,
                      doc="unique; the origin's WireGuard IP is <net>.<subnet>.1 (kokoa add-origin picks the "
                          "next free one)")
    host: str = key(Host(public=False), required=True, example="203.0.113.10",
                    doc="SSH address, one origin per host; may be loopback (an SSH tunnel), never link-local or "
                        "multicast")
    endpoint: str = key(Host(public=True), default_doc="host", example="203.0.113.10",
                        doc="the address edges dial: public (not loopback, link-local, multicast or reserved; "
                            "private ranges are fine)")
    listen_port: int = key(PORT, default=51820, doc="WireGuard UDP port")
    upstream: str = key(Upstream(), required=True, example="http://127.0.0.1:8080",
                        doc="the application as seen from the origin host")
    ssh_port: int = key(PORT, default=22, doc="SSH port")
    ssh_user: str = key(USER, default_doc="kokoa:sshUser", example="root", doc="SSH user")
    host_key: str | None = key(HostKey(), default_doc="required unless insecureAnyHostKey", example=HOST_KEY_EXAMPLE,
                               doc=HOST_KEY_DOC)
    insecure_any_host_key: bool = key(Flag(), default=False, example=True, shown=False, doc=INSECURE_DOC)
    rate_limit: RateLimit = key(Group(RateLimit, "{requestsPerSecond: 20, burst: 40, connections: 50}"),
                                default=RateLimit(), doc="per client address at every edge")
    capacity: Capacity | None = key(Group(Capacity, "{concurrentRequests: 8}"), example={"concurrentRequests": 8},
                                    doc="the origin's capacity, split across its edges (docs/security.md, "
                                        "\"Distributed floods\")")
    under_attack: str = key(Choice(UNDER_ATTACK_MODES), default_doc="auto with capacity, else off", example="auto",
                            doc="auto: a challenge for requests without a visitor pass while the origin is at "
                                "capacity; on: for every request without a pass")
    allow_from: tuple[str, ...] = key(ListOf(Ipv4Network(), 'IPv4 networks like ["192.0.2.0/24"]', most=100),
                                      default=(), example=["198.51.100.0/24"],
                                      doc="IPv4 networks never challenged (monitoring)")
    exempt_paths: tuple[str, ...] = key(ListOf(PathPrefix(exempt=True), 'path prefixes like ["/api/"]', most=50),
                                        default=(), example=["/api/", "/hooks/"],
                                        doc="path prefixes never challenged (clients that run no script); over "
                                            "capacity they get the 503")
    challenge_difficulty: int = key(Whole(8, 24), default=DEFAULT_CHALLENGE_DIFFICULTY,
                                    doc="leading zero bits of SHA-256 the challenge asks a browser for; each bit "
                                        "doubles its work")
    hsts_max_age: int = key(Whole(0, 2 * DEFAULT_HSTS_MAX_AGE), default=DEFAULT_HSTS_MAX_AGE,
                            doc="Strict-Transport-Security max-age in seconds; 0 = no header")
    # nginx takes any time; an hour is a sanity bound (an application that keeps a connection
    # open longer sends pings).
    idle_timeout: int = key(Whole(1, 3600), default=60,
                            doc="seconds an open WebSocket or a streaming response may stay silent at the edge "
                                "and gateway")
    # The default is what every edge and gateway accepted before the key existed. The bound: a
    # body is held on the edge (docs/security.md, "Request bodies") until it is complete.
    max_body_size: str = key(Size(1024, 1024 ** 3), default="16m",
                             doc="the largest request body (nginx client_max_body_size); bigger ones get 413 at "
                                 "the edge")
    streaming_paths: tuple[str, ...] = key(ListOf(PathPrefix(), 'path prefixes like ["/upload/"]', most=50),
                                           default=(), example=["/upload/"],
                                           doc="path prefixes whose request bodies go to the origin as they "
                                               "arrive instead of being buffered at the edge first (costs: "
                                               "docs/security.md, \"Request bodies\")")
    hostnames: tuple[Hostname, ...] = key(Entries(Hostname), default=(),
                                          doc="more names of this origin, all on its one certificate, each "
                                              "with A records on every serving edge (at most 99)")
    zone_id: str | None = key(ZONE_ID, example="023e105f4ecef8ad9ca31a8372d0c353",
                              doc="this domain's Cloudflare zone; overrides kokoa:cloudflareZoneId")
    key_generation: int = key(KEY_GENERATION, default=1, doc="raise it to rotate this node's WireGuard key")

    wireguard_ip: str = derived()

    interface = "wg0"

    @property
    def names(self) -> tuple[str, ...]:
        """Every name of the origin, its domain first: the certificate's names, each with A records."""
        return (self.domain, *(h.name for h in self.hostnames))

    @property
    def edge_interface(self) -> str:
        """The WireGuard interface each of its edges has to it."""
        return edge_interface(self.subnet)

    @functools.cached_property
    def defence(self) -> Defence:
        return Defence(capacity=self.capacity.concurrent_requests if self.capacity else None,
                       under_attack=self.under_attack, allow_from=self.allow_from, exempt_paths=self.exempt_paths,
                       challenge_difficulty=self.challenge_difficulty)


@dataclass(frozen=True, kw_only=True)
class Edge(_ReachedOverSsh):
    name: str = key(NAME, required=True, example="edge-tokyo-1", doc="unique among edges")
    origin: str = key(Text(NAME_RE, "an origin name"), required=True, example="blog", doc="the origin it serves")
    public_ip: str = key(PublicAddress(), required=True, example="198.51.100.7",
                         doc="unique, never an origin's address: the A record's content")
    index: int = key(Whole(*EDGE_INDEX_RANGE), required=True, example=10,
                     doc="unique within its origin: WireGuard IP <net>.<subnet>.<index> (kokoa add-edge picks the "
                         "next free one)")
    host: str = key(Host(public=False), default_doc="publicIp", example="198.51.100.7",
                    doc="SSH address (may be loopback: a tunnel)")
    ssh_port: int = key(PORT, default=22, doc="SSH port; not 80 or 443, which go through the flood shield")
    ssh_user: str = key(USER, default_doc="kokoa:sshUser", example="root", doc="SSH user")
    host_key: str | None = key(HostKey(), default_doc="required unless insecureAnyHostKey",
                               example=EDGE_HOST_KEY_EXAMPLE,
                               doc=HOST_KEY_DOC)
    insecure_any_host_key: bool = key(Flag(), default=False, example=True, shown=False, doc=INSECURE_DOC)
    dns: bool = key(Flag(), default=True, doc="false = drained: kept and running, no A record")
    key_generation: int = key(KEY_GENERATION, default=1, doc="raise it to rotate this edge's WireGuard key")

    wireguard_ip: str = derived()


@dataclass(frozen=True, kw_only=True)
class Settings:
    acme_email: str | None = key(Text(EMAIL_RE, "an e-mail address"), default_doc="required with any origin",
                                 example="ops@example.com", doc="the ACME account e-mail for the certificates")
    acme_server: str = key(Text(ACME_SERVER_RE, "an https:// ACME directory URL"),
                           default="https://acme-v02.api.letsencrypt.org/directory",
                           doc="ACME directory; staging while testing: "
                               "https://acme-staging-v02.api.letsencrypt.org/directory")
    acme_ca_bundle: str | None = key(Pem(), example="-----BEGIN CERTIFICATE-----\n...", shown=False,
                                     doc="the CA that signed the ACME server's own TLS certificate (a private ACME "
                                         "server such as the lab's pebble); not needed for Let's Encrypt")
    network: ipaddress.IPv4Network = key(PrivateNetwork(), default=ipaddress.IPv4Network(DEFAULT_NETWORK),
                                         doc="the tunnels' network: origin X is <net>.X.1, its edges "
                                             "<net>.X.10-254")
    cert_refresh_interval: int = key(Whole(5, 86400), default=300,
                                     doc="seconds between an edge's certificate refreshes from its origin")
    ssh_user: str = key(USER, default="root", doc="SSH user for every host unless an entry sets sshUser")
    # Networks allowed to reach SSH on every host, normalised ("198.51.100.0/24").
    ssh_allow_from: tuple[str, ...] = key(
        ListOf(Ipv4Network(), 'IPv4 networks like ["198.51.100.0/24", "203.0.113.5/32"]', distinct=False,
               empty="is empty, which would lock the operator out of SSH on every host; list the networks you "
                     "administer from, or remove the key to allow everyone (0.0.0.0/0)"),
        default=DEFAULT_SSH_ALLOW_FROM, example=["198.51.100.0/24", "203.0.113.5/32"],
        doc="IPv4 networks (CIDR, host bits zero, an address is /32) allowed to reach SSH on every host; the "
            "default is everyone, and every preview then warns that SSH is open to the internet")
    cloudflare_zone_id: str | None = key(ZONE_ID, example="023e105f4ecef8ad9ca31a8372d0c353",
                                         doc="the Cloudflare zone of the domains; absent = no DNS resources (the "
                                             "dnsRecords output lists the A records to create)")
    # `kokoa health --failover` owns the A records' name and comment (docs/dns.md).
    dns_failover: bool = key(Flag(), default=False,
                             doc="true: `kokoa health --failover` takes an edge that keeps failing its HTTPS "
                                 "probe out of DNS and puts it back once it passes; the program then ignores "
                                 "changes to the records' name and comment (docs/dns.md)")

    @property
    def ssh_open_to_everyone(self) -> bool:
        """Whether the allow list covers every address, in one network or several
        (0.0.0.0/1 and 128.0.0.0/1 are everyone too)."""
        networks = [ipaddress.IPv4Network(n) for n in self.ssh_allow_from]
        return list(ipaddress.collapse_addresses(networks)) == [ipaddress.IPv4Network(EVERYONE)]


@dataclass(frozen=True, kw_only=True)
class Topology:
    """The whole `kokoa:` config: the settings (top-level keys), the origins and the edges."""

    settings: Settings = inline()
    ssh_private_key_set: bool = key(Secret(), default=False, name="sshPrivateKey",
                                doc="the OpenSSH private key that reaches every host: pulumi config set --secret "
                                    "kokoa:sshPrivateKey < ~/.ssh/kokoa_ed25519 (the model keeps only whether it "
                                    "is set)", default_doc="required with any origin or edge")
    origins: tuple[Origin, ...] = key(Entries(Origin), default=(), doc="the sites and the servers they run on")
    edges: tuple[Edge, ...] = key(Entries(Edge), default=(), doc="the servers that serve them")
    # A renamed node keeps its resources through these aliases: without them the engine creates
    # the new name's resources and then deletes the old ones, whose uninstall would wipe the
    # server the node stays on.
    former_names: dict[str, tuple[str, ...]] = key(
        FormerNames(), default={}, example={"edge-tokyo-1": "edge-old-tokyo-1"}, shown=False,
        doc="the former names of renamed nodes, {node: old name or [old names]}: a renamed node keeps its "
            "resources (docs/operations.md, \"Moving or renaming a node\")")

    def origin(self, name: str) -> Origin:
        return next(o for o in self.origins if o.name == name)

    def edges_of(self, origin: Origin) -> tuple[Edge, ...]:
        """In index order, so that reordering the config changes nothing."""
        return tuple(sorted((e for e in self.edges if e.origin == origin.name), key=lambda e: e.index))

    def zone_for(self, origin: Origin) -> str | None:
        return origin.zone_id or self.settings.cloudflare_zone_id


def check_serves(origin: Origin, edges: Iterable[Edge]) -> None:
    """That every one of `edges` serves `origin`, or ValueError naming each that does not.
    A topology pairs them so (Topology.edges_of); the components check what they are given."""
    strangers = [f"edge {e.name} serves origin {e.origin}, not {origin.name}" for e in edges if e.origin != origin.name]
    if strangers:
        raise ValueError("; ".join(strangers))


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


def server_identity(ssh: Ssh) -> Any:
    """What identifies the server behind an SSH address: the address; on loopback (a
    tunnel per server) the tunnel's port too."""
    return ("loopback", ssh.port) if is_loopback(ssh.host) else ssh.host


def describe_server(ssh: Ssh) -> str:
    return f"{ssh.host!r} port {ssh.port}" if is_loopback(ssh.host) else repr(ssh.host)
