//! Rebuilds with real processes (DESIGN rule 7): a killed replica comes back under a verified
//! write load and is delta-rebuilt; a new replica joins a volume with snapshots by a full
//! rebuild that recreates the snapshots and skips holes; a snapshot taken during a rebuild
//! restarts it; a replica whose store was recreated is not trusted and is fully rebuilt.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use barnacle_engine::mgmt::pb::{self, engine_manager_client::EngineManagerClient};
use barnacle_tests::{EngineProcess, ReplicaProcess, fenced_client, replica_images, run_ok};
use tonic::transport::Channel;

const VOL: &str = "vol-rebuild";
const TOKEN: &str = "rebuild-token";
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
    let replicas = (0..n).map(|i| start_replica(root.path(), i, &token, &log)).collect();
    Setup { root, token, log, replicas }
}

fn start_replica(root: &Path, i: usize, token: &Path, log: &Path) -> ReplicaProcess {
    ReplicaProcess::start(&root.join(format!("r{i}")), VOL, token, Some("128MiB"), log)
}

impl Setup {
    fn engine(&self, extra: &[&str]) -> EngineProcess {
        let ids: Vec<(String, SocketAddr)> =
            self.replicas.iter().enumerate().map(|(i, r)| (format!("r{i}"), r.data)).collect();
        EngineProcess::start(VOL, &self.token, &ids, &self.root.path().join("engine"), extra, &self.log)
    }
}

async fn manager(engine: &EngineProcess) -> EngineManagerClient<Channel> {
    EngineManagerClient::connect(format!("http://{}", engine.mgmt)).await.unwrap()
}

fn authed<T>(body: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(body);
    r.metadata_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    r
}

async fn status(m: &mut EngineManagerClient<Channel>) -> pb::StatusResponse {
    m.status(authed(pb::StatusRequest {})).await.unwrap().into_inner()
}

