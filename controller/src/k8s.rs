//! The Kubernetes orchestrator: a volume's replicas and engine run as pods in the controller's
//! namespace, and its token is a Secret.
//!
//! - **Replica pods** (`<volume>-<replica>`) are pinned to their node (`nodeName`) and keep their
//!   store in a directory of the node's disk (a hostPath from the disks ConfigMap). They use the
//!   host network and serve on the node's address at the replica's two ports from the record
//!   ([`crate::orchestrator::Orchestrator::ports`]), so a recreated pod has the address the
//!   membership record holds.
//! - **The engine pod** (`<volume>-g<generation>-engine`) runs on the publishing node and serves
//!   NBD on a 0600 unix socket in the host's run directory, which the node plugin mounts too. It
//!   keeps the membership in the volume's custom resource ([`barnacle_engine::k8s`]) with its
//!   own service account.
//! - **Wipe pods** (`<volume>-<replica>-wipe`) remove a replica's directory on its node.
//!
//! The nodes (Ready, schedulable, with their zone label and address) and the disks ConfigMap
//! are read every few seconds into a view that placement uses. [`crate::service::Service::reconcile`]
//! recreates pods that are gone or failed.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use barnacle_engine::authority::MembershipAuthority;
use barnacle_engine::k8s::KubeAuthority;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, ResourceRequirements, Secret};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource};
use parking_lot::{Mutex, RwLock};
use tracing::{info, warn};

use crate::crd::Volume;
use crate::error::{ControllerError, Result};
use crate::k8s_store::VOLUME_LABEL;
use crate::orchestrator::{EngineEndpoint, Orchestrator, PodRequests, ReplicaEndpoint};
use crate::placement::{Compute, NodeInfo};
use crate::store::{Attachment, ReplicaPlacement, VolumeRecord};

/// The label of the zone a node is in.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
const REPLICA_LABEL: &str = "barnacle.dev/replica";
const GENERATION_LABEL: &str = "barnacle.dev/generation";
/// Where a pod finds the volume's token (a Secret volume).
const TOKEN_DIR: &str = "/var/run/barnacle";
/// Where a replica or wipe pod sees the node's disk.
const DISK_MOUNT: &str = "/disk";

/// How the controller runs pods.
#[derive(Debug, Clone)]
pub struct KubeConfig {
    /// The namespace of the pods, Secrets and records (the controller's own).
    pub namespace: String,
    /// The image holding barnacle-replica and barnacle-engine.
    pub image: String,
    pub image_pull_policy: String,
    /// The ConfigMap naming each node's disk directory (`default`, or the node's name) and
    /// optionally its capacity (`capacity`, or `capacity.<node>`).
    pub disks_configmap: String,
    /// Host ports for replicas and engines.
    pub ports: RangeInclusive<u16>,
    /// The service account engine pods run as (it may update volumes' status).
    pub engine_service_account: String,
    /// The host directory of engines' NBD sockets, mounted by the node plugin too.
    pub run_dir: String,
    /// Requests and limits of replica and engine pods. Their requests are counted against each
    /// node's allocatable CPU and memory when placing them.
    pub replica_resources: ResourceRequirements,
    pub engine_resources: ResourceRequirements,
    /// Whether replica and engine pods add SYS_RESOURCE (for PR_SET_IO_FLUSHER).
    pub io_flusher_capability: bool,
    /// How long a pod may take to become ready.
    pub ready_timeout: Duration,
    /// Secrets for pulling the image (the chart's `imagePullSecrets`).
    pub image_pull_secrets: Vec<String>,
    /// The priority class of replica and engine pods, if any.
    pub priority_class: Option<String>,
}

/// What the controller knows of the cluster's nodes.
#[derive(Debug, Default)]
struct View {
    nodes: Vec<NodeInfo>,
    /// Node name → its address (InternalIP), for every node, usable or not.
    addresses: HashMap<String, String>,
    /// Nodes that are Ready and schedulable.
    usable: std::collections::HashSet<String>,
    /// Nodes that are Ready (schedulable or cordoned).
    ready: std::collections::HashSet<String>,
    /// Node name → its disk directory.
    disks: HashMap<String, String>,
    default_disk: Option<String>,
    synced: bool,
    error: Option<String>,
}

/// Runs replicas and engines as pods.
pub struct KubeOrchestrator {
    client: Client,
    cfg: KubeConfig,
    pods: Api<Pod>,
    secrets: Api<Secret>,
    volumes: Api<Volume>,
    view: RwLock<View>,
    engines: Mutex<HashMap<String, EngineEndpoint>>,
    rt: tokio::runtime::Handle,
}

impl std::fmt::Debug for KubeOrchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeOrchestrator").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

fn orch(volume_id: &str, e: impl std::fmt::Display) -> ControllerError {
    ControllerError::orchestrator(volume_id, e)
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// A Kubernetes quantity of bytes (`100Gi`, `500G`, `1024`, `1.5Ti`).
pub fn parse_quantity(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        _ => return None,
    };
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Some((n * mult) as u64)
}

