"""The lab's servers: a systemd machine booted per origin and edge (machines.py), or, with `--init plain`,
sshd as the init of the host's own mount, UTS and pid namespaces with private copies of /run, /var, /etc/...
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from typing import Any, Mapping

from kokoa_infra.lab import machines
from kokoa_infra.lab.context import LabContext
from kokoa_infra.lab.hosts import Host
from kokoa_infra.lab.processes import (
    LabError,
    alive,
    in_netns,
    listening,
    mounted_anywhere,
    reap,
    recorded_pid,
    run,
    started,
    wait_until,
)

# Directories some lab had to create on the machine (bind targets such as /etc/kokoa), shared
# by every lab here: whichever lab goes down last removes them.
CREATED_DIRS = Path("/run/kokoa-lab-created-dirs")

# Each server gets its own copy of these, bind-mounted over the machine's in the server's
# mount namespace, so install scripts write pid files, logs and state as on a real host.
PRIVATE_DIRS = ("/run", "/tmp", "/var/tmp", "/var/log", "/var/www", "/var/lib/kokoa",
                "/var/lib/letsencrypt", "/var/lib/nginx")
# ... and these under /etc, through `ip netns exec`'s /etc/netns/<ns>/<x> → /etc/<x> binds.
PRIVATE_ETC = ("wireguard", "nginx", "letsencrypt", "kokoa")
# Directories a fresh server has (its packages made them); mode per path.
SKELETON = {"/run/sshd": 0o755, "/run/lock": 0o1777, "/tmp": 0o1777, "/var/tmp": 0o1777,
            "/var/log/nginx": 0o755, "/var/www/html": 0o755}

# Directories systemd-nspawn makes in this machine's /run (on disk here) for its machines.
NSPAWN_RUN_DIRS = ("/run/systemd", "/run/systemd/nspawn", "/run/systemd/nspawn/propagate",
                   "/run/systemd/nspawn/locks")


def machine_dir(path: str) -> None:
    """Bind targets (and /etc/netns) must exist on the machine; remember the ones the lab created."""
    if not os.path.isdir(path):
        with open(CREATED_DIRS, "a") as created:
            created.write(f"{path}\n")
        os.makedirs(path, exist_ok=True)


def remove_created_dirs() -> None:
    """Remove the directories labs created, unless another lab still has files or mounts in them."""
    if not CREATED_DIRS.exists():
        return
    kept = []
    for path in reversed(list(dict.fromkeys(CREATED_DIRS.read_text().split()))):
        if os.path.isdir(path) and (os.listdir(path) or mounted_anywhere(path)):
            kept.insert(0, path)
        elif os.path.isdir(path):
            os.rmdir(path)
    if kept:
        CREATED_DIRS.write_text("".join(f"{p}\n" for p in kept))
    else:
        CREATED_DIRS.unlink()


def server_up(netns: str, host: Mapping[str, Any]) -> bool:
    """The server's init (the machine's systemd, or sshd) runs and its sshd accepts connections."""
    init = recorded_pid(host, "init") if host.get("mode") == "systemd" else host.get("init")
    return bool(init) and alive(init) and in_netns(init, netns) and listening(netns, 22)


def halt(netns: str, entry: Mapping[str, Any]) -> None:
    """Power a systemd machine off, as `systemctl poweroff` would: units stop, then systemd exits; then
    whatever is left in its cgroups is killed."""
    machines.halt(recorded_pid(entry, "init"), recorded_pid(entry, "launcher"), alive, reap)
    machines.kill_cgroup_processes(netns, alive)


def clear_machine(netns: str, hdir: Path) -> list[str]:
    """After a halt: the machine's root unmounted, what systemd-nspawn left removed; the mounts still there."""
    left = machines.unmount_root(hdir)
    machines.remove_runtime_dirs(netns)
    machines.remove_cgroups(netns)
    return left


def start_server(lab: LabContext, host: Host) -> None:
    """sshd up on a plain host; on a systemd machine, the boot started (`await_server` waits)."""
    hdir = lab.host_dir(host.netns)
    hdir.mkdir(parents=True, exist_ok=True)
    key = hdir / "ssh_host_ed25519_key"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", host.netns, "-f", str(key)])
    if lab.init_system(host.netns) == "systemd":
        _start_machine(lab, host)
    else:
        _start_plain(lab, host)


def _start_machine(lab: LabContext, host: Host) -> None:
    hdir = lab.host_dir(host.netns)
    for path in NSPAWN_RUN_DIRS:
        machine_dir(path)
    machines.raise_inotify_limit()
    with lab.recording() as rec:
        # Recorded before it is mounted, so `down` unmounts it after a crash.
        rec["hosts"][host.netns]["root"] = str(machines.root(hdir))
    try:
        merged = machines.mount_root(hdir)
        machines.provision(merged, host.name, hdir / "ssh_host_ed25519_key",
                           Path(f"{lab.operator_key}.pub").read_text())
    except (machines.MachineError, OSError) as exc:
        raise LabError(f"machine {host.netns}: {exc}") from exc
    boot(lab, host.netns)


