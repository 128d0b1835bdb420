//! Block checksums: damage on the disk is reported, never returned as data; checksums follow
//! copy-on-write, unmaps and clones; a crash between a block and its checksum is healed at open;
//! readers racing writers see no false damage. And the injected disk faults the fault tests use.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use barnacle_replica::StoreError;
use barnacle_replica::store::{CreateOptions, FaultOp, FaultSpec, Store};

const CS: u64 = 64 * 1024;
const MIB: u64 = 1 << 20;

fn pattern(tag: u8, len: u64) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31) ^ tag ^ (i >> 12) as u8).collect()
}

/// Flips one bit of the store's data file at byte `at`, as a failing disk would.
fn flip_bit(store_dir: &Path, at: u64) {
    let f = OpenOptions::new().read(true).write(true).open(store_dir.join("data")).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x04;
    f.write_all_at(&b, at).unwrap();
}

fn is_checksum(e: &StoreError, offset: u64) -> bool {
    matches!(e, StoreError::Checksum { offset: o } if *o == offset)
}

#[test]
fn a_flipped_bit_is_reported_never_returned_and_a_rewrite_repairs_it() {
    let dir = tempfile::tempdir().unwrap();
    let sd = dir.path().join("r");
    let s = Store::create(&sd, &CreateOptions::new("vol", 16 * MIB, CS)).unwrap();
    // The first cluster written lands in physical cluster 0.
    let data = pattern(1, CS);
    s.write(5 * CS, &data, false).unwrap();
    s.flush().unwrap();
    flip_bit(&sd, 3 * 4096 + 100);

    let mut buf = vec![0u8; CS as usize];
    let e = s.read(5 * CS, &mut buf).unwrap_err();
    assert!(is_checksum(&e, 5 * CS + 3 * 4096), "{e}");
    // Reads that do not touch the damaged block are served.
    let mut two = vec![0u8; 8192];
    s.read(5 * CS, &mut two).unwrap();
    assert_eq!(two, data[..8192]);
    s.read(5 * CS + 4 * 4096, &mut two).unwrap();
    assert_eq!(two, data[4 * 4096..6 * 4096]);
    // The page-cache path does not hand it out either.
    let mut one = vec![0u8; 4096];
    assert!(
        !s.read_cached(5 * CS + 3 * 4096, &mut one).unwrap_or(false),
        "a cached read returned damaged data"
    );
    assert!(s.read(5 * CS + 3 * 4096, &mut one).is_err());
    assert_eq!(s.stat().unwrap().checksum_errors, 2);

    // Writing the block again (as the engine's repair does) heals it.
    s.write(5 * CS + 3 * 4096, &data[3 * 4096..4 * 4096], false).unwrap();
    s.read(5 * CS, &mut buf).unwrap();
    assert_eq!(buf, data);
}

#[test]
fn damage_under_a_snapshot_and_in_a_clone_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let sd = dir.path().join("r");
    let s = Store::create(&sd, &CreateOptions::new("vol", 16 * MIB, CS)).unwrap();
    let old = pattern(2, CS);
    s.write(0, &old, false).unwrap();
    s.create_snapshot("snap").unwrap();
    // A partial overwrite copies on write: the new cluster's checksums cover the copied part.
    let new = pattern(3, 4096);
    s.write(4096, &new, false).unwrap();
    let mut buf = vec![0u8; CS as usize];
    s.read(0, &mut buf).unwrap();
    let mut want = old.clone();
    want[4096..8192].copy_from_slice(&new);
    assert_eq!(buf, want);

    // A clone copies the checksums with the data.
    let target = dir.path().join("clone");
    s.clone_snapshot("snap", &target, "clone-vol", |_, _| {}).unwrap();
    // Physical cluster 0 is the snapshot's.
    flip_bit(&sd, 9 * 4096);
    let e = s.read_snapshot("snap", 0, &mut buf).unwrap_err();
    assert!(is_checksum(&e, 9 * 4096), "{e}");
    s.read(0, &mut buf).unwrap();
    assert_eq!(buf, want, "the head's copy is another cluster");
    let c = Store::open(&target).unwrap();
    c.read(0, &mut buf).unwrap();
    assert_eq!(buf, old);
    drop(c);
    flip_bit(&target, 2 * 4096);
    let c = Store::open(&target).unwrap();
    assert!(is_checksum(&c.read(0, &mut buf).unwrap_err(), 2 * 4096));
}

#[test]
fn unmapped_and_zeroed_blocks_read_zeros_without_false_damage() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::create(&dir.path().join("r"), &CreateOptions::new("vol", 16 * MIB, CS)).unwrap();
    s.write(0, &pattern(4, 4 * CS), false).unwrap();
    s.unmap(4096, 8192).unwrap();
    s.write_zeroes(CS, CS).unwrap();
    s.flush().unwrap();
    // A freed cluster reused by a partial write: the rest of it has no checksum and reads zeros.
    s.write(3 * CS + 8192, &pattern(5, 4096), false).unwrap();
    s.unmap(2 * CS, CS).unwrap();
    s.flush().unwrap();
    s.write(7 * CS, &pattern(6, 4096), false).unwrap();
    let mut buf = vec![0u8; 8 * CS as usize];
    s.read(0, &mut buf).unwrap();
    let mut want = pattern(4, 4 * CS);
    want.resize(8 * CS as usize, 0);
    want[4096..12288].fill(0);
    want[CS as usize..3 * CS as usize].fill(0);
    want[3 * CS as usize + 8192..3 * CS as usize + 12288].copy_from_slice(&pattern(5, 4096));
    want[7 * CS as usize..7 * CS as usize + 4096].copy_from_slice(&pattern(6, 4096));
    assert_eq!(buf, want);
    assert_eq!(s.stat().unwrap().checksum_errors, 0);
}

