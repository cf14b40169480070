#!/bin/bash
# Kokoa edge edge-blog-1: the counters only root can read, for the traffic metrics. Every
# 5s (install.sh schedules it): the flood shield's nftables counters and
# nginx's active connections (stub_status on loopback), rewritten as one small file that
# mtail (kokoa-edge-metrics, unprivileged) reads. Generated; edits are overwritten.
set -euo pipefail
DIR=/run/kokoa-edge-metrics
mkdir -p "$DIR"
chmod 0755 "$DIR"
tmp=$(mktemp "$DIR/.counters.XXXXXX")
trap 'rm -f "$tmp"' EXIT
for counter in shield_new shield_open shield_untracked; do
  packets=$(nft list counter inet kokoa "$counter" 2>/dev/null | awk '$1 == "packets" { print $2; exit }') || true
  if [ -n "$packets" ]; then
    printf 'kokoa-shield %s %s\n' "$counter" "$packets" >> "$tmp"
  fi
done
active=$(curl -fsS --max-time 2 "http://127.0.0.1:3904/stub_status" 2>/dev/null \
  | awk '$1 == "Active" { print $3; exit }') || true
if [ -n "$active" ]; then
  printf 'kokoa-connections %s\n' "$active" >> "$tmp"
fi
chmod 0644 "$tmp"
# A new file each time (mtail follows the name and reads a replaced file from its start).
mv -f "$tmp" "$DIR/counters.log"
