//! Physical cluster allocation in the data file.
//!
//! The set of used clusters is derived from the map at open (every mapped physical cluster), so it
//! is never persisted on its own and cannot disagree with the map. Invariant: every cluster in the
//! free set is a hole in the data file, so a newly allocated cluster reads as zeros wherever it is
//! not written. Freed clusters wait in `pending` until the metadata batch that unmapped them is
//! synced; only then are they punched and become reusable (DESIGN rule 8).

/// One bit per physical cluster of the data file: 2 MiB per TiB at 64 KiB clusters.
#[derive(Debug, Default)]
pub(crate) struct Allocator {
    used: Vec<u64>,
    /// Clusters `0..high_water` may be used; everything above is unused file space.
    high_water: u64,
    /// Lowest index that may be free.
    hint: u64,
    used_count: u64,
    /// Freed by an unsynced metadata batch: not reusable yet.
    pending: Vec<u64>,
}

impl Allocator {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn word_bit(p: u64) -> (usize, u64) {
        // Cluster indexes fit in usize on every 64-bit target we support.
        #[allow(clippy::cast_possible_truncation)]
        let w = (p / 64) as usize;
        (w, 1u64 << (p % 64))
    }

    pub(crate) fn is_used(&self, p: u64) -> bool {
        let (w, b) = Self::word_bit(p);
        self.used.get(w).is_some_and(|x| x & b != 0)
    }

    /// Marks `p` used while rebuilding from the map; false if it was already used (a cluster mapped
    /// twice, which means the store is corrupt).
    pub(crate) fn mark_used(&mut self, p: u64) -> bool {
        let (w, b) = Self::word_bit(p);
        if self.used.len() <= w {
            self.used.resize(w + 1, 0);
        }
        if self.used[w] & b != 0 {
            return false;
        }
        self.used[w] |= b;
        self.used_count += 1;
        self.high_water = self.high_water.max(p + 1);
        true
    }

    /// Takes the lowest free cluster (or one past the end).
    pub(crate) fn allocate(&mut self) -> u64 {
        let mut p = self.hint;
        loop {
            let (w, _) = Self::word_bit(p);
            match self.used.get(w) {
                Some(&word) if word == u64::MAX => p = (p / 64 + 1) * 64,
                Some(_) if self.is_used(p) => p += 1,
                _ => break,
            }
        }
        let fresh = self.mark_used(p);
        debug_assert!(fresh, "allocated a used cluster");
        self.hint = p + 1;
        p
    }

    /// Returns `p` to the free set. Only for clusters that are holes again or that no durable
    /// mapping ever pointed at and that the caller has punched.
    pub(crate) fn release(&mut self, p: u64) {
        let (w, b) = Self::word_bit(p);
        if let Some(word) = self.used.get_mut(w)
            && *word & b != 0
        {
            *word &= !b;
            self.used_count -= 1;
            self.hint = self.hint.min(p);
        }
    }

    /// Queues `p` to be released after the next metadata sync.
    pub(crate) fn free_after_sync(&mut self, p: u64) {
        self.pending.push(p);
    }

    /// Takes the clusters whose unmapping will be durable once the sync that starts now completes.
    pub(crate) fn take_pending(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.pending)
    }

    pub(crate) fn used_count(&self) -> u64 {
        self.used_count
    }

    pub(crate) fn high_water(&self) -> u64 {
        self.high_water
    }

    /// Runs of free clusters below the high-water mark, as (first, count).
    pub(crate) fn free_runs(&self) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut start = None;
        for p in 0..self.high_water {
            match (self.is_used(p), start) {
                (false, None) => start = Some(p),
                (true, Some(s)) => {
                    runs.push((s, p - s));
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            runs.push((s, self.high_water - s));
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_lowest_free_and_reuses_released() {
        let mut a = Allocator::new();
        assert_eq!((a.allocate(), a.allocate(), a.allocate()), (0, 1, 2));
        a.release(1);
        assert_eq!(a.used_count(), 2);
        assert_eq!(a.allocate(), 1);
        assert_eq!(a.allocate(), 3);
        assert_eq!(a.high_water(), 4);
    }

    #[test]
    fn skips_full_words_and_detects_double_use() {
        let mut a = Allocator::new();
        for p in 0..130 {
            assert!(a.mark_used(p));
        }
        assert!(!a.mark_used(64));
        assert_eq!(a.allocate(), 130);
        a.release(5);
        a.release(6);
        a.release(129);
        assert_eq!(a.free_runs(), vec![(5, 2), (129, 1)]);
    }

    #[test]
    fn pending_frees_wait_for_the_sync() {
        let mut a = Allocator::new();
        let p = a.allocate();
        a.free_after_sync(p);
        assert!(a.is_used(p), "pending cluster must not be reusable");
        assert_ne!(a.allocate(), p);
        for q in a.take_pending() {
            a.release(q);
        }
        assert_eq!(a.allocate(), p);
    }
}
