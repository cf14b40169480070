"""The lab's plumbing: run a command, wait (bounded), tell live processes from reused pids, kill, list namespaces."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping


class LabError(Exception):
    """The lab cannot be built or used; the message says what and where."""


def run(argv: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a command for the lab's own plumbing; a failure is a LabError naming the command."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    proc = subprocess.run(argv, check=False, **kwargs)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout or "").strip()
        raise LabError(f"`{shlex.join(argv)}` failed ({proc.returncode}): {detail}")
    return proc


def wait_until(what: str, ready: Callable[[], bool], tries: int = 50, delay: float = 0.1) -> None:
    """Poll `ready` at most `tries` times; every wait in the lab is bounded."""
    for _ in range(tries):
        if ready():
            return
        time.sleep(delay)
    raise LabError(f"{what} not ready after {tries * delay:.0f}s")


def alive(pid: int | None) -> bool:
    """A live process (this machine's PID 1 does not reap orphans, so zombies count as dead)."""
    if not pid:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def started(pid: int | None) -> int | None:
    """A process's start time (clock ticks since boot): with the pid, it names one process for good."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError, TypeError):
        return None


def recorded_pid(host: Mapping[str, Any], key: str) -> int | None:
    """The machine's recorded init or launcher, if that very process still runs (not a reused pid)."""
    pid = host.get(key)
    return pid if pid and alive(pid) and started(pid) == host.get(f"{key}_start") else None


def reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not ours: PID 1 owns it


def kill(pids: list[int], grace: float = 3.0) -> None:
    """SIGTERM, then after `grace` seconds SIGKILL; returns once none is alive (bounded)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            for pid in pids:
                reap(pid)
            if not any(alive(p) for p in pids):
                return
            time.sleep(0.05)


def namespaces() -> set[str]:
    out = run(["ip", "netns", "list"]).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def in_netns(pid: int, netns: str) -> bool:
    """Whether `pid` lives in the named network namespace (a recorded pid may have been reused)."""
    try:
        ns, mine = os.stat(f"/proc/{pid}/ns/net"), os.stat(f"/run/netns/{netns}")
    except OSError:
        return False
    return (ns.st_dev, ns.st_ino) == (mine.st_dev, mine.st_ino)


def netns_pids(netns: str) -> list[int]:
    proc = run(["ip", "netns", "pids", netns], check=False)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def mount_tables() -> Iterator[tuple[str, list[str]]]:
    """(a pid, its /proc/<pid>/mountinfo lines) once for every mount namespace on the machine."""
    seen = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            mnt = os.readlink(proc / "ns" / "mnt")
            if mnt in seen:
                continue
            seen.add(mnt)
            lines = (proc / "mountinfo").read_text().splitlines()
        except OSError:
            continue
        yield proc.name, lines


def mounted_anywhere(path: str) -> bool:
    """Whether any mount namespace on the machine uses `path` as a mount point."""
    return any(line.split()[4] == path for _, lines in mount_tables() for line in lines)


def listening(netns: str, port: int) -> bool:
    """Whether something in `netns` listens on TCP `port`."""
    proc = run(["ip", "netns", "exec", netns, "ss", "-Hltn", f"sport = :{port}"], check=False)
    return proc.returncode == 0 and bool(proc.stdout.strip())
