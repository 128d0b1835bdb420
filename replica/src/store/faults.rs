//! Disk-fault injection: makes the store's data IO fail as a failing disk would (EIO on reads,
//! writes or syncs of a range, ENOSPC on writes), for a number of operations or a while, so tests
//! can check what the engine does with a replica whose disk goes bad. Nothing is armed unless a
//! test arms it through the management API, which refuses unless the replica was started with
//! `--fault-injection`; unarmed, a check is one relaxed atomic load.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Which data operation a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    Read,
    Write,
    /// fdatasync of the data: as on a real disk, the store then refuses IO until reopened.
    Sync,
}

/// One injected fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultSpec {
    pub op: FaultOp,
    /// The error returned (`libc::EIO`, `libc::ENOSPC`, ...).
    pub errno: i32,
    /// Volume byte range hit (reads and writes overlapping it); `len` 0: the whole volume.
    pub offset: u64,
    pub len: u64,
    /// Operations to fail before the fault disarms itself; 0: no limit.
    pub count: u64,
    /// How long the fault lasts; `None`: until cleared (or `count` is reached).
    pub duration: Option<Duration>,
}

#[derive(Debug)]
struct Active {
    spec: FaultSpec,
    until: Option<Instant>,
    hits: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Faults {
    armed: AtomicBool,
    active: Mutex<Vec<Active>>,
}

impl Faults {
    /// Replaces the armed faults with `specs` (empty: disarms everything).
    pub(crate) fn set(&self, specs: Vec<FaultSpec>) {
        let now = Instant::now();
        let mut a = self.active.lock();
        *a = specs
            .into_iter()
            .map(|spec| Active { until: spec.duration.map(|d| now + d), spec, hits: 0 })
            .collect();
        self.armed.store(!a.is_empty(), Ordering::Release);
    }

    /// The injected error for an `op` on `len` bytes at volume offset `offset`, if one is armed.
    pub(crate) fn check(&self, op: FaultOp, offset: u64, len: u64) -> io::Result<()> {
        if !self.armed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let now = Instant::now();
        let mut a = self.active.lock();
        a.retain(|f| f.until.is_none_or(|u| now < u) && (f.spec.count == 0 || f.hits < f.spec.count));
        let hit = a.iter_mut().find(|f| {
            let s = &f.spec;
            s.op == op
                && (op == FaultOp::Sync
                    || s.len == 0
                    || (offset < s.offset + s.len && s.offset < offset + len))
        });
        let res = match hit {
            Some(f) => {
                f.hits += 1;
                Err(io::Error::from_raw_os_error(f.spec.errno))
            }
            None => Ok(()),
        };
        if a.is_empty() {
            self.armed.store(false, Ordering::Release);
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(op: FaultOp) -> FaultSpec {
        FaultSpec { op, errno: libc::EIO, offset: 8192, len: 4096, count: 0, duration: None }
    }

    #[test]
    fn a_fault_hits_its_operation_and_range_only() {
        let f = Faults::default();
        assert!(f.check(FaultOp::Read, 8192, 4096).is_ok(), "nothing armed");
        f.set(vec![spec(FaultOp::Read)]);
        assert_eq!(f.check(FaultOp::Read, 8192, 4096).unwrap_err().raw_os_error(), Some(libc::EIO));
        assert!(f.check(FaultOp::Read, 0, 8192).is_ok(), "ends where the fault starts");
        assert!(f.check(FaultOp::Read, 0, 8193).is_err(), "overlaps by one byte");
        assert!(f.check(FaultOp::Read, 12288, 4096).is_ok());
        assert!(f.check(FaultOp::Write, 8192, 4096).is_ok(), "another operation");
        assert!(f.check(FaultOp::Sync, 0, 0).is_ok());
        f.set(Vec::new());
        assert!(f.check(FaultOp::Read, 8192, 4096).is_ok(), "cleared");
    }

    #[test]
    fn counted_and_timed_faults_disarm_themselves() {
        let f = Faults::default();
        f.set(vec![FaultSpec { count: 2, len: 0, errno: libc::ENOSPC, ..spec(FaultOp::Write) }]);
        assert_eq!(f.check(FaultOp::Write, 1 << 30, 4096).unwrap_err().raw_os_error(), Some(libc::ENOSPC));
        assert!(f.check(FaultOp::Write, 0, 4096).is_err());
        assert!(f.check(FaultOp::Write, 0, 4096).is_ok(), "two operations failed; the third succeeds");
        assert!(!f.armed.load(Ordering::Relaxed));
        f.set(vec![FaultSpec { duration: Some(Duration::from_millis(50)), ..spec(FaultOp::Sync) }]);
        assert!(f.check(FaultOp::Sync, 0, 0).is_err());
        std::thread::sleep(Duration::from_millis(60));
        assert!(f.check(FaultOp::Sync, 0, 0).is_ok(), "the burst is over");
    }
}
