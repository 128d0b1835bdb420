//! ControllerModifyVolume with real processes: replicas 3 → 2 → 3 on an attached volume under a
//! verifying fio writer; IO limits that cap what fio measures and, lifted, stop capping it; and a
//! detached volume's changes committed in its membership record, where its next engine finds them.
//! Replenishment, which replaces replicas the same way: a replica whose node is lost is replaced
//! after the volume's `replicaReplenishAfter` and wiped when the node comes back.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use barnacle_tests::{ControllerProcess, csi_capability, fio_verified_ok, http_get, metric};
use csi::controller_client::ControllerClient;
use csi_proto::v1 as csi;
use tonic::Code;
use tonic::transport::Channel;

const MIB: i64 = 1 << 20;

async fn create(c: &mut ControllerClient<Channel>, name: &str, mib: i64, params: &[(&str, &str)]) -> String {
    let r = csi::CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(csi::CapacityRange { required_bytes: mib * MIB, limit_bytes: 0 }),
        volume_capabilities: vec![csi_capability(true, "")],
        parameters: params.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        ..Default::default()
    };
    c.create_volume(r).await.unwrap().into_inner().volume.unwrap().volume_id
}

async fn publish(c: &mut ControllerClient<Channel>, vol: &str, node: &str) -> String {
    let ctx = c
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: vol.to_owned(),
            node_id: node.to_owned(),
            volume_capability: Some(csi_capability(true, "")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    format!("nbd+unix:///{}?socket={}", ctx["exportName"], ctx["nbdSocket"])
}

async fn modify(
    c: &mut ControllerClient<Channel>,
    vol: &str,
    kv: &[(&str, &str)],
) -> Result<(), tonic::Status> {
    c.controller_modify_volume(csi::ControllerModifyVolumeRequest {
        volume_id: vol.to_owned(),
        mutable_parameters: kv.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        ..Default::default()
    })
    .await
    .map(drop)
}

/// The volume's membership record (the standalone authority's file).
fn membership(root: &Path, vol: &str) -> serde_json::Value {
    let path = root.join("state/membership").join(vol).join("membership.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// (replica id, state) of every replica in the membership record.
fn members(root: &Path, vol: &str) -> Vec<(String, String)> {
    let m = membership(root, vol);
    m["membership"]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap().to_owned(), r["state"].as_str().unwrap().to_owned()))
        .collect()
}

/// Waits until every replica in the membership record is healthy and there are `n`.
async fn wait_all_healthy(root: &Path, vol: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let m = members(root, vol);
        if m.len() == n && m.iter().all(|(_, s)| s == "healthy") {
            return;
        }
        assert!(Instant::now() < deadline, "replicas never all healthy: {m:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The engine's metrics page (its ready file names the address).
fn engine_metrics(root: &Path, node: &str, vol: &str) -> String {
    let ready = root.join("nodes").join(node).join("run").join(format!("{vol}-engine.ready"));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&ready).unwrap()).unwrap();
    http_get(r["metrics"].as_str().unwrap().parse().unwrap(), "/metrics")
}

/// Replica processes of the volume still running (their ready files name them).
fn replica_ready_files(root: &Path, vol: &str) -> Vec<String> {
    let mut out = Vec::new();
    for n in std::fs::read_dir(root.join("nodes")).unwrap() {
        let run = n.unwrap().path().join("run");
        for f in std::fs::read_dir(&run).into_iter().flatten() {
            let name = f.unwrap().file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{vol}-r")) && name.ends_with(".ready") {
                out.push(name);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_go_3_2_3_on_an_attached_volume_under_a_verifying_writer() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let ctl = ControllerProcess::start(root, 3);
    ctl.wait_probe_ready().await;
    let (_, mut c) = ctl.clients();
    let v = create(&mut c, "resize-set", 64, &[("replicas", "3"), ("minHealthyReplicas", "2")]).await;
    let uri = publish(&mut c, &v, "n1").await;

    // fio writes 4 KiB blocks over 48 MiB at a bounded rate (so it is still writing while the
    // replica set changes, however fast this machine is), then verifies every block.
    let out = root.join("fio.json");
    let fio = barnacle_tests::fio_verified_load_with(&uri, 48, &out, &["--bs=4k", "--rate_iops=,1000"]);
    let mut fio = Some(fio);
    let mut running = || fio.as_mut().unwrap().try_wait().unwrap().is_none();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Fewer than the minimum, or a minimum above the replicas: refused, nothing changes.
    assert!(running(), "fio ended before the replica set changed");
    let e = modify(&mut c, &v, &[("replicas", "1")]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(members(root, &v).len(), 3);

    // 3 → 2: a healthy replica away from the engine's node goes, its process and data with it.
    assert!(running(), "fio ended before the replica set changed");
    modify(&mut c, &v, &[("replicas", "2")]).await.unwrap();
    let after = members(root, &v);
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(after.iter().all(|(_, s)| s == "healthy"), "{after:?}");
    assert_eq!(replica_ready_files(root, &v).len(), 2, "the removed replica's process is gone");

    // 2 → 3: a new replica (a new id, on the freed node) joins by a full rebuild while fio writes.
    assert!(running(), "fio ended before the replica set changed");
    modify(&mut c, &v, &[("replicas", "3")]).await.unwrap();
    let ids: Vec<String> = members(root, &v).into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(ids.contains(&"r3".to_owned()), "ids are never reused: {ids:?}");
    assert!(running(), "fio ended before the new replica was committed");
    wait_all_healthy(root, &v, 3).await;
    let m = engine_metrics(root, "n1", &v);
    assert_eq!(metric(&m, "barnacle_engine_replicas", &["state=\"healthy\""]), Some(3.0), "{m}");
    assert!(metric(&m, "barnacle_engine_rebuilds_completed", &[]).unwrap_or(0.0) >= 1.0, "{m}");

    // No IO error, and every block fio wrote reads back as written.
    fio_verified_ok(fio.take().unwrap(), &out, 48);

    // Every replica holds the same bytes, the rebuilt one included: read each directly once the
    // engine is gone (fenced out by the detach, and by the epoch taken here).
    c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: v.clone(),
        node_id: "n1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let m = membership(root, &v);
    let epoch = m["membership"]["epoch"].as_u64().unwrap() + 1;
    let token = std::fs::read_to_string(root.join("state/tokens").join(&v)).unwrap();
    let mut images = Vec::new();
    for r in m["membership"]["replicas"].as_array().unwrap() {
        let engine = uuid::Uuid::new_v4();
        let cfg = barnacle_replica::client::ClientConfig {
            volume_id: v.clone(),
            token: token.trim().to_owned(),
            engine_id: engine,
            epoch,
            request_timeout: Duration::from_secs(30),
            heartbeat: Duration::ZERO,
        };
        let client = barnacle_replica::client::ReplicaClient::connect_to(r["addr"].as_str().unwrap(), cfg)
            .await
            .unwrap();
        client.fence(epoch, engine).await.unwrap();
        let mut all = Vec::new();
        for off in (0..64u64 << 20).step_by(4 << 20) {
            all.extend_from_slice(&client.read(off, 4 << 20).await.unwrap());
        }
        images.push((r["id"].as_str().unwrap().to_owned(), all));
    }
    for (id, img) in &images[1..] {
        assert!(img == &images[0].1, "replica {id} differs from replica {}", images[0].0);
    }
    drop(ctl);
}

/// The volume's replicas as (replica id, node) from the node directories' stores.
fn replica_dirs(root: &Path, vol: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for n in std::fs::read_dir(root.join("nodes")).unwrap() {
        let n = n.unwrap();
        let node = n.file_name().to_string_lossy().into_owned();
        for f in std::fs::read_dir(n.path().join("replicas")).into_iter().flatten() {
            let name = f.unwrap().file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_prefix(&format!("{vol}-")) {
                out.push((id.to_owned(), node.clone()));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_on_a_lost_node_is_replaced_and_wiped_when_the_node_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let ctl = ControllerProcess::start_with(
        root,
        4,
        &["--replenish-interval-ms", "300", "--metrics-listen", "127.0.0.1:0"],
    );
    ctl.wait_probe_ready().await;
    let (_, mut c) = ctl.clients();
    let v = create(&mut c, "replenished", 64, &[("replicas", "3"), ("replicaReplenishAfter", "5s")]).await;
    let vl = format!("volume=\"{v}\"");
    let m = controller_metrics(root);
    assert_eq!(metric(&m, "barnacle_volume_replicas_lost", &[&vl]), Some(0.0), "{m}");
    assert_eq!(metric(&m, "barnacle_volume_replica_replenish_after_seconds", &[&vl]), Some(5.0), "{m}");
    let placed = replica_dirs(root, &v);
    assert_eq!(placed.len(), 3, "{placed:?}");
    // The engine on a node with a replica; another replica's node is lost.
    let engine_node = placed[0].1.clone();
    let (lost_id, lost_node) = placed[1].clone();
    let spare = ["n1", "n2", "n3", "n4"].into_iter().find(|n| !placed.iter().any(|(_, p)| p == n)).unwrap();
    let uri = publish(&mut c, &v, &engine_node).await;
    let o = Command::new("qemu-io")
        .args(["-f", "raw", &uri, "-c", "write -P 0x5a 40M 8M", "-c", "flush"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // The node goes down: its replica process dies and its directory (its disk) is unavailable.
    let node_dir = root.join("nodes").join(&lost_node);
    let away = root.join("nodes-away");
    std::fs::create_dir_all(&away).unwrap();
    barnacle_tests::kill_processes_mentioning(&node_dir.join("replicas").join(format!("{v}-{lost_id}")));
    std::fs::rename(&node_dir, away.join(&lost_node)).unwrap();
    let out = root.join("fio.json");
    let fio = barnacle_tests::fio_verified_load_with(&uri, 32, &out, &["--bs=4k", "--rate_iops=,1000"]);

    // Seen lost before it is replaced: in the metrics and in the admin API (`barnacle status`).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = controller_metrics(root);
        let replaced = metric(&m, "barnacle_volume_replicas_replenished_total", &[&vl]);
        assert_eq!(replaced, Some(0.0), "replaced before it was ever reported lost: {m}");
        let info = admin_volume(&ctl, &v).await;
        let seconds = info.replicas.iter().find(|r| r.id == lost_id).map_or(0, |r| r.lost_seconds);
        if metric(&m, "barnacle_volume_replicas_lost", &[&vl]) == Some(1.0) && seconds >= 1 {
            assert!(info.condition.contains("lost"), "{info:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the lost replica never showed: {m}\n{info:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // After the wait, a replacement on the spare node is rebuilt and the lost replica leaves the
    // membership while fio writes.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let m = members(root, &v);
        let ids: Vec<&str> = m.iter().map(|(id, _)| id.as_str()).collect();
        if m.len() == 3 && m.iter().all(|(_, s)| s == "healthy") && !ids.contains(&lost_id.as_str()) {
            break;
        }
        assert!(Instant::now() < deadline, "the lost replica was never replaced: {m:?}\n{}", ctl.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let now = replica_dirs(root, &v);
    assert_eq!(now.len(), 3, "{now:?}");
    assert!(now.iter().any(|(_, n)| n == spare), "the replacement is on the spare node: {now:?}");
    assert!(ctl.log_text().contains("replica replenished"), "{}", ctl.log_text());
    let m = controller_metrics(root);
    assert_eq!(metric(&m, "barnacle_volume_replicas_replenished_total", &[&vl]), Some(1.0), "{m}");
    assert_eq!(metric(&m, "barnacle_controller_replicas_replaced_total", &[]), Some(1.0), "{m}");
    assert_eq!(metric(&m, "barnacle_volume_replicas_awaiting_wipe", &[&vl]), Some(1.0), "{m}");
    assert_eq!(metric(&m, "barnacle_volume_replicas_lost", &[&vl]), Some(0.0), "{m}");
    let info = admin_volume(&ctl, &v).await;
    assert_eq!(info.replicas_replenished, 1, "{info:?}");
    assert_eq!(info.lost_replicas.len(), 1, "{info:?}");
    fio_verified_ok(fio, &out, 32);
    let o = Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "read -P 0x5a 40M 8M"]).output().unwrap();
    assert!(o.status.success(), "data written before the loss: {}", String::from_utf8_lossy(&o.stdout));
    // While the node is away its data stays; once it is back, the old replica is wiped.
    let lost_dir = |base: &Path| base.join(&lost_node).join("replicas").join(format!("{v}-{lost_id}"));
    assert!(lost_dir(&away).exists());
    std::fs::rename(away.join(&lost_node), &node_dir).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while lost_dir(&root.join("nodes")).exists() {
        assert!(
            Instant::now() < deadline,
            "the returned node's old replica was never wiped\n{}",
            ctl.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(replica_dirs(root, &v).len(), 3);
    let m = controller_metrics(root);
    assert_eq!(metric(&m, "barnacle_volume_replicas_awaiting_wipe", &[&vl]), Some(0.0), "{m}");
    drop(ctl);
}

/// The controller's metrics page (its ready file names the address).
fn controller_metrics(root: &Path) -> String {
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("controller.ready")).unwrap()).unwrap();
    http_get(r["metrics"].as_str().unwrap().parse().unwrap(), "/metrics")
}

/// The admin API's view of a volume (what `barnacle status` shows).
async fn admin_volume(ctl: &ControllerProcess, vol: &str) -> barnacle_controller::admin::pb::VolumeInfo {
    use barnacle_controller::admin::pb::{GetVolumeRequest, admin_client::AdminClient};
    let ch = csi_proto::unix_channel(&ctl.socket.display().to_string()).unwrap();
    AdminClient::new(ch).get_volume(GetVolumeRequest { volume: vol.to_owned() }).await.unwrap().into_inner()
}

/// fio for 3 s, time-based; (IOPS, bytes per second) of its writes.
fn fio_rate(uri: &str, bs: &str, out: &Path) -> (f64, f64) {
    let o = Command::new("fio")
        .args([
            "--name=rate",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            &format!("--bs={bs}"),
            "--size=32m",
            "--iodepth=8",
            "--time_based",
            "--runtime=3",
            "--output-format=json",
            &format!("--output={}", out.display()),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "fio failed: {}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(out).unwrap()).unwrap();
    let w = &report["jobs"][0]["write"];
    (w["iops"].as_f64().unwrap(), w["bw_bytes"].as_f64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_limits_cap_fio_and_lifting_them_restores_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let ctl = ControllerProcess::start(root, 1);
    ctl.wait_probe_ready().await;
    let (_, mut c) = ctl.clients();
    let v = create(&mut c, "qos", 64, &[("replicas", "1")]).await;
    let uri = publish(&mut c, &v, "n1").await;
    let out = root.join("fio.json");

    // The cap is an upper bound, which load on this machine cannot break; a lifted cap is judged
    // against the cap, not against an absolute figure.
    modify(&mut c, &v, &[("maxIops", "200")]).await.unwrap();
    let m = engine_metrics(root, "n1", &v);
    assert_eq!(metric(&m, "barnacle_engine_qos_max_iops", &[]), Some(200.0), "{m}");
    let (capped, _) = fio_rate(&uri, "4k", &out);
    assert!(capped <= 200.0 * 1.1, "200 IOPS allowed, fio measured {capped}");
    assert!(capped >= 20.0, "the cap stopped IO almost entirely: {capped} IOPS");
    let m = engine_metrics(root, "n1", &v);
    assert!(metric(&m, "barnacle_engine_qos_throttled_ios", &[]).unwrap() > 0.0, "{m}");

    modify(&mut c, &v, &[("maxIops", "0")]).await.unwrap();
    let (free, _) = fio_rate(&uri, "4k", &out);
    eprintln!("4k random writes, QD8: {capped:.0} IOPS under a 200 IOPS limit, {free:.0} IOPS without");
    assert!(free > 2.0 * 200.0, "lifting the limit did not restore IOPS: {free} (capped: {capped})");
    let m = engine_metrics(root, "n1", &v);
    assert_eq!(metric(&m, "barnacle_engine_qos_max_iops", &[]), Some(0.0), "{m}");

    // Throughput: 8 MiB/s in 256 KiB writes.
    modify(&mut c, &v, &[("maxMiBPerSec", "8")]).await.unwrap();
    let (_, bw) = fio_rate(&uri, "256k", &out);
    assert!(
        bw <= 8.0 * 1.1 * (1 << 20) as f64,
        "8 MiB/s allowed, fio measured {} MiB/s",
        bw / (1 << 20) as f64
    );
    modify(&mut c, &v, &[("maxMiBPerSec", "0")]).await.unwrap();
    let (_, bw_free) = fio_rate(&uri, "256k", &out);
    let mib = |b: f64| b / f64::from(1 << 20);
    eprintln!("256k writes: {:.1} MiB/s under an 8 MiB/s limit, {:.1} MiB/s without", mib(bw), mib(bw_free));
    assert!(
        bw_free > 2.0 * 8.0 * (1 << 20) as f64,
        "lifting the limit did not restore throughput: {bw_free} B/s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_volume_is_modified_in_its_record_and_its_next_engine_applies_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let ctl = ControllerProcess::start(root, 3);
    ctl.wait_probe_ready().await;
    let (_, mut c) = ctl.clients();
    let v = create(&mut c, "cold", 32, &[("replicas", "2")]).await;
    let uri = publish(&mut c, &v, "n1").await;
    let qemu = |cmd: &str| {
        let o = barnacle_tests::run_ok("qemu-io", &["-f", "raw", &uri, "-c", cmd]);
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(!text.contains("fail"), "{cmd}: {text}");
    };
    qemu("write -P 0x5a 0 1m");
    c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: v.clone(),
        node_id: "n1".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    // Settings and a third replica, committed with no engine running.
    modify(&mut c, &v, &[("maxIops", "150"), ("rebuildMiBPerSec", "20"), ("replicas", "3")]).await.unwrap();
    let m = membership(root, &v);
    assert_eq!(m["membership"]["settings"]["max_iops"], 150, "{m}");
    assert_eq!(m["membership"]["settings"]["rebuild_mib_per_sec"], 20, "{m}");
    let states = members(root, &v);
    assert_eq!(
        states.iter().filter(|(_, s)| s == "ejected").count(),
        1,
        "the new replica waits for a rebuild: {states:?}"
    );
    // A minimum above the replicas in sync would fail writes: refused until the rebuild.
    let e = modify(&mut c, &v, &[("minHealthyReplicas", "3")]).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // Published again: the engine serves with the record's settings, not its command line's, and
    // rebuilds the new replica; then the minimum may rise.
    let uri = publish(&mut c, &v, "n2").await;
    wait_all_healthy(root, &v, 3).await;
    let m = engine_metrics(root, "n2", &v);
    assert_eq!(metric(&m, "barnacle_engine_qos_max_iops", &[]), Some(150.0), "{m}");
    modify(&mut c, &v, &[("minHealthyReplicas", "3")]).await.unwrap();
    let m = engine_metrics(root, "n2", &v);
    assert_eq!(metric(&m, "barnacle_engine_min_healthy_replicas", &[]), Some(3.0), "{m}");
    let o = barnacle_tests::run_ok("qemu-io", &["-f", "raw", &uri, "-c", "read -P 0x5a 0 1m"]);
    assert!(!String::from_utf8_lossy(&o.stdout).contains("fail"));

    // 3 → 1 is refused under a minimum of 3; lowering both at once works.
    let e = modify(&mut c, &v, &[("replicas", "1")]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    modify(&mut c, &v, &[("replicas", "1"), ("minHealthyReplicas", "1")]).await.unwrap();
    assert_eq!(members(root, &v).len(), 1);
    let o = barnacle_tests::run_ok("qemu-io", &["-f", "raw", &uri, "-c", "read -P 0x5a 0 1m"]);
    assert!(!String::from_utf8_lossy(&o.stdout).contains("fail"));
}
