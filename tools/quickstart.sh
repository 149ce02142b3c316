#!/usr/bin/env bash
# Runs the whole stack on a default configuration in ./.run, without root and without systemd:
#   - the cloud emulator (DPS + IoT Hub on loopback HTTPS) with an enrollment for this device,
#   - keyd with file-backed keys (the enrollment key preloaded as `device-id`),
#   - certd issuing through keyd,
#   - identityd, which provisions the device through the emulator's DPS,
#   - edged, when a Docker Engine is reachable: it bootstraps an edgeAgent container from a small
#     local image (FROM scratch + Debian's static busybox; nothing is pulled) and serves the
#     management and workload APIs. QUICKSTART_EDGED=0 leaves edged out.
# Prints where the sockets are and commands to try, then serves until Ctrl-C.
#
# Usage: tools/quickstart.sh [--detach] [--no-build] | --stop
#   --detach     start everything in the background and return
#   --stop       stop what a detached run started (daemons, the agent container, its network)
#   --no-build   use already-built binaries (QUICKSTART_BIN_DIR, default target/debug)
# Env:   QUICKSTART_DIR (default ./.run)
set -euo pipefail
cd "$(dirname "$0")/.."
root="${QUICKSTART_DIR:-$PWD/.run}"
bin="${QUICKSTART_BIN_DIR:-$PWD/target/debug}"
detach=0; build=1; stop_only=0
for argument in "$@"; do
  case "$argument" in
    --detach) detach=1 ;;
    --no-build) build=0 ;;
    --stop) stop_only=1 ;;
    *) echo "unknown argument $argument" >&2; exit 2 ;;
  esac
done

agent_image="edge-runtime-quickstart/agent:1"
quickstart_network="edge-runtime-quickstart"

