"""The lab on this machine: its hosts made and torn down, commands run on them, and the record (`lab.json`) of
everything it made. Servers: servers.py; pebble, DNS and the demo application: services.py.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from kokoa_infra.atomic_file import write_private
from kokoa_infra.lab import machines, servers, services
from kokoa_infra.lab.hosts import DEFAULT_INIT, INIT_SYSTEMS, PREFIX, RESERVED, Host, LabTopology
from kokoa_infra.lab.processes import LabError, alive, kill, namespaces, netns_pids, reap, recorded_pid, run

LAB_DIR = Path("/var/lib/kokoa-lab")

Echo = Callable[[str], None]


TOOLS = ("ip", "nsenter", "unshare", "setsid", "ss", "curl", "openssl", "ssh", "ssh-keygen", "sshd",
         "pebble", "pebble-challtestsrv", "wg", "wg-quick", "wireguard-go", "nginx", "certbot")


def lab_unavailable(probe: str = "kokoa-probe", init: str = DEFAULT_INIT) -> str | None:
    """Why the lab cannot run on this machine, or None: root, the tools, and the namespaces it needs."""
    if os.geteuid() != 0:
        return "the lab needs root (network, mount and pid namespaces)"
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    tools = TOOLS + ((machines.NSPAWN, "mount", "umount") if init == "systemd" else ())
    missing = [t for t in tools if shutil.which(t, path=path) is None]
    if missing:
        return f"the lab needs {', '.join(missing)} (`make setup` installs them)"
    run(["ip", "netns", "del", probe], check=False)  # left by an interrupted probe
    made = run(["ip", "netns", "add", probe], check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    try:
        nested = run(["ip", "netns", "exec", probe, "unshare", "--mount", "--uts", "--pid", "--fork",
                      "--mount-proc", "true"], check=False)
        if nested.returncode != 0:
            return f"cannot create mount and pid namespaces here: {nested.stderr.strip()}"
    finally:
        run(["ip", "netns", "del", probe], check=False)
    return None


class Lab:
    """The lab's hosts on this machine, and the record (`lab.json`) of everything it made."""

    def __init__(self, directory: Path = LAB_DIR, prefix: str = PREFIX, init: str = DEFAULT_INIT) -> None:
        if init not in INIT_SYSTEMS:
            raise LabError(f"init {init!r}: one of {', '.join(INIT_SYSTEMS)}")
        self.init = init  # how `ensure` makes new servers; existing hosts keep what their record says
        self.dir = Path(directory)
        if not self.dir.is_absolute() or len(self.dir.parts) < 3:
            raise LabError(f"lab directory {self.dir} must be an absolute path at least two levels deep")
        if any(self.dir == Path(d) or Path(d) in self.dir.parents for d in servers.PRIVATE_DIRS):
            # Servers see their own copy of these, so sshd would not find its keys there.
            raise LabError(f"lab directory {self.dir} must not be under {', '.join(servers.PRIVATE_DIRS)}")
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

    def server_pid(self, netns: str) -> int | None:
        """Root-namespace pid of the server's init: the machine's systemd, or sshd on a plain host."""
        return self.record()["hosts"].get(netns, {}).get("init")

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

    # --- health -----------------------------------------------------------------------
    def infra_namespaces(self) -> list[str]:
        return [f"{self.prefix}{name}" for name in RESERVED if name != "probe"]

    def problems(self, topo: LabTopology | None = None) -> list[str]:
        """Why the existing lab cannot be reused as it is ([] when healthy or when there is none)."""
        rec = self.record()
        present = namespaces()
        if not self.record_file.exists():
            # Only names this lab would make: other tools' namespaces may share the prefix.
            names = self.infra_namespaces() + ([h.netns for h in topo.hosts] if topo else [])
            stray = sorted(ns for ns in present if ns in names)
            return [f"namespaces left from an earlier lab: {', '.join(stray)}"] if stray else []
        found = [f"namespace {ns} is gone" for ns in rec["namespaces"] if ns not in present]
        for path in (self.seed_file, self.operator_key):
            if not path.exists():
                found.append(f"{path} is missing")
        for netns, host in rec["hosts"].items():
            if not host.get("ready"):
                found.append(f"{netns} was not finished")
            elif host["role"] in ("origin", "edge") and topo is not None and host.get("mode", "plain") != self.init:
                found.append(f"{netns} runs {host.get('mode', 'plain')}, not {self.init}")
            elif host["role"] in ("origin", "edge") and not servers.server_up(netns, host):
                found.append(f"{'machine' if host.get('mode') == 'systemd' else 'sshd'} on {netns} is not running")
            elif host["role"] == "origin" and not services.demo_answers(self, Host(**host["host"])):
                found.append(f"the demo application on {netns} does not answer")
            elif host["role"] == "acme" and not (self.ca_bundle.exists() and all(
                    alive(rec["processes"].get(p)) for p in ("pebble", "challtestsrv"))):
                found.append("pebble is not running")
        if topo is not None:
            for h in topo.hosts:
                known = rec["hosts"].get(h.netns)
                if known and Host(**known["host"]) != h:
                    found.append(f"{h.netns} changed (address, role or origin)")
        return found

    def liveness(self) -> dict[str, dict[str, Any]]:
        """Per recorded host: role, name, address, namespace present, sshd listening (servers only)."""
        present = namespaces()
        result = {}
        for netns, host in self.record()["hosts"].items():
            up = netns in present
            result[netns] = {"role": host["role"], "name": host["host"]["name"], "ip": host["host"]["ip"],
                             "netns": up}
            if host["role"] in ("origin", "edge"):
                result[netns]["sshd"] = up and servers.server_up(netns, host)
                result[netns]["init"] = host.get("mode", "plain")
        return result

    # --- bring-up ---------------------------------------------------------------------
    def ensure(self, topo: LabTopology, echo: Echo = print) -> None:
        """Make every host of `topo` exist and run; a broken lab is torn down and rebuilt whole."""
        broken = self.problems(topo)
        if broken:
            echo("rebuilding the lab: " + "; ".join(broken))
            self.down(echo, also=[h.netns for h in topo.hosts])
        self._prepare()
        bridge = f"{self.prefix}net"
        self._add_netns(bridge)
        if run(["ip", "-n", bridge, "link", "show", "br0"], check=False).returncode != 0:
            run(["ip", "-n", bridge, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", bridge, "link", "set", "br0", "up"])
        known = self.record()["hosts"]
        new = [host for host in topo.hosts if host.netns not in known]
        for host in new:
            mode = self.init if host.is_server else "plain"
            echo(f"  host    {host.netns}  {host.ip}  ({host.role}, {mode})")
            with self.recording() as rec:
                rec["hosts"][host.netns] = {"role": host.role, "host": asdict(host), "mode": mode}
            self._add_netns(host.netns)
            self._link(topo, host)
            if host.is_server:
                servers.start_server(self, host)  # machines boot in parallel; awaited below
        for host in new:
            if host.is_server:
                servers.await_server(self, host.netns)
            if host.role == "origin":
                services.start_demo(self, host)
            if host.role == "acme":
                services.start_acme(self, host)
            with self.recording() as rec:
                rec["hosts"][host.netns]["ready"] = True

    def _prepare(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        if not self.record_file.exists():
            with self.recording():
                pass
        if not self.seed_file.exists():
            # Stands in for Pulumi state: keeps the mocked WireGuard keys stable across `up`s.
            fd = os.open(self.seed_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(secrets.token_bytes(32))
        if not self.operator_key.exists():
            self.operator_key.parent.mkdir(mode=0o700, exist_ok=True)
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "kokoa-lab-operator",
                 "-f", str(self.operator_key)])

    def _add_netns(self, netns: str) -> None:
        with self.recording() as rec:
            if netns not in rec["namespaces"]:
                rec["namespaces"].append(netns)
        if netns not in namespaces():
            run(["ip", "netns", "add", netns])
        run(["ip", "-n", netns, "link", "set", "lo", "up"])

    def _link(self, topo: LabTopology, host: Host) -> None:
        bridge = f"{self.prefix}net"
        port = f"h{int(ipaddress.ip_address(host.ip)) - int(topo.network.network_address)}"
        # The MAC follows the address, so a re-created host is reachable at once through
        # neighbours' cached ARP entries (a real replacement would announce itself instead).
        mac = "02:6b:" + ":".join(f"{b:02x}" for b in ipaddress.ip_address(host.ip).packed)
        # Both ends are made inside lab namespaces: nothing ever appears in the root namespace.
        run(["ip", "-n", bridge, "link", "add", port, "type", "veth", "peer", "name", "eth0",
             "address", mac, "netns", host.netns])
        run(["ip", "-n", bridge, "link", "set", port, "master", "br0", "up"])
        run(["ip", "-n", host.netns, "addr", "add", f"{host.ip}/{topo.network.prefixlen}", "dev", "eth0"])
        run(["ip", "-n", host.netns, "link", "set", "eth0", "up"])

    def add_visitor(self, topo: LabTopology, name: str, ip: str, names: Mapping[str, str] = {}) -> Host:
        """A bare namespace on the lab network (a benchmark's attacker, a test's outsider).

        Recorded, so `down` removes it; `names` (name → address) become its /etc/hosts.
        """
        host = Host(name, "visitor", ip, f"{self.prefix}{name}")
        self._add_netns(host.netns)
        self._link(topo, host)
        if names:
            etc = Path("/etc/netns") / host.netns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text("127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in names.items()))
        return host

    def remove_visitor(self, host: Host) -> None:
        self._remove_netns(host.netns)
        with self.recording() as rec:
            if host.netns in rec["namespaces"]:
                rec["namespaces"].remove(host.netns)

    def demo_requests(self, netns: str) -> int:
        """Requests the origin's demo application has answered since it started."""
        return services.demo_requests(self, netns)

    def set_dns(self, topo: LabTopology, records: Mapping[str, list[str]]) -> None:
        """Make the lab's DNS answer every name of `records` (the dnsRecords output) with exactly its addresses."""
        services.set_dns(self, topo, records)

    # --- tear-down ---------------------------------------------------------------------
    def prune(self, topo: LabTopology, echo: Echo = print) -> None:
        """Remove servers that are no longer in `topo` (after their delete commands have run)."""
        wanted = {h.netns for h in topo.hosts}
        for netns, host in self.record()["hosts"].items():
            if netns in wanted:
                continue
            echo(f"  remove  {netns}  ({host['role']})")
            self._remove_netns(netns, host)
            if machines.mounted_under(self.host_dir(netns)):
                raise LabError(f"cannot unmount {machines.root(self.host_dir(netns))}; `kokoa lab down` and up again")
            shutil.rmtree(self.host_dir(netns), ignore_errors=True)
            with self.recording() as rec:
                del rec["hosts"][netns]
                rec["namespaces"].remove(netns)
        self._reap_children()

    def _reap_children(self) -> None:
        for child in self._children:
            child.poll()
        self._children = [c for c in self._children if c.returncode is None]

    def _remove_netns(self, netns: str, host: Mapping[str, Any] | None = None) -> None:
        host = host or {}
        init = host.get("init")
        if host.get("mode") == "systemd":
            # Powered off, as `systemctl poweroff` would: units stop, then systemd exits.
            machines.halt(recorded_pid(host, "init"), recorded_pid(host, "launcher"), alive, reap)
            machines.kill_cgroup_processes(netns, alive)
        elif init and alive(init):
            # SIGKILL to a pid namespace's init ends every process in it; other signals it may ignore.
            os.kill(init, signal.SIGKILL)
        kill(netns_pids(netns))
        if host.get("root"):
            machines.unmount_root(Path(host["root"]).parent)
            machines.remove_runtime_dirs(netns)
            machines.remove_cgroups(netns)
        if netns in namespaces():
            run(["ip", "netns", "del", netns])
        shutil.rmtree(Path("/etc/netns") / netns, ignore_errors=True)

    def power_off(self, netns: str) -> None:
        """Power a systemd machine off (its units stop, its processes end); its directory stays."""
        entry = self.record()["hosts"].get(netns, {})
        if entry.get("mode") != "systemd":
            raise LabError(f"{netns} is not a systemd machine")
        machines.halt(recorded_pid(entry, "init"), recorded_pid(entry, "launcher"), alive, reap)
        machines.kill_cgroup_processes(netns, alive)
        left = machines.unmount_root(self.host_dir(netns))
        machines.remove_runtime_dirs(netns)
        machines.remove_cgroups(netns)
        if left:
            raise LabError(f"machine {netns}: still mounted after power-off: {', '.join(left)}")

    def boot(self, netns: str) -> None:
        """Boot a powered-off systemd machine again from its directory; nothing is deployed."""
        entry = self.record()["hosts"].get(netns, {})
        if entry.get("mode") != "systemd":
            raise LabError(f"{netns} is not a systemd machine")
        if recorded_pid(entry, "init") or recorded_pid(entry, "launcher"):
            raise LabError(f"machine {netns} is running; power it off first")
        try:
            machines.mount_root(self.host_dir(netns))
        except machines.MachineError as exc:
            raise LabError(f"machine {netns}: {exc}") from exc
        servers.boot(self, netns)
        servers.await_server(self, netns)

    def down(self, echo: Echo = print, also: Iterable[str] = ()) -> list[str]:
        """Kill every lab process, delete every lab namespace, /etc/netns dir and the lab directory.

        Namespaces: those recorded, the fixed infrastructure names and `also`, never a mere
        prefix match. Returns what is still there afterwards (expected: nothing).
        """
        rec = self.record()
        present = namespaces()
        ours = [ns for ns in dict.fromkeys([*rec["namespaces"], *self.infra_namespaces(), *also]) if ns in present]
        pids = {p for p in rec["processes"].values() if alive(p)}
        pids |= {h["init"] for h in rec["hosts"].values() if h.get("mode") != "systemd" and alive(h.get("init"))}
        pids |= {p for h in rec["hosts"].values() for p in (recorded_pid(h, "init"), recorded_pid(h, "launcher")) if p}
        pids |= {p for ns in ours for p in netns_pids(ns)}
        kill(sorted(p for p in rec["processes"].values() if alive(p)))
        for netns in ours:
            echo(f"  remove  {netns}")
            self._remove_netns(netns, rec["hosts"].get(netns))
        for netns, host in rec["hosts"].items():
            if host.get("root") and netns not in ours:
                # Its namespace is gone, but its machine or overlay may not be.
                self._remove_netns(netns, host)
        for netns in rec["namespaces"]:
            shutil.rmtree(Path("/etc/netns") / netns, ignore_errors=True)
        self._reap_children()
        servers.remove_created_dirs()
        mounted = machines.mounted_under(self.dir)
        if not mounted:
            # Never while an overlay of / is mounted in it: rmtree would walk the whole machine.
            shutil.rmtree(self.dir, ignore_errors=True)
        left = [f"process {p}" for p in sorted(pids) if alive(p)]
        left += [f"mount {m}" for m in mounted]
        left += [f"cgroup {c}" for ns, h in rec["hosts"].items() if h.get("mode") == "systemd"
                 for c in machines.cgroups(ns) if c.exists()]
        left += [f"namespace {ns}" for ns in ours if ns in namespaces()]
        left += [f"directory /etc/netns/{ns}" for ns in ours if (Path("/etc/netns") / ns).exists()]
        return left + self.leftovers()

    def leftovers(self) -> list[str]:
        """Processes started from the lab directory, mounts under it in any mount namespace
        (machines' overlays), and the directory itself, if still there."""
        found = [f"mount {m}" for m in machines.foreign_mounts(self.dir)]
        marker = f"{self.dir}/".encode()
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes() and alive(int(proc.name)):
                    found.append(f"process {proc.name}")
            except OSError:
                continue
        if self.dir.exists():
            found.append(f"lab directory {self.dir}")
        return found
