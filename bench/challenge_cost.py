"""`make bench`, third part: what the edge's challenge costs a browser, per difficulty.

Runs the challenge page's own solver (the SHA-256 part of templates/edge/
challenge.js) in headless Chromium on a local page, in a namespace with no network, for 30
challenges of the real shape at each difficulty, and prints the hash rate and the solve times
(mean, p95, max). A phone-class CPU is taken as PHONE_FACTOR times slower than this machine's
core for JavaScript (docs/performance.md says why): the default difficulty must stay under a
second there at p95.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kokoa_infra.model import DEFAULT_CHALLENGE_DIFFICULTY, Origin  # noqa: E402
from kokoa_infra.schema import declared_key  # noqa: E402
from tests.support.html_preview import chromium_binary, run_chromium  # noqa: E402

CHALLENGE_JS = REPO / "templates" / "edge" / "challenge.js"
DIFFICULTIES = (12, 14, 15, 16, 18)
SOLVES = 30
PHONE_FACTOR = 5
RESULTS = REPO / "bench" / "results" / "challenge_cost.json"

PAGE = """<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>cost</title></head><body>
<pre id="out"></pre><script>
{solver}
var results = {{}}, difficulties = {difficulties}, solves = {solves};
for (var d = 0; d < difficulties.length; d++) {{
  var bits = difficulties[d], limit = Math.pow(2, 32 - bits), times = [], hashes = 0;
  for (var i = 0; i < solves; i++) {{
    var id = (Math.random().toString(16) + "0000000000000000").slice(2, 18);
    var prefix = "1796524183." + id + "." + bits + ".W0xUvaDVxWFsi21wY47r7oxMOrtfZnbzXEMBcQGSy5U.";
    var started = performance.now(), counter = 0, first32 = hasher(prefix);
    while (first32(counter) >= limit) counter++;
    times.push(performance.now() - started);
    hashes += counter + 1;
  }}
  var total = times.reduce(function (a, b) {{ return a + b; }}, 0);
  results[bits] = {{times: times, hashes: hashes, ms: total}};
}}
document.getElementById("out").textContent = "RESULT " + JSON.stringify(results);
</script></body></html>"""


def solver_source() -> str:
    """The page's own SHA-256 (its `hasher`), out of challenge.js."""
    text = CHALLENGE_JS.read_text()
    found = re.search(r"// --- sha256 .*?\n(.*?)  // --- end sha256 ---", text, re.S)
    if not found:
        raise SystemExit(f"no sha256 part in {CHALLENGE_JS}")
    return found[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main() -> int:
    if chromium_binary() is None:
        print("cannot run: chromium is not installed (make setup)", file=sys.stderr)
        return 2
    netns = f"kokoa-cost-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        with tempfile.TemporaryDirectory() as directory:
            page = Path(directory) / "cost.html"
            page.write_text(PAGE.format(solver=solver_source(), difficulties=list(DIFFICULTIES), solves=SOLVES))
            browser = run_chromium(page, "--dump-dom", netns=netns)
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
    found = re.search(r"RESULT (\{.*\})", browser.stdout)
    if not found:
        print(f"chromium gave no result:\n{browser.log[-2000:]}", file=sys.stderr)
        return 1
    raw = json.loads(found[1].replace("&quot;", '"'))
    rows, document = [], {"phoneFactor": PHONE_FACTOR, "solves": SOLVES, "difficulties": {}}
    for bits in DIFFICULTIES:
        entry = raw[str(bits)]
        times = entry["times"]
        rate = entry["hashes"] / (entry["ms"] / 1000)
        mean, p95 = sum(times) / len(times), percentile(times, 95)
        document["difficulties"][bits] = {"hashesPerSecond": round(rate), "meanMs": round(mean, 1),
                                          "p95Ms": round(p95, 1), "maxMs": round(max(times), 1)}
        default = " (default)" if bits == DEFAULT_CHALLENGE_DIFFICULTY else ""
        rows.append(f"{bits:>4}{default:<10} {rate / 1e6:6.2f} M/s  mean {mean:7.1f} ms  p95 {p95:7.1f} ms  "
                    f"max {max(times):7.1f} ms  phone-class p95 ~{p95 * PHONE_FACTOR / 1000:5.2f} s")
    print(f"challenge solve time in headless Chromium, {SOLVES} challenges per difficulty "
          f"(bounds {declared_key(Origin, 'challengeDifficulty').kind.describe()})")
    print("\n".join(rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(document, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
