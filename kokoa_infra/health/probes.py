"""The network side of `kokoa health`: ICMP echo through ping3, the HTTPS probe and the edges'
metrics through urllib3, and the pooled sweep."""

from __future__ import annotations

import ctypes
import errno
import functools
import math
import os
import resource
import socket
import ssl
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import ping3

from kokoa_infra.health.results import HostnameResult, HttpsResult, NodeResult, PingResult, Sweep
from kokoa_infra.health.targets import LocalNetwork, PingVia, Target, ping_address, wireguard_routable
from kokoa_infra.health.traffic import (
    MAX_METRICS_BYTES,
    METRICS_PATH,
    METRICS_PORT,
    MetricsFormatError,
    TrafficResult,
    parse_edge_metrics,
)

CHECKS = ("ping", "https")
PING_PAYLOAD_BYTES = 56
SO_ATTACH_FILTER = 26   # Linux <asm-generic/socket.h>; the socket module does not export it
# One ICMP identifier per process keeps our echoes apart from other pingers'; the
# sequence number (unique among pings in flight) tells ours apart from each other.
# ping3 ignores replies whose identifier is 0, hence `or 1`.
ICMP_ID = (zlib.crc32(f"kokoa-health-{os.getpid()}".encode()) & 0xFFFF) or 1
PING_PERMISSION_FIX = (
    "cannot open an ICMP socket ({error}). Run as root, or let unprivileged users send "
    "ICMP echo: `sysctl -w net.ipv4.ping_group_range=\"0 2147483647\"` (persist it in "
    "/etc/sysctl.d/), or grant CAP_NET_RAW (systemd: AmbientCapabilities=CAP_NET_RAW). "
    "Or leave ping out with --checks https.")


class PingPermissionError(Exception):
    """No ICMP socket can be opened; the message gives the fix."""


@dataclass(frozen=True)
class SweepOptions:
    """How one sweep probes."""

    checks: tuple[str, ...] = CHECKS
    timeout_s: float = 1.0
    count: int = 1
    https_timeout_s: float = 5.0
    ca_bundle: str | None = None
    concurrency: int = 256
    https_concurrency: int = 32
    ping_via: PingVia = "auto"
    https_port: int = 443
    # Scrape each edge's traffic metrics over the tunnel: "auto" the edges this host reaches
    # through a tunnel (on an origin: its own), "on" every edge, "off" none.
    traffic: str = "off"
    metrics_port: int = METRICS_PORT


class _BpfInstruction(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _BpfProgram(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_BpfInstruction))]


def _echo_filter(icmp_id: int, seq: int) -> list[tuple[int, int, int, int]]:
    """Classic BPF keeping only our echo reply (id, seq) and ICMP errors quoting our id.

    Every raw ICMP socket gets a copy of every ICMP packet the host receives: without this,
    each of a hundred sockets waiting on silent targets wakes Python for every reply to
    everyone else, and a 500-target sweep takes three times as long.
    """
    ldx_ip_header_len, ld_byte_x, ld_half_x = 0xB1, 0x50, 0x48
    jeq, ret = 0x15, 0x06
    return [
        (ldx_ip_header_len, 0, 0, 0),   # X = IP header length
        (ld_byte_x, 0, 0, 0),           # A = ICMP type
        (jeq, 0, 4, 0),                 # echo reply? else to 7
        (ld_half_x, 0, 0, 4),           # A = identifier
        (jeq, 0, 7, icmp_id),           # else drop
        (ld_half_x, 0, 0, 6),           # A = sequence
        (jeq, 4, 5, seq),               # accept : drop
        (jeq, 1, 0, 3),                 # destination unreachable?
        (jeq, 0, 3, 11),                # time exceeded? else drop
        (ld_half_x, 0, 0, 8 + 20 + 4),  # A = identifier of the quoted echo request
        (jeq, 0, 1, icmp_id),           # accept : drop
        (ret, 0, 0, 0x40000),
        (ret, 0, 0, 0),
    ]


