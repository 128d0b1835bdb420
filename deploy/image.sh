#!/usr/bin/env bash
# Builds Barnacle's container image without Docker or a registry, from what the Dockerfile's
# runtime stage holds: a Debian bookworm rootfs (debootstrap --variant=minbase) with the runtime
# packages ($packages_image in deploy/packages.sh, the very list the Dockerfile installs), the
# release binaries with their debug info stripped in /usr/local/bin, and `barnacle --help` as
# the entrypoint; packed with umoci into an OCI archive that `ctr images import` takes.
#
#   deploy/image.sh OUT.tar      # prints the image's tag (from the binaries' content)
#
# The rootfs layer is cached in $BARNACLE_K8S/images (default /var/tmp/barnacle-k8s/images), keyed
# by the package list; each build adds one layer with the binaries. It builds the release
# binaries first (cargo build --release), as ./barnacle does.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="$(realpath -m "${1:?usage: deploy/image.sh OUT.tar}")"
cache="${BARNACLE_K8S:-/var/tmp/barnacle-k8s}/images"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/barnacle-target}"
# shellcheck source=deploy/packages.sh
. "$repo/deploy/packages.sh"
barnacle_need_packages "building the image" umoci debootstrap binutils rsync
bins=(barnacle barnacle-controller barnacle-node barnacle-nbd-fuse barnacle-engine barnacle-replica)

cargo build --release --locked --workspace --bins --manifest-path "$repo/Cargo.toml" >&2

mkdir -p "$cache"
key=$(printf '%s\n' "$packages_image" "bookworm minbase v1" | sha256sum | cut -c1-12)
base="$cache/base-$key"
if [ ! -d "$base" ]; then
  echo "image.sh: making the Debian rootfs (debootstrap; once, cached in $base)" >&2
  tmp=$(mktemp -d)
  trap 'umount "$tmp/rootfs/proc" 2>/dev/null || true; rm -rf "$tmp"' EXIT
  debootstrap --variant=minbase bookworm "$tmp/rootfs" http://deb.debian.org/debian >&2
  mount -t proc proc "$tmp/rootfs/proc"
  # shellcheck disable=SC2086
  chroot "$tmp/rootfs" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    $packages_image >&2
  chroot "$tmp/rootfs" apt-get clean
  umount "$tmp/rootfs/proc"
  rm -rf "$tmp/rootfs/var/lib/apt/lists/"* "$tmp/rootfs/var/cache/apt/"*.bin "$tmp/rootfs/var/log/"*
  umoci init --layout "$tmp/oci"
  umoci new --image "$tmp/oci:base"
  umoci unpack --image "$tmp/oci:base" "$tmp/bundle" >&2
  rsync -a "$tmp/rootfs/" "$tmp/bundle/rootfs/"
  umoci repack --image "$tmp/oci:base" "$tmp/bundle"
  mv "$tmp/oci" "$base"
  rm -rf "$tmp"
  trap - EXIT
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -a "$base" "$work/oci"
mkdir "$work/bin"
for b in "${bins[@]}"; do
  strip --strip-debug -o "$work/bin/$b" "$CARGO_TARGET_DIR/release/$b"
done
tag=$(cd "$work/bin" && cat "${bins[@]}" | sha256sum | cut -c1-12)
umoci insert --image "$work/oci:base" "$work/bin" /usr/local/bin >&2
umoci config --image "$work/oci:base" --tag "$tag" --architecture amd64 --os linux \
  --config.entrypoint /usr/local/bin/barnacle --config.cmd --help \
  --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
umoci rm --image "$work/oci:base"
umoci gc --layout "$work/oci"
(cd "$work/oci" && tar -cf "$out.tmp" .)
mv "$out.tmp" "$out"
size=$(du -sm "$out" | cut -f1)
echo "image.sh: $out: localhost/barnacle:$tag, ${size} MiB (binaries $(du -sm "$work/bin" | cut -f1) MiB)" >&2
echo "$tag"
