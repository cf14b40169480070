"""The whole system on one machine, deployed by the program's own SSH commands, checked by real traffic.

All traffic runs between the lab's own namespaces (the client namespace is the internet).
That `kokoa lab down` leaves nothing behind is asserted by the `lab` fixture's teardown.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.support.lab_fixture import INIT


def curl(lab, *args: str, timeout: int = 10) -> subprocess.CompletedProcess:
    return lab.on_host(lab.status["client"], "curl", "-sS", "--max-time", str(timeout), *args, check=False)


def https_get(lab, edge: dict, domain: str, path: str = "/") -> subprocess.CompletedProcess:
    return curl(lab, "--cacert", lab.status["caBundle"], "--resolve", f"{domain}:443:{edge['publicIp']}",
                "-w", "\n%{http_code}", f"https://{domain}{path}")


def domain_of(lab, origin_name: str) -> str:
    return next(o["domain"] for o in lab.status["origins"] if o["name"] == origin_name)


def wait_for_certificates(lab, edges, deadline_s: float = 120) -> None:
    """Edges serve a placeholder until they fetch the origin's certificate (bounded wait)."""
    deadline = time.monotonic() + deadline_s
    pending = list(edges)
    while pending and time.monotonic() < deadline:
        pending = [e for e in pending if https_get(lab, e, domain_of(lab, e["origin"])).returncode != 0]
        if pending:
            time.sleep(2)
    assert not pending, f"no verified certificate on {[e['name'] for e in pending]}"


def test_every_edge_serves_its_origin_over_verified_https(lab):
    wait_for_certificates(lab, lab.status["edges"])
    for edge in lab.status["edges"]:
        result = https_get(lab, edge, domain_of(lab, edge["origin"]))
        assert result.returncode == 0, result.stderr
        body, code = result.stdout.rsplit("\n", 1)
        assert code == "200"
        assert f"origin {edge['origin']}" in body


