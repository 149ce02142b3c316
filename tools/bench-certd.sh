#!/usr/bin/env bash
# Benchmarks certd issuing and serving certificates, with the real keyd signing.
#
# Starts release builds of keyd and certd on temporary sockets, makes an EC P-256 issuer (key
# preloaded in keyd, certificate preloaded in certd), then drives certd with h2load over HTTP/1.1:
#   1. POST /certificates with a CSR and {issuer: {certId, privateKeyHandle}}, 16 connections,
#      all writing the same cert ID (each request replaces the previous cert);
#   2. the same load spread over 4 cert IDs (4 h2load processes, one ID each, 4 connections each);
#   3. GET /certificates/{certId}, 16 connections.
# Prints certificates issued per second and GETs per second.
#
# Usage: tools/bench-certd.sh [seconds per run, default 10]
# Env: CONNECTIONS (16), AZIOT_LOG for both daemons (default "warn": the per-request INFO line
# is measured separately by setting AZIOT_LOG=info), NO_BUILD=1 to skip `cargo build --release`.
# Needs: h2load (nghttp2-client), curl, openssl.
set -euo pipefail

DURATION="${1:-10}"
CONNECTIONS="${CONNECTIONS:-16}"
LOG_LEVEL="${AZIOT_LOG:-warn}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

for tool in h2load curl openssl; do
    command -v "$tool" >/dev/null || { echo "bench-certd: $tool is required" >&2; exit 1; }
done

if [ "${NO_BUILD:-0}" != 1 ]; then
    (cd "$ROOT" && cargo build --release -p keyd -p certd >&2)
fi
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}/release"

WORK="$(mktemp -d /tmp/bench-certd.XXXXXX)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# The issuer: an EC P-256 CA whose key keyd holds and whose certificate certd serves.
openssl ecparam -name prime256v1 -genkey -noout -out "$WORK/ca.key" 2>/dev/null
openssl pkcs8 -topk8 -nocrypt -in "$WORK/ca.key" -out "$WORK/ca.pk8"
openssl req -new -x509 -key "$WORK/ca.key" -subj "/CN=bench CA" -days 30 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" \
    -out "$WORK/ca.pem" 2>/dev/null

mkdir -p "$WORK/keyd.d" "$WORK/certd.d"
cat > "$WORK/keyd.toml" <<EOF
[aziot_keys]
homedir_path = "$WORK/keyd-home"
[preloaded_keys]
bench-ca = "file://$WORK/ca.pk8"
[endpoints]
aziot_keyd = "unix://$WORK/keyd.sock"
EOF
cat > "$WORK/certd.toml" <<EOF
homedir_path = "$WORK/certd-home"
max_requests = 64
[preloaded_certs]
bench-ca = "file://$WORK/ca.pem"
[endpoints]
aziot_certd = "unix://$WORK/certd.sock"
aziot_keyd = "unix://$WORK/keyd.sock"
EOF

start() { # name binary config config-dir env-prefix
    AZIOT_LOG="$LOG_LEVEL" env "$5_CONFIG=$3" "$5_CONFIG_DIR=$4" "$2" >"$WORK/$1.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 200); do [ -S "$WORK/$1.sock" ] && return; sleep 0.05; done
    echo "bench-certd: $1 did not start:" >&2; cat "$WORK/$1.log" >&2; exit 1
}
start keyd "$TARGET/keyd" "$WORK/keyd.toml" "$WORK/keyd.d" AZIOT_KEYD
start certd "$TARGET/certd" "$WORK/certd.toml" "$WORK/certd.d" AZIOT_CERTD