/// `ADDR:PORT`, with an IPv6 address in brackets.
pub fn host_port(addr: &str, port: u16) -> String {
    if addr.contains(':') { format!("[{addr}]:{port}") } else { format!("{addr}:{port}") }
}

/// The container security of replicas and engines: with `io_flusher`, the capability they need
/// to mark themselves as IO flushers (PR_SET_IO_FLUSHER, DESIGN rule 12), so memory reclaim under
/// pressure does not wait on their own IO. Without it they run (the flag is best-effort in the
/// binaries) on hosts whose runtime cannot grant the capability.
fn data_plane_security(io_flusher: bool) -> serde_json::Value {
    if io_flusher {
        serde_json::json!({ "allowPrivilegeEscalation": false, "capabilities": { "add": ["SYS_RESOURCE"] } })
    } else {
        serde_json::json!({ "allowPrivilegeEscalation": false })
    }
}

/// A Kubernetes CPU quantity in millicores (`50m`, `0.5`, `2`).
pub fn parse_cpu_milli(s: &str) -> Option<u64> {
    let t = s.trim();
    if let Some(m) = t.strip_suffix('m') {
        return m.parse().ok();
    }
    let cores: f64 = t.parse().ok().filter(|c: &f64| c.is_finite() && *c >= 0.0)?;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Some((cores * 1000.0).ceil() as u64)
}

/// What `r` requests (a limit without a request requests the limit, as Kubernetes defaults it).
pub fn requests_of(r: &ResourceRequirements) -> Compute {
    let get = |k: &str| {
        r.requests.as_ref().and_then(|m| m.get(k)).or_else(|| r.limits.as_ref().and_then(|m| m.get(k)))
    };
    Compute {
        cpu_milli: get("cpu").and_then(|q| parse_cpu_milli(&q.0)).unwrap_or(0),
        memory: get("memory").and_then(|q| parse_quantity(&q.0)).unwrap_or(0),
    }
}

/// Checks that `r` names only cpu and memory, with quantities that parse.
pub fn check_resources(r: &ResourceRequirements) -> std::result::Result<(), String> {
    for (kind, m) in [("requests", &r.requests), ("limits", &r.limits)] {
        for (k, q) in m.iter().flatten() {
            let ok = match k.as_str() {
                "cpu" => parse_cpu_milli(&q.0).is_some(),
                "memory" => parse_quantity(&q.0).is_some(),
                _ => return Err(format!("{kind}.{k}: only cpu and memory are set")),
            };
            if !ok {
                return Err(format!("{kind}.{k}: {:?} is not a quantity", q.0));
            }
        }
    }
    Ok(())
}

/// What the pods on a node request: the sum of their containers, or their largest init
/// container if that is more (as the scheduler counts).
fn pod_requests(p: &Pod) -> Compute {
    let Some(spec) = &p.spec else { return Compute::default() };
    let mut sum = Compute::default();
    for c in &spec.containers {
        sum.add(&c.resources.as_ref().map(requests_of).unwrap_or_default());
    }
    for c in spec.init_containers.iter().flatten() {
        let i = c.resources.as_ref().map(requests_of).unwrap_or_default();
        sum.cpu_milli = sum.cpu_milli.max(i.cpu_milli);
        sum.memory = sum.memory.max(i.memory);
    }
    sum
}

/// Why the pod's container cannot start, when the runtime says it never will as configured: a
/// capability the host cannot grant (SYS_RESOURCE, where root lacks it).
fn cannot_start(p: &Pod) -> Option<String> {
    let statuses = p.status.as_ref()?.container_statuses.as_ref()?;
    statuses.iter().find_map(|c| {
        let w = c.state.as_ref()?.waiting.as_ref()?;
        let m = w.message.as_deref().unwrap_or_default();
        m.contains("apply caps").then(|| {
            format!(
                "the container runtime cannot grant its capabilities ({m}); install the chart with \
                 dataPlane.ioFlusherCapability=false (barnacle-controller --io-flusher-capability=false)"
            )
        })
    })
}

/// A replica or engine pod of the controller of `namespace` (their requests are counted from
/// the records).
fn data_plane_pod(p: &Pod, namespace: &str) -> bool {
    if p.metadata.namespace.as_deref() != Some(namespace) {
        return false;
    }
    let labels = p.metadata.labels.as_ref();
    let get = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
    get("app.kubernetes.io/managed-by") == Some("barnacle-controller")
        && matches!(get(COMPONENT_LABEL), Some("replica" | "engine"))
}

/// Whether the node's kubelet reports it Ready.
fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Whether the node may get new replicas and engines: Ready and schedulable.
fn node_usable(n: &Node) -> bool {
    let cordoned = n.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false);
    node_ready(n) && !cordoned
}

fn node_address(n: &Node) -> Option<String> {
    let addrs = n.status.as_ref()?.addresses.as_ref()?;
    addrs.iter().find(|a| a.type_ == "InternalIP").or_else(|| addrs.first()).map(|a| a.address.clone())
}

/// The pod's Ready condition.
fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_phase(p: &Pod) -> &str {
    p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("Pending")
}

