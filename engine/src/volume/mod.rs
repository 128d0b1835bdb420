//! The replicated volume behind the NBD export.
//!
//! Writes, TRIMs, WRITE_ZEROES and FLUSHes go to every healthy member of the committed
//! configuration and are acknowledged only when all of them acknowledged. A member that fails or
//! times out is ejected first: the new membership (next epoch, member marked ejected) is committed
//! by compare-and-set through the [`MembershipAuthority`] and fenced onto the remaining members, and
//! only then does the IO complete (DESIGN rules 1 and 2). If the authority cannot be reached the IO
//! fails; it never proceeds on a smaller set. Reads go to one healthy member (one on this node while
//! it keeps up, else round robin) and move to another (ejecting the failed one) on error. Overlapping writes are serialised by a range lock
//! (rule 4). A replica that answers "stale epoch" means a newer engine exists: this one is deposed,
//! fails all IO and stops (rule 3).
//!
//! An ejected or added replica rejoins only through a rebuild ([`rebuild`], rule 7).

mod rebuild;
mod repair;

pub use self::rebuild::RebuildProgress;
pub use self::repair::{DamageTotals, ScrubProgress};

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use barnacle_replica::client::{ClientConfig, ClientError, ReplicaClient};
use barnacle_replica::wire::Status;
use bytes::Bytes;
use futures::future::join_all;
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use uuid::Uuid;

use crate::authority::{
    AuthorityError, Membership, MembershipAuthority, ReplicaRecord, ReplicaState, VolumeSettings,
};
use crate::nbd::{Backend, IoError};

/// How the engine runs one volume.
#[derive(Clone)]
pub struct VolumeConfig {
    pub volume_id: String,
    pub token: String,
    pub engine_id: Uuid,
    /// The replica set to start with when the authority holds no record yet: (id, address).
    pub replicas: Vec<(String, String)>,
    /// The settings to serve with when the membership record holds none (the record's win:
    /// they are what the controller last committed).
    pub settings: VolumeSettings,
    /// A replica that does not answer a request within this is ejected.
    pub replica_timeout: Duration,
    /// Keep-alive interval towards replicas; silence of `replica_timeout` + 4 beats closes a
    /// connection.
    pub heartbeat: Duration,
    /// How often replicas out of the configuration are tried for a rebuild.
    pub rebuild_retry: Duration,
}

impl std::fmt::Debug for VolumeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeConfig")
            .field("volume_id", &self.volume_id)
            .field("engine_id", &self.engine_id)
            .field("replicas", &self.replicas)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Why new settings were not applied.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("invalid settings: {0}")]
    Invalid(String),
    #[error(
        "only {healthy} replicas are healthy now; a minimum of {wanted} would fail writes until a rebuild completes"
    )]
    TooFewHealthy { healthy: usize, wanted: u32 },
    #[error(transparent)]
    Io(IoError),
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    #[error("volume {volume_id}: {healthy} healthy replicas, {required} required")]
    TooFewReplicas { volume_id: String, healthy: usize, required: usize },
    #[error("volume {volume_id}: replicas disagree on the size ({sizes:?}) and growing failed: {reason}")]
    SizeMismatch { volume_id: String, sizes: Vec<u64>, reason: String },
    #[error("volume {volume_id}: resync failed: {reason}")]
    Resync { volume_id: String, reason: String },
    #[error("volume {volume_id}: deposed by a newer engine: {reason}")]
    Deposed { volume_id: String, reason: String },
}

struct Member {
    id: String,
    client: ReplicaClient,
    /// Reads in flight to this member.
    reading: AtomicUsize,
}

/// Reads in flight a member on this node (one reached through shared memory) takes before reads
/// spill over to the other members: up to this depth it outpaces a network hop.
const LOCAL_READ_DEPTH: usize = 64;

/// Counts a read in flight to a member.
struct Reading<'a>(&'a AtomicUsize);

impl<'a> Reading<'a> {
    fn start(m: &'a Member) -> Reading<'a> {
        m.reading.fetch_add(1, Ordering::Relaxed);
        Reading(&m.reading)
    }
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The committed configuration this engine serves, with a connection to each healthy member,
/// and the replica being rebuilt, if any: it gets every write but serves no read.
struct View {
    version: u64,
    record: Membership,
    members: Vec<Arc<Member>>,
    joining: Option<Arc<Member>>,
}

/// Serialises overlapping ranges, first come first served: a request waits for every earlier
/// request it overlaps, held or still waiting, so a stream of small writes cannot starve a large
/// one (or a rebuild's region copy).
#[derive(Default)]
struct RangeLock {
    /// (start, end, ticket, held) in arrival order.
    entries: Mutex<Vec<(u64, u64, u64, bool)>>,
    next: std::sync::atomic::AtomicU64,
    released: Notify,
}

struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
}

impl RangeLock {
    async fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.entries.lock().push((start, end, id, false));
        // Removes the entry if this future is dropped while waiting.
        let guard = RangeGuard { lock: self, id };
        loop {
            // Registered before the check, so a release in between is not missed.
            let released = self.released.notified();
            {
                let mut entries = self.entries.lock();
                let blocked =
                    entries.iter().take_while(|e| e.2 != id).any(|&(s, e, _, _)| s < end && start < e);
                if !blocked {
                    if let Some(me) = entries.iter_mut().find(|e| e.2 == id) {
                        me.3 = true;
                    }
                    return guard;
                }
            }
            released.await;
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        self.lock.entries.lock().retain(|r| r.2 != self.id);
        self.lock.released.notify_waiters();
    }
}

/// One volume served by this engine.
pub struct Volume {
    cfg: VolumeConfig,
    authority: Arc<dyn MembershipAuthority>,
    view: RwLock<Arc<View>>,
    /// Membership changes happen one at a time.
    change: tokio::sync::Mutex<()>,
    ranges: RangeLock,
    size: std::sync::atomic::AtomicU64,
    /// Every IO holds it shared; snapshots and expansion take it exclusively, which drains the IO
    /// in flight and holds new IO back until they finish.
    io_gate: Arc<tokio::sync::RwLock<()>>,
    /// A group snapshot's IO hold in force: its id, the gate held, and when it lapses.
    hold: Mutex<Option<Hold>>,
    next_read: AtomicUsize,
    deposed: CancellationToken,
    resynced: std::sync::atomic::AtomicU64,
    /// Members that failed and whose ejection is not committed yet: they get no IO, and no IO
    /// completes until their ejection is committed (rule 2).
    pending: Mutex<Vec<String>>,
    writes: Arc<WriteTracker>,
    /// Regions the members whose ejection is pending may lack, gathered over every attempt to
    /// commit it (a write that failed with an uncommitted ejection still landed on the others).
    lacking: Mutex<std::collections::BTreeSet<u64>>,
    rebuild: rebuild::RebuildState,
    damage: repair::Damage,
    /// The settings in force (those of the record, else the configuration's).
    settings: Mutex<VolumeSettings>,
    /// `settings.min_healthy`, read on the IO path.
    min_healthy: AtomicUsize,
    /// `settings.rebuild_mib_per_sec` in bytes per second, read by the rebuild as it copies.
    rebuild_rate: std::sync::atomic::AtomicU64,
    qos: crate::qos::Qos,
}

/// Longest IO hold a group snapshot may ask for: an NBD client's IO waits this long at most.
pub const MAX_HOLD: Duration = Duration::from_secs(30);

/// An IO hold: new IO waits until it is released or lapses.
struct Hold {
    id: String,
    _gate: tokio::sync::OwnedRwLockWriteGuard<()>,
    until: tokio::time::Instant,
}

/// The IO limits of settings.
fn limits(s: &VolumeSettings) -> crate::qos::Limits {
    crate::qos::Limits { iops: s.max_iops, bytes_per_sec: s.max_mib_per_sec.saturating_mul(1 << 20) }
}

/// Writes in flight, so intent marks are cleared only after every write a flush could have
/// raced with has reached every member (or failed).
#[derive(Default)]
struct WriteTracker {
    next: std::sync::atomic::AtomicU64,
    /// Sequence number → (offset, length) of each write in flight.
    in_flight: Mutex<std::collections::BTreeMap<u64, (u64, u64)>>,
    done: Notify,
    /// Set when members may differ outside the intent marks' knowledge (a refusal shared by all
    /// members may have applied in part, or a failed member could not be ejected): marks are then
    /// kept until the next start resyncs them.
    hold_clears: std::sync::atomic::AtomicBool,
}

struct WriteTicket<'a> {
    tracker: &'a WriteTracker,
    seq: u64,
}

