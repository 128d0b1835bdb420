//! Barnacle on a real kube-apiserver (1.20.2, built by deploy/apiserver.sh from Debian's source,
//! with Debian's etcd on loopback):
//! - the chart installs with helm, Barnacle's CRDs accept their sample resources, the RBAC of
//!   each service account allows what its component calls and no more (`kubectl auth can-i`),
//!   and uninstalling removes it all;
//! - the controller's Kubernetes orchestrator and custom-resource store run volumes as pods.
//!
//! No kubelet runs here. The first test checks API objects only; the second runs the pods'
//! containers with a stand-in for the kubelet (`barnacle_tests::k8s::Kubelet`), which starts
//! them as local processes and reports their status to the API server.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::path::Path;
use std::time::{Duration, Instant};

use barnacle_tests::k8s::{ApiServer, FakeNode, Kubelet};
use barnacle_tests::{ControllerProcess, csi_capability, run_ok};
use csi_proto::v1 as csi;

#[test]
fn the_chart_installs_on_a_real_api_server_with_least_privilege_rbac() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let k = ApiServer::start();
    assert!(k.ok(&["version", "--short"]).contains("v1.20.2"));
    // The snapshot CRDs come with a cluster's snapshot controller; here from deploy/schemas.
    k.ok(&["apply", "-f", root.join("deploy/schemas/snapshot.storage.k8s.io.yaml").to_str().unwrap()]);
    k.ok(&[
        "wait",
        "--for=condition=established",
        "--timeout=60s",
        "crd/volumesnapshotclasses.snapshot.storage.k8s.io",
    ]);

    let out = k.helm(&[
        "install",
        "barnacle",
        root.join("charts/barnacle").to_str().unwrap(),
        "--namespace",
        "barnacle",
        "--create-namespace",
    ]);
    assert!(out.status.success(), "helm install: {}", String::from_utf8_lossy(&out.stderr));
    k.ok(&[
        "wait",
        "--for=condition=established",
        "--timeout=60s",
        "crd/volumes.barnacle.dev",
        "crd/snapshots.barnacle.dev",
        "crd/attachments.barnacle.dev",
    ]);
    let driver: serde_json::Value =
        serde_json::from_str(&k.ok(&["get", "csidriver", "csi.barnacle.dev", "-o", "json"])).unwrap();
    assert_eq!(driver["spec"]["attachRequired"], true);
    k.ok(&["-n", "barnacle", "get", "deployment/barnacle-controller", "daemonset/barnacle-node"]);
    let sc: serde_json::Value =
        serde_json::from_str(&k.ok(&["get", "storageclass", "barnacle", "-o", "json"])).unwrap();
    assert_eq!(sc["volumeBindingMode"], "WaitForFirstConsumer");

    // Barnacle's own resources are accepted by the server's schema (structural, with status).
    k.ok(&["apply", "-f", root.join("deploy/samples/records.yaml").to_str().unwrap()]);
    let vols: serde_json::Value =
        serde_json::from_str(&k.ok(&["-n", "barnacle", "get", "volumes.barnacle.dev", "-o", "json"]))
            .unwrap();
    assert_eq!(vols["items"][0]["spec"]["replicas"].as_array().unwrap().len(), 3);
    let bad = k.kubectl(&[
        "-n",
        "barnacle",
        "patch",
        "volumes.barnacle.dev",
        "vol-0123456789abcdef",
        "--type=merge",
        "-p",
        r#"{"spec":{"size":"big"}}"#,
    ]);
    assert!(!bad.status.success(), "the server's schema refuses a size that is not a number");

    // What each component calls, and nothing beyond.
    let controller = "system:serviceaccount:barnacle:barnacle-controller";
    let node = "system:serviceaccount:barnacle:barnacle-node";
    let engine = "system:serviceaccount:barnacle:barnacle-engine";
    let cases: &[(&str, &[&str], bool)] = &[
        (controller, &["create", "persistentvolumes"], true),
        (controller, &["delete", "persistentvolumes"], true),
        (controller, &["update", "persistentvolumeclaims"], true),
        (controller, &["patch", "volumeattachments.storage.k8s.io"], true),
        (controller, &["patch", "volumeattachments.storage.k8s.io", "--subresource=status"], true),
        (controller, &["update", "volumesnapshotcontents.snapshot.storage.k8s.io"], true),
        (controller, &["list", "nodes"], true),
        (controller, &["create", "pods", "-n", "barnacle"], true),
        (controller, &["create", "leases.coordination.k8s.io", "-n", "barnacle"], true),
        (controller, &["update", "volumes.barnacle.dev", "-n", "barnacle"], true),
        (controller, &["update", "volumes.barnacle.dev", "--subresource=status", "-n", "barnacle"], true),
        (controller, &["watch", "configmaps", "-n", "barnacle"], false),
        (controller, &["update", "pods", "-n", "barnacle"], false),
        (controller, &["get", "secrets", "-n", "barnacle"], true),
        (controller, &["create", "pods", "-n", "default"], false),
        (controller, &["list", "secrets", "-n", "barnacle"], false),
        (controller, &["get", "secrets", "-n", "default"], false),
        (controller, &["delete", "nodes"], false),
        (controller, &["create", "clusterrolebindings"], false),
        (controller, &["update", "volumes.barnacle.dev", "-n", "default"], false),
        (node, &["get", "pods"], false),
        (controller, &["update", "volumeattachments.storage.k8s.io", "--subresource=status"], false),
        (node, &["get", "nodes"], false),
        (node, &["create", "persistentvolumes"], false),
        (node, &["get", "volumes.barnacle.dev", "-n", "barnacle"], false),
        (engine, &["get", "volumes.barnacle.dev", "-n", "barnacle"], true),
        (engine, &["update", "volumes.barnacle.dev", "--subresource=status", "-n", "barnacle"], true),
        (engine, &["update", "volumes.barnacle.dev", "-n", "barnacle"], false),
        (engine, &["update", "snapshots.barnacle.dev", "--subresource=status", "-n", "barnacle"], false),
        (engine, &["list", "volumes.barnacle.dev", "-n", "barnacle"], false),
        (engine, &["get", "secrets", "-n", "barnacle"], false),
        (engine, &["create", "pods", "-n", "barnacle"], false),
        (engine, &["get", "volumes.barnacle.dev", "-n", "default"], false),
        (controller, &["patch", "attachments.barnacle.dev", "--subresource=status", "-n", "barnacle"], true),
        (controller, &["get", "configmaps", "-n", "barnacle"], true),
    ];
    let mut wrong = Vec::new();
    for (who, what, allowed) in cases {
        let as_flag = format!("--as={who}");
        let mut args = vec!["auth", "can-i"];
        args.extend_from_slice(what);
        args.push(&as_flag);
        let out = k.kubectl(&args);
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if (answer == "yes") != *allowed {
            wrong.push(format!("{who} {what:?}: {answer}, want {}", if *allowed { "yes" } else { "no" }));
        }
    }
    assert!(wrong.is_empty(), "RBAC is not what the components need:\n{}", wrong.join("\n"));

    let out = k.helm(&["uninstall", "barnacle", "--namespace", "barnacle"]);
    assert!(out.status.success(), "helm uninstall: {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        !k.kubectl(&["get", "csidriver", "csi.barnacle.dev"]).status.success(),
        "uninstall removes the CSIDriver"
    );
    assert!(!k.kubectl(&["-n", "barnacle", "get", "deployment/barnacle-controller"]).status.success());
}

