//! The local orchestrator (the embedded default): every node is a directory standing for its
//! disk, and replicas and engines run as supervised child processes on this machine.
//!
//! Layout of a node directory:
//! - `replicas/<volume>-<replica>/`: a replica's store;
//! - `run/`: unix sockets and ready files of the processes "on" the node;
//! - `logs/`: their stderr.
//!
//! Replicas serve their data protocol on a unix socket in `run/`, whose path stays the same when
//! the replica restarts, so the membership record's address stays valid (a TCP port would change).
//! Tokens (0600 files) and the file membership authority of each volume live in the controller's
//! state directory, shared by all "nodes" of this machine.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use barnacle_engine::authority::{FileAuthority, MembershipAuthority};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::error::{ControllerError, Result};
use crate::orchestrator::{EngineEndpoint, Orchestrator, ReplicaEndpoint};
use crate::placement::NodeInfo;
use crate::store::{Attachment, ReplicaPlacement, VolumeRecord};
use crate::supervise::{ProcSpec, Supervised};

/// One simulated node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalNode {
    pub name: String,
    /// The directory standing for the node's disk.
    pub dir: PathBuf,
    #[serde(default)]
    pub zone: Option<String>,
    /// Bytes offered for replicas; default: the size of the filesystem holding `dir`.
    #[serde(default)]
    pub capacity: Option<u64>,
}

impl LocalNode {
    /// Parses `NAME=DIR[,zone=ZONE][,capacity=SIZE]`.
    pub fn parse(s: &str) -> std::result::Result<LocalNode, String> {
        let (name, rest) =
            s.split_once('=').ok_or_else(|| format!("{s:?}: expected NAME=DIR[,zone=Z][,capacity=SIZE]"))?;
        let mut parts = rest.split(',');
        let dir = parts.next().filter(|d| !d.is_empty()).ok_or_else(|| format!("{s:?}: no directory"))?;
        if name.is_empty()
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
        {
            return Err(format!("{s:?}: a node name uses letters, digits, '-', '.' and '_'"));
        }
        let mut node =
            LocalNode { name: name.to_owned(), dir: PathBuf::from(dir), zone: None, capacity: None };
        for p in parts {
            match p.split_once('=') {
                Some(("zone", z)) if !z.is_empty() => node.zone = Some(z.to_owned()),
                Some(("capacity", c)) => {
                    node.capacity =
                        Some(barnacle_daemon::units::parse_size(c).map_err(|e| format!("{s:?}: {e}"))?);
                }
                _ => return Err(format!("{s:?}: unknown option {p:?} (zone=, capacity=)")),
            }
        }
        Ok(node)
    }
}

/// Settings of the local orchestrator.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// The controller's state directory (tokens, membership records).
    pub state_dir: PathBuf,
    pub nodes: Vec<LocalNode>,
    /// Where `barnacle-replica` and `barnacle-engine` are.
    pub bin_dir: PathBuf,
    /// Stop every process when the controller exits (else they keep serving and are adopted by
    /// the next controller).
    pub stop_on_exit: bool,
}

/// The local orchestrator.
#[derive(Debug)]
pub struct LocalOrchestrator {
    cfg: LocalConfig,
    procs: Mutex<HashMap<String, Arc<Supervised>>>,
}

fn orch(volume_id: &str, e: impl std::fmt::Display) -> ControllerError {
    ControllerError::orchestrator(volume_id, e)
}

fn filesystem_size(dir: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(s.blocks() * s.fragment_size())
}

/// Whether a node's disk is there: its `replicas` directory can be read (a node directory that
/// was unmounted, removed or renamed stands for a node that is down).
fn node_reachable(n: &LocalNode) -> bool {
    std::fs::metadata(n.dir.join("replicas")).is_ok_and(|m| m.is_dir())
}

/// How long a process may take to serve after it starts.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

impl LocalOrchestrator {
    /// Creates the node directories if needed.
    pub fn new(cfg: LocalConfig) -> Result<LocalOrchestrator> {
        let mut names = std::collections::HashSet::new();
        for n in &cfg.nodes {
            if !names.insert(n.name.clone()) {
                return Err(ControllerError::InvalidArgument(format!("node {} is configured twice", n.name)));
            }
            for sub in ["replicas", "run", "logs"] {
                std::fs::create_dir_all(n.dir.join(sub)).map_err(|e| {
                    ControllerError::Store(format!("node {} directory {}: {e}", n.name, n.dir.display()))
                })?;
            }
        }
        for sub in ["tokens", "membership"] {
            std::fs::create_dir_all(cfg.state_dir.join(sub))
                .map_err(|e| ControllerError::Store(format!("{}: {e}", cfg.state_dir.display())))?;
        }
        Ok(LocalOrchestrator { cfg, procs: Mutex::new(HashMap::new()) })
    }

