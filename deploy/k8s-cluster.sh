#!/usr/bin/env bash
# A real Kubernetes 1.20.2 cluster on this one machine, from the binaries deploy/k8s-build.sh
# made: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kube-proxy, and
# $BARNACLE_K8S_NODES nodes (default 3), each a real kubelet running real containers through its
# own containerd + runc, with the bridge CNI plugin.
#
#   deploy/k8s-cluster.sh start            # returns when every node is Ready
#   deploy/k8s-cluster.sh stop             # deletes every workload pod first, then undoes all
#   deploy/k8s-cluster.sh status
#   deploy/k8s-cluster.sh import FILE.tar NAME    # an OCI archive as localhost/NAME:<tag>, on every node
#   deploy/k8s-cluster.sh kubectl ARGS...  # kubectl as the cluster's administrator
#
# Isolation, so nothing of the host changes but for what `stop` undoes:
# - Network: everything runs in the network namespace "bk8s" (nsenter --net): node N has the
#   address 10.201.0.N on that namespace's loopback, its pods 10.244.N.0/24 on a bridge of its
#   own; nothing is added to the host's interfaces. The tests join the namespace to reach it.
# - Nodes: each node is a PID and mount namespace of its own (unshare), like a machine: its
#   PID 1 is a small init that starts its containerd and kubelet; its /var/lib/kubelet (shared,
#   for Bidirectional mount propagation), /var/lib/barnacle (private, as on a host without
#   systemd) and /var/log/pods are bind mounts of directories under $BARNACLE_K8S/cluster/nodes/N;
#   its pods' cgroups are under /bk8s-N. Killing a node's init kills the whole node.
# - Machine-wide settings the kubelet changes (vm.overcommit_memory, kernel.panic*) are saved
#   and restored.
#
# This machine's quirks (../shared/k8s-real/NOTES.md in the team's notes): root lacks
# CAP_SYS_RESOURCE, so containerd must not lower oom_score_adj (restrict_oom_score_adj) and no
# container can be granted that capability; / is a private mount; kubelets before 1.26 send the
# socket path as a CSI socket's :authority.
set -euo pipefail
K="${BARNACLE_K8S:-/var/tmp/barnacle-k8s}"
B="$K/bin"
C="$K/cluster"
N="${BARNACLE_K8S_NODES:-3}"
NETNS=bk8s
CP_IP=10.201.0.1
PORT=6443
L="$C/logs"
P="$C/run"
RUN=/run/bk8s
export KUBECONFIG="$C/admin.kubeconfig"
node_name() { echo "node$1"; }
node_ip() { echo "10.201.0.$((10 + $1))"; }
in_ns() { nsenter --net="/run/netns/$NETNS" -- "$@"; }
kc() { in_ns "$B/kubectl" --request-timeout=15s "$@"; }
alive() { [ -f "$P/$1.pid" ] && kill -0 "$(cat "$P/$1.pid")" 2>/dev/null; }

start_proc() { # name cmd...: a control-plane process, in the cluster's network namespace
  local n=$1
  shift
  alive "$n" && return 0
  nohup nsenter --net="/run/netns/$NETNS" -- "$@" >"$L/$n.log" 2>&1 &
  echo $! >"$P/$n.pid"
}

stop_proc() {
  if alive "$1"; then
    kill "$(cat "$P/$1.pid")" 2>/dev/null || true
    for _ in $(seq 60); do alive "$1" || break; sleep 0.25; done
    alive "$1" && kill -9 "$(cat "$P/$1.pid")" 2>/dev/null || true
  fi
  rm -f "$P/$1.pid"
}