impl WriteTracker {
    fn begin(&self, offset: u64, len: u64) -> WriteTicket<'_> {
        let seq = self.next.fetch_add(1, Ordering::SeqCst);
        self.in_flight.lock().insert(seq, (offset, len));
        WriteTicket { tracker: self, seq }
    }

    /// Waits until no write that started before `cutoff` is in flight.
    async fn drained_before(&self, cutoff: u64) {
        loop {
            let done = self.done.notified();
            if self.in_flight.lock().first_key_value().is_none_or(|(s, _)| *s >= cutoff) {
                return;
            }
            done.await;
        }
    }
}

impl WriteTracker {
    /// The intent regions of every write in flight.
    fn regions_in_flight(&self) -> std::collections::BTreeSet<u64> {
        let r = barnacle_replica::store::INTENT_REGION;
        self.in_flight
            .lock()
            .values()
            .filter(|(_, len)| *len > 0)
            .flat_map(|&(o, len)| (o / r)..=((o + len - 1) / r))
            .collect()
    }
}

impl Drop for WriteTicket<'_> {
    fn drop(&mut self) {
        self.tracker.in_flight.lock().remove(&self.seq);
        self.tracker.done.notify_waiters();
    }
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume").field("cfg", &self.cfg).field("size", &self.size()).finish_non_exhaustive()
    }
}

/// Rounds of the start-up resync that may fail on a member that cannot be spared.
const RESYNC_ATTEMPTS: u32 = 5;

/// Why one pass of the start-up resync stopped.
enum ResyncFailure {
    /// The start cannot go on (deposed).
    Fatal(VolumeError),
    /// Member `id` failed; `dirty` are the regions it may now lack.
    Member { id: String, error: ClientError, dirty: std::collections::BTreeSet<u64> },
}

fn is_deposing(e: &ClientError) -> bool {
    matches!(e.status(), Some(Status::StaleEpoch | Status::EpochConflict))
}

async fn blocking_authority<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AuthorityError> + Send + 'static,
) -> Result<T, AuthorityError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| AuthorityError::Unavailable(e.to_string()))?
}

impl Volume {
    fn client_config(&self, epoch: u64) -> ClientConfig {
        ClientConfig {
            volume_id: self.cfg.volume_id.clone(),
            token: self.cfg.token.clone(),
            engine_id: self.cfg.engine_id,
            epoch,
            request_timeout: self.cfg.replica_timeout,
            heartbeat: self.cfg.heartbeat,
        }
    }

    async fn connect(cfg: ClientConfig, r: &ReplicaRecord) -> Result<ReplicaClient, ClientError> {
        let epoch = cfg.epoch;
        let engine = cfg.engine_id;
        let client = ReplicaClient::connect_to(&r.addr, cfg).await?;
        client.fence(epoch, engine).await?;
        Ok(client)
    }

