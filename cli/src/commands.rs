//! The commands that drive a running local cluster: CSI calls to the controller and node plugins,
//! and the controller's admin API for names, status and faults.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use barnacle_controller::admin::pb as admin;
use csi_proto::v1 as csi;
use serde_json::json;
use tonic::transport::Channel;

use crate::output::Out;
use crate::{CliError, Fs, ReplicaCmd, SnapshotCmd, VolumeCmd, fmt_size};

/// Annotations the CLI keeps on a volume record.
pub const MODE: &str = "barnacle.dev/mode";
pub const MOUNT: &str = "barnacle.dev/mount";

type Controller = csi::controller_client::ControllerClient<Channel>;
type Admin = admin::admin_client::AdminClient<Channel>;
type Node = csi::node_client::NodeClient<Channel>;

/// Where the cluster's sockets are.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub data: PathBuf,
}

fn unreachable(what: &str, path: &Path, e: impl std::fmt::Display) -> CliError {
    CliError::Unreachable { what: what.to_owned(), path: path.display().to_string(), reason: e.to_string() }
}

impl Ctx {
    pub fn controller_socket(&self) -> PathBuf {
        self.data.join("controller.sock")
    }

    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.data.join("nodes").join(node)
    }

    pub fn node_socket(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("csi.sock")
    }

    fn staging(&self, node: &str, volume_id: &str) -> PathBuf {
        self.node_dir(node).join("staging").join(volume_id)
    }

    async fn channel(&self, what: &str, path: &Path) -> Result<Channel, CliError> {
        if !path.exists() {
            return Err(unreachable(what, path, "no socket"));
        }
        let ch =
            csi_proto::unix_channel(&path.display().to_string()).map_err(|e| unreachable(what, path, e))?;
        // Probe now, so a dead socket is a clear error rather than a failed call later.
        let mut id = csi::identity_client::IdentityClient::new(ch.clone());
        id.probe(csi::ProbeRequest {}).await.map_err(|e| unreachable(what, path, e.message()))?;
        Ok(ch)
    }

    pub async fn group_controller(
        &self,
    ) -> Result<csi::group_controller_client::GroupControllerClient<Channel>, CliError> {
        let ch = self.channel("the controller", &self.controller_socket()).await?;
        Ok(csi::group_controller_client::GroupControllerClient::new(ch))
    }

    pub async fn controller(&self) -> Result<(Controller, Admin), CliError> {
        let ch = self.channel("the controller", &self.controller_socket()).await?;
        Ok((Controller::new(ch.clone()), Admin::new(ch)))
    }

    pub async fn node(&self, node: &str) -> Result<Node, CliError> {
        let path = self.node_socket(node);
        if !self.node_dir(node).exists() {
            return Err(CliError::NotFound(format!(
                "node {node:?} is not part of this cluster (see `barnacle nodes`)"
            )));
        }
        Ok(Node::new(self.channel(&format!("node {node}"), &path).await?))
    }
}

fn capability(mode: &str) -> csi::VolumeCapability {
    use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode};
    csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
        access_type: Some(if mode == "block" {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume { fs_type: mode.to_owned(), ..Default::default() })
        }),
    }
}

async fn volume_info(a: &mut Admin, name: &str) -> Result<admin::VolumeInfo, CliError> {
    a.get_volume(admin::GetVolumeRequest { volume: name.to_owned() }).await.map(|r| r.into_inner()).map_err(
        |s| {
            if s.code() == tonic::Code::NotFound {
                CliError::NotFound(format!("no volume {name:?} (see `barnacle volume list`)"))
            } else {
                CliError::rpc(format!("looking up volume {name}"), &s)
            }
        },
    )
}

fn mode_of(v: &admin::VolumeInfo) -> String {
    v.annotations
        .get(MODE)
        .cloned()
        .unwrap_or_else(|| if v.fs_type.is_empty() { "ext4".into() } else { v.fs_type.clone() })
}