wait_for() { # what seconds cmd...
  local what=$1 secs=$2
  shift 2
  for _ in $(seq $((secs * 2))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  echo "k8s-cluster: $what not ready after ${secs}s; logs in $L" >&2
  return 1
}

pki() {
  mkdir -p "$C/pki"
  (
    cd "$C/pki"
    [ -f ca.key ] || { openssl genrsa -out ca.key 2048 2>/dev/null; openssl req -x509 -new -key ca.key -days 3650 -subj /CN=barnacle-k8s-ca -out ca.crt; }
    if [ ! -f apiserver.crt ]; then
      openssl genrsa -out apiserver.key 2048 2>/dev/null
      openssl req -new -key apiserver.key -subj /CN=kube-apiserver -out apiserver.csr
      printf 'subjectAltName=IP:127.0.0.1,IP:%s,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\n' "$CP_IP" >san.ext
      openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -extfile san.ext -out apiserver.crt 2>/dev/null
    fi
    [ -f sa.key ] || { openssl genrsa -out sa.key 2048 2>/dev/null; openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null; }
    t() { head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
    if [ ! -f tokens.csv ] || ! grep -q "system:node:$(node_name "$N")," tokens.csv; then
      {
        echo "$(t),admin,uid-admin,\"system:masters\""
        for i in $(seq "$N"); do echo "$(t),system:node:$(node_name "$i"),uid-node$i,\"system:nodes\""; done
        echo "$(t),system:kube-controller-manager,uid-kcm"
        echo "$(t),system:kube-scheduler,uid-sched"
        echo "$(t),system:kube-proxy,uid-proxy"
      } >tokens.csv
      chmod 600 tokens.csv
    fi
  )
  tok() { awk -F, -v u="$1" '$2==u{print $1}' "$C/pki/tokens.csv"; }
  kubeconfig() { # file user token
    cat >"$1" <<KC
apiVersion: v1
kind: Config
clusters: [{name: barnacle-k8s, cluster: {server: "https://$CP_IP:$PORT", certificate-authority: "$C/pki/ca.crt"}}]
users: [{name: $2, user: {token: "$3"}}]
contexts: [{name: barnacle-k8s, context: {cluster: barnacle-k8s, user: $2}}]
current-context: barnacle-k8s
KC
    chmod 600 "$1"
  }
  kubeconfig "$C/admin.kubeconfig" admin "$(tok admin)"
  kubeconfig "$C/controller-manager.kubeconfig" system:kube-controller-manager "$(tok system:kube-controller-manager)"
  kubeconfig "$C/scheduler.kubeconfig" system:kube-scheduler "$(tok system:kube-scheduler)"
  kubeconfig "$C/kube-proxy.kubeconfig" system:kube-proxy "$(tok system:kube-proxy)"
  for i in $(seq "$N"); do
    mkdir -p "$C/nodes/$i"
    kubeconfig "$C/nodes/$i/kubelet.kubeconfig" "system:node:$(node_name "$i")" "$(tok "system:node:$(node_name "$i")")"
  done
}

node_configs() { # i
  local i=$1 d="$C/nodes/$1"
  mkdir -p "$d/cni/net.d" "$d/kubelet" "$d/barnacle" "$d/log-pods" "$d/log-containers" "$d/plugins"
  cat >"$d/containerd.toml" <<EOF
version = 2
root = "$d/containerd"
state = "$RUN/$i/containerd"
[grpc]
  address = "$RUN/$i/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/pause:3.2"
  # Root here lacks CAP_SYS_RESOURCE: lowering a sandbox's oom_score_adj would fail in runc.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "/usr/sbin/runc"
        Root = "$RUN/$i/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$d/cni/net.d"
EOF
  cat >"$d/cni/net.d/10-bk8s.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "bk8s",
  "plugins": [
    {"type": "bridge", "bridge": "bk8s$i", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.$i.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}],
              "dataDir": "$d/cni/ipam"}}
  ]
}
EOF
  cat >"$d/kubelet-config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $(node_ip "$i")
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $((10248 + 100 * i))
cgroupDriver: cgroupfs
cgroupRoot: /bk8s-$i
failSwapOn: false
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization:
  mode: AlwaysAllow
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
volumePluginDir: $d/plugins
serializeImagePulls: false
imageGCHighThresholdPercent: 99
imageGCLowThresholdPercent: 98
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "1%"
  nodefs.inodesFree: "1%"
  imagefs.available: "1%"
EOF
  # The node's init (its PID 1): the node's mounts, then its containerd and kubelet; it stops
  # them on SIGTERM. Its mount namespace is a slave of the host's: nothing it mounts leaks out.
  cat >"$d/init.sh" <<EOF
#!/bin/sh
set -e
mount --bind "$d/kubelet" /var/lib/kubelet
mount --make-rshared /var/lib/kubelet
mount --bind "$d/barnacle" /var/lib/barnacle
mount --make-private /var/lib/barnacle
mount --bind "$d/log-pods" /var/log/pods
mount --bind "$d/log-containers" /var/log/containers
mkdir -p "$RUN/$i"
containerd --config "$d/containerd.toml" >"$L/node$i-containerd.log" 2>&1 &
cpid=\$!
for _ in \$(seq 60); do [ -S "$RUN/$i/containerd.sock" ] && break; sleep 0.5; done
"$B/kubelet" --config="$d/kubelet-config.yaml" --kubeconfig="$d/kubelet.kubeconfig" \\
  --root-dir=/var/lib/kubelet --hostname-override=$(node_name "$i") --node-ip=$(node_ip "$i") \\
  --container-runtime=remote --container-runtime-endpoint=unix://$RUN/$i/containerd.sock \\
  --pod-infra-container-image=localhost/pause:3.2 --v=2 >"$L/node$i-kubelet.log" 2>&1 &
