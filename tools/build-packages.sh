#!/usr/bin/env bash
# Builds the Debian packages: edge-runtime-identity (keyd, certd, identityd, their units and
# the TPM service's socket, the service users and folders; installs in place of
# aziot-identity-service) and edge-runtime-edge
# (edged, the iotedge CLI, edged's units; in place of aziot-edge).
#
#   tools/build-packages.sh [--out DIR] [--binaries DIR] [--version VERSION]
#
#   --out DIR        where the .deb files go (default target/debian)
#   --binaries DIR   package the binaries already in DIR (e.g. target/debug) instead of running
#                    `cargo build --release`; debug binaries are stripped of their debug info
#                    first. The device test uses this on what `cargo test` built.
#   --version V      Debian version (default: the workspace version, e.g. 0.1.0)
#
# Why dpkg-deb and not cargo-deb or dpkg-buildpackage: the packages hold five binaries of one
# workspace plus units, sysusers/tmpfiles snippets and maintainer scripts, which are plain
# files under contrib/debian/ and contrib/systemd/. dpkg-deb (part of dpkg, on every Debian
# machine) builds exactly that tree with nothing to install, and it packages prebuilt binaries
# without a second cargo build, which keeps the device test cheap in CI. cargo-deb would need a
# crates.io install (minutes on a fresh CI machine) and per-crate metadata for a two-package
# split across five crates; dpkg-buildpackage needs debhelper and a debian/ source tree, and
# would rebuild the workspace inside its own rules.
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/debian
binaries=
version=
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --binaries) binaries="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    *) echo "usage: $0 [--out DIR] [--binaries DIR] [--version VERSION]" >&2; exit 2 ;;
  esac
done
if [ -z "$version" ]; then
  version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)"
fi
command -v dpkg-deb >/dev/null || { echo "dpkg-deb is missing (apt-get install dpkg)" >&2; exit 1; }
arch="$(dpkg --print-architecture)"

if [ -z "$binaries" ]; then
  cargo build --release --locked -p keyd -p certd -p identityd -p edged -p iotedge
  binaries=target/release
  strip_debug=0
else
  strip_debug=1
fi
for binary in keyd certd identityd edged iotedge; do
  [ -x "$binaries/$binary" ] || { echo "$binaries/$binary is not built" >&2; exit 1; }
done

mkdir -p "$out"
staging="$(mktemp -d)"
trap 'rm -rf "$staging"' EXIT

# install_binary SOURCE DEST: a release binary as it is, a debug one without its debug info.
install_binary() {
  install -D -m 0755 "$1" "$2"
  if [ "$strip_debug" = 1 ]; then strip --strip-debug "$2"; fi
}

# package NAME: control files from contrib/debian/NAME, then dpkg-deb.
package() {
  local name="$1" root="$staging/$1"
  install -d -m 0755 "$root/DEBIAN" "$root/usr/share/doc/$name"
  for script in postinst prerm postrm; do
    install -m 0755 "contrib/debian/$name/$script" "$root/DEBIAN/$script"
  done
  [ -f "contrib/debian/$name/conffiles" ] && install -m 0644 "contrib/debian/$name/conffiles" "$root/DEBIAN/conffiles"
  install -m 0644 contrib/debian/copyright "$root/usr/share/doc/$name/copyright"
  local size
  size="$(du -sk --exclude=DEBIAN "$root" | cut -f1)"
  sed -e "s/@VERSION@/$version/g" -e "s/@ARCH@/$arch/g" -e "s/@SIZE@/$size/g" \
    "contrib/debian/$name/control" > "$root/DEBIAN/control"
  # Files owned by root whoever builds; gzip -6 is much faster than xz for ~30 MB of binaries.
  dpkg-deb --root-owner-group -Zgzip --build "$root" "$out/${name}_${version}_${arch}.deb" >/dev/null
  echo "$out/${name}_${version}_${arch}.deb"
}

units=contrib/systemd
identity="$staging/edge-runtime-identity"
for binary in keyd certd identityd; do
  install_binary "$binaries/$binary" "$identity/usr/libexec/aziot/$binary"
done
for daemon in keyd certd identityd; do
  install -D -m 0644 "$units/aziot-$daemon.socket" "$identity/usr/lib/systemd/system/aziot-$daemon.socket"
  install -D -m 0644 "$units/aziot-$daemon.service" "$identity/usr/lib/systemd/system/aziot-$daemon.service"
done
# keyd serves the TPM service (the reference's aziot-tpmd API) on its own socket unit.
install -D -m 0644 "$units/aziot-tpmd.socket" "$identity/usr/lib/systemd/system/aziot-tpmd.socket"
install -D -m 0644 "$units/aziot-sysusers.conf" "$identity/usr/lib/sysusers.d/aziot.conf"
install -D -m 0644 "$units/aziot-tmpfiles.conf" "$identity/usr/lib/tmpfiles.d/aziot.conf"
install -D -m 0600 contrib/debian/config.toml.template "$identity/etc/aziot/config.toml.template"
package edge-runtime-identity

edge="$staging/edge-runtime-edge"
install_binary "$binaries/edged" "$edge/usr/libexec/aziot/edged"
install_binary "$binaries/iotedge" "$edge/usr/bin/iotedge"
for unit in aziot-edged.service aziot-edged.mgmt.socket aziot-edged.workload.socket; do
  install -D -m 0644 "$units/$unit" "$edge/usr/lib/systemd/system/$unit"
done
package edge-runtime-edge