    /// Takes the volume's next epoch through the authority, connects to and fences every healthy
    /// replica, and ejects those that cannot be fenced. A replica that could not be fenced may still
    /// serve an older engine until its lease runs out, so the engine then waits one lease before
    /// serving (rule 3).
    pub async fn start(
        cfg: VolumeConfig,
        authority: Arc<dyn MembershipAuthority>,
    ) -> Result<Arc<Volume>, VolumeError> {
        let a = authority.clone();
        let current = blocking_authority(move || a.load()).await?;
        let (mut record, expected) = match current {
            Some(v) => (v.membership, Some(v.version)),
            None => (
                Membership {
                    epoch: 0,
                    engine_id: None,
                    replicas: cfg
                        .replicas
                        .iter()
                        .map(|(id, addr)| ReplicaRecord {
                            id: id.clone(),
                            addr: addr.clone(),
                            state: ReplicaState::Healthy,
                            store_id: None,
                            tracked_since: 0,
                            missed_regions: Vec::new(),
                        })
                        .collect(),
                    settings: None,
                },
                None,
            ),
        };
        let settings = record.settings.unwrap_or(cfg.settings);
        if record.settings.is_some_and(|s| s != cfg.settings) {
            info!(volume_id = %cfg.volume_id, ?settings, "serving with the settings of the membership record, not the command line's");
        }
        record.epoch += 1;
        record.engine_id = Some(cfg.engine_id);
        let (a, r) = (authority.clone(), record.clone());
        let version = blocking_authority(move || a.compare_and_set(expected, &r)).await?;
        info!(volume_id = %cfg.volume_id, epoch = record.epoch, engine = %cfg.engine_id, "took the volume's epoch");

        let vol = Volume {
            cfg,
            authority,
            view: RwLock::new(Arc::new(View {
                version,
                record: record.clone(),
                members: Vec::new(),
                joining: None,
            })),
            change: tokio::sync::Mutex::new(()),
            ranges: RangeLock::default(),
            size: std::sync::atomic::AtomicU64::new(0),
            io_gate: Arc::new(tokio::sync::RwLock::new(())),
            hold: Mutex::new(None),
            next_read: AtomicUsize::new(0),
            deposed: CancellationToken::new(),
            resynced: std::sync::atomic::AtomicU64::new(0),
            pending: Mutex::new(Vec::new()),
            writes: Arc::new(WriteTracker::default()),
            lacking: Mutex::new(std::collections::BTreeSet::new()),
            rebuild: rebuild::RebuildState::default(),
            damage: repair::Damage::default(),
            settings: Mutex::new(settings),
            min_healthy: AtomicUsize::new(settings.min_healthy as usize),
            rebuild_rate: std::sync::atomic::AtomicU64::new(
                settings.rebuild_mib_per_sec.saturating_mul(1 << 20),
            ),
            qos: crate::qos::Qos::new(limits(&settings)),
        };
        let attempts = join_all(record.healthy().map(|r| {
            let c = vol.client_config(record.epoch);
            async move { (r.id.clone(), Self::connect(c, r).await) }
        }))
        .await;
        let mut members = Vec::new();
        let mut unfenced = Vec::new();
        for (id, res) in attempts {
            match res {
                Ok(client) => {
                    let known = record.replica(&id).and_then(|r| r.store_id);
                    let found = client.hello().store_id;
                    if known.is_some_and(|k| k != found) {
                        // Another history (the store was recreated): it must not serve anything
                        // until a full rebuild made it a copy again.
                        warn!(volume_id = %vol.cfg.volume_id, replica = %id, ?known, %found,
                              "replica answers with another store identity: ejecting it for a full rebuild");
                        unfenced.push(id);
                    } else {
                        members.push(Arc::new(Member { id, client, reading: AtomicUsize::new(0) }));
                    }
                }
                Err(e) if is_deposing(&e) => {
                    return Err(VolumeError::Deposed {
                        volume_id: vol.cfg.volume_id.clone(),
                        reason: e.to_string(),
                    });
                }
                Err(e) => {
                    warn!(volume_id = %vol.cfg.volume_id, replica = %id, error = %e, "replica not reachable at start");
                    unfenced.push(id);
                }
            }
        }
        // An expansion interrupted by a crash leaves some members grown: finish it.
        let size = members.iter().map(|m| m.client.hello().size).max().unwrap_or(0);
        for m in &members {
            if m.client.hello().size < size {
                info!(volume_id = %vol.cfg.volume_id, replica = %m.id, size, "finishing an interrupted expansion");
                m.client.resize(size).await.map_err(|e| VolumeError::SizeMismatch {
                    volume_id: vol.cfg.volume_id.clone(),
                    sizes: vec![m.client.hello().size, size],
                    reason: e.to_string(),
                })?;
            }
        }
        vol.size.store(size, Ordering::Relaxed);
        // Remember the identity of each member's store, so one that comes back with another
        // history is recognised.
        let mut version = version;
        let mut named = record.clone();
        for m in &members {
            if let Some(r) = named.replicas.iter_mut().find(|r| r.id == m.id) {
                r.store_id = Some(m.client.hello().store_id);
            }
        }
        if named != record {
            let (a, r) = (vol.authority.clone(), named.clone());
            let v = version;
            version =
                blocking_authority(move || a.compare_and_set(Some(v), &r)).await.map_err(|e| match e {
                    AuthorityError::Conflict { .. } => VolumeError::Deposed {
                        volume_id: vol.cfg.volume_id.clone(),
                        reason: "membership changed during start".into(),
                    },
                    other => VolumeError::Authority(other),
                })?;
            record = named;
        }
        let vol = Arc::new(vol);
        *vol.view.write() = Arc::new(View { version, record, members, joining: None });
        if !unfenced.is_empty() {
            // Writes of the previous engine in flight when it stopped are where the members'
            // intent marks are: the ejected ones may have missed them.
            let mut missed = std::collections::BTreeSet::new();
            let members = vol.view.read().members.clone();
            let lists = join_all(members.iter().map(|m| m.client.list_intent())).await;
            for (m, l) in members.iter().zip(lists) {
                match l {
                    Ok((_, regions)) => missed.extend(regions),
                    Err(e) if is_deposing(&e) => {
                        return Err(VolumeError::Deposed {
                            volume_id: vol.cfg.volume_id.clone(),
                            reason: e.to_string(),
                        });
                    }
                    // It leaves with the others; its own marks are its rebuild's business (rule 7).
                    Err(e) => {
                        warn!(volume_id = %vol.cfg.volume_id, replica = %m.id, error = %e, "replica failed at start: ejecting it");
                        unfenced.push(m.id.clone());
                    }
                }
            }
            vol.eject_with(&unfenced, &missed).await.map_err(|e| match e {
                IoError::Shutdown => VolumeError::Deposed {
                    volume_id: vol.cfg.volume_id.clone(),
                    reason: "during start".into(),
                },
                other => VolumeError::Authority(AuthorityError::Unavailable(other.to_string())),
            })?;
            let lease = vol.cfg.replica_timeout + vol.cfg.heartbeat * 4;
            warn!(volume_id = %vol.cfg.volume_id, ?lease, "waiting out the lease of replicas that could not be fenced");
            tokio::time::sleep(lease).await;
        }
        let healthy = vol.view.read().members.len();
        if healthy < vol.min_healthy() {
            return Err(VolumeError::TooFewReplicas {
                volume_id: vol.cfg.volume_id.clone(),
                healthy,
                required: vol.min_healthy(),
            });
        }
        let copied = vol.resync().await?;
        vol.resynced.store(copied, Ordering::Relaxed);
        info!(volume_id = %vol.cfg.volume_id, size, healthy, "volume serving");
        vol.spawn_rebuilder();
        vol.spawn_watchdog();
        Ok(vol)
    }

    pub fn volume_id(&self) -> &str {
        &self.cfg.volume_id
    }

    /// Fires when a newer engine deposed this one.
    pub fn deposed(&self) -> CancellationToken {
        self.deposed.clone()
    }

    /// The committed membership this engine serves.
    pub fn membership(&self) -> Membership {
        self.view.read().record.clone()
    }

    fn depose(&self, reason: &str) -> IoError {
        if !self.deposed.is_cancelled() {
            error!(volume_id = %self.cfg.volume_id, reason, "deposed by a newer engine: failing all IO");
            self.deposed.cancel();
        }
        IoError::Shutdown
    }

    /// Commits the ejection of `ids`, and of any member whose ejection is still pending, and fences
    /// the rest with the new epoch. Members stay pending (and get no IO) until this succeeds. It
    /// never commits a configuration with fewer healthy members than required: the IO fails
    /// instead and the members keep their data.
    async fn eject(&self, ids: &[String]) -> Result<(), IoError> {
        self.eject_with(ids, &std::collections::BTreeSet::new()).await
    }

