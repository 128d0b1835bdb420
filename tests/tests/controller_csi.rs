//! CSI conformance of `barnacle-controller` over its real gRPC socket, with the local orchestrator
//! starting real replica and engine processes: every RPC's missing and invalid fields, not-found
//! cases, idempotent repeats, incompatible repeats, and pagination while volumes come and go.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;

use barnacle_tests::{ControllerProcess, csi_capability};
use csi::controller_client::ControllerClient;
use csi::volume_capability::access_mode::Mode;
use csi_proto::v1 as csi;
use tonic::transport::Channel;
use tonic::{Code, Status};

const MIB: i64 = 1 << 20;

type Call = Pin<Box<dyn Future<Output = Result<(), Status>> + Send>>;

fn create_req(name: &str, mib: i64, params: &[(&str, &str)]) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(csi::CapacityRange { required_bytes: mib * MIB, limit_bytes: 0 }),
        volume_capabilities: vec![csi_capability(false, "ext4")],
        parameters: params.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        ..Default::default()
    }
}

fn one_replica(name: &str, mib: i64) -> csi::CreateVolumeRequest {
    create_req(name, mib, &[("replicas", "1")])
}

fn mode_cap(mode: Mode) -> csi::VolumeCapability {
    let mut c = csi_capability(false, "");
    c.access_mode = Some(csi::volume_capability::AccessMode { mode: mode as i32 });
    c
}

/// Runs each case and checks its code; reports every mismatch at once.
async fn check(cases: Vec<(&str, Code, Call)>) {
    let mut failures = Vec::new();
    for (name, want, fut) in cases {
        let got = match fut.await {
            Ok(()) => Code::Ok,
            Err(s) => {
                if s.code() != want {
                    failures.push(format!("{name}: want {want:?}, got {:?}: {}", s.code(), s.message()));
                }
                continue;
            }
        };
        if got != want {
            failures.push(format!("{name}: want {want:?}, got Ok"));
        }
    }
    assert!(failures.is_empty(), "{} case(s) failed:\n{}", failures.len(), failures.join("\n"));
}

