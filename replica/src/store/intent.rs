//! Write-intent marks (DESIGN rule 5): which regions of the head may differ between replicas.
//!
//! Before the first write (or unmap) touches a clean region, the region is marked dirty in RocksDB
//! with a synced batch; concurrent writers share one batch (group commit). A dirty region stays
//! dirty while writes land in it, so the steady state costs no extra sync. Marks are cleared only
//! when the engine says a flush covering them completed on every member: [`Intent::flush_point`]
//! is taken when a flush starts, and [`Intent::clear`] drops the regions with no write in flight
//! whose last write was acknowledged before that point. After an engine crash the engine reads the
//! marks of every member and resyncs just those regions.
//!
//! Beside the marks, every region keeps a *written stamp*: the highest epoch in which a write (or
//! unmap) touched it, stored under `w` and never cleared. It is written in the same synced batch as
//! the mark, before the first write of an epoch lands in the region, so "regions written since
//! epoch E" is always a superset of what changed since then. That is the delta a replica ejected in
//! epoch E needs when it comes back (DESIGN rule 7); epochs change rarely, so the steady state still
//! costs no extra sync.

use std::collections::{HashMap, HashSet};

use parking_lot::{Condvar, Mutex};
use rocksdb::{DB, WriteBatch, WriteOptions};

use super::keys;
use crate::error::{Result, StoreError};

/// Bytes covered by one mark.
pub const INTENT_REGION: u64 = 1 << 20;
const REGION_SHIFT: u32 = INTENT_REGION.trailing_zeros();

#[derive(Debug, Clone, Copy)]
struct Region {
    in_flight: u32,
    /// Sequence number of the last write acknowledged in this region.
    last_ack: u64,
    /// Durable once `durable >= ticket`.
    ticket: u64,
}

#[derive(Debug, Default)]
struct State {
    regions: HashMap<u64, Region>,
    next_ticket: u64,
    durable: u64,
    /// Newly dirty regions waiting for their batch.
    pending: Vec<u64>,
    committing: bool,
    acks: u64,
    poisoned: Option<String>,
    /// The replica's epoch: writes are stamped with it.
    epoch: u64,
    /// Regions whose stamp is (or is being made) the current epoch.
    stamped: HashSet<u64>,
}

#[derive(Debug, Default)]
pub(crate) struct Intent {
    state: Mutex<State>,
    committed: Condvar,
}

fn regions(offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
    (offset >> REGION_SHIFT)..=((offset + len.max(1) - 1) >> REGION_SHIFT)
}

pub(crate) fn mark_key(region: u64) -> [u8; 9] {
    region_key(keys::INTENT_TAG, region)
}

pub(crate) fn stamp_key(region: u64) -> [u8; 9] {
    region_key(keys::STAMP_TAG, region)
}

fn region_key(tag: u8, region: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = tag;
    k[1..].copy_from_slice(&region.to_be_bytes());
    k
}

impl Intent {
    /// Marks found on disk at open: durable, nothing in flight. Writes are stamped with `epoch`.
    pub(crate) fn load(marked: impl IntoIterator<Item = u64>, epoch: u64) -> Intent {
        let regions =
            marked.into_iter().map(|r| (r, Region { in_flight: 0, last_ack: 0, ticket: 0 })).collect();
        Intent { state: Mutex::new(State { regions, epoch, ..State::default() }), committed: Condvar::new() }
    }

    /// The replica took a new epoch: the next write to each region stamps it again.
    pub(crate) fn set_epoch(&self, epoch: u64) {
        let mut st = self.state.lock();
        if st.epoch != epoch {
            st.epoch = epoch;
            st.stamped.clear();
        }
    }

