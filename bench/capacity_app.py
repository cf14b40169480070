"""An application of limited capacity for the distributed-flood benchmark: it serves WORKERS
requests at a time, SERVICE_MS each, and queues the rest (as a real application server does).

HTTP/1.1 with keep-alive (the edge and the gateway reuse connections). It counts what reaches
it by client class (the benchmark's attackers send `User-Agent: kokoa-bench-attacker`) and the
most requests it held at once, served and queued; `GET /` on the stats address returns them as
JSON and `GET /reset` starts the count again. Only the standard library: the benchmark runs it
with the lab host's own python3 (`python3 -c "$(cat capacity_app.py)" ...`).
"""

from __future__ import annotations

import argparse
import asyncio
import json

BODY = b"hello from origin shop\n"


class App:
    def __init__(self, workers: int, service_ms: float) -> None:
        self.slots = asyncio.Semaphore(workers)
        self.service_s = service_ms / 1000
        self.reset()

    def reset(self) -> None:
        self.held = 0
        self.peak = 0
        self.counts = {"attacker": 0, "api": 0, "visitor": 0}

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1] if len(lines[0].split(" ")) > 1 else "/"
                fields = (line.partition(":") for line in lines[1:] if line)
                headers = {k.strip().lower(): v.strip() for k, _, v in fields}
                length = int(headers.get("content-length", "0") or 0)
                if length:
                    await reader.readexactly(length)
                self.held += 1
                self.peak = max(self.peak, self.held)
                try:
                    async with self.slots:
                        await asyncio.sleep(self.service_s)
                finally:
                    self.held -= 1
                kind = ("attacker" if "kokoa-bench-attacker" in headers.get("user-agent", "")
                        else "api" if path.startswith("/api/") else "visitor")
                self.counts[kind] += 1
                close = headers.get("connection", "").lower() == "close"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s"
                             % (len(BODY), b"Connection: close\r\n" if close else b"", BODY))
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stats(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.split(b" ")[1].startswith(b"/reset"):
                self.reset()
            body = json.dumps({"peak": self.peak, "held": self.held, "counts": self.counts}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:8080")
    parser.add_argument("--stats", default="127.0.0.1:8079")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--service-ms", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=3600, help="stop after this long (bounded)")
    args = parser.parse_args()
    app = App(args.workers, args.service_ms)
    host, port = args.listen.rsplit(":", 1)
    stats_host, stats_port = args.stats.rsplit(":", 1)
    server = await asyncio.start_server(app.serve, host, int(port), backlog=1024, reuse_address=True)
    stats = await asyncio.start_server(app.stats, stats_host, int(stats_port), reuse_address=True)
    async with server, stats:
        await asyncio.sleep(args.seconds)


if __name__ == "__main__":
    asyncio.run(main())
