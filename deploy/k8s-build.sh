#!/usr/bin/env bash
# Builds a real single-node Kubernetes 1.20.2 from Debian packages only, for the tests (and for
# trying Barnacle by hand, see deploy/k8s-cluster.sh), into $BARNACLE_K8S (default
# /var/tmp/barnacle-k8s, outside the clone so later runs reuse it):
#   bin/kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy: built from
#       Debian's `kubernetes` source package (the upstream tree with vendor/) with Go 1.23 from
#       bookworm-backports, in GOPATH mode, static;
#   bin/kubectl: Debian's kubernetes-client .deb of the same source;
# and installs what runs beside them: etcd, containerd, runc, the CNI plugins, iptables, umoci
# and debootstrap (for images without a registry: deploy/image.sh).
# Cold: about 15 minutes on 2 cores (kubelet alone ~10); afterwards nothing to do.
set -euo pipefail
out="${BARNACLE_K8S:-/var/tmp/barnacle-k8s}"
version=1.20.5+really1.20.2-1.1+deb12u1
components=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)
export DEBIAN_FRONTEND=noninteractive

# shellcheck source=deploy/packages.sh
. "$(dirname "$0")/packages.sh"
barnacle_need_packages "the Kubernetes cluster of the tests" $packages_k8s

have_all=true
for c in "${components[@]}" kubectl; do [ -x "$out/bin/$c" ] || have_all=false; done
$have_all && exit 0

if [ ! -f /etc/apt/sources.list.d/barnacle-k8s.sources ]; then
  cat > /etc/apt/sources.list.d/barnacle-k8s.sources <<'SOURCES'
Types: deb deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  apt-get update -q
fi
apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 -t bookworm-backports golang-1.23-go
apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=300 \
  golang-github-modern-go-reflect2-dev dpkg-dev rsync make

mkdir -p "$out/src" "$out/bin"
src="$out/src/kubernetes-1.20.5+really1.20.2"
export GOROOT=/usr/lib/go-1.23 PATH="/usr/lib/go-1.23/bin:$PATH" GOTOOLCHAIN=local CGO_ENABLED=0
export GOCACHE="$out/gocache"
if [ ! -f "$src/.barnacle-prepared" ]; then
  rm -rf "$src"
  (cd "$out/src" && apt-get source -q "kubernetes=$version")
  # The vendored modern-go/reflect2 predates Go 1.18; Debian's packaged one works.
  rm -rf "$src/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$src/vendor/github.com/modern-go/reflect2"
  rm -f "$src/vendor/github.com/modern-go/reflect2/go.mod"
  (cd "$src" && unset GOPATH && GOFLAGS=-ldflags=-checklinkname=0 nice -n 10 make gen_openapi)
  touch "$src/.barnacle-prepared"
fi
if [ ! -x "$out/bin/kubectl" ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download -q "kubernetes-client=$version" && dpkg -x kubernetes-client_*.deb x)
  cp "$tmp/x/usr/bin/kubectl" "$out/bin/kubectl"
  rm -rf "$tmp"
fi
export GOPATH="$out/gopath" GO111MODULE=off GOFLAGS=
mkdir -p "$GOPATH/src/k8s.io"
ln -sfn "$src" "$GOPATH/src/k8s.io/kubernetes"
cd "$GOPATH/src/k8s.io/kubernetes"
# The version the binaries report (helm checks a chart's kubeVersion against it).
ldflags="-s -w -checklinkname=0"
for p in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
  ldflags+=" -X $p.gitVersion=v1.20.2 -X $p.gitMajor=1 -X $p.gitMinor=20 -X $p.gitTreeState=clean"
done
for c in "${components[@]}"; do
  [ -x "$out/bin/$c" ] && continue
  start=$(date +%s)
  nice -n 10 go build -trimpath -ldflags="$ldflags" -o "$out/bin/$c.tmp" "k8s.io/kubernetes/cmd/$c"
  mv "$out/bin/$c.tmp" "$out/bin/$c"
  echo "built $c in $(( $(date +%s) - start )) s"
done
"$out/bin/kubelet" --version
