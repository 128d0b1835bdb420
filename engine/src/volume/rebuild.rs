//! Rebuilds (DESIGN rule 7): a replica that is out of the configuration, because it was ejected
//! or just added, rejoins only through a rebuild while the volume serves IO.
//!
//! - **Delta or full.** A replica ejected in epoch `E` whose store identity is the one on record
//!   needs only the regions written in epoch `E` or later (the survivors' written stamps, see
//!   the replica's `LIST_WRITTEN`) plus its own write-intent marks (writes it may have applied that
//!   the others did not). That needs a source whose stamps go back that far (`tracked_since`). Any
//!   other case is a full rebuild, which copies only what is allocated on the source or the target.
//! - **Snapshots first, oldest first.** Snapshots the target has but the source does not are
//!   deleted; those it lacks are recreated in creation order by bringing its head to the
//!   snapshot's contents and snapshotting it under the same name. No live write reaches the
//!   target in this phase, so its snapshots hold exactly the source's contents.
//! - **Write-only join, then the head.** Under the IO barrier the target joins: every write goes to
//!   it too, no read does. Each region of the head's delta is then copied under the engine's range
//!   lock, so a copy never interleaves with a write to the same range. Chunks equal on both sides
//!   are skipped (no copy-on-write space is spent on them); zero chunks become unmaps.
//! - **Promotion by compare-and-set.** After a flush of the target, the record marks it healthy
//!   (with its store identity, and for a full rebuild the epoch its stamps start at); only then
//!   does it serve reads.
//!
//! A snapshot taken while the head is being copied restarts the rebuild (the target's head is
//! half old, so it cannot take the snapshot). The copy rate is limited by
//! the volume's `rebuild_mib_per_sec` setting (read as it copies, so a change applies at once) and progress is reported through
//! [`Volume::rebuild_progress`], the logs and the metrics.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use barnacle_replica::client::ClientError;
use barnacle_replica::store::INTENT_REGION;
use barnacle_replica::wire::Status;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Member, View, Volume, blocking_authority, is_deposing};
use crate::authority::{AuthorityError, ReplicaRecord, ReplicaState};
use crate::nbd::Backend;

/// Unit of comparison inside a region: equal chunks are not written, zero chunks are unmapped.
const CHUNK: usize = 64 * 1024;

/// A rebuild in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildProgress {
    pub replica: String,
    /// A full rebuild (otherwise a delta).
    pub full: bool,
    /// "snapshots" (recreating snapshots) or "head" (copying the live data, joined write-only).
    pub phase: &'static str,
    /// Source bytes examined so far, and the total to examine.
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// The volume's rebuild bookkeeping.
#[derive(Default)]
pub(super) struct RebuildState {
    progress: Mutex<Option<RebuildProgress>>,
    /// The last rebuild that completed, as it ended.
    last: Mutex<Option<RebuildProgress>>,
    /// The replica being rebuilt and the token that stops its rebuild.
    current: Mutex<Option<(String, CancellationToken)>>,
    /// Wakes the rebuilder before its next retry (a replica was added).
    pub(super) wake: Arc<Notify>,
    /// Bytes written or unmapped on targets, over every rebuild.
    copied: AtomicU64,
    /// Rebuilds completed.
    completed: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
enum RebuildError {
    #[error("replica {replica}: {source}")]
    Replica { replica: String, source: ClientError },
    #[error("replica not reachable: {0}")]
    Unreachable(ClientError),
    #[error("stopped: {0}")]
    Aborted(String),
    #[error("{0}")]
    Other(String),
}

fn on(m: &Member) -> impl FnOnce(ClientError) -> RebuildError + '_ {
    move |source| RebuildError::Replica { replica: m.id.clone(), source }
}

/// The regions (of [`INTENT_REGION`] bytes) touched by extents `(offset, len)`.
fn regions_of(extents: &[(u64, u64)]) -> impl Iterator<Item = u64> + '_ {
    extents.iter().filter(|e| e.1 > 0).flat_map(|&(o, l)| (o / INTENT_REGION)..=((o + l - 1) / INTENT_REGION))
}

