#!/usr/bin/env bash
# Benchmarks identityd's offline start: the cloud is down and a provisioning backup is on disk.
#
# Starts release builds of keyd, certd and the cloud emulator on temporary sockets/ports, imports
# a DPS enrollment key into keyd, provisions identityd once against the emulator (DPS symmetric
# key, individual enrollment, one module principal), waits until the backup (device_info,
# provisioning_digest, prev_state) is written, then stops identityd and the emulator. identityd is
# then started RUNS times from that backup; each run measures the time from exec to the first
# 200 answer of `POST /identities/device` on its socket (the socket is polled every 1 ms), and the
# script prints min / median / max, and identityd's idle memory (RSS, PSS, private anonymous) 3 s
# after provisioning and 3 s after an offline start.
#
# Usage: tools/bench-identityd.sh [runs, default 20]
# Env: AZIOT_LOG for the daemons (default "warn"), NO_BUILD=1 to skip `cargo build --release`.
# Needs: curl, openssl, python3.
set -euo pipefail

RUNS="${1:-20}"
LOG_LEVEL="${AZIOT_LOG:-warn}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

for tool in curl openssl python3; do
    command -v "$tool" >/dev/null || { echo "bench-identityd: $tool is required" >&2; exit 1; }
done

if [ "${NO_BUILD:-0}" != 1 ]; then
    (cd "$ROOT" && cargo build --release --locked -p keyd -p certd -p identityd -p cloud-emulator >&2)
fi
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}/release"

WORK="$(mktemp -d /tmp/bench-identityd.XXXXXX)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

KEY="$(openssl rand -base64 32)"

# The cloud: DPS with one individual enrollment; its hub is on the same listener.
cat > "$WORK/emulator.toml" <<EOF
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
ca_cert_path = "$WORK/emulator-ca.pem"
assigning_polls = 1
retry_after_secs = 1

[[individual_enrollment]]
registration_id = "bench-device"
attestation = { type = "symmetric_key", primary_key = "$KEY" }
EOF
RUST_LOG=warn "$TARGET/cloud-emulator" --config "$WORK/emulator.toml" \
    >"$WORK/emulator.out" 2>"$WORK/emulator.log" &
EMULATOR=$!
PIDS+=("$EMULATOR")
for _ in $(seq 200); do [ -s "$WORK/emulator.out" ] && break; sleep 0.05; done
READY="$(head -1 "$WORK/emulator.out")"
[ -n "$READY" ] || { echo "bench-identityd: the emulator did not start:" >&2; cat "$WORK/emulator.log" >&2; exit 1; }
field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$READY" "$1"; }
DPS_ENDPOINT="$(field dps_endpoint)"
ID_SCOPE="$(field id_scope)"

mkdir -p "$WORK/keyd.d" "$WORK/certd.d" "$WORK/identityd.d"
cat > "$WORK/keyd.toml" <<EOF
[aziot_keys]
homedir_path = "$WORK/keyd-home"
[endpoints]
aziot_keyd = "unix://$WORK/keyd.sock"
EOF
cat > "$WORK/certd.toml" <<EOF
homedir_path = "$WORK/certd-home"
[endpoints]
aziot_certd = "unix://$WORK/certd.sock"
aziot_keyd = "unix://$WORK/keyd.sock"
EOF
cat > "$WORK/identityd.toml" <<EOF
hostname = "bench-host"
homedir = "$WORK/identityd-home"

[provisioning]
source = "dps"
global_endpoint = "$DPS_ENDPOINT"
id_scope = "$ID_SCOPE"

[provisioning.attestation]
method = "symmetric_key"
registration_id = "bench-device"
symmetric_key = "device-id"

[[principal]]
uid = 4321
name = "hostmodule1"
idtype = ["module"]

[endpoints]
aziot_identityd = "unix://$WORK/identityd.sock"
aziot_keyd = "unix://$WORK/keyd.sock"
aziot_certd = "unix://$WORK/certd.sock"
EOF
chmod 0600 "$WORK/identityd.toml"

start() { # name binary config config-dir env-prefix
    AZIOT_LOG="$LOG_LEVEL" env "$5_CONFIG=$3" "$5_CONFIG_DIR=$4" "$2" >"$WORK/$1.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 200); do [ -S "$WORK/$1.sock" ] && return; sleep 0.05; done
    echo "bench-identityd: $1 did not start:" >&2; cat "$WORK/$1.log" >&2; exit 1
}
start keyd "$TARGET/keyd" "$WORK/keyd.toml" "$WORK/keyd.d" AZIOT_KEYD
start certd "$TARGET/certd" "$WORK/certd.toml" "$WORK/certd.d" AZIOT_CERTD

