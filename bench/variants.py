"""One data-plane setting at a time: how much each of Kokoa's choices is worth.

On a bench lab left up by `bench/dataplane.py --keep --only hops`, each variant puts one
setting of the deployed edge or gateway back to what it was before it was tuned (or takes
the edge's firewall away), applies it (nginx reload, `nft -f`), and measures the edge
path (client -> edge HTTPS -> tunnel -> gateway -> application) against the bare
reference, alternating tuned and variant rounds so that the machine's drift hits both
alike. The deployed files are restored afterwards.

    .venv/bin/python bench/dataplane.py --only hops --keep
    .venv/bin/python bench/variants.py
    .venv/bin/kokoa lab down --lab-dir /var/lib/kokoa-lab-bench --prefix kokoab-
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.dataplane import BARE_SITE, LAB_DIR, PREFIX, SITE, parse_wrk, wrk_argv  # noqa: E402
from kokoa_infra.lab.lab import Lab  # noqa: E402
from kokoa_infra.lab.processes import LabError, run  # noqa: E402

EDGE_CONF = "/etc/nginx/nginx.conf"
GATEWAY_CONF = "/etc/kokoa/gateway.conf"
FIREWALL = "/etc/kokoa/firewall.nft"
# What makes each file take effect once written.
APPLY = {EDGE_CONF: ["nginx", "-s", "reload"], GATEWAY_CONF: ["nginx", "-c", GATEWAY_CONF, "-s", "reload"],
         FIREWALL: ["nft", "-f", FIREWALL]}

Transform = Callable[[str], str]


def swap(tuned: str, before: str) -> Transform:
    """Put `before` back where the deployed file has `tuned`."""
    def transform(text: str) -> str:
        if tuned not in text:
            raise LabError(f"the deployed file has no {tuned!r}: the templates changed")
        return text.replace(tuned, before)
    return transform


def http_gateway(text: str) -> str:
    """The gateway as it was before the relay: an HTTP proxy with keepalive to the application."""
    relay = re.search(r"\nstream \{\n.*?listen (?P<listen>\S+);\n(?P<allow>(?:\s+allow \S+;\n)+).*\Z", text, re.S)
    server = re.search(r"upstream kokoa_application \{\n\s+server (\S+);", text)
    if not relay or not server:
        raise LabError("the deployed gateway.conf has no stream relay: the templates changed")
    text = re.sub(r"# The application's door is a TCP relay.*?load_module [^\n]*\n", "", text[:relay.start()] + "\n",
                  flags=re.S)
    text = re.sub(r"# A reload leaves.*?worker_shutdown_timeout \S+;\n", "", text, flags=re.S)
    proxy = f"""    upstream kokoa_application {{
        server {server.group(1)};
        keepalive 128;
        keepalive_requests 100000;
        keepalive_timeout 60s;
    }}

    server {{
        listen {relay.group('listen')};
{relay.group('allow')}        deny all;
        location / {{
            proxy_pass http://kokoa_application;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Real-IP $http_x_real_ip;
            proxy_set_header X-Forwarded-For $http_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $http_x_forwarded_proto;
            proxy_connect_timeout 5s;
            proxy_read_timeout 60s;
        }}
    }}