async fn list_ids(c: &mut ControllerClient<Channel>, max: i32, token: &str) -> (Vec<String>, String) {
    let r = c
        .list_volumes(csi::ListVolumesRequest { max_entries: max, starting_token: token.to_owned() })
        .await
        .unwrap()
        .into_inner();
    (r.entries.into_iter().map(|e| e.volume.unwrap().volume_id).collect(), r.next_token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_reports_the_driver_and_its_capabilities() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProcess::start(tmp.path(), 2);
    ctl.wait_probe_ready().await;
    let (mut id, mut c) = ctl.clients();
    let info = id.get_plugin_info(csi::GetPluginInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.name, "csi.barnacle.dev");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let caps = id.get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {}).await.unwrap().into_inner();
    let text = format!("{caps:?}");
    for want in ["ControllerService", "GroupControllerService", "VolumeAccessibilityConstraints", "Online"] {
        assert!(text.contains(want), "{want} missing in {text}");
    }
    assert_eq!(caps.capabilities.len(), 4);
    let ccaps =
        c.controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {}).await.unwrap().into_inner();
    use csi::controller_service_capability::rpc::Type as Rpc;
    let got: BTreeSet<i32> = ccaps
        .capabilities
        .iter()
        .filter_map(|c| c.r#type.as_ref().map(|csi::controller_service_capability::Type::Rpc(r)| r.r#type))
        .collect();
    for want in [
        Rpc::CreateDeleteVolume,
        Rpc::PublishUnpublishVolume,
        Rpc::ListVolumes,
        Rpc::GetCapacity,
        Rpc::CreateDeleteSnapshot,
        Rpc::ListSnapshots,
        Rpc::CloneVolume,
        Rpc::PublishReadonly,
        Rpc::ExpandVolume,
        Rpc::ListVolumesPublishedNodes,
        Rpc::VolumeCondition,
        Rpc::GetVolume,
        Rpc::SingleNodeMultiWriter,
        Rpc::GetSnapshot,
        Rpc::ModifyVolume,
    ] {
        assert!(got.contains(&(want as i32)), "{want:?} not advertised");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_follows_the_spec_error_table() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProcess::start(tmp.path(), 3);
    ctl.wait_probe_ready().await;
    let (_, c) = ctl.clients();

    // Fixtures: a volume, a snapshot of it, and a published volume.
    let base =
        c.clone().create_volume(one_replica("conf-base", 16)).await.unwrap().into_inner().volume.unwrap();
    let snap = c
        .clone()
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: base.volume_id.clone(),
            name: "conf-snap".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snap.ready_to_use);
    assert_eq!(snap.size_bytes, 16 * MIB);
    assert!(snap.creation_time.is_some_and(|t| t.seconds > 0));
    let pubvol =
        c.clone().create_volume(one_replica("conf-pub", 16)).await.unwrap().into_inner().volume.unwrap();
    let publish = |vol: &str, node: &str, readonly: bool| csi::ControllerPublishVolumeRequest {
        volume_id: vol.to_owned(),
        node_id: node.to_owned(),
        volume_capability: Some(csi_capability(false, "ext4")),
        readonly,
        ..Default::default()
    };
    let ctx = c
        .clone()
        .controller_publish_volume(publish(&pubvol.volume_id, "n1", false))
        .await
        .unwrap()
        .into_inner();
    assert!(ctx.publish_context.contains_key("nbdSocket"), "{ctx:?}");
    assert!(
        !format!("{ctx:?}").contains(
            &std::fs::read_to_string(tmp.path().join("state/tokens").join(&pubvol.volume_id)).unwrap()
        ),
        "no secret in the publish context"
    );

    // The fixtures' ids, for the cases below (each case's future owns what it uses).
    let base_id: &'static str = Box::leak(base.volume_id.clone().into_boxed_str());
    let pub_id: &'static str = Box::leak(pubvol.volume_id.clone().into_boxed_str());
    let snap_id: &'static str = Box::leak(snap.snapshot_id.clone().into_boxed_str());
    let mut cases: Vec<(&str, Code, Call)> = Vec::new();
    // Each case runs on its own client.
    macro_rules! case {
        ($name:expr, $code:expr, |$c:ident| $body:expr) => {{
            let mut $c = c.clone();
            let fut: Call = Box::pin(async move { $body.await.map(|_| ()) });
            cases.push(($name, $code, fut));
        }};
    }

    // CreateVolume.
    case!("create: no name", Code::InvalidArgument, |c| c.create_volume(one_replica("", 16)));
    case!("create: no capabilities", Code::InvalidArgument, |c| {
        let mut r = one_replica("x1", 16);
        r.volume_capabilities.clear();
        c.create_volume(r)
    });
    case!("create: capability without access mode", Code::InvalidArgument, |c| {
        let mut r = one_replica("x2", 16);
        r.volume_capabilities[0].access_mode = None;
        c.create_volume(r)
    });
    case!("create: capability without access type", Code::InvalidArgument, |c| {
        let mut r = one_replica("x3", 16);
        r.volume_capabilities[0].access_type = None;
        c.create_volume(r)
    });
    case!("create: multi-node access", Code::InvalidArgument, |c| {
        let mut r = one_replica("x4", 16);
        r.volume_capabilities = vec![mode_cap(Mode::MultiNodeMultiWriter)];
        c.create_volume(r)
    });
    case!("create: unknown access mode", Code::InvalidArgument, |c| {
        let mut r = one_replica("x5", 16);
        r.volume_capabilities[0].access_mode = Some(csi::volume_capability::AccessMode { mode: 99 });
        c.create_volume(r)
    });
    case!("create: unsupported fs", Code::InvalidArgument, |c| {
        let mut r = one_replica("x6", 16);
        r.volume_capabilities = vec![csi_capability(false, "btrfs")];
        c.create_volume(r)
    });
    case!("create: fs differs from parameters", Code::InvalidArgument, |c| {
        c.create_volume(create_req("x7", 16, &[("replicas", "1"), ("fsType", "xfs")]))
    });
    case!("create: unknown parameter", Code::InvalidArgument, |c| {
        c.create_volume(create_req("x8", 16, &[("replicas", "1"), ("color", "blue")]))
    });
    case!("create: bad replicas", Code::InvalidArgument, |c| c.create_volume(create_req(
        "x9",
        16,
        &[("replicas", "0")]
    )));
    case!("create: minHealthy above replicas", Code::InvalidArgument, |c| {
        c.create_volume(create_req("x10", 16, &[("replicas", "1"), ("minHealthyReplicas", "2")]))
    });
    case!("create: negative capacity", Code::InvalidArgument, |c| {
        let mut r = one_replica("x11", 16);
        r.capacity_range = Some(csi::CapacityRange { required_bytes: -1, limit_bytes: 0 });
        c.create_volume(r)
    });
    case!("create: required above limit", Code::InvalidArgument, |c| {
        let mut r = one_replica("x12", 16);
        r.capacity_range = Some(csi::CapacityRange { required_bytes: 2 * MIB, limit_bytes: MIB });
        c.create_volume(r)
    });
    case!("create: no whole MiB within range", Code::OutOfRange, |c| {
        let mut r = one_replica("x13", 16);
        r.capacity_range = Some(csi::CapacityRange { required_bytes: 10, limit_bytes: 1000 });
        c.create_volume(r)
    });
    case!("create: more than any node holds", Code::ResourceExhausted, |c| {
        c.create_volume(one_replica("x14", 1 << 40))
    });
    case!("create: unknown source snapshot", Code::NotFound, |c| {
        let mut r = one_replica("x15", 16);
        r.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource { snapshot_id: "snap-0000000000000000".into() },
            )),
        });
        c.create_volume(r)
    });
    case!("create: unknown source volume", Code::NotFound, |c| {
        let mut r = one_replica("x16", 16);
        r.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Volume(
                csi::volume_content_source::VolumeSource { volume_id: "vol-0000000000000000".into() },
            )),
        });
        c.create_volume(r)
    });
    case!("create: empty source snapshot id", Code::InvalidArgument, |c| {
        let mut r = one_replica("x17", 16);
        r.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(Default::default())),
        });
        c.create_volume(r)
    });
    case!("create: clone smaller than its source", Code::OutOfRange, |c| {
        let mut r = one_replica("x18", 8);
        r.capacity_range = Some(csi::CapacityRange { required_bytes: 8 * MIB, limit_bytes: 8 * MIB });
        r.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource { snapshot_id: snap_id.to_owned() },
            )),
        });
        c.create_volume(r)
    });
    case!("create: idempotent repeat", Code::Ok, |c| c.create_volume(one_replica("conf-base", 16)));
    case!("create: repeat with another size", Code::AlreadyExists, |c| c
        .create_volume(one_replica("conf-base", 32)));
    case!("create: repeat with a content source", Code::AlreadyExists, |c| {
        let mut r = one_replica("conf-base", 16);
        r.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource { snapshot_id: snap_id.to_owned() },
            )),
        });
        c.create_volume(r)
    });
    case!("create: fewer nodes than minHealthyReplicas", Code::ResourceExhausted, |c| {
        c.create_volume(create_req("x19", 16, &[("replicas", "5"), ("minHealthyReplicas", "4")]))
    });
    case!("create: repeat with other parameters", Code::AlreadyExists, |c| {
        c.create_volume(create_req("conf-base", 16, &[("replicas", "2")]))
    });

    // DeleteVolume.
    case!("delete: no id", Code::InvalidArgument, |c| c.delete_volume(csi::DeleteVolumeRequest::default()));
    case!("delete: unknown id", Code::Ok, |c| c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: "vol-0000000000000000".into(),
        ..Default::default()
    }));
    case!("delete: published", Code::FailedPrecondition, |c| c
        .delete_volume(csi::DeleteVolumeRequest { volume_id: pub_id.to_owned(), ..Default::default() }));

    // ControllerPublishVolume.
    case!("publish: no volume id", Code::InvalidArgument, |c| c
        .controller_publish_volume(publish("", "n1", false)));
    case!("publish: no node id", Code::InvalidArgument, |c| {
        c.controller_publish_volume(publish(base_id, "", false))
    });
    case!("publish: no capability", Code::InvalidArgument, |c| {
        let mut r = publish(base_id, "n1", false);
        r.volume_capability = None;
        c.controller_publish_volume(r)
    });
    case!("publish: multi-node capability", Code::InvalidArgument, |c| {
        let mut r = publish(base_id, "n1", false);
        r.volume_capability = Some(mode_cap(Mode::MultiNodeReaderOnly));
        c.controller_publish_volume(r)
    });
    case!("publish: unknown volume", Code::NotFound, |c| {
        c.controller_publish_volume(publish("vol-0000000000000000", "n1", false))
    });
    case!("publish: unknown node", Code::NotFound, |c| c
        .controller_publish_volume(publish(base_id, "n9", false)));
    case!("publish: idempotent repeat", Code::Ok, |c| {
        c.controller_publish_volume(publish(pub_id, "n1", false))
    });
    case!("publish: second node of a single-node volume", Code::FailedPrecondition, |c| {
        c.controller_publish_volume(publish(pub_id, "n2", false))
    });
    case!("publish: same node, readonly now", Code::AlreadyExists, |c| {
        c.controller_publish_volume(publish(pub_id, "n1", true))
    });

    // ControllerUnpublishVolume.
    case!("unpublish: no volume id", Code::InvalidArgument, |c| {
        c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest::default())
    });
    case!("unpublish: unknown volume", Code::Ok, |c| {
        c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: "vol-0000000000000000".into(),
            node_id: "n1".into(),
            ..Default::default()
        })
    });
    case!("unpublish: not published on that node", Code::Ok, |c| {
        c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: base_id.to_owned(),
            node_id: "n2".into(),
            ..Default::default()
        })
    });

    // ValidateVolumeCapabilities.
    let validate = |vol: &str, caps: Vec<csi::VolumeCapability>| csi::ValidateVolumeCapabilitiesRequest {
        volume_id: vol.to_owned(),
        volume_capabilities: caps,
        ..Default::default()
    };
    case!("validate: no id", Code::InvalidArgument, |c| {
        c.validate_volume_capabilities(validate("", vec![csi_capability(false, "")]))
    });
    case!("validate: no capabilities", Code::InvalidArgument, |c| {
        c.validate_volume_capabilities(validate(base_id, vec![]))
    });
    case!("validate: unknown volume", Code::NotFound, |c| {
        c.validate_volume_capabilities(validate("vol-0000000000000000", vec![csi_capability(false, "")]))
    });

    // ListVolumes / ListSnapshots.
    case!("list volumes: negative max", Code::InvalidArgument, |c| {
        c.list_volumes(csi::ListVolumesRequest { max_entries: -1, starting_token: String::new() })
    });
    case!("list volumes: foreign token", Code::Aborted, |c| {
        c.list_volumes(csi::ListVolumesRequest { max_entries: 0, starting_token: "garbage".into() })
    });
    case!("list snapshots: foreign token", Code::Aborted, |c| {
        c.list_snapshots(csi::ListSnapshotsRequest { starting_token: "garbage".into(), ..Default::default() })
    });
    case!("list snapshots: negative max", Code::InvalidArgument, |c| {
        c.list_snapshots(csi::ListSnapshotsRequest { max_entries: -5, ..Default::default() })
    });

    // GetCapacity.
    case!("capacity: unknown parameter", Code::InvalidArgument, |c| {
        c.get_capacity(csi::GetCapacityRequest {
            parameters: HashMap::from([("color".into(), "blue".into())]),
            ..Default::default()
        })
    });

    // Snapshots.
    let snapshot_req = |name: &str, vol: &str| csi::CreateSnapshotRequest {
        source_volume_id: vol.to_owned(),
        name: name.to_owned(),
        ..Default::default()
    };
    case!("snapshot: no name", Code::InvalidArgument, |c| c.create_snapshot(snapshot_req("", base_id)));
    case!("snapshot: no source", Code::InvalidArgument, |c| c.create_snapshot(snapshot_req("s-x", "")));
    case!("snapshot: unknown source", Code::NotFound, |c| {
        c.create_snapshot(snapshot_req("s-y", "vol-0000000000000000"))
    });
    case!("snapshot: unknown parameter", Code::InvalidArgument, |c| {
        let mut r = snapshot_req("s-z", base_id);
        r.parameters.insert("color".into(), "blue".into());
        c.create_snapshot(r)
    });
    case!("snapshot: idempotent repeat", Code::Ok, |c| c.create_snapshot(snapshot_req("conf-snap", base_id)));
    case!("snapshot: name taken by another volume's", Code::AlreadyExists, |c| {
        c.create_snapshot(snapshot_req("conf-snap", pub_id))
    });
    case!("delete snapshot: no id", Code::InvalidArgument, |c| c
        .delete_snapshot(csi::DeleteSnapshotRequest::default()));
    case!("delete snapshot: unknown id", Code::Ok, |c| c.delete_snapshot(csi::DeleteSnapshotRequest {
        snapshot_id: "snap-0000000000000000".into(),
        ..Default::default()
    }));
    case!("get snapshot: no id", Code::InvalidArgument, |c| c
        .get_snapshot(csi::GetSnapshotRequest::default()));
    case!("get snapshot: unknown id", Code::NotFound, |c| c.get_snapshot(csi::GetSnapshotRequest {
        snapshot_id: "snap-0000000000000000".into(),
        ..Default::default()
    }));

    // ControllerExpandVolume.
    let expand = |vol: &str, bytes: Option<i64>| csi::ControllerExpandVolumeRequest {
        volume_id: vol.to_owned(),
        capacity_range: bytes.map(|b| csi::CapacityRange { required_bytes: b, limit_bytes: 0 }),
        ..Default::default()
    };
    case!("expand: no id", Code::InvalidArgument, |c| c.controller_expand_volume(expand("", Some(32 * MIB))));
    case!("expand: no capacity range", Code::InvalidArgument, |c| {
        c.controller_expand_volume(expand(base_id, None))
    });
    case!("expand: unknown volume", Code::NotFound, |c| {
        c.controller_expand_volume(expand("vol-0000000000000000", Some(32 * MIB)))
    });
    case!("expand: empty capacity range", Code::InvalidArgument, |c| {
        c.controller_expand_volume(expand(base_id, Some(0)))
    });
    case!("expand: limit below the current size", Code::OutOfRange, |c| {
        let mut r = expand(base_id, Some(MIB));
        r.capacity_range = Some(csi::CapacityRange { required_bytes: MIB, limit_bytes: 2 * MIB });
        c.controller_expand_volume(r)
    });
    case!("expand: beyond the nodes' room", Code::OutOfRange, |c| {
        c.controller_expand_volume(expand(base_id, Some(1 << 50)))
    });

    // ControllerGetVolume.
    case!("get volume: no id", Code::InvalidArgument, |c| c
        .controller_get_volume(csi::ControllerGetVolumeRequest::default()));
    case!("get volume: unknown", Code::NotFound, |c| c
        .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: "vol-0000000000000000".into() }));
    // ControllerModifyVolume (the spec's table: INVALID_ARGUMENT for parameters it does not
    // support, NOT_FOUND for an unknown volume, OUT_OF_RANGE beyond what it can do).
    let modify = |vol: &str, kv: &[(&str, &str)]| csi::ControllerModifyVolumeRequest {
        volume_id: vol.to_owned(),
        mutable_parameters: kv.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        ..Default::default()
    };
    case!("modify: no id", Code::InvalidArgument, |c| c
        .controller_modify_volume(modify("", &[("maxIops", "5")])));
    case!("modify: unknown volume", Code::NotFound, |c| {
        c.controller_modify_volume(modify("vol-0000000000000000", &[("maxIops", "5")]))
    });
    case!("modify: an immutable parameter", Code::InvalidArgument, |c| {
        c.controller_modify_volume(modify(base_id, &[("thin", "false")]))
    });
    case!("modify: an unknown parameter", Code::InvalidArgument, |c| {
        c.controller_modify_volume(modify(base_id, &[("iops", "5")]))
    });
    case!("modify: a bad value", Code::InvalidArgument, |c| {
        c.controller_modify_volume(modify(base_id, &[("maxIops", "-5")]))
    });
    case!("modify: more replicas than allowed", Code::InvalidArgument, |c| {
        c.controller_modify_volume(modify(base_id, &[("replicas", "6")]))
    });
    case!("modify: a minimum above the replica count", Code::InvalidArgument, |c| {
        c.controller_modify_volume(modify(base_id, &[("minHealthyReplicas", "2")]))
    });
    case!("modify: more replicas than nodes", Code::ResourceExhausted, |c| {
        c.controller_modify_volume(modify(base_id, &[("replicas", "4")]))
    });
    case!("modify: nothing asked", Code::Ok, |c| c.controller_modify_volume(modify(base_id, &[])));
    case!("modify: limits of a published volume", Code::Ok, |c| {
        c.controller_modify_volume(modify(pub_id, &[("maxIops", "5000"), ("maxMiBPerSec", "100")]))
    });
    case!("modify: the same again", Code::Ok, |c| {
        c.controller_modify_volume(modify(pub_id, &[("maxIops", "5000"), ("maxMiBPerSec", "100")]))
    });
    case!("create: an unknown mutable parameter", Code::InvalidArgument, |c| {
        let mut r = one_replica("x-mut", 16);
        r.mutable_parameters = [("fsType".to_owned(), "xfs".to_owned())].into();
        c.create_volume(r)
    });
    check(cases).await;

    // A volume created with a VolumeAttributesClass's parameters has them, and they win over the
    // StorageClass's; ValidateVolumeCapabilities judges the mutable ones it is asked about.
    let mut c2 = c.clone();
    let mut r = create_req("conf-class", 16, &[("replicas", "1"), ("maxIops", "100")]);
    r.mutable_parameters = [("maxIops".to_owned(), "300".to_owned())].into();
    let classed = c2.create_volume(r).await.unwrap().into_inner().volume.unwrap();
    let validate_params =
        |params: &[(&str, &str)], mutable: &[(&str, &str)]| csi::ValidateVolumeCapabilitiesRequest {
            volume_id: classed.volume_id.clone(),
            volume_capabilities: vec![csi_capability(false, "ext4")],
            parameters: params.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            mutable_parameters: mutable.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            ..Default::default()
        };
    let yes = c2
        .validate_volume_capabilities(validate_params(&[], &[("maxIops", "300")]))
        .await
        .unwrap()
        .into_inner();
    assert!(yes.confirmed.is_some_and(|c| c.mutable_parameters["maxIops"] == "300"), "{}", yes.message);
    let no = c2
        .validate_volume_capabilities(validate_params(&[("maxIops", "100")], &[]))
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none(), "the class's value was overridden");
    // Modified, it validates against the new value.
    c2.controller_modify_volume(modify(&classed.volume_id, &[("maxIops", "0")])).await.unwrap();
    let yes = c2
        .validate_volume_capabilities(validate_params(&[("maxIops", "0")], &[]))
        .await
        .unwrap()
        .into_inner();
    assert!(yes.confirmed.is_some(), "{}", yes.message);

    // Results of the successful calls.
    let mut c = c.clone();
    let again = c.create_volume(one_replica("conf-base", 16)).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(again.volume_id, base.volume_id, "a repeat returns the same volume");
    let again = c
        .create_snapshot(snapshot_req("conf-snap", &base.volume_id))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(again.snapshot_id, snap.snapshot_id);
    let ctx2 =
        c.controller_publish_volume(publish(&pubvol.volume_id, "n1", false)).await.unwrap().into_inner();
    assert_eq!(ctx2.publish_context, ctx.publish_context, "a repeated publish returns the same context");

    let ok = c
        .validate_volume_capabilities(validate(&base.volume_id, vec![csi_capability(true, "")]))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some(), "{ok:?}");
    let no = c
        .validate_volume_capabilities(validate(&base.volume_id, vec![mode_cap(Mode::MultiNodeMultiWriter)]))
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none() && !no.message.is_empty(), "{no:?}");

    let got = c
        .get_snapshot(csi::GetSnapshotRequest { snapshot_id: snap.snapshot_id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(
        (got.source_volume_id.as_str(), got.size_bytes, got.ready_to_use),
        (base.volume_id.as_str(), 16 * MIB, true)
    );
    let by_source = c
        .list_snapshots(csi::ListSnapshotsRequest {
            source_volume_id: base.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_source.entries.len(), 1);
    let by_other = c
        .list_snapshots(csi::ListSnapshotsRequest {
            source_volume_id: pubvol.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(by_other.entries.is_empty());
    let by_id = c
        .list_snapshots(csi::ListSnapshotsRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_id.entries.len(), 1);

    // Expansion: smaller is a no-op, larger grows; a filesystem volume needs the node.
    let same = c.controller_expand_volume(expand(&base.volume_id, Some(8 * MIB))).await.unwrap().into_inner();
    assert_eq!(same.capacity_bytes, 16 * MIB);
    let grown =
        c.controller_expand_volume(expand(&base.volume_id, Some(24 * MIB + 1))).await.unwrap().into_inner();
    assert_eq!((grown.capacity_bytes, grown.node_expansion_required), (25 * MIB, true));
    let again =
        c.controller_expand_volume(expand(&base.volume_id, Some(24 * MIB + 1))).await.unwrap().into_inner();
    assert_eq!(again.capacity_bytes, 25 * MIB, "a repeated expansion is a no-op");

    // ControllerGetVolume: the published node and a normal condition.
    let gv = c
        .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: pubvol.volume_id.clone() })
        .await
        .unwrap()
        .into_inner();
    let st = gv.status.unwrap();
    assert_eq!(st.published_node_ids, ["n1"]);
    let cond = st.volume_condition.unwrap();
    assert!(!cond.abnormal, "{cond:?}");

    // GetCapacity: per node segment, and none for an unsupported capability.
    let cap = c
        .get_capacity(csi::GetCapacityRequest {
            accessible_topology: Some(csi::Topology {
                segments: HashMap::from([("topology.barnacle.dev/node".into(), "n1".into())]),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(cap.available_capacity > 0 && cap.maximum_volume_size.unwrap_or(0) > 0, "{cap:?}");
    let none = c
        .get_capacity(csi::GetCapacityRequest {
            volume_capabilities: vec![mode_cap(Mode::MultiNodeMultiWriter)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(none.available_capacity, 0);

    // Unpublish is idempotent; then the volume can be deleted.
    for _ in 0..2 {
        c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: pubvol.volume_id.clone(),
            node_id: "n1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    for _ in 0..2 {
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: pubvol.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let gone = c
        .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: pubvol.volume_id.clone() })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    for _ in 0..2 {
        c.delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    assert_eq!(
        c.get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err()
        .code(),
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_holds_while_volumes_come_and_go() {
    let tmp = tempfile::tempdir().unwrap();
    let ctl = ControllerProcess::start(tmp.path(), 1);
    ctl.wait_probe_ready().await;
    let (_, mut c) = ctl.clients();
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(
            c.create_volume(one_replica(&format!("page-{i}"), 4))
                .await
                .unwrap()
                .into_inner()
                .volume
                .unwrap()
                .volume_id,
        );
    }
    let (all, next) = list_ids(&mut c, 0, "").await;
    ids.sort();
    assert_eq!(all, ids, "every volume, in id order");
    assert!(next.is_empty(), "no token when everything fits");

    // Page through 3 at a time; between pages delete one volume not yet listed, delete one already
    // listed, and add one.
    let (page1, token1) = list_ids(&mut c, 3, "").await;
    assert_eq!(page1.len(), 3);
    assert!(!token1.is_empty());
    let unlisted = all[5].clone();
    let listed = page1[0].clone();
    for id in [&unlisted, &listed] {
        c.delete_volume(csi::DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() })
            .await
            .unwrap();
    }
    let added =
        c.create_volume(one_replica("page-new", 4)).await.unwrap().into_inner().volume.unwrap().volume_id;
    let mut seen: Vec<String> = page1.clone();
    let mut token = token1;
    while !token.is_empty() {
        let (page, next) = list_ids(&mut c, 3, &token).await;
        assert!(page.len() <= 3);
        seen.extend(page);
        token = next;
    }
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no volume listed twice: {seen:?}");
    assert!(!seen.contains(&unlisted), "a volume deleted before its page is not listed");
    for id in &all {
        if id != &unlisted {
            assert!(seen.contains(id), "{id} existed throughout and must be listed");
        }
    }
    // (The new volume is listed if its id sorts after the token it was created behind.)

    // Snapshots page the same way.
    let source = added;
    let mut snaps = BTreeSet::new();
    for i in 0..5 {
        let s = c
            .create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: source.clone(),
                name: format!("page-snap-{i}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
        snaps.insert(s.snapshot_id);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let r = c
            .list_snapshots(csi::ListSnapshotsRequest {
                max_entries: 2,
                starting_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.entries.len() <= 2);
        seen.extend(r.entries.into_iter().map(|e| e.snapshot.unwrap().snapshot_id));
        if r.next_token.is_empty() {
            break;
        }
        token = r.next_token;
    }
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), snaps);
}