// ---- the Kubernetes orchestrator and the custom-resource store ----

const NS: &str = "barnacle";
const MIB: i64 = 1 << 20;

fn nodes_yaml(nodes: &[FakeNode]) -> String {
    let zones = ["zone-a", "zone-b", "zone-c"];
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    kubernetes.io/hostname: {name}\n    topology.kubernetes.io/zone: {zone}\n\
                 status:\n  conditions:\n  - {{type: Ready, status: \"True\"}}\n  addresses:\n  - {{type: InternalIP, address: {ip}}}\n\
                 \x20 capacity: {{ephemeral-storage: 10Gi}}\n  allocatable: {{ephemeral-storage: 10Gi}}\n---\n",
                name = n.name,
                zone = zones[i % 3],
                ip = n.ip
            )
        })
        .collect()
}

fn get_json(k: &ApiServer, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["-n", NS, "get"];
    a.extend_from_slice(args);
    a.extend(["-o", "json"]);
    serde_json::from_str(&k.ok(&a)).unwrap()
}

fn exists(k: &ApiServer, args: &[&str]) -> bool {
    let mut a = vec!["-n", NS, "get"];
    a.extend_from_slice(args);
    k.kubectl(&a).status.success()
}

/// The volume's pods as (name, component, node, uid).
fn volume_pods(k: &ApiServer, volume_id: &str) -> Vec<(String, String, String, String)> {
    let list = get_json(k, &["pods", "-l", &format!("barnacle.dev/volume={volume_id}")]);
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_owned(),
                p["metadata"]["labels"]["app.kubernetes.io/component"].as_str().unwrap().to_owned(),
                p["spec"]["nodeName"].as_str().unwrap_or_default().to_owned(),
                p["metadata"]["uid"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn wait_for(what: &str, timeout_s: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(timeout_s);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs a CSI call again while the controller answers Unavailable (a standby, or recovering) or
/// Aborted (the reconcile pass holds the volume for a moment), as the CSI sidecars do.
macro_rules! retry {
    ($call:expr) => {{
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            match $call.await {
                Err(s)
                    if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Aborted)
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                other => break other,
            }
        }
    }};
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw", uri];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let out = run_ok("qemu-io", &args);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("fail") && !text.contains("error"), "qemu-io {cmds:?}: {text}");
    text
}

fn controller(root: &Path, name: &str, kubeconfig: &Path) -> ControllerProcess {
    let args = [
        "--orchestrator=kubernetes",
        "--namespace=barnacle",
        "--disks-configmap=barnacle-disks",
        "--image=barnacle:test",
        "--engine-service-account=barnacle-engine",
        "--host-ports=23000-23999",
        "--pod-ready-timeout=60",
        "--leader-election=true",
        "--leader-election-lease=barnacle-controller",
        "--image-pull-secret=regcred",
        "--priority-class=barnacle-data",
    ];
    ControllerProcess::with_args(
        root,
        name,
        vec![],
        args.iter().map(|s| (*s).to_owned()).collect(),
        vec![
            ("KUBECONFIG".to_owned(), kubeconfig.display().to_string()),
            ("POD_NAME".to_owned(), name.to_owned()),
        ],
    )
}

/// CreateVolume makes replica pods and records, ControllerPublishVolume the engine pod (whose
/// NBD export qemu-io writes and reads), a dead replica pod is recreated, a second controller
/// takes over when the leader is killed and rebuilds its view from the API, unpublish fences,
/// and DeleteVolume removes every pod, Secret, record and byte on the nodes. The controller and
/// the engines authenticate as their service accounts, so the chart's RBAC is what allows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_orchestrator_runs_volumes_as_pods_on_a_real_api_server() {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/barnacle");
    let k = ApiServer::start();
    let out = k.helm(&[
        "install",
        "barnacle",
        chart.to_str().unwrap(),
        "--namespace",
        NS,
        "--create-namespace",
        "--set",
        "volumeSnapshotClass.create=false",
        // Node n3 keeps replicas elsewhere; every disk offers 1 GiB.
        "--set",
        "disks.perNode.n3=/srv/disk3",
        "--set",
        "disks.capacity=1Gi",
    ]);
    assert!(out.status.success(), "helm install: {}", String::from_utf8_lossy(&out.stderr));
    k.ok(&["wait", "--for=condition=established", "--timeout=60s", "crd/volumes.barnacle.dev"]);

    let root = tempfile::tempdir().unwrap();
    let nodes: Vec<FakeNode> = (1..=3)
        .map(|i| FakeNode {
            name: format!("n{i}"),
            ip: format!("127.0.0.{}", 10 + i),
            root: root.path().join(format!("n{i}")),
        })
        .collect();
    k.apply(&nodes_yaml(&nodes));
    k.apply("apiVersion: scheduling.k8s.io/v1\nkind: PriorityClass\nmetadata:\n  name: barnacle-data\nvalue: 1000000\n");
    let (ctl_kc, engine_kc) =
        (root.path().join("controller.kubeconfig"), root.path().join("engine.kubeconfig"));
    k.write_kubeconfig(&ctl_kc, "controller-token");
    k.write_kubeconfig(&engine_kc, "engine-token");
    let kubelet = Kubelet::start(k.client().await, NS, nodes.clone(), "barnacle-engine", engine_kc);

    let mut leader = controller(root.path(), "ctl-a", &ctl_kc);
    let (_, mut c) = leader.clients();

    // CreateVolume: three replica pods on three nodes, the record, its membership, its token.
    let req = csi::CreateVolumeRequest {
        name: "pvc-k8s-1".into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: 64 * MIB, limit_bytes: 0 }),
        volume_capabilities: vec![csi_capability(true, "")],
        parameters: [("replicas".to_owned(), "3".to_owned())].into(),
        ..Default::default()
    };
    let vol = retry!(c.create_volume(req.clone()))
        .unwrap_or_else(|s| panic!("CreateVolume: {s:?}\n{}", leader.log_text()))
        .into_inner()
        .volume
        .unwrap();
    let vid = vol.volume_id.clone();
    let pods = volume_pods(&k, &vid);
    let replicas: Vec<_> = pods.iter().filter(|p| p.1 == "replica").collect();
    assert_eq!(replicas.len(), 3, "{pods:?}");
    let mut on: Vec<&str> = replicas.iter().map(|p| p.2.as_str()).collect();
    on.sort_unstable();
    assert_eq!(on, ["n1", "n2", "n3"], "one replica per node");
    assert!(!pods.iter().any(|p| p.1 == "wipe"), "wipe pods are removed once done: {pods:?}");
    // A first create has nothing to wipe: no wipe pod ever ran (the kubelet stand-in keeps a log
    // per pod it ran).
    let wipes_run = |vid: &str| -> usize {
        nodes
            .iter()
            .filter_map(|n| std::fs::read_dir(n.root.join("logs")).ok())
            .flat_map(|d| d.flatten())
            .filter(|e| {
                let f = e.file_name().to_string_lossy().into_owned();
                f.starts_with(vid) && f.ends_with("-wipe.log")
            })
            .count()
    };
    assert_eq!(wipes_run(&vid), 0, "a first create runs no wipe pods");
    let spec = &get_json(&k, &["pod", &replicas[0].0])["spec"];
    assert_eq!(spec["priorityClassName"], "barnacle-data", "{spec}");
    assert_eq!(spec["imagePullSecrets"][0]["name"], "regcred");
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["containers"][0]["securityContext"]["capabilities"]["add"][0], "SYS_RESOURCE");
    let cr = get_json(&k, &["volumes.barnacle.dev", &vid]);
    assert_eq!(cr["spec"]["name"], "pvc-k8s-1");
    assert_eq!(cr["spec"]["state"], "ready");
    let m = &cr["status"]["membership"];
    assert_eq!(m["replicas"].as_array().unwrap().len(), 3, "{cr}");
    assert!(m["replicas"].as_array().unwrap().iter().all(|r| r["state"] == "healthy"), "{cr}");
    assert!(exists(&k, &["secret", &format!("{vid}-token")]), "the token is a Secret");
    assert!(!k.ok(&["-n", NS, "get", "volumes.barnacle.dev", &vid, "-o", "yaml"]).contains("token:"));
    let disk = |n: &FakeNode| n.path(if n.name == "n3" { "/srv/disk3" } else { "/var/lib/barnacle/disk" });
    for n in &nodes {
        let held = std::fs::read_dir(disk(n)).map(|d| d.count()).unwrap_or(0);
        assert_eq!(held, 1, "{}: one replica directory in {}", n.name, disk(n).display());
    }
    // The disks' capacity comes from the ConfigMap: a thick volume larger than 1 GiB fits nowhere.
    let mut thick = req.clone();
    thick.name = "pvc-too-big".into();
    thick.capacity_range = Some(csi::CapacityRange { required_bytes: 2 << 30, limit_bytes: 0 });
    thick.parameters.insert("thin".into(), "false".into());
    let err = retry!(c.create_volume(thick.clone())).unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    // Repeating the create returns the same volume.
    let again = retry!(c.create_volume(req.clone())).unwrap().into_inner().volume.unwrap();
    assert_eq!(again.volume_id, vid);

    // A snapshot is a Snapshot resource, ready.
    let snap = retry!(c.create_snapshot(csi::CreateSnapshotRequest {
        source_volume_id: vid.clone(),
        name: "snap-k8s-1".into(),
        ..Default::default()
    }))
    .unwrap()
    .into_inner()
    .snapshot
    .unwrap();
    let s = get_json(&k, &["snapshots.barnacle.dev", &snap.snapshot_id]);
    assert_eq!(s["spec"]["volume_id"], vid.as_str());
    assert_eq!(s["status"]["ready"], true);
    retry!(c.delete_snapshot(csi::DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        ..Default::default()
    }))
    .unwrap();
    assert!(!exists(&k, &["snapshots.barnacle.dev", &snap.snapshot_id]));

    // ControllerPublishVolume: the engine pod on the node, under the engine service account.
    let publish = csi::ControllerPublishVolumeRequest {
        volume_id: vid.clone(),
        node_id: "n1".into(),
        volume_capability: Some(csi_capability(true, "")),
        ..Default::default()
    };
    let ctx = retry!(c.controller_publish_volume(publish.clone()))
        .unwrap_or_else(|s| panic!("publish: {s:?}\n{}", leader.log_text()))
        .into_inner()
        .publish_context;
    let engine_pod = format!("{vid}-g1-engine");
    let pod = get_json(&k, &["pod", &engine_pod]);
    assert_eq!(pod["spec"]["nodeName"], "n1");
    assert_eq!(pod["spec"]["serviceAccountName"], "barnacle-engine");
    assert_eq!(get_json(&k, &["attachments.barnacle.dev", &vid])["status"]["engine_ready"], true);
    let socket = nodes[0].path(&ctx["nbdSocket"]);
    let uri = format!("nbd+unix:///{}?socket={}", ctx["exportName"], socket.display());
    qemu_io(&uri, &["write -P 0x5a 0 1M", "write -P 0xa5 60M 1M"]);
    qemu_io(&uri, &["read -P 0x5a 0 1M", "read -P 0xa5 60M 1M"]);
    let m = &get_json(&k, &["volumes.barnacle.dev", &vid])["status"]["membership"];
    assert!(m["epoch"].as_u64().unwrap() >= 1 && m["engine_id"].is_string(), "the engine took an epoch: {m}");

    // A replica pod that dies is recreated, and the engine brings the replica back in.
    let epoch_before = m["epoch"].as_u64().unwrap();
    let r2 = volume_pods(&k, &vid).into_iter().find(|p| p.0 == format!("{vid}-r2")).unwrap();
    k.ok(&["-n", NS, "delete", "pod", &r2.0, "--grace-period=0", "--force"]);
    wait_for("the replica pod to be recreated", 60, || {
        volume_pods(&k, &vid).iter().any(|p| p.0 == r2.0 && p.3 != r2.3)
    })
    .await;
    qemu_io(&uri, &["write -P 0x77 8M 1M", "read -P 0x5a 0 1M", "read -P 0x77 8M 1M"]);
    wait_for("all three replicas to be healthy again after an ejection", 90, || {
        let m = &get_json(&k, &["volumes.barnacle.dev", &vid])["status"]["membership"];
        m["epoch"].as_u64().unwrap() > epoch_before
            && m["replicas"].as_array().unwrap().iter().all(|r| r["state"] == "healthy")
    })
    .await;

    // A snapshot of the published volume, and a volume restored from it (the restore example):
    // clone replicas beside the source's, on ports of their own, with the data.
    let snap = retry!(c.create_snapshot(csi::CreateSnapshotRequest {
        source_volume_id: vid.clone(),
        name: "snap-k8s-2".into(),
        ..Default::default()
    }))
    .unwrap_or_else(|s| panic!("snapshot: {s:?}\n{}", leader.log_text()))
    .into_inner()
    .snapshot
    .unwrap();
    let mut restore = req.clone();
    restore.name = "pvc-k8s-restored".into();
    restore.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource { snapshot_id: snap.snapshot_id.clone() },
        )),
    });
    let restored = retry!(c.create_volume(restore.clone()))
        .unwrap_or_else(|s| panic!("restore: {s:?}\n{}", leader.log_text()))
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let rcr = get_json(&k, &["volumes.barnacle.dev", &restored]);
    let src_ports: Vec<_> = get_json(&k, &["volumes.barnacle.dev", &vid])["spec"]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["node"].clone(), r["port"].clone()))
        .collect();
    for r in rcr["spec"]["replicas"].as_array().unwrap() {
        assert!(
            !src_ports.contains(&(r["node"].clone(), r["port"].clone())),
            "a port pair of its own: {rcr}"
        );
    }
    assert_eq!(volume_pods(&k, &restored).len(), 3);
    let mut publish_restored = publish.clone();
    publish_restored.volume_id = restored.clone();
    publish_restored.node_id = "n2".into();
    let rctx = retry!(c.controller_publish_volume(publish_restored.clone()))
        .unwrap_or_else(|s| panic!("publish restored: {s:?}\n{}", leader.log_text()))
        .into_inner()
        .publish_context;
    let ruri =
        format!("nbd+unix:///{}?socket={}", rctx["exportName"], nodes[1].path(&rctx["nbdSocket"]).display());
    qemu_io(&ruri, &["read -P 0x5a 0 1M", "read -P 0x77 8M 1M", "read -P 0xa5 60M 1M"]);
    retry!(c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: restored.clone(),
        node_id: "n2".into(),
        ..Default::default()
    }))
    .unwrap();
    retry!(c.delete_volume(csi::DeleteVolumeRequest { volume_id: restored.clone(), ..Default::default() }))
        .unwrap();
    retry!(c.delete_snapshot(csi::DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        ..Default::default()
    }))
    .unwrap();
    wait_for("the restored volume's pods to go", 30, || volume_pods(&k, &restored).is_empty()).await;

    // Online expansion reaches the replica pods and the engine.
    retry!(c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
        volume_id: vid.clone(),
        capacity_range: Some(csi::CapacityRange { required_bytes: 96 * MIB, limit_bytes: 0 }),
        volume_capability: Some(csi_capability(true, "")),
        ..Default::default()
    }))
    .unwrap_or_else(|s| panic!("expand: {s:?}\n{}", leader.log_text()));
    let size = String::from_utf8(run_ok("nbdinfo", &["--size", &uri]).stdout).unwrap();
    assert_eq!(size.trim(), (96 * MIB).to_string());
    assert_eq!(get_json(&k, &["volumes.barnacle.dev", &vid])["spec"]["size"], 96 * MIB);
    qemu_io(&uri, &["write -P 0x33 90M 1M", "read -P 0x33 90M 1M", "read -P 0x5a 0 1M"]);

    // A standby controller waits for the lease; when the leader dies it takes over and rebuilds
    // its view from the API: the volume, its publication and its engine.
    let standby = controller(root.path(), "ctl-b", &ctl_kc);
    let (mut sid, mut sc) = standby.clients();
    assert_eq!(
        sid.probe(csi::ProbeRequest {}).await.unwrap().into_inner().ready,
        Some(true),
        "a standby is healthy"
    );
    let mut other = req.clone();
    other.name = "pvc-k8s-2".into();
    let refused = sc.create_volume(other).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "a standby changes nothing: {refused:?}");
    let lease = get_json(&k, &["lease", "barnacle-controller"]);
    assert!(lease["spec"]["holderIdentity"].as_str().unwrap().starts_with("ctl-a"), "{lease}");
    let before: Vec<_> = volume_pods(&k, &vid).into_iter().map(|p| p.3).collect();
    leader.kill();
    let holder = || get_json(&k, &["lease", "barnacle-controller"])["spec"]["holderIdentity"].clone();
    wait_for("the standby to take the lease", 40, || holder().as_str().unwrap().starts_with("ctl-b")).await;
    let listed = retry!(sc.list_volumes(csi::ListVolumesRequest::default()))
        .unwrap_or_else(|s| panic!("ListVolumes on the new leader: {s:?}\n{}", standby.log_text()))
        .into_inner();
    let entry = listed.entries.iter().find(|e| e.volume.as_ref().unwrap().volume_id == vid).unwrap();
    assert_eq!(entry.status.as_ref().unwrap().published_node_ids, ["n1"]);
    let got = retry!(sc.controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: vid.clone() }))
        .unwrap_or_else(|s| panic!("ControllerGetVolume: {s:?}\n{}", standby.log_text()))
        .into_inner();
    assert_eq!(got.status.unwrap().published_node_ids, ["n1"]);
    let after: Vec<_> = volume_pods(&k, &vid).into_iter().map(|p| p.3).collect();
    assert_eq!(before, after, "the new leader adopts the running pods");
    qemu_io(&uri, &["read -P 0x5a 0 1M", "read -P 0x77 8M 1M"]);
    // The repeated publish is the same publication.
    let ctx2 = retry!(sc.controller_publish_volume(publish.clone())).unwrap().into_inner().publish_context;
    assert_eq!(ctx2["nbdSocket"], ctx["nbdSocket"]);

    // Unpublish: the engine pod goes, and the volume is fenced at a new epoch.
    let epoch =
        get_json(&k, &["volumes.barnacle.dev", &vid])["status"]["membership"]["epoch"].as_u64().unwrap();
    retry!(sc.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: vid.clone(),
        node_id: "n1".into(),
        ..Default::default()
    }))
    .unwrap_or_else(|s| panic!("unpublish: {s:?}\n{}", standby.log_text()));
    wait_for("the engine pod to go", 30, || !exists(&k, &["pod", &engine_pod])).await;
    assert!(!exists(&k, &["attachments.barnacle.dev", &vid]));
    let m = &get_json(&k, &["volumes.barnacle.dev", &vid])["status"]["membership"];
    assert!(m["epoch"].as_u64().unwrap() > epoch && m["engine_id"].is_null(), "fenced: {m}");

    // DeleteVolume removes every pod, the Secret, the records, and the data on the nodes.
    retry!(sc.delete_volume(csi::DeleteVolumeRequest { volume_id: vid.clone(), ..Default::default() }))
        .unwrap_or_else(|s| panic!("delete: {s:?}\n{}", standby.log_text()));
    wait_for("the volume's pods to go", 30, || volume_pods(&k, &vid).is_empty()).await;
    assert!(!exists(&k, &["volumes.barnacle.dev", &vid]));
    assert!(!exists(&k, &["secret", &format!("{vid}-token")]));
    for n in &nodes {
        let held: Vec<_> = std::fs::read_dir(disk(n)).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(held.is_empty(), "{}: {held:?} left in {}", n.name, disk(n).display());
    }
    assert_eq!(wipes_run(&vid), 3, "a wipe pod per replica removed the data");

    // Without the disks ConfigMap the controller cannot place anything: Probe says why.
    k.ok(&["-n", NS, "delete", "configmap", "barnacle-disks"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let failed = loop {
        match sid.probe(csi::ProbeRequest {}).await {
            Err(s) => break s,
            Ok(_) => {
                assert!(Instant::now() < deadline, "Probe stayed healthy without the disks ConfigMap");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    assert_eq!(failed.code(), tonic::Code::FailedPrecondition, "{failed:?}");
    assert!(failed.message().contains("barnacle-disks"), "{failed:?}");
    drop(standby);
    kubelet.stop().await;
}

/// The membership authority on the API server (DESIGN rule 1): a record round-trips whole
/// through the CRD's status schema (nothing pruned), a compare-and-set against a stale version
/// is refused, and of concurrent writers from the same version exactly one wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_membership_authority_is_a_compare_and_set_on_the_volume_resource() {
    use barnacle_engine::authority::{
        AuthorityError, Membership, MembershipAuthority, ReplicaRecord, ReplicaState,
    };
    use barnacle_engine::k8s::KubeAuthority;

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let k = ApiServer::start();
    k.ok(&["apply", "-f", root.join("charts/barnacle/crds/barnacle.dev.yaml").to_str().unwrap()]);
    k.ok(&["wait", "--for=condition=established", "--timeout=60s", "crd/volumes.barnacle.dev"]);
    k.ok(&["create", "namespace", NS]);
    k.ok(&["apply", "-f", root.join("deploy/samples/records.yaml").to_str().unwrap()]);
    let vid = "vol-0123456789abcdef";
    let client = k.client().await;
    let rt = tokio::runtime::Handle::current();
    let authority = |c: &kube::Client| KubeAuthority::new(c.clone(), NS, vid, rt.clone());
    let a = authority(&client);
    let blocking =
        |f: Box<dyn FnOnce() -> Result<u64, AuthorityError> + Send>| tokio::task::spawn_blocking(f);

    // The sample's status is not written by a create (status subresource): no record yet.
    let a2 = a.clone();
    assert!(tokio::task::spawn_blocking(move || a2.load()).await.unwrap().unwrap().is_none());
    let record = Membership {
        epoch: 4,
        engine_id: Some(uuid::Uuid::new_v4()),
        replicas: vec![
            ReplicaRecord {
                id: "r0".into(),
                addr: "127.0.0.11:23000".into(),
                state: ReplicaState::Healthy,
                store_id: Some(uuid::Uuid::new_v4()),
                tracked_since: 2,
                missed_regions: vec![],
            },
            ReplicaRecord {
                id: "r1".into(),
                addr: "127.0.0.12:23000".into(),
                state: ReplicaState::Ejected { epoch: 3 },
                store_id: None,
                tracked_since: 0,
                missed_regions: vec![0, 4 << 20],
            },
        ],
    };
    let (a2, r2) = (a.clone(), record.clone());
    let v1 = blocking(Box::new(move || a2.compare_and_set(None, &r2))).await.unwrap().unwrap();
    let a2 = a.clone();
    let loaded = tokio::task::spawn_blocking(move || a2.load()).await.unwrap().unwrap().unwrap();
    assert_eq!(loaded.version, v1);
    assert_eq!(loaded.membership, record, "the record survives the server's schema whole");

    // A stale expectation loses.
    let (a2, r2) = (a.clone(), record.clone());
    let stale = blocking(Box::new(move || a2.compare_and_set(None, &r2))).await.unwrap();
    assert!(matches!(stale, Err(AuthorityError::Conflict { found: Some(v), .. }) if v == v1), "{stale:?}");

    // Changes of the spec meanwhile (the controller's) do not make a writer lose: it reads again.
    let volumes: kube::Api<kube::api::DynamicObject> =
        kube::Api::namespaced_with(k.client().await, NS, &barnacle_engine::k8s::volume_resource());
    let spec_writer = tokio::spawn(async move {
        for i in 0..200u64 {
            let patch = serde_json::json!({ "spec": { "created_unix": 1_795_000_000 + i } });
            let pp = kube::api::PatchParams::default();
            volumes.patch(vid, &pp, &kube::api::Patch::Merge(&patch)).await.unwrap();
        }
    });
    let mut v2 = v1;
    while !spec_writer.is_finished() {
        let (a2, mut r2) = (a.clone(), record.clone());
        r2.epoch = 5 + v2;
        let next = blocking(Box::new(move || a2.compare_and_set(Some(v2), &r2))).await.unwrap().unwrap();
        assert_eq!(next, v2 + 1);
        v2 = next;
    }
    spec_writer.await.unwrap();
    assert!(v2 > v1 + 2, "writes went on while the spec changed");

    // An engine of another attachment generation than the record's (3 in the sample) is refused:
    // a deposed engine restarted on a cut-off node cannot take the volume back.
    let (stale, r2) = (authority(&client).for_generation(2), record.clone());
    let refused = blocking(Box::new(move || stale.compare_and_set(Some(v2), &r2))).await.unwrap();
    assert!(matches!(refused, Err(AuthorityError::Conflict { .. })), "{refused:?}");
    let (current, r2) = (authority(&client).for_generation(3), record.clone());
    let v3 = blocking(Box::new(move || current.compare_and_set(Some(v2), &r2))).await.unwrap().unwrap();
    assert_eq!(v3, v2 + 1);
    let v2 = v3;

    // Concurrent writers from the same version, each with its own client: exactly one wins.
    let mut version = v2;
    for round in 0..5u64 {
        let mut tasks = Vec::new();
        for w in 0..4u64 {
            let a2 = authority(&k.client().await);
            let mut r2 = record.clone();
            r2.epoch = 10 + round * 10 + w;
            tasks.push(blocking(Box::new(move || a2.compare_and_set(Some(version), &r2))));
        }
        let results: Vec<_> =
            futures::future::join_all(tasks).await.into_iter().map(|r| r.unwrap()).collect();
        let wins: Vec<u64> = results.iter().filter_map(|r| r.as_ref().ok().copied()).collect();
        assert_eq!(wins.len(), 1, "round {round}: {results:?}");
        assert!(results.iter().all(|r| r.is_ok() || matches!(r, Err(AuthorityError::Conflict { .. }))));
        version = wins[0];
    }
    let a2 = a.clone();
    let last = tokio::task::spawn_blocking(move || a2.load()).await.unwrap().unwrap().unwrap();
    assert_eq!(last.version, version);
}
