"""SSH host keys: what a `hostKey` may pin (the OpenSSH line and its wire format), and reading
a server's key with ssh-keyscan for `kokoa add-origin/add-edge --scan-host-key`.

The key is what `pulumi up` will pin (pulumi-command refuses a server presenting another
one); its SHA256 fingerprint is for the operator to compare with the server's console,
since a scan over the network trusts whoever answers this once.
"""

from __future__ import annotations

import base64
import binascii
import re
import subprocess
from dataclasses import dataclass
from typing import Any

from kokoa_infra.values import HOSTNAME_RE, parse_ipv4

HOST_KEY_RE = re.compile(r"(?P<type>[A-Za-z0-9@._-]{1,64}) (?P<data>[A-Za-z0-9+/]+={0,3})"
                         r"( [A-Za-z0-9@._-]{1,64})?")
# Host key types pulumi-command can pin (golang.org/x/crypto/ssh), with their curve and
# public point size; ssh-rsa is refused with its reason (RSA_HOST_KEY).
HOST_KEY_TYPES = {"ssh-ed25519": None, "ecdsa-sha2-nistp256": ("nistp256", 65),
                  "ecdsa-sha2-nistp384": ("nistp384", 97), "ecdsa-sha2-nistp521": ("nistp521", 133)}
RSA_HOST_KEY = ("an ssh-rsa host key cannot be pinned: pulumi-command offers only SHA-1 ssh-rsa "
                "signatures for RSA host keys, which OpenSSH 8.8 and later refuse, so the connection "
                "would fail; use the host's ed25519 key ({scan})")


# --- what a hostKey may pin ------------------------------------------------------------------

def _ssh_strings(blob: bytes) -> list[bytes] | None:
    """The SSH wire-format strings (uint32 length + bytes) of `blob`, or None if malformed."""
    fields, position = [], 0
    while position < len(blob):  # each turn consumes at least 4 bytes
        if position + 4 > len(blob):
            return None
        length = int.from_bytes(blob[position:position + 4], "big")
        position += 4
        if position + length > len(blob):
            return None
        fields.append(blob[position:position + length])
        position += length
    return fields


def host_key_blob_ok(key_type: str, data: str) -> bool:
    """Whether `data` (base64) holds a public key of `key_type` of the right size."""
    try:
        blob = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return False
    fields = _ssh_strings(blob)
    if not fields or fields[0] != key_type.encode():
        return False
    curve = HOST_KEY_TYPES[key_type]
    if curve is None:
        return len(fields) == 2 and len(fields[1]) == 32
    name, point_size = curve
    return (len(fields) == 3 and fields[1] == name.encode() and len(fields[2]) == point_size
            and fields[2][:1] == b"\x04")


def keyscan_command(host: str | None, port: int | None) -> str:
    """The command that prints a host's ed25519 key, for messages."""
    port_option = f" -p {port}" if port not in (None, 22) else ""
    return f"ssh-keyscan -t ed25519{port_option} {host or 'HOST'}"


def host_key_problem(value: Any, scan: str) -> str | None:
    """Why `value` cannot pin a host's SSH key, or None (`scan`: see keyscan_command)."""
    match = HOST_KEY_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return f"{value!r} is not an OpenSSH public host key like 'ssh-ed25519 AAAA...'"
    key_type = match["type"]
    if key_type == "ssh-rsa" or key_type.startswith("rsa-sha2-"):
        return RSA_HOST_KEY.format(scan=scan)
    if key_type not in HOST_KEY_TYPES:
        return (f"key type {key_type!r} is not accepted: use the host's ssh-ed25519 (or "
                f"ecdsa-sha2-nistp256/384/521) key ({scan})")
    if not host_key_blob_ok(key_type, match["data"]):
        return f"the key data of {key_type} {match['data']!r} does not hold an {key_type} key"
    return None


# --- scanning a server -------------------------------------------------------------------------

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