kpid=\$!
trap 'kill \$kpid; wait \$kpid; kill \$cpid; wait \$cpid; exit 0' TERM INT
wait
EOF
  chmod +x "$d/init.sh"
}

# The sandbox image, from the pause.c of the Kubernetes source deploy/k8s-build.sh unpacked,
# and a busybox image for workloads (Debian's busybox-static), as OCI archives (umoci).
base_images() {
  local dir="$K/images"
  [ -f "$dir/pause-3.2.oci.tar" ] && [ -f "$dir/busybox-1.35.oci.tar" ] && return 0
  mkdir -p "$dir"
  local work src="$K/src/kubernetes-1.20.5+really1.20.2"
  work=$(mktemp -d)
  gcc -Os -Wall -static -DVERSION=v3.4.1-debian -o "$work/pause" "$src/build/pause/linux/pause.c"
  mk() { # name tag populate-fn
    umoci init --layout "$work/oci-$1"
    umoci new --image "$work/oci-$1:$2"
    umoci unpack --image "$work/oci-$1:$2" "$work/bundle-$1" >/dev/null
    "$3" "$work/bundle-$1/rootfs"
    umoci repack --image "$work/oci-$1:$2" "$work/bundle-$1"
  }
  pause_fs() { install -m755 "$work/pause" "$1/pause"; }
  busybox_fs() {
    mkdir -p "$1"/bin "$1"/sbin "$1"/usr/bin "$1"/usr/sbin "$1"/tmp "$1"/etc "$1"/root "$1"/proc "$1"/sys "$1"/dev "$1"/var
    chmod 1777 "$1/tmp"
    install -m755 /bin/busybox "$1/bin/busybox"
    for a in $(/bin/busybox --list-full); do [ -e "$1/$a" ] || ln -s /bin/busybox "$1/$a"; done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$1/etc/passwd"
    printf 'root:x:0:\nnobody:x:65534:\n' >"$1/etc/group"
  }
  mk pause 3.2 pause_fs
  umoci config --image "$work/oci-pause:3.2" --config.entrypoint /pause --config.user 65535:65535 --architecture amd64 --os linux
  mk busybox 1.35 busybox_fs
  umoci config --image "$work/oci-busybox:1.35" --config.cmd /bin/sh --config.env PATH=/usr/sbin:/usr/bin:/sbin:/bin --architecture amd64 --os linux
  for n in pause busybox; do umoci gc --layout "$work/oci-$n"; done
  (cd "$work/oci-pause" && tar -cf "$dir/pause-3.2.oci.tar.tmp" .) && mv "$dir/pause-3.2.oci.tar.tmp" "$dir/pause-3.2.oci.tar"
  (cd "$work/oci-busybox" && tar -cf "$dir/busybox-1.35.oci.tar.tmp" .) && mv "$dir/busybox-1.35.oci.tar.tmp" "$dir/busybox-1.35.oci.tar"
  rm -rf "$work"
}

ctr_() { local i=$1; shift; ctr --address "$RUN/$i/containerd.sock" -n k8s.io "$@"; }

import() { # file name
  for i in $(seq "$N"); do ctr_ "$i" images import --base-name "localhost/$2" "$1" >/dev/null; done
}

# The host PID of node i's init (PID 1 of its namespace).
node_init_pid() {
  alive "node$1" || return 1
  cat "/proc/$(cat "$P/node$1.pid")/task/$(cat "$P/node$1.pid")/children" 2>/dev/null | awk '{print $1}'
}

start_node() { # i
  local i=$1
  alive "node$i" && return 0
  for c in /sys/fs/cgroup/*/; do
    case $c in */unified/) continue ;; esac
    mkdir -p "${c}bk8s-$i"
  done
  nohup unshare --pid --fork --mount --propagation slave --mount-proc \
    nsenter --net="/run/netns/$NETNS" -- "$C/nodes/$i/init.sh" >"$L/node$i.log" 2>&1 &
  echo $! >"$P/node$i.pid"
}

