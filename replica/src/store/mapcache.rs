//! Recent answers of the map lookup, kept in memory so an in-place write or a read of a cluster
//! seen lately costs no RocksDB point lookup (a memtable skip-list search and a superversion
//! reference each time: about a tenth of a three-replica volume's CPU on 4 KiB random writes
//! before this cache, docs/performance.md).
//!
//! An entry is `(cluster, reader generation) → what lookup answered`. Its correctness rests on
//! how the store changes its map:
//! - every change of a cluster's entries (allocation, copy-on-write, unmap) holds that cluster's
//!   stripe lock exclusively, and forgets the cluster's cached answers (for every reader) there,
//!   before the change is written;
//! - every lookup by a reader that could see such a change (the head's) holds the stripe lock,
//!   shared or exclusive, from the lookup until its answer is used, so it cannot cache an answer
//!   a change is about to make stale;
//! - lookups without the stripe lock are by snapshot readers, whose answers no change under a
//!   stripe lock alters (those touch only the head's entries and entries no snapshot sees);
//! - everything else that changes entries or generations (snapshot create and delete, resize)
//!   holds the store's gate exclusively and clears the whole cache.
//!
//! Sharded like the stripes (same cluster → same shard), each shard bounded: a full shard is
//! emptied, so memory stays below [`SHARD_ENTRIES`] × shards entries whatever the access pattern.

use std::collections::HashMap;

use parking_lot::Mutex;

use super::keys::Mapping;

/// Entries one shard holds at most: with 1024 shards, 128 Ki clusters (8 GiB of 64 KiB clusters)
/// and about 6 MiB.
pub(crate) const SHARD_ENTRIES: usize = 128;

type Answer = Option<(u64, Mapping)>;
type Shard = Mutex<HashMap<(u64, u64), Answer>>;

pub(crate) struct MapCache {
    shards: Box<[Shard]>,
}

impl MapCache {
    pub(crate) fn new(shards: usize) -> MapCache {
        MapCache { shards: (0..shards.max(1)).map(|_| Mutex::new(HashMap::new())).collect() }
    }

    fn shard(&self, cluster: u64) -> &Shard {
        // The modulo is below the shard count, which fits in usize.
        #[allow(clippy::cast_possible_truncation)]
        &self.shards[(cluster % self.shards.len() as u64) as usize]
    }

    /// The cached answer for `cluster` as seen by `reader`, if there is one.
    pub(crate) fn get(&self, cluster: u64, reader: u64) -> Option<Answer> {
        self.shard(cluster).lock().get(&(cluster, reader)).copied()
    }

    pub(crate) fn put(&self, cluster: u64, reader: u64, answer: Answer) {
        let mut shard = self.shard(cluster).lock();
        if shard.len() >= SHARD_ENTRIES && !shard.contains_key(&(cluster, reader)) {
            shard.clear();
        }
        shard.insert((cluster, reader), answer);
    }

    /// Forgets every reader's answer for `cluster`: its entries are about to change.
    pub(crate) fn forget(&self, cluster: u64) {
        self.shard(cluster).lock().retain(|(c, _), _| *c != cluster);
    }

    /// Forgets everything.
    pub(crate) fn clear(&self) {
        for s in &self.shards {
            s.lock().clear();
        }
    }

    /// Entries held, over all shards.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_kept_per_reader_and_forgotten_per_cluster() {
        let c = MapCache::new(4);
        c.put(5, 1, Some((1, Mapping::Phys(9))));
        c.put(5, 2, None);
        c.put(9, 1, Some((0, Mapping::Zero)));
        assert_eq!(c.get(5, 1), Some(Some((1, Mapping::Phys(9)))));
        assert_eq!(c.get(5, 2), Some(None));
        assert_eq!(c.get(5, 3), None);
        // 5 and 9 share a shard; forgetting 5 keeps 9.
        c.forget(5);
        assert_eq!(c.get(5, 1), None);
        assert_eq!(c.get(5, 2), None);
        assert_eq!(c.get(9, 1), Some(Some((0, Mapping::Zero))));
        c.clear();
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn a_full_shard_is_emptied_so_memory_stays_bounded() {
        let c = MapCache::new(2);
        for i in 0..10 * SHARD_ENTRIES as u64 {
            c.put(i * 2, 1, None);
        }
        assert!(c.len() <= SHARD_ENTRIES, "{} entries in one shard", c.len());
        assert!(c.get((10 * SHARD_ENTRIES as u64 - 1) * 2, 1).is_some(), "the newest answer is kept");
    }
}
