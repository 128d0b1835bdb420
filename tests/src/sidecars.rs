//! The kubernetes-csi controller sidecars' roles, played by the test through the Kubernetes API.
//!
//! The sidecar images are in no registry this project can reach, so the chart's controller pod
//! runs placeholders (the pause image) beside `barnacle-controller`, and this task does what the
//! sidecars would, against the controller's real CSI socket (in its pod's emptyDir on its node)
//! and the real API server:
//! - **external-provisioner** (`--extra-create-metadata`, `--strict-topology=false`,
//!   `--default-fstype=ext4`): a PVC the PV controller handed to the driver, with the scheduler's
//!   selected node, becomes CreateVolume (the StorageClass's parameters and the PVC/PV names,
//!   accessibility from the CSINodes, a snapshot or PVC data source) and a PV bound to the claim;
//!   a Released PV of the driver is DeleteVolume, then deleted;
//! - **external-attacher**: a VolumeAttachment of the driver is ControllerPublishVolume (the node
//!   id from the CSINode) and `status.attached` with the publish context; its deletion is
//!   ControllerUnpublishVolume, then its finalizer goes;
//! - **snapshot-controller + external-snapshotter** (`--extra-create-metadata`): a
//!   VolumeSnapshot becomes a VolumeSnapshotContent and CreateSnapshot, both statuses ready; a
//!   content whose VolumeSnapshot is gone is DeleteSnapshot, then deleted;
//! - **external-resizer**: a bound PVC asking for more than its PV holds is
//!   ControllerExpandVolume, the PV's new capacity, and FileSystemResizePending for the kubelet;
//!   a PVC whose VolumeAttributesClass changed is ControllerModifyVolume with the class's
//!   parameters. Kubernetes 1.20 has neither the class nor the PVC's field, so the test stands in
//!   for them: a ConfigMap is the class (its data the parameters), the PVC's annotation
//!   [`VAC_ANNOTATION`] names it as `spec.volumeAttributesClassName` would, and
//!   [`CURRENT_VAC_ANNOTATION`] is set once applied, as `status.currentVolumeAttributesClassName`.
//!
//! Everything on the nodes (registration, NodeStage, NodePublish, NodeExpand, unpublish,
//! unstage) is the real kubelet's.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use csi_proto::v1 as csi;
use k8s_openapi::api::core::v1::{ConfigMap, Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::{CSINode, StorageClass, VolumeAttachment};
use kube::Client;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
    PostParams,
};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

const PROVISIONER_ANNOTATION: &str = "volume.beta.kubernetes.io/storage-provisioner";
const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
/// On a PVC: the ConfigMap standing in for its VolumeAttributesClass (`spec.volumeAttributesClassName`).
pub const VAC_ANNOTATION: &str = "barnacle.test/volume-attributes-class";
/// On a PVC: the class last applied (`status.currentVolumeAttributesClassName`).
pub const CURRENT_VAC_ANNOTATION: &str = "barnacle.test/current-volume-attributes-class";

/// The running player; stops when dropped.
#[derive(Debug)]
pub struct Sidecars {
    stop: CancellationToken,
    /// What it did and what failed, for the test's messages.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Sidecars {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Sidecars {
    /// Starts playing for `driver`, whose controller pod runs in `namespace` with its CSI socket
    /// in the emptyDir `socket-dir`; `node_dirs` maps a node's name to its directory (whose
    /// `kubelet/` is its /var/lib/kubelet).
    pub fn start(
        client: Client,
        driver: &str,
        namespace: &str,
        node_dirs: HashMap<String, PathBuf>,
    ) -> Sidecars {
        let stop = CancellationToken::new();
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut p = Player {
            client,
            driver: driver.to_owned(),
            namespace: namespace.to_owned(),
            node_dirs,
            csi: None,
            log: log.clone(),
        };
        let s = stop.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = p.pass().await {
                    p.note(format!("pass failed: {e}"));
                }
                tokio::select! {
                    () = s.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        });
        Sidecars { stop, log }
    }

    /// The log's last lines.
    pub fn tail(&self) -> String {
        let l = self.log.lock();
        l.iter().rev().take(40).rev().cloned().collect::<Vec<_>>().join("\n")
    }
}