start() {
  for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
    [ -x "$B/$b" ] || { echo "k8s-cluster: $B/$b is missing: run deploy/k8s-build.sh" >&2; exit 1; }
  done
  mkdir -p "$L" "$P" "$RUN"
  pki
  for i in $(seq "$N"); do node_configs "$i"; done
  base_images
  # Mount points the nodes' namespaces bind their own directories onto.
  mkdir -p /var/lib/kubelet /var/lib/barnacle /var/log/pods /var/log/containers
  [ -e "/run/netns/$NETNS" ] || ip netns add "$NETNS"
  in_ns ip link set lo up
  for ip in $CP_IP $(for i in $(seq "$N"); do node_ip "$i"; done); do
    in_ns ip addr show dev lo | grep -q "inet $ip/32" || in_ns ip addr add "$ip/32" dev lo
  done
  in_ns sysctl -qw net.ipv4.ip_forward=1
  # Services' addresses need a route for the namespace's own processes (host-network pods),
  # which kube-proxy's DNAT then sends to their endpoints.
  in_ns ip route show 10.0.0.0/24 | grep -q . || in_ns ip route add 10.0.0.0/24 dev lo
  [ -f "$P/sysctl.orig" ] || for s in vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops \
      kernel.keys.root_maxkeys kernel.keys.root_maxbytes; do echo "$s=$(sysctl -n "$s")"; done >"$P/sysctl.orig"
  start_proc etcd etcd --name barnacle-k8s --data-dir "$C/etcd" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster barnacle-k8s=http://127.0.0.1:2380
  start_proc kube-apiserver "$B/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
    --bind-address="$CP_IP" --advertise-address="$CP_IP" --secure-port=$PORT --insecure-port=0 \
    --tls-cert-file="$C/pki/apiserver.crt" --tls-private-key-file="$C/pki/apiserver.key" \
    --client-ca-file="$C/pki/ca.crt" --token-auth-file="$C/pki/tokens.csv" \
    --authorization-mode=Node,RBAC --allow-privileged=true \
    --service-account-issuer=https://kubernetes.default.svc --service-account-key-file="$C/pki/sa.pub" \
    --service-account-signing-key-file="$C/pki/sa.key" --service-cluster-ip-range=10.0.0.0/24 \
    --enable-admission-plugins=NodeRestriction --kubelet-preferred-address-types=InternalIP
  for i in $(seq "$N"); do start_node "$i"; done
  wait_for kube-apiserver 180 kc get --raw /readyz
  start_proc kube-controller-manager "$B/kube-controller-manager" --kubeconfig="$C/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$C/controller-manager.kubeconfig" --authorization-kubeconfig="$C/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port=10257 --port=0 --leader-elect=false --use-service-account-credentials=true \
    --service-account-private-key-file="$C/pki/sa.key" --root-ca-file="$C/pki/ca.crt" \
    --cluster-signing-cert-file="$C/pki/ca.crt" --cluster-signing-key-file="$C/pki/ca.key"
  start_proc kube-scheduler "$B/kube-scheduler" --kubeconfig="$C/scheduler.kubeconfig" \
    --authentication-kubeconfig="$C/scheduler.kubeconfig" --authorization-kubeconfig="$C/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port=10259 --port=0 --leader-elect=false
  start_proc kube-proxy "$B/kube-proxy" --kubeconfig="$C/kube-proxy.kubeconfig" --hostname-override="$(node_name 1)" \
    --bind-address="$(node_ip 1)" --cluster-cidr=10.244.0.0/16 --proxy-mode=iptables --conntrack-max-per-core=0 \
    --metrics-bind-address=127.0.0.1:10249 --healthz-bind-address=127.0.0.1:10256
  for i in $(seq "$N"); do
    wait_for "node$i's containerd" 60 test -S "$RUN/$i/containerd.sock"
    ctr_ "$i" images ls -q | grep -q '^localhost/pause:3.2$' || ctr_ "$i" images import --base-name localhost/pause "$K/images/pause-3.2.oci.tar" >/dev/null
    ctr_ "$i" images ls -q | grep -q '^localhost/busybox:1.35$' || ctr_ "$i" images import --base-name localhost/busybox "$K/images/busybox-1.35.oci.tar" >/dev/null
  done
  ready() { [ "$(kc get nodes -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -cx True)" = "$N" ]; }
  wait_for "$N Ready nodes" 240 ready
  # Pods' service-account tokens come from the token controller.
  wait_for "the default service account" 60 kc -n default get serviceaccount default
  kc get nodes -o wide
}

