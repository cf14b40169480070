"""`make bench`, second part: a distributed flood against an origin of limited capacity.

Brings up a lab of its own (prefix `kokoad-`, directory /var/lib/kokoa-lab-distributed) and
replaces shop's demo application with bench/capacity_app.py: 4 requests at a time, 20 ms each
(200 req/s), queueing the rest. Then, for each defence of shop,

  none   no capacity, underAttack off (Kokoa before the capacity and the challenge)
  off    capacity {concurrentRequests: 4}, underAttack off: over it a fast 503
  auto   capacity 4, underAttack auto: the challenge only while the origin is full
  on     capacity 4, underAttack on: the challenge for every request without a pass

it measures, with no flood and with 20 and 50 attacker addresses (each its own namespace, `wrk
-t1 -c4`, each inside its per-address limits when the origin answers at its pace), three
visitors (the first two at once, then the browser, while the flood goes on):

  returning  keeps cookies and had a pass before the flood; 10 req/s, new TLS each
  new        headless Chromium with a fresh profile: time until it shows the origin's page
  api        a client of the exempt path /api/ (runs no script); 2 req/s

and what the attackers sent, what of it reached the origin, the most requests the origin
held at once, and the CPU the edge's nginx used. Every run is bounded in time, all traffic
stays in the lab's namespaces, and the lab is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from dataplane import SITE, OnTheLab, log, parse_wrk, percentile, table, verdicts  # noqa: E402

from kokoa_infra.lab.deploy import STACK_FILE, load_stack, up, verify_sites  # noqa: E402
from kokoa_infra.lab.hosts import DEFAULT_INIT, INIT_SYSTEMS, Host  # noqa: E402
from kokoa_infra.lab.lab import Lab, lab_unavailable  # noqa: E402
from kokoa_infra.lab.processes import LabError  # noqa: E402
from kokoa_infra.lab.services import stop_demo  # noqa: E402
from tests.support.html_preview import chromium_binary, run_chromium  # noqa: E402

LAB_DIR = Path("/var/lib/kokoa-lab-distributed")
PREFIX = "kokoad-"
CAPACITY = 4
APP = REPO / "bench" / "capacity_app.py"
APP_STATS = "127.0.0.1:8079"
RESULTS = REPO / "bench" / "results" / "distributed.json"
ATTACKER_AGENT = "kokoa-bench-attacker"
DEFENCES: dict[str, dict[str, Any]] = {
    "none": {},
    "off": {"capacity": {"concurrentRequests": CAPACITY}, "underAttack": "off", "exemptPaths": ["/api/"]},
    "auto": {"capacity": {"concurrentRequests": CAPACITY}, "underAttack": "auto", "exemptPaths": ["/api/"]},
    "on": {"capacity": {"concurrentRequests": CAPACITY}, "underAttack": "on", "exemptPaths": ["/api/"]},
}
FLOODS = (0, 20, 50)
TARGETS = {
    "returning p99 / no-flood p99, auto (at most)": 2.0,
    "returning p99 / no-flood p99, on (at most)": 2.0,
    "new visitor seconds to the page, auto and on (at most)": 3.0,
    "origin's most requests at once, off/auto/on (at most)": CAPACITY,
    "attackers' requests reaching the origin / sent, on (at most)": 0.01,
}


@dataclass
class Distributed(OnTheLab):
    lab: Lab
    legit_requests: int
    status: dict[str, Any]
    attackers: list[Host]
    visitors: dict[str, Host]
    app: subprocess.Popen | None = None

    # --- the lab ----------------------------------------------------------------------
    def deploy(self, defence: str) -> None:
        origins = copy.deepcopy(load_stack(STACK_FILE)["kokoa:origins"])
        next(o for o in origins if o["name"] == SITE).update(DEFENCES[defence])
        log(f"deploying shop with defence {defence!r}: {DEFENCES[defence] or 'no capacity, underAttack off'}")
        self.status = up(self.lab, {"kokoa:origins": origins}, echo=lambda _: None).status
        verify_sites(self.lab, self.status)

    def start_app(self) -> None:
        """shop's demo application out, the one of limited capacity in (on the same port)."""
        origin, _ = self.site()
        host = next(h for h in self.topology.hosts if h.name == SITE)
        stop_demo(self.lab, host)
        self.app = subprocess.Popen(
            ["timeout", "-k", "2", "3600", *self.lab.host_argv(origin["netns"], [
                "python3", "-c", APP.read_text(), "--listen", "127.0.0.1:8080", "--stats", APP_STATS,
                "--workers", str(CAPACITY), "--service-ms", "20", "--seconds", "3500"])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        for _ in range(100):
            if self.app_stats(reset=True) is not None:
                return
            time.sleep(0.1)
        raise LabError("the capacity application did not start")

    def app_stats(self, reset: bool = False) -> dict[str, Any] | None:
        origin, _ = self.site()
        proc = self.lab.on_host(origin["netns"], ["curl", "-fsS", "-m", "2",
                                                  f"http://{APP_STATS}/{'reset' if reset else ''}"])
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    def edge_cpu_seconds(self) -> float:
        """CPU time (user + system) the edge's nginx master and workers have used so far."""
        _, edge = self.site()
        proc = self.lab.on_host(edge["netns"], ["sh", "-c", "pid=$(cat /run/nginx.pid) && "
                                                "for p in $pid $(pgrep -P $pid); do cat /proc/$p/stat; done"],
                                check=True)
        # Fields 14 and 15 (utime, stime) in clock ticks, after the command name in parentheses.
        ticks = sum(int(fields[11]) + int(fields[12])
                    for fields in (line.rsplit(")", 1)[1].split() for line in proc.stdout.splitlines()))
        return ticks / os.sysconf("SC_CLK_TCK")

    # --- the visitors -------------------------------------------------------------------
    def legit(self, host: Host, count: int, rate: float, path: str, returning: bool) -> subprocess.Popen:
        origin, edge = self.site()
        argv = ["python3", str(REPO / "bench" / "legit_client.py"), "--host", origin["domain"],
                "--address", edge["publicIp"], "--cafile", self.status["caBundle"], "--rate", str(rate),
                "--count", str(count), "--path", path]
        return subprocess.Popen(["timeout", "-k", "2", str(int(count / rate + 60)), "ip", "netns", "exec",
                                 host.netns, *argv + (["--returning"] if returning else [])],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    @staticmethod
    def legit_result(proc: subprocess.Popen, count: int) -> dict[str, Any]:
        out, err = proc.communicate(timeout=count + 90)
        if proc.returncode != 0:
            return {"requests": count, "ok": 0, "success": 0.0, "p50Ms": None, "p99Ms": None,
                    "errors": [err.strip()[-300:] or f"exit {proc.returncode}"], "statuses": {}}
        document = json.loads(out)
        ok = [ms for ms in document["latencyMs"] if ms is not None]
        return {"requests": count, "ok": len(ok), "success": len(ok) / count, "p50Ms": percentile(ok, 50),
                "p99Ms": percentile(ok, 99), "errors": sorted(set(document["errors"]))[:5],
                "statuses": document["statuses"]}

    def newcomer(self) -> dict[str, Any]:
        """Headless Chromium, a fresh profile: seconds until its DOM holds the origin's page."""
        origin, edge = self.site()
        started = time.monotonic()
        browser = run_chromium(f"https://{origin['domain']}/", "--dump-dom", "--virtual-time-budget=20000",
                               "--ignore-certificate-errors",
                               f"--host-resolver-rules=MAP {origin['domain']} {edge['publicIp']}",
                               netns=self.visitors["new"].netns)
        seconds = time.monotonic() - started
        return {"seconds": round(seconds, 2), "sawPage": "hello from origin shop" in browser.stdout}

    # --- a run ---------------------------------------------------------------------------
    def scenario(self, attackers: int) -> dict[str, Any]:
        origin, _ = self.site()
        count = self.legit_requests
        # 2 s for the flood to build, the visitors' requests, then the browser (its start-up
        # takes a core for a second: it comes after the others' measurement, not during it).
        duration = 2 + count / 10 + 4 + 12
        self.app_stats(reset=True)
        cpu_before, started = self.edge_cpu_seconds(), time.monotonic()
        floods = [subprocess.Popen(
            ["timeout", "-k", "2", str(int(duration + 20)), "ip", "netns", "exec", a.netns,
             "wrk", "-t1", "-c4", f"-d{duration:g}s", "--timeout", "5s", "-H", f"User-Agent: {ATTACKER_AGENT}",
             f"https://{origin['domain']}/"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in self.attackers[:attackers]]
        try:
            time.sleep(2 if attackers else 0)  # the flood at full strength before the visitors come
            returning = self.legit(self.visitors["returning"], count, 10, "/", returning=True)
            api = self.legit(self.visitors["api"], count // 5, 2, "/api/status", returning=False)
            returning_result = self.legit_result(returning, count)
            api_result = self.legit_result(api, count // 5)
            newcomer = self.newcomer() if chromium_binary() else None
        finally:
            outputs = [f.communicate(timeout=duration + 30)[0] for f in floods]
        elapsed = time.monotonic() - started
        cpu = (self.edge_cpu_seconds() - cpu_before) / elapsed
        stats = self.app_stats() or {}
        sent = [parse_wrk(out) for out in outputs]
        sent_per_s = sum(r.rate for r in sent)
        reached_per_s = stats.get("counts", {}).get("attacker", 0) / elapsed
        return {"attackers": attackers, "returning": returning_result, "api": api_result, "new": newcomer,
                "attackerSentPerSec": round(sent_per_s, 1), "attackerReachedPerSec": round(reached_per_s, 1),
                "attackerReachedShare": reached_per_s / sent_per_s if sent_per_s else None,
                "originPeak": stats.get("peak"), "edgeCpu": round(cpu, 3)}


def report(results: dict[str, dict[str, Any]]) -> tuple[str, dict[str, float]]:
    rows = [("defence", "attackers", "returning ok", "p50 ms", "p99 ms", "new visitor s", "api ok",
             "attacker sent/s", "reached origin/s", "origin peak", "edge CPU")]
    for defence, runs in results.items():
        for run_ in runs.values():
            r, api, new = run_["returning"], run_["api"], run_["new"]
            rows.append((defence, str(run_["attackers"]), f"{r['success'] * 100:.1f} %", f"{r['p50Ms'] or 0:.1f}",
                         f"{r['p99Ms'] or 0:.1f}",
                         "-" if new is None else f"{new['seconds']:.2f}{'' if new['sawPage'] else ' (no page)'}",
                         f"{api['success'] * 100:.0f} %", f"{run_['attackerSentPerSec']:.0f}",
                         f"{run_['attackerReachedPerSec']:.0f}", str(run_["originPeak"]), f"{run_['edgeCpu']:.2f}"))
    ratios: dict[str, float] = {}
    for defence in ("auto", "on"):
        runs = results.get(defence)
        if not runs:
            continue
        calm = runs["0"]["returning"]["p99Ms"]
        flooded = [runs[k]["returning"]["p99Ms"] for k in runs if k != "0"]
        if calm and all(flooded):
            ratios[f"returning p99 / no-flood p99, {defence} (at most)"] = max(flooded) / calm
        ratios[f"returning success under flood, {defence}"] = min(runs[k]["returning"]["success"] for k in runs)
    new_seconds = [run_["new"]["seconds"] if run_["new"]["sawPage"] else float("inf")
                   for d in ("auto", "on") for run_ in results.get(d, {}).values() if run_["new"]]
    if new_seconds:
        ratios["new visitor seconds to the page, auto and on (at most)"] = max(new_seconds)
    peaks = [run_["originPeak"] for d in ("off", "auto", "on") for run_ in results.get(d, {}).values()
             if run_["originPeak"] is not None]
    if peaks:
        ratios["origin's most requests at once, off/auto/on (at most)"] = max(peaks)
    shares = [run_["attackerReachedShare"] for run_ in results.get("on", {}).values()
              if run_["attackerReachedShare"] is not None]
    if shares:
        ratios["attackers' requests reaching the origin / sent, on (at most)"] = max(shares)
    return "\n".join([table(rows), "", verdicts(ratios, TARGETS)]), ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--legit-requests", type=int, default=100, help="per scenario, at 10/s (20-600)")
    parser.add_argument("--defences", default=",".join(DEFENCES), help="comma-separated, of: " + ", ".join(DEFENCES))
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"where to write results (default {RESULTS})")
    parser.add_argument("--init", choices=INIT_SYSTEMS, default=DEFAULT_INIT,
                        help="lab hosts: systemd machines (as real servers) or plain namespaces")
    parser.add_argument("--keep", action="store_true", help="leave the lab up afterwards (kokoa lab down "
                        f"--lab-dir {LAB_DIR} --prefix {PREFIX} removes it)")
    args = parser.parse_args()
    defences = [d for d in args.defences.split(",") if d]
    if not 20 <= args.legit_requests <= 600 or not defences or set(defences) - set(DEFENCES):
        parser.error(f"--legit-requests 20-600; --defences of {', '.join(DEFENCES)}")
    reason = lab_unavailable(f"{PREFIX}probe", args.init)
    missing = [tool for tool in ("wrk", "nft") if shutil.which(tool) is None]
    if reason or missing:
        print(f"cannot run: {reason or 'missing ' + ', '.join(missing) + ' (make setup)'}", file=sys.stderr)
        return 2

    lab = Lab(LAB_DIR, PREFIX, args.init)
    lab.down(echo=log)  # a lab left by an interrupted run
    results: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    bench = Distributed(lab, args.legit_requests, {}, [], {})
    try:
        bench.deploy(defences[0])
        bench.start_app()
        network = ipaddress.ip_network(load_stack(STACK_FILE)["lab:network"])
        hosts = list(network.hosts())
        origin, edge = bench.site()
        names = {origin["domain"]: edge["publicIp"]}
        topo = bench.topology
        bench.attackers = [lab.add_visitor(topo, f"atk{i}", str(hosts[99 + i]), names) for i in range(max(FLOODS))]
        bench.visitors = {kind: lab.add_visitor(topo, kind, str(hosts[160 + i]), names)
                          for i, kind in enumerate(("returning", "api", "new"))}
        for number, defence in enumerate(defences):
            if number:
                bench.deploy(defence)
            results[defence] = {}
            for attackers in FLOODS:
                log(f"  {defence}: {attackers} attacker addresses")
                results[defence][str(attackers)] = bench.scenario(attackers)
    finally:
        if bench.app is not None:
            try:
                os.killpg(bench.app.pid, signal.SIGKILL)  # the application on the origin host too
            except ProcessLookupError:
                pass
            bench.app.wait(timeout=10)
        if not args.keep:
            left = lab.down(echo=lambda _: None)
            if left:
                log("left behind: " + ", ".join(left))
    text, ratios = report(results)
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"legitRequests": args.legit_requests, "capacity": CAPACITY,
                                     "results": results, "ratios": ratios,
                                     "wallSeconds": round(time.monotonic() - started)}, indent=1) + "\n")
    log(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
