//! The chaos test (see `barnacle_tests::chaos`): a 3-replica volume under eight NBD writers and
//! a flusher while random faults hit it, one after another: replica kill, replica stop beyond
//! the timeout, engine kill, a network partition between the engine and a replica, ENOSPC and
//! EIO bursts on a replica's disk, and every process killed at once. No acknowledged write may
//! be lost, through the engine or on any replica alone.
//!
//! CI runs a bounded round of 30 faults (every kind at least four times); `bench/chaos.sh N`
//! runs N. `BARNACLE_CHAOS_FAULTS`, `BARNACLE_CHAOS_SEED` (the fault sequence) and
//! `BARNACLE_CHAOS_REPORT` (a JSON report) set a run.

#![allow(clippy::unwrap_used)]

use barnacle_tests::chaos;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_acknowledged_write_is_lost_under_random_faults() {
    let faults = std::env::var("BARNACLE_CHAOS_FAULTS").map_or(30, |v| v.parse().unwrap());
    let seed = std::env::var("BARNACLE_CHAOS_SEED").map_or_else(|_| rand::random(), |v| v.parse().unwrap());
    let report = chaos::run(faults, seed).await;
    let json = serde_json::to_string_pretty(&report.to_json()).unwrap();
    eprintln!("{json}");
    if let Ok(path) = std::env::var("BARNACLE_CHAOS_REPORT") {
        std::fs::write(path, &json).unwrap();
    }
    assert!(
        report.violations.is_empty(),
        "seed {seed}: {} violations: {:#?}",
        report.violations.len(),
        report.violations
    );
    assert_eq!(report.faults.values().sum::<u64>(), faults as u64, "not every fault ran: {json}");
    // The load ran through the faults (not a volume that stopped serving at the first one).
    assert!(report.writes_acked > 20 * faults as u64, "too few writes acknowledged: {json}");
}