stop() {
  if alive kube-apiserver; then
    # Workloads first, while the storage they use still runs (DaemonSets' pods, such as CSI
    # node plugins, and pods a storage controller owns through its own resources), so the
    # kubelets unpublish and unstage their volumes; then the rest.
    kc delete deploy,sts,rs,jobs --all --all-namespaces --wait=false >/dev/null 2>&1 || true
    workloads() {
      kc get pods -A -o jsonpath='{range .items[*]}{.metadata.namespace} {.metadata.name} {.metadata.ownerReferences[0].kind}{"\n"}{end}' 2>/dev/null \
        | awk '$1 != "kube-system" && $3 != "DaemonSet" && $3 != "Volume" {print $1, $2}'
    }
    workloads | while read -r ns pod; do kc -n "$ns" delete pod "$pod" --wait=false >/dev/null 2>&1 || true; done
    for _ in $(seq 120); do [ -z "$(workloads)" ] && break; sleep 1; done
    kc delete ds --all --all-namespaces --wait=false >/dev/null 2>&1 || true
    for ns in $(kc get ns -o jsonpath='{.items[*].metadata.name}' 2>/dev/null); do
      [ "$ns" = kube-system ] || kc -n "$ns" delete pods --all --wait=false >/dev/null 2>&1 || true
    done
    for _ in $(seq 120); do [ -z "$(kc get pods -A -o name 2>/dev/null)" ] && break; sleep 1; done
    kc get pods -A --no-headers 2>/dev/null | sed 's/^/k8s-cluster: still there: /' >&2 || true
  fi
  if alive kube-proxy; then
    stop_proc kube-proxy
    in_ns "$B/kube-proxy" --cleanup >/dev/null 2>&1 || true
  fi
  for i in $(seq "$N"); do
    if [ -S "$RUN/$i/containerd.sock" ]; then
      for t in $(ctr_ "$i" t ls -q 2>/dev/null); do ctr_ "$i" t kill -s KILL "$t" >/dev/null 2>&1 || true; done
    fi
    local init
    init=$(node_init_pid "$i" || true)
    [ -n "$init" ] && kill "$init" 2>/dev/null || true
  done
  for i in $(seq "$N"); do stop_proc "node$i"; done
  for n in kube-scheduler kube-controller-manager kube-apiserver etcd; do stop_proc "$n"; done
  # Loop devices a node plugin left over its FUSE files: their mount namespace died with the
  # node, so the kernel names the backing file from the FUSE filesystem's root ("/disk").
  losetup -n -O NAME,BACK-FILE 2>/dev/null | while read -r dev file; do
    [ "$file" = /disk ] && losetup -d "$dev" 2>/dev/null && echo "k8s-cluster: detached $dev, left by a node plugin" >&2
  done || true
  for n in $(ls /run/netns 2>/dev/null | grep '^cni-' || true); do ip netns del "$n" 2>/dev/null || true; done
  ip netns del "$NETNS" 2>/dev/null || true
  if [ -f "$P/sysctl.orig" ]; then
    while IFS= read -r l; do sysctl -qw "$l" >/dev/null 2>&1 || true; done <"$P/sysctl.orig"
    rm -f "$P/sysctl.orig"
  fi
  for c in /sys/fs/cgroup/*/; do
    for i in $(seq "$N"); do
      [ -d "${c}bk8s-$i" ] && find "${c}bk8s-$i" -depth -type d -exec rmdir {} + 2>/dev/null || true
    done
  done
  rm -rf "$RUN" /var/lib/cni
  rmdir /var/lib/kubelet /var/lib/barnacle /var/log/pods /var/log/containers 2>/dev/null || true
  # The cluster's state goes with it: a new start is a new cluster (images stay).
  rm -rf "$C/etcd"
  for i in $(seq "$N"); do rm -rf "$C/nodes/$i/kubelet" "$C/nodes/$i/barnacle" "$C/nodes/$i/cni/ipam"; done
  return 0
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status)
    for n in etcd kube-apiserver kube-controller-manager kube-scheduler kube-proxy $(for i in $(seq "$N"); do echo "node$i"; done); do
      if alive "$n"; then echo "$n running"; else echo "$n stopped"; fi
    done ;;
  import) import "${2:?FILE.tar}" "${3:?NAME}" ;;
  node-pid) node_init_pid "${2:?NODE NUMBER}" ;;
  kubectl) shift; kc "$@" ;;
  *) echo "usage: $0 start|stop|status|import FILE.tar NAME|node-pid I|kubectl ARGS..." >&2; exit 2 ;;
esac
