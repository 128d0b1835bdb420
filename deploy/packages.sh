# The one list of Debian packages Barnacle needs, by purpose. Sourced (never run) by ./barnacle,
# ./test.sh, .ci/run, deploy/image.sh and the Dockerfile, so none of them keeps a list of its own.
# Package names are Debian bookworm's (Ubuntu 22.04+ has the same names but librocksdb's).

# To build the binaries: RocksDB is linked from Debian's build (docs/replica.md, "Why system
# RocksDB"), and the rocksdb crate's bindgen needs libclang.
packages_build="librocksdb-dev libclang-dev clang pkg-config"
# What the node plugin runs: mkfs/fsck/resize for ext4 and xfs, blkid/losetup/mount.
packages_node="e2fsprogs xfsprogs util-linux mount fuse3"
# The container image's runtime: the RocksDB library the binaries link, TLS roots, the node tools.
packages_image="librocksdb7.8 ca-certificates $packages_node"
# The test suite: the third-party NBD clients that judge our server (qemu-io, nbdinfo, nbdkit,
# fio), and iproute2 for the network namespaces of the split-brain and Kubernetes tests.
packages_test="qemu-utils libnbd-bin nbdkit fio iproute2 stress-ng"
# The tests' real single-node Kubernetes (deploy/k8s-build.sh, deploy/k8s-cluster.sh): etcd, the
# container runtime and CNI plugins, and images made without a registry (debootstrap + umoci;
# busybox-static for the workloads' image).
packages_k8s="etcd-server containerd runc containernetworking-plugins iptables conntrack socat ethtool
              umoci debootstrap busybox-static openssl"

# barnacle_need_packages WHY PACKAGE...: installs the packages not yet installed, saying which
# and why; as root with apt-get, else explains what to run and fails.
barnacle_need_packages() {
  local why=$1 p missing=()
  shift
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "barnacle: $why needs these Debian packages, not installed here: ${missing[*]}" >&2
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "barnacle: no apt-get on this machine: install their equivalents, then run this again" >&2
    return 1
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "barnacle: not root, so nothing was installed; run:" >&2
    echo "  sudo apt-get update && sudo apt-get install --no-install-recommends ${missing[*]}" >&2
    return 1
  fi
  echo "barnacle: installing them with apt-get" >&2
  # A fresh machine may have no package lists, or stale ones: refresh once, then install.
  DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -o DPkg::Lock::Timeout=300 "${missing[@]}" >&2
}
