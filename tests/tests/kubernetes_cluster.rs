//! Barnacle on a real Kubernetes 1.20.2 cluster of three nodes: real kubelets running real
//! containers (containerd + runc), the chart installed with helm from `charts/barnacle` with values
//! only, Barnacle's image built by `deploy/image.sh` without a registry, and the examples applied
//! as a user applies them.
//!
//! What is not real, and why: the kubernetes-csi controller sidecars (provisioner, attacher,
//! snapshotter with the snapshot controller, resizer) are in no registry this project can use.
//! The chart's controller pod runs the pause image in their place (values only), and
//! `barnacle_tests::sidecars` plays their roles through the Kubernetes API against the
//! controller's real CSI socket. The snapshot CRDs come from `deploy/schemas` (a cluster's
//! snapshot controller brings its own). The workloads' image is Debian's busybox as
//! `localhost/busybox:1.35` in place of the examples' `busybox:1.36`. Everything on the nodes is
//! the real kubelets': plugin registration, NodeStage, NodePublish, NodeExpand, unpublish and
//! unstage.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use barnacle_tests::cluster::{Cluster, enter_network, image};
use barnacle_tests::sidecars::Sidecars;

const NS: &str = "barnacle";
const DRIVER: &str = "csi.barnacle.dev";
const MIN: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// An example manifest, with the workload image this machine has.
fn example(name: &str) -> String {
    std::fs::read_to_string(repo().join("examples").join(name))
        .unwrap()
        .replace("image: busybox:1.36", "image: localhost/busybox:1.35")
}