/// A pod that will not serve again: failed, finished, or being deleted.
fn pod_dead(p: &Pod) -> bool {
    matches!(pod_phase(p), "Failed" | "Succeeded") || p.metadata.deletion_timestamp.is_some()
}

impl KubeOrchestrator {
    pub fn new(client: Client, cfg: KubeConfig, rt: tokio::runtime::Handle) -> KubeOrchestrator {
        KubeOrchestrator {
            pods: Api::namespaced(client.clone(), &cfg.namespace),
            secrets: Api::namespaced(client.clone(), &cfg.namespace),
            volumes: Api::namespaced(client.clone(), &cfg.namespace),
            client,
            cfg,
            view: RwLock::new(View::default()),
            engines: Mutex::new(HashMap::new()),
            rt,
        }
    }

    /// Reads the nodes and the disks ConfigMap into the view placement uses.
    pub async fn refresh(&self) -> Result<()> {
        let res = self.read_view().await;
        let mut view = self.view.write();
        match res {
            Ok(v) => *view = v,
            Err(e) => {
                warn!(error = %e, "reading the cluster's nodes failed; keeping the last view");
                view.error = Some(e.to_string());
                return Err(e);
            }
        }
        Ok(())
    }

    async fn read_view(&self) -> Result<View> {
        let err = |e: kube::Error| ControllerError::FailedPrecondition(format!("Kubernetes API: {e}"));
        let nodes = Api::<Node>::all(self.client.clone()).list(&ListParams::default()).await.map_err(err)?;
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.cfg.namespace);
        let data = cms
            .get(&self.cfg.disks_configmap)
            .await
            .map_err(|e| {
                ControllerError::FailedPrecondition(format!(
                    "the disks ConfigMap {}/{}: {e}",
                    self.cfg.namespace, self.cfg.disks_configmap
                ))
            })?
            .data
            .unwrap_or_default();
        // What the pods on each node request, but for this controller's replicas and engines
        // (the records count those, including pods not created yet).
        let running = ListParams::default().fields("status.phase!=Succeeded,status.phase!=Failed");
        let pods = Api::<Pod>::all(self.client.clone()).list(&running).await.map_err(err)?;
        let mut taken: HashMap<String, Compute> = HashMap::new();
        for p in pods.items.iter().filter(|p| !data_plane_pod(p, &self.cfg.namespace)) {
            if let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.as_ref()) {
                taken.entry(node.clone()).or_default().add(&pod_requests(p));
            }
        }
        let default_capacity = data.get("capacity").and_then(|c| parse_quantity(c));
        let mut view = View { default_disk: data.get("default").cloned(), synced: true, ..View::default() };
        for n in &nodes.items {
            let name = n.metadata.name.clone().unwrap_or_default();
            let Some(addr) = node_address(n) else { continue };
            view.addresses.insert(name.clone(), addr);
            if node_ready(n) {
                view.ready.insert(name.clone());
            }
            if !node_usable(n) {
                continue;
            }
            view.usable.insert(name.clone());
            let capacity = data
                .get(&format!("capacity.{name}"))
                .and_then(|c| parse_quantity(c))
                .or(default_capacity)
                .or_else(|| {
                    let alloc = n.status.as_ref()?.allocatable.as_ref()?;
                    parse_quantity(&alloc.get("ephemeral-storage")?.0)
                })
                .unwrap_or(0);
            if let Some(d) = data.get(&name) {
                view.disks.insert(name.clone(), d.clone());
            }
            let alloc = n.status.as_ref().and_then(|s| s.allocatable.as_ref());
            let allocatable = Compute {
                cpu_milli: alloc.and_then(|a| a.get("cpu")).and_then(|q| parse_cpu_milli(&q.0)).unwrap_or(0),
                memory: alloc.and_then(|a| a.get("memory")).and_then(|q| parse_quantity(&q.0)).unwrap_or(0),
            };
            view.nodes.push(NodeInfo {
                name: name.clone(),
                zone: n.metadata.labels.as_ref().and_then(|l| l.get(ZONE_LABEL)).cloned(),
                capacity,
                compute: Some(allocatable.saturating_sub(&taken.get(&name).copied().unwrap_or_default())),
            });
        }
        view.nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(view)
    }

    /// Refreshes the view every `period` until `stop` fires.
    pub async fn refresh_every(self: Arc<Self>, period: Duration, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(period) => {}
            }
            let _ = self.refresh().await;
        }
    }

    fn address(&self, volume_id: &str, node: &str) -> Result<String> {
        self.view
            .read()
            .addresses
            .get(node)
            .cloned()
            .ok_or_else(|| orch(volume_id, format!("node {node} is not known or has no address")))
    }

    fn disk(&self, volume_id: &str, node: &str) -> Result<String> {
        let view = self.view.read();
        view.disks.get(node).or(view.default_disk.as_ref()).cloned().ok_or_else(|| {
            orch(volume_id, format!("the disks ConfigMap names no directory for node {node} and no default"))
        })
    }

    fn token_secret(volume_id: &str) -> String {
        format!("{volume_id}-token")
    }

    fn replica_pod(volume_id: &str, replica: &str) -> String {
        format!("{volume_id}-{replica}")
    }

    fn labels(&self, volume_id: &str, component: &str) -> serde_json::Value {
        serde_json::json!({
            "app.kubernetes.io/name": "barnacle",
            "app.kubernetes.io/managed-by": "barnacle-controller",
            COMPONENT_LABEL: component,
            VOLUME_LABEL: volume_id,
        })
    }

    fn resources(r: &ResourceRequirements) -> serde_json::Value {
        serde_json::to_value(r).unwrap_or_default()
    }

    /// The owner reference to the volume's resource (its pods and Secret go with it).
    async fn owner(&self, volume_id: &str) -> Result<serde_json::Value> {
        let v = self
            .volumes
            .get(volume_id)
            .await
            .map_err(|e| orch(volume_id, format!("reading its resource: {e}")))?;
        Ok(serde_json::json!([{
            "apiVersion": Volume::api_version(&()),
            "kind": Volume::kind(&()),
            "name": volume_id,
            "uid": v.metadata.uid.unwrap_or_default(),
        }]))
    }

    fn token_volume(volume_id: &str) -> serde_json::Value {
        serde_json::json!({
            "name": "token",
            "secret": { "secretName": Self::token_secret(volume_id), "defaultMode": 0o400 }
        })
    }

    fn replica_pod_spec(
        &self,
        volume: &VolumeRecord,
        r: &ReplicaPlacement,
        port: u16,
        create_size: Option<u64>,
        owner: serde_json::Value,
    ) -> Result<Pod> {
        let id = &volume.id;
        let addr = self.address(id, &r.node)?;
        let mut args = vec![
            format!("--dir={DISK_MOUNT}/{id}-{}", r.id),
            format!("--volume-id={id}"),
            format!("--token-file={TOKEN_DIR}/token"),
            format!("--listen={}", host_port(&addr, port)),
            format!("--mgmt-listen={}", host_port(&addr, port + 1)),
        ];
        if let Some(size) = create_size {
            args.push(format!("--size={size}"));
        }
        let mut labels = self.labels(id, "replica");
        labels[REPLICA_LABEL] = r.id.clone().into();
        let pod = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": Self::replica_pod(id, &r.id),
                "namespace": self.cfg.namespace,
                "labels": labels,
                "ownerReferences": owner,
            },
            "spec": {
                "nodeName": r.node,
                "hostNetwork": true,
                "dnsPolicy": "ClusterFirstWithHostNet",
                "restartPolicy": "Always",
                "automountServiceAccountToken": false,
                "terminationGracePeriodSeconds": 10,
                // A replica stays with its data, whatever taints its node gets.
                "tolerations": [{ "operator": "Exists" }],
                "containers": [{
                    "name": "replica",
                    "image": self.cfg.image,
                    "imagePullPolicy": self.cfg.image_pull_policy,
                    "command": ["barnacle-replica"],
                    "args": args,
                    "securityContext": data_plane_security(self.cfg.io_flusher_capability),
                    "ports": [
                        { "name": "data", "containerPort": port, "hostPort": port },
                        { "name": "mgmt", "containerPort": port + 1, "hostPort": port + 1 },
                    ],
                    "readinessProbe": { "tcpSocket": { "port": port + 1 }, "periodSeconds": 2 },
                    "resources": Self::resources(&self.cfg.replica_resources),
                    "volumeMounts": [
                        { "name": "disk", "mountPath": DISK_MOUNT },
                        { "name": "token", "mountPath": TOKEN_DIR, "readOnly": true },
                    ],
                }],
                "volumes": [
                    { "name": "disk", "hostPath": { "path": self.disk(id, &r.node)?, "type": "DirectoryOrCreate" } },
                    Self::token_volume(id),
                ],
            },
        });
        serde_json::from_value(self.finish(pod))
            .map_err(|e| orch(id, format!("building the replica pod: {e}")))
    }

    /// What every pod of the controller's gets: pull secrets, and the priority class for the
    /// data plane (not for wipe pods, which run once).
    fn finish(&self, mut pod: serde_json::Value) -> serde_json::Value {
        let spec = &mut pod["spec"];
        if !self.cfg.image_pull_secrets.is_empty() {
            spec["imagePullSecrets"] =
                self.cfg.image_pull_secrets.iter().map(|n| serde_json::json!({ "name": n })).collect();
        }
        let wipe = spec["restartPolicy"] == "OnFailure";
        if let (Some(pc), false) = (&self.cfg.priority_class, wipe) {
            spec["priorityClassName"] = pc.clone().into();
        }
        pod
    }

    fn engine_pod_name(volume_id: &str, generation: u64) -> String {
        format!("{volume_id}-g{generation}-engine")
    }

    fn nbd_socket(&self, volume_id: &str, generation: u64) -> String {
        format!("{}/{volume_id}.g{generation}.nbd", self.cfg.run_dir)
    }

    fn engine_pod_spec(
        &self,
        volume: &VolumeRecord,
        att: &Attachment,
        port: u16,
        replicas: &[(String, String)],
        owner: serde_json::Value,
    ) -> Result<Pod> {
        let id = &volume.id;
        let addr = self.address(id, &att.node)?;
        let mut args = vec![
            format!("--volume-id={id}"),
            format!("--token-file={TOKEN_DIR}/token"),
            format!("--kube-namespace={}", self.cfg.namespace),
            format!("--generation={}", att.generation),
            format!("--nbd-socket={}", self.nbd_socket(id, att.generation)),
            format!("--min-healthy-replicas={}", volume.params.min_healthy_replicas),
            format!("--mgmt-listen={}", host_port(&addr, port)),
            format!("--metrics-listen={}", host_port(&addr, port + 1)),
        ];
        if att.readonly {
            args.push("--read-only".to_owned());
        }
        if let Some(rate) = volume.params.rebuild_mib_per_sec {
            args.push(format!("--rebuild-mib-per-sec={rate}"));
        }
        for (rid, addr) in replicas {
            args.push(format!("--replica={rid}={addr}"));
        }
        let mut labels = self.labels(id, "engine");
        labels[GENERATION_LABEL] = att.generation.to_string().into();
        let pod = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": Self::engine_pod_name(id, att.generation),
                "namespace": self.cfg.namespace,
                "labels": labels,
                "annotations": { "prometheus.io/scrape": "true", "prometheus.io/port": (port + 1).to_string() },
                "ownerReferences": owner,
            },
            "spec": {
                "nodeName": att.node,
                "hostNetwork": true,
                "dnsPolicy": "ClusterFirstWithHostNet",
                "restartPolicy": "Always",
                "serviceAccountName": self.cfg.engine_service_account,
                "terminationGracePeriodSeconds": 10,
                "tolerations": [{ "operator": "Exists" }],
                "containers": [{
                    "name": "engine",
                    "image": self.cfg.image,
                    "imagePullPolicy": self.cfg.image_pull_policy,
                    "command": ["barnacle-engine"],
                    "args": args,
                    "securityContext": data_plane_security(self.cfg.io_flusher_capability),
                    "ports": [
                        { "name": "mgmt", "containerPort": port, "hostPort": port },
                        { "name": "metrics", "containerPort": port + 1, "hostPort": port + 1 },
                    ],
                    "readinessProbe": { "tcpSocket": { "port": port }, "periodSeconds": 2 },
                    "resources": Self::resources(&self.cfg.engine_resources),
                    "volumeMounts": [
                        { "name": "run", "mountPath": self.cfg.run_dir },
                        { "name": "token", "mountPath": TOKEN_DIR, "readOnly": true },
                    ],
                }],
                "volumes": [
                    { "name": "run", "hostPath": { "path": self.cfg.run_dir, "type": "DirectoryOrCreate" } },
                    Self::token_volume(id),
                ],
            },
        });
        serde_json::from_value(self.finish(pod))
            .map_err(|e| orch(id, format!("building the engine pod: {e}")))
    }

    fn wipe_pod_spec(&self, volume_id: &str, r: &ReplicaPlacement, owner: serde_json::Value) -> Result<Pod> {
        let mut labels = self.labels(volume_id, "wipe");
        labels[REPLICA_LABEL] = r.id.clone().into();
        let pod = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": format!("{}-wipe", Self::replica_pod(volume_id, &r.id)),
                "namespace": self.cfg.namespace,
                "labels": labels,
                "ownerReferences": owner,
            },
            "spec": {
                "nodeName": r.node,
                "restartPolicy": "OnFailure",
                "automountServiceAccountToken": false,
                "tolerations": [{ "operator": "Exists" }],
                "containers": [{
                    "name": "wipe",
                    "image": self.cfg.image,
                    "imagePullPolicy": self.cfg.image_pull_policy,
                    "command": ["rm", "-rf", "--one-file-system", format!("{DISK_MOUNT}/{volume_id}-{}", r.id)],
                    "resources": { "requests": { "cpu": "10m", "memory": "16Mi" }, "limits": { "memory": "64Mi" } },
                    "volumeMounts": [{ "name": "disk", "mountPath": DISK_MOUNT }],
                }],
                "volumes": [
                    { "name": "disk", "hostPath": { "path": self.disk(volume_id, &r.node)?, "type": "DirectoryOrCreate" } },
                ],
            },
        });
        serde_json::from_value(self.finish(pod))
            .map_err(|e| orch(volume_id, format!("building the wipe pod: {e}")))
    }

    /// Creates `pod` unless a live pod of its name exists; a dead one is replaced.
    async fn ensure_pod(&self, volume_id: &str, pod: Pod) -> Result<()> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        for _ in 0..30 {
            match self.pods.get_opt(&name).await.map_err(|e| orch(volume_id, e))? {
                Some(p) if !pod_dead(&p) => return Ok(()),
                Some(p) => {
                    if p.metadata.deletion_timestamp.is_none() {
                        info!(volume_id, pod = %name, phase = pod_phase(&p), "replacing a pod that stopped");
                        self.delete_pod(volume_id, &name, Some(0)).await?;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                None => match self.pods.create(&PostParams::default(), &pod).await {
                    Ok(_) => {
                        info!(volume_id, pod = %name, node = ?pod.spec.as_ref().and_then(|s| s.node_name.as_ref()), "pod created");
                        return Ok(());
                    }
                    Err(e) if is_status(&e, 409) => {}
                    Err(e) => return Err(orch(volume_id, format!("creating pod {name}: {e}"))),
                },
            }
        }
        Err(orch(volume_id, format!("pod {name} is still being deleted")))
    }

    async fn delete_pod(&self, volume_id: &str, name: &str, grace: Option<u32>) -> Result<()> {
        let dp = DeleteParams { grace_period_seconds: grace, ..DeleteParams::background() };
        match self.pods.delete(name, &dp).await {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) => Err(orch(volume_id, format!("deleting pod {name}: {e}"))),
        }
    }

    /// Waits until the pod is Ready (its readiness probe passes); a pod that stops is an error.
    async fn wait_ready(&self, volume_id: &str, name: &str) -> Result<Pod> {
        let deadline = tokio::time::Instant::now() + self.cfg.ready_timeout;
        loop {
            let p = self.pods.get_opt(name).await.map_err(|e| orch(volume_id, e))?;
            match p {
                Some(p) if pod_ready(&p) && !pod_dead(&p) => return Ok(p),
                Some(p) if pod_dead(&p) => {
                    let reason = p.status.as_ref().and_then(|s| s.reason.clone()).unwrap_or_default();
                    return Err(orch(volume_id, format!("pod {name} stopped ({} {reason})", pod_phase(&p))));
                }
                Some(p) if cannot_start(&p).is_some() => {
                    return Err(orch(
                        volume_id,
                        format!("pod {name}: {}", cannot_start(&p).unwrap_or_default()),
                    ));
                }
                None => return Err(orch(volume_id, format!("pod {name} is gone"))),
                Some(_) => {}
            }
            if tokio::time::Instant::now() > deadline {
                return Err(orch(
                    volume_id,
                    format!("pod {name} is not ready after {} s", self.cfg.ready_timeout.as_secs()),
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until no pod of the name exists; false if it outlives `timeout`.
    async fn wait_gone(&self, volume_id: &str, name: &str, timeout: Duration) -> Result<bool> {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.pods.get_opt(name).await.map_err(|e| orch(volume_id, e))?.is_some() {
            if tokio::time::Instant::now() > deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(true)
    }

    fn node_usable(&self, node: &str) -> bool {
        self.view.read().usable.contains(node)
    }

    /// Removes the replica's directory on its node with a wipe pod, and waits for it.
    async fn wipe(&self, volume_id: &str, r: &ReplicaPlacement) -> Result<()> {
        let name = format!("{}-wipe", Self::replica_pod(volume_id, &r.id));
        self.delete_pod(volume_id, &name, Some(0)).await?;
        if !self.wait_gone(volume_id, &name, Duration::from_secs(60)).await? {
            return Err(orch(volume_id, format!("an earlier wipe pod {name} is still there")));
        }
        let pod = self.wipe_pod_spec(volume_id, r, self.owner(volume_id).await?)?;
        self.pods
            .create(&PostParams::default(), &pod)
            .await
            .map_err(|e| orch(volume_id, format!("creating pod {name}: {e}")))?;
        let deadline = tokio::time::Instant::now() + self.cfg.ready_timeout;
        loop {
            let p = self.pods.get_opt(&name).await.map_err(|e| orch(volume_id, e))?;
            if p.as_ref().is_some_and(|p| pod_phase(p) == "Succeeded") {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(orch(volume_id, format!("the wipe of replica {} did not finish", r.id)));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        self.delete_pod(volume_id, &name, Some(0)).await
    }
}

#[async_trait::async_trait]
impl Orchestrator for KubeOrchestrator {
    fn nodes(&self) -> Vec<NodeInfo> {
        self.view.read().nodes.clone()
    }

    fn node_lost(&self, name: &str) -> bool {
        // Gone from the cluster or not Ready; unknown before the first read of the nodes.
        let view = self.view.read();
        view.synced && !view.ready.contains(name)
    }

    fn ports(&self) -> Option<RangeInclusive<u16>> {
        Some(self.cfg.ports.clone())
    }

    fn pod_requests(&self) -> Option<PodRequests> {
        Some(PodRequests {
            replica: requests_of(&self.cfg.replica_resources),
            engine: requests_of(&self.cfg.engine_resources),
        })
    }

    async fn ports_held(&self, node: &str) -> Result<std::collections::BTreeSet<u16>> {
        let lp = ListParams::default()
            .labels("app.kubernetes.io/managed-by=barnacle-controller")
            .fields(&format!("spec.nodeName={node}"));
        let pods = self
            .pods
            .list(&lp)
            .await
            .map_err(|e| ControllerError::Unavailable(format!("listing the pods on node {node}: {e}")))?;
        Ok(pods
            .items
            .iter()
            .filter_map(|p| p.spec.as_ref())
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| p.host_port.and_then(|h| u16::try_from(h).ok()))
            .collect())
    }

    fn check(&self) -> Result<()> {
        let view = self.view.read();
        match (&view.error, view.synced) {
            (Some(e), _) => Err(ControllerError::FailedPrecondition(e.clone())),
            (None, false) => Err(ControllerError::Unavailable("the nodes have not been read yet".into())),
            (None, true) => Ok(()),
        }
    }

    async fn create_token(&self, volume_id: &str) -> Result<String> {
        if let Ok(t) = self.token(volume_id).await {
            return Ok(t);
        }
        let token = crate::orchestrator::new_token();
        let secret = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": Self::token_secret(volume_id),
                "namespace": self.cfg.namespace,
                "labels": self.labels(volume_id, "token"),
                "ownerReferences": self.owner(volume_id).await?,
            },
            "type": "Opaque",
            "stringData": { "token": token },
        });
        let secret: Secret = serde_json::from_value(secret).map_err(|e| orch(volume_id, e))?;
        match self.secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => Ok(token),
            // Another create won: use its token.
            Err(e) if is_status(&e, 409) => self.token(volume_id).await,
            Err(e) => Err(orch(volume_id, format!("creating its token Secret: {e}"))),
        }
    }

    async fn token(&self, volume_id: &str) -> Result<String> {
        let s = self
            .secrets
            .get_opt(&Self::token_secret(volume_id))
            .await
            .map_err(|e| orch(volume_id, format!("reading its token Secret: {e}")))?
            .ok_or_else(|| orch(volume_id, "it has no token Secret"))?;
        let bytes = s
            .data
            .as_ref()
            .and_then(|d| d.get("token"))
            .ok_or_else(|| orch(volume_id, "its token Secret has no token"))?;
        String::from_utf8(bytes.0.clone())
            .map(|t| t.trim().to_owned())
            .map_err(|_| orch(volume_id, "its token is not text"))
    }

    fn authority(&self, volume_id: &str, _create: bool) -> Result<Option<Arc<dyn MembershipAuthority>>> {
        // The record lives in the volume's resource: a deleted volume's reads find none.
        Ok(Some(Arc::new(KubeAuthority::new(
            self.client.clone(),
            &self.cfg.namespace,
            volume_id,
            self.rt.clone(),
        ))))
    }

    async fn ensure_replica(
        &self,
        volume: &VolumeRecord,
        replica: &ReplicaPlacement,
        create_size: Option<u64>,
    ) -> Result<ReplicaEndpoint> {
        let id = &volume.id;
        let port = replica.port.ok_or_else(|| orch(id, format!("replica {} has no port", replica.id)))?;
        let addr = self.address(id, &replica.node)?;
        let pod = self.replica_pod_spec(volume, replica, port, create_size, self.owner(id).await?)?;
        self.ensure_pod(id, pod).await?;
        // On a node that is down the pod cannot start: the engine ejects the replica, and the
        // pod serves again when the node is back.
        if self.node_usable(&replica.node) || create_size.is_some() {
            self.wait_ready(id, &Self::replica_pod(id, &replica.id)).await?;
        } else {
            warn!(volume_id = %id, replica = %replica.id, node = %replica.node, "the replica's node is not ready");
        }
        Ok(ReplicaEndpoint {
            data: host_port(&addr, port),
            mgmt: format!("http://{}", host_port(&addr, port + 1)),
        })
    }

    fn adopt_replica(&self, _volume: &VolumeRecord, _replica: &ReplicaPlacement) {
        // Pods are the state: nothing to watch in memory.
    }

    fn kill_replica(&self, volume_id: &str, replica: &ReplicaPlacement) -> Result<u32> {
        let (pods, vid, name) =
            (self.pods.clone(), volume_id.to_owned(), Self::replica_pod(volume_id, &replica.id));
        // The reconcile loop recreates it; the engine rebuilds it.
        self.rt.spawn(async move {
            if let Err(e) = pods
                .delete(&name, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() })
                .await
            {
                warn!(volume_id = %vid, pod = %name, error = %e, "killing the replica pod failed");
            }
        });
        warn!(volume_id, replica = %replica.id, "replica pod deleted on request");
        Ok(0)
    }

    fn clone_target_name(&self, volume_id: &str, replica: &ReplicaPlacement) -> String {
        format!("{volume_id}-{}", replica.id)
    }

    async fn remove_replica(&self, volume_id: &str, replica: &ReplicaPlacement) -> Result<()> {
        let name = Self::replica_pod(volume_id, &replica.id);
        self.delete_pod(volume_id, &name, None).await?;
        // A cordoned node still runs the wiping pod; one that is not Ready does not.
        if self.node_lost(&replica.node) {
            warn!(volume_id, replica = %replica.id, node = %replica.node,
                  "the replica's node is not ready: its data stays there");
            return Ok(());
        }
        if !self.wait_gone(volume_id, &name, Duration::from_secs(60)).await? {
            return Err(orch(volume_id, format!("pod {name} did not stop")));
        }
        self.wipe(volume_id, replica).await?;
        info!(volume_id, replica = %replica.id, node = %replica.node, "replica removed");
        Ok(())
    }

    async fn ensure_engine(
        &self,
        volume: &VolumeRecord,
        attachment: &Attachment,
        replicas: &[(String, String)],
    ) -> Result<EngineEndpoint> {
        let id = &volume.id;
        let port = attachment.port.ok_or_else(|| orch(id, "the attachment has no port"))?;
        let addr = self.address(id, &attachment.node)?;
        // Engines of earlier generations go first.
        let lp = ListParams::default().labels(&format!("{VOLUME_LABEL}={id},{COMPONENT_LABEL}=engine"));
        for p in self.pods.list(&lp).await.map_err(|e| orch(id, e))?.items {
            let name = p.metadata.name.clone().unwrap_or_default();
            if name != Self::engine_pod_name(id, attachment.generation) {
                self.delete_pod(id, &name, None).await?;
            }
        }
        let pod = self.engine_pod_spec(volume, attachment, port, replicas, self.owner(id).await?)?;
        self.ensure_pod(id, pod).await?;
        self.wait_ready(id, &Self::engine_pod_name(id, attachment.generation)).await?;
        let ep = EngineEndpoint {
            nbd_socket: self.nbd_socket(id, attachment.generation).into(),
            mgmt: format!("http://{}", host_port(&addr, port)),
            generation: attachment.generation,
        };
        let known = self.engines.lock().insert(id.clone(), ep.clone());
        if known.as_ref() == Some(&ep) {
            // Seen ready before (a reconcile pass): the Attachment says so already.
            return Ok(ep);
        }
        // Operators see it on the Attachment (written with the volume's record).
        let attachments: Api<crate::crd::Attachment> =
            Api::namespaced(self.client.clone(), &self.cfg.namespace);
        let status = serde_json::json!({ "status": { "engine_ready": true } });
        if let Err(e) = attachments.patch_status(id, &PatchParams::default(), &Patch::Merge(&status)).await {
            warn!(volume_id = %id, error = %e, "the Attachment's status was not written");
        }
        Ok(ep)
    }

    fn engine(&self, volume_id: &str) -> Option<EngineEndpoint> {
        self.engines.lock().get(volume_id).cloned()
    }

    async fn stop_engine(&self, volume_id: &str) -> Result<()> {
        self.engines.lock().remove(volume_id);
        let lp =
            ListParams::default().labels(&format!("{VOLUME_LABEL}={volume_id},{COMPONENT_LABEL}=engine"));
        for p in self.pods.list(&lp).await.map_err(|e| orch(volume_id, e))?.items {
            self.delete_pod(volume_id, &p.metadata.name.unwrap_or_default(), None).await?;
        }
        Ok(())
    }

    async fn forget_volume(&self, volume_id: &str) -> Result<()> {
        let lp = ListParams::default().labels(&format!("{VOLUME_LABEL}={volume_id}"));
        for p in self.pods.list(&lp).await.map_err(|e| orch(volume_id, e))?.items {
            self.delete_pod(volume_id, &p.metadata.name.unwrap_or_default(), None).await?;
        }
        match self.secrets.delete(&Self::token_secret(volume_id), &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) => Err(orch(volume_id, format!("deleting its token Secret: {e}"))),
        }
    }

    async fn shutdown(&self) {
        // Pods keep serving; the next controller finds them.
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn host_addresses_bracket_ipv6() {
        assert_eq!(host_port("10.0.0.5", 20000), "10.0.0.5:20000");
        assert_eq!(host_port("fd00::5", 20000), "[fd00::5]:20000");
        assert!(barnacle_engine::valid_replica_address(&host_port("fd00::5", 20000)));
    }

    #[test]
    fn cpu_quantities_and_requests_parse() {
        assert_eq!(parse_cpu_milli("50m"), Some(50));
        assert_eq!(parse_cpu_milli("0.5"), Some(500));
        assert_eq!(parse_cpu_milli("2"), Some(2000));
        assert_eq!(parse_cpu_milli("two"), None);
        let r: ResourceRequirements =
            serde_json::from_str(r#"{"requests":{"memory":"64Mi"},"limits":{"cpu":"250m","memory":"1Gi"}}"#)
                .unwrap();
        assert_eq!(
            requests_of(&r),
            Compute { cpu_milli: 250, memory: 64 << 20 },
            "a limit alone requests itself"
        );
        assert!(check_resources(&r).is_ok());
        let bad: ResourceRequirements = serde_json::from_str(r#"{"requests":{"gpu":"1"}}"#).unwrap();
        assert!(check_resources(&bad).is_err());
        let bad: ResourceRequirements = serde_json::from_str(r#"{"requests":{"cpu":"lots"}}"#).unwrap();
        assert!(check_resources(&bad).is_err());
    }

    #[test]
    fn quantities_parse() {
        assert_eq!(parse_quantity("100Gi"), Some(100 << 30));
        assert_eq!(parse_quantity("500G"), Some(500_000_000_000));
        assert_eq!(parse_quantity("1024"), Some(1024));
        assert_eq!(parse_quantity("1.5Ki"), Some(1536));
        assert_eq!(parse_quantity("12Qi"), None);
        assert_eq!(parse_quantity("lots"), None);
    }
}