fn volume_json(v: &admin::VolumeInfo) -> serde_json::Value {
    json!({
        "name": v.name,
        "id": v.id,
        "size_bytes": v.size_bytes,
        "size": fmt_size(v.size_bytes),
        "mode": mode_of(v),
        "replicas_wanted": v.replicas_wanted,
        "min_healthy_replicas": v.min_healthy_replicas,
        "rebuild_mib_per_sec": v.rebuild_mib_per_sec,
        "max_iops": v.max_iops,
        "max_mib_per_sec": v.max_mib_per_sec,
        "state": v.state,
        "source": if v.source_kind.is_empty() { serde_json::Value::Null } else { json!({"kind": v.source_kind, "id": v.source_id}) },
        "attached_node": if v.attached_node.is_empty() { serde_json::Value::Null } else { json!(v.attached_node) },
        "mount": v.annotations.get(MOUNT),
        "epoch": v.epoch,
        "abnormal": v.abnormal,
        "condition": v.condition,
        "replicas": v.replicas.iter().map(|r| json!({"id": r.id, "node": r.node, "state": r.state, "ejected_at_epoch": r.ejected_at_epoch, "lost_seconds": r.lost_seconds})).collect::<Vec<_>>(),
        "replenishment": {"replaced": v.replicas_replenished, "after_seconds": v.replenish_after_seconds, "lost_replicas_to_wipe": v.lost_replicas},
        "rebuild": v.rebuild.as_ref().map(|r| json!({"replica": r.replica, "kind": r.kind, "phase": r.phase, "done_bytes": r.done_bytes, "total_bytes": r.total_bytes})),
        "clone": v.clone.as_ref().map(|c| json!({"done_bytes": c.done_bytes, "total_bytes": c.total_bytes})),
        "scrub": v.scrub.as_ref().map(|s| json!({"running": s.running, "done_bytes": s.done_bytes, "total_bytes": s.total_bytes, "damaged": s.damaged, "repaired_bytes": s.repaired_bytes, "unrepaired": s.unrepaired, "started_unix": s.started_unix, "finished_unix": s.finished_unix, "error": s.error})),
        "damage": {"ranges_found": v.damaged_ranges, "repaired_bytes": v.repaired_bytes, "ranges_unrepaired": v.unrepaired_ranges},
    })
}

/// One line saying where a scrub is or how it ended.
fn scrub_line(name: &str, s: &admin::ScrubInfo) -> String {
    let found = format!(
        "{} damaged range(s) found, {} repaired, {} left damaged",
        s.damaged,
        fmt_size(s.repaired_bytes),
        s.unrepaired
    );
    if s.running {
        format!(
            "scrubbing {name}: {} of {} verified; {found}",
            fmt_size(s.done_bytes),
            fmt_size(s.total_bytes)
        )
    } else if !s.error.is_empty() {
        format!("scrub of {name} stopped after {}: {}; {found}", fmt_size(s.done_bytes), s.error)
    } else {
        format!("scrub of {name} finished: {} verified; {found}", fmt_size(s.done_bytes))
    }
}

fn volume_row(v: &admin::VolumeInfo) -> Vec<String> {
    let healthy = v.replicas.iter().filter(|r| r.state == "healthy").count();
    vec![
        v.name.clone(),
        fmt_size(v.size_bytes),
        mode_of(v),
        format!("{healthy}/{}", v.replicas.len()),
        if v.attached_node.is_empty() { "-".into() } else { v.attached_node.clone() },
        v.annotations.get(MOUNT).cloned().unwrap_or_else(|| "-".into()),
        if v.abnormal { format!("degraded: {}", v.condition) } else { "ok".into() },
    ]
}

const VOLUME_HEADERS: [&str; 7] = ["NAME", "SIZE", "MODE", "HEALTHY", "NODE", "MOUNT", "CONDITION"];

fn one_volume(v: &admin::VolumeInfo) -> Out {
    let mut out = Out::value(volume_json(v));
    out.headers = VOLUME_HEADERS.to_vec();
    out.rows = vec![volume_row(v)];
    out
}

