#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, black-box daemon tests (real keyd and certd
# binaries on temporary sockets), SoftHSM2-backed PKCS#11 tests and the cloud emulator tests.
#
# Installs the system packages the build and the tests need when they are missing and we are
# root (tools/install-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

tools/install-deps.sh

cargo test --workspace --locked --no-fail-fast "$@"
