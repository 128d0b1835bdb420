//! The Helm chart against a real kube-apiserver (1.20.2, built by deploy/apiserver.sh from
//! Debian's source, with Debian's etcd on loopback): the chart installs with helm, Barnacle's
//! CRDs accept their sample resources on the server, the RBAC of each service account allows
//! what its component calls and no more (`kubectl auth can-i`), and uninstalling removes it all.
//! No kubelet runs here, so no pod is ever scheduled: only the API objects are checked.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct ApiServer {
    etcd: Child,
    api: Child,
    kubeconfig: PathBuf,
    bin: PathBuf,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl ApiServer {
    fn start() -> ApiServer {
        let bin =
            PathBuf::from(std::env::var("BARNACLE_K8S").unwrap_or_else(|_| "/var/tmp/barnacle-k8s".into()))
                .join("bin");
        assert!(
            bin.join("kube-apiserver").exists() && bin.join("kubectl").exists(),
            "kube-apiserver is missing: run deploy/apiserver.sh (.ci/run does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (client, peer, secure) = (free_port(), free_port(), free_port());
        let log = |name: &str| std::fs::File::create(d.join(name)).unwrap();
        let etcd = Command::new("etcd")
            .arg("--data-dir")
            .arg(d.join("etcd"))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!("--initial-cluster=default=http://127.0.0.1:{peer}"))
            .stdout(Stdio::null())
            .stderr(log("etcd.log"))
            .spawn()
            .unwrap();
        let key = d.join("sa.key");
        let ok = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success());
        std::fs::write(d.join("tokens.csv"), "admin-token,admin,admin,system:masters\n").unwrap();
        let api = Command::new(bin.join("kube-apiserver"))
            .arg(format!("--etcd-servers=http://127.0.0.1:{client}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={secure}"))
            .arg("--cert-dir")
            .arg(d.join("certs"))
            .arg("--token-auth-file")
            .arg(d.join("tokens.csv"))
            .arg("--authorization-mode=RBAC")
            .arg("--allow-privileged=true")
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg("--service-account-key-file")
            .arg(&key)
            .arg("--service-account-signing-key-file")
            .arg(&key)
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .stdout(Stdio::null())
            .stderr(log("apiserver.log"))
            .spawn()
            .unwrap();
        let kubeconfig = d.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: https://127.0.0.1:{secure}\n    insecure-skip-tls-verify: true\n\
                 users:\n- name: admin\n  user:\n    token: admin-token\ncontexts:\n- name: t\n  context:\n    cluster: t\n    user: admin\ncurrent-context: t\n"
            ),
        )
        .unwrap();
        let s = ApiServer { etcd, api, kubeconfig, bin, dir };
        let deadline = Instant::now() + Duration::from_secs(90);
        while !s.kubectl(&["get", "namespace", "default"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "kube-apiserver did not come up: {}",
                std::fs::read_to_string(s.dir.path().join("apiserver.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        s
    }

    fn kubectl(&self, args: &[&str]) -> Output {
        Command::new(self.bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.api.kill();
        let _ = self.api.wait();
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
    }
}

fn helm(kubeconfig: &Path, args: &[&str]) -> Output {
    let tools =
        PathBuf::from(std::env::var("BARNACLE_TOOLS").unwrap_or_else(|_| "/var/tmp/barnacle-tools".into()));
    Command::new(tools.join("helm/helm")).arg("--kubeconfig").arg(kubeconfig).args(args).output().unwrap()
}

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

    let out = helm(
        &k.kubeconfig,
        &[
            "install",
            "barnacle",
            root.join("charts/barnacle").to_str().unwrap(),
            "--namespace",
            "barnacle",
            "--create-namespace",
        ],
    );
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
    let cases: &[(&str, &[&str], bool)] = &[
        (controller, &["create", "persistentvolumes"], true),
        (controller, &["delete", "persistentvolumes"], true),
        (controller, &["update", "persistentvolumeclaims"], true),
        (controller, &["patch", "volumeattachments.storage.k8s.io"], true),
        (controller, &["patch", "volumeattachments.storage.k8s.io/status"], true),
        (controller, &["update", "volumesnapshotcontents.snapshot.storage.k8s.io"], true),
        (controller, &["list", "nodes"], true),
        (controller, &["create", "pods", "-n", "barnacle"], true),
        (controller, &["create", "leases.coordination.k8s.io", "-n", "barnacle"], true),
        (controller, &["update", "volumes.barnacle.dev", "-n", "barnacle"], true),
        (controller, &["patch", "volumes.barnacle.dev/status", "-n", "barnacle"], true),
        (controller, &["get", "secrets", "-n", "barnacle"], true),
        (controller, &["create", "pods", "-n", "default"], false),
        (controller, &["list", "secrets", "-n", "barnacle"], false),
        (controller, &["get", "secrets", "-n", "default"], false),
        (controller, &["delete", "nodes"], false),
        (controller, &["create", "clusterrolebindings"], false),
        (controller, &["update", "volumes.barnacle.dev", "-n", "default"], false),
        (node, &["get", "pods"], false),
        (node, &["get", "nodes"], false),
        (node, &["create", "persistentvolumes"], false),
        (node, &["get", "volumes.barnacle.dev", "-n", "barnacle"], false),
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

    let out = helm(&k.kubeconfig, &["uninstall", "barnacle", "--namespace", "barnacle"]);
    assert!(out.status.success(), "helm uninstall: {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        !k.kubectl(&["get", "csidriver", "csi.barnacle.dev"]).status.success(),
        "uninstall removes the CSIDriver"
    );
    assert!(!k.kubectl(&["-n", "barnacle", "get", "deployment/barnacle-controller"]).status.success());
}