def _attach_echo_filter(sock: socket.socket, icmp_id: int, seq: int) -> None:
    code = _echo_filter(icmp_id, seq)
    instructions = (_BpfInstruction * len(code))(*(_BpfInstruction(*op) for op in code))
    program = _BpfProgram(len(code), instructions)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                    ctypes.string_at(ctypes.addressof(program), ctypes.sizeof(program)))


def open_icmp_socket() -> tuple[socket.socket, bool]:
    """Open an ICMP socket as ping3 does (raw, else an unprivileged ping socket); return (socket, is_raw)."""
    try:
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP), True
    except PermissionError as exc:
        if exc.errno != errno.EPERM:
            raise PingPermissionError(PING_PERMISSION_FIX.format(error=exc.strerror)) from exc
    try:
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP), False
    except PermissionError as exc:
        raise PingPermissionError(PING_PERMISSION_FIX.format(error=exc.strerror)) from exc


def check_ping_permission() -> None:
    """Raise PingPermissionError (with the fix) when this process may not send ICMP echo."""
    sock, _ = open_icmp_socket()
    sock.close()


def _ping_error_text(exc: BaseException) -> str:
    if isinstance(exc, ping3.errors.Timeout):
        return "timeout"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc) or type(exc).__name__


def echo(address: str, timeout_s: float, seq: int) -> float:
    """Send one ICMP echo with ping3 and return the round trip in seconds; raise on no reply."""
    sock, is_raw = open_icmp_socket()
    with sock:
        if is_raw:
            _attach_echo_filter(sock, ICMP_ID, seq)
        ping3.send_one_ping(sock=sock, dest_addr=address, icmp_id=ICMP_ID, seq=seq,
                            size=PING_PAYLOAD_BYTES)
        return ping3.receive_one_ping(sock=sock, icmp_id=ICMP_ID, seq=seq, timeout=timeout_s)


def ping_target(address: str, via: str, timeout_s: float, count: int, first_seq: int) -> PingResult:
    """Ping `count` times one after another; ok when at least one echo came back."""
    rtts: list[float] = []
    error: str | None = None
    for attempt in range(count):
        try:
            rtts.append(echo(address, timeout_s, (first_seq + attempt) & 0xFFFF))
        except (ping3.errors.PingError, OSError) as exc:
            error = _ping_error_text(exc)
    rtt_ms = round(sum(rtts) / len(rtts) * 1000, 3) if rtts else None
    return PingResult(ok=bool(rtts), address=address, via=via, rtt_ms=rtt_ms, sent=count,
                      received=len(rtts), error=None if rtts else error)


def _https_error_text(exc: BaseException) -> str:
    import urllib3.exceptions as http_errors
    from urllib3.util.ssl_match_hostname import CertificateError as HostnameMismatch

    if isinstance(exc, http_errors.SSLError):
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {reason.verify_message}"
        if isinstance(reason, HostnameMismatch):
            return f"certificate verify failed: {reason}"
        return f"TLS error: {reason}"
    # NewConnectionError subclasses ConnectTimeoutError: test it first.
    if isinstance(exc, http_errors.NewConnectionError):
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, OSError) and cause.strerror:
            return f"connect failed: {cause.strerror}"
        return "connect failed"
    if isinstance(exc, http_errors.ConnectTimeoutError):
        return "timeout while connecting"
    if isinstance(exc, http_errors.ReadTimeoutError):
        return "timeout waiting for the response"
    if isinstance(exc, http_errors.ProtocolError):
        return f"connection broken: {exc.args[0] if exc.args else exc}"
    return str(exc) or type(exc).__name__


def _cert_days_left(peer_cert: dict | None, now: float) -> int | None:
    if not peer_cert or "notAfter" not in peer_cert:
        return None
    return math.floor((ssl.cert_time_to_seconds(peer_cert["notAfter"]) - now) / 86400)


