"""A lab user that follows DNS: before every request it asks the lab resolver, then GETs over verified HTTPS.

Run it in the client namespace:
`ip netns exec kokoa-client python -m tests.support.dns_client --resolver IP --domain D --ca CA --log F`
(from the project directory).
It resolves the domain for every request (no cache: what the resolver says now is
where the request goes), picks one of the A records at random, and appends one line per
request to the log: `<unix time> <address or -> <status or error>`. It stops when the
stop file appears, after --max-requests or after --max-seconds, whichever comes first.
"""

from __future__ import annotations

import argparse
import random
import socket
import ssl
import time
from pathlib import Path

from kokoa_infra.lab.resolver import query


def get(address: str, domain: str, context: ssl.SSLContext, timeout: float = 5.0) -> str:
    """The HTTP status of GET / for `domain` at `address`, verified against the lab CA."""
    with socket.create_connection((address, 443), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname=domain) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {domain}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while len(data) < 65536:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                data += chunk
    return data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/") else "no-http"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolver", required=True)
    parser.add_argument("--domain", required=True)
    parser.add_argument("--ca", required=True, help="CA bundle that verifies the lab's certificates")
    parser.add_argument("--log", required=True, help="append one line per request here")
    parser.add_argument("--stop-file", help="stop once this file exists")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between requests")
    parser.add_argument("--max-requests", type=int, default=5000)
    parser.add_argument("--max-seconds", type=float, default=300)
    args = parser.parse_args(argv)
    context = ssl.create_default_context(cafile=args.ca)
    deadline = time.monotonic() + args.max_seconds
    stop = Path(args.stop_file) if args.stop_file else None
    with open(args.log, "a", buffering=1) as log:
        for _ in range(args.max_requests):
            if time.monotonic() > deadline or (stop is not None and stop.exists()):
                break
            address = "-"
            try:
                addresses = query(args.resolver, args.domain)
                if not addresses:
                    outcome = "no-address"
                else:
                    address = random.choice(addresses)
                    outcome = get(address, args.domain, context)
            except (OSError, ssl.SSLError) as exc:
                outcome = type(exc).__name__
            log.write(f"{time.time():.3f} {address} {outcome}\n")
            time.sleep(args.interval)


if __name__ == "__main__":
    main()
