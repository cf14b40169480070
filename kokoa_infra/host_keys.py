"""Read a server's SSH host key with ssh-keyscan, for `kokoa add-origin/add-edge --scan-host-key`.

The key is what `pulumi up` will pin (pulumi-command refuses a server presenting another
one); its SHA256 fingerprint is for the operator to compare with the server's console,
since a scan over the network trusts whoever answers this once.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from kokoa_infra.model import (HOSTNAME_RE, HOST_KEY_TYPES, RSA_HOST_KEY, host_key_problem,
                               keyscan_command, parse_ipv4)

# ssh-keyscan -T: seconds for each connection; the whole run is bounded too.
SCAN_TIMEOUT = 5
PROCESS_TIMEOUT = 30
# Preference: ed25519, else ECDSA (ssh-keyscan -t ecdsa asks for the server's ECDSA key,
# whatever its curve).
PREFERENCE = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521")


class HostKeyScanError(Exception):
    """No usable host key could be read; the message says why and what to do."""


@dataclass(frozen=True)
class ScannedKey:
    key: str  # "ssh-ed25519 AAAA...", as hostKey pins it
    fingerprint: str  # `ssh-keygen -lf -`: "256 SHA256:... (ED25519)"


def _run(argv: list[str], what: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True,
                              timeout=PROCESS_TIMEOUT, check=False)
    except FileNotFoundError:
        raise HostKeyScanError(f"{argv[0]} is not installed (Debian: apt-get install openssh-client); "
                               f"{what}") from None
    except subprocess.TimeoutExpired:
        raise HostKeyScanError(f"`{' '.join(argv)}` did not finish within {PROCESS_TIMEOUT} s") from None


def _keyscan(host: str, port: int, types: str) -> tuple[list[str], str]:
    """("type base64" keys, error lines) that `ssh-keyscan -t types` reads from host:port."""
    argv = ["ssh-keyscan", "-T", str(SCAN_TIMEOUT), "-p", str(port), "-t", types, host]
    result = _run(argv, "or pass the key with --host-key")
    keys = []
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and not fields[0].startswith("#"):
            keys.append(f"{fields[1]} {fields[2]}")
    # stderr also carries "# host:port SSH-2.0-..." banners; keep only real complaints.
    errors = "; ".join(line.strip() for line in result.stderr.splitlines()
                       if line.strip() and not line.startswith("#"))
    return keys, errors


def fingerprint(key: str) -> str:
    result = _run(["ssh-keygen", "-lf", "-"], "cannot show the key's fingerprint", stdin=key + "\n")
    if result.returncode != 0 or not result.stdout.strip():
        raise HostKeyScanError(f"ssh-keygen cannot read the scanned key {key!r}: {result.stderr.strip()}")
    return result.stdout.strip()


def scan_host_key(host: str, port: int = 22) -> ScannedKey:
    """The server's ed25519 key (else its ECDSA key), with its fingerprint."""
    # Never hand ssh-keyscan something that could read as an option ("-oProxyCommand=...").
    if not (parse_ipv4(host) or HOSTNAME_RE.fullmatch(host)):
        raise HostKeyScanError(f"{host!r} is not an IPv4 address or host name to scan")
    if not 1 <= port <= 65535:
        raise HostKeyScanError(f"SSH port {port} is not from 1 to 65535")
    keys, errors = _keyscan(host, port, "ed25519,ecdsa")
    for key_type in PREFERENCE:
        key = next((k for k in keys if k.split()[0] == key_type), None)
        if key is not None:
            problem = host_key_problem(key, keyscan_command(host, port))
            if problem:
                raise HostKeyScanError(f"the host key read from {host} port {port} is unusable: {problem}")
            return ScannedKey(key=key, fingerprint=fingerprint(key))
    # Nothing usable: tell "only RSA" apart from "nothing at all" (a second bounded scan).
    rsa_keys, _ = _keyscan(host, port, "rsa")
    if rsa_keys:
        reason = RSA_HOST_KEY.format(scan=keyscan_command(host, port))
        raise HostKeyScanError(f"{host} port {port} offers only an RSA host key: {reason}. Give the "
                               "server an ed25519 host key (ssh-keygen -A, then reload sshd), or pass "
                               "--insecure-any-host-key for a throwaway host")
    offered = ", ".join(sorted({k.split()[0] for k in keys if k.split()[0] not in HOST_KEY_TYPES}))
    detail = f" (it offered only {offered})" if offered else (f" ({errors})" if errors else "")
    raise HostKeyScanError(f"ssh-keyscan read no ed25519 or ECDSA host key from {host} port {port} "
                           f"within {SCAN_TIMEOUT} s{detail}: is sshd running there and reachable from "
                           "here? Or pass the key with --host-key")