"""
    at = text.index("    # What the edges need for the certificate")
    return text[:at] + proxy + text[at:]


METRICS_OFF = "no traffic metrics (plain log line, mtail stopped)"
# name -> [(role, file, how to turn the deployed file into the variant)]
VARIANTS: dict[str, list[tuple[str, str, Transform]]] = {
    "the gateway as an HTTP proxy (before the TCP relay)": [("origin", GATEWAY_CONF, http_gateway)],
    "unbuffered access logs (edge and gateway relay)": [
        ("edge", EDGE_CONF, swap("access_log /var/log/nginx/access.log kokoa buffer=64k flush=5s;",
                                 "access_log /var/log/nginx/access.log kokoa;")),
        ("origin", GATEWAY_CONF, swap("gateway-relay.log kokoa_relay buffer=64k flush=5s;",
                                      "gateway-relay.log kokoa_relay;")),
    ],
    "one gateway worker": [("origin", GATEWAY_CONF, swap("worker_processes auto;", "worker_processes 1;"))],
    "default keepalive_requests (1000) towards the origin": [
        ("edge", EDGE_CONF, swap("keepalive_requests 100000;", "keepalive_requests 1000;")),
    ],
    "fewer idle connections towards the origin (64)": [
        ("edge", EDGE_CONF, swap("keepalive 128;", "keepalive 64;")),
    ],
    # What the edge's firewall and flood shield cost: connection tracking of every packet.
    "no firewall on the edge": [("edge", FIREWALL, lambda text: "table inet kokoa\ndelete table inet kokoa\n")],
    # What the traffic metrics cost (docs/health.md): the longer log line, mtail reading
    # every line and the counters job; the variant logs nginx's plain combined line and
    # stops both units (UNITS_STOPPED).
    METRICS_OFF: [("edge", EDGE_CONF, swap("access_log /var/log/nginx/access.log kokoa buffer=64k flush=5s;",
                                           "access_log /var/log/nginx/access.log combined buffer=64k flush=5s;"))],
}
# Units a variant stops for its rounds (and starts again after them): role -> units.
UNITS_STOPPED: dict[str, dict[str, list[str]]] = {
    METRICS_OFF: {"edge": ["kokoa-edge-metrics.service", "kokoa-edge-counters.timer"]},
}
# After a reload, the gateway's old workers keep relayed connections for up to its
# worker_shutdown_timeout (10 s): wait them out, so that each round measures one file.
SETTLE_SECONDS = 11


def namespace_cpu_seconds(netns: str) -> float:
    """User and system CPU of every process now in `netns` (a lab host's: its nginx workers, mtail,
    wireguard-go), from /proc; processes that ended in between are not counted."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in run(["ip", "netns", "pids", netns]).stdout.split():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])   # utime, stime
    return total / tick


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="tuned/variant pairs per variant (1-20)")
    parser.add_argument("--seconds", type=float, default=4, help="per wrk run (1-30)")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "variants.json")
    parser.add_argument("--variant", action="append", choices=list(VARIANTS), metavar="NAME",
                        help="measure only this variant (repeatable; default: all of them)")
    args = parser.parse_args()
    chosen = {name: VARIANTS[name] for name in (args.variant or VARIANTS)}
    if not (1 <= args.rounds <= 20 and 1 <= args.seconds <= 30):
        parser.error("--rounds 1-20, --seconds 1-30")
    lab = Lab(LAB_DIR, PREFIX)
    status_file = lab.dir / "status.json"
    if not status_file.exists():
        print(f"no bench lab in {lab.dir}: run bench/dataplane.py --only hops --keep first", file=sys.stderr)
        return 2
    status = json.loads(status_file.read_text())
    hosts = {"origin": next(o for o in status["origins"] if o["name"] == SITE)["netns"],
             "edge": next(e for e in status["edges"] if e["origin"] == SITE)["netns"]}
    domain = next(o for o in status["origins"] if o["name"] == SITE)["domain"]

    def read(role: str, path: str) -> str:
        return lab.on_host(hosts[role], ["cat", path], check=True).stdout

    def write(role: str, path: str, text: str) -> None:
        lab.on_host(hosts[role], ["sh", "-c", f"cat > {path}.bench && mv {path}.bench {path}"], check=True,
                    input=text)
        lab.on_host(hosts[role], APPLY[path], check=True)

    def systemctl(verb: str, units: dict[str, list[str]]) -> None:
        for role, names in units.items():
            lab.on_host(hosts[role], ["systemctl", verb, *names], check=True)

    def ratio() -> tuple[float, float]:
        """edge/bare, and the edge host's CPU per edge request in microseconds: every process of
        its namespace, from the start of the edge's run to the end of the bare one (by then what
        the edge deferred, mtail's reading of the log, has caught up)."""
        before = namespace_cpu_seconds(hosts["edge"])
        edge = parse_wrk(run(["ip", "netns", "exec", status["client"],
                              *wrk_argv(f"https://{domain}/", args.seconds, 32)]).stdout)
        bare = parse_wrk(run(["ip", "netns", "exec", status["client"],
                              *wrk_argv(f"https://{BARE_SITE}/", args.seconds, 32)]).stdout)
        cpu = namespace_cpu_seconds(hosts["edge"]) - before
        if edge.non_2xx or bare.non_2xx:
            raise LabError("non-2xx answers: lift the limits (dataplane.py --only hops deploys them lifted)")
        return edge.rate / bare.rate, cpu / max(edge.requests, 1) * 1e6

    originals = {(role, path): read(role, path) for changes in chosen.values() for role, path, _ in changes}
    results = {}
    try:
        for name, changes in chosen.items():
            variant_files = {}
            for role, path, transform in changes:
                variant_files[(role, path)] = transform(variant_files.get((role, path), originals[(role, path)]))
            units = UNITS_STOPPED.get(name, {})
            tuned_ratios, variant_ratios, tuned_cpu, variant_cpu = [], [], [], []
            for _ in range(args.rounds):
                measured, cpu = ratio()
                tuned_ratios.append(measured)
                tuned_cpu.append(cpu)
                for (role, path), text in variant_files.items():
                    write(role, path, text)
                systemctl("stop", units)
                time.sleep(SETTLE_SECONDS)
                measured, cpu = ratio()
                variant_ratios.append(measured)
                variant_cpu.append(cpu)
                for role, path in variant_files:
                    write(role, path, originals[(role, path)])
                systemctl("start", units)
                time.sleep(SETTLE_SECONDS)
            # Each tuned round against the variant round right after it: drift between
            # pairs cancels, and the median pair says what the setting is worth.
            pairs = [t / v for t, v in zip(tuned_ratios, variant_ratios)]
            results[name] = {"tuned": statistics.median(tuned_ratios), "variant": statistics.median(variant_ratios),
                             "tunedOverVariant": statistics.median(pairs), "pairs": pairs,
                             "edgeCpuUsPerRequest": {"tuned": statistics.median(tuned_cpu),
                                                     "variant": statistics.median(variant_cpu)}}
            cpu = results[name]["edgeCpuUsPerRequest"]
            print(f"{name:<55} edge/bare tuned {results[name]['tuned']:.3f}  "
                  f"variant {results[name]['variant']:.3f}  tuned/variant, median pair "
                  f"{results[name]['tunedOverVariant']:.3f} (pairs {min(pairs):.3f}-{max(pairs):.3f}); "
                  f"edge CPU per request {cpu['tuned']:.1f} us tuned, {cpu['variant']:.1f} us variant", flush=True)
    finally:
        for (role, path), text in originals.items():
            if read(role, path) != text:
                write(role, path, text)
        for name in chosen:
            systemctl("start", UNITS_STOPPED.get(name, {}))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
