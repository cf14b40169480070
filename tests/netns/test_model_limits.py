"""The model's new-connection limits are what nftables accepts (`nft -c` in a throwaway namespace)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.unit.test_model import RATE_LIMIT_BOUNDS, limits_or_none, need


def nft_accepts(netns: str, tmp_path: Path, rate: int, burst: int) -> subprocess.CompletedProcess:
    """`nft -c` (check only, nothing is loaded) of a per-address new-connection limit on 80/443."""
    rules = tmp_path / "limits.nft"
    meter = f"add @clients {{ ip saddr limit rate {rate}/second burst {burst} packets }}"
    rules.write_text(f"""
table inet kokoa_check {{
    set clients {{ type ipv4_addr; flags dynamic; timeout 1m; }}
    chain input {{
        type filter hook input priority 0; policy accept;
        tcp dport {{ 80, 443 }} ct state new {meter} accept
        tcp dport {{ 80, 443 }} ct state new drop
    }}
}}
""")
    return subprocess.run(["ip", "netns", "exec", netns, need("nft"), "-c", "-f", str(rules)],
                          capture_output=True, text=True, timeout=30)


def test_new_connection_limits_are_bounded_by_what_nft_accepts(netns, tmp_path):
    for key in ("newConnectionsPerSecond", "newConnectionsBurst"):
        low, high = RATE_LIMIT_BOUNDS[key]
        for value in (low, high):
            limits = limits_or_none({key: value})
            assert limits is not None, (key, value)
            result = nft_accepts(netns, tmp_path, limits.new_connections_per_second, limits.new_connections_burst)
            assert result.returncode == 0, (key, value, result.stderr)
        assert limits_or_none({key: low - 1}) is None
    # What nftables refuses, the model refuses: a rate or burst of 0.
    assert nft_accepts(netns, tmp_path, 0, 5).returncode != 0
    assert "packet limit burst must be > 0" in nft_accepts(netns, tmp_path, 5, 0).stderr
