"""The lab's services besides the servers: pebble (the ACME server) with pebble-challtestsrv (its DNS, set
to the A records the program declares), and each origin's demo application.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Mapping
from urllib.parse import urlsplit

from kokoa_infra.lab import machines
from kokoa_infra.lab.hosts import Host, LabTopology
from kokoa_infra.lab.processes import LabError, listening, run, wait_until

if TYPE_CHECKING:
    from kokoa_infra.lab.lab import Lab

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
    # Any body: what an upload may be is the edges' and the gateway's to say (maxBodySize).
    client_max_body_size 0;
    server {{
        listen {listen};
        default_type text/plain;
        location / {{ return 200 "{body}"; }}
        # The second application, a WebSocket echo server, under /ws/.
        location /ws/ {{
            proxy_pass http://127.0.0.1:{ws_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 3600s;
        }}
    }}
    server {{
        listen unix:{status};
        location / {{ stub_status; }}
    }}
}}
"""
# The second demo application: a WebSocket echo server (standard library), on loopback.
WEBSOCKET_PORT = 9000
WEBSOCKET_SCRIPT = Path(__file__).resolve().parent / "websocket.py"
WEBSOCKET_PATH = "/usr/local/lib/kokoa-lab/websocket.py"
WEBSOCKET_UNIT = f"""\
[Unit]
Description=Kokoa lab WebSocket echo application on 127.0.0.1:{WEBSOCKET_PORT}
After=network.target

[Service]
ExecStart=/usr/bin/python3 {WEBSOCKET_PATH} serve 127.0.0.1 {WEBSOCKET_PORT}

[Install]
WantedBy=multi-user.target
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


def demo_answers(lab: Lab, host: Host) -> bool:
    up = urlsplit(host.upstream)
    proc = lab.on_host(host.netns, ["curl", "-fsS", "-m", "2", "-o", "/dev/null",
                                    f"http://{up.hostname}:{up.port or 80}/"])
    return proc.returncode == 0


def stop_demo(lab: Lab, host: Host) -> None:
    """Stop the origin's demo application (a benchmark puts another on its port)."""
    if lab.init_system(host.netns) == "systemd":
        lab.on_host(host.netns, ["systemctl", "stop", "kokoa-demo.service"], check=True)
    else:
        lab.on_host(host.netns, ["nginx", "-c", str(lab.host_dir(host.netns) / "demo-nginx.conf"), "-s", "quit"],
                    check=True)
    wait_until(f"demo application on {host.netns} to stop", lambda: not demo_answers(lab, host))


def start_demo(lab: Lab, host: Host) -> None:
    up = urlsplit(host.upstream)
    if up.scheme != "http" or not up.hostname:
        raise LabError(f"origin {host.name}: the lab's demo application needs an http:// upstream, "
                       f"not {host.upstream!r}")
    listen = f"{up.hostname}:{up.port or 80}"
    text = DEMO_NGINX.format(listen=listen, body=f"hello from origin {host.name}\\n", status=DEMO_STATUS_SOCKET,
                             ws_port=WEBSOCKET_PORT)
    if lab.init_system(host.netns) == "systemd":
        # A unit of the machine, enabled: it starts again when the origin boots again.
        merged = machines.root(lab.host_dir(host.netns))
        machines.write_file(merged, WEBSOCKET_PATH, WEBSOCKET_SCRIPT.read_text())
        machines.write_file(merged, "/etc/systemd/system/kokoa-demo-ws.service", WEBSOCKET_UNIT)
        machines.write_file(merged, DEMO_CONF, text)
        machines.write_file(merged, "/etc/systemd/system/kokoa-demo.service",
                            DEMO_UNIT.format(listen=listen, conf=DEMO_CONF))
        lab.on_host(host.netns, ["systemctl", "daemon-reload"], check=True)
        lab.on_host(host.netns, ["systemctl", "enable", "--now", "--quiet", "kokoa-demo.service",
                                 "kokoa-demo-ws.service"], check=True)
    else:
        conf = lab.host_dir(host.netns) / "demo-nginx.conf"
        conf.write_text(text)
        lab.on_host(host.netns, ["nginx", "-c", str(conf)], check=True, stdin=subprocess.DEVNULL)
        echo = lab.spawn(["ip", "netns", "exec", host.netns, "python3", str(WEBSOCKET_SCRIPT), "serve", "127.0.0.1",
                          str(WEBSOCKET_PORT)], lab.host_dir(host.netns) / "demo-ws.log")
        with lab.recording() as rec:
            rec["processes"][f"demo-ws-{host.netns}"] = echo.pid
    wait_until(f"demo application on {host.netns}", lambda: demo_answers(lab, host))