@functools.cache
def _cert_recording_pool_class() -> type:
    """An urllib3 HTTPS pool whose connections keep the peer certificate.

    Imported on first use: urllib3 adds a tenth of a second to a ping-only start.
    """
    import urllib3

    class CertRecordingConnection(urllib3.connection.HTTPSConnection):
        # http.client drops the socket as soon as a response says "Connection: close",
        # so the certificate is read right after the handshake instead.
        peer_cert: dict | None = None

        def connect(self) -> None:
            super().connect()
            self.peer_cert = self.sock.getpeercert()

    class CertRecordingPool(urllib3.HTTPSConnectionPool):
        ConnectionCls = CertRecordingConnection

    return CertRecordingPool


def probe_https(domain: str, address: str, timeout_s: float, ca_bundle: str | None = None,
                port: int = 443, health_token: str | None = None, redirect_to: str | None = None) -> HttpsResult:
    """GET https://<domain>/ from `address` (SNI and Host = domain, certificate verified).

    With its origin's `health_token`, the edge never answers the probe with its challenge
    (underAttack on, or auto at capacity): the probe goes through to the origin.

    ok = an HTTP response with a status below 500: a 502/504 is the edge saying the
    tunnel or the origin behind it failed, while a 404 or a redirect still proves the path.
    A name that `redirect_to`s another is answered by the edge itself: ok = its 301 to
    https://<redirect_to>/.
    """
    import urllib3

    pool = _cert_recording_pool_class()(
        address, port, server_hostname=domain, assert_hostname=domain, ca_certs=ca_bundle,
        cert_reqs="CERT_REQUIRED", maxsize=1, retries=False,
        timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s))
    started = time.monotonic()
    try:
        headers = {"Host": domain, "User-Agent": "kokoa-health", "Connection": "close"}
        if health_token:
            headers["Kokoa-Health"] = health_token
        response = pool.urlopen(
            "GET", "/", headers=headers,
            preload_content=False, redirect=False, retries=False)
        latency_ms = round((time.monotonic() - started) * 1000, 3)
        peer_cert = getattr(response.connection, "peer_cert", None)
        response.close()
    except Exception as exc:  # every failure of the probe is a result, not a crash
        return HttpsResult(ok=False, code=None, latency_ms=None, cert_days_left=None,
                           error=_https_error_text(exc))
    finally:
        pool.close()
    code, location = response.status, response.headers.get("Location")
    if redirect_to is None:
        error = None if code < 500 else f"HTTP {code}"
    else:
        expected = f"https://{redirect_to}/"
        error = (None if code == 301 and location == expected
                 else f"HTTP {code} to {location or 'nowhere'}, not a 301 to {expected}")
    return HttpsResult(ok=error is None, code=code, latency_ms=latency_ms,
                       cert_days_left=_cert_days_left(peer_cert, time.time()), error=error, location=location)


