//! The engine's management API with real processes: snapshots taken as IO barriers under load are
//! identical on every replica; snapshot calls are idempotent; expansion reaches NBD clients;
//! status, replica removal, authentication and shutdown.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use barnacle_engine::mgmt::pb::{self, engine_manager_client::EngineManagerClient};
use barnacle_tests::{EngineProcess, ReplicaProcess, fenced_client, http_get, metric, run_ok};

const VOL: &str = "vol-mgmt";
const TOKEN: &str = "mgmt-token";
const MIB: u64 = 1 << 20;

fn authed<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    r
}

async fn direct(r: &ReplicaProcess, epoch: u64) -> barnacle_replica::client::ReplicaClient {
    fenced_client(r.data, VOL, TOKEN, epoch).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_expansion_status_and_shutdown() {
    let root = tempfile::tempdir().unwrap();
    let token = root.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let log = root.path().join("log");
    let replicas: Vec<_> = (0..3)
        .map(|i| ReplicaProcess::start(&root.path().join(format!("r{i}")), VOL, &token, Some("64MiB"), &log))
        .collect();
    let ids: Vec<(String, SocketAddr)> =
        replicas.iter().enumerate().map(|(i, r)| (format!("r{i}"), r.data)).collect();
    // No rebuild retries during the test: the replica removed below must stay ejected while
    // the metrics are read, however slow the machine.
    let mut engine = EngineProcess::start(
        VOL,
        &token,
        &ids,
        &root.path().join("engine"),
        &["--rebuild-retry-ms", "600000"],
        &log,
    );
    let uri = engine.uri(VOL);
    let mut m = EngineManagerClient::connect(format!("http://{}", engine.mgmt)).await.unwrap();

    let e = m.status(pb::StatusRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let st = m.status(authed(pb::StatusRequest {})).await.unwrap().into_inner();
    assert_eq!((st.volume_id.as_str(), st.size_bytes, st.replicas.len()), (VOL, 64 * MIB, 3));
    assert!(st.replicas.iter().all(|r| r.state == "healthy"));

    // Snapshots in the middle of a write load: the barrier makes them identical on every replica.
    let load = Command::new("fio")
        .args([
            "--name=snap",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=64k",
            "--size=32m",
            "--iodepth=16",
            "--time_based",
            "--runtime=3",
            "--randrepeat=0",
            "--output=/dev/null",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for i in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        m.create_snapshot(authed(pb::SnapshotRequest { name: format!("s{i}"), ..Default::default() }))
            .await
            .unwrap();
    }
    let out = tokio::task::spawn_blocking(move || load.wait_with_output()).await.unwrap().unwrap();
    assert!(out.status.success(), "fio: {}", String::from_utf8_lossy(&out.stderr));
    // Repeating a create is fine; the list has each once.
    m.create_snapshot(authed(pb::SnapshotRequest { name: "s0".into(), ..Default::default() })).await.unwrap();
    let list = m.list_snapshots(authed(pb::ListSnapshotsRequest {})).await.unwrap().into_inner();
    let names: Vec<_> = list.snapshots.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, vec!["s0", "s1", "s2", "s3"]);
    m.delete_snapshot(authed(pb::SnapshotRequest { name: "s3".into(), ..Default::default() })).await.unwrap();
    m.delete_snapshot(authed(pb::SnapshotRequest { name: "s3".into(), ..Default::default() })).await.unwrap();
    let e = m
        .create_snapshot(authed(pb::SnapshotRequest { name: String::new(), ..Default::default() }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // Expansion: every replica grows, and a new NBD client sees the new size.
    let st = m.expand(authed(pb::ExpandRequest { size_bytes: 96 * MIB })).await.unwrap().into_inner();
    assert_eq!(st.size_bytes, 96 * MIB);
    let e = m.expand(authed(pb::ExpandRequest { size_bytes: 32 * MIB })).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let info: serde_json::Value =
        serde_json::from_slice(&run_ok("nbdinfo", &["--json", &uri]).stdout).unwrap();
    assert_eq!(info["exports"][0]["export-size"].as_u64(), Some(96 * MIB));
    run_ok("qemu-io", &["-f", "raw", &uri, "-c", "write -P 0x5e 95M 1M", "-c", "read -P 0x5e 95M 1M"]);

    // Metrics: IO by operation, bytes, latency, replica states, epoch.
    let body = http_get(engine.metrics, "/metrics");
    let writes =
        metric(&body, "barnacle_engine_io_operations_total", &[r#"op="write""#, r#"result="ok""#]).unwrap();
    assert!(writes > 100.0, "{body}");
    assert!(
        metric(&body, "barnacle_engine_io_bytes_total", &[r#"op="write""#]).unwrap() >= f64::from(1 << 20)
    );
    assert!(metric(&body, "barnacle_engine_io_latency_seconds_count", &[r#"op="write""#]).unwrap() >= writes);
    assert_eq!(metric(&body, "barnacle_engine_replicas", &[r#"state="healthy""#]), Some(3.0));
    assert_eq!(metric(&body, "barnacle_engine_size_bytes", &[]), Some((96 * MIB) as f64));

    // Removing a replica commits a new epoch without it; IO goes on.
    let st =
        m.remove_replica(authed(pb::RemoveReplicaRequest { id: "r2".into() })).await.unwrap().into_inner();
    assert_eq!(st.replicas[2].state, "ejected");
    assert_eq!(st.replicas[2].ejected_at_epoch, st.epoch);
    run_ok("qemu-io", &["-f", "raw", &uri, "-c", "write -P 0x5f 0 64k", "-c", "flush"]);
    let epoch = st.epoch;
    let body = http_get(engine.metrics, "/metrics");
    assert_eq!(metric(&body, "barnacle_engine_replicas", &[r#"state="ejected""#]), Some(1.0), "{body}");
    assert_eq!(metric(&body, "barnacle_engine_epoch", &[]), Some(epoch as f64));

    // Shutdown ends the process cleanly.
    m.shutdown(authed(pb::ShutdownRequest {})).await.unwrap();
    let status = tokio::task::spawn_blocking(move || engine.child.wait()).await.unwrap().unwrap();
    assert!(status.success());

    // Every snapshot reads the same on every replica that took it.
    let clients = [direct(&replicas[0], epoch + 1).await, direct(&replicas[1], epoch + 1).await];
    for name in ["s0", "s1", "s2"] {
        let mut images = Vec::new();
        for c in &clients {
            let mut img = Vec::new();
            for off in (0..64 * MIB).step_by(4 << 20) {
                img.extend_from_slice(&c.read_snapshot(name, off, 4 << 20).await.unwrap());
            }
            images.push(img);
        }
        assert!(images[0] == images[1], "snapshot {name} differs between replicas");
    }
    for c in &clients {
        let names: Vec<_> = c.snapshot_list().await.unwrap().into_iter().map(|s| s.name).collect();
        assert_eq!(names, vec!["s0", "s1", "s2"]);
        assert_eq!(c.stat().await.unwrap().size, 96 * MIB);
    }
}

/// Whether a qemu-io write through `uri`, started now, completes within `within`; the process is
/// returned when it did not (it completes once IO goes on).
fn write_completes(uri: &str, pattern: u8, within: Duration) -> Result<(), std::process::Child> {
    let mut child = Command::new("qemu-io")
        .args(["-f", "raw", uri, "-c", &format!("write -P {pattern} 0 64k")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            assert!(s.success(), "qemu-io failed");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_io_hold_stops_writes_until_released_or_lapsed_and_snapshots_under_it() {
    let root = tempfile::tempdir().unwrap();
    let token = root.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let log = root.path().join("log");
    let replicas: Vec<_> = (0..2)
        .map(|i| ReplicaProcess::start(&root.path().join(format!("r{i}")), VOL, &token, Some("16MiB"), &log))
        .collect();
    let ids: Vec<(String, SocketAddr)> =
        replicas.iter().enumerate().map(|(i, r)| (format!("r{i}"), r.data)).collect();
    let engine = EngineProcess::start(VOL, &token, &ids, &root.path().join("engine"), &[], &log);
    let uri = engine.uri(VOL);
    let mut m = EngineManagerClient::connect(format!("http://{}", engine.mgmt)).await.unwrap();
    let hold = |id: &str, lease_ms: u32| authed(pb::HoldIoRequest { hold_id: id.into(), lease_ms });

    // Configure: a minimum of 0 is invalid, one above the healthy replicas would fail writes.
    let settings = |min: u32| {
        authed(pb::Settings { min_healthy_replicas: min, rebuild_mib_per_sec: 50, ..Default::default() })
    };
    let e = m.configure(settings(0)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = m.configure(settings(3)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    let st = m.configure(settings(2)).await.unwrap().into_inner();
    assert_eq!((st.min_healthy_replicas, st.settings.map(|s| s.rebuild_mib_per_sec)), (2, Some(50)));
    assert!(write_completes(&uri, 1, Duration::from_secs(60)).is_ok());

    // Held: a write waits (for as long as we look) and completes once the hold is released.
    m.hold_io(hold("g1", 20_000)).await.unwrap();
    m.hold_io(hold("g1", 20_000)).await.unwrap();
    let waiting =
        write_completes(&uri, 2, Duration::from_millis(700)).expect_err("a write went through a hold");
    // A snapshot under the hold is taken without waiting for it; under another id it is refused.
    let snap =
        |name: &str, hold: &str| authed(pb::SnapshotRequest { name: name.into(), hold_id: hold.into() });
    m.create_snapshot(snap("held", "g1")).await.unwrap();
    let e = m.create_snapshot(snap("other", "g2")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let released = m.release_io(hold("g1", 0)).await.unwrap().into_inner();
    assert!(released.released);
    let out = tokio::task::spawn_blocking(move || waiting.wait_with_output()).await.unwrap().unwrap();
    assert!(out.status.success());
    // A hold nobody releases lapses at its lease; bad holds are refused.
    let e = m.hold_io(hold("", 1000)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = m.hold_io(hold("long", 60_000)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // The lease is long beside the look, so a slow reply or start of qemu-io on a busy machine
    // cannot let the hold lapse while we look.
    m.hold_io(hold("g3", 4000)).await.unwrap();
    let waiting =
        write_completes(&uri, 3, Duration::from_millis(300)).expect_err("a write went through a hold");
    let out = tokio::task::spawn_blocking(move || waiting.wait_with_output()).await.unwrap().unwrap();
    assert!(out.status.success(), "the write never completed after the lease");
    assert!(!m.release_io(hold("g3", 0)).await.unwrap().into_inner().released, "the hold had lapsed");

    // The snapshot holds what preceded the hold (pattern 1), not the write that waited (2);
    // read on each replica directly (which fences the engine out: last).
    for r in &replicas {
        let c = direct(r, 1000).await;
        let snapped = c.read_snapshot("held", 0, 65536).await.unwrap();
        assert!(snapped.iter().all(|b| *b == 1), "the held snapshot has the write that waited");
        let head = c.read(0, 65536).await.unwrap();
        assert!(head.iter().all(|b| *b == 3), "the writes after the holds landed");
    }
}
