"""Benchmark: evaluating the program under mocks for 50 origins x 10 edges, against the SDK's floor.

The floor is the same SDK, in the same process and run, declaring as many resources
(RandomBytes) as the program declares in all; the ratio is what the program's own work
(validation, rendering, archives, Output wiring) costs on top of the SDK's per-resource
cost. Run: .venv/bin/python bench/program_eval.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kokoa_infra.mocked_program import run_program  # noqa: E402

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


def timed(label: str, action) -> tuple[float, object]:
    start = time.perf_counter()
    result = action()
    elapsed = time.perf_counter() - start
    print(f"{label:<48} {elapsed:6.2f} s")
    return elapsed, result


def main() -> None:
    timed("warm-up (imports, one small stack)", lambda: run_program({"kokoa:acmeEmail": "a@b.co"}))
    elapsed, run = timed(f"kokoa: {ORIGINS} origins x {EDGES_PER_ORIGIN} edges",
                         lambda: run_program(stack_config()))
    count = len(run.resources)
    print(f"  {count} resources declared, {len(run.outputs['bundles'])} bundles rendered")
    with tempfile.TemporaryDirectory() as tmp:
        floor_program = Path(tmp) / "__main__.py"
        floor_program.write_text(FLOOR_PROGRAM.format(count=count))
        floor, _ = timed(f"SDK floor: {count} RandomBytes", lambda: run_program({}, program=floor_program))
    print(f"ratio kokoa / floor: {elapsed / floor:.2f}")


if __name__ == "__main__":
    main()
