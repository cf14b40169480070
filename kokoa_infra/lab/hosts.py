"""Lab hosts: network namespaces on one bridge; servers are systemd machines (or plain namespace hosts with sshd as init)."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping
from urllib.parse import urlsplit

from kokoa_infra.atomic_file import write_private
from kokoa_infra.lab import machines

LAB_DIR = Path("/var/lib/kokoa-lab")
PREFIX = "kokoa-"
DEFAULT_NETWORK = "172.31.255.0/24"
RESERVED = ("net", "client", "acme", "probe")  # names of the lab's own namespaces
# How servers (origins and edges) run: `systemd` boots each as a systemd machine
# (machines.py), as real servers run; `plain` starts sshd as the init of its own namespaces.
INIT_SYSTEMS = ("systemd", "plain")
DEFAULT_INIT = "systemd"
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

# The demo application: a static nginx, so that the lab and `make bench` measure Kokoa's
# path and not a slow application. Its request counter (stub_status) is on a unix socket
# only the host can reach: what reaches the origin, counted without a log.
DEMO_STATUS_SOCKET = "/run/kokoa-demo-status.sock"
DEMO_NGINX = """\
worker_processes 1;
pid /run/kokoa-demo.pid;
error_log /var/log/kokoa-demo-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    server_tokens off;
    keepalive_requests 100000;
    server {{
        listen {listen};
        default_type text/plain;
        location / {{ return 200 "{body}"; }}
    }}
    server {{
        listen unix:{status};
        location / {{ stub_status; }}
    }}
}}
"""
# On a systemd machine the demo application is a unit of the origin, enabled, so it comes
# back when the machine boots again.
DEMO_CONF = "/etc/kokoa-lab/demo-nginx.conf"
DEMO_UNIT = """\
[Unit]
Description=Kokoa lab demo application (a static nginx on {listen})
After=network.target

[Service]
Type=forking
PIDFile=/run/kokoa-demo.pid
ExecStart=/usr/sbin/nginx -c {conf}
ExecReload=/usr/sbin/nginx -c {conf} -s reload
ExecStop=/usr/sbin/nginx -c {conf} -s quit

[Install]
WantedBy=multi-user.target
"""

Echo = Callable[[str], None]


class LabError(Exception):
    """The lab cannot be built or used; the message says what and where."""


@dataclass(frozen=True)
class Host:
    """One machine of the lab: a network namespace at one address on the lab's internet."""

    name: str
    role: str  # origin, edge, client, acme
    ip: str
    netns: str
    origin: str = ""  # edges: the origin they serve
    domain: str = ""
    upstream: str = ""  # origins: where the demo application listens

    @property
    def is_server(self) -> bool:
        return self.role in ("origin", "edge")


@dataclass(frozen=True)
class Topology:
    """Every host of the lab, read from a lab stack config."""

    network: ipaddress.IPv4Network
    hosts: tuple[Host, ...]

    def of_role(self, role: str) -> list[Host]:
        return [h for h in self.hosts if h.role == role]

    def one(self, role: str) -> Host | None:
        found = self.of_role(role)
        return found[0] if found else None

    def server(self, role: str, name: str) -> Host:
        return next(h for h in self.hosts if h.role == role and h.name == name)


