//! Damaged copies and the scrub.
//!
//! A replica whose block does not match its checksum answers `Corrupt` instead of returning it.
//! The engine then takes the range lock (no write to the range in flight), reads the range from
//! another member, hands that to the client, and writes it back to the damaged member, which
//! replaces the block and its checksum. Only when every member's copy is damaged does the read
//! fail (EIO); a damaged copy is never returned.
//!
//! The scrub reads every allocated block of every member, the head and each snapshot, paced like
//! a rebuild, so damage is found before a client or a rebuild needs the block. Damage in the head
//! is repaired as above. A snapshot's blocks cannot be rewritten in place: damage there is
//! counted and logged (the other members' copies still serve a rebuild or a clone).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use barnacle_replica::wire::Status;
use bytes::Bytes;
use parking_lot::Mutex;
use tracing::{error, info, warn};

use super::rebuild::Pacer;
use super::{Member, Volume, is_deposing};
use crate::nbd::IoError;

/// Bytes one scrub read covers.
const SCRUB_CHUNK: u64 = 1 << 20;

/// Damage found and repaired since the engine started, and the scrub.
#[derive(Default)]
pub(super) struct Damage {
    /// Ranges members reported damaged (a block not matching its checksum).
    found: AtomicU64,
    /// Bytes rewritten on damaged members from a sound copy.
    repaired: AtomicU64,
    /// Damaged ranges left as they are: snapshot blocks, or every member's copy damaged.
    unrepaired: AtomicU64,
    /// The scrub running, or the last one.
    scrub: Mutex<Option<ScrubProgress>>,
}

/// A scrub's progress (or outcome, once `running` is false).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubProgress {
    pub running: bool,
    /// Allocated bytes of every member (head and snapshots) read so far, and in all.
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Damaged ranges found, bytes repaired, damaged ranges that could not be repaired.
    pub damaged: u64,
    pub repaired_bytes: u64,
    pub unrepaired: u64,
    pub started_unix: u64,
    pub finished_unix: u64,
    /// Why the scrub stopped early, if it did.
    pub error: Option<String>,
}

/// What a scrub reads of one member: the allocated extents of its head or of one snapshot.
struct ScrubPart {
    member: Arc<Member>,
    snapshot: Option<String>,
    extents: Vec<(u64, u64)>,
}

