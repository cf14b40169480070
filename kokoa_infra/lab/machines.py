"""Lab servers as systemd machines: systemd-nspawn boots an overlay of this machine's root in a lab namespace.

Each machine has its own directory (`hosts/<netns>/` in the lab directory):

    upper/  work/   the overlay's writable layer: everything the machine ever wrote (its
                    /etc, /var, /root ...); it persists across a power-off and boot
    root/           the overlay itself, lowerdir=/ (this machine's packages), mounted here
    console.log     the machine's console (systemd's boot and shutdown messages)

`systemd-nspawn --register=no --keep-unit` boots it without a system bus or a machined on
the host, in the existing lab namespace (`--network-namespace-path`), so it sits on the lab
network like any other host. Its systemd is PID 1 of the machine's own pid namespace; this
module finds it from outside and enters its namespaces (`nsenter`) to run commands there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable

from kokoa_infra.lab.processes import mount_tables

NSPAWN = "systemd-nspawn"
# Units of this machine's root that a Kokoa server does not have or must not run in the
# lab: a database someone installed here, and jobs that reach for the internet (apt) or
# churn the shared disk. The first-boot wizard would stop the boot waiting for input.
MASKED_UNITS = ("systemd-firstboot.service", "postgresql.service", "postgresql@.service",
                "apt-daily.timer", "apt-daily-upgrade.timer", "man-db.timer", "dpkg-db-backup.timer",
                "e2scrub_all.timer", "e2scrub_reap.service", "fstrim.timer")
SSHD_DROP_IN = "/etc/ssh/sshd_config.d/kokoa-lab.conf"
HOST_KEY = "/etc/ssh/ssh_host_ed25519_key"
# Each machine's systemd gets a cgroup of its own under this one (in every hierarchy that
# systemd manages). With --keep-unit, systemd-nspawn runs the machine in its caller's cgroup:
# two machines there would share one cgroup tree, and each one's systemd would create and
# clean up the other's units (a unit fails with status 219/CGROUP).
CGROUP_PARENT = "kokoa-lab"
# Every machine's systemd, journald, logind and dbus hold inotify instances, all counted
# against root's limit, which is shared with the host and every other lab: at Linux's default
# of 128 a dozen machines exhaust it and units fail (`.path` units first). Raised, never lowered.
INOTIFY_INSTANCES = Path("/proc/sys/fs/inotify/max_user_instances")
MIN_INOTIFY_INSTANCES = 8192
# What `systemctl is-system-running` says once the boot is over.
BOOTED = ("running", "degraded")


class MachineError(Exception):
    """A machine did not boot, stop or unmount; the message says which and why."""


def upper(hdir: Path) -> Path:
    return hdir / "upper"


def root(hdir: Path) -> Path:
    return hdir / "root"


def mount_points() -> list[str]:
    """Mount points of this process's mount namespace (the root namespace for the lab)."""
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]


def mounted_under(path: Path, points: Iterable[str] | None = None) -> list[str]:
    base = str(path).rstrip("/")
    return [p for p in (mount_points() if points is None else points) if p == base or p.startswith(base + "/")]


def foreign_mounts(path: Path) -> list[str]:
    """Mounts under `path` in any mount namespace on the machine ("<point> (pid N)"); [] when none."""
    base = str(path).rstrip("/")
    found = []
    for pid, lines in mount_tables():
        for line in lines:
            fields = line.split()
            # The mount point as that namespace sees it, and an overlay's layers wherever it is.
            if fields[4] == base or fields[4].startswith(base + "/") or f"={base}/" in line:
                found.append(f"{fields[4]} (pid {pid})")
    return found


def mount_root(hdir: Path) -> Path:
    """The machine's root: an overlay of this machine's `/` with the host's own upper layer."""
    merged = root(hdir)
    if str(merged) in mount_points():
        return merged
    for sub in ("upper", "work", "root"):
        (hdir / sub).mkdir(mode=0o755, parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                           f"lowerdir=/,upperdir={upper(hdir)},workdir={hdir / 'work'}", str(merged)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise MachineError(f"cannot mount the overlay root {merged}: {proc.stderr.strip()}")
    return merged


def unmount_root(hdir: Path, tries: int = 20) -> list[str]:
    """Unmount everything under the machine's root (bounded retries, then a lazy detach); what is left."""
    merged = root(hdir)
    for _ in range(tries):
        left = mounted_under(merged)
        if not left:
            return []
        for point in sorted(left, key=len, reverse=True):
            subprocess.run(["umount", point], capture_output=True, check=False)
        if mounted_under(merged):
            time.sleep(0.1)
    for point in sorted(mounted_under(merged), key=len, reverse=True):
        # Busy after every try: detach it from the tree so nothing can reach it through here.
        subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)
    return mounted_under(merged)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)