def demo_requests(lab: Lab, netns: str) -> int:
    """Requests the origin's demo application has answered since it started."""
    proc = lab.on_host(netns, ["curl", "-fsS", "-m", "2", "--unix-socket", DEMO_STATUS_SOCKET,
                               "http://demo/"], check=True)
    # "Active connections: 1\nserver accepts handled requests\n 5 5 7\n..."
    return int(proc.stdout.splitlines()[2].split()[2])


def start_acme(lab: Lab, host: Host) -> None:
    lab.acme_dir.mkdir(mode=0o700, exist_ok=True)
    key = lab.acme_dir / "key.pem"
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "365", "-subj", "/CN=kokoa lab ACME server",
         "-addext", f"subjectAltName=IP:{host.ip}", "-keyout", str(key), "-out", str(lab.acme_cert)])
    config = lab.acme_dir / "pebble-config.json"
    config.write_text(json.dumps({"pebble": {
        "listenAddress": "0.0.0.0:14000", "managementListenAddress": "0.0.0.0:15000",
        "certificate": str(lab.acme_cert), "privateKey": str(key),
        # HTTP-01 validation goes to port 80 of the addresses DNS gives: the edges.
        "httpPort": 80, "tlsPort": 443, "ocspResponderURL": "", "externalAccountBindingRequired": False,
    }}, indent=1))
    ns = ["ip", "netns", "exec", host.netns]
    # Names with no A record resolve to the ACME host itself, where nothing answers on port 80.
    dns = lab.spawn([*ns, "pebble-challtestsrv", "-dns01", "127.0.0.1:8053", "-http01", "",
                     "-https01", "", "-tlsalpn01", "", "-management", "127.0.0.1:8055",
                     "-defaultIPv4", host.ip, "-defaultIPv6", ""], lab.acme_dir / "challtestsrv.log")
    with lab.recording() as rec:
        rec["processes"]["challtestsrv"] = dns.pid
    # No validation sleep and no deliberately rejected nonces: deterministic and fast.
    env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}
    pebble = lab.spawn([*ns, "pebble", "-config", str(config), "-dnsserver", "127.0.0.1:8053"],
                        lab.acme_dir / "pebble.log", env=env)
    with lab.recording() as rec:
        rec["processes"]["pebble"] = pebble.pid
    curl = [*ns, "curl", "-fsS", "-m", "2", "--cacert", str(lab.acme_cert)]
    wait_until("pebble", lambda: pebble.poll() is None
               and run([*curl, "-o", "/dev/null", f"https://{host.ip}:14000/dir"], check=False).returncode == 0)
    wait_until("pebble-challtestsrv", lambda: listening(host.netns, 8055))
    # The issuing root is new on every pebble start: this is what verifies lab certificates.
    run([*curl, "-o", str(lab.ca_bundle), f"https://{host.ip}:15000/roots/0"])


def set_dns(lab: Lab, topo: LabTopology, records: Mapping[str, list[str]]) -> None:
    """Make the lab's DNS (pebble-challtestsrv) answer every name of the program's `dnsRecords`
    output (each origin's domain and hostnames) with exactly its addresses; a name no longer
    there, with none."""
    acme = topo.one("acme")
    if acme is None:
        return
    wanted = {name: sorted(addresses) for name, addresses in records.items()}
    before = lab.record().get("dns") or {}
    if before == wanted:
        return
    for name in sorted(before.keys() | wanted.keys()):
        _challtestsrv(acme, "clear-a", {"host": f"{name}."})
        if wanted.get(name):
            _challtestsrv(acme, "add-a", {"host": f"{name}.", "addresses": wanted[name]})
    with lab.recording() as rec:
        rec["dns"] = wanted


def _challtestsrv(acme: Host, action: str, body: dict) -> None:
    run(["ip", "netns", "exec", acme.netns, "curl", "-fsS", "-m", "5", "-X", "POST",
         "-d", json.dumps(body), f"http://127.0.0.1:8055/{action}"])