    fn node(&self, name: &str) -> Result<&LocalNode> {
        self.cfg
            .nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| ControllerError::NotFound(format!("node {name} is not known")))
    }

    fn replica_dir(node: &LocalNode, volume_id: &str, replica: &str) -> PathBuf {
        node.dir.join("replicas").join(format!("{volume_id}-{replica}"))
    }

    fn replica_socket(node: &LocalNode, volume_id: &str, replica: &str) -> PathBuf {
        node.dir.join("run").join(format!("{volume_id}-{replica}.sock"))
    }

    fn token_file(&self, volume_id: &str) -> PathBuf {
        self.cfg.state_dir.join("tokens").join(volume_id)
    }

    /// The spec of a replica process; `create_size` adds `--size`.
    fn replica_spec(
        &self,
        volume_id: &str,
        r: &ReplicaPlacement,
        create_size: Option<u64>,
    ) -> Result<ProcSpec> {
        let node = self.node(&r.node)?;
        let run = node.dir.join("run");
        let ready_file = run.join(format!("{volume_id}-{}.ready", r.id));
        let mut args = vec![
            "--dir".to_owned(),
            Self::replica_dir(node, volume_id, &r.id).display().to_string(),
            "--volume-id".to_owned(),
            volume_id.to_owned(),
            "--token-file".to_owned(),
            self.token_file(volume_id).display().to_string(),
            "--listen-unix".to_owned(),
            Self::replica_socket(node, volume_id, &r.id).display().to_string(),
            "--ready-file".to_owned(),
            ready_file.display().to_string(),
        ];
        if let Some(size) = create_size {
            args.extend(["--size".to_owned(), size.to_string()]);
        }
        Ok(ProcSpec {
            role: format!("replica {}", r.id),
            volume_id: volume_id.to_owned(),
            program: self.cfg.bin_dir.join("barnacle-replica"),
            args,
            ready_file,
            log_file: node.dir.join("logs").join(format!("{volume_id}-{}.log", r.id)),
        })
    }

    fn engine_spec(
        &self,
        volume: &VolumeRecord,
        att: &Attachment,
        replicas: &[(String, String)],
    ) -> Result<(ProcSpec, PathBuf)> {
        let node = self.node(&att.node)?;
        let run = node.dir.join("run");
        let id = &volume.id;
        let socket = run.join(format!("{id}.g{}.nbd", att.generation));
        let ready_file = run.join(format!("{id}-engine.ready"));
        let mut args = vec![
            "--volume-id".to_owned(),
            id.clone(),
            "--token-file".to_owned(),
            self.token_file(id).display().to_string(),
            "--state-dir".to_owned(),
            self.cfg.state_dir.join("membership").join(id).display().to_string(),
            "--nbd-socket".to_owned(),
            socket.display().to_string(),
            "--min-healthy-replicas".to_owned(),
            volume.params.min_healthy_replicas.to_string(),
            "--ready-file".to_owned(),
            ready_file.display().to_string(),
        ];
        if att.readonly {
            args.push("--read-only".to_owned());
        }
        if let Some(rate) = volume.params.rebuild_mib_per_sec {
            args.extend(["--rebuild-mib-per-sec".to_owned(), rate.to_string()]);
        }
        for (rid, addr) in replicas {
            args.extend(["--replica".to_owned(), format!("{rid}={addr}")]);
        }
        let spec = ProcSpec {
            role: "engine".to_owned(),
            volume_id: id.clone(),
            program: self.cfg.bin_dir.join("barnacle-engine"),
            args,
            ready_file,
            log_file: node.dir.join("logs").join(format!("{id}-engine.log")),
        };
        Ok((spec, socket))
    }

    /// The supervised process under `key`, started from `spec` if none runs with the same spec.
    async fn supervise(&self, key: &str, spec: ProcSpec) -> Arc<Supervised> {
        let old = {
            let mut procs = self.procs.lock();
            match procs.get(key) {
                Some(p)
                    if p.spec().ready_file == spec.ready_file && same_args(&p.spec().args, &spec.args) =>
                {
                    return p.clone();
                }
                Some(_) => procs.remove(key),
                None => None,
            }
        };
        if let Some(old) = old {
            old.stop().await;
        }
        let mut procs = self.procs.lock();
        procs.entry(key.to_owned()).or_insert_with(|| Supervised::start(spec)).clone()
    }

    async fn unsupervise(&self, key: &str) {
        let p = self.procs.lock().remove(key);
        if let Some(p) = p {
            p.stop().await;
        }
    }
}

