//! The controller's domain service: volumes, snapshots, clones, publication and expansion, on a
//! [`Store`] of records and an [`Orchestrator`] of processes. The CSI layer ([`crate::csi`])
//! validates requests and calls it; every operation takes the per-volume guard first.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use barnacle_engine::authority::{Membership, ReplicaRecord, ReplicaState};
use barnacle_engine::mgmt::pb as epb;
use barnacle_replica::mgmt::pb as rpb;
use futures::future::join_all;
use parking_lot::Mutex;
use tracing::{info, warn};
use uuid::Uuid;

use crate::error::{ControllerError, Result};
use crate::orchestrator::{EngineEndpoint, Orchestrator};
use crate::params::VolumeParams;
use crate::placement::{self, NodeInfo};
use crate::rpc;
use crate::store::{
    Attachment, ReplicaPlacement, SnapshotRecord, Store, VolumeRecord, VolumeSource, VolumeState,
};

mod group;
mod modify;
mod replenish;

/// Volume sizes are whole MiB.
pub const SIZE_UNIT: u64 = 1 << 20;
/// Size of a volume whose request gives none.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// Settings of the controller service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Thin volumes may provision this many times a node's capacity.
    pub overcommit: f64,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig { overcommit: 2.0 }
    }
}

/// Operations in progress, by key (`volume/<id>`, `name/<name>`, `snapshot/<id>`, …): an
/// overlapping call on the same key is Aborted rather than queued (CSI expects the caller to retry).
#[derive(Debug, Default)]
pub struct Guards(Mutex<HashSet<String>>);

/// Holds keys of [`Guards`] until dropped.
#[derive(Debug)]
pub struct Guard<'a> {
    guards: &'a Guards,
    keys: Vec<String>,
}

impl Guards {
    /// Takes every key or none.
    pub fn lock(&self, keys: &[String]) -> Result<Guard<'_>> {
        let mut held = self.0.lock();
        if let Some(busy) = keys.iter().find(|k| held.contains(*k)) {
            return Err(ControllerError::Aborted(format!("an operation on {busy} is already in progress")));
        }
        for k in keys {
            held.insert(k.clone());
        }
        Ok(Guard { guards: self, keys: keys.to_vec() })
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let mut held = self.guards.0.lock();
        for k in &self.keys {
            held.remove(k);
        }
    }
}

fn vkey(id: &str) -> String {
    format!("volume/{id}")
}

/// The guard keys of an operation that removes snapshot `s`.
fn snapshot_keys(s: &SnapshotRecord) -> Vec<String> {
    vec![format!("snapshot/{}", s.id), format!("snapshot-name/{}", s.name), vkey(&s.volume_id)]
}

/// How long a reconcile pass waits for one volume's processes.
const RECONCILE_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// A new id: a prefix and 16 hex digits (short, because node paths and socket names carry it).
fn new_id(prefix: &str) -> String {
    let u = Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &u[..16])
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The size a capacity range asks for: whole MiB, within the limit.
pub fn volume_size(required: i64, limit: i64) -> Result<u64> {
    if required < 0 || limit < 0 {
        return Err(ControllerError::InvalidArgument("capacity_range bytes must not be negative".into()));
    }
    let (required, limit) = (required.cast_unsigned(), limit.cast_unsigned());
    if limit > 0 && required > limit {
        return Err(ControllerError::InvalidArgument(format!(
            "required_bytes {required} is more than limit_bytes {limit}"
        )));
    }
    let size = if required == 0 {
        if limit > 0 { DEFAULT_SIZE.min(limit / SIZE_UNIT * SIZE_UNIT) } else { DEFAULT_SIZE }
    } else {
        required.div_ceil(SIZE_UNIT) * SIZE_UNIT
    };
    if size == 0 || (limit > 0 && size > limit) {
        return Err(ControllerError::OutOfRange(format!(
            "volumes are whole MiB: no size fits between {required} and {limit} bytes"
        )));
    }
    Ok(size)
}

/// What CreateVolume asks for, validated.
#[derive(Debug, Clone)]
pub struct CreateVolume {
    pub name: String,
    pub required_bytes: i64,
    pub limit_bytes: i64,
    pub params: VolumeParams,
    pub source: Option<VolumeSource>,
    pub requisite: Vec<HashMap<String, String>>,
    pub preferred: Vec<HashMap<String, String>>,
}

/// A publication request, validated.
#[derive(Debug, Clone)]
pub struct Publish {
    pub volume_id: String,
    pub node: String,
    pub readonly: bool,
    pub block: bool,
    pub access_mode: i32,
}

/// The state of a volume's data, for ControllerGetVolume's volume condition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Condition {
    pub abnormal: bool,
    pub message: String,
}

/// What ListVolumes of the admin API shows beyond the record.
#[derive(Debug, Clone, Default)]
pub struct Details {
    /// Replica id → (state, ejection epoch).
    pub replicas: HashMap<String, (String, u64)>,
    pub epoch: u64,
    pub condition: Condition,
    pub rebuild: Option<RebuildDetails>,
    /// The engine's scrub (running or last) and damage counters, as it reports them.
    pub scrub: Option<epb::Scrub>,
    pub damage: (u64, u64, u64),
    /// Replica id → seconds since it was first seen lost (replenishment), for those that are.
    pub lost: HashMap<String, u64>,
}

/// A rebuild in progress.
#[derive(Debug, Clone, Default)]
pub struct RebuildDetails {
    pub replica: String,
    pub kind: String,
    pub phase: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// The controller.
pub struct Service {
    store: Arc<dyn Store>,
    orch: Arc<dyn Orchestrator>,
    cfg: ServiceConfig,
    guards: Guards,
    /// The identity this controller fences replicas under on detach.
    fencer: Uuid,
    recovered: std::sync::atomic::AtomicBool,
    /// Set once this controller leads (at once without leader election).
    leading: std::sync::atomic::AtomicBool,
    /// Held from reading what nodes hold to recording a new placement or size, so two
    /// operations cannot both take the same room.
    placing: tokio::sync::Mutex<()>,
    /// Clones in progress: volume id → (bytes done, bytes in all).
    cloning: Mutex<HashMap<String, (u64, u64)>>,
    /// (volume id, replica id) → when the replica was first seen lost (replenishment).
    lost_since: Mutex<HashMap<(String, String), std::time::Instant>>,
    replenish_counters: crate::metrics::ReplenishCounters,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").field("cfg", &self.cfg).finish_non_exhaustive()
    }
}

impl Service {
    pub fn new(store: Arc<dyn Store>, orch: Arc<dyn Orchestrator>, cfg: ServiceConfig) -> Service {
        Service {
            store,
            orch,
            cfg,
            guards: Guards::default(),
            fencer: Uuid::new_v4(),
            recovered: std::sync::atomic::AtomicBool::new(false),
            leading: std::sync::atomic::AtomicBool::new(false),
            placing: tokio::sync::Mutex::new(()),
            cloning: Mutex::new(HashMap::new()),
            lost_since: Mutex::new(HashMap::new()),
            replenish_counters: crate::metrics::ReplenishCounters::default(),
        }
    }

