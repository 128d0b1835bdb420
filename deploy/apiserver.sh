#!/usr/bin/env bash
# Builds kube-apiserver and kubectl 1.20.2 from Debian's kubernetes source package, offline,
# into $BARNACLE_K8S (default /var/tmp/barnacle-k8s, outside the clone: about 10 minutes cold,
# nothing to do afterwards), for tests against a real API server (with Debian's etcd-server).
#
# Go 1.23 comes from bookworm-backports; the vendored modern-go/reflect2 (too old for Go 1.18+)
# is swapped for Debian's golang-github-modern-go-reflect2-dev; the OpenAPI file is generated with
# `make gen_openapi`; the binaries are built in GOPATH mode from the vendor tree.
set -euo pipefail
out="${BARNACLE_K8S:-/var/tmp/barnacle-k8s}"
if [ -x "$out/bin/kube-apiserver" ] && [ -x "$out/bin/kubectl" ]; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
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
apt-get install -y -q -t bookworm-backports golang-1.23-go
apt-get install -y -q golang-github-modern-go-reflect2-dev etcd-server dpkg-dev rsync
mkdir -p "$out/src" "$out/bin"
cd "$out/src"
if [ ! -d kubernetes-1.20.2 ]; then
  apt-get source -q --download-only kubernetes
  tar xzf kubernetes_*.orig.tar.gz
fi
cd kubernetes-1.20.2
export PATH="/usr/lib/go-1.23/bin:$PATH" GOFLAGS=-mod=vendor GOTOOLCHAIN=local
rm -rf vendor/github.com/modern-go/reflect2
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
make gen_openapi
export GOPATH="$out/gopath"
mkdir -p "$GOPATH/src/k8s.io"
ln -sfn "$PWD" "$GOPATH/src/k8s.io/kubernetes"
cd "$GOPATH/src/k8s.io/kubernetes"
# The version the binaries report (helm checks a chart's kubeVersion against it).
ldflags=""
for p in k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/component-base/version \
         k8s.io/client-go/pkg/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
  ldflags+=" -X $p.gitVersion=v1.20.2 -X $p.gitMajor=1 -X $p.gitMinor=20 -X $p.gitTreeState=clean"
done
GO111MODULE=off GOFLAGS= go build -ldflags "$ldflags" -o "$out/bin/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
GO111MODULE=off GOFLAGS= go build -ldflags "$ldflags" -o "$out/bin/kubectl" k8s.io/kubernetes/cmd/kubectl
"$out/bin/kube-apiserver" --version
