//! A bare kube-apiserver (1.20.2, built by deploy/k8s-build.sh) with etcd on loopback, for tests
//! of API objects alone (the chart's resources and RBAC, the membership authority). A whole
//! cluster with kubelets is [`crate::cluster`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kube::Client;

#[derive(Debug)]
pub struct ApiServer {
    etcd: Child,
    api: Child,
    /// A kubeconfig of the cluster administrator.
    pub kubeconfig: PathBuf,
    pub bin: PathBuf,
    pub dir: tempfile::TempDir,
    secure_port: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Bearer tokens the server accepts: the administrator, and the controller's and engines'
/// service accounts of the `barnacle` namespace (so their RBAC is what decides).
const TOKENS: &str = "admin-token,admin,admin,system:masters\n\
controller-token,system:serviceaccount:barnacle:barnacle-controller,sa-controller,\"system:serviceaccounts,system:serviceaccounts:barnacle,system:authenticated\"\n\
engine-token,system:serviceaccount:barnacle:barnacle-engine,sa-engine,\"system:serviceaccounts,system:serviceaccounts:barnacle,system:authenticated\"\n";

impl ApiServer {
    pub fn start() -> ApiServer {
        let bin =
            PathBuf::from(std::env::var("BARNACLE_K8S").unwrap_or_else(|_| "/var/tmp/barnacle-k8s".into()))
                .join("bin");
        assert!(
            bin.join("kube-apiserver").exists() && bin.join("kubectl").exists(),
            "kube-apiserver is missing: run deploy/k8s-build.sh (./test.sh does)"
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
        std::fs::write(d.join("tokens.csv"), TOKENS).unwrap();
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
            // Service account tokens are made by kube-controller-manager, which does not run
            // here: pods name their service account, and the kubelet double hands them tokens.
            .arg("--disable-admission-plugins=ServiceAccount")
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
        let s = ApiServer { etcd, api, kubeconfig: d.join("kubeconfig"), bin, dir, secure_port: secure };
        s.write_kubeconfig(&s.kubeconfig, "admin-token");
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

    /// Writes a kubeconfig that authenticates with `token` (see [`TOKENS`]).
    pub fn write_kubeconfig(&self, path: &Path, token: &str) {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: https://127.0.0.1:{}\n    insecure-skip-tls-verify: true\n\
                 users:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: t\n  context:\n    cluster: t\n    user: u\n    namespace: default\ncurrent-context: t\n",
                self.secure_port
            ),
        )
        .unwrap();
    }

    /// A client with the administrator's kubeconfig.
    pub async fn client(&self) -> Client {
        client(&self.kubeconfig).await
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        kubectl(&self.bin, &self.kubeconfig, args)
    }

    pub fn ok(&self, args: &[&str]) -> String {
        stdout_of(&self.kubectl(args), args)
    }

    /// `kubectl apply` of a manifest given as text.
    pub fn apply(&self, yaml: &str) {
        let f = self.dir.path().join(format!("apply-{}.yaml", uuid::Uuid::new_v4().simple()));
        std::fs::write(&f, yaml).unwrap();
        self.ok(&["apply", "-f", f.to_str().unwrap()]);
    }

    pub fn helm(&self, args: &[&str]) -> Output {
        helm(&self.kubeconfig, args)
    }
}

/// A client with a kubeconfig's credentials.
pub async fn client(kubeconfig: &Path) -> Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let cfg =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await.unwrap();
    Client::try_from(cfg).unwrap()
}

/// kubectl (from `bin`) with a kubeconfig; API calls time out after 30 s.
pub fn kubectl(bin: &Path, kubeconfig: &Path, args: &[&str]) -> Output {
    Command::new(bin.join("kubectl"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--request-timeout=30s")
        .args(args)
        .output()
        .unwrap()
}

/// The stdout of a kubectl run that must have succeeded.
pub fn stdout_of(out: &Output, args: &[&str]) -> String {
    assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// helm (from deploy/tools.sh) with a kubeconfig.
pub fn helm(kubeconfig: &Path, args: &[&str]) -> Output {
    let tools =
        PathBuf::from(std::env::var("BARNACLE_TOOLS").unwrap_or_else(|_| "/var/tmp/barnacle-tools".into()));
    Command::new(tools.join("helm/helm")).arg("--kubeconfig").arg(kubeconfig).args(args).output().unwrap()
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.api.kill();
        let _ = self.api.wait();
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
    }
}