pub async fn volume(ctx: &Ctx, cmd: VolumeCmd) -> Result<Out, CliError> {
    let (mut c, mut a) = ctx.controller().await?;
    match cmd {
        VolumeCmd::Create { name, size, replicas, allow_fewer, fs, from_snapshot, from_volume } => {
            let mode = match fs {
                Fs::Ext4 => "ext4",
                Fs::Xfs => "xfs",
                Fs::Block => "block",
            };
            let mut parameters = HashMap::new();
            if let Some(n) = replicas {
                parameters.insert("replicas".to_owned(), n.to_string());
                parameters.insert("allowFewerReplicas".to_owned(), allow_fewer.to_string());
            }
            if mode != "block" {
                parameters.insert("fsType".into(), mode.into());
            }
            let source = match (from_snapshot, from_volume) {
                (Some(s), _) => {
                    let snaps = a
                        .list_snapshots(admin::ListSnapshotsRequest {})
                        .await
                        .map_err(|e| CliError::rpc("listing snapshots", &e))?;
                    let id = snaps
                        .into_inner()
                        .snapshots
                        .into_iter()
                        .find(|x| x.name == s)
                        .map(|x| x.id)
                        .ok_or_else(|| {
                            CliError::NotFound(format!("no snapshot {s:?} (see `barnacle snapshot list`)"))
                        })?;
                    Some(csi::volume_content_source::Type::Snapshot(
                        csi::volume_content_source::SnapshotSource { snapshot_id: id },
                    ))
                }
                (None, Some(v)) => {
                    let id = volume_info(&mut a, &v).await?.id;
                    Some(csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
                        volume_id: id,
                    }))
                }
                (None, None) => None,
            };
            c.create_volume(csi::CreateVolumeRequest {
                name: name.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: i64::try_from(size).unwrap_or(i64::MAX),
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![capability(mode)],
                parameters,
                volume_content_source: source.map(|t| csi::VolumeContentSource { r#type: Some(t) }),
                ..Default::default()
            })
            .await
            .map_err(|e| CliError::rpc(format!("creating volume {name}"), &e))?;
            let v = a
                .annotate(admin::AnnotateRequest {
                    volume: name.clone(),
                    key: MODE.into(),
                    value: mode.into(),
                })
                .await
                .map_err(|e| CliError::rpc("recording the volume's mode", &e))?
                .into_inner();
            if let Some(n) = replicas.filter(|n| v.replicas.len() < *n) {
                #[allow(clippy::print_stderr)]
                {
                    eprintln!(
                        "note: {} of {n} replicas placed: only {} nodes can hold one",
                        v.replicas.len(),
                        v.replicas.len()
                    );
                }
            }
            Ok(one_volume(&v))
        }
        VolumeCmd::List => {
            let vols = a
                .list_volumes(admin::ListVolumesRequest {})
                .await
                .map_err(|e| CliError::rpc("listing volumes", &e))?
                .into_inner()
                .volumes;
            let mut out = Out::value(json!(vols.iter().map(volume_json).collect::<Vec<_>>()));
            out.headers = VOLUME_HEADERS.to_vec();
            out.rows = vols.iter().map(volume_row).collect();
            Ok(out)
        }
        VolumeCmd::Get { name } => {
            let v = volume_info(&mut a, &name).await?;
            let mut out = Out::value(volume_json(&v));
            out.headers = vec!["REPLICA", "NODE", "STATE"];
            out.rows =
                v.replicas.iter().map(|r| vec![r.id.clone(), r.node.clone(), r.state.clone()]).collect();
            out.text = vec![
                String::new(),
                format!("name:      {}", v.name),
                format!("id:        {}", v.id),
                format!("size:      {}", fmt_size(v.size_bytes)),
                format!("mode:      {}", mode_of(&v)),
                format!("epoch:     {}", v.epoch),
                format!(
                    "attached:  {}",
                    if v.attached_node.is_empty() {
                        "no".into()
                    } else {
                        format!(
                            "{} at {}",
                            v.attached_node,
                            v.annotations.get(MOUNT).map_or("-", String::as_str)
                        )
                    }
                ),
                format!(
                    "replicas:  {} wanted, {} healthy required",
                    v.replicas_wanted, v.min_healthy_replicas
                ),
                format!(
                    "limits:    {}",
                    match (v.max_iops, v.max_mib_per_sec) {
                        (0, 0) => "none".to_owned(),
                        (i, 0) => format!("{i} IOPS"),
                        (0, m) => format!("{m} MiB/s"),
                        (i, m) => format!("{i} IOPS, {m} MiB/s"),
                    }
                ),
                format!("condition: {}", v.condition),
            ];
            Ok(out)
        }
        VolumeCmd::Expand { name, size } => {
            let v = volume_info(&mut a, &name).await?;
            let mode = mode_of(&v);
            let r = c
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: v.id.clone(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: i64::try_from(size).unwrap_or(i64::MAX),
                        limit_bytes: 0,
                    }),
                    volume_capability: Some(capability(&mode)),
                    ..Default::default()
                })
                .await
                .map_err(|e| CliError::rpc(format!("expanding volume {name}"), &e))?
                .into_inner();
            if !v.attached_node.is_empty()
                && let Some(mount) = v.annotations.get(MOUNT)
            {
                let mut n = ctx.node(&v.attached_node).await?;
                n.node_expand_volume(csi::NodeExpandVolumeRequest {
                    volume_id: v.id.clone(),
                    volume_path: mount.clone(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: r.capacity_bytes,
                        limit_bytes: 0,
                    }),
                    staging_target_path: ctx.staging(&v.attached_node, &v.id).display().to_string(),
                    volume_capability: Some(capability(&mode)),
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    CliError::rpc(format!("growing volume {name} on node {}", v.attached_node), &e)
                })?;
            }
            Ok(one_volume(&volume_info(&mut a, &name).await?))
        }
        VolumeCmd::Modify {
            name,
            replicas,
            min_healthy,
            rebuild_mib_per_sec,
            max_iops,
            max_mib_per_sec,
            wait,
        } => {
            let v = volume_info(&mut a, &name).await?;
            let mut mutable_parameters = HashMap::new();
            let mut put = |k: &str, x: Option<u64>| {
                if let Some(x) = x {
                    mutable_parameters.insert(k.to_owned(), x.to_string());
                }
            };
            put("replicas", replicas);
            put("minHealthyReplicas", min_healthy);
            put("rebuildMiBPerSec", rebuild_mib_per_sec);
            put("maxIops", max_iops);
            put("maxMiBPerSec", max_mib_per_sec);
            if mutable_parameters.is_empty() {
                return Err(CliError::Usage(
                    "nothing to change: give --replicas, --min-healthy, --rebuild-mib-per-sec, --max-iops or --max-mib-per-sec".into(),
                ));
            }
            c.controller_modify_volume(csi::ControllerModifyVolumeRequest {
                volume_id: v.id.clone(),
                mutable_parameters,
                ..Default::default()
            })
            .await
            .map_err(|e| CliError::rpc(format!("modifying volume {name}"), &e))?;
            let mut v = volume_info(&mut a, &name).await?;
            // New replicas join by a rebuild while the volume serves: follow it if asked.
            while wait && !v.attached_node.is_empty() && v.replicas.iter().any(|r| r.state != "healthy") {
                #[allow(clippy::print_stderr)]
                match &v.rebuild {
                    Some(r) => eprintln!(
                        "rebuilding replica {} ({}, {}): {} of {}",
                        r.replica,
                        r.kind,
                        r.phase,
                        fmt_size(r.done_bytes),
                        fmt_size(r.total_bytes)
                    ),
                    None => eprintln!("waiting for a rebuild to start"),
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                v = volume_info(&mut a, &name).await?;
            }
            Ok(one_volume(&v))
        }
        VolumeCmd::Scrub { name, wait } => {
            let mut v = a
                .scrub_volume(admin::ScrubVolumeRequest { volume: name.clone() })
                .await
                .map_err(|e| CliError::rpc(format!("scrubbing volume {name}"), &e))?
                .into_inner();
            while wait && v.scrub.as_ref().is_none_or(|s| s.running) {
                if let Some(s) = &v.scrub {
                    #[allow(clippy::print_stderr)]
                    {
                        eprintln!("{}", scrub_line(&name, s));
                    }
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                v = volume_info(&mut a, &name).await?;
            }
            let mut out = one_volume(&v);
            out.text = v.scrub.as_ref().map(|s| scrub_line(&name, s)).into_iter().collect();
            Ok(out)
        }
        VolumeCmd::Delete { name } => {
            let v = volume_info(&mut a, &name).await?;
            if !v.attached_node.is_empty() {
                return Err(CliError::Usage(format!(
                    "volume {name} is attached to node {}: run `barnacle detach {name}` first",
                    v.attached_node
                )));
            }
            c.delete_volume(csi::DeleteVolumeRequest { volume_id: v.id.clone(), ..Default::default() })
                .await
                .map_err(|e| CliError::rpc(format!("deleting volume {name}"), &e))?;
            let mut out = Out::value(json!({"deleted": name, "id": v.id}));
            out.text = vec![format!("volume {name} deleted")];
            Ok(out)
        }
    }
}

