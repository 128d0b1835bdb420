//! Model-based test of the replica store: random sequences of writes, unmaps, write-zeroes,
//! snapshot create/delete, clones, resizes, flushes and reopens, with every read of the head and of
//! each live snapshot (and of each clone) compared against a plain in-memory model.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use barnacle_replica::store::{BLOCK_SIZE, CreateOptions, Store};
use proptest::prelude::*;

const CLUSTER: u64 = 16 * 1024;
const INITIAL_BLOCKS: u64 = 48;

#[derive(Debug, Clone)]
enum Op {
    Write { block: u64, blocks: u64, seed: u8 },
    Unmap { block: u64, blocks: u64 },
    WriteZeroes { block: u64, blocks: u64 },
    Snapshot,
    DeleteSnapshot { pick: usize },
    Clone { pick: usize, block: u64, seed: u8 },
    Resize { extra_blocks: u64 },
    Flush,
    Reopen,
    Read { block: u64, blocks: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    // Offsets are taken modulo the current size when the op runs.
    let range = (0u64..200, 1u64..14);
    prop_oneof![
        8 => (range.clone(), any::<u8>()).prop_map(|((block, blocks), seed)| Op::Write { block, blocks, seed }),
        2 => range.clone().prop_map(|(block, blocks)| Op::Unmap { block, blocks }),
        1 => range.clone().prop_map(|(block, blocks)| Op::WriteZeroes { block, blocks }),
        2 => Just(Op::Snapshot),
        2 => any::<usize>().prop_map(|pick| Op::DeleteSnapshot { pick }),
        1 => (any::<usize>(), 0u64..200, any::<u8>()).prop_map(|(pick, block, seed)| Op::Clone { pick, block, seed }),
        1 => (1u64..8).prop_map(|extra_blocks| Op::Resize { extra_blocks }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        3 => range.prop_map(|(block, blocks)| Op::Read { block, blocks }),
    ]
}

fn pattern(seed: u8, offset: u64, len: usize) -> Vec<u8> {
    // Distinct per block and per seed, never all zeros.
    (0..len)
        .map(|i| {
            let at = offset + i as u64;
            (at / 7).wrapping_mul(31).wrapping_add(u64::from(seed) * 131 + 1) as u8 | 1
        })
        .collect()
}

/// Clamps a generated (block, blocks) to the volume: returns (offset, len) in bytes.
fn clamp(size: u64, block: u64, blocks: u64) -> (u64, u64) {
    let total = size / BLOCK_SIZE;
    let start = block % total;
    let n = blocks.min(total - start);
    (start * BLOCK_SIZE, n * BLOCK_SIZE)
}

struct Harness {
    dir: PathBuf,
    store: Option<Store>,
    head: Vec<u8>,
    snaps: BTreeMap<String, Vec<u8>>,
    next_snap: u32,
    next_clone: u32,
}

impl Harness {
    fn store(&self) -> &Store {
        self.store.as_ref().unwrap()
    }

    fn check_range(&self, offset: u64, len: u64) {
        let mut buf = vec![0xEEu8; len as usize];
        self.store().read(offset, &mut buf).unwrap();
        let want = &self.head[offset as usize..(offset + len) as usize];
        assert!(buf == want, "head differs in {offset}+{len}");
    }

    fn check_all(&self) {
        self.check_range(0, self.head.len() as u64);
        for (name, want) in &self.snaps {
            let mut buf = vec![0xEEu8; want.len()];
            self.store().read_snapshot(name, 0, &mut buf).unwrap();
            assert!(&buf == want, "snapshot {name} differs");
        }
        let names: Vec<_> = self.store().list_snapshots().into_iter().map(|s| s.name).collect();
        let want: Vec<_> = self.snaps.keys().cloned().collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(sorted, want);
    }

    fn apply(&mut self, op: &Op, root: &Path) {
        let size = self.head.len() as u64;
        match *op {
            Op::Write { block, blocks, seed } => {
                let (off, len) = clamp(size, block, blocks);
                let data = pattern(seed, off, len as usize);
                self.store().write(off, &data, seed % 5 == 0).unwrap();
                let region = barnacle_replica::store::INTENT_REGION;
                assert!(
                    self.store().dirty_regions().contains(&(off / region)),
                    "write left its region clean"
                );
                self.head[off as usize..(off + len) as usize].copy_from_slice(&data);
                self.check_range(off, len);
            }
            Op::Unmap { block, blocks } | Op::WriteZeroes { block, blocks } => {
                let (off, len) = clamp(size, block, blocks);
                if matches!(op, Op::Unmap { .. }) {
                    self.store().unmap(off, len).unwrap();
                } else {
                    self.store().write_zeroes(off, len).unwrap();
                }
                self.head[off as usize..(off + len) as usize].fill(0);
                self.check_range(off, len);
            }
            Op::Snapshot => {
                let name = format!("snap-{}", self.next_snap);
                self.next_snap += 1;
                self.store().create_snapshot(&name).unwrap();
                assert!(matches!(
                    self.store().create_snapshot(&name),
                    Err(barnacle_replica::StoreError::SnapshotExists(_))
                ));
                self.snaps.insert(name, self.head.clone());
            }
            Op::DeleteSnapshot { pick } => {
                if self.snaps.is_empty() {
                    assert!(self.store().delete_snapshot("nope").is_err());
                    return;
                }
                let name = self.snaps.keys().nth(pick % self.snaps.len()).unwrap().clone();
                self.store().delete_snapshot(&name).unwrap();
                self.snaps.remove(&name);
                self.check_all();
            }
            Op::Clone { pick, block, seed } => {
                if self.snaps.is_empty() {
                    return;
                }
                let (name, want) = self.snaps.iter().nth(pick % self.snaps.len()).unwrap();
                let target = root.join(format!("clone-{}", self.next_clone));
                self.next_clone += 1;
                let mut last = (0, 0);
                let report =
                    self.store().clone_snapshot(name, &target, "clone-vol", |d, t| last = (d, t)).unwrap();
                assert_eq!(last.0, last.1);
                assert_eq!(report.bytes, last.1);
                let clone = Store::open(&target).unwrap();
                let mut buf = vec![0u8; want.len()];
                clone.read(0, &mut buf).unwrap();
                assert!(&buf == want, "clone of {name} differs from the snapshot");
                // The clone is independent of its source in both directions.
                let (off, len) = clamp(want.len() as u64, block, 3);
                let data = pattern(seed.wrapping_add(77), off, len as usize);
                clone.write(off, &data, false).unwrap();
                let mut back = vec![0u8; len as usize];
                clone.read(off, &mut back).unwrap();
                assert_eq!(back, data);
                drop(clone);
                Store::destroy(&target).unwrap();
                self.check_all();
            }
            Op::Resize { extra_blocks } => {
                let new = size + extra_blocks * BLOCK_SIZE;
                self.store().resize(new).unwrap();
                assert!(self.store().resize(size).is_err(), "shrink must be refused");
                self.head.resize(new as usize, 0);
                self.check_range(size, new - size);
            }
            Op::Flush => {
                // With nothing in flight, a flush covers every mark: clearing leaves none.
                let point = self.store().flush().unwrap();
                self.store().clear_intent(point).unwrap();
                assert!(self.store().dirty_regions().is_empty());
            }
            Op::Reopen => {
                self.store = None;
                self.store = Some(Store::open(&self.dir).unwrap());
                self.check_all();
            }
            Op::Read { block, blocks } => {
                let (off, len) = clamp(size, block, blocks);
                self.check_range(off, len);
            }
        }
    }
}

fn run(ops: &[Op]) {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("replica");
    let size = INITIAL_BLOCKS * BLOCK_SIZE;
    let opts = CreateOptions::new("model-vol", size, CLUSTER);
    let store = Store::create(&dir, &opts).unwrap();
    let mut h = Harness {
        dir,
        store: Some(store),
        head: vec![0u8; size as usize],
        snaps: BTreeMap::new(),
        next_snap: 0,
        next_clone: 0,
    };
    for op in ops {
        h.apply(op, root.path());
    }
    h.check_all();
    // Space comes back: with every snapshot deleted and the head unmapped and flushed, nothing is
    // allocated and the data file holds no blocks.
    let names: Vec<_> = h.snaps.keys().cloned().collect();
    for n in names {
        h.store().delete_snapshot(&n).unwrap();
    }
    let size = h.head.len() as u64;
    h.store().unmap(0, size).unwrap();
    h.store().flush().unwrap();
    let stat = h.store().stat().unwrap();
    assert_eq!(stat.allocated_bytes, 0, "{stat:?}");
    assert_eq!(stat.disk_bytes, 0, "{stat:?}");
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64),
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    })]

    #[test]
    fn store_matches_model(ops in prop::collection::vec(op(), 40..160)) {
        run(&ops);
    }
}
