"""Time a `kokoa health` ping sweep against `fping` on the same namespace-local targets (run as root)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.target_network import TargetNetwork, target_network  # noqa: E402

RUN_TIMEOUT_S = 120


def interleave(answering: list[str], silent: list[str]) -> list[str]:
    """Spread the silent targets evenly through the list, as dead nodes would be."""
    ordered: list[str] = []
    step = max(1, round((len(answering) + len(silent)) / max(1, len(silent))))
    answering_left, silent_left = list(answering), list(silent)
    while answering_left or silent_left:
        take_silent = silent_left and (len(ordered) % step == step - 1 or not answering_left)
        ordered.append((silent_left if take_silent else answering_left).pop(0))
    return ordered


def write_outputs(addresses: list[str], directory: Path) -> Path:
    nodes = [{"name": f"node-{index}", "role": "origin", "origin": f"node-{index}",
              "domain": f"node-{index}.test",
              # On no network of the prober, so the public address is pinged.
              "wireguardIp": f"10.99.{index // 250}.{index % 250 + 1}", "publicIp": address}
             for index, address in enumerate(addresses)]
    path = directory / "outputs.json"
    path.write_text(json.dumps({"healthTargets": nodes}))
    return path


def time_kokoa(net: TargetNetwork, outputs: Path, timeout_s: float, concurrency: int) -> tuple[float, float, int]:
    """(wall seconds of the whole command, seconds of the sweep itself, nodes answering)."""
    started = time.monotonic()
    result = subprocess.run(
        ["ip", "netns", "exec", net.prober, sys.executable, "-m", "kokoa_infra.health", "--once",
         "--json", "--checks", "ping", "--outputs", str(outputs), "--timeout", str(timeout_s),
         "--concurrency", str(concurrency)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.monotonic() - started
    if result.returncode not in (0, 1):
        raise SystemExit(f"kokoa health failed ({result.returncode}): {result.stderr.strip()}")
    document = json.loads(result.stdout)
    return wall, document["durationMs"] / 1000, document["summary"]["healthy"]


def time_fping(net: TargetNetwork, addresses: list[str], timeout_s: float) -> tuple[float, int]:
    """(wall seconds, targets answering) for `fping -c1 -t<timeout> -i1`."""
    started = time.monotonic()
    result = subprocess.run(
        ["ip", "netns", "exec", net.prober, "fping", "-q", "-c1", f"-t{int(timeout_s * 1000)}",
         "-i1", *addresses], capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    wall = time.monotonic() - started
    return wall, len(re.findall(r"xmt/rcv/%loss = 1/1/0%", result.stderr))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--targets", type=int, default=500)
    parser.add_argument("--silent", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark creates network namespaces")
    if shutil.which("fping") is None:
        raise SystemExit("fping is missing: apt-get install fping")
    answering_count = args.targets - args.silent
    with target_network(answering=answering_count, silent=args.silent) as net, \
            tempfile.TemporaryDirectory(prefix="kh-bench-") as scratch:
        addresses = interleave(net.answering, net.silent)
        outputs = write_outputs(addresses, Path(scratch))
        print(f"{args.targets} targets, {args.silent} silent, timeout {args.timeout:g} s, "
              f"concurrency {args.concurrency}, namespace {net.prober}")
        print(f"{'run':>3}  {'kokoa s':>8}  {'(sweep s)':>9}  {'fping s':>8}  {'ratio':>6}  answering kokoa/fping")
        ratios = []
        for run in range(1, args.runs + 1):
            kokoa_wall, kokoa_sweep, kokoa_up = time_kokoa(net, outputs, args.timeout, args.concurrency)
            fping_wall, fping_up = time_fping(net, addresses, args.timeout)
            ratios.append(kokoa_wall / fping_wall)
            print(f"{run:>3}  {kokoa_wall:8.3f}  {kokoa_sweep:9.3f}  {fping_wall:8.3f}  "
                  f"{ratios[-1]:6.2f}  {kokoa_up}/{fping_up} (expected {answering_count})")
        print(f"worst ratio {max(ratios):.2f} (goal <= 1.2; kokoa timed as the whole command, "
              f"Python start-up included)")


if __name__ == "__main__":
    main()
