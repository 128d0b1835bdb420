//! The committed fuzz corpora (`fuzz/corpus/<harness>/`) as regression tests: every input the
//! fuzzer kept, and every one that once found a bug, runs through its harness in the ordinary
//! suite, with no libFuzzer needed.

#![allow(clippy::unwrap_used)]

use std::path::Path;

fn run_corpus(name: &str, harness: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(name);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let res = std::panic::catch_unwind(|| harness(&data));
        assert!(res.is_ok(), "{} fails its harness", path.display());
        n += 1;
    }
    assert!(n >= 4, "the {name} corpus holds only {n} inputs");
}

#[test]
fn nbd_server_corpus() {
    run_corpus("nbd_server", barnacle_fuzz::nbd_server);
}

#[test]
fn replica_frames_corpus() {
    run_corpus("replica_frames", barnacle_fuzz::replica_frames);
}

#[test]
fn store_requests_corpus() {
    run_corpus("store_requests", barnacle_fuzz::store_requests);
}