fn phase(c: &Cluster, pod: &str) -> String {
    let out = c.kubectl(&["get", "pod", pod, "-o", "jsonpath={.status.phase}"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn running(c: &Cluster, pod: &str) -> bool {
    phase(c, pod) == "Running"
}

fn exec(c: &Cluster, pod: &str, script: &str) -> String {
    c.ok(&["exec", pod, "--", "sh", "-c", script])
}

/// Barnacle's volume resources: (id, PV name from the provisioner's labels).
fn volumes(c: &Cluster) -> Vec<serde_json::Value> {
    c.json(&["-n", NS, "get", "volumes.barnacle.dev"])["items"].as_array().cloned().unwrap_or_default()
}

fn volume_of(c: &Cluster, pvc: &str) -> String {
    let pv = c.ok(&["get", "pvc", pvc, "-o", "jsonpath={.spec.volumeName}"]);
    c.ok(&["get", "pv", &pv, "-o", "jsonpath={.spec.csi.volumeHandle}"])
}

/// The volume's pods as (name, component, node).
fn volume_pods(c: &Cluster, vid: &str) -> Vec<(String, String, String)> {
    c.json(&["-n", NS, "get", "pods", "-l", &format!("barnacle.dev/volume={vid}")])["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_owned(),
                p["metadata"]["labels"]["app.kubernetes.io/component"].as_str().unwrap().to_owned(),
                p["spec"]["nodeName"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn all_healthy(c: &Cluster, vid: &str) -> bool {
    let v = c.json(&["-n", NS, "get", "volumes.barnacle.dev", vid]);
    let r = v["status"]["membership"]["replicas"].as_array().cloned().unwrap_or_default();
    r.len() == 3 && r.iter().all(|r| r["state"] == "healthy")
}

fn node_of(c: &Cluster, pod: &str) -> String {
    c.ok(&["get", "pod", pod, "-o", "jsonpath={.spec.nodeName}"])
}

#[test]
fn barnacle_on_a_real_three_node_cluster() {
    let c = Cluster::start();
    enter_network();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (tar, tag) = image();
    c.import(&tar, "barnacle");
    c.ok(&["apply", "-f", repo().join("deploy/schemas/snapshot.storage.k8s.io.yaml").to_str().unwrap()]);
    c.ok(&[
        "wait",
        "--for=condition=established",
        "--timeout=60s",
        "crd/volumesnapshots.snapshot.storage.k8s.io",
    ]);

    // The README's install, with this machine's image and without the sidecars' images.
    let chart = repo().join("charts/barnacle");
    let mut install: Vec<String> = [
        "install",
        "barnacle",
        chart.to_str().unwrap(),
        "--namespace",
        NS,
        "--create-namespace",
        "--set",
        "image.repository=localhost/barnacle",
        "--set",
        &format!("image.tag={tag}"),
        "--set",
        "image.pullPolicy=Never",
        "--set",
        "disks.capacity=8Gi",
        // This host's root lacks CAP_SYS_RESOURCE: no container may ask for it.
        "--set",
        "dataPlane.ioFlusherCapability=false",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    for s in ["provisioner", "attacher", "snapshotter", "resizer"] {
        install.extend(["--set".to_owned(), format!("sidecars.{s}=localhost/pause:3.2")]);
    }
    let args: Vec<&str> = install.iter().map(String::as_str).collect();
    let out = c.helm(&args);
    assert!(out.status.success(), "helm install: {}", String::from_utf8_lossy(&out.stderr));

    // /var/lib/barnacle is on a private mount on these nodes (no systemd): the node plugin's
    // init container says so, with the command to run, and the plugin does not start.
    let node_pods = || -> Vec<String> {
        c.json(&["-n", NS, "get", "pods", "-l", "app.kubernetes.io/component=node"])["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
            .collect()
    };
    c.wait_for("the node plugins' host check to fail", 3 * MIN, || {
        let pods = node_pods();
        pods.len() == 3
            && pods.iter().all(|p| {
                let log = c.kubectl(&["-n", NS, "logs", p, "-c", "host-check"]);
                String::from_utf8_lossy(&log.stdout).contains("which is not a shared mount")
            })
    });
    let log = c.ok(&["-n", NS, "logs", &node_pods()[0], "-c", "host-check"]);
    assert!(log.contains("mount --make-shared /var/lib/barnacle"), "{log}");
    assert!(log.contains("node.makeHostPathShared=true"), "{log}");
    // With the value set, the plugin makes the path a shared mount itself and starts.
    let out = c.helm(&[
        "upgrade",
        "barnacle",
        chart.to_str().unwrap(),
        "-n",
        NS,
        "--reuse-values",
        "--set",
        "node.makeHostPathShared=true",
    ]);
    assert!(out.status.success(), "helm upgrade: {}", String::from_utf8_lossy(&out.stderr));
    c.ok(&["-n", NS, "rollout", "status", "daemonset/barnacle-node", "--timeout=300s"]);
    c.ok(&["-n", NS, "rollout", "status", "deployment/barnacle-controller", "--timeout=300s"]);
    for i in 1..=3 {
        let shared = c
            .node_mounts(i)
            .lines()
            .any(|l| l.split(' ').nth(4) == Some("/var/lib/barnacle") && l.contains(" shared:"));
        assert!(shared, "node{i}: /var/lib/barnacle is not a shared mount:\n{}", c.node_mounts(i));
    }

    // Every kubelet registered the driver (a kubelet before 1.26 sends the socket path as
    // :authority) and learned its topology from NodeGetInfo.
    c.wait_for("CSINodes with the driver", 2 * MIN, || {
        (1..=3).all(|i| {
            let n = c.kubectl(&["get", "csinode", &format!("node{i}"), "-o", "json"]);
            let v: serde_json::Value = serde_json::from_slice(&n.stdout).unwrap_or_default();
            v["spec"]["drivers"].as_array().is_some_and(|d| {
                d.iter().any(|d| {
                    d["name"] == DRIVER
                        && d["nodeID"] == format!("node{i}").as_str()
                        && d["topologyKeys"]
                            .as_array()
                            .is_some_and(|k| k.iter().any(|k| k == "topology.barnacle.dev/node"))
                })
            })
        })
    });

    let client = rt.block_on(c.client());
    let dirs: HashMap<String, PathBuf> = (1..=3).map(|i| (format!("node{i}"), c.node_dir(i))).collect();
    let sidecars = rt.block_on(async { Sidecars::start(client, DRIVER, NS, dirs) });
    let state = |what: &str| format!("{what}\nsidecars:\n{}", sidecars.tail());

    // The StatefulSet example: two pods, each with a volume of three replicas on three nodes.
    c.apply(&example("statefulset.yaml"));
    c.wait_for(&state("web-0 and web-1 running"), 6 * MIN, || running(&c, "web-0") && running(&c, "web-1"));
    for (pod, pvc) in [("web-0", "data-web-0"), ("web-1", "data-web-1")] {
        let vid = volume_of(&c, pvc);
        let pods = volume_pods(&c, &vid);
        let mut replica_nodes: Vec<&str> =
            pods.iter().filter(|p| p.1 == "replica").map(|p| p.2.as_str()).collect();
        replica_nodes.sort_unstable();
        assert_eq!(replica_nodes, ["node1", "node2", "node3"], "{vid}: {pods:?}");
        let engine: Vec<_> = pods.iter().filter(|p| p.1 == "engine").collect();
        assert_eq!(engine.len(), 1, "{pods:?}");
        assert_eq!(engine[0].2, node_of(&c, pod), "the engine runs on the pod's node");
        exec(&c, pod, &format!("echo hello from {pod} > /data/index.html && sync"));
        assert_eq!(exec(&c, pod, "cat /data/index.html").trim(), format!("hello from {pod}"));
        assert!(all_healthy(&c, &vid), "{vid}");
    }
    // Served over the pod network from the volume: web-1 fetches web-0's page.
    let ip0 = c.ok(&["get", "pod", "web-0", "-o", "jsonpath={.status.podIP}"]);
    assert_eq!(exec(&c, "web-1", &format!("wget -qO- http://{ip0}/index.html")).trim(), "hello from web-0");

    // A replica pod deleted: recreated, ejected and rebuilt while web-0 keeps writing.
    let vid0 = volume_of(&c, "data-web-0");
    c.ok(&["-n", NS, "delete", "pod", &format!("{vid0}-r2"), "--wait=false"]);
    exec(
        &c,
        "web-0",
        "dd if=/dev/urandom of=/data/blob bs=1M count=16 2>/dev/null && sync && sha256sum /data/blob > /data/blob.sum",
    );
    c.wait_for("the replica to be rebuilt", 3 * MIN, || {
        let v = c.json(&["-n", NS, "get", "volumes.barnacle.dev", &vid0]);
        v["status"]["membership"]["epoch"].as_u64().unwrap_or(0) > 1 && all_healthy(&c, &vid0)
    });

    // The volume's attributes class changed while web-0 uses it (the resizer's part played, see
    // barnacle_tests::sidecars): 3 → 2 replicas, a replica pod goes; then 3 again, a new replica
    // (a new id) is placed, rebuilt and healthy. web-0's data stays whole throughout.
    // With two replicas, one replica's node goes NotReady (its kubelet frozen) for good: after
    // the class's replicaReplenishAfter the third node gets a replacement, and once the node is
    // back its old replica is wiped.
    for (class, replicas, extra) in
        [("two-replicas", 2, ", replicaReplenishAfter: \"5s\""), ("three-replicas", 3, "")]
    {
        c.apply(&format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {class}, namespace: default}}\ndata: {{replicas: \"{replicas}\"{extra}}}\n"
        ));
        c.ok(&[
            "annotate",
            "pvc",
            "data-web-0",
            &format!("{}={class}", barnacle_tests::sidecars::VAC_ANNOTATION),
            "--overwrite",
        ]);
        c.wait_for(&format!("data-web-0 to have class {class}"), 3 * MIN, || {
            c.ok(&["get", "pvc", "data-web-0", "-o", "json"])
                .contains(&format!("\"{}\": \"{class}\"", barnacle_tests::sidecars::CURRENT_VAC_ANNOTATION))
        });
        c.wait_for(&format!("{replicas} healthy replicas"), 3 * MIN, || {
            let v = c.json(&["-n", NS, "get", "volumes.barnacle.dev", &vid0]);
            let r = v["status"]["membership"]["replicas"].as_array().cloned().unwrap_or_default();
            let pods = volume_pods(&c, &vid0).iter().filter(|p| p.1 == "replica").count();
            r.len() == replicas && pods == replicas && r.iter().all(|r| r["state"] == "healthy")
        });
        exec(&c, "web-0", "sha256sum -c /data/blob.sum");
        if replicas == 2 {
            a_lost_node_s_replica_is_replaced(&c, &vid0, &node_of(&c, "web-0"));
            exec(&c, "web-0", "sha256sum -c /data/blob.sum");
        }
    }
    let ids: Vec<String> = c.json(&["-n", NS, "get", "volumes.barnacle.dev", &vid0])["spec"]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(ids.contains(&"r3".to_owned()), "the new replica has a new id: {ids:?}");

    // web-0 deleted: its replacement mounts the same volume and finds the file.
    let node0 = node_of(&c, "web-0");
    c.ok(&["delete", "pod", "web-0", "--wait=true", "--timeout=180s"]);
    c.wait_for(&state("web-0 back"), 4 * MIN, || running(&c, "web-0"));
    assert_eq!(exec(&c, "web-0", "cat /data/index.html").trim(), "hello from web-0");
    exec(&c, "web-0", "sha256sum -c /data/blob.sum");
    eprintln!("web-0 ran on {node0}, now on {}", node_of(&c, "web-0"));

    // The controller pod replaced: the new one leads, adopts the volumes, and serves on.
    let old = c.ok(&[
        "-n",
        NS,
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/component=controller",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]);
    c.ok(&["-n", NS, "delete", "pod", &old, "--wait=true", "--timeout=120s"]);
    c.ok(&["-n", NS, "rollout", "status", "deployment/barnacle-controller", "--timeout=300s"]);

    // A VolumeSnapshot of data-web-0, restored into a new PVC that a pod mounts.
    c.apply(&example("snapshot.yaml"));
    c.wait_for(&state("the snapshot to be ready"), 4 * MIN, || {
        c.ok(&["get", "volumesnapshot", "web-data-0-snap", "-o", "jsonpath={.status.readyToUse}"]) == "true"
    });
    c.apply(&example("restore.yaml"));
    c.apply(&pod_yaml("restored", "web-data-0-restored", false));
    c.wait_for(&state("the restored volume's pod"), 6 * MIN, || running(&c, "restored"));
    assert_eq!(exec(&c, "restored", "cat /data/index.html").trim(), "hello from web-0");
    exec(&c, "restored", "cd /data && sha256sum -c blob.sum");

    // Online expansion of an xfs volume, seen by df in the pod.
    c.apply(XFS_CLASS);
    c.apply(&pvc_yaml("grow", "barnacle-xfs", "1Gi", false));
    c.apply(&pod_yaml("grower", "grow", false));
    c.wait_for(&state("the xfs volume's pod"), 6 * MIN, || running(&c, "grower"));
    let kib = |c: &Cluster| -> u64 {
        let df = exec(c, "grower", "df -k /data | tail -1");
        df.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
    };
    let before = kib(&c);
    assert!(before > 900_000 && before < 1_100_000, "df before: {before} KiB");
    exec(&c, "grower", "echo before-growth > /data/keep && sync");
    c.ok(&["patch", "pvc", "grow", "-p", r#"{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}"#]);
    c.wait_for(&state("df to see 2 GiB"), 4 * MIN, || kib(&c) > 1_900_000);
    c.wait_for("the PVC's capacity", 2 * MIN, || {
        let q = c.ok(&["get", "pvc", "grow", "-o", "jsonpath={.status.capacity.storage}"]);
        barnacle_controller::k8s::parse_quantity(&q) == Some(2 << 30)
    });
    assert_eq!(exec(&c, "grower", "cat /data/keep").trim(), "before-growth");

    // A Block volume: written and read back through its device.
    c.apply(&pvc_yaml("raw", "barnacle", "256Mi", true));
    c.apply(&pod_yaml("blocky", "raw", true));
    c.wait_for(&state("the block volume's pod"), 6 * MIN, || running(&c, "blocky"));
    exec(
        &c,
        "blocky",
        "dd if=/dev/urandom of=/tmp/pattern bs=1M count=8 2>/dev/null && dd if=/tmp/pattern of=/dev/xvda bs=1M oflag=direct 2>/dev/null && sync",
    );
    let sums = exec(
        &c,
        "blocky",
        "sha256sum < /tmp/pattern; dd if=/dev/xvda bs=1M count=8 iflag=direct 2>/dev/null | sha256sum",
    );
    let lines: Vec<&str> = sums.lines().collect();
    assert!(
        lines.len() == 2 && lines[0] == lines[1],
        "the device did not give back what was written: {sums}"
    );

    // Everything deleted: no pod, custom resource, replica directory, loop device, mount or
    // socket of Barnacle's is left.
    c.ok(&["delete", "pod", "restored", "grower", "blocky", "--wait=true", "--timeout=180s"]);
    c.ok(&["delete", "statefulset", "web", "--wait=true", "--timeout=180s"]);
    c.wait_for("the web pods to go", 3 * MIN, || {
        c.json(&["get", "pods", "-l", "app=web"])["items"].as_array().is_some_and(Vec::is_empty)
    });
    c.ok(&["delete", "volumesnapshot", "web-data-0-snap"]);
    c.ok(&["delete", "pvc", "--all", "--wait=true", "--timeout=180s"]);
    c.wait_for(&state("every volume to go"), 4 * MIN, || {
        volumes(&c).is_empty()
            && c.json(&["-n", NS, "get", "snapshots.barnacle.dev"])["items"]
                .as_array()
                .is_some_and(Vec::is_empty)
            && c.json(&["get", "pv"])["items"].as_array().is_some_and(Vec::is_empty)
    });
    c.wait_for("the data plane pods to go", 2 * MIN, || {
        c.json(&["-n", NS, "get", "pods", "-l", "app.kubernetes.io/managed-by=barnacle-controller"])["items"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });
    for i in 1..=3 {
        let dir = c.node_dir(i).join("barnacle");
        let disks: Vec<_> = std::fs::read_dir(dir.join("disk"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(disks.is_empty(), "node{i}: replica directories left: {disks:?}");
        let run: Vec<_> = std::fs::read_dir(dir.join("run"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(run.is_empty(), "node{i}: engine sockets left: {run:?}");
        let logs: Vec<_> = std::fs::read_dir(dir.join("node/logs"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(logs.is_empty(), "node{i}: attach logs left: {logs:?}");
        let mounts: Vec<String> = c
            .node_mounts(i)
            .lines()
            .filter(|l| {
                l.contains("kubernetes.io~csi")
                    || l.contains("/var/lib/barnacle/node")
                    || l.contains("fuse.barnacle")
            })
            .map(str::to_owned)
            .collect();
        assert!(mounts.is_empty(), "node{i}: mounts left: {mounts:?}");
    }
    // A node plugin's loop device is over its FUSE file, which the host's mount namespace does
    // not see: the kernel names it from the FUSE filesystem's root.
    let loops = String::from_utf8_lossy(
        &std::process::Command::new("losetup").args(["-n", "-O", "NAME,BACK-FILE"]).output().unwrap().stdout,
    )
    .into_owned();
    assert!(!loops.lines().any(|l| l.ends_with(" /disk")), "loop devices left: {loops}");

    // Uninstalled, then the documented cleanup removes what helm keeps.
    let out = c.helm(&["uninstall", "barnacle", "--namespace", NS]);
    assert!(out.status.success(), "helm uninstall: {}", String::from_utf8_lossy(&out.stderr));
    c.wait_for("Barnacle's pods to go", 3 * MIN, || {
        c.json(&["-n", NS, "get", "pods"])["items"].as_array().is_some_and(Vec::is_empty)
    });
    for cmd in uninstall_commands() {
        let args: Vec<&str> = cmd.iter().map(String::as_str).skip(1).collect();
        c.ok(&args);
    }
    assert!(!c.kubectl(&["get", "crd", "volumes.barnacle.dev"]).status.success());
    assert!(
        !c.kubectl(&["get", "namespace", NS]).status.success()
            || c.ok(&["get", "namespace", NS, "-o", "jsonpath={.status.phase}"]) == "Terminating"
    );
    drop(sidecars);
}

/// Node `node`'s kubelet stopped (SIGSTOP) until dropped: its containers run on, but the node
/// stops reporting and the node controller marks it NotReady, as when a machine is cut off.
struct FrozenKubelet(String);

impl FrozenKubelet {
    fn pkill(&self, signal: &str) {
        let pattern = format!("kubelet .*--hostname-override={} ", self.0);
        let st = std::process::Command::new("pkill").args([signal, "-f", &pattern]).status().unwrap();
        assert!(st.success(), "no kubelet of {} to signal", self.0);
    }
}

impl Drop for FrozenKubelet {
    fn drop(&mut self) {
        self.pkill("-CONT");
    }
}

fn node_ready(c: &Cluster, node: &str) -> bool {
    c.ok(&["get", "node", node, "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}"]) == "True"
}

/// Replenishment on a real cluster: volume `vid` has two replicas and its engine on `engine_node`;
/// the other replica's node goes NotReady and stays so; a replacement is placed on the third
/// node, rebuilt, and the lost one leaves the record (kept in `lost_replicas` while its node is
/// away); when the node is Ready again the old replica's pod goes and its data is wiped.
fn a_lost_node_s_replica_is_replaced(c: &Cluster, vid: &str, engine_node: &str) {
    let replica_pods: Vec<(String, String, String)> =
        volume_pods(c, vid).into_iter().filter(|p| p.1 == "replica").collect();
    assert_eq!(replica_pods.len(), 2, "{replica_pods:?}");
    let (lost_pod, _, lost_node) = replica_pods.iter().find(|p| p.2 != engine_node).unwrap().clone();
    let lost_id = lost_pod.rsplit('-').next().unwrap().to_owned();
    let spare = ["node1", "node2", "node3"]
        .into_iter()
        .find(|n| !replica_pods.iter().any(|p| p.2 == *n))
        .unwrap()
        .to_owned();
    let lost_i: usize = lost_node.trim_start_matches("node").parse().unwrap();
    let lost_dir = c.node_dir(lost_i).join("barnacle/disk");
    let has_data = |dir: &Path| {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten().any(|e| e.file_name().to_string_lossy().ends_with(&format!("{vid}-{lost_id}")))
            })
            .unwrap_or(false)
    };
    eprintln!("{vid}: {lost_node} (replica {lost_id}) goes NotReady; the replacement belongs on {spare}");
    let frozen = FrozenKubelet(lost_node.clone());
    frozen.pkill("-STOP");
    // The node controller's grace period is 40 s.
    c.wait_for(&format!("{lost_node} to be NotReady"), 3 * MIN, || !node_ready(c, &lost_node));
    c.wait_for("the lost replica to be replaced", 4 * MIN, || {
        let v = c.json(&["-n", NS, "get", "volumes.barnacle.dev", vid]);
        let r = v["status"]["membership"]["replicas"].as_array().cloned().unwrap_or_default();
        let placed: Vec<&str> =
            v["spec"]["replicas"].as_array().unwrap().iter().filter_map(|r| r["node"].as_str()).collect();
        r.len() == 2
            && r.iter().all(|r| r["state"] == "healthy" && r["id"] != lost_id.as_str())
            && placed.contains(&spare.as_str())
            && !placed.contains(&lost_node.as_str())
    });
    let v = c.json(&["-n", NS, "get", "volumes.barnacle.dev", vid]);
    assert_eq!(v["spec"]["replicas_replenished"], 1, "{v}");
    assert_eq!(v["spec"]["lost_replicas"][0]["id"], lost_id.as_str(), "{v}");
    assert!(has_data(&lost_dir), "the away node's data is kept until it is back");

    drop(frozen);
    c.wait_for(&format!("{lost_node} to be Ready"), 3 * MIN, || node_ready(c, &lost_node));
    c.wait_for("the returned node's old replica to be wiped", 4 * MIN, || {
        let v = c.json(&["-n", NS, "get", "volumes.barnacle.dev", vid]);
        v["spec"]["lost_replicas"].as_array().is_none_or(Vec::is_empty)
            && !volume_pods(c, vid).iter().any(|p| p.0 == lost_pod)
            && !has_data(&lost_dir)
    });
}

/// The `kubectl ...` lines of docs/kubernetes.md's uninstall section.
fn uninstall_commands() -> Vec<Vec<String>> {
    let doc = std::fs::read_to_string(repo().join("docs/kubernetes.md")).unwrap();
    let section = doc.split("<!-- uninstall -->").nth(1).unwrap_or_default();
    let section = section.split("<!-- /uninstall -->").next().unwrap_or_default();
    let cmds: Vec<Vec<String>> = section
        .lines()
        .filter(|l| l.starts_with("kubectl "))
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect();
    assert!(!cmds.is_empty(), "docs/kubernetes.md has no uninstall commands");
    cmds
}

const XFS_CLASS: &str = "apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: barnacle-xfs
provisioner: csi.barnacle.dev
allowVolumeExpansion: true
volumeBindingMode: WaitForFirstConsumer
parameters:
  replicas: \"3\"
  csi.storage.k8s.io/fstype: xfs
";

fn pvc_yaml(name: &str, class: &str, size: &str, block: bool) -> String {
    format!(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: {name}\nspec:\n  accessModes: [ReadWriteOnce]\n  storageClassName: {class}\n  volumeMode: {}\n  resources:\n    requests:\n      storage: {size}\n",
        if block { "Block" } else { "Filesystem" }
    )
}

fn pod_yaml(name: &str, pvc: &str, block: bool) -> String {
    let attach = if block {
        "    volumeDevices:\n    - {name: data, devicePath: /dev/xvda}\n"
    } else {
        "    volumeMounts:\n    - {name: data, mountPath: /data}\n"
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: localhost/busybox:1.35\n    command: [sleep, \"86400\"]\n{attach}  volumes:\n  - name: data\n    persistentVolumeClaim: {{claimName: {pvc}}}\n"
    )
}