def test_plain_http_redirects_to_https(lab):
    edge = lab.status["edges"][0]
    domain = domain_of(lab, edge["origin"])
    result = curl(lab, "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                  "--resolve", f"{domain}:80:{edge['publicIp']}", f"http://{domain}/some/page?x=1")
    assert result.stdout == f"301 https://{domain}/some/page?x=1"


def test_each_origin_sees_a_recent_handshake_from_each_of_its_edges(lab):
    outputs = json.loads(lab.outputs_file.read_text())
    for origin in lab.status["origins"]:
        shown = lab.on_host(origin["netns"], "wg", "show", "wg0", "latest-handshakes").stdout
        handshakes = dict(line.split("\t") for line in shown.strip().splitlines())
        for edge_name in outputs["origins"][origin["name"]]["edges"]:
            key = outputs["edges"][edge_name]["publicKey"]
            assert key in handshakes, f"{edge_name} is not a peer of {origin['name']}"
            assert int(handshakes[key]) > time.time() - 180, f"no recent handshake from {edge_name}"


def test_the_origin_application_is_not_reachable_from_the_client(lab):
    for origin in lab.status["origins"]:
        for url in (f"http://{origin['publicIp']}:8080/", f"http://{origin['publicIp']}/"):
            result = curl(lab, "-o", "/dev/null", url, timeout=3)
            assert result.returncode != 0, f"{url} answered the client"
    # Nor is the tunnel network: the client has no route into it.
    for origin in json.loads(lab.outputs_file.read_text())["origins"].values():
        result = curl(lab, "-o", "/dev/null", f"http://{origin['wireguardIp']}/", timeout=3)
        assert result.returncode != 0, f"{origin['wireguardIp']} answered the client"


class RequestLoop:
    """GETs through one edge until stopped (bounded by count and time); counts failures."""

    def __init__(self, lab, edge: dict, max_requests: int = 2000, max_seconds: float = 240) -> None:
        self.lab, self.edge = lab, edge
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.ok = self.failed = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        domain = domain_of(self.lab, self.edge["origin"])
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and self.ok + self.failed < self.max_requests \
                and time.monotonic() < deadline:
            result = https_get(self.lab, self.edge, domain)
            if result.returncode == 0 and result.stdout.endswith("\n200"):
                self.ok += 1
            else:
                self.failed += 1
                self.errors.append(result.stderr.strip() or result.stdout[-80:])
            time.sleep(0.05)

    def __enter__(self) -> "RequestLoop":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def test_reapplying_changes_nothing_and_drops_no_request(lab):
    wait_for_certificates(lab, lab.status["edges"])
    before = {o["name"]: lab.on_host(o["netns"], "wg", "show", "wg0", "public-key").stdout
              for o in lab.status["origins"]}
    with RequestLoop(lab, lab.status["edges"][0]) as loop:
        report = lab.apply()
        time.sleep(1)
    assert loop.failed == 0, loop.errors[:3]
    assert loop.ok > 5
    assert report.changed == [], f"a second apply re-ran {report.changed}"
    after = {o["name"]: lab.on_host(o["netns"], "wg", "show", "wg0", "public-key").stdout
             for o in lab.status["origins"]}
    assert after == before


def test_running_install_again_on_a_host_changes_nothing(lab):
    """install.sh is idempotent: a second run succeeds, rewrites no file and restarts nothing."""
    wait_for_certificates(lab, lab.status["edges"])
    edge = lab.status["edges"][0]
    origin = next(o for o in lab.status["origins"] if o["name"] == edge["origin"])
    snapshot = ("stat -c '%n %i %.9Y %a' /etc/nginx/nginx.conf /etc/wireguard/*.conf /etc/kokoa/bundle/*; "
                # On a systemd machine, the units and drop-ins install.sh writes, and when the
                # units it starts last started.
                "stat -c '%n %i %.9Y %a' /etc/systemd/system/kokoa-gateway.service "
                "/etc/systemd/system/kokoa-firewall.service "
                "/etc/systemd/system/kokoa-cert*.service /etc/systemd/system/kokoa-cert*.timer "
                "/etc/systemd/system/wg-quick@*.service.d/* 2>/dev/null; "
                "systemctl show -p Id,ActiveEnterTimestampMonotonic nginx kokoa-gateway 'wg-quick@*' "
                "'kokoa-cert*.timer' 2>/dev/null; "
                "cat /run/nginx.pid 2>/dev/null; cat /run/kokoa-gateway.pid 2>/dev/null; "
                "pgrep -x wireguard-go")
    hosts = (edge["netns"], origin["netns"])
    before = {ns: lab.on_host(ns, "sh", "-c", snapshot).stdout for ns in hosts}
    with RequestLoop(lab, edge) as loop:
        for ns in hosts:
            lab.on_host(ns, "bash", "/etc/kokoa/bundle/install.sh")
        time.sleep(1)
    assert loop.failed == 0, loop.errors[:3]
    assert {ns: lab.on_host(ns, "sh", "-c", snapshot).stdout for ns in hosts} == before

def test_adding_an_edge_reaches_it_without_failing_requests_on_the_others(lab):
    wait_for_certificates(lab, lab.status["edges"])
    spare = lab.spare_edge_host()
    origin = lab.status["origins"][0]["name"]
    existing = [e for e in lab.status["edges"] if e["origin"] == origin]
    with RequestLoop(lab, existing[0]) as loop:
        lab.add_edge(name="edge-added", origin=origin, host=spare)
        time.sleep(1)
    assert loop.failed == 0, loop.errors[:3]
    added = next(e for e in lab.status["edges"] if e["name"] == "edge-added")
    wait_for_certificates(lab, [added])
    result = https_get(lab, added, domain_of(lab, origin))
    assert result.stdout.endswith("\n200") and f"origin {origin}" in result.stdout


def test_a_bundle_whose_nginx_conf_fails_keeps_the_site_up(lab):
    """install.sh refuses an nginx.conf that fails `nginx -t` and keeps serving the previous one."""
    wait_for_certificates(lab, lab.status["edges"])
    edge = lab.status["edges"][-1]
    before = lab.on_host(edge["netns"], "cat", "/etc/nginx/nginx.conf").stdout
    deployed = lab.on_host(edge["netns"], "sh", "-c", "cat /etc/kokoa/bundle/*").stdout
    broken = ("set -e; rm -rf /tmp/kokoa-broken; cp -a /etc/kokoa/bundle /tmp/kokoa-broken; "
              "sed -i 's/server_tokens off;/server_tokens off; this_is_no_directive;/' "
              "/tmp/kokoa-broken/nginx.conf; bash /tmp/kokoa-broken/install.sh")
    try:
        result = lab.on_host(edge["netns"], "sh", "-c", broken, check=False)
        assert result.returncode != 0
        assert "does not pass 'nginx -t'; the previous configuration was kept" in result.stderr
        assert lab.on_host(edge["netns"], "cat", "/etc/nginx/nginx.conf").stdout == before
        # The failed bundle did not replace the deployed one either.
        assert lab.on_host(edge["netns"], "sh", "-c", "cat /etc/kokoa/bundle/*").stdout == deployed
        served = https_get(lab, edge, domain_of(lab, edge["origin"]))
        assert served.returncode == 0 and served.stdout.endswith("\n200")
    finally:
        lab.on_host(edge["netns"], "rm", "-rf", "/tmp/kokoa-broken", check=False)


# --- systemd machines: the install scripts' systemd branch, as real servers run it ----------

def systemd_only(lab) -> None:
    if INIT != "systemd":
        pytest.skip("the lab's servers run without systemd (KOKOA_TEST_LAB_INIT=plain)")


def edge_interface(lab, edge: dict) -> str:
    outputs = json.loads(lab.outputs_file.read_text())
    return f"wg-origin-{outputs['origins'][edge['origin']]['subnet']}"


def origin_of(lab, edge: dict) -> dict:
    return next(o for o in lab.status["origins"] if o["name"] == edge["origin"])


def units_of(lab, host: dict) -> tuple[list[str], list[str]]:
    """(services, timers) the install script sets up on an origin or an edge."""
    if "domain" in host:  # an origin
        return ["wg-quick@wg0.service", "kokoa-gateway.service"], ["kokoa-certificate.timer"]
    return [f"wg-quick@{edge_interface(lab, host)}.service", "nginx.service"], ["kokoa-cert-refresh.timer"]


def unit_of_process(lab, netns: str, pid_command: str) -> str:
    """The systemd unit a process belongs to (`ps -o unit=`); pid_command prints its pid."""
    return lab.on_host(netns, "sh", "-c", f"ps -o unit= -p \"$({pid_command})\"").stdout.strip()


def assert_units_active_and_enabled(lab, host: dict) -> None:
    services, timers = units_of(lab, host)
    units = services + timers
    active = lab.systemctl(host["netns"], "is-active", *units, check=False).stdout.split()
    enabled = lab.systemctl(host["netns"], "is-enabled", *units, check=False).stdout.split()
    assert dict(zip(units, active)) == dict.fromkeys(units, "active"), host["name"]
    assert dict(zip(units, enabled)) == dict.fromkeys(units, "enabled"), host["name"]
    listed = lab.systemctl(host["netns"], "list-timers", "--all", "--no-legend", "--plain").stdout
    assert all(timer in listed for timer in timers), listed


def test_status_gives_each_server_its_init(lab):
    from click.testing import CliRunner

    from kokoa_infra.lab.cli import lab as lab_command

    servers = lab.status["origins"] + lab.status["edges"]
    assert {s["name"]: s["init"] for s in servers} == {s["name"]: INIT for s in servers}
    shown = CliRunner().invoke(lab_command, ["status", "--json", "--lab-dir", str(lab.state_dir),
                                             "--prefix", lab.lab.prefix])
    assert shown.exit_code == 0, shown.output
    printed = json.loads(shown.output)
    assert [s["init"] for s in printed["origins"] + printed["edges"]] == [INIT] * len(servers)
    # What each server's PID 1 really is.
    for server in servers:
        assert lab.on_host(server["netns"], "cat", "/proc/1/comm").stdout.strip() == \
            {"systemd": "systemd", "plain": "sshd"}[INIT]


def test_servers_run_the_install_scripts_units_enabled(lab):
    """install.sh took its systemd branch: tunnel, nginx and gateway are enabled units, timers listed."""
    systemd_only(lab)
    wait_for_certificates(lab, lab.status["edges"])
    for host in lab.status["origins"] + lab.status["edges"]:
        assert_units_active_and_enabled(lab, host)
        assert lab.systemctl(host["netns"], "list-units", "--failed", "--no-legend", "--plain").stdout == ""
        services, _ = units_of(lab, host)
        # The daemons are those units' processes, not started beside them.
        assert unit_of_process(lab, host["netns"], "pgrep -x wireguard-go") == services[0]
        pidfile = "/run/kokoa-gateway.pid" if "domain" in host else "/run/nginx.pid"
        assert unit_of_process(lab, host["netns"], f"cat {pidfile}") == services[1]
        # No kernel module here: the unit runs wireguard-go through install.sh's drop-in.
        environment = lab.systemctl(host["netns"], "show", "-p", "Environment", services[0]).stdout
        assert "WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go" in environment


def nginx_workers(lab, netns: str, pidfile: str) -> set[str]:
    return set(lab.on_host(netns, "sh", "-c", f"pgrep -P \"$(cat {pidfile})\"").stdout.split())


def test_systemctl_reloads_drop_no_request(lab):
    """`systemctl reload` of nginx, the gateway and both tunnel ends while requests flow: none fails."""
    systemd_only(lab)
    wait_for_certificates(lab, lab.status["edges"])
    edge = lab.status["edges"][0]
    origin = origin_of(lab, edge)
    reloads = [(edge["netns"], "nginx.service"), (origin["netns"], "kokoa-gateway.service"),
               (edge["netns"], f"wg-quick@{edge_interface(lab, edge)}.service"),
               (origin["netns"], "wg-quick@wg0.service")]
    main_pids = {r: lab.systemctl(*r[:1], "show", "-p", "MainPID", "--value", r[1]).stdout for r in reloads}
    workers = {"edge": nginx_workers(lab, edge["netns"], "/run/nginx.pid"),
               "gateway": nginx_workers(lab, origin["netns"], "/run/kokoa-gateway.pid")}
    with RequestLoop(lab, edge, max_seconds=120) as loop:
        for _ in range(3):
            for netns, unit in reloads:
                lab.systemctl(netns, "reload", unit)
                time.sleep(0.3)
        time.sleep(1)
    assert loop.failed == 0, loop.errors[:3]
    assert loop.ok > 10
    # Reloaded, not restarted: the same main processes, and nginx's workers are new ones.
    assert {r: lab.systemctl(*r[:1], "show", "-p", "MainPID", "--value", r[1]).stdout for r in reloads} == main_pids
    # A relaying gateway's old workers keep the edges' tunnel connections until the edges close
    # them idle (their keepalive_timeout, 60 s), at most worker_shutdown_timeout (300 s): a
    # reload must not cut the WebSockets they may carry (docs/security.md). Room for a loaded
    # machine beyond the 60 s, still well inside the 300 s.
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and (
            workers["edge"] & nginx_workers(lab, edge["netns"], "/run/nginx.pid")
            or workers["gateway"] & nginx_workers(lab, origin["netns"], "/run/kokoa-gateway.pid")):
        time.sleep(0.5)
    assert not workers["edge"] & nginx_workers(lab, edge["netns"], "/run/nginx.pid")
    assert not workers["gateway"] & nginx_workers(lab, origin["netns"], "/run/kokoa-gateway.pid")


def test_uninstall_on_a_machine_leaves_no_unit_and_the_removed_edge_leaves_no_machine(lab):
    """uninstall.sh's systemd branch stops and removes every unit; removing the edge removes its machine."""
    systemd_only(lab)
    origin = lab.status["origins"][-1]["name"]
    lab.add_edge(name="edge-gone", origin=origin, host=lab.spare_edge_host())
    gone = next(e for e in lab.status["edges"] if e["name"] == "edge-gone")
    interface = edge_interface(lab, gone)
    # Booted once since its install, as a server that has run a while: every enabled unit active.
    lab.power_off(gone["netns"])
    lab.boot(gone["netns"])
    assert_units_active_and_enabled(lab, gone)
    result = lab.on_host(gone["netns"], "bash", "/etc/kokoa/bundle/uninstall.sh")
    assert "edge edge-gone removed" in result.stdout
    services, timers = units_of(lab, gone)
    states = lab.systemctl(gone["netns"], "is-active", *services, *timers, check=False).stdout.split()
    assert states == ["inactive"] * len(services + timers)
    assert lab.systemctl(gone["netns"], "is-enabled", "nginx.service", check=False).stdout.strip() == "disabled"
    # Nothing of Kokoa's is left loaded, enabled or failed in the machine's systemd.
    loaded = lab.systemctl(gone["netns"], "list-units", "--all", "--no-legend", "--plain",
                           "kokoa-*", f"wg-quick@{interface}.service").stdout
    assert loaded == ""
    assert lab.systemctl(gone["netns"], "list-unit-files", "--no-legend", "kokoa-*", check=False).stdout == ""
    assert lab.systemctl(gone["netns"], "list-units", "--failed", "--no-legend", "--plain").stdout == ""
    assert lab.on_host(gone["netns"], "ip", "link", "show", interface, check=False).returncode != 0
    # Out of the config: its delete finds nothing left to uninstall, and the machine goes.
    edges = [e for e in lab.config()["kokoa:edges"] if e["name"] != "edge-gone"]
    report = lab.apply({"kokoa:edges": edges})
    assert "deleted edge-gone-install" in report.changed
    assert not any(e["name"] == "edge-gone" for e in lab.status["edges"])
    assert gone["netns"] not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not (lab.state_dir / "hosts" / gone["netns"]).exists()
    assert f"{lab.state_dir}/hosts/{gone['netns']}/" not in Path("/proc/self/mountinfo").read_text()


def test_a_restarted_edge_serves_again_from_its_own_enabled_units(lab):
    """Power an edge off and boot it again, deploying nothing: its enabled units bring it back."""
    systemd_only(lab)
    wait_for_certificates(lab, lab.status["edges"])
    edge = lab.status["edges"][1]
    origin = origin_of(lab, edge)
    deployed = (lab.state_dir / "commands.json").read_bytes()
    lab.on_host(edge["netns"], "touch", "/run/kokoa-before-power-off")
    lab.power_off(edge["netns"])
    assert https_get(lab, edge, domain_of(lab, edge["origin"])).returncode != 0, "the edge still answers"
    lab.boot(edge["netns"])
    # A real boot: /run is new; what install.sh wrote is in the machine's directory.
    assert lab.on_host(edge["netns"], "test", "-e", "/run/kokoa-before-power-off", check=False).returncode != 0
    assert_units_active_and_enabled(lab, edge)
    wait_for_certificates(lab, [edge], deadline_s=60)
    result = https_get(lab, edge, domain_of(lab, edge["origin"]))
    assert result.stdout.endswith("\n200") and f"origin {edge['origin']}" in result.stdout
    outputs = json.loads(lab.outputs_file.read_text())
    key = outputs["edges"][edge["name"]]["publicKey"]
    shown = lab.on_host(origin["netns"], "wg", "show", "wg0", "latest-handshakes").stdout
    assert int(dict(line.split("\t") for line in shown.strip().splitlines())[key]) > time.time() - 60
    assert (lab.state_dir / "commands.json").read_bytes() == deployed, "a deployment ran"
