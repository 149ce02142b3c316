#!/usr/bin/env bash
# keyd throughput and memory benchmark over the Unix socket, with h2load (Debian's
# nghttp2-client). Every keyd figure is printed with its limit and keyd's share of it:
# - file keys, HMAC: a bare tokio+hyper server that only parses the JSON
#   (http-common/examples/bare_json_server.rs), same h2load command;
# - file keys, ECDSA: the same bare server with `--ecdsa`, which also signs the digest with an
#   in-memory P-256 key through OpenSSL;
# - SoftHSM2 keys: the token itself, signing through cryptoki on 1 and 16 threads with one
#   session each and no HTTP (pkcs11-sys/examples/token_limit.rs), with the token objects
#   themselves and with the session copies keyd signs with on SoftHSM2.
# Connections (c) and threads match: c=1 is judged against 1 thread, c=16 against 16.
#
# Usage: tools/bench-keyd.sh [seconds per run, default 10]
# Env:   BENCH_HSM=0 skips the SoftHSM2 runs (they need softhsm2; see docs/pkcs11.md).
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${1:-10}"
command -v h2load >/dev/null || { echo "h2load missing: apt-get install nghttp2-client" >&2; exit 1; }
cargo build --release -q -p keyd -p http-common -p pkcs11-sys --bins --examples

work="$(mktemp -d)"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

wait_socket() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kb() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
# Proportional set size (shared pages divided among the processes that map them) and private
# anonymous memory: what the process really adds to the machine, unlike RSS.
pss_kb() { awk '/^Pss:/ {print $2}' "/proc/$1/smaps_rollup"; }
anon_kb() { awk '/^Anonymous:/ {print $2}' "/proc/$1/smaps_rollup"; }
# Prints requests per second of one h2load run.
load() { # socket path body connections
  timeout $((duration + 30)) h2load --h1 -B "unix:$1" -c "$4" -D "$duration" -d "$3" -H 'content-type: application/json' \
    "http://localhost$2" 2>/dev/null | awk '/^finished in/ {gsub(",", "", $4); print int($4)} /^requests:/ {ok=$8} END {if (ok=="0") print "FAILED"}'
}
request() { # socket method path body
  curl -sf --unix-socket "$1" -X "$2" -H 'content-type: application/json' "http://localhost$3" -d "$4"
}

start_keyd() { # name config-extra env...
  local dir="$work/$1"; mkdir -p "$dir/home" "$dir/config.d"
  printf '%s\n[endpoints]\naziot_keyd = "unix://%s/keyd.sock"\n' "$2" "$dir" > "$dir/config.toml"
  sed -i "s|{home}|$dir/home|" "$dir/config.toml"
  env "${@:3}" AZIOT_LOG=warn AZIOT_KEYD_CONFIG="$dir/config.toml" AZIOT_KEYD_CONFIG_DIR="$dir/config.d" \
    target/release/keyd > "$dir/log" 2>&1 &
  pids+=($!); KEYD_PID=$!; wait_socket "$dir/keyd.sock"; KEYD_SOCKET="$dir/keyd.sock"
}

bench_keyd() { # label
  local socket="$KEYD_SOCKET" pid="$KEYD_PID" label="$1"
  sleep 0.5; local idle idle_pss idle_anon; idle=$(rss_kb "$pid"); idle_pss=$(pss_kb "$pid"); idle_anon=$(anon_kb "$pid")
  local key pair
  key=$(request "$socket" POST '/key?api-version=2020-09-01' '{"keyId":"bench-hmac","usage":"sign"}' | sed 's/.*"keyHandle":"\([^"]*\)".*/\1/')
  pair=$(request "$socket" POST '/keypair?api-version=2020-09-01' '{"keyId":"bench-ec","preferredAlgorithms":"ec-p256"}' | sed 's/.*"keyHandle":"\([^"]*\)".*/\1/')
  printf '{"keyHandle":"%s","algorithm":"HMAC-SHA256","parameters":{"message":"aGVsbG8gd29ybGQ="}}' "$key" > "$work/hmac.json"
  printf '{"keyHandle":"%s","algorithm":"ECDSA","parameters":{"digest":"uU0nuZNNPgilLlLX2n2r+sSE7+N6U4DukIj3rOLvzek="}}' "$pair" > "$work/ecdsa.json"
  H1=$(load "$socket" '/sign?api-version=2020-09-01' "$work/hmac.json" 1)
  H16=$(load "$socket" '/sign?api-version=2020-09-01' "$work/hmac.json" 16)
  E1=$(load "$socket" '/sign?api-version=2020-09-01' "$work/ecdsa.json" 1)
  E16=$(load "$socket" '/sign?api-version=2020-09-01' "$work/ecdsa.json" 16)
  printf '%-16s RSS idle %s kB (PSS %s, anon %s), peak under load %s kB\n' \
    "$label" "$idle" "$idle_pss" "$idle_anon" "$(hwm_kb "$pid")"
}

