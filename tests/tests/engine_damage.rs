//! Damaged and failing disks under a real engine and real replica processes: a flipped bit on a
//! replica's disk is never returned and the damaged copy is repaired (on read and by the scrub);
//! EIO from one replica's disk loses no acknowledged write, EIO from the last one fails the
//! write; a replica whose disk returns errors for a while is ejected and rebuilt once it recovers.
//! Disk errors are injected through the replica's fault-injection API (there is no failing disk
//! here); the bit flips are real writes to the replica's data file.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use barnacle_engine::mgmt::pb::{self, engine_manager_client::EngineManagerClient};
use barnacle_replica::mgmt::pb::Fault;
use barnacle_tests::{EngineProcess, ReplicaProcess, replica_images, run_ok};

const VOL: &str = "vol-damage";
const TOKEN: &str = "damage-token";
const MIB: u64 = 1 << 20;

struct Setup {
    root: tempfile::TempDir,
    token: std::path::PathBuf,
    log: std::path::PathBuf,
    replicas: Vec<ReplicaProcess>,
}

fn setup(n: usize) -> Setup {
    let root = tempfile::tempdir().unwrap();
    let token = root.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let log = root.path().join("log");
    let replicas = (0..n)
        .map(|i| {
            ReplicaProcess::start_with(
                &root.path().join(format!("r{i}")),
                VOL,
                &token,
                Some("64MiB"),
                &log,
                &["--fault-injection"],
            )
        })
        .collect();
    Setup { root, token, log, replicas }
}

impl Setup {
    fn engine(&self, extra: &[&str]) -> EngineProcess {
        let ids: Vec<(String, SocketAddr)> =
            self.replicas.iter().enumerate().map(|(i, r)| (format!("r{i}"), r.data)).collect();
        EngineProcess::start(VOL, &self.token, &ids, &self.root.path().join("engine"), extra, &self.log)
    }

    fn data_file(&self, i: usize) -> std::path::PathBuf {
        self.root.path().join(format!("r{i}")).join("data")
    }
}

fn authed<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    r
}

async fn status(engine: &EngineProcess) -> pb::StatusResponse {
    let mut m = EngineManagerClient::connect(format!("http://{}", engine.mgmt)).await.unwrap();
    m.status(authed(pb::StatusRequest {})).await.unwrap().into_inner()
}

/// The first 64 KiB cluster of a data file filled with `byte` only: its offset.
fn cluster_of(data: &Path, byte: u8) -> u64 {
    let f = std::fs::File::open(data).unwrap();
    let len = f.metadata().unwrap().len();
    let mut buf = vec![0u8; 64 << 10];
    for off in (0..len).step_by(64 << 10) {
        f.read_exact_at(&mut buf, off).unwrap();
        if buf.iter().all(|b| *b == byte) {
            return off;
        }
    }
    panic!("no cluster of {byte:#x} in {}", data.display());
}

/// Flips one bit of a replica's data file at `at`, as a failing disk would.
fn flip_bit(data: &Path, at: u64) {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(data).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x20;
    f.write_all_at(&b, at).unwrap();
}

fn fault(op: &str, error: &str, duration_ms: u64) -> Fault {
    Fault { op: op.into(), error: error.into(), offset: 0, length: 0, count: 0, duration_ms }
}