    /// Runs a blocking store call off the async threads.
    pub(crate) async fn db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| ControllerError::Store(e.to_string()))?
    }

    async fn volume(&self, id: &str) -> Result<Option<VolumeRecord>> {
        let id = id.to_owned();
        self.db(move |s| s.volume(&id)).await
    }

    async fn put_volume(&self, v: &VolumeRecord) -> Result<()> {
        let v = v.clone();
        self.db(move |s| s.put_volume(&v)).await
    }

    async fn live_volume(&self, id: &str) -> Result<VolumeRecord> {
        self.volume(id)
            .await?
            .filter(|v| v.state != VolumeState::Deleted)
            .ok_or_else(|| ControllerError::NotFound(format!("volume {id} does not exist")))
    }

    /// Ready when the store and the orchestrator are usable and the processes of existing volumes
    /// have been looked after since start.
    /// A standby (not leading yet) is ready: it is healthy, and only the leader gets calls.
    pub async fn probe(&self) -> Result<bool> {
        self.db(|s| s.check()).await?;
        self.orch.check()?;
        let leading = self.leading.load(std::sync::atomic::Ordering::Relaxed);
        Ok(!leading || self.recovered.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// This controller leads from now on: recovery follows.
    /// Whether this controller leads (and has recovered its volumes).
    pub fn is_leading(&self) -> bool {
        self.leading.load(std::sync::atomic::Ordering::Relaxed)
            && self.recovered.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_leading(&self) {
        self.leading.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// After a (re)start: adopts or restarts the replicas of every volume and the engines of
    /// published ones. Volumes still being created are finished by the repeated CreateVolume.
    pub async fn recover(&self) -> Result<()> {
        let volumes = self.db(|s| s.volumes()).await?;
        let snapshots = self.db(|s| s.snapshots()).await?;
        // A deleted volume kept for snapshots that are all gone (a crash between the two).
        for v in volumes.iter().filter(|v| v.state == VolumeState::Deleted) {
            if !snapshots.iter().any(|s| s.volume_id == v.id) {
                for r in &v.replicas {
                    self.orch.adopt_replica(v, r);
                }
                if let Err(e) = self.destroy(v).await {
                    warn!(volume_id = %v.id, error = %e, "a deleted volume was not removed");
                }
            }
        }
        let volumes: Vec<VolumeRecord> = volumes
            .into_iter()
            .filter(|v| v.state != VolumeState::Deleted || snapshots.iter().any(|s| s.volume_id == v.id))
            .collect();
        // Processes of a create that was interrupted: watched, so the repeated create can stop them.
        for v in volumes.iter().filter(|v| v.state == VolumeState::Creating) {
            for r in &v.replicas {
                self.orch.adopt_replica(v, r);
            }
        }
        join_all(volumes.iter().filter(|v| v.state != VolumeState::Creating).map(|v| async move {
            let id = &v.id;
            let res = async {
                let replicas = self.start_replicas(v).await?;
                if let Some(att) = &v.attachment {
                    self.orch.ensure_engine(v, att, &replicas).await?;
                }
                Ok::<_, ControllerError>(())
            }
            .await;
            match res {
                Ok(()) => info!(volume_id = %id, attached = v.attachment.is_some(), "volume recovered"),
                Err(e) => warn!(volume_id = %id, error = %e, "volume not fully recovered (its processes keep being restarted)"),
            }
        }))
        .await;
        self.recovered.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Brings back what should run and does not (for an orchestrator whose processes can vanish,
    /// such as pods; called periodically): the replicas of every volume, the engine of every
    /// published one. A volume busy with another operation waits for the next pass.
    pub async fn reconcile(&self) -> Result<()> {
        if self.ready().is_err() {
            return Ok(());
        }
        let volumes = self.db(|s| s.volumes()).await?;
        join_all(volumes.iter().filter(|v| v.state != VolumeState::Creating).map(|v| async move {
            let Ok(_g) = self.guards.lock(&[vkey(&v.id)]) else { return };
            let Ok(Some(v)) = self.volume(&v.id).await else { return };
            if v.state == VolumeState::Creating {
                return;
            }
            let res = async {
                let replicas = self.start_replicas(&v).await?;
                if let Some(att) = &v.attachment {
                    self.orch.ensure_engine(&v, att, &replicas).await?;
                }
                Ok::<_, ControllerError>(())
            };
            // What was missing has been started by then; waiting longer for it would hold the
            // volume's guard against the calls of the CSI sidecars.
            match tokio::time::timeout(RECONCILE_WAIT, res).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(volume_id = %v.id, error = %e, "reconcile: the volume's processes are not all running");
                }
                Err(_) => warn!(volume_id = %v.id, "reconcile: the volume's processes are not ready yet"),
            }
        }))
        .await;
        Ok(())
    }

    /// Starts (or finds) every replica process of `v`; returns (replica id, data address).
    async fn start_replicas(&self, v: &VolumeRecord) -> Result<Vec<(String, String)>> {
        let eps = join_all(v.replicas.iter().map(|r| self.orch.ensure_replica(v, r, None))).await;
        v.replicas.iter().zip(eps).map(|(r, ep)| ep.map(|ep| (r.id.clone(), ep.data))).collect()
    }

    /// Changes wait until recovery has looked after existing volumes: a retried call must not
    /// race the recovery of the same volume.
    fn ready(&self) -> Result<()> {
        if self.recovered.load(std::sync::atomic::Ordering::Relaxed) {
            Ok(())
        } else if !self.leading.load(std::sync::atomic::Ordering::Relaxed) {
            Err(ControllerError::Unavailable("this controller is a standby, not the leader; retry".into()))
        } else {
            Err(ControllerError::Unavailable("the controller is recovering its volumes; retry".into()))
        }
    }

    fn nodes(&self) -> Vec<NodeInfo> {
        self.orch.nodes()
    }

    pub fn node_exists(&self, name: &str) -> bool {
        self.nodes().iter().any(|n| n.name == name)
    }

    // ---- volumes ----

    /// CreateVolume: idempotent by name; a repeat of an interrupted create finishes it.
    pub async fn create_volume(&self, req: CreateVolume) -> Result<VolumeRecord> {
        self.ready()?;
        let size = volume_size(req.required_bytes, req.limit_bytes)?;
        let mut keys = vec![format!("name/{}", req.name)];
        match &req.source {
            Some(VolumeSource::Volume(id)) => keys.push(vkey(id)),
            Some(VolumeSource::Snapshot(id)) => keys.push(format!("snapshot/{id}")),
            None => {}
        }
        let _g = self.guards.lock(&keys)?;
        let name = req.name.clone();
        if let Some(existing) = self.db(move |s| s.volume_by_name(&name)).await? {
            let fits = existing.size >= req.required_bytes.cast_unsigned()
                && (req.limit_bytes == 0 || existing.size <= req.limit_bytes.cast_unsigned());
            if !fits || existing.params != req.params || existing.source != req.source {
                return Err(ControllerError::AlreadyExists(format!(
                    "volume {} exists with another size, parameters or source (as {})",
                    req.name, existing.id
                )));
            }
            if existing.state == VolumeState::Ready {
                return Ok(existing);
            }
            info!(volume_id = %existing.id, name = %req.name, "finishing an interrupted create");
            return self.build_volume(existing, true).await;
        }

        // The source decides where clone replicas go: beside the source's in-sync replicas.
        let mut clone_from: Vec<ReplicaPlacement> = Vec::new();
        let mut min_size = 0;
        match &req.source {
            Some(VolumeSource::Snapshot(sid)) => {
                let sid2 = sid.clone();
                let snap = self
                    .db(move |s| s.snapshot(&sid2))
                    .await?
                    .filter(|s| s.ready)
                    .ok_or_else(|| ControllerError::NotFound(format!("snapshot {sid} does not exist")))?;
                let src = self.volume(&snap.volume_id).await?.ok_or_else(|| {
                    ControllerError::NotFound(format!("snapshot {sid}: its volume is gone"))
                })?;
                clone_from = self.in_sync_replicas(&src).await?;
                min_size = snap.size;
            }
            Some(VolumeSource::Volume(vid)) => {
                let src = self.live_volume(vid).await?;
                clone_from = self.in_sync_replicas(&src).await?;
                min_size = src.size;
            }
            None => {}
        }
        if size < min_size {
            return Err(ControllerError::OutOfRange(format!(
                "the source holds {min_size} bytes; the volume would have {size}"
            )));
        }
        let placing = self.placing.lock().await;
        let all = self.db(|s| s.volumes()).await?;
        let mut placed: Vec<String> =
            clone_from.iter().map(|r| r.node.clone()).take(req.params.replicas).collect();
        if placed.len() < req.params.replicas {
            let more = self.place_more(
                &all,
                &placement::Request {
                    size,
                    replicas: req.params.replicas - placed.len(),
                    allow_fewer: req.params.allow_fewer_replicas,
                    thin: req.params.thin,
                    overcommit: self.cfg.overcommit,
                    requisite: &req.requisite,
                    preferred: &req.preferred,
                    exclude: &placed,
                    pod: None,
                    compute_used: &Default::default(),
                },
            );
            match more {
                Ok(nodes) => placed.extend(nodes),
                // A clone keeps the copies it can make beside the source, where fewer may do.
                Err(_) if !placed.is_empty() && req.params.allow_fewer_replicas => {}
                Err(e) => return Err(e),
            }
        }
        if placed.len() < req.params.min_healthy_replicas {
            return Err(ControllerError::ResourceExhausted(format!(
                "only {} replicas can be placed; minHealthyReplicas is {}",
                placed.len(),
                req.params.min_healthy_replicas
            )));
        }
        let mut replicas = Vec::with_capacity(placed.len());
        for (i, node) in placed.into_iter().enumerate() {
            let port = self.assign_port(&all, &node).await?;
            replicas.push(ReplicaPlacement { id: format!("r{i}"), node, port });
        }
        let replica_ids_issued = replicas.len();
        let v = VolumeRecord {
            id: new_id("vol"),
            name: req.name.clone(),
            size,
            params: req.params.clone(),
            replicas,
            source: req.source.clone(),
            attachment: None,
            generation: 0,
            state: VolumeState::Creating,
            created_unix: now_unix(),
            annotations: BTreeMap::new(),
            replica_ids_issued,
            lost_replicas: Vec::new(),
            replicas_replenished: 0,
        };
        self.put_volume(&v).await?;
        drop(placing);
        info!(volume_id = %v.id, name = %v.name, size, replicas = ?v.replicas, source = ?v.source, "creating volume");
        self.build_volume(v, false).await
    }

    /// Nodes for the replicas `req` asks for, with the nodes' provisioned bytes and, where the
    /// orchestrator counts them, their pods' CPU and memory taken from `all` (read under the
    /// placement lock); `req.pod` and `req.compute_used` are filled in here.
    fn place_more(&self, all: &[VolumeRecord], req: &placement::Request<'_>) -> Result<Vec<String>> {
        let used = crate::store::provisioned_by_node(all);
        let requests = self.orch.pod_requests();
        let compute_used = match requests {
            Some(r) => crate::store::compute_by_node(all, r.replica, r.engine, None),
            None => Default::default(),
        };
        let req =
            placement::Request { pod: requests.map(|r| r.replica), compute_used: &compute_used, ..*req };
        placement::place(&self.nodes(), &used, &req)
    }

    /// A free pair of host ports on `node` when the orchestrator uses them: free in the records
    /// and on the node (call with the placement lock held, `all` read under it).
    async fn assign_port(&self, all: &[VolumeRecord], node: &str) -> Result<Option<u16>> {
        let Some(range) = self.orch.ports() else { return Ok(None) };
        let mut taken = crate::store::ports_on_node(all, node);
        taken.extend(self.orch.ports_held(node).await?);
        crate::store::free_port_pair(&range, &taken).map(Some).ok_or_else(|| {
            ControllerError::ResourceExhausted(format!(
                "node {node} has no free port pair in {}-{}",
                range.start(),
                range.end()
            ))
        })
    }

    /// The volume's membership record (a blocking read, done off the async threads).
    async fn membership(&self, id: &str) -> Result<Option<barnacle_engine::authority::Versioned>> {
        let Some(a) = self.orch.authority(id, false)? else { return Ok(None) };
        tokio::task::spawn_blocking(move || a.load())
            .await
            .map_err(|e| ControllerError::orchestrator(id, e))?
            .map_err(|e| ControllerError::orchestrator(id, e))
    }

    /// The replicas of `v` that are in sync (healthy in its membership record; all of them when
    /// it has none yet).
    async fn in_sync_replicas(&self, v: &VolumeRecord) -> Result<Vec<ReplicaPlacement>> {
        Ok(match self.membership(&v.id).await? {
            Some(m) => v
                .replicas
                .iter()
                .filter(|r| m.membership.replica(&r.id).is_some_and(|rec| rec.state == ReplicaState::Healthy))
                .cloned()
                .collect(),
            None => v.replicas.clone(),
        })
    }

    /// Makes the replicas of a volume in state Creating (from scratch: a repeat first removes what
    /// an interrupted attempt left), writes its first membership record, and marks it Ready.
    async fn build_volume(&self, mut v: VolumeRecord, resumed: bool) -> Result<VolumeRecord> {
        if resumed {
            self.remove_replicas(&v).await?;
        }
        self.orch.create_token(&v.id).await?;
        let result = self.make_replicas(&v).await;
        self.cloning.lock().remove(&v.id);
        let (healthy, empty) = match result {
            Ok(x) => x,
            Err(e) => {
                warn!(volume_id = %v.id, error = %e, "create failed; removing its replicas");
                let _ = self.remove_replicas(&v).await;
                return Err(e);
            }
        };
        let records: Vec<ReplicaRecord> = v
            .replicas
            .iter()
            .filter_map(|r| {
                let (state, addr) = if let Some(a) = healthy.get(&r.id) {
                    (ReplicaState::Healthy, a.clone())
                } else {
                    // Not a copy of the source yet: the engine gives it a full rebuild (rule 7).
                    (ReplicaState::Ejected { epoch: 0 }, empty.get(&r.id)?.clone())
                };
                Some(ReplicaRecord {
                    id: r.id.clone(),
                    addr,
                    state,
                    store_id: None,
                    tracked_since: 0,
                    missed_regions: Vec::new(),
                })
            })
            .collect();
        let authority = self
            .orch
            .authority(&v.id, true)?
            .ok_or_else(|| ControllerError::orchestrator(&v.id, "no membership authority"))?;
        let id = v.id.clone();
        let settings = v.params.settings();
        tokio::task::spawn_blocking(move || {
            let expected = authority.load()?.map(|x| x.version);
            authority.compare_and_set(
                expected,
                &Membership { epoch: 0, engine_id: None, replicas: records, settings: Some(settings) },
            )
        })
        .await
        .map_err(|e| ControllerError::orchestrator(&id, e))?
        .map_err(|e| ControllerError::orchestrator(&id, e))?;
        v.state = VolumeState::Ready;
        self.put_volume(&v).await?;
        info!(volume_id = %v.id, name = %v.name, "volume created");
        Ok(v)
    }

    /// Creates the replica stores: empty ones, or clones beside the source's replicas. Returns the
    /// data addresses of the replicas holding the volume's data, and of those still empty (clone
    /// replicas beyond the source's copies).
    async fn make_replicas(
        &self,
        v: &VolumeRecord,
    ) -> Result<(BTreeMap<String, String>, BTreeMap<String, String>)> {
        let (mut healthy, mut empty) = (BTreeMap::new(), BTreeMap::new());
        let Some(source) = &v.source else {
            let eps = join_all(v.replicas.iter().map(|r| self.orch.ensure_replica(v, r, Some(v.size)))).await;
            for (r, ep) in v.replicas.iter().zip(eps) {
                healthy.insert(r.id.clone(), ep?.data);
            }
            return Ok((healthy, empty));
        };
        // The snapshot to clone, taking a temporary one of a source volume.
        let (src, snapshot, temporary) = match source {
            VolumeSource::Snapshot(sid) => {
                let sid2 = sid.clone();
                let snap = self
                    .db(move |s| s.snapshot(&sid2))
                    .await?
                    .ok_or_else(|| ControllerError::NotFound(format!("snapshot {sid} does not exist")))?;
                let src = self.volume(&snap.volume_id).await?.ok_or_else(|| {
                    ControllerError::NotFound(format!("snapshot {sid}: its volume is gone"))
                })?;
                (src, sid.clone(), false)
            }
            VolumeSource::Volume(vid) => {
                let src = self.live_volume(vid).await?;
                let name = format!("clone-{}", v.id);
                self.snapshot_on_replicas_or_engine(&src, &name).await?;
                (src, name, true)
            }
        };
        let result = self.clone_replicas(v, &src, &snapshot, &mut healthy, &mut empty).await;
        if temporary && let Err(e) = self.delete_snapshot_data(&src, &snapshot).await {
            warn!(volume_id = %src.id, snapshot, error = %e, "temporary clone snapshot not deleted");
        }
        result?;
        Ok((healthy, empty))
    }

    async fn clone_replicas(
        &self,
        v: &VolumeRecord,
        src: &VolumeRecord,
        snapshot: &str,
        healthy: &mut BTreeMap<String, String>,
        empty: &mut BTreeMap<String, String>,
    ) -> Result<()> {
        let token = self.orch.token(&src.id).await?;
        let sources = self.in_sync_replicas(src).await?;
        for r in &v.replicas {
            let Some(from) = sources.iter().find(|s| s.node == r.node) else {
                let ep = self.orch.ensure_replica(v, r, Some(v.size)).await?;
                empty.insert(r.id.clone(), ep.data);
                continue;
            };
            let ep = self.orch.ensure_replica(src, from, None).await?;
            let mut c = rpc::replica_mgmt(&src.id, &ep.mgmt, &token).await?;
            let target = self.orch.clone_target_name(&v.id, r);
            let mut stream = c
                .clone_snapshot(tonic::Request::new(rpb::CloneSnapshotRequest {
                    snapshot: snapshot.to_owned(),
                    target_name: target.clone(),
                    target_volume_id: v.id.clone(),
                }))
                .await
                .map_err(|s| rpc::call_err(&src.id, "clone", &s))?
                .into_inner();
            let mut finished = None;
            let base = self.cloning.lock().get(&v.id).map_or((0, 0), |p| *p);
            while let Some(p) = stream.message().await.map_err(|s| rpc::call_err(&src.id, "clone", &s))? {
                self.cloning
                    .lock()
                    .insert(v.id.clone(), (base.0 + p.done_bytes, base.1.max(base.0 + p.total_bytes)));
                info!(volume_id = %v.id, replica = %r.id, source = %src.id, snapshot, done = p.done_bytes,
                      total = p.total_bytes, "clone progress");
                if p.finished {
                    finished = Some(p.mode);
                }
            }
            let mode = finished.ok_or_else(|| ControllerError::orchestrator(&v.id, "clone ended early"))?;
            info!(volume_id = %v.id, replica = %r.id, mode, "replica cloned");
            let ep = self.orch.ensure_replica(v, r, None).await?;
            if self.replica_size(v, &ep.mgmt).await? < v.size {
                let mut c = rpc::replica_mgmt(&v.id, &ep.mgmt, &self.orch.token(&v.id).await?).await?;
                c.resize(rpc::req(rpb::ResizeRequest { size_bytes: v.size }))
                    .await
                    .map_err(|s| rpc::call_err(&v.id, "resize", &s))?;
            }
            healthy.insert(r.id.clone(), ep.data);
        }
        Ok(())
    }

    async fn replica_size(&self, v: &VolumeRecord, mgmt: &str) -> Result<u64> {
        let mut c = rpc::replica_mgmt(&v.id, mgmt, &self.orch.token(&v.id).await?).await?;
        Ok(c.stat(rpc::req(rpb::StatRequest {}))
            .await
            .map_err(|s| rpc::call_err(&v.id, "stat", &s))?
            .into_inner()
            .size_bytes)
    }

    /// DeleteVolume: idempotent; a published volume is FailedPrecondition; a volume with snapshots
    /// is kept (hidden) until its last snapshot goes.
    pub async fn delete_volume(&self, id: &str) -> Result<()> {
        self.ready()?;
        let _g = self.guards.lock(&[vkey(id)])?;
        let Some(mut v) = self.volume(id).await? else { return Ok(()) };
        if v.state == VolumeState::Deleted {
            return Ok(());
        }
        if let Some(a) = &v.attachment {
            return Err(ControllerError::FailedPrecondition(format!(
                "volume {id} is published on node {}: unpublish it first",
                a.node
            )));
        }
        let vid = id.to_owned();
        let snapshots =
            self.db(move |s| Ok(s.snapshots()?.into_iter().filter(|x| x.volume_id == vid).count())).await?;
        if snapshots > 0 && v.state == VolumeState::Ready {
            v.state = VolumeState::Deleted;
            self.put_volume(&v).await?;
            info!(volume_id = %id, snapshots, "volume deleted; its replicas are kept for its snapshots");
            return Ok(());
        }
        self.destroy(&v).await
    }

    /// Removes every replica of `v` (on their nodes at once); the first error, after all tried.
    async fn remove_replicas(&self, v: &VolumeRecord) -> Result<()> {
        // Replicas replaced while their node was away go too (their data stays if it still is).
        join_all(v.replicas.iter().chain(&v.lost_replicas).map(|r| self.orch.remove_replica(&v.id, r)))
            .await
            .into_iter()
            .collect()
    }

    /// Removes every process, file and record of a volume.
    async fn destroy(&self, v: &VolumeRecord) -> Result<()> {
        self.orch.stop_engine(&v.id).await?;
        self.remove_replicas(v).await?;
        self.orch.forget_volume(&v.id).await?;
        let id = v.id.clone();
        self.db(move |s| s.delete_volume(&id)).await?;
        info!(volume_id = %v.id, name = %v.name, "volume destroyed");
        Ok(())
    }

    /// A live volume's record.
    pub async fn get_volume(&self, id: &str) -> Result<VolumeRecord> {
        self.live_volume(id).await
    }

    /// Abnormal when a replica is out of the configuration, rebuilding, or not running.
    pub async fn condition(&self, v: &VolumeRecord) -> Condition {
        let mut problems = Vec::new();
        if v.attachment.is_some() {
            match self.engine_status(v).await {
                Ok(st) => {
                    for r in &st.replicas {
                        if r.state != "healthy" {
                            problems.push(format!("replica {} is {}", r.id, r.state));
                        }
                    }
                    if let Some(rb) = &st.rebuild {
                        problems.push(format!(
                            "rebuilding replica {} ({}, {}/{} bytes)",
                            rb.replica, rb.kind, rb.done_bytes, rb.total_bytes
                        ));
                    }
                }
                Err(e) => problems.push(format!("engine unreachable: {e}")),
            }
        } else {
            match self.membership(&v.id).await {
                Ok(Some(m)) => {
                    for r in &m.membership.replicas {
                        if let ReplicaState::Ejected { epoch } = r.state {
                            problems.push(format!(
                                "replica {} out of sync since epoch {epoch}; rebuilt when the volume is next published",
                                r.id
                            ));
                        }
                    }
                }
                Ok(None) => problems.push("no membership record".into()),
                Err(e) => problems.push(e.to_string()),
            }
        }
        for r in &v.replicas {
            if let Some(d) = self.lost_for(&v.id, &r.id) {
                let wait = match v.params.replenish_after() {
                    Some(w) => format!("replaced after {}s", w.as_secs()),
                    None => "never replaced (replicaReplenishAfter=never)".to_owned(),
                };
                problems.push(format!(
                    "replica {} on node {} lost for {}s; {wait}",
                    r.id,
                    r.node,
                    d.as_secs()
                ));
            }
        }
        let abnormal = !problems.is_empty();
        let message =
            if abnormal { problems.join("; ") } else { format!("{} replicas in sync", v.replicas.len()) };
        Condition { abnormal, message }
    }

    /// A management client of the volume's engine (the volume is published).
    async fn engine_client(&self, v: &VolumeRecord) -> Result<rpc::EngineMgmt> {
        let ep = self.engine_for(v)?;
        rpc::engine_mgmt(&v.id, &ep.mgmt, &self.orch.token(&v.id).await?).await
    }

    async fn engine_status(&self, v: &VolumeRecord) -> Result<epb::StatusResponse> {
        let mut c = self.engine_client(v).await?;
        Ok(c.status(rpc::req(epb::StatusRequest {}))
            .await
            .map_err(|s| rpc::call_err(&v.id, "status", &s))?
            .into_inner())
    }

    /// Live volumes ordered by id, after `start` (exclusive), at most `max` (0: all). Returns the
    /// next token. Volumes created or deleted between pages do not disturb the others.
    pub async fn list_volumes(&self, start: &str, max: usize) -> Result<(Vec<VolumeRecord>, String)> {
        if !start.is_empty() && !start.starts_with("vol-") {
            return Err(ControllerError::Aborted(format!(
                "starting_token {start:?} is not one this controller gave"
            )));
        }
        let all = self.db(|s| s.volumes()).await?;
        let mut page: Vec<VolumeRecord> =
            all.into_iter().filter(|v| v.state == VolumeState::Ready && v.id.as_str() > start).collect();
        let next = if max > 0 && page.len() > max {
            page.truncate(max);
            page.last().map(|v| v.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok((page, next))
    }

    /// (available bytes, largest volume) for volumes with `params`, on nodes matching `topology`.
    pub async fn capacity(
        &self,
        params: &VolumeParams,
        topology: Option<&HashMap<String, String>>,
    ) -> Result<(u64, u64)> {
        let all = self.db(|s| s.volumes()).await?;
        let used = crate::store::provisioned_by_node(&all);
        let nodes = self.nodes();
        let mut rooms: Vec<u64> = nodes
            .iter()
            .filter(|n| topology.is_none_or(|t| n.matches(t)))
            .map(|n| placement::room(n, &used, self.cfg.overcommit, params.thin))
            .collect();
        rooms.sort_unstable_by(|a, b| b.cmp(a));
        let available = rooms.iter().sum();
        let replicas = params.replicas.min(nodes.len()).max(1);
        // Replicas need distinct nodes: the largest volume is bounded by the replicas-th roomiest
        // node (of the segment, when it holds that many; else of the segment's roomiest).
        let largest = rooms.get(replicas - 1).or(rooms.last()).copied().unwrap_or(0);
        Ok((available, largest / SIZE_UNIT * SIZE_UNIT))
    }

    // ---- publication ----

    /// ControllerPublishVolume: starts the engine on the node; returns the publish context.
    pub async fn publish(&self, p: Publish) -> Result<HashMap<String, String>> {
        self.ready()?;
        let _g = self.guards.lock(&[vkey(&p.volume_id)])?;
        let mut v = self.live_volume(&p.volume_id).await?;
        if !self.node_exists(&p.node) {
            return Err(ControllerError::NotFound(format!("node {} is not known", p.node)));
        }
        let att = match &v.attachment {
            Some(a) if a.node != p.node => {
                return Err(ControllerError::FailedPrecondition(format!(
                    "volume {} is published on node {} and allows one node",
                    v.id, a.node
                )));
            }
            Some(a) if a.readonly != p.readonly || a.block != p.block || a.access_mode != p.access_mode => {
                return Err(ControllerError::AlreadyExists(format!(
                    "volume {} is published on node {} with another capability or readonly flag",
                    v.id, a.node
                )));
            }
            Some(a) => a.clone(),
            None => {
                let placing = self.placing.lock().await;
                let all = self.db(|s| s.volumes()).await?;
                self.engine_fits(&all, &v.id, &p.node)?;
                let port = match self.orch.ports() {
                    Some(_) => self.assign_port(&all, &p.node).await?,
                    None => None,
                };
                let a = Attachment {
                    node: p.node.clone(),
                    generation: v.generation + 1,
                    readonly: p.readonly,
                    block: p.block,
                    access_mode: p.access_mode,
                    port,
                };
                v.generation = a.generation;
                v.attachment = Some(a.clone());
                self.put_volume(&v).await?;
                drop(placing);
                a
            }
        };
        let replicas = self.start_replicas(&v).await?;
        let ep = self.orch.ensure_engine(&v, &att, &replicas).await?;
        info!(volume_id = %v.id, node = %p.node, generation = att.generation, socket = %ep.nbd_socket.display(), "published");
        Ok(publish_context(&v, &att, &ep))
    }

    /// Whether `node` has CPU and memory for the engine pod of volume `volume_id`, with the
    /// records' other pods counted: a pod the kubelet would refuse (OutOfcpu) is never created.
    fn engine_fits(&self, all: &[VolumeRecord], volume_id: &str, node: &str) -> Result<()> {
        let Some(r) = self.orch.pod_requests() else { return Ok(()) };
        let used = crate::store::compute_by_node(all, r.replica, r.engine, Some(volume_id));
        let mut used_here = used.get(node).copied().unwrap_or_default();
        // This volume's own replica on the node stays.
        let own = all
            .iter()
            .find(|v| v.id == volume_id)
            .map_or(0, |v| v.replicas.iter().filter(|x| x.node == node).count());
        for _ in 0..own {
            used_here.add(&r.replica);
        }
        let info = self.nodes().into_iter().find(|n| n.name == node);
        let Some(room) = info.and_then(|n| n.compute).map(|c| c.saturating_sub(&used_here)) else {
            return Ok(());
        };
        if room.fits(&r.engine) {
            Ok(())
        } else {
            Err(ControllerError::ResourceExhausted(format!(
                "node {node} has {room} left for Barnacle's pods; the volume's engine pod needs {}",
                r.engine
            )))
        }
    }

    /// ControllerUnpublishVolume: stops the engine and fences the volume (rule 10). OK when the
    /// volume or the publication does not exist.
    pub async fn unpublish(&self, volume_id: &str, node: Option<&str>) -> Result<()> {
        self.ready()?;
        let _g = self.guards.lock(&[vkey(volume_id)])?;
        let Some(mut v) = self.volume(volume_id).await? else { return Ok(()) };
        let Some(att) = v.attachment.clone() else { return Ok(()) };
        if node.is_some_and(|n| n != att.node) {
            return Ok(());
        }
        self.orch.stop_engine(&v.id).await?;
        self.fence(&v).await?;
        v.attachment = None;
        self.put_volume(&v).await?;
        info!(volume_id = %v.id, node = %att.node, generation = att.generation, "unpublished and fenced");
        Ok(())
    }

    /// Takes the volume's next epoch with no engine, and fences every reachable replica with it:
    /// an engine that outlived its detach can no longer write.
    async fn fence(&self, v: &VolumeRecord) -> Result<()> {
        let Some(authority) = self.orch.authority(&v.id, false)? else { return Ok(()) };
        let id = v.id.clone();
        let record = tokio::task::spawn_blocking(
            move || -> Result<Option<Membership>, barnacle_engine::authority::AuthorityError> {
                let Some(cur) = authority.load()? else { return Ok(None) };
                let mut m = cur.membership;
                m.epoch += 1;
                m.engine_id = None;
                authority.compare_and_set(Some(cur.version), &m)?;
                Ok(Some(m))
            },
        )
        .await
        .map_err(|e| ControllerError::orchestrator(&id, e))?
        .map_err(|e| ControllerError::orchestrator(&id, format!("fencing: {e}")))?;
        let Some(m) = record else { return Ok(()) };
        let token = self.orch.token(&v.id).await?;
        let results = join_all(
            m.replicas.iter().map(|r| rpc::fence_replica(&v.id, &token, &r.addr, m.epoch, self.fencer)),
        )
        .await;
        for (r, res) in m.replicas.iter().zip(results) {
            if let Err(e) = res {
                // Unreachable replicas are fenced by the next engine, which waits out the lease.
                warn!(volume_id = %v.id, replica = %r.id, error = %e, "replica not fenced on detach");
            }
        }
        Ok(())
    }

    // ---- snapshots ----

    /// CreateSnapshot: idempotent by name.
    pub async fn create_snapshot(&self, name: &str, source: &str) -> Result<SnapshotRecord> {
        self.ready()?;
        let _g = self.guards.lock(&[format!("snapshot-name/{name}"), vkey(source)])?;
        let n = name.to_owned();
        if let Some(s) = self.db(move |st| st.snapshot_by_name(&n)).await? {
            if s.volume_id != source {
                return Err(ControllerError::AlreadyExists(format!(
                    "snapshot {name} exists for another volume ({})",
                    s.volume_id
                )));
            }
            if s.ready {
                return Ok(s);
            }
            let v = self.live_volume(source).await?;
            return self.take_snapshot(&v, s).await;
        }
        let v = self.live_volume(source).await?;
        let s = SnapshotRecord {
            id: new_id("snap"),
            name: name.to_owned(),
            volume_id: v.id.clone(),
            size: v.size,
            created_unix: now_unix(),
            ready: false,
            group: None,
        };
        let s2 = s.clone();
        self.db(move |st| st.put_snapshot(&s2)).await?;
        self.take_snapshot(&v, s).await
    }

    async fn take_snapshot(&self, v: &VolumeRecord, mut s: SnapshotRecord) -> Result<SnapshotRecord> {
        self.snapshot_on_replicas_or_engine(v, &s.id).await?;
        s.ready = true;
        let s2 = s.clone();
        self.db(move |st| st.put_snapshot(&s2)).await?;
        info!(volume_id = %v.id, snapshot = %s.id, name = %s.name, "snapshot created");
        Ok(s)
    }

    /// A snapshot named `name` on every in-sync replica: through the engine (an IO barrier) when
    /// the volume is published, else on the replicas directly (nothing writes to them).
    async fn snapshot_on_replicas_or_engine(&self, v: &VolumeRecord, name: &str) -> Result<()> {
        let token = self.orch.token(&v.id).await?;
        if v.attachment.is_some() {
            let (mut c, exists) = self.engine_snapshot(v, &token, name).await?;
            if exists {
                return Ok(());
            }
            c.create_snapshot(rpc::req(epb::SnapshotRequest { name: name.to_owned(), ..Default::default() }))
                .await
                .map_err(|s| rpc::call_err(&v.id, "snapshot", &s))?;
            return Ok(());
        }
        for r in self.in_sync_replicas(v).await? {
            let ep = self.orch.ensure_replica(v, &r, None).await?;
            let mut c = rpc::replica_mgmt(&v.id, &ep.mgmt, &token).await?;
            match c.create_snapshot(rpc::req(rpb::SnapshotRequest { name: name.to_owned() })).await {
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::AlreadyExists => {}
                Err(s) => return Err(rpc::call_err(&v.id, &format!("snapshot on replica {}", r.id), &s)),
            }
        }
        Ok(())
    }

    /// A client of the volume's engine, and whether the engine's replicas hold snapshot `name`.
    async fn engine_snapshot(
        &self,
        v: &VolumeRecord,
        token: &str,
        name: &str,
    ) -> Result<(rpc::EngineMgmt, bool)> {
        let ep = self.engine_for(v)?;
        let mut c = rpc::engine_mgmt(&v.id, &ep.mgmt, token).await?;
        let existing = c
            .list_snapshots(rpc::req(epb::ListSnapshotsRequest {}))
            .await
            .map_err(|s| rpc::call_err(&v.id, "list snapshots", &s))?
            .into_inner();
        let exists = existing.snapshots.iter().any(|s| s.name == name);
        Ok((c, exists))
    }

    fn engine_for(&self, v: &VolumeRecord) -> Result<EngineEndpoint> {
        self.orch.engine(&v.id).ok_or_else(|| {
            ControllerError::orchestrator(
                &v.id,
                "the volume is published but its engine is not serving yet; retry",
            )
        })
    }

    /// Deletes a snapshot's data on every replica (through the engine when published).
    async fn delete_snapshot_data(&self, v: &VolumeRecord, name: &str) -> Result<()> {
        let token = self.orch.token(&v.id).await?;
        if v.attachment.is_some() {
            let (mut c, exists) = self.engine_snapshot(v, &token, name).await?;
            if exists {
                c.delete_snapshot(rpc::req(epb::SnapshotRequest {
                    name: name.to_owned(),
                    ..Default::default()
                }))
                .await
                .map_err(|s| rpc::call_err(&v.id, "delete snapshot", &s))?;
            }
            return Ok(());
        }
        for r in &v.replicas {
            let ep = self.orch.ensure_replica(v, r, None).await?;
            let mut c = rpc::replica_mgmt(&v.id, &ep.mgmt, &token).await?;
            match c.delete_snapshot(rpc::req(rpb::SnapshotRequest { name: name.to_owned() })).await {
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::NotFound => {}
                Err(s) => {
                    return Err(rpc::call_err(&v.id, &format!("delete snapshot on replica {}", r.id), &s));
                }
            }
        }
        Ok(())
    }

    /// DeleteSnapshot: idempotent; the last snapshot of a deleted volume takes the volume with it.
    /// A member of a group snapshot goes only with its group (FailedPrecondition).
    pub async fn delete_snapshot(&self, id: &str) -> Result<()> {
        self.ready()?;
        let sid = id.to_owned();
        let Some(s) = self.db(move |st| st.snapshot(&sid)).await? else { return Ok(()) };
        if let Some(g) = &s.group {
            return Err(ControllerError::FailedPrecondition(format!(
                "snapshot {id} belongs to group snapshot {} ({}): delete the group",
                g.id, g.name
            )));
        }
        let _g = self.guards.lock(&snapshot_keys(&s))?;
        self.remove_snapshot(s).await
    }

    /// Deletes a snapshot's data and record (the volume with it when it was the last snapshot of a
    /// deleted volume). The caller holds the snapshot's keys ([`snapshot_keys`]).
    async fn remove_snapshot(&self, s: SnapshotRecord) -> Result<()> {
        let id = s.id.as_str();
        if let Some(v) = self.volume(&s.volume_id).await? {
            self.delete_snapshot_data(&v, &s.id).await?;
            if v.state == VolumeState::Deleted {
                let (vid, sid) = (v.id.clone(), id.to_owned());
                let others = self
                    .db(move |st| {
                        Ok(st.snapshots()?.iter().filter(|x| x.volume_id == vid && x.id != sid).count())
                    })
                    .await?;
                if others == 0 {
                    // The volume goes first: a crash in between leaves the snapshot record, and a
                    // repeated DeleteSnapshot finishes the job.
                    self.destroy(&v).await?;
                }
            }
        }
        let sid = id.to_owned();
        self.db(move |st| st.delete_snapshot(&sid)).await?;
        info!(volume_id = %s.volume_id, snapshot = %id, "snapshot deleted");
        Ok(())
    }

    pub async fn snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>> {
        let sid = id.to_owned();
        self.db(move |st| st.snapshot(&sid)).await
    }

    /// Ready snapshots ordered by id, filtered, after `start`, at most `max` (0: all).
    pub async fn list_snapshots(
        &self,
        start: &str,
        max: usize,
        snapshot_id: &str,
        source_volume_id: &str,
    ) -> Result<(Vec<SnapshotRecord>, String)> {
        if !start.is_empty() && !start.starts_with("snap-") {
            return Err(ControllerError::Aborted(format!(
                "starting_token {start:?} is not one this controller gave"
            )));
        }
        let all = self.db(|st| st.snapshots()).await?;
        let mut page: Vec<SnapshotRecord> = all
            .into_iter()
            .filter(|s| s.ready && s.id.as_str() > start)
            .filter(|s| snapshot_id.is_empty() || s.id == snapshot_id)
            .filter(|s| source_volume_id.is_empty() || s.volume_id == source_volume_id)
            .collect();
        let next = if max > 0 && page.len() > max {
            page.truncate(max);
            page.last().map(|s| s.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok((page, next))
    }

    // ---- expansion ----

    /// ControllerExpandVolume: grows every replica (through the engine when published). Returns the
    /// new size; a request at or below the current size changes nothing.
    pub async fn expand(&self, id: &str, required: i64, limit: i64) -> Result<u64> {
        self.ready()?;
        if required < 0 || limit < 0 || (required == 0 && limit == 0) {
            return Err(ControllerError::InvalidArgument(
                "capacity_range needs a positive required_bytes or limit_bytes".into(),
            ));
        }
        let _g = self.guards.lock(&[vkey(id)])?;
        let mut v = self.live_volume(id).await?;
        let (required, limit) = (required.cast_unsigned(), limit.cast_unsigned());
        if limit > 0 && v.size > limit {
            return Err(ControllerError::OutOfRange(format!(
                "volume {id} already has {} bytes, above limit_bytes {limit}",
                v.size
            )));
        }
        if required <= v.size {
            return Ok(v.size);
        }
        let size = volume_size(required.cast_signed(), limit.cast_signed())?;
        let grow = size - v.size;
        let _placing = self.placing.lock().await;
        let all = self.db(|s| s.volumes()).await?;
        let used = crate::store::provisioned_by_node(&all);
        // The nodes once: their capacity is a statvfs per node.
        let nodes = self.nodes();
        for r in &v.replicas {
            let node = nodes.iter().find(|n| n.name == r.node);
            let room = node.map_or(0, |n| placement::room(n, &used, self.cfg.overcommit, v.params.thin));
            if room < grow {
                return Err(ControllerError::OutOfRange(format!(
                    "node {} of replica {} has room for {room} more bytes, not {grow}",
                    r.node, r.id
                )));
            }
        }
        let token = self.orch.token(&v.id).await?;
        if v.attachment.is_some() {
            let ep = self.engine_for(&v)?;
            let mut c = rpc::engine_mgmt(&v.id, &ep.mgmt, &token).await?;
            c.expand(rpc::req(epb::ExpandRequest { size_bytes: size }))
                .await
                .map_err(|s| rpc::call_err(&v.id, "expand", &s))?;
        } else {
            for r in &v.replicas {
                let ep = self.orch.ensure_replica(&v, r, None).await?;
                let mut c = rpc::replica_mgmt(&v.id, &ep.mgmt, &token).await?;
                c.resize(rpc::req(rpb::ResizeRequest { size_bytes: size }))
                    .await
                    .map_err(|s| rpc::call_err(&v.id, &format!("resize replica {}", r.id), &s))?;
            }
        }
        v.size = size;
        self.put_volume(&v).await?;
        info!(volume_id = %v.id, size, "volume expanded");
        Ok(size)
    }

    // ---- administration ----

    /// How far the clone making volume `id` has come, if one is under way.
    pub fn clone_progress(&self, id: &str) -> Option<(u64, u64)> {
        self.cloning.lock().get(id).copied()
    }

    /// Volumes ready or being created, by id.
    pub async fn volumes_in_use(&self) -> Result<Vec<VolumeRecord>> {
        Ok(self.db(|s| s.volumes()).await?.into_iter().filter(|v| v.state != VolumeState::Deleted).collect())
    }

    /// Starts a scrub in the engine of a published volume (see the admin API).
    pub async fn scrub(&self, key: &str) -> Result<VolumeRecord> {
        self.ready()?;
        let v = self.find_volume(key).await?;
        if v.attachment.is_none() {
            return Err(ControllerError::FailedPrecondition(format!(
                "volume {} is not published: a scrub runs in its engine, which runs while it is attached",
                v.name
            )));
        }
        let mut c = self.engine_client(&v).await?;
        c.scrub(rpc::req(epb::ScrubRequest {})).await.map_err(|s| rpc::call_err(&v.id, "scrub", &s))?;
        tracing::info!(volume_id = %v.id, "scrub started");
        Ok(v)
    }

    /// A live volume by id or name.
    pub async fn find_volume(&self, key: &str) -> Result<VolumeRecord> {
        if let Some(v) = self.volume(key).await?.filter(|v| v.state != VolumeState::Deleted) {
            return Ok(v);
        }
        let name = key.to_owned();
        self.db(move |s| s.volume_by_name(&name))
            .await?
            .ok_or_else(|| ControllerError::NotFound(format!("no volume is named or numbered {key:?}")))
    }

    /// Replica states, epoch, condition and rebuild of a volume.
    pub async fn details(&self, v: &VolumeRecord) -> Details {
        let mut d = Details { condition: self.condition(v).await, ..Details::default() };
        for r in &v.replicas {
            if let Some(t) = self.lost_for(&v.id, &r.id) {
                d.lost.insert(r.id.clone(), t.as_secs().max(1));
            }
        }
        if v.attachment.is_some()
            && let Ok(st) = self.engine_status(v).await
        {
            d.epoch = st.epoch;
            for r in st.replicas {
                d.replicas.insert(r.id, (r.state, r.ejected_at_epoch));
            }
            d.rebuild = st.rebuild.map(|r| RebuildDetails {
                replica: r.replica,
                kind: r.kind,
                phase: r.phase,
                done_bytes: r.done_bytes,
                total_bytes: r.total_bytes,
            });
            d.scrub = st.scrub;
            d.damage = (st.damaged_ranges, st.repaired_bytes, st.unrepaired_ranges);
            return d;
        }
        if let Ok(Some(m)) = self.membership(&v.id).await {
            d.epoch = m.membership.epoch;
            for r in m.membership.replicas {
                let state = match r.state {
                    ReplicaState::Healthy => ("healthy".to_owned(), 0),
                    ReplicaState::Ejected { epoch } => ("ejected".to_owned(), epoch),
                };
                d.replicas.insert(r.id, state);
            }
        }
        d
    }

    /// Sets (or, with an empty value, removes) an annotation.
    pub async fn annotate(&self, key: &str, name: &str, value: &str) -> Result<VolumeRecord> {
        self.ready()?;
        let mut v = self.find_volume(key).await?;
        let _g = self.guards.lock(&[vkey(&v.id)])?;
        v = self.live_volume(&v.id).await?;
        if value.is_empty() {
            v.annotations.remove(name);
        } else {
            v.annotations.insert(name.to_owned(), value.to_owned());
        }
        self.put_volume(&v).await?;
        Ok(v)
    }

    /// SIGKILLs one replica's process (a demo fault).
    pub async fn kill_replica(&self, key: &str, replica: &str) -> Result<u32> {
        let v = self.find_volume(key).await?;
        let r = v.replicas.iter().find(|r| r.id == replica).ok_or_else(|| {
            ControllerError::NotFound(format!("volume {} has no replica {replica}", v.name))
        })?;
        self.orch.kill_replica(&v.id, r)
    }

    /// Every snapshot with its volume's name (empty when the volume was deleted).
    pub async fn snapshots_named(&self) -> Result<Vec<(SnapshotRecord, String)>> {
        let vols = self.db(|s| s.volumes()).await?;
        let snaps = self.db(|s| s.snapshots()).await?;
        Ok(snaps
            .into_iter()
            .map(|s| {
                let name = vols
                    .iter()
                    .find(|v| v.id == s.volume_id && v.state != VolumeState::Deleted)
                    .map(|v| v.name.clone())
                    .unwrap_or_default();
                (s, name)
            })
            .collect())
    }

    /// Each node with the bytes provisioned on it and its replica count.
    pub async fn nodes_usage(&self) -> Result<Vec<(NodeInfo, u64, u32)>> {
        let all = self.db(|s| s.volumes()).await?;
        let used = crate::store::provisioned_by_node(&all);
        Ok(self
            .nodes()
            .into_iter()
            .map(|n| {
                let (t, k) = used.get(&n.name).copied().unwrap_or((0, 0));
                let count = all.iter().flat_map(|v| &v.replicas).filter(|r| r.node == n.name).count();
                (n, t + k, u32::try_from(count).unwrap_or(u32::MAX))
            })
            .collect())
    }

    /// Stops watching processes (and stops them if configured to).
    pub async fn shutdown(&self) {
        self.orch.shutdown().await;
    }
}

/// What the node plugin needs to attach the volume. No secret goes here (rule 9).
pub fn publish_context(v: &VolumeRecord, a: &Attachment, ep: &EngineEndpoint) -> HashMap<String, String> {
    HashMap::from([
        ("nbdSocket".to_owned(), ep.nbd_socket.display().to_string()),
        ("exportName".to_owned(), v.id.clone()),
        ("generation".to_owned(), a.generation.to_string()),
        ("readonly".to_owned(), a.readonly.to_string()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_mib_within_the_limit() {
        assert_eq!(volume_size(0, 0).ok(), Some(DEFAULT_SIZE));
        assert_eq!(volume_size(1, 0).ok(), Some(SIZE_UNIT));
        assert_eq!(volume_size(0, 10 * SIZE_UNIT.cast_signed()).ok(), Some(10 * SIZE_UNIT));
        assert_eq!(volume_size(SIZE_UNIT.cast_signed() + 1, 0).ok(), Some(2 * SIZE_UNIT));
        assert!(matches!(volume_size(-1, 0), Err(ControllerError::InvalidArgument(_))));
        assert!(matches!(volume_size(10, 5), Err(ControllerError::InvalidArgument(_))));
        assert!(matches!(volume_size(10, 20), Err(ControllerError::OutOfRange(_))));
    }

    #[test]
    fn guards_abort_overlaps_and_release_on_drop() {
        let g = Guards::default();
        let a = g.lock(&["volume/a".into()]);
        assert!(a.is_ok());
        assert!(matches!(g.lock(&["volume/b".into(), "volume/a".into()]), Err(ControllerError::Aborted(_))));
        assert!(g.lock(&["volume/b".into()]).is_ok(), "a refused lock takes nothing");
        drop(a);
        assert!(g.lock(&["volume/a".into()]).is_ok());
    }
}