# Stops the daemons of a previous (detached) run and removes the containers edged started
# from the quickstart's agent image, and their network.
stop_previous() {
  for pidfile in "$root"/*.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  done
  if docker info >/dev/null 2>&1; then
    containers="$(docker ps -aq --filter "ancestor=$agent_image" 2>/dev/null || true)"
    [ -n "$containers" ] && docker rm -f $containers >/dev/null 2>&1 || true
    docker network rm "$quickstart_network" >/dev/null 2>&1 || true
  fi
}
if [ "$stop_only" = 1 ]; then
  stop_previous
  echo "stopped"
  exit 0
fi

[ "$build" = 1 ] && tools/install-deps.sh build && cargo build -q -p keyd -p certd -p identityd -p edged -p cloud-emulator

# Stop what a previous run left behind, then start from a clean state.
stop_previous
rm -rf "$root"/{keyd,certd,identityd,edged,state,sockets,logs,emulator,secrets}
mkdir -p "$root"/{keyd/config.d,certd/config.d,identityd/config.d,edged/config.d,state,sockets,logs,emulator,secrets}
chmod 0700 "$root/state" "$root/secrets"
uid="$(id -u)"

pids=()
stop() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; stop_previous; }
fail() { echo "$1" >&2; [ -n "${2:-}" ] && cat "$2" >&2; stop; exit 1; }

# 1. The cloud emulator, with an individual symmetric-key enrollment for this device.
registration_id="quickstart-device"
enrollment_key="$(head -c 32 /dev/urandom | base64)"
cat > "$root/emulator/config.toml" <<TOML
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
ca_cert_path = "$root/emulator/ca.pem"
id_scope = "0ne0000QS01"
assigning_polls = 0

[[individual_enrollment]]
registration_id = "$registration_id"
attestation = { type = "symmetric_key", primary_key = "$enrollment_key" }
TOML
"$bin/cloud-emulator" --config "$root/emulator/config.toml" >"$root/emulator/ready.json" 2>"$root/logs/emulator.log" &
pids+=($!); echo "$!" > "$root/emulator.pid"
for _ in $(seq 200); do [ -s "$root/emulator/ready.json" ] && break; sleep 0.05; done
[ -s "$root/emulator/ready.json" ] || fail "the cloud emulator did not start:" "$root/logs/emulator.log"
field() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p" "$root/emulator/ready.json"; }
dps_endpoint="$(field dps_endpoint)"; id_scope="$(field id_scope)"; hub="$(field hub_hostname)"

# 2. keyd: file keys; the enrollment key is preloaded as device-id (raw bytes, 0600).
echo "$enrollment_key" | base64 -d > "$root/secrets/device-id"
chmod 0600 "$root/secrets/device-id"
cat > "$root/keyd/config.toml" <<TOML
[aziot_keys]
homedir_path = "$root/state/keyd"

[preloaded_keys]
device-id = "file://$root/secrets/device-id"

[endpoints]
aziot_keyd = "unix://$root/sockets/keyd.sock"
TOML

# 3. certd: issues through keyd; one self-signed example cert.
cat > "$root/certd/config.toml" <<TOML
homedir_path = "$root/state/certd"

[cert_issuance.device-ca]
method = "self_signed"
common_name = "Quickstart device CA"

# The quickstart Edge CA, as \`iotedge config apply\` writes it for an edge device.
[cert_issuance.aziot-edged-ca]
method = "self_signed"
expiry_days = 180

[cert_issuance.aziot-edged-ca-temp]
method = "self_signed"
expiry_days = 180

[preloaded_certs]
aziot-edged-trust-bundle = ["aziot-edged-ca"]
aziot-trust-bundle = ["aziot-edged-ca"]

[endpoints]
aziot_certd = "unix://$root/sockets/certd.sock"
aziot_keyd = "unix://$root/sockets/keyd.sock"
TOML

# 4. identityd: DPS with the symmetric key held in keyd.
cat > "$root/identityd/config.toml" <<TOML
hostname = "quickstart"
homedir = "$root/state/identityd"

[provisioning]
source = "dps"
global_endpoint = "$dps_endpoint"
scope_id = "$id_scope"

[provisioning.attestation]
method = "symmetric_key"
registration_id = "$registration_id"
symmetric_key = "device-id"

[endpoints]
aziot_identityd = "unix://$root/sockets/identityd.sock"
aziot_keyd = "unix://$root/sockets/keyd.sock"
aziot_certd = "unix://$root/sockets/certd.sock"
TOML
if [ "$uid" != 0 ]; then
  # Not root: the daemons run as this user, so grant it what the packages would grant the
  # service users, and make it a host process with device and module rights.
  printf '[[principal]]\nuid = %s\nkeys = ["*"]\n' "$uid" > "$root/keyd/config.d/50-quickstart.toml"
  printf '[[principal]]\nuid = %s\ncerts = ["*"]\n' "$uid" > "$root/certd/config.d/50-quickstart.toml"
  # Without an idtype this uid is identityd's daemon principal (as edged is in a real install).
  printf '[[principal]]\nuid = %s\nname = "aziot-edge"\n' "$uid" > "$root/identityd/config.d/50-quickstart.toml"
fi

# 5. edged, if this user can reach a Docker Engine and Debian's static busybox is there for the
#    agent image.
with_edged=0
if [ "${QUICKSTART_EDGED:-1}" = 1 ] && docker info >/dev/null 2>&1 && [ -x /bin/busybox ]; then
  with_edged=1
  context="$root/edged/image"; mkdir -p "$context"
  cp /bin/busybox "$context/busybox"
  printf 'FROM scratch\nCOPY busybox /bin/busybox\nCMD ["/bin/busybox", "sh", "-c", "while true; do /bin/busybox sleep 3600; done"]\n' \
    > "$context/Dockerfile"
  docker build -q -t "$agent_image" "$context" >"$root/logs/agent-image.log" 2>&1 ||
    fail "could not build the local agent image:" "$root/logs/agent-image.log"
  cat > "$root/edged/config.toml" <<TOML
hostname = "quickstart"
homedir = "$root/state/edged"

[agent]
name = "edgeAgent"
type = "docker"
imagePullPolicy = "never"
[agent.config]
image = "$agent_image"

[connect]
workload_uri = "unix://$root/sockets/workload.sock"
management_uri = "unix://$root/sockets/edged.sock"
[listen]
workload_uri = "unix://$root/sockets/workload.sock"
management_uri = "unix://$root/sockets/edged.sock"

[moby_runtime]
uri = "unix:///var/run/docker.sock"
network = "$quickstart_network"

[endpoints]
aziot_keyd_url = "unix://$root/sockets/keyd.sock"
aziot_certd_url = "unix://$root/sockets/certd.sock"
aziot_identityd_url = "unix://$root/sockets/identityd.sock"
TOML
fi
chmod 0600 "$root"/*/config.toml "$root"/*/config.d/*.toml 2>/dev/null || true

start() { # name [env...]
  local name="$1"; shift
  env "$@" AZIOT_LOG="${AZIOT_LOG:-info}" "$bin/$name" --config "$root/$name/config.toml" \
    --config-dir "$root/$name/config.d" >"$root/logs/$name.log" 2>&1 &
  pids+=($!); echo "$!" > "$root/$name.pid"
  for _ in $(seq 300); do
    [ -S "$root/sockets/$name.sock" ] && return 0
    kill -0 "${pids[-1]}" 2>/dev/null || fail "$name failed to start:" "$root/logs/$name.log"
    sleep 0.05
  done
  fail "$name did not open its socket" "$root/logs/$name.log"
}
start keyd
start certd
start identityd SSL_CERT_FILE="$root/emulator/ca.pem"

# Wait for provisioning (identityd answers 503 until DPS has assigned the device).
provisioned=""
for _ in $(seq 200); do
  provisioned="$(curl -sf --unix-socket "$root/sockets/identityd.sock" \
    'http://identityd/identities/provisioning?api-version=2021-12-01' >/dev/null &&
    curl -sf --unix-socket "$root/sockets/identityd.sock" -H 'content-type: application/json' \
    -X POST 'http://identityd/identities/device?api-version=2020-09-01' -d '{"type":"aziot"}' || true)"
  [ -n "$provisioned" ] && break
  sleep 0.1
done
[ -n "$provisioned" ] || fail "identityd did not provision through the emulator:" "$root/logs/identityd.log"

edged_line="  edged           not started (no reachable Docker Engine, or QUICKSTART_EDGED=0)"
edged_try=""
if [ "$with_edged" = 1 ]; then
  start edged
  agent=""
  for _ in $(seq 300); do
    agent="$(curl -sf --unix-socket "$root/sockets/edged.sock" \
      'http://edged/modules?api-version=2020-07-07' | grep -o '"status":"running"' || true)"
    [ -n "$agent" ] && break
    sleep 0.1
  done
  [ -n "$agent" ] || fail "edged did not start the edgeAgent container:" "$root/logs/edged.log"
  edged_line="  edged           unix://$root/sockets/edged.sock (management; edgeAgent running), workload unix://$root/sockets/workload.sock"
  edged_try="  curl -s --unix-socket $root/sockets/edged.sock 'http://edged/modules?api-version=2020-07-07'"
fi

cat <<TEXT
The stack is running (configs and logs in $root):
  cloud emulator  DPS $dps_endpoint  hub $hub (CA: $root/emulator/ca.pem)
  keyd            unix://$root/sockets/keyd.sock
  certd           unix://$root/sockets/certd.sock
  identityd       unix://$root/sockets/identityd.sock  (device provisioned through DPS)
$edged_line

Try:
  curl -s --unix-socket $root/sockets/identityd.sock -H 'content-type: application/json' \\
    -X POST 'http://identityd/identities/device?api-version=2020-09-01' -d '{"type":"aziot"}'
  curl -s --unix-socket $root/sockets/keyd.sock -H 'content-type: application/json' \\
    -X POST 'http://keyd/keypair?api-version=2020-09-01' -d '{"keyId":"demo","preferredAlgorithms":"ec-p256"}'
  curl -s --unix-socket $root/sockets/certd.sock -H 'content-type: application/json' \\
    -X POST 'http://certd/certstore/cert' -d '{"certid":"device-ca"}'
$edged_try
TEXT

if [ "$detach" = 1 ]; then
  echo "Detached. Stop with: tools/quickstart.sh --stop"
  exit 0
fi
trap 'echo; echo stopping; stop' INT TERM
echo "Press Ctrl-C to stop."
wait