/// Whether `path` is a mount point (in this process's mount table).
fn is_mount_point(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    let p = path.display().to_string();
    text.lines().any(|l| l.split(' ').nth(4).is_some_and(|m| m.replace("\\040", " ") == p))
}

pub async fn attach(
    ctx: &Ctx,
    volume: &str,
    node: &str,
    mount: &Path,
    readonly: bool,
) -> Result<Out, CliError> {
    let mount = std::path::absolute(mount).map_err(|e| CliError::Io(format!("{}: {e}", mount.display())))?;
    let (mut c, mut a) = ctx.controller().await?;
    let v = volume_info(&mut a, volume).await?;
    if !v.attached_node.is_empty() {
        return Err(CliError::Usage(format!(
            "volume {volume} is already attached to node {} at {}: detach it first",
            v.attached_node,
            v.annotations.get(MOUNT).map_or("-", String::as_str)
        )));
    }
    let mode = mode_of(&v);
    if is_mount_point(&mount)
        || (mode != "block"
            && mount.is_dir()
            && std::fs::read_dir(&mount).is_ok_and(|mut d| d.next().is_some()))
    {
        return Err(CliError::Usage(format!(
            "mount path {} is in use: choose an empty directory",
            mount.display()
        )));
    }
    if mode == "block" && mount.exists() {
        return Err(CliError::Usage(format!(
            "{} exists: a block volume needs a new path for its device node",
            mount.display()
        )));
    }
    let mut n = ctx.node(node).await?;
    let ctx_pub = c
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: v.id.clone(),
            node_id: node.to_owned(),
            volume_capability: Some(capability(&mode)),
            readonly,
            ..Default::default()
        })
        .await
        .map_err(|e| CliError::rpc(format!("publishing volume {volume} to node {node}"), &e))?
        .into_inner()
        .publish_context;
    let staging = ctx.staging(node, &v.id);
    let mut volume_context = HashMap::new();
    if mode != "block" {
        volume_context.insert("fsType".to_owned(), mode.clone());
    }
    let staged = n
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: v.id.clone(),
            publish_context: ctx_pub.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(capability(&mode)),
            volume_context,
            ..Default::default()
        })
        .await;
    if let Err(e) = staged {
        let _ = c
            .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: v.id.clone(),
                node_id: node.to_owned(),
                ..Default::default()
            })
            .await;
        return Err(CliError::rpc(format!("staging volume {volume} on node {node}"), &e));
    }
    if let Some(parent) = mount.parent() {
        std::fs::create_dir_all(parent).map_err(|e| CliError::Io(format!("{}: {e}", parent.display())))?;
    }
    n.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: v.id.clone(),
        publish_context: ctx_pub,
        staging_target_path: staging.display().to_string(),
        target_path: mount.display().to_string(),
        volume_capability: Some(capability(&mode)),
        readonly,
        ..Default::default()
    })
    .await
    .map_err(|e| CliError::rpc(format!("mounting volume {volume} at {}", mount.display()), &e))?;
    let v = a
        .annotate(admin::AnnotateRequest {
            volume: v.id.clone(),
            key: MOUNT.into(),
            value: mount.display().to_string(),
        })
        .await
        .map_err(|e| CliError::rpc("recording the mount", &e))?
        .into_inner();
    Ok(one_volume(&v))
}