def fit_file_descriptors(options: SweepOptions) -> SweepOptions:
    """Raise the open-files soft limit to fit both pools, or shrink the pools to fit it."""
    needed = options.concurrency + options.https_concurrency + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return options
    budget = max(2, soft - 64)
    https_share = max(1, min(options.https_concurrency, budget // 4))
    return replace(options, concurrency=max(1, budget - https_share),
                   https_concurrency=https_share)


def scrapes_traffic(target: Target, options: SweepOptions, local: LocalNetwork) -> bool:
    """Whether this sweep scrapes the edge's metrics (at its WireGuard address, through the tunnel)."""
    if target.role != "edge" or options.traffic == "off":
        return False
    return options.traffic == "on" or wireguard_routable(target.wireguard_ip, local)


def scrape_edge(address: str, port: int = METRICS_PORT, timeout_s: float = 3.0) -> TrafficResult:
    """GET http://address:port/metrics (through the tunnel) within `timeout_s`; every failure is a result."""
    import urllib3

    where = f"{address}:{port}"
    pool = urllib3.HTTPConnectionPool(address, port, maxsize=1, retries=False,
                                      timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s))
    try:
        response = pool.urlopen("GET", METRICS_PATH, headers={"User-Agent": "kokoa-health"},
                                preload_content=False, redirect=False, retries=False)
        try:
            body = response.read(MAX_METRICS_BYTES + 1, decode_content=True)
        finally:
            response.release_conn()
        if response.status != 200:
            return TrafficResult(ok=False, address=where, error=f"metrics: HTTP {response.status}")
        if len(body) > MAX_METRICS_BYTES:
            return TrafficResult(ok=False, address=where, error="metrics: answer too large")
        return TrafficResult(ok=True, address=where, counters=parse_edge_metrics(body.decode("utf-8", "replace")))
    except MetricsFormatError as exc:
        return TrafficResult(ok=False, address=where, error=f"metrics: {exc}")
    except Exception as exc:  # unreachable, refused, timed out: reported, never zero traffic
        return TrafficResult(ok=False, address=where, error=f"metrics: {_https_error_text(exc)}")
    finally:
        pool.close()


def run_sweep(targets: list[Target], options: SweepOptions, local: LocalNetwork,
              ping: Callable[..., PingResult] = ping_target,
              https: Callable[..., HttpsResult] = probe_https,
              scrape: Callable[..., TrafficResult] = scrape_edge) -> Sweep:
    """Probe every target once, pings and HTTPS probes in two bounded pools at the same time; the
    edges' metrics are scraped in the HTTPS pool, each within the HTTPS timeout."""
    checked_at = datetime.now(timezone.utc)
    started = time.monotonic()
    ping_pool = ThreadPoolExecutor(options.concurrency, thread_name_prefix="kokoa-ping")
    https_pool = ThreadPoolExecutor(options.https_concurrency, thread_name_prefix="kokoa-https")
    pings: dict[int, Future[PingResult]] = {}
    # Every name of an edge's origin through that edge: the domain first, then its hostnames.
    probes: dict[int, list[Future[HttpsResult]]] = {}
    scrapes: dict[int, Future[TrafficResult]] = {}
    try:
        for index, target in enumerate(targets):
            if "https" in options.checks and target.role == "edge":
                probes[index] = [https_pool.submit(
                    https, name, target.public_ip, options.https_timeout_s, options.ca_bundle, options.https_port,
                    health_token=target.health_token, redirect_to=redirect)
                    for name, redirect in ((target.domain, None),
                                           *((h.name, h.redirect_to) for h in target.hostnames))]
        for index, target in enumerate(targets):
            if scrapes_traffic(target, options, local):
                scrapes[index] = https_pool.submit(scrape, str(target.wireguard_ip), options.metrics_port,
                                                   options.https_timeout_s)
        for index, target in enumerate(targets):
            if "ping" in options.checks:
                address, via = ping_address(target, local, options.ping_via)
                pings[index] = ping_pool.submit(ping, address, via, options.timeout_s,
                                                options.count, index * options.count)
        nodes = []
        for index, target in enumerate(targets):
            if index not in pings and index not in probes:
                continue
            domain, *others = [probe.result() for probe in probes.get(index, [])] or [None]
            nodes.append(NodeResult(target=target, ping=pings[index].result() if index in pings else None,
                                    https=domain, traffic=scrapes[index].result() if index in scrapes else None,
                                    hostnames=tuple(HostnameResult(h.name, result)
                                                    for h, result in zip(target.hostnames, others))))
    finally:
        # On Ctrl-C, drop what has not started; what has started ends within its timeout.
        ping_pool.shutdown(wait=False, cancel_futures=True)
        https_pool.shutdown(wait=False, cancel_futures=True)
    return Sweep(checked_at=checked_at, duration_s=time.monotonic() - started,
                 checks=options.checks, nodes=nodes)
