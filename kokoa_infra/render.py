"""Settings, a node and keys → the files of the node's bundle, from the Jinja2 templates (no Pulumi here)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import hmac
import io
import ipaddress
import re
import tarfile
from dataclasses import dataclass
from typing import Iterable, Mapping

from kokoa_infra.addressing import TUNNEL_PREFIX
from kokoa_infra.admission import Admission
from kokoa_infra.model import Edge, Origin, RateLimit, Settings
from kokoa_infra.templating import TEMPLATES_DIR, environment

INSTALL_DIR = "/etc/kokoa/bundle"
ACME_WEBROOT = "/var/lib/kokoa/acme-webroot"
CERT_EXPORT_DIR = "/var/lib/kokoa/cert-export"
# The origin's tunnel gateway on its WireGuard IP: the application's door, and the port
# where the edges fetch the certificate and relay the ACME HTTP-01 challenges to.
GATEWAY_PORT = 80
CERT_PORT = 9080
# Debian's libnginx-mod-stream: the gateway relays TCP to an upstream without a path.
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
STREAM_PACKAGE = "libnginx-mod-stream"
# The gateway's workers: a system user of their own, so that an application running as
# www-data cannot read the TLS key exported to the edges.
GATEWAY_USER = "kokoa-gateway"
RENEW_INTERVAL = 12 * 3600
# Visitor passes and the challenge: Debian's libnginx-mod-http-js (njs 0.7.9 in bookworm)
# and the edge's own files for it, apart from the bundle so that nginx finds them.
JS_MODULE = "/usr/lib/nginx/modules/ngx_http_js_module.so"
JS_PACKAGE = "libnginx-mod-http-js"
EDGE_NGINX_DIR = "/etc/nginx/kokoa"
CHALLENGE_JS = "challenge.js"
PASS_KEY_CONF = "pass-key.conf"
# Files that hold a secret: written 0600 (file_mode).
PRIVATE_FILES = (PASS_KEY_CONF,)
PASS_KEY_RE = re.compile(r"[0-9a-f]{64}")
CONNECTION_REQUESTS_RANGE = (100, 1000)
# Client headers that frameworks or proxies read as the client's address, the scheme, the host
# or the path (Rails, Rack, Symfony, IIS, Akamai, Cloudflare, Fastly...): the edge and the
# gateway send them empty, that is not at all (docs/security.md, "What the application can trust").
DROPPED_CLIENT_HEADERS = ("True-Client-IP", "X-Client-IP", "Client-IP", "CF-Connecting-IP", "Fastly-Client-IP",
                          "X-Cluster-Client-IP", "X-Original-Forwarded-For", "Forwarded-For", "X-Forwarded",
                          "X-Original-URL", "X-Rewrite-URL", "X-Original-Host", "X-Host", "X-Forwarded-Server",
                          "X-Forwarded-Prefix", "X-Forwarded-Scheme", "X-Forwarded-Ssl", "X-Url-Scheme",
                          "Front-End-Https")
# A reload leaves open WebSockets, streams and uploads with the old workers (edge and gateway);
# after this many seconds they are closed and clients reconnect (docs/security.md).
WORKER_SHUTDOWN_TIMEOUT = 300
# The edge's request bodies beyond nginx's memory buffer: a tmpfs of BODY_SPACE_SIZE (of RAM,
# used only by what is written) that install.sh mounts, so a flood of uploads fills it and
# never the edge's disk (docs/security.md, "Request bodies").
# Debian's nginx has it as its default (--http-client-body-temp-path), named in nginx.conf so
# that no other build's default bypasses the tmpfs.
BODY_SPACE = "/var/lib/nginx/body"
BODY_SPACE_SIZE = "25%"
BODY_SPACE_UNIT = "var-lib-nginx-body.mount"  # systemd's name for a mount on BODY_SPACE
BODY_SPACE_OPTIONS = f"size={BODY_SPACE_SIZE},mode=0700,nosuid,nodev,noexec"
# The edge's traffic metrics (docs/health.md): mtail's program, its port on the edge's
# WireGuard address, nginx's stub_status on loopback, the root job that writes the counters
# only root can read (every COUNTERS_INTERVAL s) and where, and the access log's flush.
METRICS_PORT = 3903
STUB_STATUS_PORT = 3904
METRICS_DIR = "/etc/kokoa/metrics"
METRICS_STATE_DIR = "/run/kokoa-edge-metrics"
MTAIL_PROGRAM = "edge.mtail"
COUNTERS_INTERVAL = 5
LOG_FLUSH_S = 5
# The gateway's logs in /var/log/kokoa (gateway.conf.j2), and its relay's log when it relays.
GATEWAY_LOGS = ("gateway-access.log", "gateway-error.log")

BundleFiles = dict[str, str]
# gzip level of the bundles' archives: 5 % larger than -9 for these files in less than half
# its time (zlib's lazy matching starts at 4); every node's archive is made at every preview
# and up (docs/performance.md, "Evaluating the program").
ARCHIVE_LEVEL = 4


@dataclass(frozen=True)
class EdgePeer:
    """An edge as its origin's WireGuard config sees it."""

    edge: Edge
    public_key: str
    preshared_key: str
    # A keyed hash of the server the edge is on (components.node_server_tag); "" when unknown.
    server_tag: str = ""

    @property
    def key_holder(self) -> str:
        """How the origin records this edge among the holders of its TLS key: name and server."""
        return f"{self.edge.name}@{self.server_tag}" if self.server_tag else self.edge.name