    /// Marks the regions of `[offset, offset+len)` as having a write in flight, and returns once
    /// every one of them is durably marked dirty.
    pub(crate) fn begin(&self, db: &DB, sync: &WriteOptions, offset: u64, len: u64) -> Result<()> {
        let mut st = self.state.lock();
        let mut need = 0;
        for r in regions(offset, len) {
            let stamped = st.stamped.contains(&r);
            let ticket = match st.regions.get_mut(&r) {
                Some(region) if stamped => {
                    region.in_flight += 1;
                    region.ticket
                }
                _ => {
                    st.next_ticket += 1;
                    let ticket = st.next_ticket;
                    let region =
                        st.regions.entry(r).or_insert(Region { in_flight: 0, last_ack: 0, ticket: 0 });
                    region.in_flight += 1;
                    region.ticket = ticket;
                    st.pending.push(r);
                    st.stamped.insert(r);
                    ticket
                }
            };
            need = need.max(ticket);
        }
        loop {
            if let Some(why) = &st.poisoned {
                let why = why.clone();
                drop(st);
                self.end(offset, len);
                return Err(StoreError::Failed(why));
            }
            if st.durable >= need {
                return Ok(());
            }
            if st.committing {
                self.committed.wait(&mut st);
                continue;
            }
            st.committing = true;
            let batch_regions = std::mem::take(&mut st.pending);
            let top = st.next_ticket;
            // A fence in between only raises it: a stamp too high is a larger delta, never a
            // missed one.
            let epoch = st.epoch.to_be_bytes();
            drop(st);
            let mut b = WriteBatch::default();
            for r in &batch_regions {
                b.put(mark_key(*r), []);
                b.put(stamp_key(*r), epoch);
            }
            let res = db.write_opt(b, sync);
            st = self.state.lock();
            st.committing = false;
            match res {
                // Every ticket handed out before the batch was taken is in it or already durable.
                Ok(()) => st.durable = st.durable.max(top.min(st.next_ticket)),
                Err(e) => st.poisoned = Some(format!("writing intent marks: {e}")),
            }
            self.committed.notify_all();
        }
    }

    /// [`Intent::begin`] for a range whose regions are all durably marked and stamped in the
    /// current epoch, so nothing has to be written; `false` (and nothing begun) otherwise.
    pub(crate) fn begin_if_covered(&self, offset: u64, len: u64) -> bool {
        let mut st = self.state.lock();
        let durable = st.durable;
        let covered = regions(offset, len)
            .all(|r| st.stamped.contains(&r) && st.regions.get(&r).is_some_and(|g| g.ticket <= durable));
        if covered {
            for r in regions(offset, len) {
                if let Some(g) = st.regions.get_mut(&r) {
                    g.in_flight += 1;
                }
            }
        }
        covered
    }

    /// The write that [`Intent::begin`] announced finished (acknowledged or failed).
    pub(crate) fn end(&self, offset: u64, len: u64) {
        let mut st = self.state.lock();
        st.acks += 1;
        let ack = st.acks;
        for r in regions(offset, len) {
            if let Some(region) = st.regions.get_mut(&r) {
                region.in_flight = region.in_flight.saturating_sub(1);
                region.last_ack = ack;
            }
        }
    }

    /// Taken when a flush starts: writes acknowledged before it are covered by that flush.
    pub(crate) fn flush_point(&self) -> u64 {
        self.state.lock().acks + 1
    }

    /// Clears the marks of regions with no write in flight whose last write was acknowledged
    /// before `point`. The deletes need no sync: a lost one only means a region resynced in vain.
    pub(crate) fn clear(&self, db: &DB, nosync: &WriteOptions, point: u64) -> Result<u64> {
        let mut st = self.state.lock();
        let durable = st.durable;
        let gone: Vec<u64> = st
            .regions
            .iter()
            .filter(|(_, r)| r.in_flight == 0 && r.last_ack < point && r.ticket <= durable)
            .map(|(k, _)| *k)
            .collect();
        let mut b = WriteBatch::default();
        for r in &gone {
            st.regions.remove(r);
            b.delete(mark_key(*r));
        }
        // Written under the lock so a region re-marked meanwhile cannot have its new mark deleted.
        db.write_opt(b, nosync)?;
        Ok(gone.len() as u64)
    }

    /// Dirty regions, in order.
    pub(crate) fn dirty(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.state.lock().regions.keys().copied().collect();
        v.sort_unstable();
        v
    }
}