pub async fn detach(ctx: &Ctx, volume: &str) -> Result<Out, CliError> {
    let (mut c, mut a) = ctx.controller().await?;
    let v = volume_info(&mut a, volume).await?;
    if v.attached_node.is_empty() {
        return Err(CliError::Usage(format!("volume {volume} is not attached")));
    }
    let node = v.attached_node.clone();
    let mut n = ctx.node(&node).await?;
    if let Some(mount) = v.annotations.get(MOUNT) {
        n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: v.id.clone(),
            target_path: mount.clone(),
        })
        .await
        .map_err(|e| CliError::rpc(format!("unmounting volume {volume}"), &e))?;
    }
    n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: v.id.clone(),
        staging_target_path: ctx.staging(&node, &v.id).display().to_string(),
    })
    .await
    .map_err(|e| CliError::rpc(format!("unstaging volume {volume}"), &e))?;
    c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: v.id.clone(),
        node_id: node.clone(),
        ..Default::default()
    })
    .await
    .map_err(|e| CliError::rpc(format!("unpublishing volume {volume}"), &e))?;
    let v = a
        .annotate(admin::AnnotateRequest { volume: v.id.clone(), key: MOUNT.into(), value: String::new() })
        .await
        .map_err(|e| CliError::rpc("clearing the mount", &e))?
        .into_inner();
    Ok(one_volume(&v))
}