ENV = environment()


def _render(template: str, **context) -> str:
    return ENV.get_template(template).render(**context)


def _common(settings: Settings, origin: Origin) -> dict:
    return {
        "settings": settings,
        "origin": origin,
        "install_dir": INSTALL_DIR,
        "acme_webroot": ACME_WEBROOT,
        "cert_export_dir": CERT_EXPORT_DIR,
        "cert_port": CERT_PORT,
        "gateway_user": GATEWAY_USER,
        "applications": applications(origin),
        "tunnel_prefix": TUNNEL_PREFIX,
        "ssh_allow_from": settings.ssh_allow_from,
        "dropped_headers": DROPPED_CLIENT_HEADERS,
        "worker_shutdown_timeout": WORKER_SHUTDOWN_TIMEOUT,
        "body_space": BODY_SPACE,
        "body_space_size": BODY_SPACE_SIZE,
        "body_space_unit": BODY_SPACE_UNIT,
        "body_space_options": BODY_SPACE_OPTIONS,
    }


def render_origin_bundle(settings: Settings, origin: Origin, private_key: str,
                         peers: list[EdgePeer]) -> BundleFiles:
    """Files an origin host needs: its WireGuard interface, tunnel gateway, certificate jobs.
    `peers`: the origin's edges (the components check that they serve it: model.check_serves)."""
    peers = sorted(peers, key=lambda p: p.edge.index)
    common = _common(settings, origin)
    relay = any(app.relay for app in common["applications"])
    ctx = common | {
        "private_key": private_key,
        "peers": peers,
        "renew_interval": RENEW_INTERVAL,
        # Whether any application's door is a TCP relay (nginx stream).
        "relay": relay,
        "stream_module": STREAM_MODULE,
        "stream_package": STREAM_PACKAGE,
        "gateway_logs": GATEWAY_LOGS + (("gateway-relay.log",) if relay else ()),
    }
    edges = [p.edge for p in peers]
    ctx["firewall"] = _render("common/firewall.nft.j2", **ctx, role="origin", node_name=origin.name,
                              ssh_port=origin.ssh.port, interface=origin.interface,
                              listen_port=origin.listen_port,
                              edge_endpoints=_ipv4s(a for e in edges for a in (e.public_ip, e.ssh.host)),
                              edge_tunnel=[e.wireguard_ip for e in edges])
    files = {
        "firewall.nft": ctx.pop("firewall"),
        "wg0.conf": _render("origin/wg0.conf.j2", **ctx),
        "gateway.conf": _render("origin/gateway.conf.j2", **ctx),
        "certificate.sh": _render("origin/certificate.sh.j2", **ctx),
        "install.sh": _render("origin/install.sh.j2", **ctx),
        "uninstall.sh": _render("origin/uninstall.sh.j2", **ctx),
        "logrotate.conf": _render("origin/logrotate.conf.j2", **ctx),
    }
    if settings.acme_ca_bundle:
        files["acme-ca.pem"] = settings.acme_ca_bundle
    return files


@functools.cache
def _challenge_script() -> str:
    """templates/edge/challenge.js: the same on every edge, read once per run."""
    return (TEMPLATES_DIR / "edge" / CHALLENGE_JS).read_text()


