#!/bin/bash
# Kokoa edge edge-osaka-1: fetch the certificate of blog.example.com from origin
# blog through the tunnel and serve it. Nothing happens when it is unchanged;
# a pair that does not match, names another domain or fails `nginx -t` is not installed.
set -euo pipefail
umask 077
# --- shared by every Kokoa install script -------------------------------------------
INSTALL_DIR=/etc/kokoa/bundle

LOG_DIR=/var/log/kokoa
RUN_DIR=/run/kokoa
# Origins: the edges that could have fetched the current TLS key, and the mark that it must change.
# shellcheck disable=SC2034 # edges' scripts do not use them
KEY_HOLDERS=/var/lib/kokoa/tls-key-holders
# shellcheck disable=SC2034
ROTATE_KEY=/var/lib/kokoa/rotate-tls-key

log() { printf 'kokoa: %s\n' "$*"; }
die() { printf 'kokoa: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0)"

has_systemd() { [ -d /run/systemd/system ]; }

# Install what is missing, each given as COMMAND:PACKAGE or /ABSOLUTE/FILE:PACKAGE; a host
# that has them all (or no network) is left alone.
ensure_packages() {
  local missing=() pair
  for pair in "$@"; do
    case $pair in
      /*) [ -e "${pair%%:*}" ] || missing+=("${pair#*:}") ;;
      *) command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}") ;;
    esac
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get: install them first"
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
}

# Copy SRC to DEST with MODE only when the content differs; returns 1 when unchanged.
install_file() {
  local mode=$1 src=$2 dest=$3
  if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
    chmod "$mode" "$dest"
    return 1
  fi
  install -D -m "$mode" "$src" "$dest.kokoa-new"
  mv -f "$dest.kokoa-new" "$dest"
  return 0
}

# A systemd unit file or drop-in DEST from stdin, written only when its content differs
# (returns 1 when unchanged): a second install rewrites no unit and reloads nothing.
write_unit() {
  local dest=$1 tmp status=0
  tmp=$(mktemp)
  cat > "$tmp"
  install_file 0644 "$tmp" "$dest" || status=$?
  rm -f "$tmp"
  return "$status"
}

# The way back exists before anything changes: removing a node runs $INSTALL_DIR/uninstall.sh
# (the delete command does nothing without it), so a first install that stops halfway must
# already have left this bundle's. install_bundle later replaces the directory whole.
prepare_uninstall() {
  local src=$1
  [ "$src" = "$INSTALL_DIR" ] && return 0
  mkdir -p "$INSTALL_DIR"
  chmod 0700 "$INSTALL_DIR"
  install_file 0755 "$src/uninstall.sh" "$INSTALL_DIR/uninstall.sh" || true
}

# The bundle lives in $INSTALL_DIR so that timers find its scripts after a manual install.
install_bundle() {
  local src=$1 f
  [ "$src" = "$INSTALL_DIR" ] && return 0
  # A copy left by an interrupted run must not lend the new bundle stale files.
  rm -rf "$INSTALL_DIR.kokoa-new"
  mkdir -p "$INSTALL_DIR.kokoa-new"
  chmod 0700 "$INSTALL_DIR.kokoa-new"
  for f in "$src"/*; do
    cp -p "$f" "$INSTALL_DIR.kokoa-new/"
  done
  rm -rf "$INSTALL_DIR.kokoa-old"
  [ -d "$INSTALL_DIR" ] && mv "$INSTALL_DIR" "$INSTALL_DIR.kokoa-old"
  mv "$INSTALL_DIR.kokoa-new" "$INSTALL_DIR"
  rm -rf "$INSTALL_DIR.kokoa-old"
}

# Production hosts have the kernel module; a host without it (containers, this lab) runs
# wireguard-go, which wg-quick only uses when told to.
select_wireguard_implementation() {
  if ip link add dev kokoa-wgprobe type wireguard 2>/dev/null; then
    ip link del dev kokoa-wgprobe
    return 0
  fi
  command -v wireguard-go >/dev/null 2>&1 \
    || die "no WireGuard kernel module and no wireguard-go: install one of them"
  export WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go
  export WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1
  WG_USERSPACE=1
}

# Bring IFACE up, or apply a changed config to the running interface without dropping
# the tunnel: `wg syncconf` adds and removes peers in place.
wireguard_up() {
  local iface=$1
  if has_systemd; then
    if [ "${WG_USERSPACE:-0}" = 1 ]; then
      if printf '[Service]\nEnvironment=WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go\nEnvironment=WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1\n' \
          | write_unit "/etc/systemd/system/wg-quick@$iface.service.d/kokoa-userspace.conf"; then
        systemctl daemon-reload
      fi
    fi
    systemctl enable "wg-quick@$iface" >/dev/null 2>&1
  fi
  if ip link show dev "$iface" >/dev/null 2>&1; then
    wg syncconf "$iface" <(wg-quick strip "$iface")
  elif has_systemd; then
    systemctl start "wg-quick@$iface"
  else
    wg-quick up "$iface"
  fi
}

wireguard_down() {
  local iface=$1
  if has_systemd; then
    systemctl disable --now "wg-quick@$iface" >/dev/null 2>&1 || true
    rm -rf "/etc/systemd/system/wg-quick@$iface.service.d"
  fi
  if ip link show dev "$iface" >/dev/null 2>&1; then
    wg-quick down "$iface" || true
  fi
}

# nginx with CONF (and PIDFILE): validated before it replaces DEST; when the new file does
# not pass `nginx -t` the previous one is put back and the running server keeps serving.
install_nginx_conf() {
  local src=$1 dest=$2
  if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
    return 1
  fi
  [ -f "$dest" ] && cp -p "$dest" "$dest.kokoa-previous"
  install -D -m 0644 "$src" "$dest"
  if ! nginx -t -q -c "$dest"; then
    if [ -f "$dest.kokoa-previous" ]; then
      mv -f "$dest.kokoa-previous" "$dest"
    else
      rm -f "$dest"
    fi
    die "the new $dest does not pass 'nginx -t'; the previous configuration was kept"
  fi
  return 0
}

nginx_running() {
  local pidfile=$1 unit=$2
  if has_systemd; then
    systemctl is-active --quiet "$unit"
  else
    [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
  fi
}

# Start the nginx instance of CONF, or reload it (graceful: open connections finish).
nginx_start_or_reload() {
  local conf=$1 pidfile=$2 unit=$3
  if has_systemd; then
    systemctl enable "$unit" >/dev/null 2>&1
  fi
  if nginx_running "$pidfile" "$unit"; then
    if has_systemd; then systemctl reload "$unit"; else nginx -c "$conf" -s reload 2>/dev/null; fi
  else
    if has_systemd; then systemctl start "$unit"; else nginx -c "$conf"; fi
  fi
}

# Install SRC as the nginx config DEST and apply it: a reload only when it changed.
nginx_apply() {
  local src=$1 dest=$2 pidfile=$3 unit=$4
  if install_nginx_conf "$src" "$dest" || ! nginx_running "$pidfile" "$unit"; then
    nginx_start_or_reload "$dest" "$pidfile" "$unit"
  fi
}

# Run SCRIPT every INTERVAL seconds, the first time one INTERVAL from now (the install
# runs it itself when it must): a systemd timer where systemd runs, else a background loop (one per job, its pid under $RUN_DIR) that the next install replaces.
# ACCURACY (seconds, optional): how late systemd may run it (its default is a minute).
schedule() {
  local job=$1 interval=$2 script=$3 accuracy=${4:-}
  if has_systemd; then
    local changed=0
    printf '[Unit]\nDescription=Kokoa %s\n\n[Service]\nType=oneshot\nExecStart=%s\n' \
      "$job" "$script" | write_unit "/etc/systemd/system/kokoa-$job.service" && changed=1
    printf '[Unit]\nDescription=Kokoa %s every %ss\n\n[Timer]\nOnActiveSec=%s\nOnUnitActiveSec=%s\n%s\n[Install]\nWantedBy=timers.target\n' \
      "$job" "$interval" "$interval" "$interval" "${accuracy:+AccuracySec=${accuracy}s
}" | write_unit "/etc/systemd/system/kokoa-$job.timer" && changed=1
    [ "$changed" = 0 ] || systemctl daemon-reload
    systemctl enable --now "kokoa-$job.timer" >/dev/null 2>&1
    return 0
  fi
  unschedule "$job"
  mkdir -p "$RUN_DIR" "$LOG_DIR"
  # shellcheck disable=SC2016 # expanded by the loop's own shell
  setsid nohup sh -c 'while :; do sleep "$2"; "$1" || true; done' "kokoa-$job" "$script" "$interval" \
    >>"$LOG_DIR/$job.log" 2>&1 </dev/null &
  echo $! > "$RUN_DIR/$job.pid"
}

# Keep COMMAND... running as the unprivileged service JOB, in GROUP besides its own (to read
# logs): a systemd unit with a dynamic user where systemd runs, else a restart loop as
# nobody (its pid under $RUN_DIR) that the next install replaces. RESTART=1 restarts a
# running one (its program changed). At the lowest CPU and I/O priority: on a busy edge nginx
# comes first, and the service catches up from its input when the load drops. Nice alone
# does not do it: a unit is a cgroup of its own (where its CPU weight counts) and, where the
# kernel groups tasks by session (autogroup, Debian's default), a session is a group whose
# own nice value counts against nginx's.
run_service() {
  local job=$1 group=$2 restart=$3 description=$4
  shift 4
  if has_systemd; then
    local changed=$restart
    # shellcheck disable=SC2016 # $MAINPID is systemd's to expand
    printf '%s\n' "[Unit]" "Description=$description" "After=network-online.target nginx.service" \
      "StartLimitIntervalSec=0" "" "[Service]" "ExecStart=$*" "DynamicUser=yes" \
      "SupplementaryGroups=$group" "Restart=always" "RestartSec=3" "NoNewPrivileges=yes" \
      "CPUWeight=1" "Nice=19" "IOSchedulingClass=idle" \
      'ExecStartPost=+/bin/sh -c "echo 19 > /proc/$MAINPID/autogroup || true"' \
      "CapabilityBoundingSet=" "ProtectSystem=strict" "ProtectHome=yes" "PrivateTmp=yes" \
      "PrivateDevices=yes" "ProtectKernelTunables=yes" "ProtectKernelModules=yes" \
      "ProtectControlGroups=yes" "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX" \
      "MemoryMax=256M" "" "[Install]" "WantedBy=multi-user.target" \
      | write_unit "/etc/systemd/system/kokoa-$job.service" && { changed=1; systemctl daemon-reload; }
    systemctl enable "kokoa-$job.service" >/dev/null 2>&1
    if [ "$changed" = 1 ]; then
      systemctl restart "kokoa-$job.service"
    else
      systemctl start "kokoa-$job.service"
    fi
    return 0
  fi
  if [ "$restart" != 1 ] && [ -s "$RUN_DIR/$job.pid" ] && kill -0 "$(cat "$RUN_DIR/$job.pid")" 2>/dev/null; then
    return 0
  fi
  unschedule "$job"
  mkdir -p "$RUN_DIR" "$LOG_DIR"
  # shellcheck disable=SC2016 # expanded by the loop's own shell
  setsid nohup nice -n 19 setpriv --reuid=nobody --regid=nogroup --groups="$group" --inh-caps=-all \
    --bounding-set=-all --no-new-privs \
    sh -c 'echo 19 > /proc/self/autogroup 2>/dev/null; while :; do "$@"; sleep 3; done' "kokoa-$job" "$@" \
    >>"$LOG_DIR/$job.log" 2>&1 </dev/null &
  echo $! > "$RUN_DIR/$job.pid"
}

stop_service() {
  local job=$1
  if has_systemd; then
    systemctl disable --now "kokoa-$job.service" >/dev/null 2>&1 || true
    rm -f "/etc/systemd/system/kokoa-$job.service"
    return 0
  fi
  unschedule "$job"
}

# "ADDRESS PORT" of the SSH connection this script runs under (sudo drops SSH_CONNECTION
# from the environment, so it is read from the nearest ancestor that has it), or nothing.
ssh_connection_of_operator() {
  local pid=$$ found
  while [ -n "$pid" ] && [ "$pid" -gt 1 ]; do
    found=$(tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | sed -n 's/^SSH_CONNECTION=//p' | head -n 1)
    if [ -n "$found" ]; then
      # shellcheck disable=SC2086 # "client-address client-port server-address server-port"
      set -- $found
      printf '%s %s\n' "${1#::ffff:}" "$4"
      return 0
    fi
    pid=$(sed -n 's/^PPid:[[:space:]]*//p' "/proc/$pid/status" 2>/dev/null)
  done
}

FIREWALL=/etc/kokoa/firewall.nft

# Put back the last firewall that was applied, or none.
firewall_restore() {
  if [ -s "$FIREWALL" ]; then
    nft -f "$FIREWALL"
  else
    nft delete table inet kokoa 2>/dev/null || true
  fi
}

# Replace table inet kokoa with FILE in one transaction (`nft -f`). A file that does not
# load changes nothing. If the operator's SSH connection (address and port) would not be
# admitted as a new connection under the new rules, the previous rules come back: a
# deployment never locks its operator out.
firewall_apply() {
  local file=$1 ssh_port=$2 operator address port
  if [ -f "$FIREWALL" ] && cmp -s "$file" "$FIREWALL" && nft list table inet kokoa >/dev/null 2>&1; then
    return 0  # loaded and unchanged: the shield's per-source state stays as it is
  fi
  nft -c -f "$file" >/dev/null || die "the firewall $file does not load (nft -c); the current rules stay"
  nft -f "$file" || die "the firewall $file did not apply; the current rules stay"
  operator=$(ssh_connection_of_operator)
  if [ -n "$operator" ]; then
    address=${operator% *}
    port=${operator#* }
    if [ "$port" != "$ssh_port" ] \
        || ! nft get element inet kokoa ssh_allowed "{ $address }" >/dev/null 2>&1; then
      firewall_restore
      die "this deployment's SSH connection comes from $address to port $port, which the new firewall would not admit (SSH port $ssh_port, kokoa:sshAllowFrom); the previous rules were restored. Add $address or its network to kokoa:sshAllowFrom, or fix sshPort."
    fi
  else
    log "not run over SSH: the firewall admits SSH on port $ssh_port from kokoa:sshAllowFrom only"
  fi
  install_file 0600 "$file" "$FIREWALL" || true
  if has_systemd; then
    # Back before the network comes up at boot; after Debian's nftables.service, whose
    # `flush ruleset` would otherwise remove it.
    if write_unit /etc/systemd/system/kokoa-firewall.service <<'UNIT'; then systemctl daemon-reload; fi
[Unit]
Description=Kokoa host firewall (nftables table inet kokoa)
DefaultDependencies=no
Wants=network-pre.target
Before=network-pre.target shutdown.target
After=local-fs.target nftables.service
Conflicts=shutdown.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/sbin/nft -f /etc/kokoa/firewall.nft

[Install]
WantedBy=multi-user.target
UNIT
    systemctl enable kokoa-firewall.service >/dev/null 2>&1
  fi
}

firewall_remove() {
  if has_systemd; then
    systemctl disable --now kokoa-firewall.service >/dev/null 2>&1 || true
    rm -f /etc/systemd/system/kokoa-firewall.service
    systemctl daemon-reload
  fi
  if command -v nft >/dev/null 2>&1; then
    nft delete table inet kokoa 2>/dev/null || true
  fi
  rm -f "$FIREWALL"
}

unschedule() {
  local job=$1 pid
  if has_systemd; then
    systemctl disable --now "kokoa-$job.timer" >/dev/null 2>&1 || true
    rm -f "/etc/systemd/system/kokoa-$job.timer" "/etc/systemd/system/kokoa-$job.service"
    return 0
  fi
  if [ -s "$RUN_DIR/$job.pid" ]; then
    pid=$(cat "$RUN_DIR/$job.pid")
    # The loop is a session leader (setsid): ending its group also ends a job mid-run.
    kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
    rm -f "$RUN_DIR/$job.pid"
  fi
}
# --- end of shared part ----------------------------------------------------------------
DOMAIN=blog.example.com
TLS_DIR=/etc/letsencrypt/live/blog.example.com
SOURCE=http://10.100.0.1:9080

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for f in fullchain.pem privkey.pem; do
  curl -fsS --connect-timeout 3 --max-time 10 -o "$tmp/$f" "$SOURCE/$f" \
    || die "origin blog has no certificate for $DOMAIN yet ($SOURCE/$f)"
done
[ "$(openssl x509 -noout -pubkey -in "$tmp/fullchain.pem")" = "$(openssl pkey -pubout -in "$tmp/privkey.pem")" ] \
  || die "the certificate and key from the origin do not match"
openssl x509 -noout -checkhost "$DOMAIN" -in "$tmp/fullchain.pem" | grep -q "does match" \
  || die "the certificate from the origin is not for $DOMAIN"
openssl x509 -noout -checkend 0 -in "$tmp/fullchain.pem" >/dev/null \
  || die "the certificate from the origin has expired"

if cmp -s "$tmp/fullchain.pem" "$TLS_DIR/fullchain.pem" && cmp -s "$tmp/privkey.pem" "$TLS_DIR/privkey.pem"; then
  exit 0
fi
for f in fullchain.pem privkey.pem; do
  cp -p "$TLS_DIR/$f" "$TLS_DIR/$f.kokoa-previous"
done
install -m 0644 "$tmp/fullchain.pem" "$TLS_DIR/fullchain.pem"
install -m 0600 "$tmp/privkey.pem" "$TLS_DIR/privkey.pem"
if ! nginx -t -q; then
  for f in fullchain.pem privkey.pem; do
    mv -f "$TLS_DIR/$f.kokoa-previous" "$TLS_DIR/$f"
  done
  die "nginx rejects the new certificate; the previous one stays in use"
fi
nginx_start_or_reload /etc/nginx/nginx.conf /run/nginx.pid nginx
log "serving the certificate of $DOMAIN valid until $(openssl x509 -noout -enddate -in "$TLS_DIR/fullchain.pem" | cut -d= -f2)"
