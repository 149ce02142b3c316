#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages that building and testing need, when they are missing and
# we are root; otherwise names them and fails. `tools/install-deps.sh build` checks only what the
# build needs (tools/quickstart.sh), plus busybox-static for the quickstart's agent image.
#   build:  gcc, make and perl (the openssl crate builds OpenSSL from source and links it
#           statically, see docs/install.md), libtss2-dev and pkg-config (keyd links Debian's
#           TPM Software Stack through tss-esapi, found with pkg-config)
#   tests:  softhsm2 (a real PKCS#11 token), opensc (pkcs11-tool), openssl (the CLI that
#           verifies issued certificates and runs s_server/s_client with keyd.so), binutils (nm),
#           python3 (the other-uid client), python3-venv (edged's process-runtime test installs
#           the azure-iot-device SDK from PyPI into a venv of /usr/bin/python3), curl, and
#           busybox-static (edged's FROM-scratch test image), systemd (systemd-analyze verify,
#           systemd-sysusers and systemd-socket-activate run the units' checks; systemd need not
#           run), util-linux (unshare), mmdebstrap (the device test's Debian image; with
#           tools/build-packages.sh, which needs only dpkg-deb and binutils' strip), swtpm and
#           swtpm-tools (a software TPM the TPM tests start on a temporary state folder) and
#           tpm2-tools (tpm2_readpublic, and the emulator's tests import DPS's key with them)
set -euo pipefail

needed=()
command -v gcc >/dev/null || needed+=(gcc)
command -v make >/dev/null || needed+=(make)
# OpenSSL's Configure needs perl's full module set (IPC::Cmd), not just perl-base.
perl -MIPC::Cmd -e 1 2>/dev/null || needed+=(perl)
[ -x /bin/busybox ] || needed+=(busybox-static)
command -v pkg-config >/dev/null || needed+=(pkg-config)
pkg-config --exists tss2-esys tss2-tctildr 2>/dev/null || needed+=(libtss2-dev)
if [ "${1:-all}" != build ]; then
  [ -e /usr/lib/softhsm/libsofthsm2.so ] || needed+=(softhsm2)
  command -v pkcs11-tool >/dev/null || needed+=(opensc)
  command -v openssl >/dev/null || needed+=(openssl)
  # nm checks that the OpenSSL provider (keyd.so) carries no OpenSSL symbols.
  command -v nm >/dev/null || needed+=(binutils)
  command -v python3 >/dev/null || needed+=(python3)
  /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || needed+=(python3-venv)
  command -v curl >/dev/null || needed+=(curl)
  { command -v systemd-socket-activate && command -v systemd-analyze; } >/dev/null || needed+=(systemd)
  command -v unshare >/dev/null || needed+=(util-linux)
  command -v mmdebstrap >/dev/null || needed+=(mmdebstrap)
  command -v swtpm >/dev/null || needed+=(swtpm)
  command -v swtpm_setup >/dev/null || needed+=(swtpm-tools)
  command -v tpm2_import >/dev/null || needed+=(tpm2-tools)
fi
[ ${#needed[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ]; then
  echo "installing ${needed[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${needed[@]}" >/dev/null
else
  echo "missing packages: ${needed[*]} (run as root, or: sudo apt-get install ${needed[*]})" >&2
  exit 1
fi