def health_token(pass_key: str, origin: Origin) -> str:
    """What `kokoa health` sends in `Kokoa-Health` so that its probe is never challenged:
    a MAC of the origin's name under its pass key (hex)."""
    return hmac.new(pass_key.encode(), f"kokoa-health|{origin.name}".encode(), hashlib.sha256).hexdigest()


def render_edge_bundle(settings: Settings, origin: Origin, edge: Edge, private_key: str, preshared_key: str,
                       origin_public_key: str, *, pass_key: str | None = None,
                       admission: Admission | None = None) -> BundleFiles:
    """Files an edge host needs: tunnel to its origin, nginx, certificate refresh, and where
    the origin has them, the pass and challenge (`pass_key`: the origin's, secret) and its
    share of the origin's capacity (`admission`, from admission.split_capacity). `edge` serves
    `origin` (the components check it: model.check_serves)."""
    defence = origin.defence
    if defence.passes and not PASS_KEY_RE.fullmatch(pass_key or ""):
        raise ValueError(f"origin {origin.name} has underAttack: {defence.under_attack}, which needs its pass "
                         "key (32 bytes, hex)")
    if (defence.capacity is None) != (admission is None):
        raise ValueError(f"edge {edge.name}: an admission goes with origin {origin.name}'s capacity, and only then")
    interface = origin.edge_interface
    ctx = _common(settings, origin) | {
        "edge": edge,
        "interface": interface,
        "private_key": private_key,
        "preshared_key": preshared_key,
        "origin_public_key": origin_public_key,
        "refresh_interval": settings.cert_refresh_interval,
        "tls_dir": f"/etc/letsencrypt/live/{origin.domain}",
        "defence": defence,
        "admission": admission,
        "limit_key": "$kokoa_visitor" if defence.passes else "$binary_remote_addr",
        "zone_prefix": "kokoa_visitor_" if defence.passes else "kokoa_",
        "connection_requests": connection_requests(origin.rate_limit),
        "edge_nginx_dir": EDGE_NGINX_DIR,
        "js_package": JS_PACKAGE,
        "js_module": JS_MODULE,
        "js_file": f"{EDGE_NGINX_DIR}/{CHALLENGE_JS}",
        "pass_key_file": f"{EDGE_NGINX_DIR}/{PASS_KEY_CONF}",
        "edge_listen_port": edge_listen_port(origin),
        "metrics_port": METRICS_PORT,
        "stub_status_port": STUB_STATUS_PORT,
        "metrics_dir": METRICS_DIR,
        "metrics_state_dir": METRICS_STATE_DIR,
        "counters_interval": COUNTERS_INTERVAL,
        "log_flush_s": LOG_FLUSH_S,
    }
    passes: BundleFiles = {}
    if defence.passes:
        passes = {
            CHALLENGE_JS: _challenge_script(),
            PASS_KEY_CONF: _render("edge/pass-key.conf.j2", origin=origin, pass_key=pass_key,
                                   health_token=health_token(pass_key, origin)),
        }
        ctx["js_digest"] = hashlib.sha256("".join(passes.values()).encode()).hexdigest()
    limits = origin.rate_limit
    return passes | {
        "firewall.nft": _render("common/firewall.nft.j2", **ctx, role="edge", node_name=edge.name,
                                ssh_port=edge.ssh.port, listen_port=origin.listen_port,
                                origin_endpoint=next(iter(_ipv4s([origin.endpoint])), ""),
                                shield=FloodShield(limits.new_connections_per_second,
                                                   limits.new_connections_burst, limits.connections)),
        f"{interface}.conf": _render("edge/wg-origin.conf.j2", **ctx),
        "nginx.conf": _render("edge/nginx.conf.j2", **ctx),
        "cert-refresh.sh": _render("edge/cert-refresh.sh.j2", **ctx),
        "edge-counters.sh": _render("edge/edge-counters.sh.j2", **ctx),
        MTAIL_PROGRAM: (TEMPLATES_DIR / "edge" / MTAIL_PROGRAM).read_text(),
        "install.sh": _render("edge/install.sh.j2", **ctx),
        "uninstall.sh": _render("edge/uninstall.sh.j2", **ctx),
    }


