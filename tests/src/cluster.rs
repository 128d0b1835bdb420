//! A real Kubernetes 1.20.2 cluster for the tests: three nodes, each a real kubelet running real
//! containers through containerd and runc, started and stopped by `deploy/k8s-cluster.sh` (the
//! binaries come from `deploy/k8s-build.sh`), with Barnacle's image built by `deploy/image.sh`.
//!
//! The cluster lives in the network namespace `bk8s`: a test joins it with [`enter_network`]
//! before it starts threads, so its API clients, kubectl and helm reach the API server.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The cluster's state and binaries.
pub fn k8s_dir() -> PathBuf {
    PathBuf::from(std::env::var("BARNACLE_K8S").unwrap_or_else(|_| "/var/tmp/barnacle-k8s".into()))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A running cluster; stopped (pods deleted first, then every process and host change undone)
/// when dropped, unless `BARNACLE_K8S_KEEP` is set (to look at it after a failure).
#[derive(Debug)]
pub struct Cluster {
    pub kubeconfig: PathBuf,
    pub bin: PathBuf,
    /// `$BARNACLE_K8S/cluster`.
    pub state: PathBuf,
    pub nodes: usize,
}

fn script(args: &[&str]) -> Output {
    Command::new("bash").arg(repo().join("deploy/k8s-cluster.sh")).args(args).output().unwrap()
}

impl Cluster {
    /// Stops what an earlier run left, then starts the cluster and waits for every node to be
    /// Ready.
    pub fn start() -> Cluster {
        let bin = k8s_dir().join("bin");
        assert!(
            bin.join("kubelet").exists(),
            "the Kubernetes binaries are missing: run deploy/k8s-build.sh (./test.sh does)"
        );
        let _ = script(&["stop"]);
        let started = Instant::now();
        let out = script(&["start"]);
        let state = k8s_dir().join("cluster");
        assert!(
            out.status.success(),
            "the cluster did not start: {}\n{}\nlogs in {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            state.join("logs").display()
        );
        eprintln!("cluster started in {:?}:\n{}", started.elapsed(), String::from_utf8_lossy(&out.stdout));
        Cluster { kubeconfig: state.join("admin.kubeconfig"), bin, state, nodes: 3 }
    }

    /// Imports an OCI archive into every node's containerd as `localhost/NAME:<its tag>`.
    pub fn import(&self, tar: &Path, name: &str) {
        let out = script(&["import", tar.to_str().unwrap(), name]);
        assert!(
            out.status.success(),
            "importing {}: {}",
            tar.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Node `i`'s directory (1-based): `kubelet/` and `barnacle/` are its `/var/lib/kubelet`
    /// and `/var/lib/barnacle`.
    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.state.join("nodes").join(i.to_string())
    }

    /// The host PID of node `i`'s init (its mounts are in `/proc/PID/mountinfo`).
    pub fn node_pid(&self, i: usize) -> Option<u32> {
        let out = script(&["node-pid", &i.to_string()]);
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    /// Node `i`'s mount table.
    pub fn node_mounts(&self, i: usize) -> String {
        self.node_pid(i)
            .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/mountinfo")).ok())
            .unwrap_or_default()
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        crate::k8s::kubectl(&self.bin, &self.kubeconfig, args)
    }

    /// kubectl that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        crate::k8s::stdout_of(&self.kubectl(args), args)
    }

    /// `kubectl get ... -o json`.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    /// `kubectl apply` of manifest text.
    pub fn apply(&self, yaml: &str) {
        let f = self.state.join(format!("apply-{}.yaml", uuid::Uuid::new_v4().simple()));
        std::fs::write(&f, yaml).unwrap();
        self.ok(&["apply", "-f", f.to_str().unwrap()]);
        let _ = std::fs::remove_file(f);
    }

    pub fn helm(&self, args: &[&str]) -> Output {
        crate::k8s::helm(&self.kubeconfig, args)
    }

    /// A client with the administrator's kubeconfig (call after [`enter_network`]).
    pub async fn client(&self) -> kube::Client {
        crate::k8s::client(&self.kubeconfig).await
    }

    /// Polls `ok` every half second until it holds; fails after `timeout` with `what` and the
    /// state of the pods.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !ok() {
            if Instant::now() > deadline {
                let pods = self.kubectl(&["get", "pods", "-A", "-o", "wide"]);
                let events = self.kubectl(&["get", "events", "-A", "--sort-by=.lastTimestamp"]);
                panic!(
                    "timed out waiting for {what}\n{}\n{}",
                    String::from_utf8_lossy(&pods.stdout),
                    String::from_utf8_lossy(&events.stdout)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::env::var_os("BARNACLE_K8S_KEEP").is_some() {
            eprintln!(
                "BARNACLE_K8S_KEEP: the cluster keeps running; stop it with deploy/k8s-cluster.sh stop"
            );
            return;
        }
        let out = script(&["stop"]);
        if !out.status.success() {
            eprintln!("stopping the cluster: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// Moves the calling thread into the cluster's network namespace; threads and processes it
/// starts afterwards are in it too. Call before starting an async runtime.
pub fn enter_network() {
    let f = std::fs::File::open("/run/netns/bk8s").unwrap();
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
}

/// Barnacle's image for the cluster, built by `deploy/image.sh` (./test.sh runs it): the OCI
/// archive and its tag.
pub fn image() -> (PathBuf, String) {
    let target = PathBuf::from(
        std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "/var/tmp/barnacle-target".into()),
    );
    let tar = target.join("image/barnacle.oci.tar");
    let tag = std::fs::read_to_string(target.join("image/barnacle.tag"))
        .unwrap_or_else(|_| panic!("{} is missing: run deploy/image.sh (./test.sh does)", tar.display()));
    (tar, tag.trim().to_owned())
}
