"""A legitimate visitor for the flood benchmark: N requests at a fixed rate, each on a new TLS connection.

Open loop: request i starts at i / rate seconds whatever the earlier ones are doing, so a
slow edge shows as latency, not as fewer requests. Run inside a lab namespace; prints one
JSON document: per-request latency in milliseconds (None on failure) and the failures.
Only the standard library: it runs with the machine's python3 inside any namespace.
"""

from __future__ import annotations

import argparse
import http.client
import json
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


def one_request(site: str, address: str, path: str, context: ssl.SSLContext, timeout: float) -> tuple[int, float]:
    """(status, milliseconds) of one GET on a fresh TCP + TLS connection."""
    started = time.perf_counter()
    conn = SiteConnection(site, address, context, timeout)
    try:
        conn.request("GET", path, headers={"Host": site, "Connection": "close"})
        response = conn.getresponse()
        response.read()
        return response.status, (time.perf_counter() - started) * 1000
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", required=True, help="site name (SNI, Host, certificate)")
    parser.add_argument("--address", required=True, help="edge address to connect to")
    parser.add_argument("--path", default="/")
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--rate", type=float, default=10.0, help="requests per second")
    parser.add_argument("--count", type=int, default=100, help="requests in all (bounded)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    args = parser.parse_args()
    if not 0 < args.count <= 10000 or not 0 < args.rate <= 1000:
        parser.error("--count must be 1..10000 and --rate 1..1000")

    context = ssl.create_default_context(cafile=args.cafile)
    results: list[tuple[int | None, float | None, str]] = [(None, None, "not run")] * args.count

    def visit(i: int) -> None:
        try:
            status, ms = one_request(args.host, args.address, args.path, context, args.timeout)
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
    json.dump({"latencyMs": [ms if status == 200 else None for status, ms, _ in results],
               "errors": [e for _, _, e in results if e]}, sys.stdout)


if __name__ == "__main__":
    main()