type Res<T> = Result<T, String>;

fn e(what: &str) -> impl Fn(kube::Error) -> String + '_ {
    move |err| format!("{what}: {err}")
}

fn status(what: &str) -> impl Fn(tonic::Status) -> String + '_ {
    move |s| format!("{what}: {:?} {}", s.code(), s.message())
}

struct Player {
    client: Client,
    driver: String,
    namespace: String,
    node_dirs: HashMap<String, PathBuf>,
    /// The controller pod's uid and a channel to its socket.
    csi: Option<(String, tonic::transport::Channel)>,
    log: Arc<Mutex<Vec<String>>>,
}

fn snapshot_api(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", kind), plural)
}

/// A quantity of bytes (`1Gi`, `1073741824`).
fn bytes(q: &str) -> u64 {
    barnacle_controller::k8s::parse_quantity(q).unwrap_or(0)
}

impl Player {
    fn note(&self, line: String) {
        eprintln!("sidecars: {line}");
        self.log.lock().push(line);
    }

    fn controller(&self) -> csi::controller_client::ControllerClient<tonic::transport::Channel> {
        csi::controller_client::ControllerClient::new(self.csi.as_ref().map(|c| c.1.clone()).unwrap_or_else(
            || csi_proto::unix_channel("/nonexistent").unwrap_or_else(|_| unreachable!("a lazy channel")),
        ))
    }