HANDLE="$(curl -sf --unix-socket "$WORK/keyd.sock" \
    'http://keyd.sock/keypair/bench-ca?api-version=2021-05-01' \
    | sed -n 's/.*"keyHandle":"\([^"]*\)".*/\1/p')"
[ -n "$HANDLE" ] || { echo "bench-certd: no handle from keyd" >&2; exit 1; }

# A leaf CSR with extensions, as edged sends for module server certificates.
openssl ecparam -name prime256v1 -genkey -noout -out "$WORK/leaf.key" 2>/dev/null
openssl req -new -key "$WORK/leaf.key" -subj "/CN=bench module" \
    -addext "subjectAltName=DNS:module.bench" -addext "extendedKeyUsage=serverAuth" \
    -out "$WORK/leaf.csr" 2>/dev/null
CSR_JSON="$(awk '{printf "%s\\n", $0}' "$WORK/leaf.csr")"
body() { # cert ID
    printf '{"certId":"%s","csr":"%s","issuer":{"certId":"bench-ca","privateKeyHandle":"%s"}}' \
        "$1" "$CSR_JSON" "$HANDLE"
}
body "bench/module:0:server" > "$WORK/body.json"

# One request first: fail loudly rather than benchmark errors.
STATUS="$(curl -s -o "$WORK/first.json" -w '%{http_code}' --unix-socket "$WORK/certd.sock" \
    -H 'content-type: application/json' --data-binary "@$WORK/body.json" \
    'http://localhost/certificates?api-version=2020-09-01')"
[ "$STATUS" = 201 ] || { echo "bench-certd: first issuance answered $STATUS: $(cat "$WORK/first.json")" >&2; exit 1; }

summary() { # h2load output file, label
    local rps ok
    rps="$(sed -n 's/^finished in .*, \([0-9.]*\) req\/s.*/\1/p' "$1" | head -1)"
    ok="$(sed -n 's/^status codes: \([0-9]*\) 2xx, \([0-9]*\) 3xx, \([0-9]*\) 4xx, \([0-9]*\) 5xx.*/2xx=\1 4xx=\3 5xx=\4/p' "$1")"
    printf '%-48s %10s req/s   (%s)\n' "$2" "$rps" "$ok"
}

URL='http://localhost/certificates?api-version=2020-09-01'
h2load --h1 -B "unix:$WORK/certd.sock" -c "$CONNECTIONS" -D "$DURATION" -d "$WORK/body.json" \
    -H 'content-type: application/json' "$URL" > "$WORK/issue-one-id.txt"

# The same load over 4 IDs: 4 h2load processes with a quarter of the connections each.
GROUP_PIDS=()
for group in 0 1 2 3; do
    body "bench/module:$group:server" > "$WORK/body-$group.json"
    h2load --h1 -B "unix:$WORK/certd.sock" -c $((CONNECTIONS / 4)) -D "$DURATION" \
        -d "$WORK/body-$group.json" -H 'content-type: application/json' "$URL" \
        > "$WORK/issue-group-$group.txt" &
    GROUP_PIDS+=($!)
done
for pid in "${GROUP_PIDS[@]}"; do wait "$pid"; done
GROUP_RPS="$(sed -n 's/^finished in .*, \([0-9.]*\) req\/s.*/\1/p' "$WORK"/issue-group-*.txt \
    | awk '{ sum += $1 } END { printf "%.2f", sum }')"

h2load --h1 -B "unix:$WORK/certd.sock" -c "$CONNECTIONS" -D "$DURATION" \
    'http://localhost/certificates/bench%2Fmodule%3A0%3Aserver?api-version=2020-09-01' \
    > "$WORK/get.txt"

echo "certd benchmark: EC P-256 issuer, $CONNECTIONS connections, ${DURATION}s per run, AZIOT_LOG=$LOG_LEVEL, $(nproc) CPUs"
summary "$WORK/issue-one-id.txt" "issue (POST /certificates, one cert ID)"
printf '%-48s %10s req/s   (4 h2load x %d connections)\n' "issue (POST /certificates, 4 cert IDs)" "$GROUP_RPS" $((CONNECTIONS / 4))
summary "$WORK/get.txt" "read (GET /certificates/{certId})"