pub async fn snapshot(ctx: &Ctx, cmd: SnapshotCmd) -> Result<Out, CliError> {
    let (mut c, mut a) = ctx.controller().await?;
    let list = |snaps: Vec<admin::SnapshotInfo>| {
        let mut out = Out::value(json!(snaps
            .iter()
            .map(|s| json!({"name": s.name, "id": s.id, "volume": s.volume_name, "volume_id": s.volume_id, "size_bytes": s.size_bytes, "created_unix": s.created_unix, "ready": s.ready, "group": if s.group_id.is_empty() { serde_json::Value::Null } else { json!({"id": s.group_id, "name": s.group_name}) }}))
            .collect::<Vec<_>>()));
        out.headers = vec!["NAME", "VOLUME", "SIZE", "READY", "GROUP"];
        out.rows = snaps
            .iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    if s.volume_name.is_empty() { "(deleted)".into() } else { s.volume_name.clone() },
                    fmt_size(s.size_bytes),
                    s.ready.to_string(),
                    if s.group_name.is_empty() { "-".into() } else { s.group_name.clone() },
                ]
            })
            .collect();
        out
    };
    let all = |a: &mut Admin| {
        let mut a = a.clone();
        async move {
            a.list_snapshots(admin::ListSnapshotsRequest {})
                .await
                .map(|r| r.into_inner().snapshots)
                .map_err(|e| CliError::rpc("listing snapshots", &e))
        }
    };
    match cmd {
        SnapshotCmd::Create { volume, name } => {
            let v = volume_info(&mut a, &volume).await?;
            c.create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: v.id,
                name: name.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| CliError::rpc(format!("snapshotting volume {volume}"), &e))?;
            let snaps: Vec<_> = all(&mut a).await?.into_iter().filter(|s| s.name == name).collect();
            Ok(list(snaps))
        }
        SnapshotCmd::List { volume } => {
            let snaps = all(&mut a).await?;
            let snaps = match volume {
                Some(v) => {
                    let id = volume_info(&mut a, &v).await?.id;
                    snaps.into_iter().filter(|s| s.volume_id == id).collect()
                }
                None => snaps,
            };
            Ok(list(snaps))
        }
        SnapshotCmd::Group { name, volumes } => {
            let mut ids = Vec::with_capacity(volumes.len());
            for v in &volumes {
                ids.push(volume_info(&mut a, v).await?.id);
            }
            #[allow(clippy::print_stderr)]
            {
                eprintln!("holding the IO of {} volumes while each is snapshotted (10 s at most)", ids.len());
            }
            let mut g = ctx.group_controller().await?;
            let t = std::time::Instant::now();
            g.create_volume_group_snapshot(csi::CreateVolumeGroupSnapshotRequest {
                name: name.clone(),
                source_volume_ids: ids,
                ..Default::default()
            })
            .await
            .map_err(|e| CliError::rpc(format!("group snapshot {name}"), &e))?;
            #[allow(clippy::print_stderr)]
            {
                eprintln!("group snapshot {name} taken in {:.1} s", t.elapsed().as_secs_f64());
            }
            let snaps: Vec<_> = all(&mut a).await?.into_iter().filter(|s| s.group_name == name).collect();
            Ok(list(snaps))
        }
        SnapshotCmd::Delete { name } => {
            let snaps = all(&mut a).await?;
            if let Some(group) = snaps.iter().find(|s| s.group_name == name).map(|s| s.group_id.clone()) {
                let mut g = ctx.group_controller().await?;
                g.delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
                    group_snapshot_id: group.clone(),
                    ..Default::default()
                })
                .await
                .map_err(|e| CliError::rpc(format!("deleting group snapshot {name}"), &e))?;
                let mut out = Out::value(json!({"deleted": name, "id": group}));
                out.text = vec![format!("group snapshot {name} and its members deleted")];
                return Ok(out);
            }
            let id = snaps.into_iter().find(|s| s.name == name).map(|s| s.id).ok_or_else(|| {
                CliError::NotFound(format!("no snapshot {name:?} (see `barnacle snapshot list`)"))
            })?;
            c.delete_snapshot(csi::DeleteSnapshotRequest { snapshot_id: id.clone(), ..Default::default() })
                .await
                .map_err(|e| CliError::rpc(format!("deleting snapshot {name}"), &e))?;
            let mut out = Out::value(json!({"deleted": name, "id": id}));
            out.text = vec![format!("snapshot {name} deleted")];
            Ok(out)
        }
    }
}