KEY_JSON="$(printf '{"keyId":"device-id","usage":"sign","keyBytes":"%s"}' "$KEY")"
curl -sf -o /dev/null --unix-socket "$WORK/keyd.sock" -H 'content-type: application/json' \
    --data-binary "$KEY_JSON" 'http://keyd.sock/key?api-version=2021-05-01' \
    || { echo "bench-identityd: importing the enrollment key into keyd failed" >&2; exit 1; }

# The identityd runs, timed from exec to the first 200 of POST /identities/device. The first run
# (cloud up) provisions and writes the backup; the others start from it with the cloud down.
cat > "$WORK/timed-start.py" <<'EOF'
import os, socket, statistics, subprocess, sys, time

binary, config, config_dir, sock, log, runs, mode = sys.argv[1:8]
env = dict(os.environ, AZIOT_IDENTITYD_CONFIG=config, AZIOT_IDENTITYD_CONFIG_DIR=config_dir,
           SSL_CERT_FILE=sys.argv[8])
REQUEST = (b"POST /identities/device?api-version=2020-09-01 HTTP/1.1\r\nHost: identityd.sock\r\n"
           b"Content-Type: application/json\r\nContent-Length: 16\r\nConnection: close\r\n\r\n"
           b'{"type":"aziot"}')

def status():
    try:
        connection = socket.socket(socket.AF_UNIX)
        connection.connect(sock)
        connection.sendall(REQUEST)
        data = b""
        while True:
            chunk = connection.recv(65536)
            if not chunk:
                break
            data += chunk
        connection.close()
        return int(data.split(b" ", 2)[1])
    except (OSError, IndexError, ValueError):
        return None

def memory(pid):
    """Idle memory in kB: RSS, PSS (shared pages divided among their users) and private anonymous."""
    fields = {}
    for name in ("status", "smaps_rollup"):
        with open(f"/proc/{pid}/{name}") as source:
            for line in source:
                key, _, value = line.partition(":")
                fields.setdefault(key, value.split()[0] if value.split() else "")
    return f"RSS {fields['VmRSS']} kB (PSS {fields['Pss']}, anon {fields['Anonymous']})"

def timed_start(limit):
    try:
        os.unlink(sock)
    except FileNotFoundError:
        pass
    with open(log, "ab") as out:
        launched = time.monotonic()
        child = subprocess.Popen([binary], env=env, stdout=out, stderr=out)
    while status() != 200:
        if time.monotonic() - launched > limit or child.poll() is not None:
            child.kill()
            sys.exit(f"bench-identityd: no device identity within {limit} s (see {log})")
        time.sleep(0.001)
    elapsed = time.monotonic() - launched
    return child, elapsed

if mode == "provision":
    child, elapsed = timed_start(120)
    # Wait for the first reconciliation to write the backup's last file.
    home = os.path.join(os.path.dirname(config), "identityd-home")
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(home, "prev_state")):
        if time.monotonic() > deadline:
            sys.exit("bench-identityd: prev_state was not written")
        time.sleep(0.05)
    time.sleep(3)
    idle = memory(child.pid)
    child.terminate()
    child.wait()
    print(f"online first start (DPS registration included): {elapsed * 1000:.1f} ms")
    print(f"idle after provisioning and the first reconciliation: {idle}")
else:
    times = []
    for run in range(int(runs)):
        child, elapsed = timed_start(60)
        times.append(elapsed * 1000)
        if run == 0:
            time.sleep(3)
            idle = memory(child.pid)
        child.terminate()
        child.wait()
    print(f"offline start, {runs} runs, exec -> first 200 of POST /identities/device: "
          f"min {min(times):.1f} ms, median {statistics.median(times):.1f} ms, "
          f"max {max(times):.1f} ms")
    print(f"idle after an offline start: {idle}")
EOF
timed() { # mode
    python3 "$WORK/timed-start.py" "$TARGET/identityd" "$WORK/identityd.toml" "$WORK/identityd.d" \
        "$WORK/identityd.sock" "$WORK/identityd.log" "$RUNS" "$1" "$WORK/emulator-ca.pem"
}
AZIOT_LOG="$LOG_LEVEL" timed provision
for file in device_info provisioning_digest prev_state; do
    [ -f "$WORK/identityd-home/$file" ] || { echo "bench-identityd: no backup file $file" >&2; exit 1; }
done

kill "$EMULATOR"
wait "$EMULATOR" 2>/dev/null || true

echo "identityd benchmark: DPS symmetric key, cloud emulator stopped, AZIOT_LOG=$LOG_LEVEL, $(nproc) CPUs"
AZIOT_LOG="$LOG_LEVEL" timed offline
