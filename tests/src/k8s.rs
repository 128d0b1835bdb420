//! A real kube-apiserver (1.20.2, built by deploy/apiserver.sh) with etcd on loopback, and a
//! stand-in for the kubelet.
//!
//! No kubelet can run on this machine, so [`Kubelet`] plays its part for the pods the controller
//! creates: it runs each pod's container as a local process (the image's binaries are this
//! workspace's), with hostPath volumes under a directory per node, Secret volumes written from
//! the API, `$(VAR)` expansion, the node's address for `status.hostIP`, restarts by restart
//! policy, tcpSocket readiness probes, and the status and deletion handshakes with the API
//! server. Each "node" has its own loopback address (127.0.0.x), so host-network pods on
//! different nodes do not collide. This is a test double only for the kubelet; everything else is
//! the real API server, the real controller, engines and replicas.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

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
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap();
        Client::try_from(cfg).unwrap()
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new(self.bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply` of a manifest given as text.
    pub fn apply(&self, yaml: &str) {
        let f = self.dir.path().join(format!("apply-{}.yaml", uuid::Uuid::new_v4().simple()));
        std::fs::write(&f, yaml).unwrap();
        self.ok(&["apply", "-f", f.to_str().unwrap()]);
    }

    pub fn helm(&self, args: &[&str]) -> Output {
        let tools = PathBuf::from(
            std::env::var("BARNACLE_TOOLS").unwrap_or_else(|_| "/var/tmp/barnacle-tools".into()),
        );
        Command::new(tools.join("helm/helm"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .unwrap()
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

/// A node the kubelet double serves: its name, address and root directory (its `/`).
#[derive(Debug, Clone)]
pub struct FakeNode {
    pub name: String,
    pub ip: String,
    pub root: PathBuf,
}

impl FakeNode {
    /// A host path on this node.
    pub fn path(&self, host_path: &str) -> PathBuf {
        self.root.join(host_path.trim_start_matches('/'))
    }
}

struct Running {
    child: Child,
    node: FakeNode,
    pod: String,
    restarts: u32,
    ready: bool,
    spec: Pod,
}

/// Runs the containers of pods bound to the fake nodes (see the module docs).
#[derive(Debug)]
pub struct Kubelet {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Kubelet {
    /// Serves the pods of `namespace` on `nodes`; pods of `engine_sa` get `engine_kubeconfig`
    /// as their service account's credentials.
    pub fn start(
        client: Client,
        namespace: &str,
        nodes: Vec<FakeNode>,
        engine_sa: &str,
        engine_kubeconfig: PathBuf,
    ) -> Kubelet {
        let stop = CancellationToken::new();
        let st = stop.clone();
        let (ns, sa) = (namespace.to_owned(), engine_sa.to_owned());
        let task = tokio::spawn(async move {
            let mut k = Loop {
                pods: Api::namespaced(client.clone(), &ns),
                secrets: Api::namespaced(client, &ns),
                nodes,
                engine_sa: sa,
                engine_kubeconfig,
                running: HashMap::new(),
            };
            while !st.is_cancelled() {
                if let Err(e) = k.pass().await {
                    eprintln!("kubelet double: {e}");
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            for (_, mut r) in k.running.drain() {
                let _ = r.child.kill();
                let _ = r.child.wait();
            }
        });
        Kubelet { stop, task: Some(task) }
    }

    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Loop {
    pods: Api<Pod>,
    secrets: Api<Secret>,
    nodes: Vec<FakeNode>,
    engine_sa: String,
    engine_kubeconfig: PathBuf,
    /// Pod uid → its running container.
    running: HashMap<String, Running>,
}

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

impl Loop {
    async fn pass(&mut self) -> Res<()> {
        let pods = self.pods.list(&ListParams::default()).await?.items;
        let live: std::collections::HashSet<String> =
            pods.iter().filter_map(|p| p.metadata.uid.clone()).collect();
        // Pods deleted outright (grace 0): their containers stop.
        let gone: Vec<String> = self.running.keys().filter(|u| !live.contains(*u)).cloned().collect();
        for uid in gone {
            if let Some(mut r) = self.running.remove(&uid) {
                let _ = r.child.kill();
                let _ = r.child.wait();
            }
        }
        for pod in pods {
            let Some(node) = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_ref())
                .and_then(|n| self.nodes.iter().find(|x| &x.name == n))
                .cloned()
            else {
                continue;
            };
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            let name = pod.metadata.name.clone().unwrap_or_default();
            if pod.metadata.deletion_timestamp.is_some() {
                // Stop the container, then confirm the deletion as a kubelet does.
                if let Some(mut r) = self.running.remove(&uid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(r.child.id().cast_signed()),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while r.child.try_wait()?.is_none() && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    let _ = r.child.kill();
                    let _ = r.child.wait();
                }
                let dp = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(kube::api::Preconditions { uid: Some(uid), resource_version: None }),
                    ..DeleteParams::default()
                };
                let _ = self.pods.delete(&name, &dp).await;
                continue;
            }
            let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
            if phase == "Succeeded" || phase == "Failed" {
                continue;
            }
            if !self.running.contains_key(&uid) {
                let child = self.start_container(&pod, &node).await?;
                self.running.insert(
                    uid.clone(),
                    Running {
                        child,
                        node: node.clone(),
                        pod: name.clone(),
                        restarts: 0,
                        ready: false,
                        spec: pod.clone(),
                    },
                );
                let status = serde_json::json!({ "status": {
                    "phase": "Running", "hostIP": node.ip, "podIP": node.ip,
                    "conditions": [{ "type": "Ready", "status": "False" }],
                }});
                self.pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await?;
                continue;
            }
            self.tend(&uid).await?;
        }
        Ok(())
    }

    /// Restarts an exited container or finishes its pod; probes readiness.
    async fn tend(&mut self, uid: &str) -> Res<()> {
        let Some(r) = self.running.get_mut(uid) else { return Ok(()) };
        let policy = r.spec.spec.as_ref().and_then(|s| s.restart_policy.clone()).unwrap_or("Always".into());
        if let Some(exit) = r.child.try_wait()? {
            let finished = exit.success() && policy != "Always" || policy == "Never";
            if finished {
                let phase = if exit.success() { "Succeeded" } else { "Failed" };
                let status = serde_json::json!({ "status": { "phase": phase,
                    "conditions": [{ "type": "Ready", "status": "False" }] } });
                let name = r.pod.clone();
                self.running.remove(uid);
                self.pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await?;
                return Ok(());
            }
            let (spec, node) = (r.spec.clone(), r.node.clone());
            let child = self.start_container(&spec, &node).await?;
            let r = self.running.get_mut(uid).unwrap();
            r.child = child;
            r.restarts += 1;
            r.ready = false;
            let status = serde_json::json!({ "status": {
                "conditions": [{ "type": "Ready", "status": "False" }],
                "containerStatuses": [{ "name": "c", "restartCount": r.restarts, "ready": false, "image": "", "imageID": "" }],
            }});
            let name = r.pod.clone();
            self.pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await?;
            return Ok(());
        }
        let c = &r.spec.spec.as_ref().unwrap().containers[0];
        let ready = match c.readiness_probe.as_ref().and_then(|p| p.tcp_socket.as_ref()) {
            Some(tcp) => {
                let port = match &tcp.port {
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => *p,
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(_) => 0,
                };
                std::net::TcpStream::connect_timeout(
                    &format!("{}:{port}", r.node.ip).parse()?,
                    Duration::from_millis(200),
                )
                .is_ok()
            }
            None => true,
        };
        if ready != r.ready {
            r.ready = ready;
            let status = serde_json::json!({ "status": {
                "conditions": [{ "type": "Ready", "status": if ready { "True" } else { "False" } }],
            }});
            let name = r.pod.clone();
            self.pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await?;
        }
        Ok(())
    }

    /// Starts the pod's (single) container on `node`.
    async fn start_container(&self, pod: &Pod, node: &FakeNode) -> Res<Child> {
        let spec = pod.spec.as_ref().ok_or("pod without spec")?;
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let c = spec.containers.first().ok_or("pod without containers")?;
        // Volumes → directories on the node.
        let mut dirs: HashMap<String, PathBuf> = HashMap::new();
        for v in spec.volumes.iter().flatten() {
            let dir = if let Some(hp) = &v.host_path {
                let d = node.path(&hp.path);
                std::fs::create_dir_all(&d)?;
                d
            } else if let Some(sv) = &v.secret {
                let d = node.root.join("pods").join(&uid).join(&v.name);
                std::fs::create_dir_all(&d)?;
                let secret = self.secrets.get(sv.secret_name.as_deref().unwrap_or_default()).await?;
                for (k, val) in secret.data.unwrap_or_default() {
                    std::fs::write(d.join(&k), &val.0)?;
                    std::fs::set_permissions(
                        d.join(&k),
                        std::os::unix::fs::PermissionsExt::from_mode(0o400),
                    )?;
                }
                d
            } else {
                let d = node.root.join("pods").join(&uid).join(&v.name);
                std::fs::create_dir_all(&d)?;
                d
            };
            dirs.insert(v.name.clone(), dir);
        }
        let mut mounts: Vec<(String, PathBuf)> = c
            .volume_mounts
            .iter()
            .flatten()
            .filter_map(|m| dirs.get(&m.name).map(|d| (m.mount_path.clone(), d.clone())))
            .collect();
        mounts.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        // Environment: values and the node's address.
        let mut env: Vec<(String, String)> = Vec::new();
        for e in c.env.iter().flatten() {
            let value = match (&e.value, &e.value_from) {
                (Some(v), _) => v.clone(),
                (None, Some(from)) => match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                    Some("status.hostIP" | "status.podIP") => node.ip.clone(),
                    Some("spec.nodeName") => node.name.clone(),
                    Some("metadata.name") => name.clone(),
                    other => return Err(format!("kubelet double: unsupported fieldRef {other:?}").into()),
                },
                (None, None) => String::new(),
            };
            env.push((e.name.clone(), value));
        }
        let expand = |s: &str| -> String {
            let mut out = s.to_owned();
            for (k, v) in &env {
                out = out.replace(&format!("$({k})"), v);
            }
            for (mp, dir) in &mounts {
                // A path argument inside a mount, alone or after `--flag=`.
                for prefix in ["", "="] {
                    let needle = format!("{prefix}{mp}");
                    if let Some(i) = out.find(&needle)
                        && (prefix == "=" || i == 0)
                        && out[i + needle.len()..].chars().next().is_none_or(|ch| ch == '/')
                    {
                        out = format!("{}{prefix}{}{}", &out[..i], dir.display(), &out[i + needle.len()..]);
                        return out;
                    }
                }
            }
            out
        };
        let command = c.command.clone().unwrap_or_default();
        let (program, first_args) = command.split_first().ok_or("container without a command")?;
        // The image's own programs are this workspace's; others (rm) are the system's.
        let program =
            if program.starts_with("barnacle") { crate::binary(program) } else { PathBuf::from(program) };
        let mut cmd = Command::new(&program);
        cmd.args(first_args.iter().map(|a| expand(a)));
        cmd.args(c.args.iter().flatten().map(|a| expand(a)));
        cmd.envs(env.iter().cloned());
        cmd.env("RUST_LOG", "info");
        if spec.service_account_name.as_deref() == Some(self.engine_sa.as_str()) {
            cmd.env("KUBECONFIG", &self.engine_kubeconfig);
        }
        let logs = node.root.join("logs");
        std::fs::create_dir_all(&logs)?;
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(logs.join(format!("{name}.log")))?;
        Ok(cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).spawn()?)
    }
}