    /// Finds the controller pod's CSI socket (again, if the pod changed).
    async fn ensure_csi(&mut self) -> Res<()> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let lp = ListParams::default().labels("app.kubernetes.io/component=controller");
        let list = pods.list(&lp).await.map_err(e("listing the controller pod"))?;
        let pod = list
            .items
            .iter()
            .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .ok_or("no running controller pod")?;
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        if self.csi.as_ref().is_some_and(|c| c.0 == uid) {
            return Ok(());
        }
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
        let dir = self.node_dirs.get(&node).ok_or_else(|| format!("unknown node {node}"))?;
        let socket =
            dir.join("kubelet/pods").join(&uid).join("volumes/kubernetes.io~empty-dir/socket-dir/csi.sock");
        if !socket.exists() {
            return Err(format!("{} is not there yet", socket.display()));
        }
        // The path is longer than a socket address may be: reach it through a short link.
        let link = PathBuf::from(format!("/run/bk8s/controller-csi-{}", std::process::id()));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(socket.parent().unwrap_or(&socket), &link).map_err(|e| e.to_string())?;
        let short = link.join("csi.sock");
        let channel =
            csi_proto::unix_channel(short.to_str().unwrap_or_default()).map_err(|e| e.to_string())?;
        self.note(format!("talking to the controller at {}", socket.display()));
        self.csi = Some((uid, channel));
        Ok(())
    }

    async fn pass(&mut self) -> Res<()> {
        self.ensure_csi().await?;
        for (what, r) in [
            ("provisioner", self.provision().await),
            ("deleter", self.delete_released().await),
            ("attacher", self.attach().await),
            ("snapshotter", self.snapshot().await),
            ("resizer", self.resize().await),
            ("resizer (modify)", self.modify().await),
        ] {
            if let Err(err) = r {
                self.note(format!("{what}: {err}"));
            }
        }
        Ok(())
    }

    /// A volume capability as the sidecars make it from access modes, volume mode and fsType.
    fn capability(access_modes: &[String], block: bool, fs_type: &str) -> csi::VolumeCapability {
        use csi::volume_capability::access_mode::Mode;
        let mode = if access_modes.iter().any(|m| m == "ReadWriteOncePod") {
            Mode::SingleNodeSingleWriter
        } else if access_modes.iter().any(|m| m == "ReadOnlyMany") {
            Mode::MultiNodeReaderOnly
        } else {
            Mode::SingleNodeWriter
        };
        csi::VolumeCapability {
            access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
            access_type: Some(if block {
                csi::volume_capability::AccessType::Block(csi::volume_capability::BlockVolume {})
            } else {
                csi::volume_capability::AccessType::Mount(csi::volume_capability::MountVolume {
                    fs_type: fs_type.to_owned(),
                    ..Default::default()
                })
            }),
        }
    }

    /// Each node's topology segment for the driver (its CSINode's keys, its labels' values).
    async fn segments(&self) -> Res<BTreeMap<String, (String, HashMap<String, String>)>> {
        let csinodes: Api<CSINode> = Api::all(self.client.clone());
        let nodes: Api<Node> = Api::all(self.client.clone());
        let mut out = BTreeMap::new();
        for c in csinodes.list(&ListParams::default()).await.map_err(e("listing CSINodes"))?.items {
            let name = c.metadata.name.clone().unwrap_or_default();
            let Some(d) = c.spec.drivers.iter().find(|d| d.name == self.driver) else { continue };
            let node = nodes.get(&name).await.map_err(e("reading a node"))?;
            let labels = node.metadata.labels.unwrap_or_default();
            let seg = d
                .topology_keys
                .iter()
                .flatten()
                .filter_map(|k| labels.get(k).map(|v| (k.clone(), v.clone())))
                .collect();
            out.insert(name, (d.node_id.clone(), seg));
        }
        Ok(out)
    }

    async fn provision(&self) -> Res<()> {
        let pvcs: Api<PersistentVolumeClaim> = Api::all(self.client.clone());
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        let classes: Api<StorageClass> = Api::all(self.client.clone());
        for pvc in pvcs.list(&ListParams::default()).await.map_err(e("listing PVCs"))?.items {
            let ann = pvc.metadata.annotations.clone().unwrap_or_default();
            let spec = pvc.spec.clone().unwrap_or_default();
            let pending = pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending");
            if ann.get(PROVISIONER_ANNOTATION) != Some(&self.driver) || !pending || spec.volume_name.is_some()
            {
                continue;
            }
            let Some(selected) = ann.get(SELECTED_NODE) else { continue };
            let uid = pvc.metadata.uid.clone().unwrap_or_default();
            let (ns, name) = (
                pvc.metadata.namespace.clone().unwrap_or_default(),
                pvc.metadata.name.clone().unwrap_or_default(),
            );
            let pv_name = format!("pvc-{uid}");
            if pvs.get_opt(&pv_name).await.map_err(e("reading a PV"))?.is_some() {
                continue;
            }
            let sc = classes
                .get(spec.storage_class_name.as_deref().unwrap_or_default())
                .await
                .map_err(e("reading the StorageClass"))?;
            let mut params: HashMap<String, String> = sc
                .parameters
                .clone()
                .unwrap_or_default()
                .into_iter()
                .filter(|(k, _)| !k.starts_with("csi.storage.k8s.io/"))
                .collect();
            let fs_type = sc
                .parameters
                .as_ref()
                .and_then(|p| p.get("csi.storage.k8s.io/fstype"))
                .cloned()
                .unwrap_or_else(|| "ext4".into());
            params.insert("csi.storage.k8s.io/pvc/name".into(), name.clone());
            params.insert("csi.storage.k8s.io/pvc/namespace".into(), ns.clone());
            params.insert("csi.storage.k8s.io/pv/name".into(), pv_name.clone());
            let block = spec.volume_mode.as_deref() == Some("Block");
            let modes = spec.access_modes.clone().unwrap_or_default();
            let size = spec
                .resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get("storage"))
                .map_or(0, |q| bytes(&q.0));
            let segments = self.segments().await?;
            let topo = |s: &HashMap<String, String>| csi::Topology { segments: s.clone() };
            let mut preferred: Vec<csi::Topology> =
                segments.get(selected).map(|s| topo(&s.1)).into_iter().collect();
            preferred.extend(segments.iter().filter(|(n, _)| *n != selected).map(|(_, s)| topo(&s.1)));
            let source = match &spec.data_source {
                Some(ds) if ds.kind == "VolumeSnapshot" => {
                    let snaps: Api<DynamicObject> = Api::namespaced_with(
                        self.client.clone(),
                        &ns,
                        &snapshot_api("VolumeSnapshot", "volumesnapshots"),
                    );
                    let vs = snaps.get(&ds.name).await.map_err(e("reading the source VolumeSnapshot"))?;
                    let content = vs.data["status"]["boundVolumeSnapshotContentName"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    let contents: Api<DynamicObject> = Api::all_with(
                        self.client.clone(),
                        &snapshot_api("VolumeSnapshotContent", "volumesnapshotcontents"),
                    );
                    let vsc = contents.get(&content).await.map_err(e("reading the snapshot's content"))?;
                    let handle = vsc.data["status"]["snapshotHandle"].as_str().unwrap_or_default().to_owned();
                    Some(csi::volume_content_source::Type::Snapshot(
                        csi::volume_content_source::SnapshotSource { snapshot_id: handle },
                    ))
                }
                Some(ds) if ds.kind == "PersistentVolumeClaim" => {
                    let src = Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), &ns)
                        .get(&ds.name)
                        .await
                        .map_err(e("reading the source PVC"))?;
                    let pv = pvs
                        .get(src.spec.and_then(|s| s.volume_name).as_deref().unwrap_or_default())
                        .await
                        .map_err(e("reading the source PV"))?;
                    let handle = pv.spec.and_then(|s| s.csi).map(|c| c.volume_handle).unwrap_or_default();
                    Some(csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
                        volume_id: handle,
                    }))
                }
                _ => None,
            };
            let req = csi::CreateVolumeRequest {
                name: pv_name.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: i64::try_from(size).unwrap_or(0),
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![Self::capability(&modes, block, &fs_type)],
                parameters: params,
                volume_content_source: source.map(|t| csi::VolumeContentSource { r#type: Some(t) }),
                accessibility_requirements: Some(csi::TopologyRequirement {
                    requisite: segments.values().map(|s| topo(&s.1)).collect(),
                    preferred,
                }),
                ..Default::default()
            };
            let v = self
                .controller()
                .create_volume(req)
                .await
                .map_err(status(&format!("CreateVolume for {ns}/{name}")))?
                .into_inner()
                .volume
                .ok_or("CreateVolume returned no volume")?;
            let terms: Vec<serde_json::Value> = v
                .accessible_topology
                .iter()
                .map(|t| {
                    let exprs: Vec<serde_json::Value> = t
                        .segments
                        .iter()
                        .map(|(k, val)| serde_json::json!({ "key": k, "operator": "In", "values": [val] }))
                        .collect();
                    serde_json::json!({ "matchExpressions": exprs })
                })
                .collect();
            let mut csi_source = serde_json::json!({
                "driver": self.driver,
                "volumeHandle": v.volume_id,
                "volumeAttributes": v.volume_context,
            });
            if !block {
                csi_source["fsType"] = fs_type.clone().into();
            }
            let mut pv = serde_json::json!({
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": { "name": pv_name, "annotations": { PROVISIONED_BY: self.driver } },
                "spec": {
                    "capacity": { "storage": v.capacity_bytes.to_string() },
                    "accessModes": modes,
                    "persistentVolumeReclaimPolicy": sc.reclaim_policy.clone().unwrap_or_else(|| "Delete".into()),
                    "storageClassName": sc.metadata.name,
                    "volumeMode": if block { "Block" } else { "Filesystem" },
                    "claimRef": { "apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": ns, "name": name, "uid": uid },
                    "csi": csi_source,
                },
            });
            if !terms.is_empty() {
                pv["spec"]["nodeAffinity"] =
                    serde_json::json!({ "required": { "nodeSelectorTerms": terms } });
            }
            if let Some(mo) = &sc.mount_options {
                pv["spec"]["mountOptions"] = serde_json::json!(mo);
            }
            let pv: PersistentVolume = serde_json::from_value(pv).map_err(|e| e.to_string())?;
            pvs.create(&PostParams::default(), &pv).await.map_err(e("creating the PV"))?;
            self.note(format!("provisioned {ns}/{name} as {} ({} bytes)", v.volume_id, v.capacity_bytes));
        }
        Ok(())
    }

    async fn delete_released(&self) -> Res<()> {
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        for pv in pvs.list(&ListParams::default()).await.map_err(e("listing PVs"))?.items {
            let ann = pv.metadata.annotations.clone().unwrap_or_default();
            let released = pv.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Released");
            let spec = pv.spec.clone().unwrap_or_default();
            if ann.get(PROVISIONED_BY) != Some(&self.driver)
                || !released
                || spec.persistent_volume_reclaim_policy.as_deref() != Some("Delete")
            {
                continue;
            }
            let handle = spec.csi.map(|c| c.volume_handle).unwrap_or_default();
            self.controller()
                .delete_volume(csi::DeleteVolumeRequest { volume_id: handle.clone(), ..Default::default() })
                .await
                .map_err(status(&format!("DeleteVolume {handle}")))?;
            let name = pv.metadata.name.clone().unwrap_or_default();
            match pvs.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(err) => return Err(format!("deleting PV {name}: {err}")),
            }
            self.note(format!("deleted volume {handle} and PV {name}"));
        }
        Ok(())
    }

    async fn attach(&self) -> Res<()> {
        let vas: Api<VolumeAttachment> = Api::all(self.client.clone());
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        let finalizer = format!("external-attacher/{}", self.driver.replace('.', "-"));
        for va in vas.list(&ListParams::default()).await.map_err(e("listing VolumeAttachments"))?.items {
            if va.spec.attacher != self.driver {
                continue;
            }
            let name = va.metadata.name.clone().unwrap_or_default();
            let Some(pv_name) = va.spec.source.persistent_volume_name.clone() else { continue };
            let segments = self.segments().await?;
            let node_id = segments
                .get(&va.spec.node_name)
                .map(|s| s.0.clone())
                .unwrap_or_else(|| va.spec.node_name.clone());
            let finalizers = va.metadata.finalizers.clone().unwrap_or_default();
            let pv = pvs.get_opt(&pv_name).await.map_err(e("reading the PV"))?;
            let handle = pv
                .as_ref()
                .and_then(|p| p.spec.as_ref())
                .and_then(|s| s.csi.as_ref())
                .map(|c| c.volume_handle.clone());
            if va.metadata.deletion_timestamp.is_some() {
                if !finalizers.contains(&finalizer) {
                    continue;
                }
                if let Some(h) = &handle {
                    self.controller()
                        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                            volume_id: h.clone(),
                            node_id: node_id.clone(),
                            ..Default::default()
                        })
                        .await
                        .map_err(status(&format!("ControllerUnpublishVolume {h}")))?;
                }
                let rest: Vec<String> = finalizers.into_iter().filter(|f| *f != finalizer).collect();
                let patch = serde_json::json!({ "metadata": { "finalizers": rest } });
                vas.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(e("removing the finalizer"))?;
                self.note(format!("detached {pv_name} from {}", va.spec.node_name));
                continue;
            }
            if va.status.as_ref().is_some_and(|s| s.attached) {
                continue;
            }
            let (Some(pv), Some(handle)) = (pv, handle) else { continue };
            if !finalizers.contains(&finalizer) {
                let mut f = finalizers.clone();
                f.push(finalizer.clone());
                let patch = serde_json::json!({ "metadata": { "finalizers": f } });
                vas.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(e("adding the finalizer"))?;
            }
            let spec = pv.spec.clone().unwrap_or_default();
            let c = spec.csi.clone().unwrap_or_default();
            let block = spec.volume_mode.as_deref() == Some("Block");
            let cap = Self::capability(
                &spec.access_modes.clone().unwrap_or_default(),
                block,
                c.fs_type.as_deref().unwrap_or("ext4"),
            );
            let published = self
                .controller()
                .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                    volume_id: handle.clone(),
                    node_id: node_id.clone(),
                    volume_capability: Some(cap),
                    readonly: c.read_only.unwrap_or(false),
                    volume_context: c.volume_attributes.clone().unwrap_or_default().into_iter().collect(),
                    ..Default::default()
                })
                .await;
            let st = match published {
                Ok(r) => {
                    serde_json::json!({ "status": { "attached": true, "attachmentMetadata": r.into_inner().publish_context } })
                }
                Err(s) => {
                    self.note(format!(
                        "ControllerPublishVolume {handle} on {node_id}: {:?} {}",
                        s.code(),
                        s.message()
                    ));
                    serde_json::json!({ "status": { "attached": false, "attachError": {
                        "message": s.message(), "time": k8s_openapi::jiff::Timestamp::now().to_string() } } })
                }
            };
            vas.patch_status(&name, &PatchParams::default(), &Patch::Merge(&st))
                .await
                .map_err(e("writing the attachment status"))?;
            if st["status"]["attached"] == true {
                self.note(format!("attached {pv_name} ({handle}) to {}", va.spec.node_name));
            }
        }
        Ok(())
    }

    async fn snapshot(&self) -> Res<()> {
        let snaps: Api<DynamicObject> =
            Api::all_with(self.client.clone(), &snapshot_api("VolumeSnapshot", "volumesnapshots"));
        let contents: Api<DynamicObject> = Api::all_with(
            self.client.clone(),
            &snapshot_api("VolumeSnapshotContent", "volumesnapshotcontents"),
        );
        let classes: Api<DynamicObject> =
            Api::all_with(self.client.clone(), &snapshot_api("VolumeSnapshotClass", "volumesnapshotclasses"));
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        let all = snaps.list(&ListParams::default()).await.map_err(e("listing VolumeSnapshots"))?.items;
        for vs in &all {
            if vs.data["status"]["readyToUse"] == true {
                continue;
            }
            let (ns, name) = (
                vs.metadata.namespace.clone().unwrap_or_default(),
                vs.metadata.name.clone().unwrap_or_default(),
            );
            let uid = vs.metadata.uid.clone().unwrap_or_default();
            let class_name =
                vs.data["spec"]["volumeSnapshotClassName"].as_str().unwrap_or_default().to_owned();
            let class = classes.get(&class_name).await.map_err(e("reading the VolumeSnapshotClass"))?;
            if class.data["driver"] != self.driver.as_str() {
                continue;
            }
            let pvc_name = vs.data["spec"]["source"]["persistentVolumeClaimName"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let pvc = Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), &ns)
                .get(&pvc_name)
                .await
                .map_err(e("reading the snapshot's PVC"))?;
            let pv = pvs
                .get(pvc.spec.and_then(|s| s.volume_name).as_deref().unwrap_or_default())
                .await
                .map_err(e("reading the snapshot's PV"))?;
            let volume = pv.spec.and_then(|s| s.csi).map(|c| c.volume_handle).unwrap_or_default();
            let content_name = format!("snapcontent-{uid}");
            if contents.get_opt(&content_name).await.map_err(e("reading a content"))?.is_none() {
                let c: DynamicObject = serde_json::from_value(serde_json::json!({
                    "apiVersion": "snapshot.storage.k8s.io/v1",
                    "kind": "VolumeSnapshotContent",
                    "metadata": { "name": content_name },
                    "spec": {
                        "volumeSnapshotRef": { "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
                                               "name": name, "namespace": ns, "uid": uid },
                        "source": { "volumeHandle": volume },
                        "driver": self.driver,
                        "deletionPolicy": class.data["deletionPolicy"],
                        "volumeSnapshotClassName": class_name,
                    },
                }))
                .map_err(|e| e.to_string())?;
                contents.create(&PostParams::default(), &c).await.map_err(e("creating the content"))?;
            }
            let mut params: HashMap<String, String> = class.data["parameters"]
                .as_object()
                .map(|o| o.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect())
                .unwrap_or_default();
            params.insert("csi.storage.k8s.io/volumesnapshot/name".into(), name.clone());
            params.insert("csi.storage.k8s.io/volumesnapshot/namespace".into(), ns.clone());
            params.insert("csi.storage.k8s.io/volumesnapshotcontent/name".into(), content_name.clone());
            let s = self
                .controller()
                .create_snapshot(csi::CreateSnapshotRequest {
                    source_volume_id: volume.clone(),
                    name: format!("snapshot-{uid}"),
                    parameters: params,
                    ..Default::default()
                })
                .await
                .map_err(status(&format!("CreateSnapshot of {ns}/{name}")))?
                .into_inner()
                .snapshot
                .ok_or("CreateSnapshot returned no snapshot")?;
            let created = s.creation_time.map_or(0, |t| t.seconds * 1_000_000_000 + i64::from(t.nanos));
            let cs = serde_json::json!({ "status": {
                "snapshotHandle": s.snapshot_id, "readyToUse": s.ready_to_use,
                "restoreSize": s.size_bytes, "creationTime": created } });
            contents
                .patch_status(&content_name, &PatchParams::default(), &Patch::Merge(&cs))
                .await
                .map_err(e("content status"))?;
            let when = k8s_openapi::jiff::Timestamp::from_nanosecond(i128::from(created))
                .unwrap_or_default()
                .to_string();
            let vss = serde_json::json!({ "status": {
                "boundVolumeSnapshotContentName": content_name, "readyToUse": s.ready_to_use,
                "restoreSize": s.size_bytes.to_string(), "creationTime": when } });
            let nsnaps: Api<DynamicObject> = Api::namespaced_with(
                self.client.clone(),
                &ns,
                &snapshot_api("VolumeSnapshot", "volumesnapshots"),
            );
            nsnaps
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&vss))
                .await
                .map_err(e("snapshot status"))?;
            self.note(format!(
                "snapshot {ns}/{name} of {volume}: {} ready {}",
                s.snapshot_id, s.ready_to_use
            ));
        }
        // Contents whose VolumeSnapshot is gone go, with their snapshot (deletionPolicy Delete).
        for c in contents.list(&ListParams::default()).await.map_err(e("listing contents"))?.items {
            if c.data["spec"]["driver"] != self.driver.as_str() {
                continue;
            }
            let r = &c.data["spec"]["volumeSnapshotRef"];
            let live = all.iter().any(|vs| vs.metadata.uid.as_deref() == r["uid"].as_str());
            if live {
                continue;
            }
            let name = c.metadata.name.clone().unwrap_or_default();
            if c.data["spec"]["deletionPolicy"] == "Delete"
                && let Some(h) = c.data["status"]["snapshotHandle"].as_str()
            {
                self.controller()
                    .delete_snapshot(csi::DeleteSnapshotRequest {
                        snapshot_id: h.to_owned(),
                        ..Default::default()
                    })
                    .await
                    .map_err(status(&format!("DeleteSnapshot {h}")))?;
                self.note(format!("deleted snapshot {h}"));
            }
            contents.delete(&name, &DeleteParams::default()).await.map_err(e("deleting a content"))?;
        }
        Ok(())
    }

    async fn modify(&self) -> Res<()> {
        let pvcs: Api<PersistentVolumeClaim> = Api::all(self.client.clone());
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        for pvc in pvcs.list(&ListParams::default()).await.map_err(e("listing PVCs"))?.items {
            let notes = pvc.metadata.annotations.clone().unwrap_or_default();
            let Some(class) = notes.get(VAC_ANNOTATION) else { continue };
            if notes.get(CURRENT_VAC_ANNOTATION) == Some(class) {
                continue;
            }
            let Some(pv_name) = pvc.spec.as_ref().and_then(|s| s.volume_name.clone()) else { continue };
            let Some(pv) = pvs.get_opt(&pv_name).await.map_err(e("reading a PV"))? else { continue };
            let Some(c) = pv.spec.and_then(|s| s.csi).filter(|c| c.driver == self.driver) else { continue };
            let (ns, name) = (
                pvc.metadata.namespace.clone().unwrap_or_default(),
                pvc.metadata.name.clone().unwrap_or_default(),
            );
            let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &ns);
            let Some(cm) = cms.get_opt(class).await.map_err(e("reading the class"))? else { continue };
            self.controller()
                .controller_modify_volume(csi::ControllerModifyVolumeRequest {
                    volume_id: c.volume_handle.clone(),
                    mutable_parameters: cm.data.unwrap_or_default().into_iter().collect(),
                    ..Default::default()
                })
                .await
                .map_err(status(&format!("ControllerModifyVolume {}", c.volume_handle)))?;
            let patch =
                serde_json::json!({ "metadata": { "annotations": { CURRENT_VAC_ANNOTATION: class } } });
            Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), &ns)
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(e("recording the applied class"))?;
            self.note(format!("modified {ns}/{name} ({}) to class {class}", c.volume_handle));
        }
        Ok(())
    }

    async fn resize(&self) -> Res<()> {
        let pvcs: Api<PersistentVolumeClaim> = Api::all(self.client.clone());
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        for pvc in pvcs.list(&ListParams::default()).await.map_err(e("listing PVCs"))?.items {
            let spec = pvc.spec.clone().unwrap_or_default();
            let Some(pv_name) = spec.volume_name.clone() else { continue };
            let want = spec
                .resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get("storage"))
                .map_or(0, |q| bytes(&q.0));
            let Some(pv) = pvs.get_opt(&pv_name).await.map_err(e("reading a PV"))? else { continue };
            let pv_spec = pv.spec.clone().unwrap_or_default();
            let Some(c) = pv_spec.csi.clone().filter(|c| c.driver == self.driver) else { continue };
            let has = pv_spec.capacity.as_ref().and_then(|m| m.get("storage")).map_or(0, |q| bytes(&q.0));
            if want <= has {
                continue;
            }
            let block = pv_spec.volume_mode.as_deref() == Some("Block");
            let cap = Self::capability(
                &pv_spec.access_modes.clone().unwrap_or_default(),
                block,
                c.fs_type.as_deref().unwrap_or("ext4"),
            );
            let r = self
                .controller()
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: c.volume_handle.clone(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: i64::try_from(want).unwrap_or(0),
                        limit_bytes: 0,
                    }),
                    volume_capability: Some(cap),
                    ..Default::default()
                })
                .await
                .map_err(status(&format!("ControllerExpandVolume {}", c.volume_handle)))?
                .into_inner();
            let patch =
                serde_json::json!({ "spec": { "capacity": { "storage": r.capacity_bytes.to_string() } } });
            pvs.patch(&pv_name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(e("growing the PV"))?;
            let (ns, name) = (
                pvc.metadata.namespace.clone().unwrap_or_default(),
                pvc.metadata.name.clone().unwrap_or_default(),
            );
            let st = if r.node_expansion_required {
                serde_json::json!({ "status": { "conditions": [{ "type": "FileSystemResizePending", "status": "True",
                    "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string(),
                    "message": "Waiting for user to (re-)start a pod to finish file system resize of volume on node." }] } })
            } else {
                serde_json::json!({ "status": { "capacity": { "storage": r.capacity_bytes.to_string() } } })
            };
            Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), &ns)
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&st))
                .await
                .map_err(e("the PVC's resize status"))?;
            self.note(format!("expanded {ns}/{name} ({}) to {} bytes", c.volume_handle, r.capacity_bytes));
        }
        Ok(())
    }
}
