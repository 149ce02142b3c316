#!/usr/bin/env bash
# Runs the whole stack on a default configuration in ./.run (no root, no systemd):
# keyd with file-backed keys and certd issuing through keyd, each on its own Unix socket.
# Prints where the sockets are and commands to try, then serves until Ctrl-C.
#
# Usage: tools/quickstart.sh [--detach]   (--detach: start in the background and return)
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD/.run"
detach=0; [ "${1:-}" = "--detach" ] && detach=1

cargo build -q -p keyd -p certd
mkdir -p "$root"/{keyd/config.d,certd/config.d,state/keyd,state/certd,sockets,logs}
chmod 0700 "$root/state/keyd" "$root/state/certd"

cat > "$root/keyd/config.toml" <<TOML
[aziot_keys]
homedir_path = "$root/state/keyd"

[endpoints]
aziot_keyd = "unix://$root/sockets/keyd.sock"
TOML

cat > "$root/certd/config.toml" <<TOML
homedir_path = "$root/state/certd"

[cert_issuance.device-ca]
method = "self_signed"
common_name = "Quickstart device CA"

[endpoints]
aziot_certd = "unix://$root/sockets/certd.sock"
aziot_keyd = "unix://$root/sockets/keyd.sock"
TOML

pids=()
stop() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
start() { # name binary
  AZIOT_LOG="${AZIOT_LOG:-info}" "target/debug/$2" --config "$root/$1/config.toml" --config-dir "$root/$1/config.d" \
    >"$root/logs/$1.log" 2>&1 &
  pids+=($!); echo "$!" > "$root/$1.pid"
  for _ in $(seq 300); do
    [ -S "$root/sockets/$1.sock" ] && return 0
    kill -0 "${pids[-1]}" 2>/dev/null || { echo "$1 failed to start:" >&2; cat "$root/logs/$1.log" >&2; stop; exit 1; }
    sleep 0.05
  done
  echo "$1 did not open its socket" >&2; stop; exit 1
}

for name in keyd certd; do
  [ -f "$root/$name.pid" ] && kill "$(cat "$root/$name.pid")" 2>/dev/null || true
done
start keyd keyd
start certd certd

cat <<TEXT
The stack is running (logs in $root/logs):
  keyd   unix://$root/sockets/keyd.sock
  certd  unix://$root/sockets/certd.sock

Try:
  curl -s --unix-socket $root/sockets/keyd.sock -H 'content-type: application/json' \\
    -X POST 'http://keyd/keypair?api-version=2020-09-01' -d '{"keyId":"demo","preferredAlgorithms":"ec-p256"}'
  curl -s --unix-socket $root/sockets/keyd.sock -H 'content-type: application/json' \\
    -X POST 'http://keyd/keystore/key' -d '{"keyid":"demo-hmac"}'
  curl -s --unix-socket $root/sockets/certd.sock -H 'content-type: application/json' \\
    -X POST 'http://certd/certstore/cert' -d '{"certid":"device-ca"}'
TEXT

if [ "$detach" = 1 ]; then
  echo "Detached. Stop with: kill \$(cat $root/*.pid)"
  exit 0
fi
trap 'echo; echo stopping; stop; rm -f "$root"/*.pid' INT TERM
echo "Press Ctrl-C to stop."
wait