    /// [`Volume::eject`], recording `missed` (with the writes in flight) as regions the ejected
    /// members may lack.
    async fn eject_with(
        &self,
        ids: &[String],
        missed: &std::collections::BTreeSet<u64>,
    ) -> Result<(), IoError> {
        let _serial = self.change.lock().await;
        {
            let mut pending = self.pending.lock();
            for id in ids {
                if !pending.contains(id) {
                    pending.push(id.clone());
                }
            }
        }
        loop {
            // Every write the failed members may have missed in the old epoch is in flight now
            // (those that failed on them wait for this commit, rule 2), or was gathered by an
            // earlier attempt that could not commit.
            {
                let mut lacking = self.lacking.lock();
                lacking.extend(self.writes.regions_in_flight());
                lacking.extend(missed.iter().copied());
            }
            let view = self.view.read().clone();
            let mut ids: Vec<String> = self.pending.lock().clone();
            // Judged against the committed record, connected or not: a member unreachable at start
            // is not in `members` but must still leave the record.
            ids.retain(|id| view.record.healthy().any(|r| &r.id == id));
            if ids.is_empty() {
                self.pending.lock().clear();
                self.lacking.lock().clear();
                return Ok(());
            }
            let remaining: Vec<Arc<Member>> =
                view.members.iter().filter(|m| !ids.contains(&m.id)).cloned().collect();
            let required = self.min_healthy();
            if remaining.len() < required {
                // Losing every member at once is what a newer engine's fence looks like: if the
                // record moved on, this engine is deposed.
                let a = self.authority.clone();
                if let Ok(Some(current)) = blocking_authority(move || a.load()).await
                    && current.version != view.version
                {
                    return Err(self.depose("membership changed by someone else"));
                }
                warn!(volume_id = %self.cfg.volume_id, failed = ?ids, remaining = remaining.len(), required,
                      "not committing an ejection below the minimum: failing the IO");
                // The failed members may lack writes the others have: keep the marks.
                self.writes.hold_clears.store(true, Ordering::SeqCst);
                return Err(IoError::Io(format!(
                    "volume {}: {} healthy replicas would remain, {required} required",
                    self.cfg.volume_id,
                    remaining.len()
                )));
            }
            let mut record = view.record.clone();
            record.epoch += 1;
            let epoch = record.epoch;
            let lacking = self.lacking.lock().clone();
            for r in &mut record.replicas {
                if ids.contains(&r.id) {
                    r.state = ReplicaState::Ejected { epoch };
                    r.missed_regions = lacking.iter().copied().collect();
                }
            }
            let (a, r, expected) = (self.authority.clone(), record.clone(), view.version);
            let version = match blocking_authority(move || a.compare_and_set(Some(expected), &r)).await {
                Ok(v) => v,
                Err(AuthorityError::Conflict { .. }) => {
                    return Err(self.depose("membership changed by someone else"));
                }
                Err(e) => {
                    // The write may have landed before the error (a failed directory sync after
                    // the rename): read back before calling it failed.
                    let (a, proposed) = (self.authority.clone(), record.clone());
                    match blocking_authority(move || a.load()).await {
                        Ok(Some(v)) if v.version == expected + 1 && v.membership == proposed => v.version,
                        Ok(Some(v)) if v.version != expected => {
                            return Err(self.depose("membership changed by someone else"));
                        }
                        _ => {
                            warn!(volume_id = %self.cfg.volume_id, error = %e, "cannot commit an ejection: failing the IO");
                            self.writes.hold_clears.store(true, Ordering::SeqCst);
                            return Err(IoError::Io(e.to_string()));
                        }
                    }
                }
            };
            // The replica being rebuilt takes the new epoch too, so its written stamps stay right.
            let fence_joining = async {
                match &view.joining {
                    Some(j) => Some((j.clone(), j.client.fence(epoch, self.cfg.engine_id).await)),
                    None => None,
                }
            };
            let (fenced, joined) = tokio::join!(
                join_all(remaining.iter().map(|m| m.client.fence(epoch, self.cfg.engine_id))),
                fence_joining
            );
            if let Some((j, Err(e))) = joined {
                if is_deposing(&e) {
                    return Err(self.depose(&e.to_string()));
                }
                self.abort_join(&j.id, &format!("its fence failed: {e}"));
            }
            let mut next = Vec::new();
            for (m, r) in remaining.iter().zip(fenced) {
                match r {
                    Ok(()) => {}
                    Err(e) if is_deposing(&e) => return Err(self.depose(&e.to_string())),
                    Err(e) => {
                        warn!(volume_id = %self.cfg.volume_id, replica = %m.id, error = %e, "fence failed");
                        next.push(m.id.clone());
                    }
                }
            }
            info!(volume_id = %self.cfg.volume_id, ejected = ?ids, epoch, "ejected replicas");
            {
                // The joining replica as it is now: a rebuild aborted meanwhile stays aborted.
                let mut current = self.view.write();
                let joining = current.joining.clone();
                *current = Arc::new(View { version, record, members: remaining, joining });
            }
            let done = next.is_empty();
            if done {
                self.lacking.lock().clear();
            }
            *self.pending.lock() = next;
            if done {
                return Ok(());
            }
        }
    }

    /// The view IO goes to: the committed healthy members, less those whose ejection is
    /// pending, and the replica being rebuilt. Commits pending ejections first; if that fails, so
    /// does the IO.
    async fn serving(&self) -> Result<Arc<View>, IoError> {
        if self.deposed.is_cancelled() {
            return Err(IoError::Shutdown);
        }
        if !self.pending.lock().is_empty() {
            self.eject(&[]).await?;
        }
        let mut view = self.view.read().clone();
        // Rule 3: serve only while every member answered within the lease. A member silent
        // longer may already obey a successor (which waits replica timeout + 4 beats before
        // serving, longer than this lease), so it leaves the configuration first; the
        // ejection's compare-and-set finds out whether this engine is still the holder.
        if let Some(lease) = self.lease() {
            let silent: Vec<String> =
                view.members.iter().filter(|m| m.client.silence() > lease).map(|m| m.id.clone()).collect();
            if !silent.is_empty() {
                warn!(volume_id = %self.cfg.volume_id, replicas = ?silent, ?lease, "no answer within the lease; ejecting");
                self.eject(&silent).await?;
                view = self.view.read().clone();
            }
        }
        self.enough(view.members.len())?;
        Ok(view)
    }

    /// The member to read from: one on this node (reached through shared memory) while it has
    /// fewer than [`LOCAL_READ_DEPTH`] reads in flight, otherwise round robin over the others
    /// (all of them when none is local).
    fn reader(&self, members: &[Arc<Member>]) -> Arc<Member> {
        let turn = self.next_read.fetch_add(1, Ordering::Relaxed);
        let local = members
            .iter()
            .filter(|m| m.client.has_shared_memory())
            .min_by_key(|m| m.reading.load(Ordering::Relaxed));
        if let Some(m) = local.filter(|m| m.reading.load(Ordering::Relaxed) < LOCAL_READ_DEPTH) {
            return m.clone();
        }
        let mut remote = members.iter().filter(|m| !m.client.has_shared_memory());
        match remote.clone().count() {
            0 => members[turn % members.len()].clone(),
            n => remote.nth(turn % n).unwrap_or(&members[0]).clone(),
        }
    }

