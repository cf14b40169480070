"""One data-plane setting at a time: how much each of Kokoa's nginx choices is worth.

On a bench lab left up by `bench/dataplane.py --keep --only hops`, each variant puts one
setting of the deployed edge or gateway back to what it was before it was tuned, reloads
nginx, and measures the edge path (client -> edge HTTPS -> tunnel -> gateway ->
application) against the bare reference, alternating tuned and variant rounds so that
the machine's drift hits both alike. The deployed files are restored afterwards.

    .venv/bin/python bench/dataplane.py --only hops --keep
    .venv/bin/python bench/variants.py
    .venv/bin/kokoa lab down --lab-dir /var/lib/kokoa-lab-bench --prefix kokoab-
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.dataplane import BARE_SITE, LAB_DIR, PREFIX, SITE, parse_wrk, wrk_argv  # noqa: E402
from kokoa_infra.lab.lab import Lab  # noqa: E402
from kokoa_infra.lab.processes import LabError, run  # noqa: E402

EDGE_CONF = "/etc/nginx/nginx.conf"
GATEWAY_CONF = "/etc/kokoa/gateway.conf"

# name -> [(role, file, tuned text, the text before tuning)]
VARIANTS = {
    "unbuffered access logs (edge and gateway relay)": [
        ("edge", EDGE_CONF, "access_log /var/log/nginx/access.log combined buffer=64k flush=5s;",
         "access_log /var/log/nginx/access.log;"),
        ("origin", GATEWAY_CONF, "gateway-relay.log kokoa_relay buffer=64k flush=5s;",
         "gateway-relay.log kokoa_relay;"),
    ],
    "one gateway worker": [("origin", GATEWAY_CONF, "worker_processes auto;", "worker_processes 1;")],
    "default keepalive_requests (1000) towards the origin": [
        ("edge", EDGE_CONF, "keepalive_requests 100000;", "keepalive_requests 1000;"),
    ],
    "fewer idle connections towards the origin (64)": [("edge", EDGE_CONF, "keepalive 128;", "keepalive 64;")],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="tuned/variant pairs per variant (1-9)")
    parser.add_argument("--seconds", type=float, default=4, help="per wrk run (1-30)")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "variants.json")
    args = parser.parse_args()
    if not (1 <= args.rounds <= 9 and 1 <= args.seconds <= 30):
        parser.error("--rounds 1-9, --seconds 1-30")
    lab = Lab(LAB_DIR, PREFIX)
    status_file = lab.dir / "status.json"
    if not status_file.exists():
        print(f"no bench lab in {lab.dir}: run bench/dataplane.py --only hops --keep first", file=sys.stderr)
        return 2
    status = json.loads(status_file.read_text())
    hosts = {"origin": next(o for o in status["origins"] if o["name"] == SITE)["netns"],
             "edge": next(e for e in status["edges"] if e["origin"] == SITE)["netns"]}
    domain = next(o for o in status["origins"] if o["name"] == SITE)["domain"]
    reload = {"edge": ["nginx", "-s", "reload"], "origin": ["nginx", "-c", GATEWAY_CONF, "-s", "reload"]}

    def read(role: str, path: str) -> str:
        return lab.on_host(hosts[role], ["cat", path], check=True).stdout

    def write(role: str, path: str, text: str) -> None:
        lab.on_host(hosts[role], ["sh", "-c", f"cat > {path}.bench && mv {path}.bench {path}"], check=True,
                    input=text)
        lab.on_host(hosts[role], reload[role], check=True)

    def ratio() -> float:
        edge = parse_wrk(run(["ip", "netns", "exec", status["client"],
                              *wrk_argv(f"https://{domain}/", args.seconds, 32)]).stdout)
        bare = parse_wrk(run(["ip", "netns", "exec", status["client"],
                              *wrk_argv(f"https://{BARE_SITE}/", args.seconds, 32)]).stdout)
        if edge.non_2xx or bare.non_2xx:
            raise LabError("non-2xx answers: lift the limits (dataplane.py --only hops deploys them lifted)")
        return edge.rate / bare.rate

    originals = {(role, path): read(role, path) for changes in VARIANTS.values() for role, path, _, _ in changes}
    results = {}
    try:
        for name, changes in VARIANTS.items():
            for role, path, tuned, before in changes:
                if tuned not in originals[(role, path)]:
                    raise LabError(f"{path} on the {role} has no {tuned!r}: the templates changed")
            tuned_ratios, variant_ratios = [], []
            for _ in range(args.rounds):
                tuned_ratios.append(ratio())
                for (role, path), text in originals.items():
                    for r, p, tuned, before in changes:
                        if (r, p) == (role, path):
                            text = text.replace(tuned, before)
                    if text != originals[(role, path)]:
                        write(role, path, text)
                time.sleep(0.5)
                variant_ratios.append(ratio())
                for (role, path), text in originals.items():
                    write(role, path, text)
                time.sleep(0.5)
            results[name] = {"tuned": statistics.median(tuned_ratios), "variant": statistics.median(variant_ratios)}
            print(f"{name:<55} edge/bare tuned {results[name]['tuned']:.3f}  "
                  f"variant {results[name]['variant']:.3f}", flush=True)
    finally:
        for (role, path), text in originals.items():
            if read(role, path) != text:
                write(role, path, text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