def write_file(merged: Path, path: str, text: str, mode: int = 0o644) -> None:
    """Write `path` (absolute, as the machine sees it) into the machine's root."""
    _write(merged / path.lstrip("/"), text, mode)


def provision(merged: Path, hostname: str, host_key: Path, authorized_keys: str) -> None:
    """Make the overlay a server of its own before its first boot.

    Its own machine-id and hostname; no first-boot wizard and none of MASKED_UNITS; sshd
    (Debian's ssh.service, enabled in the root filesystem) with this host's key and the
    operator's key for root, key only, accepting KOKOA_* variables as the lab's executor sends.
    """
    _write(merged / "etc/machine-id", uuid.uuid4().hex + "\n", 0o444)
    _write(merged / "etc/hostname", hostname + "\n")
    for unit in MASKED_UNITS:
        link = merged / "etc/systemd/system" / unit
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to("/dev/null")
    _write(merged / HOST_KEY.lstrip("/"), host_key.read_text(), 0o600)
    _write(merged / f"{HOST_KEY}.pub".lstrip("/"), Path(f"{host_key}.pub").read_text())
    _write(merged / SSHD_DROP_IN.lstrip("/"), "\n".join([
        "# Kokoa lab: this host's key (the stack's hostKey pins it); root logs in with the",
        "# operator's key only; the executor sends the install's KOKOA_* variables.",
        f"HostKey {HOST_KEY}", "PermitRootLogin prohibit-password", "PubkeyAuthentication yes",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", ""]))
    ssh_dir = merged / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(ssh_dir, 0o700)
    _write(ssh_dir / "authorized_keys", authorized_keys, 0o600)


def raise_inotify_limit() -> None:
    """Make room for many machines' inotify instances (see MIN_INOTIFY_INSTANCES)."""
    if int(INOTIFY_INSTANCES.read_text()) < MIN_INOTIFY_INSTANCES:
        INOTIFY_INSTANCES.write_text(f"{MIN_INOTIFY_INSTANCES}\n")


def cgroup_hierarchies() -> list[Path]:
    """The cgroup hierarchies systemd manages here: the cgroup2 one and the named v1 `systemd` one."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype, _, options = right.split()[:3]
        if fstype == "cgroup2" or (fstype == "cgroup" and "name=systemd" in options.split(",")):
            found.append(Path(left.split()[4]))
    return found


def cgroups(machine: str) -> list[Path]:
    return [h / CGROUP_PARENT / machine for h in cgroup_hierarchies()]


def remove_cgroups(machine: str) -> list[str]:
    """Remove the machine's (empty) cgroups, deepest first; the parent too once no machine uses it."""
    left = []
    for top in cgroups(machine):
        if not top.is_dir():
            continue
        for sub in sorted((d for d in top.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True):
            try:
                sub.rmdir()
            except OSError:
                pass
        try:
            top.rmdir()
        except OSError:
            left.append(str(top))
        try:
            top.parent.rmdir()
        except OSError:
            pass  # another machine (of this or another lab) still has its cgroup there
    return left


def cgroup_processes(machine: str) -> list[int]:
    """Processes still in the machine's cgroups (root-namespace pids)."""
    pids: set[int] = set()
    for top in cgroups(machine):
        for procs in top.rglob("cgroup.procs") if top.is_dir() else ():
            try:
                pids |= {int(p) for p in procs.read_text().split()}
            except OSError:
                continue
    return sorted(pids)


def boot_argv(netns: str, hostname: str, merged: Path) -> list[str]:
    """systemd-nspawn in the machine's own cgroups (made here), booting the overlay in the lab namespace."""
    own = cgroups(netns)
    for cgroup in own:
        cgroup.mkdir(parents=True, exist_ok=True)
    # The launcher moves itself into those cgroups, then becomes systemd-nspawn.
    enter = 'while [ "$1" != -- ]; do echo $$ > "$1/cgroup.procs" || exit 1; shift; done; shift; exec "$@"'
    return ["sh", "-c", enter, "kokoa-machine", *map(str, own), "--",
            NSPAWN, "--quiet", "--register=no", "--keep-unit", "--settings=no", "--link-journal=no",
            "--resolv-conf=off", "--timezone=off", "--console=read-only",
            # A server administers its own network (wg-quick, nft); nspawn grants that only with
            # --private-network, and the machine's namespace is its own anyway.
            "--capability=CAP_NET_ADMIN",
            f"--network-namespace-path=/run/netns/{netns}", f"--machine={netns}", f"--hostname={hostname}",
            f"--directory={merged}", "--boot", "--", "systemd.firstboot=off", "systemd.log_color=0"]


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def init_of(launcher: int) -> int | None:
    """The machine's systemd: the child of systemd-nspawn that is PID 1 of its own pid namespace."""
    try:
        children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
        for child in map(int, children):
            status = _status(child)
            nspid = status.get("NSpid", "").split()
            if len(nspid) > 1 and nspid[-1] == "1" and status.get("Name") == "systemd":
                return child
    except (OSError, ValueError):
        pass
    return None


def enter_argv(init: int, argv: list[str]) -> list[str]:
    """argv run inside the machine: its mounts, hostname, IPC, network and pids, from its root.

    `--root --wd` take systemd's root and working directory. (`--wd=/` would open `/` before
    entering: the host's root, outside the machine, where relative paths would then resolve.)
    """
    return ["nsenter", f"--target={init}", "--mount", "--uts", "--ipc", "--net", "--pid", "--root", "--wd",
            "--", *argv]


def system_state(init: int) -> str:
    proc = subprocess.run(enter_argv(init, ["systemctl", "is-system-running"]), capture_output=True,
                          text=True, timeout=30, check=False)
    return proc.stdout.strip() or proc.stderr.strip()


def failed_units(init: int) -> list[str]:
    proc = subprocess.run(enter_argv(init, ["systemctl", "list-units", "--failed", "--plain", "--no-legend"]),
                          capture_output=True, text=True, timeout=30, check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def wait_booted(launcher: Callable[[], int | None], alive: Callable[[int], bool], what: str,
                seconds: float = 120) -> int:
    """Wait (bounded) until the machine's systemd has finished booting; returns its pid."""
    deadline = time.monotonic() + seconds
    state = "not started"
    while time.monotonic() < deadline:
        pid = launcher()
        if pid is None:
            raise MachineError(f"{what}: systemd-nspawn exited during the boot")
        init = init_of(pid)
        if init is not None and alive(init):
            state = system_state(init)
            if state in BOOTED:
                return init
        time.sleep(0.2)
    raise MachineError(f"{what}: not booted after {seconds:.0f}s (systemctl is-system-running: {state})")


def halt(init: int | None, launcher: int | None, alive: Callable[[int | None], bool],
         reap: Callable[[int], None], seconds: float = 20) -> None:
    """Power the machine off: SIGRTMIN+3 to its systemd, a bounded wait, then SIGKILL by pid.

    A killed systemd-nspawn would leave the machine's systemd running, so the machine's
    init is what is signalled; SIGKILL to a pid namespace's init ends every process in it.
    """
    def wait(pid: int, limit: float) -> bool:
        end = time.monotonic() + limit
        while time.monotonic() < end:
            reap(pid)
            if not alive(pid):
                return True
            time.sleep(0.05)
        return not alive(pid)

    if not init and launcher and alive(launcher):
        init = init_of(launcher)  # still booting when its pid was last recorded
    if init and alive(init):
        os.kill(init, signal.SIGRTMIN + 3)
        if not wait(init, seconds):
            os.kill(init, signal.SIGKILL)
            wait(init, 5)
    if launcher and alive(launcher) and not wait(launcher, 5):
        os.kill(launcher, signal.SIGKILL)
        wait(launcher, 5)


def kill_cgroup_processes(machine: str, alive: Callable[[int | None], bool]) -> None:
    """SIGKILL, by pid, whatever is left in the machine's cgroups once its init is gone."""
    for _ in range(20):
        pids = [p for p in cgroup_processes(machine) if alive(p)]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def remove_runtime_dirs(machine: str) -> None:
    """What systemd-nspawn leaves on the host for a machine (it refuses to clear a /run on disk)."""
    for path in (Path("/run/systemd/nspawn/propagate") / machine, Path("/run/systemd/nspawn/unix-export") / machine):
        if path.is_dir() and not mounted_under(path):
            for child in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                child.rmdir() if child.is_dir() and not child.is_symlink() else child.unlink()
            path.rmdir()