    /// Starts the task that ejects members whose connection closed (an error, or heartbeats
    /// unanswered for four beats) while no IO noticed, as on an idle volume: the status shows it
    /// and the rebuild starts at once. Silence shorter than that is the lease check's business,
    /// on the IO path.
    fn spawn_watchdog(self: &Arc<Self>) {
        if self.cfg.heartbeat.is_zero() {
            return;
        }
        let weak = Arc::downgrade(self);
        let deposed = self.deposed.clone();
        let every = self.cfg.heartbeat;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = deposed.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                let Some(vol) = weak.upgrade() else { return };
                let view = vol.view.read().clone();
                let gone: Vec<String> =
                    view.members.iter().filter(|m| m.client.is_closed()).map(|m| m.id.clone()).collect();
                // Below the minimum the next IO fails and reports it; nothing to commit here.
                if gone.is_empty() || view.members.len() - gone.len() < vol.min_healthy() {
                    continue;
                }
                warn!(volume_id = %vol.cfg.volume_id, replicas = ?gone, "replica connection lost; ejecting");
                if let Err(e) = vol.eject(&gone).await {
                    warn!(volume_id = %vol.cfg.volume_id, error = %e, "ejection failed");
                }
            }
        });
    }

    /// How long a member may stay silent while this engine serves IO: longer than a heartbeat
    /// interval (a healthy member answers every beat), shorter than the wait of a successor
    /// that could not fence it. `None` without heartbeats.
    fn lease(&self) -> Option<Duration> {
        (!self.cfg.heartbeat.is_zero()).then(|| self.cfg.replica_timeout + self.cfg.heartbeat * 2)
    }

    /// Runs `op` on every healthy member; succeeds only when all did, after committing the
    /// ejection of those that failed. Returns what each remaining member answered.
    async fn replicate<T, F, Fut>(&self, op: F) -> Result<Vec<(Arc<Member>, T)>, IoError>
    where
        F: Fn(Arc<Member>) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let view = self.serving().await?;
        let members = &view.members;
        let (results, joined) = tokio::join!(join_all(members.iter().map(|m| op(m.clone()))), async {
            match &view.joining {
                Some(j) => Some(op(j.clone()).await),
                None => None,
            }
        });
        // The replica being rebuilt is not a member: its failure ends the rebuild, not the IO.
        if let (Some(j), Some(Err(e))) = (&view.joining, joined) {
            if is_deposing(&e) {
                return Err(self.depose(&e.to_string()));
            }
            self.abort_join(&j.id, &format!("it failed a write: {e}"));
        }
        let mut failed = Vec::new();
        let mut refusals = Vec::new();
        let mut answers = Vec::with_capacity(results.len());
        for (m, r) in members.iter().zip(results) {
            match r {
                Ok(v) => answers.push((m.clone(), v)),
                Err(e) if is_deposing(&e) => return Err(self.depose(&e.to_string())),
                Err(e) => {
                    if let Some(s @ (Status::NoSpace | Status::Invalid | Status::OutOfRange | Status::Io)) =
                        e.status()
                    {
                        refusals.push((s, e.to_string()));
                    }
                    warn!(volume_id = %self.cfg.volume_id, replica = %m.id, error = %e, "replica failed a request");
                    failed.push(m.id.clone());
                }
            }
        }
        // Refused by every member alike (a full disk, a bad request, a disk error on each, as on
        // the last replica in sync): the client's error, and no member is worse off than the
        // others, so none is ejected (ejecting all would leave nothing to serve from). Refused by
        // some only: those members differ now, so they are ejected like any other failure.
        if answers.is_empty()
            && refusals.len() == failed.len()
            && let Some((status, msg)) = refusals.first()
        {
            // Refused alike, but a multi-cluster request may have applied in part, differently
            // per member: keep the intent marks for the next start to resync, and restart a
            // rebuild that may have taken the request.
            self.writes.hold_clears.store(true, Ordering::SeqCst);
            if let Some(j) = &view.joining {
                self.abort_join(&j.id, "the members failed a request it may have applied");
            }
            return Err(match status {
                Status::NoSpace => IoError::NoSpace,
                Status::Io => IoError::Io(msg.clone()),
                _ => IoError::Invalid(msg.clone()),
            });
        }
        if !failed.is_empty() {
            self.eject(&failed).await?;
            self.enough(self.view.read().members.len())?;
        }
        Ok(answers)
    }

    /// Flushes every member; once all completed, lets each clear the write-intent marks that flush
    /// covered (in the background: clearing is lazy and a lost clear only costs a resync).
    async fn flush_all(&self) -> Result<(), IoError> {
        // Writes started after this may be missing from a member's flush; those started before
        // must have reached every member before any mark is cleared.
        let cutoff = self.writes.next.load(Ordering::SeqCst);
        let points = self.replicate(|m| async move { m.client.flush().await }).await?;
        let volume_id = self.cfg.volume_id.clone();
        let writes = self.writes.clone();
        tokio::spawn(async move {
            writes.drained_before(cutoff).await;
            if writes.hold_clears.load(Ordering::SeqCst) {
                return;
            }
            for (m, point) in points {
                if let Err(e) = m.client.clear_intent(point).await {
                    warn!(volume_id = %volume_id, replica = %m.id, error = %e, "clearing intent marks failed");
                }
            }
        });
        Ok(())
    }

    /// After an unclean stop, makes the regions any member marked dirty identical on all members,
    /// copying from one in-sync member (rule 6), before any IO is served. Returns the bytes copied.
    ///
    /// A member that fails or times out meanwhile is ejected through the authority (as on the IO
    /// path; its rebuild later copies what it lacks) and the resync goes on with the others, from
    /// the start if the source was the one lost. When the rest would be too few to eject it, the
    /// resync is tried again after a pause: a slow replica on a busy node is not a reason to stop
    /// the volume. Only after [`RESYNC_ATTEMPTS`] such rounds does the start fail.
    async fn resync(&self) -> Result<u64, VolumeError> {
        let mut attempts = 0;
        loop {
            let (failed, e) = match self.resync_once().await {
                Ok(copied) => return Ok(copied),
                Err(ResyncFailure::Fatal(e)) => return Err(e),
                Err(ResyncFailure::Member { id, error, dirty }) => ((id, dirty), error),
            };
            let (id, dirty) = failed;
            let members = self.view.read().members.len();
            if members > self.min_healthy() {
                warn!(volume_id = %self.cfg.volume_id, replica = %id, error = %e,
                      "replica failed during the start-up resync: ejecting it");
                self.eject_with(std::slice::from_ref(&id), &dirty).await.map_err(|e| match e {
                    IoError::Shutdown => VolumeError::Deposed {
                        volume_id: self.cfg.volume_id.clone(),
                        reason: "during the start-up resync".into(),
                    },
                    other => VolumeError::Resync {
                        volume_id: self.cfg.volume_id.clone(),
                        reason: format!("ejecting replica {id}: {other}"),
                    },
                })?;
                continue;
            }
            attempts += 1;
            if attempts >= RESYNC_ATTEMPTS {
                return Err(self.resync_error(&id, &e));
            }
            warn!(volume_id = %self.cfg.volume_id, replica = %id, error = %e, attempt = attempts,
                  "replica failed during the start-up resync and cannot be spared: trying again");
            tokio::time::sleep(self.cfg.replica_timeout).await;
            self.reconnect_members(&id).await?;
        }
    }

    /// Before the volume serves: gives member `failed`, and every member whose connection
    /// closed, a new connection fenced at the current epoch (the old one may still hold the
    /// request that timed out). One that cannot be reached keeps its old connection, and fails
    /// the next attempt.
    async fn reconnect_members(&self, failed: &str) -> Result<(), VolumeError> {
        let view = self.view.read().clone();
        let mut members = view.members.clone();
        for m in &mut members {
            if m.id != failed && !m.client.is_closed() {
                continue;
            }
            let Some(r) = view.record.replica(&m.id) else { continue };
            match Self::connect(self.client_config(view.record.epoch), r).await {
                Ok(client) => {
                    *m = Arc::new(Member { id: m.id.clone(), client, reading: AtomicUsize::new(0) })
                }
                Err(e) if is_deposing(&e) => {
                    return Err(VolumeError::Deposed {
                        volume_id: self.cfg.volume_id.clone(),
                        reason: e.to_string(),
                    });
                }
                Err(e) => {
                    warn!(volume_id = %self.cfg.volume_id, replica = %m.id, error = %e, "reconnecting failed")
                }
            }
        }
        // Nothing else changes the view before the volume serves.
        *self.view.write() = Arc::new(View {
            version: view.version,
            record: view.record.clone(),
            members,
            joining: view.joining.clone(),
        });
        Ok(())
    }

    /// One pass of [`Volume::resync`] over the current members.
    async fn resync_once(&self) -> Result<u64, ResyncFailure> {
        let view = self.view.read().clone();
        let member_failed = |m: &Member, e: ClientError, dirty: &std::collections::BTreeSet<u64>| {
            if is_deposing(&e) {
                ResyncFailure::Fatal(VolumeError::Deposed {
                    volume_id: self.cfg.volume_id.clone(),
                    reason: e.to_string(),
                })
            } else {
                ResyncFailure::Member { id: m.id.clone(), error: e, dirty: dirty.clone() }
            }
        };
        let lists = join_all(view.members.iter().map(|m| m.client.list_intent())).await;
        let mut region_size = 0;
        let mut dirty = std::collections::BTreeSet::new();
        let mut failed = None;
        for (m, l) in view.members.iter().zip(lists) {
            match l {
                Ok((size, regions)) => {
                    region_size = size;
                    dirty.extend(regions);
                }
                Err(e) => failed = failed.or(Some((m, e))),
            }
        }
        if let Some((m, e)) = failed {
            return Err(member_failed(m, e, &dirty));
        }
        if dirty.is_empty() || view.members.len() < 2 {
            return Ok(0);
        }
        let source = &view.members[0];
        info!(volume_id = %self.cfg.volume_id, regions = dirty.len(), source = %source.id,
              "resyncing regions marked dirty before the last stop");
        let mut copied = 0u64;
        for &r in &dirty {
            let offset = r * region_size;
            let size = self.size();
            if offset >= size {
                continue;
            }
            let len = u32::try_from(region_size.min(size - offset)).unwrap_or(u32::MAX);
            let data = source.client.read(offset, len).await.map_err(|e| member_failed(source, e, &dirty))?;
            for m in &view.members[1..] {
                m.client.write(offset, data.clone(), false).await.map_err(|e| member_failed(m, e, &dirty))?;
            }
            copied += u64::from(len);
        }
        let flushed = join_all(view.members.iter().map(|m| m.client.flush())).await;
        let mut points = Vec::new();
        for (m, f) in view.members.iter().zip(flushed) {
            points.push(f.map_err(|e| member_failed(m, e, &dirty))?);
        }
        // Every member flushed the copies and no IO is served yet: the marks may go (rule 5).
        for (m, point) in view.members.iter().zip(points) {
            if let Err(e) = m.client.clear_intent(point).await {
                warn!(volume_id = %self.cfg.volume_id, replica = %m.id, error = %e, "clearing intent marks failed");
            }
        }
        info!(volume_id = %self.cfg.volume_id, bytes = copied, "resync done");
        Ok(copied)
    }

    fn resync_error(&self, replica: &str, e: &ClientError) -> VolumeError {
        VolumeError::Resync {
            volume_id: self.cfg.volume_id.clone(),
            reason: format!("replica {replica}: {e}"),
        }
    }

    /// Takes snapshot `name` on every member as one barrier: new IO waits, IO in flight drains,
    /// every member snapshots, IO resumes. Repeating a snapshot that (partly) exists completes it.
    pub async fn create_snapshot(&self, name: &str) -> Result<(), IoError> {
        let _barrier = self.io_gate.write().await;
        self.snapshot_members(name).await
    }

    /// Holds IO for a group snapshot: waits until the IO in flight has completed, then makes new
    /// IO wait, until [`Volume::release_io`] with the same id or until `lease` has passed (a
    /// controller that dies midway must not stop the volume). Repeating a hold in force is a
    /// no-op. Snapshots under the hold are taken by [`Volume::create_snapshot_held`].
    pub async fn hold_io(self: &Arc<Self>, id: &str, lease: Duration) -> Result<(), IoError> {
        if id.is_empty() || lease.is_zero() || lease > MAX_HOLD {
            return Err(IoError::Invalid(format!(
                "an IO hold needs an id and a lease of at most {} s",
                MAX_HOLD.as_secs()
            )));
        }
        if self.hold.lock().as_ref().is_some_and(|h| h.id == id) {
            return Ok(());
        }
        let gate = tokio::time::timeout(lease, self.io_gate.clone().write_owned()).await.map_err(|_| {
            IoError::Io(format!(
                "volume {}: IO in flight did not drain within the hold's lease",
                self.cfg.volume_id
            ))
        })?;
        let until = tokio::time::Instant::now() + lease;
        *self.hold.lock() = Some(Hold { id: id.to_owned(), _gate: gate, until });
        info!(volume_id = %self.cfg.volume_id, hold = id, ?lease, "IO held");
        let (weak, id) = (Arc::downgrade(self), id.to_owned());
        tokio::spawn(async move {
            tokio::time::sleep_until(until).await;
            if let Some(vol) = weak.upgrade()
                && vol.release_io(&id)
            {
                warn!(volume_id = %vol.cfg.volume_id, hold = %id, "an IO hold lapsed unreleased: IO goes on");
            }
        });
        Ok(())
    }

    /// Ends the IO hold `id`; false when it is not in force (released, lapsed, or another).
    pub fn release_io(&self, id: &str) -> bool {
        let mut hold = self.hold.lock();
        if hold.as_ref().is_some_and(|h| h.id == id) {
            *hold = None;
            drop(hold);
            info!(volume_id = %self.cfg.volume_id, hold = id, "IO released");
            true
        } else {
            false
        }
    }

    /// Takes snapshot `name` under the IO hold `hold` (refused when it is not in force). The hold
    /// cannot lapse while the snapshot is taken: a half-taken snapshot with writes going on would
    /// differ between members.
    pub async fn create_snapshot_held(&self, name: &str, hold: &str) -> Result<(), IoError> {
        let taken = {
            let mut h = self.hold.lock();
            match h.take() {
                Some(x) if x.id == hold => x,
                other => {
                    *h = other;
                    return Err(IoError::Invalid(format!(
                        "volume {}: IO hold {hold:?} is not in force (released or lapsed)",
                        self.cfg.volume_id
                    )));
                }
            }
        };
        let result = self.snapshot_members(name).await;
        if tokio::time::Instant::now() < taken.until {
            *self.hold.lock() = Some(taken);
        } else {
            warn!(volume_id = %self.cfg.volume_id, hold, "an IO hold lapsed during a snapshot: IO goes on");
        }
        result
    }

    /// Takes snapshot `name` on every member; the caller holds the IO gate.
    async fn snapshot_members(&self, name: &str) -> Result<(), IoError> {
        // A replica half way through its rebuild cannot take the snapshot: its rebuild starts
        // over and recreates the snapshot from a member.
        let joining = self.view.read().joining.clone();
        if let Some(j) = joining {
            self.abort_join(&j.id, "a snapshot is being taken");
        }
        let taken = self
            .replicate(|m| {
                let n = name.to_owned();
                async move {
                    match m.client.snapshot_create(&n).await {
                        Err(e) if e.status() == Some(Status::Exists) => Ok(()),
                        other => other,
                    }
                }
            })
            .await;
        if let Err(e) = taken {
            // Not taken everywhere: remove it where it was, so a retry cannot give one name
            // different contents on different members.
            let members = self.view.read().members.clone();
            for m in members {
                let _ = m.client.snapshot_delete(name).await;
            }
            return Err(e);
        }
        info!(volume_id = %self.cfg.volume_id, snapshot = name, "snapshot taken on every member");
        Ok(())
    }

    /// Deletes snapshot `name` on every member; a member that no longer has it is fine.
    pub async fn delete_snapshot(&self, name: &str) -> Result<(), IoError> {
        let _barrier = self.io_gate.write().await;
        self.replicate(|m| {
            let n = name.to_owned();
            async move {
                match m.client.snapshot_delete(&n).await {
                    Err(e) if e.status() == Some(Status::NotFound) => Ok(()),
                    other => other,
                }
            }
        })
        .await
        .map(drop)
    }

    /// The snapshots, as one member lists them (members hold the same ones).
    pub async fn list_snapshots(&self) -> Result<Vec<barnacle_replica::wire::SnapshotEntry>, IoError> {
        let view = self.view.read().clone();
        self.enough(view.members.len())?;
        view.members[0].client.snapshot_list().await.map_err(|e| IoError::Io(e.to_string()))
    }

    /// Grows every member, then the export. Shrinking is refused.
    pub async fn expand(&self, new_size: u64) -> Result<(), IoError> {
        let _barrier = self.io_gate.write().await;
        let size = self.size();
        if new_size < size {
            return Err(IoError::Invalid(format!("cannot shrink from {size} to {new_size} bytes")));
        }
        self.replicate(|m| async move { m.client.resize(new_size).await }).await?;
        self.size.store(new_size, Ordering::Relaxed);
        info!(volume_id = %self.cfg.volume_id, from = size, to = new_size, "expanded");
        Ok(())
    }

    /// Takes a replica out of the configuration: a healthy member is ejected (committed like
    /// any ejection), an ejected one (or one being rebuilt) is forgotten.
    pub async fn remove_replica(&self, id: &str) -> Result<(), IoError> {
        let record = self.view.read().record.clone();
        match record.replica(id).map(|r| r.state) {
            None => Err(IoError::Invalid(format!("replica {id} is not in the configuration"))),
            Some(ReplicaState::Healthy) => self.eject(&[id.to_owned()]).await,
            Some(ReplicaState::Ejected { .. }) => {
                // Decided under the membership lock, so a rebuild cannot promote it in between.
                self.change_record(|r| match r.replica(id).map(|x| x.state) {
                    Some(ReplicaState::Healthy) => Err(IoError::Invalid(format!(
                        "replica {id} was just rebuilt; remove it again to eject it"
                    ))),
                    _ => {
                        self.abort_join(id, "it is being removed");
                        r.replicas.retain(|x| x.id != id);
                        Ok(())
                    }
                })
                .await?;
                info!(volume_id = %self.cfg.volume_id, replica = id, "removed an ejected replica");
                Ok(())
            }
        }
    }

    /// Adds a replica to the configuration; it joins through a full rebuild.
    pub async fn add_replica(&self, id: &str, addr: &str) -> Result<(), IoError> {
        if id.is_empty() || !crate::valid_replica_address(addr) {
            return Err(IoError::Invalid(format!(
                "replica needs an id and an IP:PORT or unix:/PATH address, got {id:?} {addr:?}"
            )));
        }
        self.change_record(|r| {
            if let Some(x) = r.replica(id) {
                return if x.addr == addr {
                    Ok(())
                } else {
                    Err(IoError::Invalid(format!(
                        "replica {id} is already in the configuration at {}",
                        x.addr
                    )))
                };
            }
            let epoch = r.epoch;
            r.replicas.push(ReplicaRecord::joining(id, addr, epoch));
            Ok(())
        })
        .await?;
        info!(volume_id = %self.cfg.volume_id, replica = id, addr, "added a replica; it joins by a full rebuild");
        self.rebuild.wake.notify_one();
        Ok(())
    }

    /// Changes the record (same epoch) by compare-and-set, serialised with membership changes.
    async fn change_record(
        &self,
        f: impl FnOnce(&mut Membership) -> Result<(), IoError>,
    ) -> Result<(), IoError> {
        let _serial = self.change.lock().await;
        let view = self.view.read().clone();
        let mut record = view.record.clone();
        f(&mut record)?;
        if record == view.record {
            return Ok(());
        }
        let (a, r, expected) = (self.authority.clone(), record.clone(), view.version);
        let version = match blocking_authority(move || a.compare_and_set(Some(expected), &r)).await {
            Ok(v) => v,
            Err(AuthorityError::Conflict { .. }) => {
                return Err(self.depose("membership changed by someone else"));
            }
            Err(e) => return Err(IoError::Io(e.to_string())),
        };
        let mut next = self.view.write();
        *next =
            Arc::new(View { version, record, members: next.members.clone(), joining: next.joining.clone() });
        Ok(())
    }

    /// How long each healthy member has been silent.
    pub fn member_silence(&self) -> Vec<(String, Duration)> {
        self.view.read().members.iter().map(|m| (m.id.clone(), m.client.silence())).collect()
    }

    /// This engine's identity.
    pub fn engine_id(&self) -> Uuid {
        self.cfg.engine_id
    }

    /// Bytes copied by the resync at start.
    pub fn resynced_bytes(&self) -> u64 {
        self.resynced.load(Ordering::Relaxed)
    }

    fn enough(&self, healthy: usize) -> Result<(), IoError> {
        if healthy < self.min_healthy() {
            return Err(IoError::Io(format!(
                "volume {}: {healthy} healthy replicas, {} required",
                self.cfg.volume_id,
                self.min_healthy()
            )));
        }
        Ok(())
    }

    /// Healthy replicas writes need (at least one).
    fn min_healthy(&self) -> usize {
        self.min_healthy.load(Ordering::Relaxed).max(1)
    }

    /// The settings in force.
    pub fn settings(&self) -> VolumeSettings {
        *self.settings.lock()
    }

    /// IOs the limits made wait, and how long they waited in all.
    pub fn throttled(&self) -> (u64, Duration) {
        self.qos.throttled()
    }

    /// Commits new settings in the membership record and applies them, without interrupting IO.
    /// Raising the minimum above the replicas healthy now is refused
    /// ([`SettingsError::TooFewHealthy`]): writes would fail until a rebuild completes.
    pub async fn configure(&self, new: VolumeSettings) -> Result<(), SettingsError> {
        if new.min_healthy == 0 {
            return Err(SettingsError::Invalid("min_healthy must be at least 1".into()));
        }
        let mut too_few = None;
        self.change_record(|r| {
            let healthy = r.healthy().count();
            let current = r.settings.map_or(self.min_healthy(), |s| s.min_healthy as usize);
            if new.min_healthy as usize > healthy && new.min_healthy as usize > current {
                too_few = Some(healthy);
                return Err(IoError::Invalid("too few healthy replicas".into()));
            }
            r.settings = Some(new);
            Ok(())
        })
        .await
        .map_err(|e| match too_few {
            Some(healthy) => SettingsError::TooFewHealthy { healthy, wanted: new.min_healthy },
            None => SettingsError::Io(e),
        })?;
        *self.settings.lock() = new;
        self.min_healthy.store(new.min_healthy as usize, Ordering::Relaxed);
        self.rebuild_rate.store(new.rebuild_mib_per_sec.saturating_mul(1 << 20), Ordering::Relaxed);
        self.qos.set(limits(&new));
        info!(volume_id = %self.cfg.volume_id, settings = ?new, "settings changed");
        Ok(())
    }
}