/// qemu-io's output for `cmds`, and whether every command succeeded.
fn qemu_io(uri: &str, cmds: &[&str]) -> (bool, String) {
    let mut args = vec!["-f", "raw", uri];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let o = Command::new("qemu-io").args(&args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let ok = o.status.success()
        && !text.contains("error")
        && !text.contains("failed")
        && !text.contains("mismatch");
    (ok, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_bit_is_never_read_and_the_damaged_copy_is_repaired() {
    let s = setup(2);
    let mut engine = s.engine(&[]);
    let uri = engine.uri(VOL);
    run_ok("qemu-io", &["-f", "raw", &uri, "-c", "write -P 0x5a 0 1M", "-c", "flush"]);
    let at = cluster_of(&s.data_file(0), 0x5a) + 3 * 4096 + 7;
    flip_bit(&s.data_file(0), at);
    // Reads alternate between the two replicas: two of the four land on the damaged one.
    for _ in 0..4 {
        let (ok, text) = qemu_io(&uri, &["read -P 0x5a 0 1M"]);
        assert!(ok, "a read returned damaged data or failed: {text}");
    }
    let st = status(&engine).await;
    assert!(st.damaged_ranges >= 1, "the damage went unnoticed: {st:?}");
    assert!(st.repaired_bytes >= 4096 && st.unrepaired_ranges == 0, "{st:?}");
    assert!(
        st.replicas.iter().all(|r| r.state == "healthy"),
        "the damaged replica was ejected, not repaired: {st:?}"
    );
    let metrics = barnacle_tests::http_get(engine.metrics, "/metrics");
    assert!(
        barnacle_tests::metric(&metrics, "barnacle_engine_damaged_ranges", &[]).unwrap() >= 1.0,
        "{metrics}"
    );
    engine.stop();
    // Read directly, each replica's copy is sound again (a damaged one would answer Corrupt).
    let addrs: Vec<SocketAddr> = s.replicas.iter().map(|r| r.data).collect();
    let images = replica_images(&addrs, VOL, TOKEN, st.epoch + 1, MIB).await;
    assert!(images.iter().all(|i| i.iter().all(|b| *b == 0x5a)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrub_repairs_the_head_and_reports_damage_under_a_snapshot() {
    let s = setup(3);
    let mut engine = s.engine(&[]);
    let uri = engine.uri(VOL);
    run_ok(
        "qemu-io",
        &["-f", "raw", &uri, "-c", "write -P 0x11 0 1M", "-c", "write -P 0x33 1M 1M", "-c", "flush"],
    );
    let mut m = EngineManagerClient::connect(format!("http://{}", engine.mgmt)).await.unwrap();
    m.create_snapshot(authed(pb::SnapshotRequest { name: "s1".into(), ..Default::default() })).await.unwrap();
    // The head's first MiB moves to new clusters; the snapshot alone keeps the 0x11 ones.
    run_ok("qemu-io", &["-f", "raw", &uri, "-c", "write -P 0x22 0 1M", "-c", "flush"]);
    flip_bit(&s.data_file(1), cluster_of(&s.data_file(1), 0x22) + 5 * 4096);
    flip_bit(&s.data_file(2), cluster_of(&s.data_file(2), 0x11) + 9 * 4096 + 1);

    let started = m.scrub(authed(pb::ScrubRequest {})).await.unwrap().into_inner();
    assert!(started.scrub.as_ref().is_some_and(|p| p.running), "{started:?}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let p = loop {
        let st = status(&engine).await;
        let p = st.scrub.unwrap();
        if !p.running {
            break p;
        }
        assert!(p.done_bytes <= p.total_bytes, "{p:?}");
        assert!(Instant::now() < deadline, "the scrub did not finish: {p:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Three replicas, each 2 MiB of snapshot and 2 MiB of head allocated.
    assert_eq!((p.done_bytes, p.total_bytes), (12 * MIB, 12 * MIB), "{p:?}");
    assert_eq!((p.damaged, p.unrepaired), (2, 1), "{p:?}");
    assert!(p.repaired_bytes >= 4096 && p.error.is_empty(), "{p:?}");
    let (ok, text) = qemu_io(&uri, &["read -P 0x22 0 1M", "read -P 0x33 1M 1M"]);
    assert!(ok, "{text}");
    let st = status(&engine).await;
    assert!(st.replicas.iter().all(|r| r.state == "healthy"), "{st:?}");
    engine.stop();
    // The repaired head of replica 1 reads back sound, straight from the replica.
    let img = replica_images(&[s.replicas[1].data], VOL, TOKEN, st.epoch + 1, 2 * MIB).await.remove(0);
    assert!(img[..MIB as usize].iter().all(|b| *b == 0x22) && img[MIB as usize..].iter().all(|b| *b == 0x33));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eio_on_one_replica_loses_nothing_and_on_the_last_one_fails_the_write() {
    let s = setup(2);
    let mut engine = s.engine(&["--min-healthy-replicas", "1", "--rebuild-retry-ms", "600000"]);
    let uri = engine.uri(VOL);
    run_ok("qemu-io", &["-f", "raw", &uri, "-c", "write -P 0x41 0 1M", "-c", "flush"]);
    // Replica 0's disk fails reads: the reads go to replica 1 and replica 0 is ejected.
    s.replicas[0].inject_faults(TOKEN, vec![fault("read", "eio", 0)]).await;
    for _ in 0..3 {
        let (ok, text) = qemu_io(&uri, &["read -P 0x41 0 1M"]);
        assert!(ok, "{text}");
    }
    let st = status(&engine).await;
    assert_eq!(st.replicas[0].state, "ejected", "{st:?}");
    assert_eq!(st.replicas[1].state, "healthy", "{st:?}");
    // Writes go on with replica 1 alone (the minimum is 1).
    run_ok("qemu-io", &["-f", "raw", &uri, "-c", "write -P 0x42 1M 1M", "-c", "flush"]);
    // A read error on the last replica fails that read only: once its disk recovers, it serves.
    s.replicas[1].inject_faults(TOKEN, vec![fault("read", "eio", 0)]).await;
    let (ok, text) = qemu_io(&uri, &["read -P 0x41 0 64k"]);
    assert!(!ok, "a read the last replica failed succeeded: {text}");
    s.replicas[1].inject_faults(TOKEN, Vec::new()).await;
    let (ok, text) = qemu_io(&uri, &["read -P 0x41 0 64k"]);
    assert!(ok, "the volume did not recover with the disk: {text}");
    // Now the last in-sync replica's disk fails writes: the write must fail, not be acknowledged.
    s.replicas[1].inject_faults(TOKEN, vec![fault("write", "eio", 0)]).await;
    let (ok, text) = qemu_io(&uri, &["write -P 0x43 2M 64k", "flush"]);
    assert!(!ok, "a write the last replica failed was acknowledged: {text}");
    s.replicas[1].inject_faults(TOKEN, Vec::new()).await;
    let (ok, text) = qemu_io(&uri, &["read -P 0x41 0 1M", "read -P 0x42 1M 1M"]);
    assert!(ok, "acknowledged data lost: {text}");
    let st = status(&engine).await;
    engine.stop();
    let img = replica_images(&[s.replicas[1].data], VOL, TOKEN, st.epoch + 1, 2 * MIB).await.remove(0);
    assert!(img[..MIB as usize].iter().all(|b| *b == 0x41) && img[MIB as usize..].iter().all(|b| *b == 0x42));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_write_errors_ejects_the_replica_and_it_is_rebuilt_when_the_disk_recovers() {
    let s = setup(3);
    let mut engine = s.engine(&["--rebuild-retry-ms", "300"]);
    // Three seconds of EIO on every write to replica 2, rebuild writes included, while fio
    // writes and verifies.
    s.replicas[2].inject_faults(TOKEN, vec![fault("write", "eio", 3000)]).await;
    let out = s.root.path().join("fio.json");
    let load = barnacle_tests::fio_verified_load(&engine.uri(VOL), 32, &out);
    barnacle_tests::fio_verified_ok(load, &out, 32);
    let deadline = Instant::now() + Duration::from_secs(120);
    let st = loop {
        let st = status(&engine).await;
        if st.rebuilds_completed >= 1 && st.replicas.iter().all(|r| r.state == "healthy") {
            break st;
        }
        assert!(Instant::now() < deadline, "replica 2 was not rebuilt after the burst: {st:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    engine.stop();
    let addrs: Vec<SocketAddr> = s.replicas.iter().map(|r| r.data).collect();
    let images = replica_images(&addrs, VOL, TOKEN, st.epoch + 1, 32 * MIB).await;
    assert!(images[0] == images[1] && images[1] == images[2], "replicas differ after the rebuild");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_from_a_damaged_source_copies_a_sound_copy_and_repairs_the_source() {
    let mut s = setup(2);
    let mut engine = s.engine(&["--rebuild-retry-ms", "200"]);
    let uri = engine.uri(VOL);
    run_ok("qemu-io", &["-f", "raw", &uri, "-c", "write -P 0x66 0 1M", "-c", "flush"]);
    // A full rebuild copies from the first member, replica 0: damage its copy.
    flip_bit(&s.data_file(0), cluster_of(&s.data_file(0), 0x66) + 2 * 4096 + 9);
    s.replicas.push(ReplicaProcess::start_with(
        &s.root.path().join("r2"),
        VOL,
        &s.token,
        Some("64MiB"),
        &s.log,
        &["--fault-injection"],
    ));
    let mut m = EngineManagerClient::connect(format!("http://{}", engine.mgmt)).await.unwrap();
    let add = pb::AddReplicaRequest { id: "r2".into(), address: s.replicas[2].data.to_string() };
    m.add_replica(authed(add)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let st = loop {
        let st = status(&engine).await;
        if st.replicas.len() == 3 && st.replicas.iter().all(|r| r.state == "healthy") {
            break st;
        }
        assert!(Instant::now() < deadline, "the rebuild from a damaged source never finished: {st:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(st.damaged_ranges >= 1 && st.repaired_bytes >= 4096 && st.unrepaired_ranges == 0, "{st:?}");
    engine.stop();
    // Every copy, the repaired source and the new replica included, reads back sound directly.
    let addrs: Vec<SocketAddr> = s.replicas.iter().map(|r| r.data).collect();
    let images = replica_images(&addrs, VOL, TOKEN, st.epoch + 1, MIB).await;
    assert!(images.iter().all(|i| i.iter().all(|b| *b == 0x66)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_injection_is_refused_unless_enabled_and_checks_its_arguments() {
    use barnacle_replica::mgmt::pb::{InjectFaultsRequest, replica_manager_client::ReplicaManagerClient};
    let s = setup(1);
    let plain = ReplicaProcess::start(&s.root.path().join("plain"), VOL, &s.token, Some("64MiB"), &s.log);
    let call = |addr: SocketAddr, faults: Vec<Fault>| async move {
        let mut c = ReplicaManagerClient::connect(format!("http://{addr}")).await.unwrap();
        c.inject_faults(authed(InjectFaultsRequest { faults })).await.map(drop)
    };
    let e = call(plain.mgmt, vec![fault("read", "eio", 0)]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    for bad in [fault("trim", "eio", 0), fault("read", "ebusy", 0)] {
        let e = call(s.replicas[0].mgmt, vec![bad]).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    }
    call(s.replicas[0].mgmt, vec![fault("sync", "", 100)]).await.unwrap();
    call(s.replicas[0].mgmt, Vec::new()).await.unwrap();
}