#[test]
fn a_crash_between_a_block_and_its_checksum_is_healed_at_open_only_where_writes_were_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let sd = dir.path().join("r");
    let s = Store::create(&sd, &CreateOptions::new("vol", 16 * MIB, CS)).unwrap();
    // Region 0 (first MiB): written, flushed, and its intent mark cleared, as after the engine
    // saw the flush complete everywhere. Region 1: written after, its mark still set.
    s.write(0, &pattern(7, CS), false).unwrap();
    let point = s.flush().unwrap();
    s.clear_intent(point).unwrap();
    s.write(MIB, &pattern(8, CS), false).unwrap();
    drop(s);
    // A crash after the data of a write reached the disk but before its checksum did looks like
    // this: the data differs from what the checksum describes. In region 1 that is a write in
    // flight; in region 0 it can only be damage.
    flip_bit(&sd, CS + 10); // physical cluster 1: logical MiB
    flip_bit(&sd, 10); // physical cluster 0: logical 0
    let s = Store::open(&sd).unwrap();
    let mut buf = vec![0u8; CS as usize];
    s.read(MIB, &mut buf).unwrap();
    let mut torn = pattern(8, CS);
    torn[10] ^= 0x04;
    assert_eq!(buf, torn, "the marked region's data was taken as it is");
    assert!(is_checksum(&s.read(0, &mut buf).unwrap_err(), 0), "a clean region's damage went unnoticed");
}

#[test]
fn readers_racing_writers_on_the_same_blocks_see_no_false_damage() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(Store::create(&dir.path().join("r"), &CreateOptions::new("vol", 4 * MIB, CS)).unwrap());
    s.write(0, &pattern(0, CS), false).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..2u8 {
        let (s, stop) = (s.clone(), stop.clone());
        workers.push(std::thread::spawn(move || {
            let mut n = 0u8;
            while !stop.load(Ordering::Relaxed) {
                n = n.wrapping_add(1);
                // Each writer owns every other block of the cluster.
                for b in (u64::from(w)..16).step_by(2) {
                    s.write(b * 4096, &pattern(n, 4096), false).unwrap();
                    s.try_write_inline(b * 4096, &pattern(n ^ 0x55, 4096)).unwrap();
                }
            }
        }));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut buf = vec![0u8; CS as usize];
    let mut reads = 0u32;
    while std::time::Instant::now() < deadline {
        s.read(0, &mut buf).unwrap();
        let _ = s.read_cached(0, &mut buf).unwrap();
        reads += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    assert!(reads > 10);
    assert_eq!(s.stat().unwrap().checksum_errors, 0);
}

#[test]
fn without_checksums_damage_is_returned_as_data() {
    // The control for the tests above: the same damage on a store created without checksums.
    let dir = tempfile::tempdir().unwrap();
    let sd = dir.path().join("r");
    let opts = CreateOptions { checksums: false, ..CreateOptions::new("vol", 16 * MIB, CS) };
    let s = Store::create(&sd, &opts).unwrap();
    s.write(0, &pattern(1, CS), false).unwrap();
    s.flush().unwrap();
    flip_bit(&sd, 100);
    let mut buf = vec![0u8; CS as usize];
    s.read(0, &mut buf).unwrap();
    assert_ne!(buf, pattern(1, CS));
    let st = s.stat().unwrap();
    assert!(!st.checksums);
    assert!(!sd.join("sums").exists());
}

#[test]
fn injected_faults_fail_the_io_they_target_and_a_failed_sync_fails_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::create(&dir.path().join("r"), &CreateOptions::new("vol", 16 * MIB, CS)).unwrap();
    s.write(0, &pattern(1, 2 * CS), false).unwrap();
    let eio = |op, offset, len, count| FaultSpec { op, errno: libc::EIO, offset, len, count, duration: None };
    s.inject_faults(vec![eio(FaultOp::Read, CS, 4096, 1)]);
    let mut buf = vec![0u8; 2 * CS as usize];
    let e = s.read(0, &mut buf).unwrap_err();
    assert!(matches!(&e, StoreError::Io { source, .. } if source.raw_os_error() == Some(libc::EIO)), "{e}");
    s.read(0, &mut buf).unwrap();
    assert_eq!(buf, pattern(1, 2 * CS), "one read failed, then the fault disarmed");

    s.inject_faults(vec![FaultSpec { errno: libc::ENOSPC, ..eio(FaultOp::Write, 0, 0, 0) }]);
    let e = s.write(8 * CS, &pattern(2, 4096), false).unwrap_err();
    assert!(
        matches!(&e, StoreError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC)),
        "{e}"
    );
    assert!(s.try_write_inline(0, &pattern(2, 4096)).is_err());
    s.inject_faults(Vec::new());
    s.write(8 * CS, &pattern(2, 4096), false).unwrap();

    s.inject_faults(vec![eio(FaultOp::Sync, 0, 0, 1)]);
    assert!(s.flush().is_err());
    // The fault is gone, but a failed fdatasync is never retried into a success.
    assert!(matches!(s.read(0, &mut buf).unwrap_err(), StoreError::Failed(_)));
    assert!(s.stat().unwrap().failure.is_some());
}