/// Whether two argument lists start the same process; `--size` only matters for creation.
/// Whether two command lines start the same process. What a running process learns otherwise is
/// left out: a replica's `--size` (used only to create its store), and an engine's replica set
/// and settings (used only while the membership record holds none; afterwards the record, which
/// ControllerModifyVolume changes, decides). A change of those must not restart a serving engine.
fn same_args(a: &[String], b: &[String]) -> bool {
    const LEARNED: [&str; 4] = ["--size", "--replica", "--min-healthy-replicas", "--rebuild-mib-per-sec"];
    let strip = |v: &[String]| -> Vec<String> {
        let mut out = Vec::new();
        let mut skip = false;
        for x in v {
            if skip {
                skip = false;
            } else if LEARNED.contains(&x.as_str()) {
                skip = true;
            } else {
                out.push(x.clone());
            }
        }
        out
    };
    strip(a) == strip(b)
}

/// Stops a process that a ready file names and that no supervisor watches: SIGTERM, then SIGKILL.
async fn kill_unwatched(ready_file: &Path) {
    let Some((pid, _)) = crate::supervise::read_ready(ready_file) else { return };
    let needle = ready_file.display().to_string();
    if !crate::supervise::process_matches(pid, &needle) {
        return;
    }
    let p = nix::unistd::Pid::from_raw(pid.cast_signed());
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGTERM);
    for _ in 0..500 {
        if !crate::supervise::process_matches(pid, &needle) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
}

fn ready_str<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(serde_json::Value::as_str)
}

#[async_trait::async_trait]
impl Orchestrator for LocalOrchestrator {
    fn node_lost(&self, name: &str) -> bool {
        self.node(name).map_or(true, |n| !node_reachable(n))
    }

    fn nodes(&self) -> Vec<NodeInfo> {
        // A node whose directory is gone gets nothing new.
        self.cfg
            .nodes
            .iter()
            .filter(|n| node_reachable(n))
            .map(|n| NodeInfo {
                name: n.name.clone(),
                zone: n.zone.clone(),
                capacity: n.capacity.or_else(|| filesystem_size(&n.dir)).unwrap_or(0),
                compute: None,
            })
            .collect()
    }

    fn check(&self) -> Result<()> {
        for bin in ["barnacle-replica", "barnacle-engine"] {
            let p = self.cfg.bin_dir.join(bin);
            if !p.is_file() {
                return Err(ControllerError::FailedPrecondition(format!("{} not found", p.display())));
            }
        }
        for n in &self.cfg.nodes {
            if !n.dir.join("run").is_dir() {
                return Err(ControllerError::FailedPrecondition(format!(
                    "node {}: {} is missing",
                    n.name,
                    n.dir.display()
                )));
            }
        }
        Ok(())
    }

