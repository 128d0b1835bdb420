//! The controller with real processes: a volume's whole life (create, publish, write through NBD
//! with qemu-io, snapshot, clone from the snapshot and from the volume, expand online, unpublish,
//! delete) leaving nothing behind; the same with the controller SIGKILLed midway; and many
//! volumes created and deleted at once.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use barnacle_tests::{ControllerProcess, csi_capability, processes_mentioning, run_ok};
use csi::controller_client::ControllerClient;
use csi_proto::v1 as csi;
use tonic::Code;
use tonic::transport::Channel;

const MIB: i64 = 1 << 20;

fn qemu_io(uri: &str, cmds: &[&str]) {
    qemu_io_with(&[], uri, cmds);
}

fn qemu_io_with(opts: &[&str], uri: &str, cmds: &[&str]) {
    let mut args = opts.to_vec();
    args.extend(["-f", "raw", uri]);
    for c in cmds {
        args.extend(["-c", c]);
    }
    let out = run_ok("qemu-io", &args);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("fail") && !text.contains("error"), "qemu-io {cmds:?}: {text}");
}

fn nbd_size(uri: &str) -> u64 {
    let info: serde_json::Value =
        serde_json::from_slice(&run_ok("nbdinfo", &["--json", uri]).stdout).unwrap();
    info["exports"][0]["export-size"].as_u64().unwrap()
}

async fn create(
    c: &mut ControllerClient<Channel>,
    name: &str,
    mib: i64,
    replicas: &str,
    source: Option<csi::volume_content_source::Type>,
) -> Result<csi::Volume, tonic::Status> {
    let r = csi::CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(csi::CapacityRange { required_bytes: mib * MIB, limit_bytes: 0 }),
        volume_capabilities: vec![csi_capability(true, "")],
        parameters: [("replicas".to_owned(), replicas.to_owned())].into(),
        volume_content_source: source.map(|t| csi::VolumeContentSource { r#type: Some(t) }),
        ..Default::default()
    };
    Ok(c.create_volume(r).await?.into_inner().volume.unwrap())
}

fn from_snapshot(id: &str) -> Option<csi::volume_content_source::Type> {
    Some(csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
        snapshot_id: id.to_owned(),
    }))
}

fn from_volume(id: &str) -> Option<csi::volume_content_source::Type> {
    Some(csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
        volume_id: id.to_owned(),
    }))
}

/// Publishes on `node` and returns the export's URI.
async fn publish(
    c: &mut ControllerClient<Channel>,
    vol: &str,
    node: &str,
    readonly: bool,
) -> Result<String, tonic::Status> {
    let ctx = c
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: vol.to_owned(),
            node_id: node.to_owned(),
            volume_capability: Some(csi_capability(true, "")),
            readonly,
            ..Default::default()
        })
        .await?
        .into_inner()
        .publish_context;
    Ok(format!("nbd+unix:///{}?socket={}", ctx["exportName"], ctx["nbdSocket"]))
}

async fn unpublish(c: &mut ControllerClient<Channel>, vol: &str, node: &str) {
    c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: vol.to_owned(),
        node_id: node.to_owned(),
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn delete(c: &mut ControllerClient<Channel>, vol: &str) -> Result<(), tonic::Status> {
    c.delete_volume(csi::DeleteVolumeRequest { volume_id: vol.to_owned(), ..Default::default() })
        .await
        .map(|_| ())
}

async fn volume_ids(c: &mut ControllerClient<Channel>) -> Vec<String> {
    let r = c.list_volumes(csi::ListVolumesRequest::default()).await.unwrap().into_inner();
    r.entries.into_iter().map(|e| e.volume.unwrap().volume_id).collect()
}

/// The pid serving a process whose ready file is `ready` (the engine or a replica), if it has
/// one now (a restarting process has none for a moment).
fn try_pid_of(ready: &Path) -> Option<i32> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(ready).ok()?).ok()?;
    i32::try_from(v["pid"].as_i64()?).ok()
}