def topology(config: Mapping[str, Any], prefix: str = PREFIX) -> Topology:
    """The hosts a lab stack config describes: client, ACME host (from `kokoa:acmeServer`), origins, edges."""
    problems: list[str] = []
    network = ipaddress.ip_network(config.get("lab:network", DEFAULT_NETWORK))
    origins = {o["name"]: o for o in config.get("kokoa:origins", [])}
    hosts = [Host("client", "client", str(config.get("lab:clientIp", "")), f"{prefix}client")]
    acme = urlsplit(str(config.get("kokoa:acmeServer", ""))).hostname
    if acme:
        hosts.append(Host("acme", "acme", acme, f"{prefix}acme"))
    for o in origins.values():
        if o.get("endpoint", o.get("host")) != o.get("host"):
            problems.append(f"origin {o['name']}: a lab origin has one address; drop endpoint or make it equal to host")
        hosts.append(Host(o["name"], "origin", str(o.get("host", "")), f"{prefix}{o['name']}",
                          domain=o.get("domain", ""), upstream=o.get("upstream", "")))
    for e in config.get("kokoa:edges", []):
        if e.get("host", e.get("publicIp")) != e.get("publicIp"):
            problems.append(f"edge {e['name']}: a lab edge has one address; drop host or make it equal to publicIp")
        domain = origins.get(e.get("origin"), {}).get("domain", "")
        hosts.append(Host(e["name"], "edge", str(e.get("publicIp", "")), f"{prefix}{e['name']}",
                          origin=e.get("origin", ""), domain=domain))
    seen_ip: dict[str, str] = {}
    seen_ns: set[str] = set()
    for h in hosts:
        label = f"{h.role} {h.name}" if h.is_server else h.role
        try:
            ip = ipaddress.ip_address(h.ip)
        except ValueError:
            problems.append(f"{label}: address {h.ip!r} is not an IP address"
                            + (" (set lab:clientIp)" if h.role == "client" else ""))
            continue
        if ip not in network or ip in (network.network_address, network.broadcast_address):
            problems.append(f"{label}: {ip} is not a host address of the lab network {network}")
        if h.ip in seen_ip:
            problems.append(f"{label}: {ip} is already used by {seen_ip[h.ip]}")
        seen_ip[h.ip] = label
        if h.netns in seen_ns or (h.is_server and h.name in RESERVED):
            problems.append(f"{label}: namespace {h.netns} is taken; lab host names must differ across roles "
                            f"and from {', '.join(RESERVED)}")
        seen_ns.add(h.netns)
    if problems:
        raise LabError("invalid lab topology:\n  " + "\n  ".join(problems))
    return Topology(network, tuple(hosts))


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


def _machine_pid(host: Mapping[str, Any], key: str) -> int | None:
    """The machine's recorded init or launcher, if that very process still runs (not a reused pid)."""
    pid = host.get(key)
    return pid if pid and alive(pid) and started(pid) == host.get(f"{key}_start") else None


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not ours: PID 1 owns it


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


def _mounted_anywhere(path: str) -> bool:
    """Whether any mount namespace on the machine uses `path` as a mount point."""
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
        if any(line.split()[4] == path for line in lines):
            return True
    return False


def _remove_created_dirs() -> None:
    """Remove the directories labs created, unless another lab still has files or mounts in them."""
    if not CREATED_DIRS.exists():
        return
    kept = []
    for path in reversed(list(dict.fromkeys(CREATED_DIRS.read_text().split()))):
        if os.path.isdir(path) and (os.listdir(path) or _mounted_anywhere(path)):
            kept.insert(0, path)
        elif os.path.isdir(path):
            os.rmdir(path)
    if kept:
        CREATED_DIRS.write_text("".join(f"{p}\n" for p in kept))
    else:
        CREATED_DIRS.unlink()


