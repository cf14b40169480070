"""The rendered edge serving for real in throwaway namespaces (tests/netns): the tunnel as a veth
pair to an origin namespace, a throwaway certificate, and the edge's nginx with its paths
(/etc/letsencrypt, /var/log, /run, /etc/nginx/kokoa) mounted privately, so that nothing of the
machine's own is touched."""

from __future__ import annotations

import subprocess
from pathlib import Path

from kokoa_infra.render import EDGE_NGINX_DIR


def link_tunnel(edge_ns: str, origin_ns: str, edge_address: str, origin_address: str) -> None:
    """`tun0` in both namespaces, holding the edge's and the origin's tunnel addresses (a /24)."""
    subprocess.run(["ip", "-n", edge_ns, "link", "add", "tun0", "type", "veth", "peer", "name", "tun0",
                    "netns", origin_ns], check=True)
    subprocess.run(["ip", "-n", origin_ns, "addr", "add", f"{origin_address}/24", "dev", "tun0"], check=True)
    subprocess.run(["ip", "-n", edge_ns, "addr", "add", f"{edge_address}/24", "dev", "tun0"], check=True)
    for ns in (edge_ns, origin_ns):
        subprocess.run(["ip", "-n", ns, "link", "set", "tun0", "up"], check=True)


def throwaway_certificate(directory: Path, domain: str, *other_names: str) -> Path:
    """A self-signed certificate for `domain` (and `other_names`) where the edge looks for it (below
    `directory`, mounted as /etc/letsencrypt); returns its fullchain.pem, the clients' CA."""
    live = directory / "letsencrypt" / "live" / domain
    live.mkdir(parents=True)
    names = ",".join(f"DNS:{name}" for name in (domain, *other_names))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", f"/CN={domain}", "-addext", f"subjectAltName={names}",
                    "-keyout", str(live / "privkey.pem"), "-out", str(live / "fullchain.pem")],
                   check=True, capture_output=True)
    return live / "fullchain.pem"


def write_edge_files(directory: Path, files: dict[str, str]) -> None:
    """nginx.conf, and the pass and challenge files where the edge has them."""
    for name in ("challenge.js", "pass-key.conf"):
        if name in files:
            (directory / "kokoa" / name).write_text(files[name])
    (directory / "nginx.conf").write_text(files["nginx.conf"])


def start_edge_nginx(netns: str, directory: Path, files: dict[str, str]) -> None:
    """The edge's nginx from its rendered `files`, in `netns`, with `directory` holding its paths
    (throwaway_certificate first). nginx.pid ends up in `directory`/run."""
    for sub in ("log/nginx", "run", "kokoa", "var-lib/nginx"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    write_edge_files(directory, files)
    # A /var/lib of its own: the request bodies nginx keeps there (BODY_SPACE) stay in `directory`.
    start_with_mounts(netns, {directory / "var-lib": "/var/lib", directory / "letsencrypt": "/etc/letsencrypt",
                              directory / "log": "/var/log", directory / "run": "/run",
                              directory / "kokoa": EDGE_NGINX_DIR},
                      f"exec nginx -c {directory / 'nginx.conf'}")


def start_with_mounts(netns: str, mounts: dict[Path, str], command: str) -> None:
    """Run the shell `command` (a daemon that forks, or `exec` one) in `netns`, in a mount
    namespace of its own where each of `mounts` (a directory or file -> its path, a directory
    created if missing) is bound, so that nothing of the machine's own paths is touched."""
    binds = " && ".join(f"{{ [ -e {target} ] || mkdir -p {target}; }} && mount --bind {source} {target}"
                        for source, target in mounts.items())
    started = subprocess.run(["ip", "netns", "exec", netns, "unshare", "--mount", "--propagation", "private",
                              "sh", "-c", f"{binds} && {command}"], capture_output=True, text=True, timeout=30)
    assert started.returncode == 0, started.stderr