fn pid_of(ready: &Path) -> i32 {
    try_pid_of(ready).unwrap()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                out.extend(files_under(&e.path()));
                out.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

/// Nothing of any volume is left: no replica or engine process, no store, socket, ready file,
/// token or membership record.
fn assert_nothing_left(ctl: &ControllerProcess) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let procs: Vec<i32> = processes_mentioning(&ctl.root)
            .into_iter()
            .filter(|p| p.cast_unsigned() != ctl.child.id())
            .collect();
        if procs.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "processes left: {procs:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    for n in &ctl.nodes {
        for sub in ["replicas", "run"] {
            let left = files_under(&ctl.root.join("nodes").join(n).join(sub));
            assert!(left.is_empty(), "left on node {n}: {left:?}");
        }
    }
    for sub in ["tokens", "membership"] {
        let left = files_under(&ctl.root.join("state").join(sub));
        assert!(left.is_empty(), "left in state/{sub}: {left:?}");
    }
}

async fn lifecycle(kill_controller: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let mut ctl = ControllerProcess::start(tmp.path(), 3);
    ctl.wait_probe_ready().await;
    let (_, mut c) = ctl.clients();

    let a = create(&mut c, "life-a", 64, "3", None).await.unwrap().volume_id;
    let mut nodes_with_replica = 0;
    for n in &ctl.nodes {
        let dirs = std::fs::read_dir(tmp.path().join("nodes").join(n).join("replicas")).unwrap().count();
        assert!(dirs <= 1, "one replica per node");
        nodes_with_replica += dirs;
    }
    assert_eq!(nodes_with_replica, 3, "three replicas on three nodes");
    let uri_a = publish(&mut c, &a, "n1", false).await.unwrap();
    qemu_io(&uri_a, &["write -P 0xaa 0 1M", "flush"]);

    let engine_ready = tmp.path().join("nodes/n1/run").join(format!("{a}-engine.ready"));
    if kill_controller {
        let engine = pid_of(&engine_ready);
        let replica_ready = tmp.path().join("nodes/n2/run");
        let replica_ready = std::fs::read_dir(&replica_ready)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "ready"))
            .unwrap();
        ctl.restart();
        ctl.wait_probe_ready().await;
        (_, c) = ctl.clients();
        assert_eq!(pid_of(&engine_ready), engine, "the engine outlived the controller and was adopted");
        assert_eq!(volume_ids(&mut c).await, std::slice::from_ref(&a));
        // An adopted replica that dies is restarted.
        let replica = pid_of(&replica_ready);
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(replica), nix::sys::signal::Signal::SIGKILL)
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while try_pid_of(&replica_ready).is_none_or(|p| p == replica) {
            assert!(Instant::now() < deadline, "killed replica not restarted:\n{}", ctl.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // IO goes on (the engine ejected the replica or it was rebuilt: either way no error).
        qemu_io(&uri_a, &["read -P 0xaa 0 1M"]);
    }

    let snap = c
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: a.clone(),
            name: "life-s".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    qemu_io(&uri_a, &["write -P 0xbb 0 1M", "write -P 0xcc 1M 1M", "flush"]);

    let b = create(&mut c, "life-b", 64, "3", from_snapshot(&snap.snapshot_id)).await.unwrap().volume_id;
    let cl = if kill_controller {
        // SIGKILL while the clone of a published volume is under way, then repeat the call.
        let mut c2 = c.clone();
        let a2 = a.clone();
        let pending = tokio::spawn(async move { create(&mut c2, "life-c", 64, "2", from_volume(&a2)).await });
        tokio::time::sleep(Duration::from_millis(150)).await;
        ctl.restart();
        let _ = pending.await;
        ctl.wait_probe_ready().await;
        (_, c) = ctl.clients();
        create(&mut c, "life-c", 64, "2", from_volume(&a)).await.unwrap().volume_id
    } else {
        create(&mut c, "life-c", 64, "2", from_volume(&a)).await.unwrap().volume_id
    };

    let uri_b = publish(&mut c, &b, "n2", true).await.unwrap();
    let uri_c = publish(&mut c, &cl, "n3", false).await.unwrap();
    qemu_io_with(&["-r"], &uri_b, &["read -P 0xaa 0 1M", "read -P 0 1M 1M"]);
    // B was published readonly: its export says so.
    let info: serde_json::Value =
        serde_json::from_slice(&run_ok("nbdinfo", &["--json", &uri_b]).stdout).unwrap();
    assert_eq!(info["exports"][0]["is_read_only"].as_bool(), Some(true), "{info}");
    qemu_io(&uri_c, &["read -P 0xbb 0 1M", "read -P 0xcc 1M 1M"]);
    qemu_io(&uri_a, &["read -P 0xbb 0 1M", "read -P 0xcc 1M 1M"]);

    // Online expansion, seen by a new NBD connection.
    let grown = c
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: a.clone(),
            capacity_range: Some(csi::CapacityRange { required_bytes: 128 * MIB, limit_bytes: 0 }),
            volume_capability: Some(csi_capability(true, "")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((grown.capacity_bytes, grown.node_expansion_required), (128 * MIB, false));
    assert_eq!(nbd_size(&uri_a), 128 << 20);
    qemu_io(&uri_a, &["write -P 0xdd 100M 1M", "read -P 0xdd 100M 1M", "read -P 0xbb 0 1M"]);

    let cond = c
        .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: a.clone() })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
        .volume_condition
        .unwrap();
    assert!(!cond.message.is_empty());

    for (v, n) in [(&a, "n1"), (&b, "n2"), (&cl, "n3")] {
        unpublish(&mut c, v, n).await;
    }
    assert!(!engine_ready.exists(), "the engine is gone after unpublish");
    // A volume with a snapshot is kept until the snapshot goes; its name and listing go at once.
    delete(&mut c, &a).await.unwrap();
    assert!(!volume_ids(&mut c).await.contains(&a));
    // The snapshot still works after its volume was deleted.
    let d = create(&mut c, "life-d", 64, "1", from_snapshot(&snap.snapshot_id)).await.unwrap().volume_id;
    let uri_d = publish(&mut c, &d, "n1", false).await.unwrap();
    qemu_io(&uri_d, &["read -P 0xaa 0 1M"]);
    unpublish(&mut c, &d, "n1").await;
    c.delete_snapshot(csi::DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    for v in [&b, &cl, &d] {
        delete(&mut c, v).await.unwrap();
    }
    assert!(volume_ids(&mut c).await.is_empty());
    let snaps = c.list_snapshots(csi::ListSnapshotsRequest::default()).await.unwrap().into_inner();
    assert!(snaps.entries.is_empty());
    assert_nothing_left(&ctl);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_lives_and_dies_leaving_nothing_behind() {
    lifecycle(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_midway_recovers_every_record_and_process() {
    lifecycle(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_volumes_at_once_and_overlapping_calls_are_aborted() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProcess::start(tmp.path(), 3);
    ctl.wait_probe_ready().await;
    let (_, c) = ctl.clients();

    let creates = (0..20).map(|i| {
        let mut c = c.clone();
        async move { create(&mut c, &format!("many-{i}"), 8, "2", None).await }
    });
    let vols: Vec<String> =
        futures::future::join_all(creates).await.into_iter().map(|r| r.unwrap().volume_id).collect();
    let mut c1 = c.clone();
    let mut listed = volume_ids(&mut c1).await;
    listed.sort();
    let mut want = vols.clone();
    want.sort();
    assert_eq!(listed, want);
    // Repeats return the same volumes.
    let again = futures::future::join_all((0..20).map(|i| {
        let mut c = c.clone();
        async move { create(&mut c, &format!("many-{i}"), 8, "2", None).await }
    }))
    .await;
    for (v, r) in vols.iter().zip(again) {
        assert_eq!(&r.unwrap().volume_id, v);
    }

    // Two calls on one volume at once: the second is Aborted while the first runs.
    let mut aborted = false;
    for _ in 0..5 {
        let (mut x, mut y) = (c.clone(), c.clone());
        let v = vols[0].clone();
        let (r1, r2) = tokio::join!(publish(&mut x, &v, "n1", false), async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            delete(&mut y, &v).await
        });
        r1.unwrap();
        match r2 {
            Err(s) if s.code() == Code::Aborted => {
                aborted = true;
            }
            Err(s) => assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}"),
            Ok(()) => panic!("a published volume was deleted"),
        }
        unpublish(&mut c1, &vols[0], "n1").await;
        if aborted {
            break;
        }
    }
    assert!(aborted, "an overlapping call was never aborted");

    let deletes = vols.iter().map(|v| {
        let mut c = c.clone();
        let v = v.clone();
        async move { delete(&mut c, &v).await }
    });
    for r in futures::future::join_all(deletes).await {
        r.unwrap();
    }
    assert!(volume_ids(&mut c1).await.is_empty());
    assert_nothing_left(&ctl);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpublish_fences_the_detached_engine_out_of_every_replica() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProcess::start(tmp.path(), 3);
    ctl.wait_probe_ready().await;
    let (_, mut c) = ctl.clients();
    let v = create(&mut c, "fence", 16, "3", None).await.unwrap().volume_id;
    let uri = publish(&mut c, &v, "n1", false).await.unwrap();
    qemu_io(&uri, &["write -P 0xaa 0 64k", "flush"]);

    // The engine's epoch and identity while attached.
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(tmp.path().join("state/membership").join(&v).join("membership.json")).unwrap(),
    )
    .unwrap();
    let m = &record["membership"];
    let epoch = m["epoch"].as_u64().unwrap();
    let engine: uuid::Uuid = m["engine_id"].as_str().unwrap().parse().unwrap();
    let token = std::fs::read_to_string(tmp.path().join("state/tokens").join(&v)).unwrap();
    let addrs: Vec<String> =
        m["replicas"].as_array().unwrap().iter().map(|r| r["addr"].as_str().unwrap().to_owned()).collect();
    assert_eq!(addrs.len(), 3);

    unpublish(&mut c, &v, "n1").await;

    // An engine of that attachment which outlived the detach (a partitioned node) cannot write:
    // every replica now refuses its epoch.
    for addr in &addrs {
        let cfg = barnacle_replica::client::ClientConfig {
            volume_id: v.clone(),
            token: token.clone(),
            engine_id: engine,
            epoch,
            request_timeout: Duration::from_secs(5),
            heartbeat: Duration::ZERO,
        };
        let wrote = match barnacle_replica::client::ReplicaClient::connect_to(addr, cfg).await {
            Ok(client) => client.write(0, bytes::Bytes::from(vec![0xee; 4096]), true).await.is_ok(),
            Err(_) => false,
        };
        assert!(!wrote, "replica {addr} took a write of the detached engine's epoch {epoch}");
    }
    let uri = publish(&mut c, &v, "n2", false).await.unwrap();
    qemu_io(&uri, &["read -P 0xaa 0 64k"]);
}

async fn condition(c: &mut ControllerClient<Channel>, vol: &str) -> csi::VolumeCondition {
    c.controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: vol.to_owned() })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap()
        .volume_condition
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_condition_follows_replica_health() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProcess::start(tmp.path(), 3);
    ctl.wait_probe_ready().await;
    let (_, mut c) = ctl.clients();
    let v = create(&mut c, "cond", 16, "3", None).await.unwrap().volume_id;
    let uri = publish(&mut c, &v, "n1", false).await.unwrap();
    qemu_io(&uri, &["write -P 0xaa 0 64k", "flush"]);
    let ok = condition(&mut c, &v).await;
    assert!(!ok.abnormal, "{ok:?}");

    // Hang replica r1: the next write ejects it after the engine's replica timeout.
    let ready = ctl
        .nodes
        .iter()
        .map(|n| tmp.path().join("nodes").join(n).join("run").join(format!("{v}-r1.ready")))
        .find(|p| p.exists())
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(pid_of(&ready));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    qemu_io(&uri, &["write -P 0xbb 0 64k", "flush"]);
    let bad = condition(&mut c, &v).await;
    assert!(bad.abnormal && bad.message.contains("r1"), "{bad:?}");

    // Resumed, it is rebuilt and the volume is normal again.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = condition(&mut c, &v).await;
        if !now.abnormal {
            break;
        }
        assert!(Instant::now() < deadline, "never normal again: {now:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    qemu_io(&uri, &["read -P 0xbb 0 64k"]);
}
