"""Benchmark: evaluating the program under mocks for 50 origins x 10 edges, against the SDK's floor.

Three programs, each timed from its first line to its last registration:
- kokoa: the program, for the stack in stack_config();
- floor: the same SDK declaring as many resources (RandomBytes, constant inputs) as the
  program declares in all;
- replay: the SDK declaring exactly what the program declared (the same types, names,
  parents, dependencies and options, every input and stack output as the constant the
  program computed, through the generic CustomResource and ComponentResource), i.e. what
  these resources cost by themselves.
kokoa / floor is the figure with a goal of 1.5 (docs/performance.md); replay / floor and
kokoa / replay split it into what the resources cost the SDK and what the program adds
(validation, rendering, archives, keys, and the Outputs that carry them).

Each evaluation runs in a fresh interpreter, as `pulumi up` runs a program, after the same
imports and the same small warm-up in all three (so that none pays for importing the
providers, and none collects another's garbage). They take turns for --rounds rounds;
each ratio printed is the median of the rounds' ratios.

Run: .venv/bin/python bench/program_eval.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ORIGINS, EDGES_PER_ORIGIN = 50, 10
SSH_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nx\n-----END OPENSSH PRIVATE KEY-----\n"
# A pinned ed25519 host key (one for every host is fine here: nothing connects).
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ"


def stack_config() -> dict:
    origins = [{"name": f"site-{o}", "domain": f"site-{o}.example.com", "subnet": o,
                "host": f"10.200.{o}.1", "upstream": "http://127.0.0.1:8080", "hostKey": HOST_KEY}
               for o in range(ORIGINS)]
    edges = [{"name": f"edge-{o}-{e}", "origin": f"site-{o}", "publicIp": f"10.201.{o}.{e + 1}",
              "index": 10 + e, "hostKey": HOST_KEY} for o in range(ORIGINS) for e in range(EDGES_PER_ORIGIN)]
    return {"kokoa:acmeEmail": "ops@example.com", "kokoa:sshPrivateKey": SSH_KEY,
            "kokoa:cloudflareZoneId": "0" * 32, "cloudflare:apiToken": "t",
            "kokoa:origins": origins, "kokoa:edges": edges}


FLOOR_PROGRAM = """
import pulumi_random as random
for i in range({count}):
    random.RandomBytes(f"key-{{i}}", length=32)
"""

# The replay: records and outputs are loaded before the clock starts (REPLAY_MODULE).
REPLAY_MODULE = "kokoa_bench_replay"
REPLAY_PROGRAM = f"""
import pulumi
from {REPLAY_MODULE} import records, outputs, registered_outputs

made = {{}}
for r in records:
    opts = pulumi.ResourceOptions(
        parent=made.get(r["parent"]), depends_on=[made[urn] for urn in r["dependencies"] if urn in made],
        delete_before_replace=r["delete_before_replace"], ignore_changes=r["ignore_changes"] or None,
        additional_secret_outputs=r["additional_secret_outputs"] or None)
    if r["custom"]:
        made[r["urn"]] = pulumi.CustomResource(r["type"], r["name"], r["inputs"], opts)
    else:
        made[r["urn"]] = component = pulumi.ComponentResource(r["type"], r["name"], {{}}, opts)
        if r["urn"] in registered_outputs:
            component.register_outputs({{name: "" for name in registered_outputs[r["urn"]]}})
for name, value in outputs.items():
    # Secret as the program makes them: one Output (Output.secret would lift every nested value).
    secret = name in {{"bundles", "healthTokens"}}
    pulumi.export(name, pulumi.Output.secret(True).apply(lambda _, value=value: value) if secret else value)
