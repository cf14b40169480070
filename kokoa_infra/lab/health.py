"""`kokoa lab health`: `kokoa health` against the lab, from a host that reaches every node.

The sweep runs in the first origin's network namespace (its tunnel reaches its edges by
WireGuard, the lab bridge every public address), with the lab's outputs file and CA
bundle. The Cloudflare stand-in listens on 127.0.0.1 of this machine's namespace, which
that namespace cannot see: a relay listens on 127.0.0.1 inside it (its socket made by a
thread that entered the namespace) and passes each connection to the stand-in, so that
`--failover` talks to the same records the lab's resolver answers from.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

CLONE_NEWNET = 0x40000000
RELAY_IDLE_S = 120.0


def listen_in_netns(netns: str) -> socket.socket:
    """A TCP socket listening on 127.0.0.1 (a free port) inside namespace `netns`."""
    made: dict[str, object] = {}

    def enter_and_listen() -> None:
        # setns changes the calling thread only; this thread ends right after.
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {netns}")
            finally:
                os.close(fd)
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind(("127.0.0.1", 0))
            listener.listen(16)
            made["socket"] = listener
        except OSError as exc:
            made["error"] = exc

    thread = threading.Thread(target=enter_and_listen, name=f"enter-{netns}")
    thread.start()
    thread.join(timeout=10)
    if "socket" not in made:
        raise OSError(f"cannot listen inside {netns}: {made.get('error', 'timed out')}")
    return made["socket"]  # type: ignore[return-value]


def _pipe(client: socket.socket, upstream: tuple[str, int]) -> None:
    """Copy both ways until either side closes or nothing moves for RELAY_IDLE_S."""
    try:
        server = socket.create_connection(upstream, timeout=10)
    except OSError:
        client.close()
        return
    selector = selectors.DefaultSelector()
    selector.register(client, selectors.EVENT_READ, server)
    selector.register(server, selectors.EVENT_READ, client)
    try:
        while True:
            ready = selector.select(timeout=RELAY_IDLE_S)
            if not ready:
                return
            for key, _ in ready:
                data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                if not data:
                    return
                key.data.sendall(data)
    except OSError:
        return
    finally:
        selector.close()
        client.close()
        server.close()


def start_relay(netns: str, upstream_url: str) -> tuple[str, socket.socket]:
    """Relay 127.0.0.1:<port> in `netns` to `upstream_url` (loopback here); the URL to use there."""
    parts = urlsplit(upstream_url)
    if parts.hostname != "127.0.0.1" or parts.port is None:
        raise OSError(f"the stand-in's URL {upstream_url} is not on 127.0.0.1")
    listener = listen_in_netns(netns)
    upstream = ("127.0.0.1", parts.port)

    def accept() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return   # closed: the relay ends with the command
            threading.Thread(target=_pipe, args=(client, upstream), daemon=True).start()

    threading.Thread(target=accept, name="relay", daemon=True).start()
    port = listener.getsockname()[1]
    return f"http://127.0.0.1:{port}{parts.path}", listener


def run_health(netns: str, outputs_file: Path, ca_bundle: str, cloudflare_env: Mapping[str, str],
               state_dir: Path, args: Sequence[str], project_dir: Path) -> int:
    """`kokoa health ARGS` in `netns` with the lab's files; its exit code."""
    base_url, listener = start_relay(netns, cloudflare_env["CLOUDFLARE_API_BASE_URL"])
    extra: list[str] = []
    if "--failover" in args and not any(a.startswith("--failover-state") for a in args):
        extra += ["--failover-state", str(state_dir / "failover.json")]
    argv = ["ip", "netns", "exec", netns, sys.executable, "-m", "kokoa_infra.health",
            "--outputs", str(outputs_file), "--ca-bundle", ca_bundle, *extra, *args]
    environment = {**os.environ, **cloudflare_env, "CLOUDFLARE_API_BASE_URL": base_url,
                   "PYTHONPATH": str(project_dir)}
    try:
        return subprocess.run(argv, env=environment, check=False).returncode
    except KeyboardInterrupt:
        return 0
    finally:
        listener.close()