/// Damage counters since the engine started: (ranges found damaged, bytes repaired, ranges left).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DamageTotals {
    pub found: u64,
    pub repaired_bytes: u64,
    pub unrepaired: u64,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Volume {
    pub fn damage_totals(&self) -> DamageTotals {
        DamageTotals {
            found: self.damage.found.load(Ordering::Relaxed),
            repaired_bytes: self.damage.repaired.load(Ordering::Relaxed),
            unrepaired: self.damage.unrepaired.load(Ordering::Relaxed),
        }
    }

    /// The scrub running, or the last one since the engine started.
    pub fn scrub_progress(&self) -> Option<ScrubProgress> {
        self.damage.scrub.lock().clone()
    }

    /// A client read found `bad`'s copy of the range damaged: serves it from a sound copy and
    /// repairs `bad` (see the module docs).
    pub(super) async fn read_damaged(&self, bad: &Member, offset: u64, len: u32) -> Result<Bytes, IoError> {
        let _range = self.ranges.lock(offset, offset + u64::from(len)).await;
        self.recover(bad, offset, len).await
    }

    /// With the range locked: reads it from a member whose copy is sound and rewrites it on `bad`
    /// (and on any other member found damaged on the way). Fails only when no sound copy is left.
    pub(super) async fn recover(&self, bad: &Member, offset: u64, len: u32) -> Result<Bytes, IoError> {
        let id = &self.cfg.volume_id;
        self.damage.found.fetch_add(1, Ordering::Relaxed);
        warn!(volume_id = %id, replica = %bad.id, offset, len, "replica holds a damaged copy; reading another");
        let members = self.serving().await?.members.clone();
        let mut damaged = vec![bad];
        for m in members.iter().filter(|m| !std::ptr::eq(m.as_ref(), bad)) {
            match m.client.read(offset, len).await {
                Ok(data) => {
                    for d in &damaged {
                        self.rewrite(d, offset, data.clone()).await?;
                    }
                    return Ok(data);
                }
                Err(e) if is_deposing(&e) => return Err(self.depose(&e.to_string())),
                Err(e) if e.status() == Some(Status::Corrupt) => {
                    self.damage.found.fetch_add(1, Ordering::Relaxed);
                    warn!(volume_id = %id, replica = %m.id, offset, len, "this copy is damaged too");
                    damaged.push(m);
                }
                Err(e) => {
                    warn!(volume_id = %id, replica = %m.id, error = %e, "read failed; ejecting the replica");
                    self.eject(std::slice::from_ref(&m.id)).await?;
                }
            }
        }
        self.damage.unrepaired.fetch_add(1, Ordering::Relaxed);
        error!(volume_id = %id, offset, len, damaged = damaged.len(), "no replica holds a sound copy of the range");
        Err(IoError::Io(format!("every replica's copy of the {len} bytes at {offset} is damaged")))
    }

    /// Writes a sound copy over a damaged one; a member that cannot take it is ejected.
    async fn rewrite(&self, m: &Member, offset: u64, data: Bytes) -> Result<(), IoError> {
        let len = data.len() as u64;
        match m.client.write(offset, data, false).await {
            Ok(()) => {
                self.damage.repaired.fetch_add(len, Ordering::Relaxed);
                info!(volume_id = %self.cfg.volume_id, replica = %m.id, offset, len, "repaired a damaged copy");
                Ok(())
            }
            Err(e) if is_deposing(&e) => Err(self.depose(&e.to_string())),
            Err(e) => {
                warn!(volume_id = %self.cfg.volume_id, replica = %m.id, error = %e,
                      "could not repair a damaged copy; ejecting the replica");
                self.eject(std::slice::from_ref(&m.id)).await
            }
        }
    }

    /// Starts a scrub unless one is running; returns its progress.
    pub fn start_scrub(self: &Arc<Self>) -> ScrubProgress {
        let mut s = self.damage.scrub.lock();
        if let Some(p) = s.as_ref().filter(|p| p.running) {
            return p.clone();
        }
        let p = ScrubProgress { running: true, started_unix: now_unix(), ..ScrubProgress::default() };
        *s = Some(p.clone());
        drop(s);
        info!(volume_id = %self.cfg.volume_id, "scrub started");
        let vol = self.clone();
        tokio::spawn(async move {
            let res = vol.run_scrub().await;
            let mut s = vol.damage.scrub.lock();
            if let Some(p) = s.as_mut() {
                p.running = false;
                p.finished_unix = now_unix();
                p.error = res.err().map(|e| e.to_string());
                match &p.error {
                    None => info!(volume_id = %vol.cfg.volume_id, bytes = p.done_bytes, damaged = p.damaged,
                                  repaired_bytes = p.repaired_bytes, unrepaired = p.unrepaired, "scrub finished"),
                    Some(e) => warn!(volume_id = %vol.cfg.volume_id, error = %e, done = p.done_bytes,
                                     total = p.total_bytes, "scrub stopped"),
                }
            }
        });
        p
    }

    fn scrub_update(&self, f: impl FnOnce(&mut ScrubProgress)) {
        if let Some(p) = self.damage.scrub.lock().as_mut() {
            f(p);
        }
    }

    async fn run_scrub(&self) -> Result<(), IoError> {
        let id = self.cfg.volume_id.clone();
        let members = self.serving().await?.members.clone();
        let io_err = |m: &Member, e: barnacle_replica::client::ClientError| {
            IoError::Io(format!("replica {}: {e}", m.id))
        };
        // What to read: every member's head and snapshots, as allocated now.
        let mut plan: Vec<ScrubPart> = Vec::new();
        for m in &members {
            for s in m.client.snapshot_list().await.map_err(|e| io_err(m, e))? {
                let extents = m.client.list_allocated(Some(&s.name)).await.map_err(|e| io_err(m, e))?;
                plan.push(ScrubPart { member: m.clone(), snapshot: Some(s.name), extents });
            }
            let extents = m.client.list_allocated(None).await.map_err(|e| io_err(m, e))?;
            plan.push(ScrubPart { member: m.clone(), snapshot: None, extents });
        }
        let total: u64 = plan.iter().flat_map(|p| p.extents.iter()).map(|e| e.1).sum();
        self.scrub_update(|p| p.total_bytes = total);
        let mut pacer = Pacer::new(&self.rebuild_rate);
        let mut last_log = std::time::Instant::now();
        'plan: for ScrubPart { member: m, snapshot, extents } in plan {
            let mut left: u64 = extents.iter().map(|e| e.1).sum();
            for (start, len) in extents {
                let mut o = start;
                while o < start + len {
                    if self.deposed.is_cancelled() {
                        return Err(IoError::Shutdown);
                    }
                    let n = u32::try_from(SCRUB_CHUNK.min(start + len - o)).unwrap_or(u32::MAX);
                    if !self.view.read().members.iter().any(|x| Arc::ptr_eq(x, &m)) {
                        // Left the configuration meanwhile: nothing of it to verify any more.
                        self.scrub_update(|p| p.done_bytes += left);
                        continue 'plan;
                    }
                    pacer.take(u64::from(n)).await;
                    let read = {
                        // Snapshots and expansion drain IO: let them drain the scrub too.
                        let _io = self.io_gate.read().await;
                        match &snapshot {
                            None => m.client.read(o, n).await,
                            Some(name) => m.client.read_snapshot(name, o, n).await,
                        }
                    };
                    match read {
                        Ok(_) => {}
                        Err(e) if is_deposing(&e) => return Err(self.depose(&e.to_string())),
                        Err(e) if e.status() == Some(Status::Corrupt) => match &snapshot {
                            None => {
                                let repaired = self.damage.repaired.load(Ordering::Relaxed);
                                let _io = self.io_gate.read().await;
                                let _range = self.ranges.lock(o, o + u64::from(n)).await;
                                let res = self.recover(&m, o, n).await;
                                let fixed = self.damage.repaired.load(Ordering::Relaxed) - repaired;
                                self.scrub_update(|p| {
                                    p.damaged += 1;
                                    p.repaired_bytes += fixed;
                                    p.unrepaired += u64::from(res.is_err());
                                });
                                if let Err(IoError::Shutdown) = res {
                                    return Err(IoError::Shutdown);
                                }
                            }
                            Some(name) => {
                                self.damage.found.fetch_add(1, Ordering::Relaxed);
                                self.damage.unrepaired.fetch_add(1, Ordering::Relaxed);
                                error!(volume_id = %id, replica = %m.id, snapshot = %name, offset = o, len = n,
                                       "damaged snapshot block on this replica (its other copies are not affected)");
                                self.scrub_update(|p| {
                                    p.damaged += 1;
                                    p.unrepaired += 1;
                                });
                            }
                        },
                        Err(e) => {
                            warn!(volume_id = %id, replica = %m.id, error = %e, "scrub read failed; ejecting the replica");
                            self.eject(std::slice::from_ref(&m.id)).await?;
                            self.scrub_update(|p| p.done_bytes += left);
                            continue 'plan;
                        }
                    }
                    o += u64::from(n);
                    left -= u64::from(n);
                    self.scrub_update(|p| p.done_bytes += u64::from(n));
                    if last_log.elapsed() >= std::time::Duration::from_secs(5) {
                        last_log = std::time::Instant::now();
                        if let Some(p) = self.scrub_progress() {
                            info!(volume_id = %id, done = p.done_bytes, total = p.total_bytes, damaged = p.damaged,
                                  "scrub progress");
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
