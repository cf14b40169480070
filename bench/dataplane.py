"""`make bench`: the edge data plane per hop, against a bare reference built in the same run, and under floods.

Brings up a lab of its own (prefix `kokoab-`, directory /var/lib/kokoa-lab-bench), whose
origins serve a static nginx, and measures with wrk (1 thread, 32 connections):

  direct        the application, inside the origin's namespace
  tunnel        the origin's gateway through WireGuard, from the edge's namespace
  edge          client -> edge HTTPS -> tunnel -> gateway -> application (limits lifted)
  bare tunnel   the same parts by hand with no Kokoa file: wireguard-go with defaults
  bare edge     ... and nginx TLS with upstream keepalive in front of it (no gateway)

then, with the stack's own limits, a legitimate client (new TLS connection per request,
10 req/s) with no flood, against one attacker address with 200 connections, against 20
attacker addresses with 10 connections each, and against one address with 200 HTTP/2
streams at a time (h2load), where a 429 cannot close the connection. Rounds are interleaved and the median
kept, because this machine is shared and noisy: compare the ratios, not the absolutes.

Every wrk and client run is bounded in time; all traffic stays in the namespaces this
script makes; the lab and everything in it is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kokoa_infra.lab.deploy import STACK_FILE, load_stack, up, verify_sites  # noqa: E402
from kokoa_infra.lab.hosts import DEFAULT_INIT, INIT_SYSTEMS, Host, topology  # noqa: E402
from kokoa_infra.lab.lab import Lab, lab_unavailable  # noqa: E402
from kokoa_infra.lab.processes import LabError, run  # noqa: E402
from kokoa_infra.model import RateLimit  # noqa: E402
from kokoa_infra.schema import declared_keys  # noqa: E402

LAB_DIR = Path("/var/lib/kokoa-lab-bench")
PREFIX = "kokoab-"
SITE = "shop"  # the origin under test: one edge, so every request takes the same path
BARE_SITE = "bare.kokoa.test"
BARE_TUNNEL = ("10.200.0.1", "10.200.0.2")
RESULTS = REPO / "bench" / "results" / "dataplane.json"
LIFTED = {"requestsPerSecond": 100000, "burst": 1000000, "connections": 65535,
          "newConnectionsPerSecond": 1000000, "newConnectionsBurst": 1000000}

TARGETS = {
    "edge / direct": 0.15,
    "edge / bare edge": 0.6,
    "one-address flood: p99 / no-flood p99 (at most)": 1.5,
    "20-address flood: p99 / no-flood p99 (at most)": 2.0,
    "HTTP/2 one-address flood: p99 / no-flood p99 (at most)": 1.5,
}


def site_of(status: dict[str, Any]) -> tuple[dict, dict]:
    """The origin under test and its one edge, as `kokoa lab status` lists them."""
    origin = next(o for o in status["origins"] if o["name"] == SITE)
    edge = next(e for e in status["edges"] if e["origin"] == SITE)
    return origin, edge


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class WrkResult:
    requests: int
    seconds: float
    non_2xx: int
    socket_errors: dict[str, int]
    latency_ms: float
    connections: int | None = None  # connections opened (h2load), when known

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def served_rate(self) -> float:
        """Answered with 2xx/3xx per second: what an attacker actually got served."""
        return (self.requests - self.non_2xx) / self.seconds if self.seconds else 0.0


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_wrk(text: str) -> WrkResult:
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m),", text)
    if not done:
        raise LabError(f"unexpected wrk output:\n{text}")
    latency = re.search(r"Latency\s+([\d.]+)(us|ms|s|m)", text)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(
        requests=int(done.group(1)),
        seconds=float(done.group(2)) * _UNITS[done.group(3)] / 1000,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=dict(zip(("connect", "read", "write", "timeout"),
                               map(int, errors.groups()))) if errors else {},
        latency_ms=float(latency.group(1)) * _UNITS[latency.group(2)] if latency else 0.0,
    )


def parse_h2load(text: str, seconds: float) -> WrkResult:
    """The summaries of successive h2load runs (one connection each) as one WrkResult: answers,
    refused (4xx/5xx), connections opened, and requests that got no answer (in `read`)."""
    codes = re.findall(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    done = re.findall(r"requests: (\d+) total, \d+ started, \d+ done, \d+ succeeded, \d+ failed", text)
    if not codes or len(codes) != len(done):
        raise LabError(f"unexpected h2load output:\n{text[-2000:]}")
    answered = sum(int(n) for run in codes for n in run)
    return WrkResult(requests=answered, seconds=seconds, non_2xx=sum(int(r[2]) + int(r[3]) for r in codes),
                     socket_errors={"connect": 0, "read": sum(int(t) for t in done) - answered,
                                    "write": 0, "timeout": 0},
                     latency_ms=0.0, connections=len(codes))


def wrk_argv(url: str, seconds: float, connections: int, host: str | None = None) -> list[str]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s"]
    if host:
        argv += ["-H", f"Host: {host}"]
    return argv + [url]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class OnTheLab:
    """What a benchmark on its own lab knows: the lab, and what its last deployment reported."""

    lab: Lab
    status: dict[str, Any]

    @property
    def topology(self):
        return topology(load_stack(STACK_FILE), self.lab.prefix)

    def site(self) -> tuple[dict, dict]:
        return site_of(self.status)


@dataclass
class Bench(OnTheLab):
    lab: Lab
    seconds: float
    rounds: int
    status: dict[str, Any] = field(default_factory=dict)
    bare_hosts: tuple[Host, Host] | None = None

    # --- plumbing -------------------------------------------------------------------
    def host(self, name: str, ip: str, names: dict[str, str] | None = None) -> Host:
        return self.lab.add_visitor(self.topology, name, ip, names or {})

    def hosts_file(self, netns: str, entries: dict[str, str]) -> None:
        """Name → address for one namespace (`ip netns exec` binds /etc/netns/<ns>/hosts)."""
        directory = Path("/etc/netns") / netns
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "hosts").write_text("127.0.0.1 localhost\n"
                                         + "".join(f"{ip} {name}\n" for name, ip in entries.items()))

    def in_netns(self, netns: str, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        return run(["timeout", "-k", "2", str(int(timeout)), *self.lab.host_argv(netns, argv)])

    def wrk(self, netns: str, url: str, connections: int = 32, host: str | None = None,
            seconds: float | None = None) -> WrkResult:
        seconds = seconds or self.seconds
        proc = self.in_netns(netns, wrk_argv(url, seconds, connections, host), seconds + 20)
        return parse_wrk(proc.stdout)

    # --- the lab ----------------------------------------------------------------------
    def deploy(self, lifted: bool) -> None:
        base = load_stack(STACK_FILE)
        origins = copy.deepcopy(base["kokoa:origins"])
        if lifted:
            for origin in origins:
                origin["rateLimit"] = {k: v for k, v in LIFTED.items() if k in declared_keys(RateLimit)}
        log(f"deploying the lab ({'limits lifted' if lifted else 'the stack limits'})")
        self.status = up(self.lab, {"kokoa:origins": origins}, echo=log).status
        verify_sites(self.lab, self.status)

    def wireguard_ip(self, name: str) -> str:
        outputs = json.loads((self.lab.dir / "outputs.json").read_text())
        return outputs["origins"][name]["wireguardIp"]

    # --- the bare reference ---------------------------------------------------------
    def bare(self, edge_ip: str, origin_ip: str) -> tuple[Host, Host]:
        """Two namespaces on the lab network: wireguard-go with defaults, a static nginx, nginx TLS."""
        directory = self.lab.dir / "bare"
        directory.mkdir(mode=0o700, exist_ok=True)
        edge, origin = self.host("bare-edge", edge_ip), self.host("bare-origin", origin_ip)
        keys = {}
        for side in ("edge", "origin"):
            private = run(["wg", "genkey"]).stdout.strip()
            keys[side] = (private, run(["wg", "pubkey"], input=private).stdout.strip())
            (directory / f"{side}.key").write_text(private + "\n")
            (directory / f"{side}.key").chmod(0o600)
        for side, host, address, peer, peer_address, endpoint in (
                ("origin", origin, BARE_TUNNEL[0], "edge", BARE_TUNNEL[1], None),
                ("edge", edge, BARE_TUNNEL[1], "origin", BARE_TUNNEL[0], f"{origin_ip}:51900")):
            ns = ["ip", "netns", "exec", host.netns]
            # Names differ: wireguard-go's control socket is /run/wireguard/<name>.sock, and
            # these namespaces share the machine's /run.
            iface = f"wgb-{side}"
            run([*ns, "wireguard-go", iface], env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                                    "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"})
            argv = [*ns, "wg", "set", iface, "private-key", str(directory / f"{side}.key")]
            if side == "origin":
                argv += ["listen-port", "51900"]
            argv += ["peer", keys[peer][1], "allowed-ips", f"{peer_address}/32"]
            if endpoint:
                argv += ["endpoint", endpoint]
            run(argv)
            run([*ns, "ip", "addr", "add", f"{address}/24", "dev", iface])
            run([*ns, "ip", "link", "set", iface, "up"])
        run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-days", "2", "-subj", f"/CN={BARE_SITE}", "-addext", f"subjectAltName=DNS:{BARE_SITE}",
             "-keyout", str(directory / "tls.key"), "-out", str(directory / "tls.pem")])
        common = f"pid {directory}/{{name}}.pid;\nerror_log {directory}/{{name}}-error.log warn;\n" \
                 "events {{ worker_connections 4096; }}\n"
        (directory / "origin.conf").write_text(common.format(name="origin") + (
            "worker_processes 1;\nhttp { access_log off;\n"
            f"  server {{ listen {BARE_TUNNEL[0]}:80; default_type text/plain;\n"
            '    location / { return 200 "hello from origin bare\\n"; } } }\n'))
        (directory / "edge.conf").write_text(common.format(name="edge") + (
            "worker_processes auto;\nhttp { access_log off;\n"
            f"  upstream origin {{ server {BARE_TUNNEL[0]}:80; keepalive 64; }}\n"
            f"  server {{ listen 443 ssl; server_name {BARE_SITE};\n"
            f"    ssl_certificate {directory}/tls.pem; ssl_certificate_key {directory}/tls.key;\n"
            "    location / { proxy_pass http://origin; proxy_http_version 1.1;\n"
            '      proxy_set_header Connection ""; } } }\n'))
        for host, name in ((origin, "origin"), (edge, "edge")):
            run(["ip", "netns", "exec", host.netns, "nginx", "-c", str(directory / f"{name}.conf")])
        return edge, origin

    # --- measurements -----------------------------------------------------------------
    def hops(self) -> dict[str, dict[str, float]]:
        origin, edge = self.site()
        client = self.status["client"]
        wg_ip = self.wireguard_ip(SITE)
        domain = origin["domain"]
        bare_edge, bare_origin = self.bare_hosts
        measures = {
            "direct": lambda: self.wrk(origin["netns"], "http://127.0.0.1:8080/"),
            "tunnel": lambda: self.wrk(edge["netns"], f"http://{wg_ip}/", host=domain),
            "edge": lambda: self.wrk(client, f"https://{domain}/"),
            "bare tunnel": lambda: self.wrk(bare_edge.netns, f"http://{BARE_TUNNEL[0]}/"),
            "bare edge": lambda: self.wrk(client, f"https://{BARE_SITE}/"),
        }
        samples: dict[str, list[WrkResult]] = {name: [] for name in measures}
        for round_ in range(self.rounds):
            for name, measure in measures.items():
                result = measure()
                if result.non_2xx or any(result.socket_errors.values()):
                    raise LabError(f"{name}: {result.non_2xx} non-2xx answers, socket errors "
                                   f"{result.socket_errors}: the path is broken, not slow")
                samples[name].append(result)
                log(f"  round {round_ + 1}/{self.rounds}  {name:<12} {result.rate:>9.0f} req/s  "
                    f"{result.latency_ms:6.2f} ms")
        return {name: {"reqPerSec": statistics.median(r.rate for r in results),
                       "meanLatencyMs": statistics.median(r.latency_ms for r in results),
                       "samples": [round(r.rate) for r in results]}
                for name, results in samples.items()}

    def legit(self, count: int) -> dict[str, Any]:
        origin, edge = self.site()
        proc = self.in_netns(self.status["client"], [
            "python3", str(REPO / "bench" / "legit_client.py"), "--host", origin["domain"],
            "--address", edge["publicIp"], "--cafile", self.status["caBundle"], "--rate", "10",
            "--count", str(count)], count / 10 + 30)
        document = json.loads(proc.stdout)
        ok = [ms for ms in document["latencyMs"] if ms is not None]
        return {"requests": count, "ok": len(ok), "success": len(ok) / count,
                "p50Ms": percentile(ok, 50), "p99Ms": percentile(ok, 99),
                "errors": sorted(set(document["errors"]))[:5]}

    def flood(self, attackers: list[Host], connections: int, count: int, http2: bool = False) -> dict[str, Any]:
        """Attackers run wrk (or h2load, `http2`) against the site's edge while the legitimate client measures."""
        origin, _ = self.site()
        duration = count / 10 + 4
        before = self.lab.demo_requests(origin["netns"])
        started = time.monotonic()
        url = f"https://{origin['domain']}/"
        # h2load: one connection with `connections` streams at a time, asking for 1,000; when the
        # edge ends the connection the next h2load opens a new one, for the flood's duration.
        loop = (f'end=$(($(date +%s) + {int(duration)})); while [ "$(date +%s)" -lt "$end" ]; do '
                f'h2load -n 1000 -c 1 -m {connections} {url}; done')
        argv = ["sh", "-c", loop] if http2 else wrk_argv(url, duration, connections)
        floods = [subprocess.Popen(
            ["timeout", "-k", "2", str(int(duration + 20)), "ip", "netns", "exec", a.netns, *argv],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in attackers]
        try:
            time.sleep(2)  # the flood is at full strength before the first legitimate request
            legit = self.legit(count)
        finally:
            outputs = [f.communicate(timeout=duration + 30)[0] for f in floods]
        elapsed = time.monotonic() - started
        reached = self.lab.demo_requests(origin["netns"]) - before
        results = [parse_h2load(out, duration) if http2 else parse_wrk(out) for out in outputs]
        return {
            "attackers": len(attackers), "connectionsEach": connections, "legit": legit,
            "attackerRequestsPerSec": sum(r.rate for r in results),
            "attackerServedPerSec": sum(r.served_rate for r in results),
            **({"attackerConnectionsPerSec": sum(r.connections for r in results) / elapsed} if http2 else {}),
            "attackerSocketErrors": {k: sum(r.socket_errors.get(k, 0) for r in results)
                                     for k in ("connect", "read", "write", "timeout")},
            # Minus the legitimate client's own requests.
            "originRequestsPerSec": max(0, reached - legit["ok"]) / elapsed,
        }


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def verdicts(ratios: dict[str, float], targets: dict[str, float]) -> str:
    """Each measure against its target: "(at most)" in a name means lower is better."""
    rows = [("measure", "value", "target")]
    for name, value in ratios.items():
        target = targets.get(name)
        verdict = ""
        if target is not None:
            met = value <= target if "at most" in name else value >= target
            verdict = f"{'>=' if 'at most' not in name else '<='} {target}  {'met' if met else 'MISSED'}"
        rows.append((name, f"{value:.3f}", verdict))
    return table(rows)


def report(hops: dict[str, Any], floods: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    lines = []
    ratios: dict[str, float] = {}
    if hops:
        direct = hops["direct"]["reqPerSec"]
        rows = [("hop (wrk -t1 -c32)", "req/s", "mean ms", "/ direct")]
        for name, hop in hops.items():
            rows.append((name, f"{hop['reqPerSec']:.0f}", f"{hop['meanLatencyMs']:.2f}",
                         f"{hop['reqPerSec'] / direct:.3f}"))
        lines += [table(rows), ""]
        ratios["edge / direct"] = hops["edge"]["reqPerSec"] / direct
        ratios["edge / bare edge"] = hops["edge"]["reqPerSec"] / hops["bare edge"]["reqPerSec"]
        ratios["tunnel / bare tunnel"] = hops["tunnel"]["reqPerSec"] / hops["bare tunnel"]["reqPerSec"]
    if floods:
        base = floods["none"]["legit"]
        rows = [("legit client, 10 req/s, new TLS each", "ok", "p50 ms", "p99 ms", "attacker req/s",
                 "attacker served/s", "origin req/s")]
        for name, run_ in floods.items():
            legit = run_["legit"]
            rows.append((name, f"{legit['success'] * 100:.1f} %", f"{legit['p50Ms'] or 0:.1f}",
                         f"{legit['p99Ms'] or 0:.1f}",
                         f"{run_.get('attackerRequestsPerSec', 0):.0f}",
                         f"{run_.get('attackerServedPerSec', 0):.0f}",
                         f"{run_.get('originRequestsPerSec', 0):.0f}"))
        lines += [table(rows), ""]
        for key, label in (("one address", "one-address flood"), ("20 addresses", "20-address flood"),
                           ("HTTP/2, one address", "HTTP/2 one-address flood")):
            if key in floods and base["p99Ms"] and floods[key]["legit"]["p99Ms"]:
                ratios[f"{label}: p99 / no-flood p99 (at most)"] = floods[key]["legit"]["p99Ms"] / base["p99Ms"]
    lines.append(verdicts(ratios, TARGETS))
    return "\n".join(lines), ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5, help="per wrk measurement (1-30)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per hop (1-9)")
    parser.add_argument("--legit-requests", type=int, default=100, help="per flood scenario, at 10/s (20-600)")
    parser.add_argument("--only", choices=("hops", "floods"), help="one half of the benchmark")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"where to write results (default {RESULTS})")
    parser.add_argument("--init", choices=INIT_SYSTEMS, default=DEFAULT_INIT,
                        help="lab hosts: systemd machines (as real servers) or plain namespaces")
    parser.add_argument("--keep", action="store_true", help="leave the lab up afterwards (kokoa lab down "
                        f"--lab-dir {LAB_DIR} --prefix {PREFIX} removes it)")
    args = parser.parse_args()
    if not (1 <= args.seconds <= 30 and 1 <= args.rounds <= 9 and 20 <= args.legit_requests <= 600):
        parser.error("--seconds 1-30, --rounds 1-9, --legit-requests 20-600")
    reason = lab_unavailable(f"{PREFIX}probe", args.init)
    missing = [tool for tool in ("wrk", "nft") if shutil.which(tool) is None]
    if reason or missing:
        print(f"cannot run: {reason or 'missing ' + ', '.join(missing) + ' (make setup)'}", file=sys.stderr)
        return 2

    lab = Lab(LAB_DIR, PREFIX, args.init)
    lab.down(echo=log)  # a lab left by an interrupted run
    bench = Bench(lab, args.seconds, args.rounds)
    hops: dict[str, Any] = {}
    floods: dict[str, Any] = {}
    started = time.monotonic()
    try:
        network = ipaddress.ip_network(load_stack(STACK_FILE)["lab:network"])
        spare = list(network.hosts())[-40:]
        bench.deploy(lifted=args.only != "floods")
        origin, edge = bench.site()
        names = {origin["domain"]: edge["publicIp"], BARE_SITE: str(spare[-1])}
        bench.hosts_file(bench.status["client"], names)
        if args.only != "floods":
            bench.bare_hosts = bench.bare(str(spare[-1]), str(spare[-2]))
            log(f"hops: {args.rounds} rounds of {args.seconds:g}s each")
            hops = bench.hops()
        if args.only != "hops":
            if args.only != "floods":
                bench.deploy(lifted=False)
            attackers = [bench.host(f"atk{i}", str(spare[i]), names) for i in range(20)]
            log(f"floods: the legitimate client sends {args.legit_requests} requests at 10/s per scenario")
            floods["none"] = {"legit": bench.legit(args.legit_requests)}
            floods["one address"] = bench.flood(attackers[:1], 200, args.legit_requests)
            floods["20 addresses"] = bench.flood(attackers, 10, args.legit_requests)
            if shutil.which("h2load"):
                floods["HTTP/2, one address"] = bench.flood(attackers[:1], 200, args.legit_requests, http2=True)
    finally:
        if not args.keep:
            left = lab.down(echo=lambda _: None)
            if left:
                log("left behind: " + ", ".join(left))
    text, ratios = report(hops, floods)
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"seconds": args.seconds, "rounds": args.rounds, "hops": hops,
                                     "floods": floods, "ratios": ratios,
                                     "wallSeconds": round(time.monotonic() - started)}, indent=1) + "\n")
    log(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