fn bar(done: u64, total: u64) -> String {
    let pct = (done * 100).checked_div(total).unwrap_or(100).min(100);
    let filled = usize::try_from(pct / 5).unwrap_or(20);
    format!(
        "[{}{}] {pct:>3}% {}/{}",
        "#".repeat(filled),
        ".".repeat(20 - filled),
        fmt_size(done),
        fmt_size(total)
    )
}

async fn status_once(ctx: &Ctx) -> Result<Out, CliError> {
    let (_, mut a) = ctx.controller().await?;
    let vols = a
        .list_volumes(admin::ListVolumesRequest {})
        .await
        .map_err(|e| CliError::rpc("listing volumes", &e))?
        .into_inner()
        .volumes;
    let mut out = Out::value(json!(vols.iter().map(volume_json).collect::<Vec<_>>()));
    out.headers = vec!["VOLUME", "REPLICA", "NODE", "STATE", "EPOCH", "REBUILD"];
    for v in &vols {
        if v.state == "creating" {
            let progress = match &v.clone {
                Some(c) => format!("clone {}", bar(c.done_bytes, c.total_bytes)),
                None => "creating".into(),
            };
            out.rows.push(vec![
                v.name.clone(),
                "-".into(),
                "-".into(),
                "creating".into(),
                "-".into(),
                progress,
            ]);
            continue;
        }
        for r in &v.replicas {
            let rebuild = match &v.rebuild {
                Some(rb) if rb.replica == r.id => {
                    format!("{} {} {}", rb.kind, rb.phase, bar(rb.done_bytes, rb.total_bytes))
                }
                _ => "-".into(),
            };
            out.rows.push(vec![
                v.name.clone(),
                r.id.clone(),
                r.node.clone(),
                r.state.clone(),
                v.epoch.to_string(),
                rebuild,
            ]);
        }
    }
    Ok(out)
}

