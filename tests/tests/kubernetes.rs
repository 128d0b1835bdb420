//! Barnacle's API objects on a bare kube-apiserver (1.20.2, built by deploy/k8s-build.sh from
//! Debian's source, with Debian's etcd on loopback):
//! - the chart installs with helm, Barnacle's CRDs accept their sample resources, the RBAC of
//!   each service account allows what its component calls and no more (`kubectl auth can-i`),
//!   and uninstalling removes it all;
//! - the membership authority is a compare-and-set on the Volume resource.
//!
//! Barnacle running on real kubelets is `kubernetes_cluster.rs`.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::path::Path;

use barnacle_tests::k8s::ApiServer;

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

const NS: &str = "barnacle";

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
        // The settings too: a schema without them would prune them silently.
        settings: Some(barnacle_engine::authority::VolumeSettings {
            min_healthy: 2,
            rebuild_mib_per_sec: 50,
            max_iops: 300,
            max_mib_per_sec: 0,
        }),
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
