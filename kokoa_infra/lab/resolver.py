"""The lab's DNS: answers each name of the zone from the Cloudflare stand-in's records, as Cloudflare's DNS would.

`serve` runs in a lab namespace (the ACME host's) on port 53, UDP and TCP, and re-reads
the stand-in's state file whenever it changes, so a record that `pulumi up` (the lab's
executor) or `kokoa-dns` adds or removes is answered at once. Names of the zone without
an A record get NXDOMAIN; names outside the zone are REFUSED (this is no recursive
resolver). `query` asks a server for a name's A records (run it in a lab namespace).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dnslib import QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer


class StandinRecords(BaseResolver):
    """A resolver over the stand-in's JSON state file (reloaded when its mtime or size changes)."""

    def __init__(self, state_file: Path) -> None:
        self.state_file = Path(state_file)
        self._stamp: tuple[int, int] | None = None
        self._zone = ""
        self._records: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def _load(self) -> tuple[str, list[dict[str, Any]]]:
        with self._lock:
            try:
                stat = self.state_file.stat()
                stamp = (stat.st_mtime_ns, stat.st_size)
                if stamp != self._stamp:
                    body = json.loads(self.state_file.read_text())
                    self._zone, self._records, self._stamp = body["zone_name"], body["records"], stamp
            except (OSError, ValueError, KeyError):
                pass  # keep answering from what was read last
            return self._zone, self._records

    def resolve(self, request, handler):
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        zone, records = self._load()
        if not zone or not (name == zone or name.endswith("." + zone)):
            reply.header.rcode = RCODE.REFUSED
            return reply
        named = [r for r in records if r["name"] == name]
        if not named:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        if request.q.qtype in (QTYPE.A, QTYPE.ANY):
            for record in named:
                if record["type"] == "A":
                    ttl = int(record.get("ttl") or 1)  # Cloudflare's 1 means "automatic": 300 s
                    reply.add_answer(RR(request.q.qname, QTYPE.A, ttl=300 if ttl == 1 else ttl,
                                        rdata=A(record["content"])))
        return reply


def serve(address: str, port: int, state_file: Path) -> None:
    resolver = StandinRecords(state_file)
    quiet = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
    servers = [DNSServer(resolver, address=address, port=port, logger=quiet, tcp=tcp) for tcp in (False, True)]
    for server in servers:
        server.start_thread()
    print(f"resolver on {address}:{port} from {state_file}", flush=True)
    while all(server.isAlive() for server in servers):
        time.sleep(1)


def query(server: str, name: str, port: int = 53, timeout: float = 2.0) -> list[str]:
    """The A records of `name` as `server` answers (empty for NXDOMAIN); raises OSError on no answer."""
    packet = DNSRecord.question(name, "A").send(server, port, timeout=timeout)
    reply = DNSRecord.parse(packet)
    return sorted(str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser("serve")
    serve_parser.add_argument("--address", required=True)
    serve_parser.add_argument("--port", type=int, default=53)
    serve_parser.add_argument("--records", required=True, help="the stand-in's state file")
    query_parser = sub.add_parser("query")
    query_parser.add_argument("--server", required=True)
    query_parser.add_argument("--port", type=int, default=53)
    query_parser.add_argument("name")
    args = parser.parse_args(argv)
    if args.command == "serve":
        os.umask(0o022)
        serve(args.address, args.port, Path(args.records))
    else:
        try:
            print("\n".join(query(args.server, args.name, args.port)))
        except OSError as exc:
            print(f"no answer from {args.server}: {exc}", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    main()
