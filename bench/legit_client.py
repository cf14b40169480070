"""A legitimate visitor for the flood benchmarks: N requests at a fixed rate, each on a new TLS connection.

Open loop: request i starts at i / rate seconds whatever the earlier ones are doing, so a
slow edge shows as latency, not as fewer requests. Run inside a lab namespace; prints one
JSON document: per-request latency in milliseconds (None on failure), the failures and the
answers by status. With --returning it is a visitor who came before: it first gets a visitor
pass (from the edge's answer, or by solving its challenge as a browser would) and sends it
with every request. Only the standard library: it runs with the machine's python3 inside any
namespace.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import re
import socket
import ssl
import sys
import threading
import time


class SiteConnection(http.client.HTTPSConnection):
    """HTTPS to an edge's address, with the site's name in SNI and certificate checks."""

    def __init__(self, site: str, address: str, context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(address, 443, timeout=timeout, context=context)
        self.site = site

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.site)


PASS_COOKIE = re.compile(r"kokoa_pass=([^;]+);")


def fetch(site: str, address: str, path: str, context: ssl.SSLContext, timeout: float,
          cookie: str = "") -> tuple[int, float, str, str]:
    """(status, milliseconds, body, pass cookie set) of one GET on a fresh TCP + TLS connection."""
    started = time.perf_counter()
    conn = SiteConnection(site, address, context, timeout)
    headers = {"Host": site, "Connection": "close", "User-Agent": "kokoa-bench-visitor"}
    if cookie:
        headers["Cookie"] = cookie
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        body = response.read().decode("utf-8", "replace")
        found = PASS_COOKIE.search(response.getheader("Set-Cookie") or "")
        return response.status, (time.perf_counter() - started) * 1000, body, found[1] if found else ""
    finally:
        conn.close()


def solve(page: str) -> str | None:
    """The solution of an edge's challenge page, as its script finds it (None: not a challenge)."""
    found = re.search(r'var CHALLENGE = "([^"]+)", BITS = (\d+);', page)
    if not found:
        return None
    challenge, bits = found[1], int(found[2])
    for counter in range(1 << 26):
        value = f"{challenge}.{counter}"
        if int.from_bytes(hashlib.sha256(value.encode()).digest()[:4], "big") >> (32 - bits) == 0:
            return value
    return None


def get_pass(site: str, address: str, path: str, context: ssl.SSLContext, timeout: float) -> str:
    """A visitor pass: handed out with an answer, or for a solved challenge; "" where there is none."""
    status, _, body, issued = fetch(site, address, path, context, timeout)
    if issued:
        return issued
    solution = solve(body)
    if solution is None:
        return ""  # an edge that hands out no passes (underAttack off)
    _, _, _, issued = fetch(site, address, path, context, timeout, f"kokoa_solution={solution}")
    if not issued:
        raise SystemExit("the solved challenge brought no pass")
    return issued


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", required=True, help="site name (SNI, Host, certificate)")
    parser.add_argument("--address", required=True, help="edge address to connect to")
    parser.add_argument("--path", default="/")
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--rate", type=float, default=10.0, help="requests per second")
    parser.add_argument("--count", type=int, default=100, help="requests in all (bounded)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    parser.add_argument("--returning", action="store_true", help="get a visitor pass first and keep it")
    args = parser.parse_args()
    if not 0 < args.count <= 10000 or not 0 < args.rate <= 1000:
        parser.error("--count must be 1..10000 and --rate 1..1000")

    context = ssl.create_default_context(cafile=args.cafile)
    results: list[tuple[int | None, float | None, str]] = [(None, None, "not run")] * args.count
    jar = {"pass": get_pass(args.host, args.address, args.path, context, args.timeout) if args.returning else ""}

    def visit(i: int) -> None:
        try:
            cookie = f"kokoa_pass={jar['pass']}" if jar["pass"] else ""
            status, ms, _, renewed = fetch(args.host, args.address, args.path, context, args.timeout, cookie)
            if renewed and args.returning:
                jar["pass"] = renewed
            results[i] = (status, ms, "" if status == 200 else f"HTTP {status}")
        except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
            results[i] = (None, None, f"{type(exc).__name__}: {exc}")

    threads = []
    start = time.monotonic()
    for i in range(args.count):
        delay = start + i / args.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=visit, args=(i,), daemon=True)
        thread.start()
        threads.append(thread)
    deadline = time.monotonic() + args.timeout + 2
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    statuses: dict[str, int] = {}
    for status, _, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    json.dump({"latencyMs": [ms if status == 200 else None for status, ms, _ in results],
               "errors": [e for _, _, e in results if e], "statuses": statuses}, sys.stdout)


if __name__ == "__main__":
    main()