pub async fn status(ctx: &Ctx, watch: bool, format: crate::Format) -> Result<Out, CliError> {
    if !watch {
        return status_once(ctx).await;
    }
    loop {
        let out = status_once(ctx).await?;
        #[allow(clippy::print_stdout)]
        {
            print!("\x1b[2J\x1b[H");
        }
        out.print(format)?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(Out::default()),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

pub async fn replica(ctx: &Ctx, cmd: ReplicaCmd) -> Result<Out, CliError> {
    let (_, mut a) = ctx.controller().await?;
    match cmd {
        ReplicaCmd::Kill { volume, replica } => {
            let pid = a
                .kill_replica(admin::KillReplicaRequest { volume: volume.clone(), replica: replica.clone() })
                .await
                .map_err(|e| {
                    if e.code() == tonic::Code::NotFound {
                        CliError::NotFound(format!("{} (see `barnacle volume get {volume}`)", e.message()))
                    } else {
                        CliError::rpc(format!("killing replica {replica} of {volume}"), &e)
                    }
                })?
                .into_inner()
                .pid;
            let mut out = Out::value(json!({"volume": volume, "replica": replica, "pid": pid}));
            out.text = vec![format!(
                "killed replica {replica} of {volume} (pid {pid}); watch it come back with `barnacle status --watch`"
            )];
            Ok(out)
        }
    }
}

pub async fn nodes(ctx: &Ctx) -> Result<Out, CliError> {
    let (_, mut a) = ctx.controller().await?;
    let nodes = a
        .list_nodes(admin::ListNodesRequest {})
        .await
        .map_err(|e| CliError::rpc("listing nodes", &e))?
        .into_inner()
        .nodes;
    let mut out = Out::value(json!(nodes
        .iter()
        .map(|n| json!({"name": n.name, "zone": n.zone, "capacity_bytes": n.capacity_bytes, "provisioned_bytes": n.provisioned_bytes, "replicas": n.replicas}))
        .collect::<Vec<_>>()));
    out.headers = vec!["NODE", "ZONE", "CAPACITY", "PROVISIONED", "REPLICAS"];
    out.rows = nodes
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                if n.zone.is_empty() { "-".into() } else { n.zone.clone() },
                fmt_size(n.capacity_bytes),
                fmt_size(n.provisioned_bytes),
                n.replicas.to_string(),
            ]
        })
        .collect();
    Ok(out)
}

/// `barnacle probe`: Identity.Probe on a CSI endpoint, within 10 s.
pub async fn probe(endpoint: &str) -> Result<Out, CliError> {
    let path = std::path::Path::new(endpoint.strip_prefix("unix://").unwrap_or(endpoint));
    let channel = csi_proto::unix_channel(&path.display().to_string())
        .map_err(|e| unreachable("the CSI endpoint", path, e))?;
    let mut c = csi::identity_client::IdentityClient::new(channel);
    let call = c.probe(csi::ProbeRequest {});
    let reply = tokio::time::timeout(std::time::Duration::from_secs(10), call)
        .await
        .map_err(|_| CliError::Io(format!("{}: no answer to Probe within 10 s", path.display())))?
        .map_err(|e| CliError::rpc("probing the plugin", &e))?
        .into_inner();
    // An unset `ready` means ready (CSI spec).
    if reply.ready == Some(false) {
        return Err(CliError::Io(format!("{}: the plugin says it is not ready", path.display())));
    }
    Ok(Out::value(json!({"ready": true})))
}