/// What a rebuild copies: the regions written in epoch `since` or later plus the `missed` ones,
/// or everything allocated.
#[derive(Debug, Clone, Copy)]
enum Mode<'a> {
    Delta { since: u64, missed: &'a [u64] },
    Full,
}

/// Paces the copy to `rate` bytes per second.
pub(super) struct Pacer<'a> {
    /// The rate as it is now (bytes per second, 0: unlimited): it may change during a rebuild.
    source: &'a std::sync::atomic::AtomicU64,
    rate: u64,
    started: Instant,
    bytes: u64,
}

impl<'a> Pacer<'a> {
    pub(super) fn new(source: &'a std::sync::atomic::AtomicU64) -> Pacer<'a> {
        let rate = source.load(std::sync::atomic::Ordering::Relaxed);
        Pacer { source, rate, started: Instant::now(), bytes: 0 }
    }

    pub(super) async fn take(&mut self, n: u64) {
        let rate = self.source.load(std::sync::atomic::Ordering::Relaxed);
        if rate != self.rate {
            // A new rate counts from now.
            *self = Pacer { source: self.source, rate, started: Instant::now(), bytes: 0 };
        }
        self.bytes += n;
        if self.rate == 0 {
            return;
        }
        #[allow(clippy::cast_precision_loss)]
        let due = Duration::from_secs_f64(self.bytes as f64 / self.rate as f64);
        if let Some(wait) = due.checked_sub(self.started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
}

impl Volume {
    /// The rebuild in progress, if any.
    pub fn rebuild_progress(&self) -> Option<RebuildProgress> {
        self.rebuild.progress.lock().clone()
    }

    /// The last rebuild that completed, as it ended.
    pub fn last_rebuild(&self) -> Option<RebuildProgress> {
        self.rebuild.last.lock().clone()
    }

    /// Bytes written to rebuild targets so far, and rebuilds completed.
    pub fn rebuild_totals(&self) -> (u64, u64) {
        (self.rebuild.copied.load(Ordering::Relaxed), self.rebuild.completed.load(Ordering::Relaxed))
    }

    /// Stops the rebuild of `id`, if one runs, and takes it out of the write path.
    pub(super) fn abort_join(&self, id: &str, reason: &str) {
        {
            let mut view = self.view.write();
            if view.joining.as_ref().is_some_and(|j| j.id == id) {
                *view = Arc::new(View {
                    version: view.version,
                    record: view.record.clone(),
                    members: view.members.clone(),
                    joining: None,
                });
            }
        }
        if let Some((current, token)) = &*self.rebuild.current.lock()
            && current == id
            && !token.is_cancelled()
        {
            warn!(volume_id = %self.cfg.volume_id, replica = id, reason, "stopping the rebuild");
            token.cancel();
        }
    }

    /// Starts the task that rebuilds replicas out of the configuration, one at a time, retrying
    /// every [`VolumeConfig::rebuild_retry`](super::VolumeConfig).
    pub(super) fn spawn_rebuilder(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let deposed = self.deposed.clone();
        tokio::spawn(async move {
            loop {
                let Some(vol) = weak.upgrade() else { return };
                let retry = vol.cfg.retry();
                let candidates: Vec<ReplicaRecord> = vol
                    .view
                    .read()
                    .record
                    .replicas
                    .iter()
                    .filter(|r| r.state != ReplicaState::Healthy)
                    .cloned()
                    .collect();
                for rec in candidates {
                    if deposed.is_cancelled() {
                        return;
                    }
                    match vol.rebuild_one(&rec).await {
                        Ok(()) => {}
                        Err(RebuildError::Unreachable(e)) => {
                            debug!(volume_id = %vol.cfg.volume_id, replica = %rec.id, error = %e, "replica still unreachable");
                        }
                        Err(e) => {
                            warn!(volume_id = %vol.cfg.volume_id, replica = %rec.id, error = %e, "rebuild failed; will retry");
                        }
                    }
                }
                let wake = vol.rebuild.wake.clone();
                drop(vol);
                tokio::select! {
                    () = deposed.cancelled() => return,
                    () = tokio::time::sleep(retry) => {}
                    () = wake.notified() => {}
                }
            }
        });
    }

    /// Rebuilds replica `rec` and promotes it.
    async fn rebuild_one(self: &Arc<Self>, rec: &ReplicaRecord) -> Result<(), RebuildError> {
        let ReplicaState::Ejected { epoch: ejected } = rec.state else { return Ok(()) };
        let epoch = self.view.read().record.epoch;
        let client = match Self::connect(self.client_config(epoch), rec).await {
            Ok(c) => c,
            Err(e) if is_deposing(&e) => {
                self.depose(&e.to_string());
                return Err(RebuildError::Aborted("deposed".into()));
            }
            Err(e) => return Err(RebuildError::Unreachable(e)),
        };
        let target = Arc::new(Member { id: rec.id.clone(), client, reading: AtomicUsize::new(0) });
        let identity = target.client.hello().store_id;
        let view = self.view.read().clone();
        // A source's stamps must go back to before the ejection epoch.
        let delta_source = (rec.store_id == Some(identity))
            .then(|| {
                view.members
                    .iter()
                    .find(|m| view.record.replica(&m.id).is_some_and(|r| r.tracked_since < ejected))
            })
            .flatten();
        let (mode, source) = match delta_source {
            Some(s) => (Mode::Delta { since: ejected, missed: &rec.missed_regions }, s.clone()),
            None => match view.members.first() {
                Some(s) => (Mode::Full, s.clone()),
                None => return Err(RebuildError::Other("no healthy member to copy from".into())),
            },
        };
        let token = CancellationToken::new();
        *self.rebuild.current.lock() = Some((rec.id.clone(), token.clone()));
        let full = matches!(mode, Mode::Full);
        info!(volume_id = %self.cfg.volume_id, replica = %rec.id, source = %source.id, full, ejected,
              "rebuilding replica");
        let res = self.run_rebuild(&source, &target, rec, mode, &token).await;
        *self.rebuild.current.lock() = None;
        let last = self.rebuild.progress.lock().take();
        if let Err(e) = res {
            self.abort_join(&rec.id, "the rebuild failed");
            if let RebuildError::Replica { source, .. } = &e
                && is_deposing(source)
            {
                self.depose(&source.to_string());
            }
            return Err(e);
        }
        *self.rebuild.last.lock() = last;
        self.rebuild.completed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn run_rebuild(
        &self,
        source: &Arc<Member>,
        target: &Arc<Member>,
        rec: &ReplicaRecord,
        mut mode: Mode<'_>,
        token: &CancellationToken,
    ) -> Result<(), RebuildError> {
        let size = self.size();
        let target_size = target.client.hello().size;
        if target_size > size {
            return Err(RebuildError::Other(format!(
                "replica is {target_size} bytes, larger than the volume ({size} bytes)"
            )));
        }
        if target_size < size {
            target.client.resize(size).await.map_err(on(target))?;
        }
        let mut pacer = Pacer::new(&self.rebuild_rate);
        let mut progress = RebuildProgress {
            replica: target.id.clone(),
            full: matches!(mode, Mode::Full),
            phase: "snapshots",
            done_bytes: 0,
            total_bytes: 0,
        };
        // Phase 1: snapshots, oldest first, with no live write reaching the target.
        loop {
            let src = source.client.snapshot_list().await.map_err(on(source))?;
            let tgt = target.client.snapshot_list().await.map_err(on(target))?;
            // A name the target holds with another creation time was deleted and reused while
            // it was away: its contents predate the ejection, which the delta does not cover.
            if matches!(mode, Mode::Delta { .. })
                && src.iter().any(|s| tgt.iter().any(|t| t.name == s.name && !same_snapshot(s, t)))
            {
                info!(volume_id = %self.cfg.volume_id, replica = %target.id,
                      "a snapshot name was reused while the replica was away: rebuilding in full");
                mode = Mode::Full;
                progress.full = true;
            }
            let full = matches!(mode, Mode::Full);
            // A full rebuild trusts none of the target's snapshots.
            let first_missing = if full {
                0
            } else {
                src.iter().position(|s| !tgt.iter().any(|t| same_snapshot(s, t))).unwrap_or(src.len())
            };
            let keep: Vec<&str> = if full {
                Vec::new()
            } else {
                src[..first_missing].iter().map(|s| s.name.as_str()).collect()
            };
            for t in &tgt {
                if !keep.contains(&t.name.as_str()) {
                    info!(volume_id = %self.cfg.volume_id, replica = %target.id, snapshot = %t.name, "deleting a snapshot the rebuild will not keep");
                    target.client.snapshot_delete(&t.name).await.map_err(on(target))?;
                }
            }
            // The total is estimated from the steps as they look now; each step's set is taken
            // just before it runs, since the target's head changes with every step.
            let mut estimates = Vec::new();
            for s in &src[first_missing..] {
                let n =
                    self.copy_set(source, target, mode, Some(&s.name)).await?.len() as u64 * INTENT_REGION;
                progress.total_bytes += n;
                estimates.push(n);
            }
            *self.rebuild.progress.lock() = Some(progress.clone());
            for (s, estimate) in src[first_missing..].iter().zip(estimates) {
                let set = self.copy_set(source, target, mode, Some(&s.name)).await?;
                progress.total_bytes = progress.total_bytes - estimate + set.len() as u64 * INTENT_REGION;
                self.copy_regions(
                    source,
                    target,
                    Some((&s.name, s.size)),
                    &set,
                    &mut progress,
                    &mut pacer,
                    token,
                )
                .await?;
                target.client.snapshot_create_at(&s.name, s.created_unix).await.map_err(on(target))?;
                info!(volume_id = %self.cfg.volume_id, replica = %target.id, snapshot = %s.name, "snapshot recreated");
            }
            // Join under the IO barrier: no write in flight can miss the target, and no snapshot
            // can slip in between the check and the join.
            let _barrier = self.io_gate.write().await;
            if token.is_cancelled() {
                return Err(RebuildError::Aborted("before joining".into()));
            }
            let now = source.client.snapshot_list().await.map_err(on(source))?;
            if now != src {
                continue;
            }
            let mut view = self.view.write();
            if view.joining.is_some() || !view.members.iter().any(|m| Arc::ptr_eq(m, source)) {
                return Err(RebuildError::Other("the configuration changed before the join".into()));
            }
            *view = Arc::new(View {
                version: view.version,
                record: view.record.clone(),
                members: view.members.clone(),
                joining: Some(target.clone()),
            });
            break;
        }
        info!(volume_id = %self.cfg.volume_id, replica = %target.id, "joined write-only; copying the head");
        // Phase 2: the head, region by region under the range lock, while writes reach both.
        let set = self.copy_set(source, target, mode, None).await?;
        progress.phase = "head";
        progress.total_bytes = progress.done_bytes + set.len() as u64 * INTENT_REGION;
        *self.rebuild.progress.lock() = Some(progress.clone());
        self.copy_regions(source, target, None, &set, &mut progress, &mut pacer, token).await?;
        target.client.flush().await.map_err(on(target))?;
        self.promote(target, rec, token).await
    }

    /// The regions to examine for one step (a snapshot, or the head with `None`).
    async fn copy_set(
        &self,
        source: &Member,
        target: &Member,
        mode: Mode<'_>,
        snapshot: Option<&str>,
    ) -> Result<BTreeSet<u64>, RebuildError> {
        let mut set = BTreeSet::new();
        match mode {
            Mode::Delta { since, missed } => {
                let (region, written) = source.client.list_written(since).await.map_err(on(source))?;
                let (region2, marked) = target.client.list_intent().await.map_err(on(target))?;
                if region != INTENT_REGION || region2 != INTENT_REGION {
                    return Err(RebuildError::Other(format!(
                        "replicas track {region}/{region2}-byte regions, this engine {INTENT_REGION}"
                    )));
                }
                set.extend(written);
                set.extend(marked);
                set.extend(missed.iter().copied());
            }
            Mode::Full => {
                let src = source.client.list_allocated(snapshot).await.map_err(on(source))?;
                let tgt = target.client.list_allocated(None).await.map_err(on(target))?;
                set.extend(regions_of(&src));
                set.extend(regions_of(&tgt));
            }
        }
        Ok(set)
    }

    /// Makes the target's head equal to the source's head (`None`) or snapshot in every region
    /// of `set`. Head regions are copied under the IO gate and the range lock.
    #[allow(clippy::too_many_arguments)]
    async fn copy_regions(
        &self,
        source: &Member,
        target: &Member,
        snapshot: Option<(&str, u64)>,
        set: &BTreeSet<u64>,
        progress: &mut RebuildProgress,
        pacer: &mut Pacer<'_>,
        token: &CancellationToken,
    ) -> Result<(), RebuildError> {
        let mut logged = Instant::now();
        for &r in set {
            if token.is_cancelled() {
                return Err(RebuildError::Aborted(format!(
                    "at {} of {} bytes",
                    progress.done_bytes, progress.total_bytes
                )));
            }
            if self.deposed.is_cancelled() {
                return Err(RebuildError::Aborted("deposed".into()));
            }
            pacer.take(INTENT_REGION).await;
            let offset = r * INTENT_REGION;
            let (_io, _range);
            if snapshot.is_none() {
                _io = self.io_gate.read().await;
                _range = self.ranges.lock(offset, offset + INTENT_REGION).await;
            }
            // A source ejected meanwhile may lack writes the target already has: under the range
            // lock, no write to this region is in flight, so its membership now decides.
            if !self.view.read().members.iter().any(|m| std::ptr::eq(m.as_ref(), source)) {
                return Err(RebuildError::Aborted("the source left the configuration".into()));
            }
            // The target's head has the volume's size; a snapshot taken before an expansion
            // reads as zeros beyond its own size.
            let limit = self.size();
            if offset < limit {
                let len = u32::try_from(INTENT_REGION.min(limit - offset)).unwrap_or(u32::MAX);
                let (src, dst) = tokio::join!(
                    async {
                        match snapshot {
                            Some((name, size)) => {
                                let have = u32::try_from(size.saturating_sub(offset).min(u64::from(len)))
                                    .unwrap_or(len);
                                let mut data = if have > 0 {
                                    bytes::BytesMut::from(
                                        &source.client.read_snapshot(name, offset, have).await?[..],
                                    )
                                } else {
                                    bytes::BytesMut::new()
                                };
                                data.resize(len as usize, 0);
                                Ok(data.freeze())
                            }
                            None => source.client.read(offset, len).await,
                        }
                    },
                    target.client.read(offset, len)
                );
                let dst = match dst {
                    // The target's copy is damaged somewhere in the region: rewrite all of it.
                    Err(e) if e.status() == Some(Status::Corrupt) => Bytes::new(),
                    other => other.map_err(on(target))?,
                };
                let src = match src {
                    // The source's copy of the head is damaged: read a sound one (the range is
                    // locked) and repair the source on the way.
                    Err(e) if snapshot.is_none() && e.status() == Some(Status::Corrupt) => self
                        .recover(source, offset, len)
                        .await
                        .map_err(|e| RebuildError::Other(e.to_string()))?,
                    other => other.map_err(on(source))?,
                };
                let copied = self.copy_chunks(target, offset, &src, &dst).await?;
                self.rebuild.copied.fetch_add(copied, Ordering::Relaxed);
            }
            progress.done_bytes += INTENT_REGION;
            *self.rebuild.progress.lock() = Some(progress.clone());
            if logged.elapsed() >= Duration::from_secs(5) {
                logged = Instant::now();
                info!(volume_id = %self.cfg.volume_id, replica = %progress.replica, phase = progress.phase,
                      done = progress.done_bytes, total = progress.total_bytes, "rebuild progress");
            }
        }
        Ok(())
    }

    /// Writes the chunks of `src` that differ from `dst` at `offset` on the target (zero chunks
    /// as unmaps). Returns the bytes changed.
    async fn copy_chunks(
        &self,
        target: &Member,
        offset: u64,
        src: &Bytes,
        dst: &Bytes,
    ) -> Result<u64, RebuildError> {
        let mut changed = 0u64;
        let mut at = 0usize;
        while at < src.len() {
            let end = (at + CHUNK).min(src.len());
            let (s, d) = (&src[at..end], dst.get(at..end));
            if d != Some(s) {
                let o = offset + at as u64;
                let n = u32::try_from(end - at).unwrap_or(u32::MAX);
                if s.iter().all(|b| *b == 0) {
                    target.client.unmap(o, n).await.map_err(on(target))?;
                } else {
                    target.client.write(o, src.slice(at..end), false).await.map_err(on(target))?;
                }
                changed += u64::from(n);
            }
            at = end;
        }
        Ok(changed)
    }

    /// Marks the rebuilt target healthy by compare-and-set and makes it a full member, under the
    /// IO barrier: no write can straddle the change from joining to member.
    async fn promote(
        &self,
        target: &Arc<Member>,
        rec: &ReplicaRecord,
        token: &CancellationToken,
    ) -> Result<(), RebuildError> {
        let _barrier = self.io_gate.write().await;
        let _serial = self.change.lock().await;
        let view = self.view.read().clone();
        if token.is_cancelled() || !view.joining.as_ref().is_some_and(|j| Arc::ptr_eq(j, target)) {
            return Err(RebuildError::Aborted("left the write path before promotion".into()));
        }
        let mut record = view.record.clone();
        let epoch = record.epoch;
        // The same entry the rebuild started for: not removed, not re-added elsewhere.
        let Some(r) = record
            .replicas
            .iter_mut()
            .find(|r| r.id == target.id && r.addr == rec.addr && r.state == rec.state)
        else {
            return Err(RebuildError::Aborted("its configuration entry changed".into()));
        };
        r.state = ReplicaState::Healthy;
        r.missed_regions.clear();
        r.store_id = Some(target.client.hello().store_id);
        // Its written stamps are complete only from now on (a rebuild skips equal chunks and
        // holes, which it does not stamp): it can be the source of a delta for a later ejection.
        r.tracked_since = epoch;
        let (a, new, expected) = (self.authority.clone(), record.clone(), view.version);
        let version = match blocking_authority(move || a.compare_and_set(Some(expected), &new)).await {
            Ok(v) => v,
            Err(AuthorityError::Conflict { .. }) => {
                self.depose("membership changed by someone else");
                return Err(RebuildError::Aborted("deposed".into()));
            }
            Err(e) => return Err(RebuildError::Other(format!("promotion not committed: {e}"))),
        };
        {
            // No IO runs under the barrier, so nothing can have aborted the join since the
            // check; members and joining change in one step.
            let mut current = self.view.write();
            let mut members = current.members.clone();
            members.push(target.clone());
            *current = Arc::new(View { version, record, members, joining: None });
        }
        info!(volume_id = %self.cfg.volume_id, replica = %target.id, epoch, "rebuild done; replica healthy");
        Ok(())
    }
}

/// Whether two listings name the same snapshot: same name, created within the same couple of
/// seconds (members take one snapshot at one barrier; recreated snapshots keep the source's time).
fn same_snapshot(
    a: &barnacle_replica::wire::SnapshotEntry,
    b: &barnacle_replica::wire::SnapshotEntry,
) -> bool {
    a.name == b.name && a.created_unix.abs_diff(b.created_unix) <= 2
}

impl super::VolumeConfig {
    fn retry(&self) -> Duration {
        self.rebuild_retry.max(Duration::from_millis(100))
    }
}
