//! Volume group snapshots (the CSI GroupController) with real processes: a group of two attached
//! volumes under concurrent writers, and a detached one, restores into volumes whose contents are
//! a state all of them were in at one instant; the group's CSI cases.
//!
//! Consistency is checked with paired records: each writer owns one block and, in a loop, writes
//! sequence number `n` to volume A, waits for the acknowledgement, then writes `n` to volume B. At
//! every instant A's number is B's or one more, and the restored copies must show that. With the
//! engines' IO hold switched off (each member's snapshot an ordinary barrier, taken concurrently)
//! this test failed 2 runs of 3 here, with pairs like A at 39 and B at 30.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use barnacle_node::nbd_client::Client;
use barnacle_tests::{ControllerProcess, csi_capability};
use bytes::Bytes;
use csi::controller_client::ControllerClient;
use csi::group_controller_client::GroupControllerClient;
use csi_proto::v1 as csi;
use tonic::Code;
use tonic::transport::Channel;

const MIB: i64 = 1 << 20;
const WRITERS: u64 = 4;
const BLOCK: u64 = 4096;

async fn create(c: &mut ControllerClient<Channel>, name: &str, source: Option<&str>) -> String {
    let r = csi::CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(csi::CapacityRange { required_bytes: 16 * MIB, limit_bytes: 0 }),
        volume_capabilities: vec![csi_capability(true, "")],
        parameters: [("replicas".to_owned(), "2".to_owned())].into(),
        volume_content_source: source.map(|s| csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource { snapshot_id: s.to_owned() },
            )),
        }),
        ..Default::default()
    };
    c.create_volume(r).await.unwrap().into_inner().volume.unwrap().volume_id
}