"""


class _CollectorClock:
    """Seconds the cyclic garbage collector ran, from gc.callbacks."""

    def __init__(self) -> None:
        self.seconds, self._start = 0.0, 0.0
        gc.callbacks.append(self._on)

    def _on(self, phase: str, _info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start


def _record(run, path: Path) -> None:
    """What the kokoa run declared and exported, for the replay."""
    records = [{"urn": r.urn, "type": r.type, "name": r.name, "parent": r.parent, "custom": r.custom,
                "inputs": r.inputs, "dependencies": list(r.dependencies),
                "delete_before_replace": r.delete_before_replace, "ignore_changes": list(r.ignore_changes),
                "additional_secret_outputs": list(r.additional_secret_outputs)} for r in run.resources]
    path.write_text(json.dumps({"records": records, "outputs": run.outputs,
                                "registered_outputs": run.registered_outputs}))


# The program's own work, timed inside the kokoa run: {label: [(module, function), ...]}.
OWN_WORK = {
    "validation": [("kokoa_infra.validate", "parse_topology")],
    "rendering": [("kokoa_infra.components", "render_edge_bundle"), ("kokoa_infra.components", "render_origin_bundle")],
    "archives": [("kokoa_infra.components", "bundle_archive")],
    "keys and tags": [("kokoa_infra.components", "public_key"), ("kokoa_infra.components", "keyed_server_tag")],
}


def _time_own_work() -> dict[str, float]:
    """Wrap each function of OWN_WORK where the program looks it up; the returned dict fills
    with the seconds spent in each label's functions."""
    import functools
    import importlib

    spent = dict.fromkeys(OWN_WORK, 0.0)
    for label, functions in OWN_WORK.items():
        for module_name, name in functions:
            module = importlib.import_module(module_name)
            function = getattr(module, name)

            def timed(*args, _function=function, _label=label, **kwargs):
                start = time.perf_counter()
                try:
                    return _function(*args, **kwargs)
                finally:
                    spent[_label] += time.perf_counter() - start
            setattr(module, name, functools.wraps(function)(timed))
    return spent


def child(which: str, count: int, record: Path) -> None:
    """One evaluation in this fresh interpreter; prints its figures as JSON."""
    import types

    from kokoa_infra import components  # noqa: F401 (the providers and templates, imported by all)
    from kokoa_infra.mocked_program import run_program

    run_program({"kokoa:acmeEmail": "a@b.co"})  # a small stack: the runtime's first run
    with tempfile.TemporaryDirectory() as tmp:
        program = None
        config: dict = stack_config()
        if which == "floor":
            program = Path(tmp) / "__main__.py"
            program.write_text(FLOOR_PROGRAM.format(count=count))
            config = {}
        if which == "replay":
            program = Path(tmp) / "__main__.py"
            program.write_text(REPLAY_PROGRAM)
            config = {}
            module = sys.modules[REPLAY_MODULE] = types.ModuleType(REPLAY_MODULE)
            module.__dict__.update(json.loads(record.read_text()))
        own_work = _time_own_work() if which == "kokoa" else {}
        gc.collect()
        clock = _CollectorClock()
        start = time.perf_counter()
        run = run_program(config, program=program)
        elapsed = time.perf_counter() - start
    if which == "kokoa":
        _record(run, record)
    print(json.dumps({"seconds": elapsed, "collector_seconds": clock.seconds, "resources": len(run.resources),
                      "bundles": len(run.outputs.get("bundles", {})), "own_work": own_work}))


def measure(which: str, record: Path, count: int = 0) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", which, "--count", str(count), "--record", str(record)],
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="kokoa/floor pairs (default 3)")
    parser.add_argument("--child", choices=("kokoa", "floor", "replay"), help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.count, args.record)
        return
    ratios: dict[str, list[float]] = {"kokoa / floor": [], "replay / floor": [], "kokoa / replay": []}
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "record.json"
        for round_ in range(1, args.rounds + 1):
            kokoa = measure("kokoa", record)
            floor = measure("floor", record, kokoa["resources"])
            replay = measure("replay", record)
            if replay["resources"] != kokoa["resources"]:
                raise SystemExit(f"the replay declared {replay['resources']} resources, not {kokoa['resources']}")
            ratios["kokoa / floor"].append(kokoa["seconds"] / floor["seconds"])
            ratios["replay / floor"].append(replay["seconds"] / floor["seconds"])
            ratios["kokoa / replay"].append(kokoa["seconds"] / replay["seconds"])
            own = kokoa["own_work"]
            print(f"round {round_}: kokoa {ORIGINS} x {EDGES_PER_ORIGIN} ({kokoa['resources']} resources, "
                  f"{kokoa['bundles']} bundles) {_seconds(kokoa)}; floor ({floor['resources']} RandomBytes) "
                  f"{_seconds(floor)}; replay {_seconds(replay)}; "
                  + ", ".join(f"{name} {values[-1]:.2f}" for name, values in ratios.items()), flush=True)
            print(f"  the program's own work: {sum(own.values()):.2f} s of {kokoa['seconds']:.2f} ("
                  + ", ".join(f"{label} {seconds:.2f}" for label, seconds in own.items()) + ")", flush=True)
    for name, values in ratios.items():
        print(f"ratio {name}, median of {len(values)}: {statistics.median(values):.2f}")


def _seconds(figures: dict) -> str:
    return f"{figures['seconds']:.2f} s (collector {figures['collector_seconds']:.2f})"


if __name__ == "__main__":
    main()
