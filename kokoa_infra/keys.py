"""WireGuard key arithmetic: the public key of a private key, as `wg pubkey` prints it."""

from __future__ import annotations

import base64
import binascii

from nacl.public import PrivateKey


def public_key(private_key_b64: str) -> str:
    """Curve25519 public key (base64) of a 32-byte private key (base64).

    WireGuard clamps the scalar the same way X25519 does, so this equals `wg pubkey`.
    """
    try:
        raw = base64.b64decode(private_key_b64, validate=True)
    except binascii.Error as exc:
        raise ValueError("a WireGuard private key must be base64") from exc
    if len(raw) != 32:
        raise ValueError(f"a WireGuard private key has 32 bytes, not {len(raw)}")
    return base64.b64encode(bytes(PrivateKey(raw).public_key)).decode()