/// Publishes on n1; an NBD client of the volume's export.
async fn attach(c: &mut ControllerClient<Channel>, vol: &str) -> Client {
    let ctx = c
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: vol.to_owned(),
            node_id: "n1".into(),
            volume_capability: Some(csi_capability(true, "")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    Client::connect(ctx["nbdSocket"].clone().into(), ctx["exportName"].clone(), Duration::from_secs(30))
        .await
        .unwrap()
}

/// Writer `k`'s record with sequence number `n`: a whole block.
fn record(k: u64, n: u64) -> Bytes {
    let mut b = vec![0u8; BLOCK as usize];
    for chunk in b.chunks_mut(16) {
        chunk[..8].copy_from_slice(&k.to_le_bytes());
        chunk[8..].copy_from_slice(&n.to_le_bytes());
    }
    Bytes::from(b)
}

/// The sequence number of writer `k`'s block (0: never written); the block must be whole.
async fn seq(c: &Client, k: u64) -> u64 {
    let b = c.read(k * BLOCK, BLOCK as u32).await.unwrap();
    let n = u64::from_le_bytes(b[8..16].try_into().unwrap());
    if n == 0 {
        assert!(b.iter().all(|x| *x == 0), "writer {k}'s block is torn");
    } else {
        assert_eq!(b, record(k, n), "writer {k}'s block is torn");
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_snapshot_is_one_instant_of_all_its_volumes() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProcess::start(tmp.path(), 3);
    ctl.wait_probe_ready().await;
    let (_, mut c) = ctl.clients();
    let mut g =
        GroupControllerClient::new(csi_proto::unix_channel(&ctl.socket.display().to_string()).unwrap());
    let caps =
        g.group_controller_get_capabilities(csi::GroupControllerGetCapabilitiesRequest {}).await.unwrap();
    assert_eq!(caps.into_inner().capabilities.len(), 1);

    let a = create(&mut c, "grp-a", None).await;
    let b = create(&mut c, "grp-b", None).await;
    let detached = create(&mut c, "grp-c", None).await;
    // The detached member holds a known block, written while it was attached.
    {
        let cc = attach(&mut c, &detached).await;
        cc.write(9 * BLOCK, record(9, 77), false).await.unwrap();
        cc.flush().await.unwrap();
        c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: detached.clone(),
            node_id: "n1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let ca = Arc::new(attach(&mut c, &a).await);
    let cb = Arc::new(attach(&mut c, &b).await);

    // Writers: n to A, acknowledged, then n to B.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|k| {
            let (ca, cb, stop) = (ca.clone(), cb.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    ca.write(k * BLOCK, record(k, n), false).await.unwrap();
                    cb.write(k * BLOCK, record(k, n), false).await.unwrap();
                }
                n
            })
        })
        .collect();
    // Under way: every writer past its 20th pair.
    let deadline = Instant::now() + Duration::from_secs(60);
    while {
        let mut low = u64::MAX;
        for k in 0..WRITERS {
            low = low.min(seq(&cb, k).await);
        }
        low < 20
    } {
        assert!(Instant::now() < deadline, "the writers do not get going");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let create_group = |name: &str, vols: &[&String]| csi::CreateVolumeGroupSnapshotRequest {
        name: name.to_owned(),
        source_volume_ids: vols.iter().map(|v| (*v).clone()).collect(),
        parameters: [("csi.storage.k8s.io/volumegroupsnapshot/name".to_owned(), "gs".to_owned())].into(),
        ..Default::default()
    };
    let group = g
        .create_volume_group_snapshot(create_group("gs-1", &[&a, &b, &detached]))
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    // Writers go on a little after it, then stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut written = 0;
    for w in writers {
        written += w.await.unwrap();
    }
    assert!(group.ready_to_use && group.snapshots.len() == 3, "{group:?}");
    assert!(group.snapshots.iter().all(|s| s.group_snapshot_id == group.group_snapshot_id && s.ready_to_use));

    // Restored, each pair is one instant's: A's number is B's or one more.
    let snap_of =
        |vol: &str| group.snapshots.iter().find(|s| s.source_volume_id == vol).unwrap().snapshot_id.clone();
    let ra = create(&mut c, "grp-a-restored", Some(&snap_of(&a))).await;
    let rb = create(&mut c, "grp-b-restored", Some(&snap_of(&b))).await;
    let rc = create(&mut c, "grp-c-restored", Some(&snap_of(&detached))).await;
    let (ra, rb, rc) = (attach(&mut c, &ra).await, attach(&mut c, &rb).await, attach(&mut c, &rc).await);
    let mut pairs = Vec::new();
    for k in 0..WRITERS {
        let (sa, sb) = (seq(&ra, k).await, seq(&rb, k).await);
        pairs.push((sa, sb));
        assert!(sa == sb || sa == sb + 1, "writer {k}: A at {sa}, B at {sb} — not one instant ({pairs:?})");
        assert!(sb >= 20, "writer {k}: the snapshot predates the writes it should hold ({pairs:?})");
    }
    assert!(written > pairs.iter().map(|p| p.0).sum::<u64>(), "the writers went on after the group snapshot");
    assert_eq!(seq(&rc, 9).await, 77, "the detached member's snapshot holds its data");
    eprintln!("group snapshot pairs (A, B) per writer: {pairs:?}; {written} pairs written in all");

    // Idempotent by name; another set under the same name is AlreadyExists.
    let again = g.create_volume_group_snapshot(create_group("gs-1", &[&a, &b, &detached])).await.unwrap();
    assert_eq!(again.into_inner().group_snapshot.unwrap().group_snapshot_id, group.group_snapshot_id);
    let e = g.create_volume_group_snapshot(create_group("gs-1", &[&a])).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

    // Get lists the members; a member goes only with its group.
    let ids: Vec<String> = group.snapshots.iter().map(|s| s.snapshot_id.clone()).collect();
    let got = g
        .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
            group_snapshot_id: group.group_snapshot_id.clone(),
            snapshot_ids: ids.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(got.snapshots.len(), 3);
    let e = c
        .delete_snapshot(csi::DeleteSnapshotRequest { snapshot_id: ids[0].clone(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = g
        .delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: group.group_snapshot_id.clone(),
            snapshot_ids: ids[..1].to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "a snapshot list that is not the group's: {e:?}");
    for _ in 0..2 {
        g.delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: group.group_snapshot_id.clone(),
            snapshot_ids: ids.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let e = g
        .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
            group_snapshot_id: group.group_snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let left = c.list_snapshots(csi::ListSnapshotsRequest::default()).await.unwrap().into_inner();
    assert!(left.entries.is_empty(), "{left:?}");

    // The spec's error table.
    let cases: Vec<(&str, csi::CreateVolumeGroupSnapshotRequest, Code)> = vec![
        ("no name", create_group("", &[&a]), Code::InvalidArgument),
        ("no volumes", create_group("gs-2", &[]), Code::InvalidArgument),
        ("a volume twice", create_group("gs-2", &[&a, &a]), Code::InvalidArgument),
        (
            "an unknown volume",
            create_group("gs-2", &[&a, &"vol-0000000000000000".to_owned()]),
            Code::NotFound,
        ),
        (
            "an unknown parameter",
            csi::CreateVolumeGroupSnapshotRequest {
                parameters: [("consistency".to_owned(), "crash".to_owned())].into(),
                ..create_group("gs-2", &[&a])
            },
            Code::InvalidArgument,
        ),
    ];
    for (what, req, code) in cases {
        let e = g.create_volume_group_snapshot(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{what}: {e:?}");
    }
    let e = g.get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e =
        g.delete_volume_group_snapshot(csi::DeleteVolumeGroupSnapshotRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_cannot_hold_every_member_fails_whole_and_lets_io_go_on() {
    use barnacle_engine::mgmt::pb;
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProcess::start(tmp.path(), 2);
    ctl.wait_probe_ready().await;
    let (_, mut c) = ctl.clients();
    let mut g =
        GroupControllerClient::new(csi_proto::unix_channel(&ctl.socket.display().to_string()).unwrap());
    let a = create(&mut c, "held-a", None).await;
    let b = create(&mut c, "held-b", None).await;
    let (ca, _cb) = (attach(&mut c, &a).await, attach(&mut c, &b).await);

    // Someone else holds B's IO (a hold of another id, as a concurrent group would): the group
    // cannot hold B within its lease and fails whole.
    let ready: serde_json::Value = serde_json::from_slice(
        &std::fs::read(tmp.path().join("nodes/n1/run").join(format!("{b}-engine.ready"))).unwrap(),
    )
    .unwrap();
    let token = std::fs::read_to_string(tmp.path().join("state/tokens").join(&b)).unwrap();
    let mut m = pb::engine_manager_client::EngineManagerClient::connect(format!(
        "http://{}",
        ready["mgmt"].as_str().unwrap()
    ))
    .await
    .unwrap();
    let mut hold =
        tonic::Request::new(pb::HoldIoRequest { hold_id: "someone-else".into(), lease_ms: 12_000 });
    hold.metadata_mut().insert("authorization", format!("Bearer {}", token.trim()).parse().unwrap());
    m.hold_io(hold).await.unwrap();
    let req = csi::CreateVolumeGroupSnapshotRequest {
        name: "both".into(),
        source_volume_ids: vec![a.clone(), b.clone()],
        ..Default::default()
    };
    let e = g.create_volume_group_snapshot(req.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");

    // Nothing of the group is left, and A's IO goes on at once (its hold was released).
    let left = c.list_snapshots(csi::ListSnapshotsRequest::default()).await.unwrap().into_inner();
    assert!(left.entries.is_empty(), "{left:?}");
    tokio::time::timeout(Duration::from_secs(5), ca.write(0, record(0, 1), false))
        .await
        .expect("A's IO is still held")
        .unwrap();

    // Once the other hold lapses, the group is taken (retried while another operation on a
    // member, such as the controller's reconcile pass, makes it Aborted, as a CO retries).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let group = loop {
        match g.create_volume_group_snapshot(req.clone()).await {
            Ok(r) => break r.into_inner().group_snapshot.unwrap(),
            Err(e) if e.code() == Code::Aborted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{e:?}; controller log:\n{}", ctl.log_text()),
        }
    };
    assert_eq!(group.snapshots.len(), 2);
}