# One line: what, keyd's rate, the limit's rate, the share.
share() { # label keyd limit
  local pct="n/a"
  if [[ "$2" =~ ^[0-9]+$ && "$3" =~ ^[0-9]+$ && "$3" -gt 0 ]]; then pct="$(( $2 * 100 / $3 ))%"; fi
  printf '  %-24s keyd %7s req/s   limit %7s /s   share %s\n' "$1" "$2" "$3" "$pct"
}

# Limits of the file path: the parse-only server (HMAC) and the signing one (ECDSA).
printf '{"keyHandle":"%s","algorithm":"ECDSA","parameters":{"digest":"uU0nuZNNPgilLlLX2n2r+sSE7+N6U4DukIj3rOLvzek="}}' "$(head -c 180 /dev/zero | tr '\0' 'A')" > "$work/bare.json"
"target/release/examples/bare_json_server" "$work/bare.sock" & pids+=($!)
"target/release/examples/bare_json_server" "$work/bare-ecdsa.sock" --ecdsa & pids+=($!)
wait_socket "$work/bare.sock"; wait_socket "$work/bare-ecdsa.sock"
b1=$(load "$work/bare.sock" '/sign?api-version=2020-09-01' "$work/bare.json" 1)
b16=$(load "$work/bare.sock" '/sign?api-version=2020-09-01' "$work/bare.json" 16)
be1=$(load "$work/bare-ecdsa.sock" '/sign?api-version=2020-09-01' "$work/bare.json" 1)
be16=$(load "$work/bare-ecdsa.sock" '/sign?api-version=2020-09-01' "$work/bare.json" 16)

# 16 connections from one uid exceed the default per-uid budget of 10 (the excess would get 503
# and h2load retries forever), so the benchmark raises it.
start_keyd file 'max_requests = 64
[aziot_keys]
homedir_path = "{home}"'
bench_keyd "keyd (files)"
share "HMAC c=1 (bare JSON)" "$H1" "$b1"
share "HMAC c=16 (bare JSON)" "$H16" "$b16"
share "ECDSA c=1 (bare ECDSA)" "$E1" "$be1"
share "ECDSA c=16 (bare ECDSA)" "$E16" "$be16"

if [ "${BENCH_HSM:-1}" = 1 ]; then
  token="$work/softhsm"; mkdir -p "$token/tokens"
  printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\n' "$token" > "$token/softhsm2.conf"
  export SOFTHSM2_CONF="$token/softhsm2.conf"
  softhsm2-util --init-token --free --label bench --so-pin 5678 --pin 1234 >/dev/null
  module=/usr/lib/softhsm/libsofthsm2.so
  limits="$(target/release/examples/token_limit "$module" bench 1234 "$duration" 16)"
  limit() { awk -v m="$1" -v o="$2" -v t="threads=$3" '$1 == m && $2 == o && $3 == t {print $4}' <<<"$limits"; }
  start_keyd hsm 'max_requests = 64
[aziot_keys]
homedir_path = "{home}"
pkcs11_lib_path = "'"$module"'"
pkcs11_base_slot = "pkcs11:token=bench?pin-value=1234"' SOFTHSM2_CONF="$SOFTHSM2_CONF"
  bench_keyd "keyd (SoftHSM2)"
  # "token": the token's own rate with its token objects, the limit a client of those objects
  # gets. "copy": its rate with session copies of them, which keyd signs with on SoftHSM2
  # (SoftHSM2 re-reads a token object's file on every use; docs/pkcs11.md).
  for objects in token copy; do
    share "HMAC c=1 ($objects, 1 thr)" "$H1" "$(limit HMAC-SHA256 $objects 1)"
    share "HMAC c=16 ($objects, 16 thr)" "$H16" "$(limit HMAC-SHA256 $objects 16)"
    share "ECDSA c=1 ($objects, 1 thr)" "$E1" "$(limit ECDSA-P256 $objects 1)"
    share "ECDSA c=16 ($objects, 16 thr)" "$E16" "$(limit ECDSA-P256 $objects 16)"
  done
  # The token's limit uses every CPU for signing alone; through keyd the same CPUs also run the
  # HTTP side (and h2load). If both are CPU-bound, the best any server can do is
  # 1 / (1/bare + 1/copy): printed as the attainable rate on this machine.
  bound() { [[ "$1" =~ ^[0-9]+$ && "$2" =~ ^[0-9]+$ ]] && echo $(( $1 * $2 / ($1 + $2) )) || echo n/a; }
  share "HMAC c=16 (attainable)" "$H16" "$(bound "$b16" "$(limit HMAC-SHA256 copy 16)")"
  share "ECDSA c=16 (attainable)" "$E16" "$(bound "$b16" "$(limit ECDSA-P256 copy 16)")"
fi