class Lab:
    """The lab's hosts on this machine, and the record (`lab.json`) of everything it made."""

    def __init__(self, directory: Path = LAB_DIR, prefix: str = PREFIX, init: str = DEFAULT_INIT) -> None:
        if init not in INIT_SYSTEMS:
            raise LabError(f"init {init!r}: one of {', '.join(INIT_SYSTEMS)}")
        self.init = init  # how `ensure` makes new servers; existing hosts keep what their record says
        self.dir = Path(directory)
        if not self.dir.is_absolute() or len(self.dir.parts) < 3:
            raise LabError(f"lab directory {self.dir} must be an absolute path at least two levels deep")
        if any(self.dir == Path(d) or Path(d) in self.dir.parents for d in PRIVATE_DIRS):
            # Servers see their own copy of these, so sshd would not find its keys there.
            raise LabError(f"lab directory {self.dir} must not be under {', '.join(PRIVATE_DIRS)}")
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
    def _recording(self) -> Iterator[dict[str, Any]]:
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
            if not _machine_pid(entry, "init"):
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

    def _listening(self, netns: str, port: int) -> bool:
        proc = run(["ip", "netns", "exec", netns, "ss", "-Hltn", f"sport = :{port}"], check=False)
        return proc.returncode == 0 and bool(proc.stdout.strip())

    def _spawn(self, argv: list[str], log: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen:
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

    def problems(self, topo: Topology | None = None) -> list[str]:
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
            elif host["role"] in ("origin", "edge") and not self._server_up(netns, host):
                found.append(f"{'machine' if host.get('mode') == 'systemd' else 'sshd'} on {netns} is not running")
            elif host["role"] == "origin" and not self._demo_answers(Host(**host["host"])):
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
                result[netns]["sshd"] = up and self._server_up(netns, host)
                result[netns]["init"] = host.get("mode", "plain")
        return result

    def _server_up(self, netns: str, host: Mapping[str, Any]) -> bool:
        """The server's init (the machine's systemd, or sshd) runs and its sshd accepts connections."""
        init = _machine_pid(host, "init") if host.get("mode") == "systemd" else host.get("init")
        return bool(init) and alive(init) and in_netns(init, netns) and self._listening(netns, 22)

    # --- bring-up ---------------------------------------------------------------------
    def ensure(self, topo: Topology, echo: Echo = print) -> None:
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
            with self._recording() as rec:
                rec["hosts"][host.netns] = {"role": host.role, "host": asdict(host), "mode": mode}
            self._add_netns(host.netns)
            self._link(topo, host)
            if host.is_server:
                self._start_server(host)  # machines boot in parallel; awaited below
        for host in new:
            if host.is_server:
                self._await_server(host.netns)
            if host.role == "origin":
                self._start_demo(host)
            if host.role == "acme":
                self._start_acme(host)
            with self._recording() as rec:
                rec["hosts"][host.netns]["ready"] = True

    def _prepare(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        if not self.record_file.exists():
            with self._recording():
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
        with self._recording() as rec:
            if netns not in rec["namespaces"]:
                rec["namespaces"].append(netns)
        if netns not in namespaces():
            run(["ip", "netns", "add", netns])
        run(["ip", "-n", netns, "link", "set", "lo", "up"])

    def _link(self, topo: Topology, host: Host) -> None:
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

    def add_visitor(self, topo: Topology, name: str, ip: str, names: Mapping[str, str] = {}) -> Host:
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
        with self._recording() as rec:
            if host.netns in rec["namespaces"]:
                rec["namespaces"].remove(host.netns)

    def _machine_dir(self, path: str) -> None:
        """Bind targets (and /etc/netns) must exist on the machine; remember the ones the lab created."""
        if not os.path.isdir(path):
            with open(CREATED_DIRS, "a") as created:
                created.write(f"{path}\n")
            os.makedirs(path, exist_ok=True)

    def _start_server(self, host: Host) -> None:
        """sshd up on a plain host; on a systemd machine, the boot started (`_await_server` waits)."""
        hdir = self.host_dir(host.netns)
        hdir.mkdir(parents=True, exist_ok=True)
        key = hdir / "ssh_host_ed25519_key"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", host.netns, "-f", str(key)])
        if self.init_system(host.netns) == "systemd":
            self._start_machine(host)
        else:
            self._start_plain(host)

    def _start_machine(self, host: Host) -> None:
        hdir = self.host_dir(host.netns)
        for path in NSPAWN_RUN_DIRS:
            self._machine_dir(path)
        machines.raise_inotify_limit()
        with self._recording() as rec:
            # Recorded before it is mounted, so `down` unmounts it after a crash.
            rec["hosts"][host.netns]["root"] = str(machines.root(hdir))
        try:
            merged = machines.mount_root(hdir)
            machines.provision(merged, host.name, hdir / "ssh_host_ed25519_key",
                               Path(f"{self.operator_key}.pub").read_text())
        except (machines.MachineError, OSError) as exc:
            raise LabError(f"machine {host.netns}: {exc}") from exc
        self._boot(host.netns)

    def _boot(self, netns: str) -> None:
        host = Host(**self.record()["hosts"][netns]["host"])
        hdir = self.host_dir(netns)
        launcher = self._spawn(machines.boot_argv(netns, host.name, machines.root(hdir)), hdir / "console.log")
        with self._recording() as rec:
            rec["hosts"][netns].update(launcher=launcher.pid, launcher_start=started(launcher.pid), init=None)

    def _await_server(self, netns: str) -> None:
        """The machine booted (every unit started: `running`, not `degraded`) and its sshd listens."""
        entry = self.record()["hosts"][netns]
        if entry.get("mode") != "systemd":
            return
        launcher = entry["launcher"]
        try:
            init = machines.wait_booted(lambda: launcher if alive(launcher) else None, alive, f"machine {netns}")
        except machines.MachineError as exc:
            raise LabError(f"{exc}; console: {self.host_dir(netns) / 'console.log'}") from exc
        with self._recording() as rec:
            rec["hosts"][netns].update(init=init, init_start=started(init))
        failed = machines.failed_units(init)
        if failed:
            raise LabError(f"machine {netns} booted with failed units: {', '.join(failed)} "
                           f"(`{shlex.join(self.host_argv(netns, ['systemctl', 'status', failed[0]]))}`)")
        wait_until(f"sshd on {netns}", lambda: self._listening(netns, 22))

    def _start_plain(self, host: Host) -> None:
        hdir = self.host_dir(host.netns)
        root = hdir / "root"
        for path in PRIVATE_DIRS:
            (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
            self._machine_dir(path)
        for path, mode in SKELETON.items():
            (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
            os.chmod(root / path.lstrip("/"), mode)
        self._machine_dir("/etc/netns")
        etc = Path("/etc/netns") / host.netns
        shutil.rmtree(etc, ignore_errors=True)
        etc.mkdir(parents=True)
        for name in PRIVATE_ETC:
            self._machine_dir(f"/etc/{name}")
        shutil.copytree("/etc/nginx", etc / "nginx", symlinks=True)
        (etc / "nginx" / "sites-enabled" / "default").unlink(missing_ok=True)
        (etc / "wireguard").mkdir(mode=0o700)
        (etc / "letsencrypt").mkdir()
        if Path("/etc/letsencrypt/cli.ini").exists():
            shutil.copy2("/etc/letsencrypt/cli.ini", etc / "letsencrypt" / "cli.ini")
        (etc / "kokoa").mkdir()

        key = hdir / "ssh_host_ed25519_key"
        authorized = hdir / "authorized_keys"
        authorized.write_text(Path(f"{self.operator_key}.pub").read_text())
        config = hdir / "sshd_config"
        config.write_text("\n".join([
            "Port 22", "ListenAddress 0.0.0.0", f"HostKey {key}", "PidFile /run/sshd.pid",
            f"AuthorizedKeysFile {authorized}", "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            # PAM's session modules expect a systemd host; key-only root login needs none of it.
            "UsePAM no", "AcceptEnv KOKOA_*", "PrintMotd no",
            "Subsystem sftp /usr/lib/openssh/sftp-server", ""]))
        binds = "".join(f"mount --bind {shlex.quote(str(root / p.lstrip('/')))} {p}; " for p in PRIVATE_DIRS)
        script = (f"set -e; {binds}hostname {shlex.quote(host.name)}; "
                  f"exec /usr/sbin/sshd -D -f {shlex.quote(str(config))} -E /var/log/sshd.log")
        # Own mount, UTS and pid namespaces: install scripts see this host's /run and /var, and
        # `pidof nginx` or `pkill` on one server cannot see another's. sshd is the pid
        # namespace's init, so it reaps daemons and killing it takes everything on the host down.
        launcher = self._spawn(["ip", "netns", "exec", host.netns, "unshare", "--mount", "--uts", "--pid",
                                "--fork", "--kill-child", "--mount-proc", "--propagation", "private",
                                "sh", "-c", script], hdir / "launcher.log")
        children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children")
        wait_until(f"pid namespace of {host.netns}",
                   lambda: launcher.poll() is None and children.exists() and children.read_text().strip() != "")
        init = int(children.read_text().split()[0])
        with self._recording() as rec:
            rec["hosts"][host.netns].update(launcher=launcher.pid, init=init)
        wait_until(f"sshd on {host.netns}", lambda: launcher.poll() is None and self._listening(host.netns, 22))

    def _demo_answers(self, host: Host) -> bool:
        up = urlsplit(host.upstream)
        proc = self.on_host(host.netns, ["curl", "-fsS", "-m", "2", "-o", "/dev/null",
                                         f"http://{up.hostname}:{up.port or 80}/"])
        return proc.returncode == 0

    def _start_demo(self, host: Host) -> None:
        up = urlsplit(host.upstream)
        if up.scheme != "http" or not up.hostname:
            raise LabError(f"origin {host.name}: the lab's demo application needs an http:// upstream, "
                           f"not {host.upstream!r}")
        listen = f"{up.hostname}:{up.port or 80}"
        text = DEMO_NGINX.format(listen=listen, body=f"hello from origin {host.name}\\n", status=DEMO_STATUS_SOCKET)
        if self.init_system(host.netns) == "systemd":
            # A unit of the machine, enabled: it starts again when the origin boots again.
            merged = machines.root(self.host_dir(host.netns))
            machines.write_file(merged, DEMO_CONF, text)
            machines.write_file(merged, "/etc/systemd/system/kokoa-demo.service",
                                DEMO_UNIT.format(listen=listen, conf=DEMO_CONF))
            self.on_host(host.netns, ["systemctl", "daemon-reload"], check=True)
            self.on_host(host.netns, ["systemctl", "enable", "--now", "--quiet", "kokoa-demo.service"], check=True)
        else:
            conf = self.host_dir(host.netns) / "demo-nginx.conf"
            conf.write_text(text)
            self.on_host(host.netns, ["nginx", "-c", str(conf)], check=True, stdin=subprocess.DEVNULL)
        wait_until(f"demo application on {host.netns}", lambda: self._demo_answers(host))

    def demo_requests(self, netns: str) -> int:
        """Requests the origin's demo application has answered since it started."""
        proc = self.on_host(netns, ["curl", "-fsS", "-m", "2", "--unix-socket", DEMO_STATUS_SOCKET,
                                    "http://demo/"], check=True)
        # "Active connections: 1\nserver accepts handled requests\n 5 5 7\n..."
        return int(proc.stdout.splitlines()[2].split()[2])

    def _start_acme(self, host: Host) -> None:
        self.acme_dir.mkdir(mode=0o700, exist_ok=True)
        key = self.acme_dir / "key.pem"
        run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-days", "365", "-subj", "/CN=kokoa lab ACME server",
             "-addext", f"subjectAltName=IP:{host.ip}", "-keyout", str(key), "-out", str(self.acme_cert)])
        config = self.acme_dir / "pebble-config.json"
        config.write_text(json.dumps({"pebble": {
            "listenAddress": "0.0.0.0:14000", "managementListenAddress": "0.0.0.0:15000",
            "certificate": str(self.acme_cert), "privateKey": str(key),
            # HTTP-01 validation goes to port 80 of the addresses DNS gives: the edges.
            "httpPort": 80, "tlsPort": 443, "ocspResponderURL": "", "externalAccountBindingRequired": False,
        }}, indent=1))
        ns = ["ip", "netns", "exec", host.netns]
        # Names with no A record resolve to the ACME host itself, where nothing answers on port 80.
        dns = self._spawn([*ns, "pebble-challtestsrv", "-dns01", "127.0.0.1:8053", "-http01", "",
                           "-https01", "", "-tlsalpn01", "", "-management", "127.0.0.1:8055",
                           "-defaultIPv4", host.ip, "-defaultIPv6", ""], self.acme_dir / "challtestsrv.log")
        with self._recording() as rec:
            rec["processes"]["challtestsrv"] = dns.pid
        # No validation sleep and no deliberately rejected nonces: deterministic and fast.
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}
        pebble = self._spawn([*ns, "pebble", "-config", str(config), "-dnsserver", "127.0.0.1:8053"],
                             self.acme_dir / "pebble.log", env=env)
        with self._recording() as rec:
            rec["processes"]["pebble"] = pebble.pid
        curl = [*ns, "curl", "-fsS", "-m", "2", "--cacert", str(self.acme_cert)]
        wait_until("pebble", lambda: pebble.poll() is None
                   and run([*curl, "-o", "/dev/null", f"https://{host.ip}:14000/dir"], check=False).returncode == 0)
        wait_until("pebble-challtestsrv", lambda: self._listening(host.netns, 8055))
        # The issuing root is new on every pebble start: this is what verifies lab certificates.
        run([*curl, "-o", str(self.ca_bundle), f"https://{host.ip}:15000/roots/0"])

    def set_dns(self, topo: Topology, records: Mapping[str, list[str]]) -> None:
        """Make the lab's DNS (pebble-challtestsrv) answer each origin domain with exactly `records`."""
        acme = topo.one("acme")
        if acme is None:
            return
        wanted = {o.domain: sorted(records.get(o.domain, [])) for o in topo.of_role("origin")}
        if self.record().get("dns") == wanted:
            return
        for domain, addresses in wanted.items():
            self._challtestsrv(acme, "clear-a", {"host": f"{domain}."})
            if addresses:
                self._challtestsrv(acme, "add-a", {"host": f"{domain}.", "addresses": addresses})
        with self._recording() as rec:
            rec["dns"] = wanted

    def _challtestsrv(self, acme: Host, action: str, body: dict) -> None:
        run(["ip", "netns", "exec", acme.netns, "curl", "-fsS", "-m", "5", "-X", "POST",
             "-d", json.dumps(body), f"http://127.0.0.1:8055/{action}"])

    # --- tear-down ---------------------------------------------------------------------
    def prune(self, topo: Topology, echo: Echo = print) -> None:
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
            with self._recording() as rec:
                del rec["hosts"][netns]
                rec["namespaces"].remove(netns)
        self._reap_children()

    def _reap_children(self) -> None:
        for child in self._children:
            child.poll()
        self._children = [c for c in self._children if c.returncode is None]

    def _kill(self, pids: list[int], grace: float = 3.0) -> None:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                for pid in pids:
                    _reap(pid)
                if not any(alive(p) for p in pids):
                    return
                time.sleep(0.05)

    def _remove_netns(self, netns: str, host: Mapping[str, Any] | None = None) -> None:
        host = host or {}
        init = host.get("init")
        if host.get("mode") == "systemd":
            # Powered off, as `systemctl poweroff` would: units stop, then systemd exits.
            machines.halt(_machine_pid(host, "init"), _machine_pid(host, "launcher"), alive, _reap)
            machines.kill_cgroup_processes(netns, alive)
        elif init and alive(init):
            # SIGKILL to a pid namespace's init ends every process in it; other signals it may ignore.
            os.kill(init, signal.SIGKILL)
        self._kill(netns_pids(netns))
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
        machines.halt(_machine_pid(entry, "init"), _machine_pid(entry, "launcher"), alive, _reap)
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
        if _machine_pid(entry, "init") or _machine_pid(entry, "launcher"):
            raise LabError(f"machine {netns} is running; power it off first")
        try:
            machines.mount_root(self.host_dir(netns))
        except machines.MachineError as exc:
            raise LabError(f"machine {netns}: {exc}") from exc
        self._boot(netns)
        self._await_server(netns)

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
        pids |= {p for h in rec["hosts"].values() for p in (_machine_pid(h, "init"), _machine_pid(h, "launcher")) if p}
        pids |= {p for ns in ours for p in netns_pids(ns)}
        self._kill(sorted(p for p in rec["processes"].values() if alive(p)))
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
        _remove_created_dirs()
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