def boot(lab: LabContext, netns: str) -> None:
    host = Host(**lab.record()["hosts"][netns]["host"])
    hdir = lab.host_dir(netns)
    launcher = lab.spawn(machines.boot_argv(netns, host.name, machines.root(hdir)), hdir / "console.log")
    with lab.recording() as rec:
        rec["hosts"][netns].update(launcher=launcher.pid, launcher_start=started(launcher.pid), init=None)


def await_server(lab: LabContext, netns: str) -> None:
    """The machine booted (every unit started: `running`, not `degraded`) and its sshd listens."""
    entry = lab.record()["hosts"][netns]
    if entry.get("mode") != "systemd":
        return
    launcher = entry["launcher"]
    try:
        init = machines.wait_booted(lambda: launcher if alive(launcher) else None, alive, f"machine {netns}")
    except machines.MachineError as exc:
        raise LabError(f"{exc}; console: {lab.host_dir(netns) / 'console.log'}") from exc
    with lab.recording() as rec:
        rec["hosts"][netns].update(init=init, init_start=started(init))
    failed = machines.failed_units(init)
    if failed:
        raise LabError(f"machine {netns} booted with failed units: {', '.join(failed)} "
                       f"(`{shlex.join(lab.host_argv(netns, ['systemctl', 'status', failed[0]]))}`)")
    wait_until(f"sshd on {netns}", lambda: listening(netns, 22))


def _start_plain(lab: LabContext, host: Host) -> None:
    hdir = lab.host_dir(host.netns)
    root = hdir / "root"
    for path in PRIVATE_DIRS:
        (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
        machine_dir(path)
    for path, mode in SKELETON.items():
        (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
        os.chmod(root / path.lstrip("/"), mode)
    machine_dir("/etc/netns")
    etc = Path("/etc/netns") / host.netns
    shutil.rmtree(etc, ignore_errors=True)
    etc.mkdir(parents=True)
    for name in PRIVATE_ETC:
        machine_dir(f"/etc/{name}")
    shutil.copytree("/etc/nginx", etc / "nginx", symlinks=True)
    (etc / "nginx" / "sites-enabled" / "default").unlink(missing_ok=True)
    (etc / "wireguard").mkdir(mode=0o700)
    (etc / "letsencrypt").mkdir()
    if Path("/etc/letsencrypt/cli.ini").exists():
        shutil.copy2("/etc/letsencrypt/cli.ini", etc / "letsencrypt" / "cli.ini")
    (etc / "kokoa").mkdir()

    key = hdir / "ssh_host_ed25519_key"
    authorized = hdir / "authorized_keys"
    authorized.write_text(Path(f"{lab.operator_key}.pub").read_text())
    config = hdir / "sshd_config"
    config.write_text("\n".join([
        "Port 22", "ListenAddress 0.0.0.0", f"HostKey {key}", "PidFile /run/sshd.pid",
        f"AuthorizedKeysFile {authorized}", "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        # PAM's session modules expect a systemd host; key-only root login needs none of it.
        "UsePAM no", "PrintMotd no",
        "Subsystem sftp /usr/lib/openssh/sftp-server", ""]))
    binds = "".join(f"mount --bind {shlex.quote(str(root / p.lstrip('/')))} {p}; " for p in PRIVATE_DIRS)
    script = (f"set -e; {binds}hostname {shlex.quote(host.name)}; "
              f"exec /usr/sbin/sshd -D -f {shlex.quote(str(config))} -E /var/log/sshd.log")
    # Own mount, UTS and pid namespaces: install scripts see this host's /run and /var, and
    # `pidof nginx` or `pkill` on one server cannot see another's. sshd is the pid
    # namespace's init, so it reaps daemons and killing it takes everything on the host down.
    launcher = lab.spawn(["ip", "netns", "exec", host.netns, "unshare", "--mount", "--uts", "--pid",
                          "--fork", "--kill-child", "--mount-proc", "--propagation", "private",
                          "sh", "-c", script], hdir / "launcher.log")
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
    wait_until(f"pid namespace of {host.netns}",
               lambda: launcher.poll() is None and children.exists() and children.read_text().strip() != "")
    init = int(children.read_text().split()[0])
    with lab.recording() as rec:
        rec["hosts"][host.netns].update(launcher=launcher.pid, init=init)
    wait_until(f"sshd on {host.netns}", lambda: launcher.poll() is None and listening(host.netns, 22))
