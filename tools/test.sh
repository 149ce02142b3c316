#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, black-box daemon tests (real keyd and certd
# binaries on temporary sockets), SoftHSM2-backed PKCS#11 tests and the cloud emulator tests.
#
# Installs the system packages the tests need when they are missing and we are root (softhsm2,
# opensc for pkcs11-tool, python3 for the other-uid client in keyd's tests, curl,
# busybox-static for edged's test image).
set -euo pipefail
cd "$(dirname "$0")/.."

needed=()
[ -e /usr/lib/softhsm/libsofthsm2.so ] || needed+=(softhsm2)
command -v pkcs11-tool >/dev/null || needed+=(opensc)
command -v python3 >/dev/null || needed+=(python3)
command -v curl >/dev/null || needed+=(curl)
command -v pkg-config >/dev/null || needed+=(pkg-config)
[ -e /usr/include/openssl/ssl.h ] || needed+=(libssl-dev)
# edged's Docker tests build a FROM-scratch image around Debian's static busybox.
[ -x /bin/busybox ] || needed+=(busybox-static)
if [ ${#needed[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing ${needed[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${needed[@]}" >/dev/null
  else
    echo "missing packages: ${needed[*]} (run as root, or: sudo apt-get install ${needed[*]})" >&2
    exit 1
  fi
fi

cargo test --workspace --locked --no-fail-fast "$@"