impl Backend for Volume {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        self.qos.admit(u64::from(len)).await;
        let _io = self.io_gate.read().await;
        loop {
            if self.deposed.is_cancelled() {
                return Err(IoError::Shutdown);
            }
            let members = self.serving().await?.members.clone();
            // A closed connection may mean a newer engine fenced that member: find out (the
            // ejection's CAS deposes this engine if so) before serving a possibly stale read.
            let closed: Vec<String> =
                members.iter().filter(|m| m.client.is_closed()).map(|m| m.id.clone()).collect();
            if !closed.is_empty() {
                self.eject(&closed).await?;
                continue;
            }
            let m = self.reader(&members);
            let reading = Reading::start(&m);
            let read = m.client.read(offset, len).await;
            drop(reading);
            match read {
                // The lease must still hold when the data is handed out, not only when the read
                // was sent (a slow member could answer after a successor started writing).
                Ok(b) => {
                    self.serving().await?;
                    return Ok(b);
                }
                Err(e) if is_deposing(&e) => return Err(self.depose(&e.to_string())),
                Err(e) if matches!(e.status(), Some(Status::Invalid | Status::OutOfRange)) => {
                    return Err(IoError::Invalid(e.to_string()));
                }
                // A damaged copy: served from another member, and repaired.
                Err(e) if e.status() == Some(Status::Corrupt) => {
                    let data = self.read_damaged(&m, offset, len).await?;
                    self.serving().await?;
                    return Ok(data);
                }
                // The member answered that its disk failed the read, and there are too few
                // members to eject it (the ejection would be refused and hold every IO until
                // then): it stays, the others are tried, and the read fails only if they fail too.
                Err(e) if e.status() == Some(Status::Io) && members.len() <= self.min_healthy() => {
                    warn!(volume_id = %self.cfg.volume_id, replica = %m.id, error = %e,
                          "read failed on a replica that cannot be spared; trying the others");
                    for o in members.iter().filter(|o| !Arc::ptr_eq(o, &m)) {
                        match o.client.read(offset, len).await {
                            Ok(b) => {
                                self.serving().await?;
                                return Ok(b);
                            }
                            Err(e) if is_deposing(&e) => return Err(self.depose(&e.to_string())),
                            Err(e) => {
                                warn!(volume_id = %self.cfg.volume_id, replica = %o.id, error = %e, "read failed")
                            }
                        }
                    }
                    return Err(IoError::Io(e.to_string()));
                }
                Err(e) => {
                    warn!(volume_id = %self.cfg.volume_id, replica = %m.id, error = %e, "read failed; trying another replica");
                    self.eject(std::slice::from_ref(&m.id)).await?;
                }
            }
        }
    }

    fn write_buffer(&self, len: usize) -> Option<barnacle_replica::shm::Slot> {
        let view = self.view.read().clone();
        view.members.iter().chain(view.joining.iter()).find_map(|m| m.client.write_buffer(len))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        self.qos.admit(data.len() as u64).await;
        let _io = self.io_gate.read().await;
        let _w = self.writes.begin(offset, data.len() as u64);
        let _g = self.ranges.lock(offset, offset + data.len() as u64).await;
        self.replicate(|m| {
            let d = data.clone();
            async move { m.client.write(offset, d, fua).await }
        })
        .await
        .map(drop)
    }

    async fn flush(&self) -> Result<(), IoError> {
        let _io = self.io_gate.read().await;
        self.flush_all().await
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), IoError> {
        self.qos.admit(0).await;
        let _io = self.io_gate.read().await;
        let _w = self.writes.begin(offset, u64::from(len));
        let _g = self.ranges.lock(offset, offset + u64::from(len)).await;
        self.replicate(|m| async move { m.client.unmap(offset, len).await }).await.map(drop)
    }

    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> Result<(), IoError> {
        self.qos.admit(0).await;
        let _io = self.io_gate.read().await;
        {
            let _w = self.writes.begin(offset, u64::from(len));
            let _g = self.ranges.lock(offset, offset + u64::from(len)).await;
            self.replicate(|m| async move { m.client.write_zeroes(offset, len).await }).await?;
        }
        if fua { self.flush_all().await } else { Ok(()) }
    }
}