def edge_listen_port(origin: Origin) -> int:
    """The UDP port an edge's WireGuard listens on: its origin's listenPort. Fixed, so that
    the edge's firewall admits the origin's packets on that port alone (a random port
    would leave every port open to whoever spoofs the origin's address)."""
    return origin.listen_port


# New connections a second (and burst) that all sources the flood shield cannot track share
# at one edge: a bound that nginx serves with room to spare on one core.
UNTRACKED_NEW_PER_SECOND = 1000
UNTRACKED_NEW_BURST = 1000


def connection_requests(limits: RateLimit) -> int:
    """Requests one connection to an edge's HTTPS server may make (HTTP/2 above all): twice the
    burst, at least CONNECTION_REQUESTS_RANGE[0] so that a page with many resources loads on
    one connection, at most [1] (nginx's http-level keepalive_requests of the edge)."""
    low, high = CONNECTION_REQUESTS_RANGE
    return min(high, max(low, 2 * limits.burst))


@dataclass(frozen=True)
class FloodShield:
    """An edge's per-source limits in its kernel firewall (from the origin's rateLimit), and
    the budget shared by the sources it cannot track."""

    new_per_second: int
    new_burst: int
    open: int
    untracked_per_second: int = UNTRACKED_NEW_PER_SECOND
    untracked_burst: int = UNTRACKED_NEW_BURST


def _ipv4s(addresses: Iterable[str]) -> list[str]:
    """The IPv4 addresses among `addresses` (host names cannot go into a firewall set), sorted, once."""
    found = set()
    for address in addresses:
        try:
            found.add(ipaddress.IPv4Address(address))
        except ipaddress.AddressValueError:
            continue
    return [str(a) for a in sorted(found)]


@dataclass(frozen=True)
class Upstream:
    scheme: str
    host: str
    server: str  # host:port, as nginx's `server` takes it
    path: str  # "" or a prefix without a trailing "/"


@dataclass(frozen=True)
class Application:
    """One application behind an origin's gateway and the names the edges send to it: the
    origin's `upstream` first (its domain's), then each other `upstream` of its hostnames."""

    upstream: Upstream
    names: tuple[str, ...]
    # Its door: the gateway's port for it on the origin's WireGuard address, which the edges
    # choose by the name a request is for (so a relay needs no Host header to route).
    door: int
    # "" for the first; the upstream blocks of the edges and the gateway are named with it.
    suffix: str

    @property
    def relay(self) -> bool:
        """A path must be put in front of each request's URI, which takes an HTTP proxy;
        without one the gateway relays the edge's bytes as they are."""
        return not self.upstream.path


def applications(origin: Origin) -> tuple[Application, ...]:
    """The origin's applications in a fixed order (its upstream, then its hostnames' in the
    order they are listed), each with its names; a redirecting name has none."""
    names: dict[str, list[str]] = {origin.upstream: [origin.domain]}
    for hostname in origin.hostnames:
        if hostname.redirect_to is None:
            names.setdefault(hostname.upstream or origin.upstream, []).append(hostname.name)
    return tuple(Application(_upstream(url), tuple(served), GATEWAY_PORT + i, f"_{i}" if i else "")
                 for i, (url, served) in enumerate(names.items()))


def _upstream(url: str) -> Upstream:
    scheme, rest = url.split("://", 1)
    server, _, path = rest.partition("/")
    host = server.rsplit(":", 1)[0] if ":" in server.rsplit("]", 1)[-1] else server
    if ":" not in server.rsplit("]", 1)[-1]:
        server += ":443" if scheme == "https" else ":80"
    # The gateway sends the prefix and then the request URI as the client wrote it: /x
    # goes to /app/x (a URI part in proxy_pass would be decoded and normalised first).
    prefix = "/" + path.strip("/") if path.strip("/") else ""
    return Upstream(scheme=scheme, host=host.strip("[]"), server=server, path=prefix)


def file_mode(name: str) -> int:
    """Private files (keys) 0600, scripts 0755, the rest 0644."""
    if name.endswith(".sh"):
        return 0o755
    if (name.endswith(".conf") and name.startswith("wg")) or name in PRIVATE_FILES:
        return 0o600
    return 0o644


def bundle_archive(files: Mapping[str, str]) -> bytes:
    """A reproducible .tar.gz of a bundle: sorted names, fixed owner and times, real modes."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(files):
            data = files[name].encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = file_mode(name)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), compresslevel=ARCHIVE_LEVEL, mtime=0)
