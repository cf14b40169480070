"""A minimal WebSocket echo server and client, for the lab (its second demo application) and the
tests (standard library only, RFC 6455: the opening handshake and unfragmented text frames, the
client's masked). The server is also a small HTTP application: a plain request is answered with
the headers it carried and the size of its body, so that a test sees what the edge and the
gateway passed on.

    python3 kokoa_infra/lab/websocket.py serve HOST PORT
    python3 kokoa_infra/lab/websocket.py echo URL --ca CA --connect HOST:PORT --message TEXT [--count N --pause S]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import socket
import socketserver
import ssl
import struct
import sys
import time
from urllib.parse import urlsplit

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
HEADERS = ("upgrade", "connection", "x-forwarded-proto", "x-forwarded-scheme", "true-client-ip", "x-client-ip",
           "cf-connecting-ip", "x-original-url", "x-rewrite-url", "x-real-ip", "x-forwarded-for")


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def read_head(stream) -> tuple[str, dict[str, str]] | None:
    line = stream.readline(65536)
    if not line:
        return None
    headers = {}
    while True:
        header = stream.readline(65536)
        if header in (b"\r\n", b"\n", b""):
            break
        name, _, value = header.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return line.decode("latin-1").strip(), headers


def read_frame(stream) -> tuple[int, bytes] | None:
    head = stream.read(2)
    if len(head) < 2:
        return None
    opcode, length = head[0] & 0x0F, head[1] & 0x7F
    if length == 126:
        length = struct.unpack(">H", stream.read(2))[0]
    elif length == 127:
        length = struct.unpack(">Q", stream.read(8))[0]
    mask = stream.read(4) if head[1] & 0x80 else b""
    data = stream.read(length)
    if mask:
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    return opcode, data


def frame(opcode: int, data: bytes, masked: bool) -> bytes:
    length = len(data)
    head = bytes([0x80 | opcode])
    bit = 0x80 if masked else 0
    if length < 126:
        head += bytes([bit | length])
    elif length < 65536:
        head += bytes([bit | 126]) + struct.pack(">H", length)
    else:
        head += bytes([bit | 127]) + struct.pack(">Q", length)
    if not masked:
        return head + data
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


class Handler(socketserver.StreamRequestHandler):
    timeout = 600  # bounded: a forgotten connection ends

    def handle(self) -> None:
        while True:
            request = read_head(self.rfile)
            if request is None:
                return
            _, headers = request
            upgrade = headers.get("upgrade", "").lower() == "websocket"
            if upgrade and "upgrade" in headers.get("connection", "").lower() and "sec-websocket-key" in headers:
                self.wfile.write(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                  f"Sec-WebSocket-Accept: {accept_key(headers['sec-websocket-key'])}\r\n\r\n").encode())
                self.echo()
                return
            size = self.discard_body(headers)
            body = " ".join(f"{h}=[{headers.get(h, '')}]" for h in HEADERS) + f" body={size}\n"
            self.wfile.write((f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                              f"\r\n{body}").encode())

    def discard_body(self, headers: dict[str, str]) -> int:
        if "content-length" in headers:
            left = total = int(headers["content-length"])
            while left:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    return total - left
                left -= len(chunk)
            return total
        total = 0
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                self.rfile.read(size + 2)  # the chunk and its CRLF (the last: the final CRLF)
                total += size
                if size == 0:
                    return total
        return total

    def echo(self) -> None:
        while (received := read_frame(self.rfile)) is not None:
            opcode, data = received
            if opcode == 0x8:  # close
                self.wfile.write(frame(0x8, data[:2], masked=False))
                return
            self.wfile.write(frame(opcode, data, masked=False))


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def echo(url: str, message: str, *, ca: str | None = None, connect: str | None = None, count: int = 1,
         pause: float = 0.0, timeout: float = 10.0) -> list[str]:
    """Opens a WebSocket to `url` (ws:// or wss://, at `connect` host:port if given), sends
    `message` `count` times `pause` seconds apart, and returns the echoes. Raises on anything else."""
    parts = urlsplit(url)
    default_port = 443 if parts.scheme == "wss" else 80
    host, port = connect.rsplit(":", 1) if connect else (parts.hostname, parts.port or default_port)
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    if parts.scheme == "wss":
        context = ssl.create_default_context(cafile=ca)
        # What a browser does for a WebSocket when the server has no WebSockets over HTTP/2.
        context.set_alpn_protocols(["http/1.1"])
        sock = context.wrap_socket(sock, server_hostname=parts.hostname)
        if sock.selected_alpn_protocol() != "http/1.1":
            raise RuntimeError(f"ALPN chose {sock.selected_alpn_protocol()!r}, not http/1.1")
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.hostname}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    stream = sock.makefile("rb")
    status, headers = read_head(stream)
    if " 101 " not in status + " " or headers.get("sec-websocket-accept") != accept_key(key):
        raise RuntimeError(f"no WebSocket handshake: {status} {headers}")
    echoes = []
    for i in range(count):
        if i:
            time.sleep(pause)
        sock.sendall(frame(0x1, message.encode(), masked=True))
        received = read_frame(stream)
        if received is None:
            raise RuntimeError(f"the connection closed after {len(echoes)} echoes")
        echoes.append(received[1].decode())
    sock.sendall(frame(0x8, struct.pack(">H", 1000), masked=True))
    sock.close()
    return echoes


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("host")
    serve.add_argument("port", type=int)
    client = sub.add_parser("echo")
    client.add_argument("url")
    client.add_argument("--ca")
    client.add_argument("--connect")
    client.add_argument("--message", default="hello")
    client.add_argument("--count", type=int, default=1)
    client.add_argument("--pause", type=float, default=0.0)
    args = parser.parse_args()
    if args.command == "serve":
        with Server((args.host, args.port), Handler) as server:
            server.serve_forever()
        return 0
    try:
        print("\n".join(echo(args.url, args.message, ca=args.ca, connect=args.connect, count=args.count,
                             pause=args.pause)))
    except (OSError, RuntimeError) as error:
        print(f"websocket: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
