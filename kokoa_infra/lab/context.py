"""What the lab's parts (servers, services, DNS) need of a lab: its paths, its record (`lab.json`) and its shell.

`lab.py` composes those parts; they depend on this narrow context only, never on `Lab` itself.
"""

from __future__ import annotations

import json
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from kokoa_infra.atomic_file import write_private
from kokoa_infra.lab import machines
from kokoa_infra.lab.hosts import PREFIX
from kokoa_infra.lab.processes import LabError, recorded_pid, run


class LabContext:
    """One lab's directory and the files in it, the record of everything it made, and how to run things on its hosts."""

    def __init__(self, directory: Path, prefix: str = PREFIX) -> None:
        self.dir = Path(directory)
        self.prefix = prefix
        self.record_file = self.dir / "lab.json"
        self.operator_key = self.dir / "operator" / "id_ed25519"
        self.ca_bundle = self.dir / "ca.pem"
        self.acme_dir = self.dir / "acme"
        self.acme_cert = self.acme_dir / "cert.pem"
        self.seed_file = self.dir / "seed"
        self._children: list[subprocess.Popen] = []

    # --- the record -------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        if self.record_file.exists():
            return json.loads(self.record_file.read_text())
        return {"prefix": self.prefix, "namespaces": [], "hosts": {}, "processes": {}}

    @contextmanager
    def recording(self) -> Iterator[dict[str, Any]]:
        """Change the record; written before each thing is made, so `down` finds it after a crash."""
        rec = self.record()
        yield rec
        write_private(self.record_file, json.dumps(rec, indent=1, sort_keys=True))

    def host_dir(self, netns: str) -> Path:
        return self.dir / "hosts" / netns

    def host_key(self, netns: str) -> str:
        """The server's public SSH host key, as `kokoa:...hostKey` pins it."""
        return (self.host_dir(netns) / "ssh_host_ed25519_key.pub").read_text().strip()

    def seed(self) -> bytes:
        return self.seed_file.read_bytes()

    def init_system(self, netns: str) -> str:
        """`systemd` for a server booted as a systemd machine, `plain` for every other host."""
        return self.record()["hosts"].get(netns, {}).get("mode", "plain")

    # --- running things on hosts ------------------------------------------------------
    def host_argv(self, netns: str, argv: list[str]) -> list[str]:
        entry = self.record()["hosts"].get(netns, {})
        pid = entry.get("init")
        if entry.get("mode") == "systemd":
            if not recorded_pid(entry, "init"):
                raise LabError(f"machine {netns} is not running (`kokoa lab up` boots it again)")
            # The view the machine's own processes have: its root, mounts, hostname, network, pids.
            return machines.enter_argv(pid, argv)
        if pid:
            # The same view an SSH session on that server has: its mounts, network, hostname, pids.
            return ["nsenter", f"--target={pid}", "--mount", "--net", "--uts", "--pid", "--wd=/", "--", *argv]
        return ["ip", "netns", "exec", netns, *argv]

    def on_host(self, netns: str, argv: list[str], check: bool = False, **kwargs) -> subprocess.CompletedProcess:
        """Run `argv` on a lab host as its own processes would see the machine."""
        return run(self.host_argv(netns, list(argv)), check=check, **kwargs)

    def spawn(self, argv: list[str], log: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            # A session of its own: Ctrl-C on `kokoa lab up` must not take the hosts down.
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env)
        self._children.append(child)
        return child

    def reap_children(self) -> None:
        for child in self._children:
            child.poll()
        self._children = [c for c in self._children if c.returncode is None]