/// Polls Status until `replica` is healthy and `done` rebuilds completed; returns the status.
/// Also returns every phase seen on the way.
async fn wait_healthy(
    m: &mut EngineManagerClient<Channel>,
    replica: &str,
    done: u64,
    log: &Path,
) -> (pb::StatusResponse, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut seen = Vec::new();
    loop {
        let s = status(m).await;
        if let Some(r) = &s.rebuild {
            let p = format!("{}:{}", r.kind, r.phase);
            if seen.last() != Some(&p) {
                seen.push(p);
            }
            assert!(r.done_bytes <= r.total_bytes, "progress beyond its total: {r:?}");
        }
        let healthy = s.replicas.iter().any(|r| r.id == replica && r.state == "healthy");
        if healthy && s.rebuilds_completed >= done {
            return (s, seen);
        }
        assert!(
            Instant::now() < deadline,
            "{replica} not rebuilt: {s:?}; log: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn checksum(b: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

/// The first `len` bytes of snapshot `name` on each replica (the engine stopped).
async fn snapshot_images(addrs: &[SocketAddr], name: &str, epoch: u64, len: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for a in addrs {
        let c = fenced_client(*a, VOL, TOKEN, epoch).await;
        let mut all = Vec::new();
        for off in (0..len).step_by(4 << 20) {
            all.extend_from_slice(
                &c.read_snapshot(name, off, (len - off).min(4 << 20) as u32).await.unwrap(),
            );
        }
        out.push(checksum(&all));
    }
    out
}

/// A replica on the engine's node, reached through shared memory, hangs with large requests in
/// flight: they time out, it is ejected, and when it resumes (finishing what it was given, from
/// memory the engine no longer reuses) it is rebuilt. The client's verified data is intact and all
/// three replicas end identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_local_replica_on_shared_memory_is_ejected_and_rebuilt() {
    use nix::sys::signal::{Signal, kill};
    let s = setup(3);
    let ids: Vec<(String, SocketAddr)> =
        s.replicas.iter().enumerate().skip(1).map(|(i, r)| (format!("r{i}"), r.data)).collect();
    let local = format!("r0={}", s.replicas[0].unix);
    let mut engine = EngineProcess::start(
        VOL,
        &s.token,
        &ids,
        &s.root.path().join("engine"),
        &[
            "--replica",
            &local,
            "--replica-timeout-ms",
            "1000",
            "--heartbeat-ms",
            "200",
            "--rebuild-retry-ms",
            "200",
        ],
        &s.log,
    );
    let mut m = manager(&engine).await;
    let out = s.root.path().join("fio.json");
    // Blocks of 16 to 256 KiB: most payloads move through the shared memory.
    let mut load = barnacle_tests::fio_verified_load_bs(&engine.uri(VOL), 96, &out, "--bsrange=16k-256k");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r0 = nix::unistd::Pid::from_raw(i32::try_from(s.replicas[0].child.id()).unwrap());
    kill(r0, Signal::SIGSTOP).unwrap();
    assert!(load.try_wait().unwrap().is_none(), "the load ended before the replica hung");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !status(&mut m).await.replicas.iter().any(|r| r.id == "r0" && r.state == "ejected") {
        assert!(
            Instant::now() < deadline,
            "r0 was not ejected; log: {}",
            std::fs::read_to_string(&s.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill(r0, Signal::SIGCONT).unwrap();
    let (st, _) = wait_healthy(&mut m, "r0", 1, &s.log).await;
    assert!(st.replicas.iter().all(|r| r.state == "healthy"), "{st:?}");
    // The verify pass reads through the engine, mostly from r0 (the local replica).
    barnacle_tests::fio_verified_ok(load, &out, 96);
    let epoch = status(&mut m).await.epoch + 1;
    engine.stop();
    let addrs: Vec<SocketAddr> = s.replicas.iter().map(|r| r.data).collect();
    let images = replica_images(&addrs, VOL, TOKEN, epoch, 96 * MIB).await;
    assert!(images[0] == images[1] && images[1] == images[2], "the replicas differ after the rebuild");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_comes_back_by_a_delta_rebuild_under_load() {
    let mut s = setup(3);
    let mut engine =
        s.engine(&["--replica-timeout-ms", "2000", "--heartbeat-ms", "250", "--rebuild-retry-ms", "200"]);
    // 96 MiB written before the fault: a full rebuild would have to look at all of it.
    run_ok("qemu-io", &["-f", "raw", &engine.uri(VOL), "-c", "write -P 0x5a 0 96M", "-c", "flush"]);
    let mut m = manager(&engine).await;
    let out = s.root.path().join("fio.json");
    // The load stays in the first 16 MiB, so that is about all the delta can be.
    let load = barnacle_tests::fio_verified_load(&engine.uri(VOL), 16, &out);
    tokio::time::sleep(Duration::from_millis(800)).await;
    s.replicas[1].kill();
    // Ejected while the load goes on.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !status(&mut m).await.replicas.iter().any(|r| r.id == "r1" && r.state == "ejected") {
        assert!(Instant::now() < deadline, "r1 was not ejected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.replicas[1].restart();
    let (st, _) = wait_healthy(&mut m, "r1", 1, &s.log).await;
    barnacle_tests::fio_verified_ok(load, &out, 16);
    let last = st.last_rebuild.clone().unwrap();
    assert_eq!(last.kind, "delta", "{last:?}");
    assert!(last.total_bytes <= 24 * MIB, "the delta covered {} bytes of a 96 MiB volume", last.total_bytes);
    assert!(st.replicas.iter().all(|r| r.state == "healthy"), "{st:?}");
    // After a flush all three hold the same bytes, and they are what the client reads.
    run_ok("qemu-io", &["-f", "raw", &engine.uri(VOL), "-c", "flush"]);
    let seen = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &engine.uri(VOL)])
        .arg(s.root.path().join("seen.img"))
        .output()
        .unwrap();
    assert!(seen.status.success(), "{}", String::from_utf8_lossy(&seen.stderr));
    let client_view = std::fs::read(s.root.path().join("seen.img")).unwrap();
    let epoch = st.epoch + 1;
    engine.stop();
    let addrs: Vec<SocketAddr> = s.replicas.iter().map(|r| r.data).collect();
    let images = replica_images(&addrs, VOL, TOKEN, epoch, 128 * MIB).await;
    for (i, img) in images.iter().enumerate() {
        assert!(checksum(img) == checksum(&client_view), "replica r{i} differs from what the client read");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_replica_joins_by_a_full_rebuild_that_recreates_snapshots() {
    let mut s = setup(2);
    // Slow enough that the test can take a snapshot while the head is being copied.
    let mut engine = s.engine(&["--rebuild-mib-per-sec", "16", "--rebuild-retry-ms", "200"]);
    let uri = engine.uri(VOL);
    run_ok("qemu-io", &["-f", "raw", &uri, "-c", "write -P 0x11 0 4M", "-c", "write -P 0x12 32M 2M"]);
    let mut m = manager(&engine).await;
    let snap = |name: &str| authed(pb::SnapshotRequest { name: name.into(), ..Default::default() });
    m.create_snapshot(snap("s1")).await.unwrap();
    run_ok("qemu-io", &["-f", "raw", &uri, "-c", "write -P 0x22 2M 4M", "-c", "discard 0 1M"]);
    m.create_snapshot(snap("s2")).await.unwrap();
    run_ok("qemu-io", &["-f", "raw", &uri, "-c", "write -P 0x33 8M 1M", "-c", "discard 32M 2M"]);

    // A new, empty replica store joins.
    s.replicas.push(start_replica(s.root.path(), 2, &s.token, &s.log));
    let add = pb::AddReplicaRequest { id: "r2".into(), address: s.replicas[2].data.to_string() };
    let st = m.add_replica(authed(add.clone())).await.unwrap().into_inner();
    assert!(st.replicas.iter().any(|r| r.id == "r2" && r.state != "healthy"), "{st:?}");
    // Repeating the same add is fine; the same id at another address is not.
    m.add_replica(authed(add)).await.unwrap();
    let clash = pb::AddReplicaRequest { id: "r2".into(), address: "127.0.0.1:1".into() };
    assert_eq!(m.add_replica(authed(clash)).await.unwrap_err().code(), tonic::Code::InvalidArgument);

    // Wait for the head phase, write and snapshot in the middle of it: the rebuild starts over
    // and the target still ends up with s3 and with the write.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = status(&mut m).await;
        if st.rebuild.as_ref().is_some_and(|r| r.phase == "head") {
            assert!(st.replicas.iter().any(|r| r.id == "r2" && r.state == "rebuilding"), "{st:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no head phase seen: {st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    run_ok("qemu-io", &["-f", "raw", &uri, "-c", "write -P 0x44 9M 64k"]);
    m.create_snapshot(snap("s3")).await.unwrap();
    run_ok("qemu-io", &["-f", "raw", &uri, "-c", "write -P 0x55 1M 64k"]);
    let (st, _) = wait_healthy(&mut m, "r2", 1, &s.log).await;
    let last = st.last_rebuild.clone().unwrap();
    assert_eq!(last.kind, "full", "{last:?}");
    // Holes are skipped: four steps (s1, s2, s3, head) over about 10 MiB of allocated regions
    // each, where copying whole images would have looked at 4 × 128 MiB.
    assert!(last.total_bytes <= 48 * MIB, "{last:?}");
    let body = barnacle_tests::http_get(engine.metrics, "/metrics");
    assert_eq!(barnacle_tests::metric(&body, "barnacle_engine_rebuilds_completed", &[]), Some(1.0), "{body}");

    let epoch = st.epoch + 1;
    engine.stop();
    let addrs: Vec<SocketAddr> = s.replicas.iter().map(|r| r.data).collect();
    let c2 = fenced_client(addrs[2], VOL, TOKEN, epoch).await;
    let recreated = c2.snapshot_list().await.unwrap();
    let names: Vec<&str> = recreated.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["s1", "s2", "s3"], "snapshots recreated oldest first");
    drop(c2);
    // Recreated snapshots keep the source's creation time.
    let original = fenced_client(addrs[0], VOL, TOKEN, epoch).await.snapshot_list().await.unwrap();
    let times =
        |l: &[barnacle_replica::wire::SnapshotEntry]| l.iter().map(|s| s.created_unix).collect::<Vec<_>>();
    assert_eq!(times(&recreated), times(&original));
    for (i, name) in ["s1", "s2", "s3"].into_iter().enumerate() {
        let sums = snapshot_images(&addrs, name, epoch + 1 + i as u64, 40 * MIB).await;
        assert!(sums.iter().all(|x| *x == sums[0]), "snapshot {name} differs between replicas: {sums:?}");
    }
    let images = replica_images(&addrs, VOL, TOKEN, epoch + 4, 128 * MIB).await;
    assert!(images.iter().all(|i| checksum(i) == checksum(&images[0])), "heads differ");
    assert!(images[2][MIB as usize..(MIB + 65536) as usize].iter().all(|b| *b == 0x55));
    assert!(images[2][9 * MIB as usize..(9 * MIB + 65536) as usize].iter().all(|b| *b == 0x44));
    // Thin: the new replica holds no more than an original one.
    let stat =
        |a: SocketAddr, e: u64| async move { fenced_client(a, VOL, TOKEN, e).await.stat().await.unwrap() };
    let (a0, a2) = (stat(addrs[0], epoch + 5).await, stat(addrs[2], epoch + 5).await);
    assert!(
        a2.allocated_bytes <= a0.allocated_bytes,
        "r2 {} bytes vs r0 {}",
        a2.allocated_bytes,
        a0.allocated_bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_another_store_identity_is_rebuilt_in_full() {
    let mut s = setup(2);
    let mut engine =
        s.engine(&["--replica-timeout-ms", "1000", "--heartbeat-ms", "200", "--rebuild-retry-ms", "200"]);
    let uri = engine.uri(VOL);
    run_ok("qemu-io", &["-f", "raw", &uri, "-c", "write -P 0x61 0 2M", "-c", "flush"]);
    let mut m = manager(&engine).await;
    // r1's store is wiped and recreated (a new disk), then served at the same address.
    let addr = s.replicas[1].data;
    s.replicas[1].kill();
    run_ok("qemu-io", &["-f", "raw", &uri, "-c", "write -P 0x62 4M 1M"]);
    let dir = s.root.path().join("r1");
    std::fs::remove_dir_all(&dir).unwrap();
    s.replicas[1] = ReplicaProcess::start_at(&dir, VOL, &s.token, Some("128MiB"), &s.log, Some(addr));
    let (st, _) = wait_healthy(&mut m, "r1", 1, &s.log).await;
    assert_eq!(st.last_rebuild.unwrap().kind, "full");
    let epoch = st.epoch + 1;
    engine.stop();
    let addrs: Vec<SocketAddr> = s.replicas.iter().map(|r| r.data).collect();
    let images = replica_images(&addrs, VOL, TOKEN, epoch, 8 * MIB).await;
    assert!(images[1][..2 * MIB as usize].iter().all(|b| *b == 0x61));
    assert!(images[1][4 * MIB as usize..5 * MIB as usize].iter().all(|b| *b == 0x62));
    assert!(images[0] == images[1], "the recreated replica differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_name_reused_while_a_replica_was_away_forces_a_full_rebuild() {
    let mut s = setup(3);
    let mut engine =
        s.engine(&["--replica-timeout-ms", "1000", "--heartbeat-ms", "200", "--rebuild-retry-ms", "200"]);
    let uri = engine.uri(VOL);
    let mut m = manager(&engine).await;
    let snap = |name: &str| authed(pb::SnapshotRequest { name: name.into(), ..Default::default() });
    run_ok("qemu-io", &["-f", "raw", &uri, "-c", "write -P 0x0a 0 1M"]);
    m.create_snapshot(snap("s")).await.unwrap();
    // r1 goes away holding "s" = 0x0a; meanwhile "s" is deleted and taken again over 0x0b.
    s.replicas[1].kill();
    run_ok("qemu-io", &["-f", "raw", &uri, "-c", "write -P 0x0b 0 1M"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !status(&mut m).await.replicas.iter().any(|r| r.id == "r1" && r.state == "ejected") {
        assert!(Instant::now() < deadline, "r1 was not ejected");
        run_ok("qemu-io", &["-f", "raw", &uri, "-c", "write -P 0x0b 0 4k"]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    m.delete_snapshot(snap("s")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(3100)).await;
    m.create_snapshot(snap("s")).await.unwrap();
    s.replicas[1].restart();
    let (st, _) = wait_healthy(&mut m, "r1", 1, &s.log).await;
    assert_eq!(st.last_rebuild.unwrap().kind, "full", "the reused name must not be trusted");
    let epoch = st.epoch + 1;
    engine.stop();
    let addrs: Vec<SocketAddr> = s.replicas.iter().map(|r| r.data).collect();
    let sums = snapshot_images(&addrs, "s", epoch, 2 * MIB).await;
    assert!(sums.iter().all(|x| *x == sums[0]), "snapshot s differs between replicas: {sums:?}");
}