#[cfg(test)]
mod tests {
    use super::RangeLock;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn overlapping_ranges_wait_disjoint_ones_do_not() {
        let lock = Arc::new(RangeLock::default());
        let inside = Arc::new(AtomicU32::new(0));
        let max = Arc::new(AtomicU32::new(0));
        let tasks: Vec<_> = (0..16u64)
            .map(|i| {
                let (lock, inside, max) = (lock.clone(), inside.clone(), max.clone());
                tokio::spawn(async move {
                    // All overlap at [4096, 8192).
                    let _g = lock.lock(4096 - (i % 2) * 4096, 8192 + i * 4096).await;
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    max.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(max.load(Ordering::SeqCst), 1, "overlapping ranges were held together");
        let a = lock.lock(0, 4096).await;
        let b = tokio::time::timeout(Duration::from_secs(1), lock.lock(4096, 8192)).await;
        assert!(b.is_ok(), "disjoint ranges must not wait");
        drop(a);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_large_range_is_not_starved_by_later_small_ones() {
        let lock = Arc::new(RangeLock::default());
        let first = lock.lock(0, 4096).await;
        // A large range waits behind the first small one...
        let big = {
            let lock = lock.clone();
            tokio::spawn(async move {
                let _g = lock.lock(0, 1 << 20).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        // ...and a later small range inside it waits behind the large one, though nothing held
        // overlaps it.
        let later = tokio::time::timeout(Duration::from_millis(100), lock.lock(8192, 12288)).await;
        assert!(later.is_err(), "a later request overtook an earlier overlapping one");
        drop(first);
        tokio::time::timeout(Duration::from_secs(1), big).await.unwrap().unwrap();
        let later = tokio::time::timeout(Duration::from_secs(1), lock.lock(8192, 12288)).await;
        assert!(later.is_ok());
    }
}