    async fn create_token(&self, volume_id: &str) -> Result<String> {
        let path = self.token_file(volume_id);
        let vid = volume_id.to_owned();
        tokio::task::spawn_blocking(move || -> Result<String> {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            match std::fs::read_to_string(&path) {
                Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_owned()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(orch(&vid, format!("reading its token: {e}"))),
            }
            let token = crate::orchestrator::new_token();
            let tmp = path.with_extension("tmp");
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| orch(&vid, format!("writing its token: {e}")))?;
            f.write_all(token.as_bytes())
                .and_then(|()| f.sync_all())
                .and_then(|()| std::fs::rename(&tmp, &path))
                .map_err(|e| orch(&vid, format!("writing its token: {e}")))?;
            Ok(token)
        })
        .await
        .map_err(|e| orch(volume_id, e))?
    }

    async fn token(&self, volume_id: &str) -> Result<String> {
        match tokio::fs::read_to_string(self.token_file(volume_id)).await {
            Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_owned()),
            Ok(_) => Err(orch(volume_id, "its token file is empty")),
            Err(e) => Err(orch(volume_id, format!("reading its token: {e}"))),
        }
    }

    fn authority(&self, volume_id: &str, create: bool) -> Result<Option<Arc<dyn MembershipAuthority>>> {
        let dir = self.cfg.state_dir.join("membership").join(volume_id);
        if !create && !dir.is_dir() {
            return Ok(None);
        }
        let a = FileAuthority::new(&dir).map_err(|e| orch(volume_id, e))?;
        Ok(Some(Arc::new(a)))
    }

    async fn ensure_replica(
        &self,
        volume: &VolumeRecord,
        replica: &ReplicaPlacement,
        create_size: Option<u64>,
    ) -> Result<ReplicaEndpoint> {
        let spec = self.replica_spec(&volume.id, replica, create_size)?;
        let key = format!("replica/{}/{}", volume.id, replica.id);
        let p = self.supervise(&key, spec).await;
        let running = p.ready(READY_TIMEOUT).await.map_err(|e| orch(&volume.id, e))?;
        let node = self.node(&replica.node)?;
        let mgmt = ready_str(&running.ready, "mgmt")
            .ok_or_else(|| orch(&volume.id, "replica ready file has no mgmt address"))?;
        Ok(ReplicaEndpoint {
            data: format!("unix:{}", Self::replica_socket(node, &volume.id, &replica.id).display()),
            mgmt: format!("http://{mgmt}"),
        })
    }

    fn adopt_replica(&self, volume: &VolumeRecord, replica: &ReplicaPlacement) {
        let Ok(spec) = self.replica_spec(&volume.id, replica, None) else { return };
        let alive = crate::supervise::read_ready(&spec.ready_file).is_some_and(|(pid, _)| {
            crate::supervise::process_matches(pid, &spec.ready_file.display().to_string())
        });
        let key = format!("replica/{}/{}", volume.id, replica.id);
        if alive {
            self.procs.lock().entry(key).or_insert_with(|| Supervised::start(spec));
        }
    }

    fn kill_replica(&self, volume_id: &str, replica: &ReplicaPlacement) -> Result<u32> {
        let spec = self.replica_spec(volume_id, replica, None)?;
        let needle = spec.ready_file.display().to_string();
        let (pid, _) = crate::supervise::read_ready(&spec.ready_file)
            .filter(|(pid, _)| crate::supervise::process_matches(*pid, &needle))
            .ok_or_else(|| {
                ControllerError::FailedPrecondition(format!(
                    "replica {} of {volume_id} is not running",
                    replica.id
                ))
            })?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid.cast_signed()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .map_err(|e| orch(volume_id, format!("killing replica {}: {e}", replica.id)))?;
        tracing::warn!(volume_id, replica = %replica.id, pid, "replica killed on request");
        Ok(pid)
    }

    fn clone_target_name(&self, volume_id: &str, replica: &ReplicaPlacement) -> String {
        format!("{volume_id}-{}", replica.id)
    }

    async fn remove_replica(&self, volume_id: &str, replica: &ReplicaPlacement) -> Result<()> {
        self.unsupervise(&format!("replica/{volume_id}/{}", replica.id)).await;
        // One that no controller watches (started before a crash and never adopted) goes too.
        if let Ok(spec) = self.replica_spec(volume_id, replica, None) {
            kill_unwatched(&spec.ready_file).await;
        }
        let node = self.node(&replica.node)?.clone();
        if !node_reachable(&node) {
            warn!(volume_id, replica = %replica.id, node = %replica.node,
                  "the replica's node directory is unavailable: its data stays there");
            return Ok(());
        }
        let (vid, rid) = (volume_id.to_owned(), replica.id.clone());
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let dir = Self::replica_dir(&node, &vid, &rid);
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            let run = node.dir.join("run");
            for f in [run.join(format!("{vid}-{rid}.sock")), run.join(format!("{vid}-{rid}.ready"))] {
                let _ = std::fs::remove_file(f);
            }
            let _ = std::fs::remove_file(node.dir.join("logs").join(format!("{vid}-{rid}.log")));
            Ok(())
        })
        .await
        .map_err(|e| orch(volume_id, e))?
        .map_err(|e| orch(volume_id, format!("removing replica {}: {e}", replica.id)))?;
        info!(volume_id, replica = %replica.id, node = %replica.node, "replica removed");
        Ok(())
    }

    async fn ensure_engine(
        &self,
        volume: &VolumeRecord,
        attachment: &Attachment,
        replicas: &[(String, String)],
    ) -> Result<EngineEndpoint> {
        let (spec, socket) = self.engine_spec(volume, attachment, replicas)?;
        let key = format!("engine/{}", volume.id);
        let p = self.supervise(&key, spec).await;
        let running = p.ready(READY_TIMEOUT).await.map_err(|e| orch(&volume.id, e))?;
        let mgmt = ready_str(&running.ready, "mgmt")
            .ok_or_else(|| orch(&volume.id, "engine ready file has no mgmt address"))?;
        Ok(EngineEndpoint {
            nbd_socket: socket,
            mgmt: format!("http://{mgmt}"),
            generation: attachment.generation,
        })
    }

    fn engine(&self, volume_id: &str) -> Option<EngineEndpoint> {
        let p = self.procs.lock().get(&format!("engine/{volume_id}")).cloned()?;
        let running = p.running()?;
        let socket = ready_str(&running.ready, "socket")?;
        let generation = socket.rsplit_once(".g")?.1.strip_suffix(".nbd")?.parse().ok()?;
        Some(EngineEndpoint {
            nbd_socket: PathBuf::from(socket),
            mgmt: format!("http://{}", ready_str(&running.ready, "mgmt")?),
            generation,
        })
    }

    async fn stop_engine(&self, volume_id: &str) -> Result<()> {
        let key = format!("engine/{volume_id}");
        self.unsupervise(&key).await;
        // An engine no controller watches (on any node) goes too, before its ready file does.
        for n in &self.cfg.nodes {
            kill_unwatched(&n.dir.join("run").join(format!("{volume_id}-engine.ready"))).await;
        }
        // Sockets of any generation on any node.
        for n in &self.cfg.nodes {
            if let Ok(entries) = std::fs::read_dir(n.dir.join("run")) {
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.starts_with(&format!("{volume_id}.g")) && name.ends_with(".nbd")
                        || name == format!("{volume_id}-engine.ready")
                    {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
        Ok(())
    }

    async fn forget_volume(&self, volume_id: &str) -> Result<()> {
        let _ = std::fs::remove_file(self.token_file(volume_id));
        match std::fs::remove_dir_all(self.cfg.state_dir.join("membership").join(volume_id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(orch(volume_id, e)),
            _ => Ok(()),
        }?;
        for n in &self.cfg.nodes {
            let _ = std::fs::remove_file(n.dir.join("logs").join(format!("{volume_id}-engine.log")));
        }
        Ok(())
    }

    async fn shutdown(&self) {
        let procs: Vec<Arc<Supervised>> = self.procs.lock().drain().map(|(_, p)| p).collect();
        let stop = self.cfg.stop_on_exit;
        futures::future::join_all(procs.iter().map(|p| async move {
            if stop {
                p.stop().await;
            } else {
                p.detach().await;
            }
        }))
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_flags_parse() {
        let n = LocalNode::parse("n1=/var/lib/b/n1,zone=a,capacity=10GiB").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n.name, "n1");
        assert_eq!(n.dir, PathBuf::from("/var/lib/b/n1"));
        assert_eq!(n.zone.as_deref(), Some("a"));
        assert_eq!(n.capacity, Some(10 << 30));
        for bad in ["n1", "=/x", "n1=", "n 1=/x", "n1=/x,rack=3", "n1=/x,capacity=lots"] {
            assert!(LocalNode::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn what_a_process_learns_elsewhere_does_not_distinguish_processes() {
        let a: Vec<String> = ["--dir", "d", "--size", "10"].map(String::from).to_vec();
        let b: Vec<String> = ["--dir", "d"].map(String::from).to_vec();
        let c: Vec<String> = ["--dir", "e"].map(String::from).to_vec();
        assert!(same_args(&a, &b));
        assert!(!same_args(&b, &c));
        // An engine whose replica set or settings were modified keeps serving.
        let e1: Vec<String> =
            ["--volume-id", "v", "--replica", "r0=a", "--replica", "r1=b", "--min-healthy-replicas", "1"]
                .map(String::from)
                .to_vec();
        let e2: Vec<String> = ["--volume-id", "v", "--replica", "r0=a", "--min-healthy-replicas", "2"]
            .map(String::from)
            .to_vec();
        let e3: Vec<String> = ["--volume-id", "w", "--replica", "r0=a"].map(String::from).to_vec();
        assert!(same_args(&e1, &e2));
        assert!(!same_args(&e1, &e3));
    }
}
