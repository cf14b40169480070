"""What one value may be: the patterns of names, domains and URLs, and the address checks
(canonical IPv4, public, SSH, an application's). No config structure here: kokoa_infra/schema.py
says which key takes which value."""

from __future__ import annotations

import ipaddress
import re

# Every pattern is applied with `fullmatch` (never `match` with `$`, which also accepts a
# trailing newline: "blog.example.com\n" would reach nginx.conf and the shell scripts).
NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,30}")
# Lower-case FQDN: at least two labels, letters/digits/hyphens, no leading/trailing hyphen,
# and a top-level label that is not all digits (so "203.0.113.10" is an address, not a domain).
# Also kokoa-dns's rule for a record name.
LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
DOMAIN_RE = re.compile(rf"(?=.{{1,253}}\Z){LABEL}(\.{LABEL})*\.(?![0-9]+\Z){LABEL}")
HOSTNAME_RE = re.compile(rf"(?=.{{1,253}}\Z){LABEL}(\.{LABEL})*")
# A host made only of digits and dots is an IPv4 address, never a host name: resolvers
# (inet_aton) read "203.000.113.010" as 203.0.113.8, and string comparisons miss that it
# is an origin's address.
DIGITS_AND_DOTS_RE = re.compile(r"[0-9.]+")
# What else inet_aton (and so ping, curl, ssh, wg) reads as an IPv4 address: one to four
# parts, each decimal, octal or 0x-hex ("0xcb00710a", "0xcb.0.113.10"). A host name of this
# form would pass for a name while it is an address.
INET_ATON_RE = re.compile(r"((0x[0-9a-f]*|[0-9]+)\.){0,3}(0x[0-9a-f]*|[0-9]+)", re.IGNORECASE)
EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]{1,64}@" + rf"{LABEL}(\.{LABEL})+", re.IGNORECASE)
NAME_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
ZONE_ID_RE = re.compile(r"[0-9a-f]{32}")
ACME_SERVER_RE = re.compile(r"https://[A-Za-z0-9.:/_-]+")
UPSTREAM_RE = re.compile(
    r"(?P<scheme>https?)://(?P<host>[A-Za-z0-9.-]+|\[[0-9a-fA-F:]+\])(:(?P<port>[0-9]{1,5}))?"
    r"(?P<path>/[A-Za-z0-9._~/-]*)?")
# A prefix nginx takes as a plain `location` and that cannot leave it (no space, brace,
# semicolon, quote or `#`): unreserved URL characters only.
PATH_PREFIX_RE = re.compile(r"/[A-Za-z0-9._~/-]{0,199}")
# nginx's size syntax as client_max_body_size takes it (g is refused to keep bounds readable).
SIZE_RE = re.compile(r"(?P<number>[1-9][0-9]{0,9})(?P<unit>[kKmM]?)")
SIZE_UNITS = {"": 1, "k": 1024, "m": 1024 * 1024}
PORT_RANGE = (1, 65535)
EVERYONE = "0.0.0.0/0"
THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")


def parse_ipv4(value: str) -> ipaddress.IPv4Address | None:
    """The address when `value` is one in canonical dotted-quad form, else None."""
    try:
        address = ipaddress.IPv4Address(value)
    except ipaddress.AddressValueError:
        return None
    return address if str(address) == value else None


def canonical_ipv4(value: str) -> str | None:
    """"203.000.113.010" → "203.0.113.10": four decimal numbers 0..255, leading zeros dropped."""
    parts = value.split(".")
    if len(parts) == 4 and all(p.isascii() and p.isdigit() and int(p) <= 255 for p in parts):
        return ".".join(str(int(p)) for p in parts)
    return None


LEADING_ZEROS = "{value!r} has leading zeros, which some tools read as octal; write {canonical}"


def inet_aton_address(value: str) -> ipaddress.IPv4Address | None:
    """The address inet_aton reads in `value` ("0xcb00710a" and "3405803786" are
    203.0.113.10), else None."""
    if not INET_ATON_RE.fullmatch(value):
        return None
    try:
        numbers = [int(p, 16) if p.lower().startswith("0x") else int(p, 8) if p.startswith("0") and p != "0"
                   else int(p) for p in (p if p.lower() != "0x" else "0x0" for p in value.split("."))]
    except ValueError:  # "08": not octal, so inet_aton refuses it and it is no address
        return None
    # inet_aton: the last part fills the bytes the others leave (a.b.c.d, a.b.cd, a.bcd, abcd).
    last_bits = 8 * (5 - len(numbers))
    if any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 1 << last_bits:
        return None
    packed = 0
    for n in numbers[:-1]:
        packed = packed << 8 | n
    return ipaddress.IPv4Address(packed << last_bits | numbers[-1])


def numeric_host_problem(value: str) -> str | None:
    """Why a host of this inet_aton number form is refused, or None."""
    address = inet_aton_address(value)
    if address is None or str(address) == value:
        return None
    return (f"{value!r} is the IPv4 address {address} written as a number, which resolvers read as "
            f"that address; write {address}")


def ipv4_problem(value: str) -> str:
    """Why `value` is not a canonical IPv4 address, with the canonical form when it is clear."""
    canonical = canonical_ipv4(value)
    if canonical is not None:
        return LEADING_ZEROS.format(value=value, canonical=canonical)
    return f"{value!r} is not an IPv4 address like 198.51.100.7"


def special_address(address: ipaddress.IPv4Address, *, loopback_ok: bool) -> str | None:
    """What makes `address` unfit as a server's address, or None."""
    if address in THIS_NETWORK:
        return "is unspecified (0.0.0.0/8)"
    if address.is_loopback and not loopback_ok:
        return "is a loopback address (127.0.0.0/8)"
    if address.is_link_local:
        return "is link-local / cloud metadata (169.254.0.0/16)"
    if address.is_multicast:
        return "is multicast (224.0.0.0/4)"
    if address.is_reserved:
        return "is reserved (240.0.0.0/4)"
    return None


def public_address_problem(address: ipaddress.IPv4Address) -> str | None:
    """Where a public address is meant (an edge's publicIp, an origin's endpoint).

    Private ranges stay allowed: origins often sit on private networks (and the lab uses
    172.31.255.0/24).
    """
    problem = special_address(address, loopback_ok=False)
    return f"{address} {problem}, not a public address" if problem else None


def ssh_address_problem(address: ipaddress.IPv4Address) -> str | None:
    """Where the program's SSH connection goes (`host`).

    Loopback is allowed: an SSH tunnel on localhost (`ssh -L 2222:server:22 bastion`)
    is a legitimate way to reach a host. Unspecified, link-local (the cloud metadata
    service lives there), multicast and reserved addresses never reach a server's sshd.
    """
    problem = special_address(address, loopback_ok=True)
    return f"{address} {problem}, not the address of a server's SSH" if problem else None


def is_loopback(host: str) -> bool:
    address = parse_ipv4(host)
    return host == "localhost" or (address is not None and address.is_loopback)


def upstream_address_problem(host: str) -> str | None:
    """Why an upstream's address cannot be the application's (the gateway would proxy the
    edges' requests there), or None. Loopback is the usual application; the cloud metadata
    service (link-local), unspecified, multicast and reserved addresses never are."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None  # a host name
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif address.is_unspecified:
            return f"{address} is unspecified (::), not the address of an application"
        elif address.is_link_local:
            return f"{address} is link-local (fe80::/10), not the address of an application"
        elif address.is_multicast:
            return f"{address} is multicast (ff00::/8), not the address of an application"
        else:
            return None
    problem = special_address(address, loopback_ok=True)
    return f"{address} {problem}, not the address of an application" if problem else None
