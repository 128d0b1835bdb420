//! Helpers shared by the workspace integration tests: finding and starting the real binaries,
//! and scratch filesystems on loop devices.

#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

pub mod chaos;
pub mod cluster;
pub mod k8s;
pub mod netns;
pub mod sidecars;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary, next to the test executable's `deps/` directory. `.ci/run` builds
/// every binary before the tests run.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let dir = if dir.ends_with("deps") { dir.parent().unwrap() } else { dir };
    let p = dir.join(name);
    assert!(p.exists(), "{} not built (run `cargo build --workspace --bins`)", p.display());
    p
}

/// A running `barnacle-replica` process. Killed with SIGKILL on drop.
#[derive(Debug)]
pub struct ReplicaProcess {
    pub child: Child,
    pub data: SocketAddr,
    pub mgmt: SocketAddr,
    /// The data protocol on a unix socket, as an engine address (`unix:PATH`).
    pub unix: String,
    dir: PathBuf,
    volume_id: String,
    token_file: PathBuf,
    log: PathBuf,
    /// Further arguments it was started with (kept for a restart).
    extra: Vec<String>,
    /// The network namespace it runs in.
    netns: Option<String>,
}

impl ReplicaProcess {
    /// Starts a replica serving `dir`; `size` creates the store if absent. The token is read
    /// from `token_file`, never from argv.
    pub fn start(
        dir: &Path,
        volume_id: &str,
        token_file: &Path,
        size: Option<&str>,
        log: &Path,
    ) -> ReplicaProcess {
        Self::start_at(dir, volume_id, token_file, size, log, None)
    }

    /// Like [`ReplicaProcess::start_at`], inside network namespace `netns`, with further
    /// arguments (a restart keeps both).
    #[allow(clippy::too_many_arguments)]
    pub fn start_in_netns(
        netns: &str,
        dir: &Path,
        volume_id: &str,
        token_file: &Path,
        size: Option<&str>,
        log: &Path,
        listen: SocketAddr,
        extra: &[&str],
    ) -> ReplicaProcess {
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        Self::spawn(Some(netns), dir, volume_id, token_file, size, log, Some(listen), &extra)
    }

    /// Like [`ReplicaProcess::start`], with further arguments (kept for a restart).
    pub fn start_with(
        dir: &Path,
        volume_id: &str,
        token_file: &Path,
        size: Option<&str>,
        log: &Path,
        extra: &[&str],
    ) -> ReplicaProcess {
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        Self::spawn(None, dir, volume_id, token_file, size, log, None, &extra)
    }

    /// Arms disk faults in its store through the management API (it must have been started
    /// with `--fault-injection`); an empty list disarms.
    pub async fn inject_faults(&self, token: &str, faults: Vec<barnacle_replica::mgmt::pb::Fault>) {
        use barnacle_replica::mgmt::pb::{InjectFaultsRequest, replica_manager_client::ReplicaManagerClient};
        let mut c = ReplicaManagerClient::connect(format!("http://{}", self.mgmt)).await.unwrap();
        let mut req = tonic::Request::new(InjectFaultsRequest { faults });
        req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        c.inject_faults(req).await.unwrap();
    }

    /// Starts it again (after [`ReplicaProcess::kill`]) on the same store and data address.
    pub fn restart(&mut self) {
        self.kill();
        let (extra, netns) = (self.extra.clone(), self.netns.clone());
        *self = Self::spawn(
            netns.as_deref(),
            &self.dir,
            &self.volume_id,
            &self.token_file,
            None,
            &self.log,
            Some(self.data),
            &extra,
        );
    }

    /// Like [`ReplicaProcess::start`], on data address `listen` if given.
    pub fn start_at(
        dir: &Path,
        volume_id: &str,
        token_file: &Path,
        size: Option<&str>,
        log: &Path,
        listen: Option<SocketAddr>,
    ) -> ReplicaProcess {
        Self::spawn(None, dir, volume_id, token_file, size, log, listen, &[])
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        netns: Option<&str>,
        dir: &Path,
        volume_id: &str,
        token_file: &Path,
        size: Option<&str>,
        log: &Path,
        listen: Option<SocketAddr>,
        extra: &[String],
    ) -> ReplicaProcess {
        let ready = dir.with_extension("ready");
        let _ = std::fs::remove_file(&ready);
        let mut cmd = in_netns(netns, &binary("barnacle-replica"));
        cmd.arg("--dir").arg(dir).arg("--volume-id").arg(volume_id).arg("--token-file").arg(token_file);
        cmd.arg("--ready-file").arg(&ready);
        if let Some(s) = size {
            cmd.arg("--size").arg(s);
        }
        if let Some(a) = listen {
            cmd.arg("--listen").arg(a.to_string());
        }
        let sock = dir.with_extension("sock");
        cmd.arg("--listen-unix").arg(&sock).args(extra);
        let logf = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(logf);
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(body) = std::fs::read_to_string(&ready) {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                let data = v["data"].as_str().unwrap().parse().unwrap();
                let mgmt = v["mgmt"].as_str().unwrap().parse().unwrap();
                return ReplicaProcess {
                    child,
                    data,
                    mgmt,
                    unix: format!("unix:{}", sock.display()),
                    dir: dir.to_owned(),
                    volume_id: volume_id.to_owned(),
                    token_file: token_file.to_owned(),
                    log: log.to_owned(),
                    extra: extra.to_vec(),
                    netns: netns.map(str::to_owned),
                };
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "replica exited early with {status}; log: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "replica did not become ready");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ReplicaProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A command running `program`, inside network namespace `netns` if given (`ip netns exec`
/// execs it, so the child's pid is the program's).
fn in_netns(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// A loop device over a sparse file of `size_mib` MiB; detached on drop. Needs root.
#[derive(Debug)]
pub struct LoopDevice {
    pub path: PathBuf,
    backing: tempfile::TempDir,
}

impl LoopDevice {
    pub fn new(size_mib: u64) -> LoopDevice {
        let backing = tempfile::tempdir().unwrap();
        let img = backing.path().join("disk.img");
        std::fs::File::create(&img).unwrap().set_len(size_mib << 20).unwrap();
        let path = String::from_utf8(run("losetup", &["--find", "--show", img.to_str().unwrap()]).stdout)
            .unwrap()
            .trim()
            .into();
        LoopDevice { path, backing }
    }

    /// A scratch directory that lives as long as the device.
    pub fn scratch(&self) -> &Path {
        self.backing.path()
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// A filesystem of `size_mib` MiB made with `mkfs` (e.g. "xfs", "ext4") on a [`LoopDevice`],
/// mounted at `mountpoint`; unmounted on drop. Needs root.
#[derive(Debug)]
pub struct LoopFs {
    pub mountpoint: PathBuf,
    /// Held for its `Drop`: detached after the unmount below.
    _device: LoopDevice,
}

impl LoopFs {
    pub fn new(fstype: &str, size_mib: u64) -> LoopFs {
        let device = LoopDevice::new(size_mib);
        let dev = device.path.to_str().unwrap().to_owned();
        let mkfs = format!("mkfs.{fstype}");
        let force = if fstype == "xfs" { "-f" } else { "-F" };
        run(&mkfs, &["-q", force, &dev]);
        let mountpoint = device.scratch().join("mnt");
        std::fs::create_dir(&mountpoint).unwrap();
        run("mount", &[&dev, mountpoint.to_str().unwrap()]);
        LoopFs { mountpoint, _device: device }
    }

    /// Bytes the filesystem reports in use (statvfs).
    pub fn used_bytes(&self) -> u64 {
        let s = nix::sys::statvfs::statvfs(&self.mountpoint).unwrap();
        (s.blocks() - s.blocks_free()) * s.fragment_size()
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mountpoint).status();
    }
}

/// A running `barnacle-engine` serving NBD on loopback TCP (and optionally a unix socket).
/// Killed with SIGKILL on drop.
#[derive(Debug)]
pub struct EngineProcess {
    pub child: Child,
    pub nbd: SocketAddr,
    /// The gRPC management API.
    pub mgmt: SocketAddr,
    /// The Prometheus endpoint (`/metrics`).
    pub metrics: SocketAddr,
    /// Bytes the engine resynced at start (regions marked dirty by the previous incarnation).
    pub resynced_bytes: u64,
}

impl EngineProcess {
    /// Starts an engine for `volume_id` over `replicas` (id, data address), its membership record
    /// in `state_dir`.
    pub fn start(
        volume_id: &str,
        token_file: &Path,
        replicas: &[(String, SocketAddr)],
        state_dir: &Path,
        extra: &[&str],
        log: &Path,
    ) -> EngineProcess {
        Self::start_in(None, volume_id, token_file, replicas, state_dir, extra, log)
    }

    /// Like [`EngineProcess::start`], inside network namespace `netns` if given (its NBD, metrics
    /// and management addresses are then that namespace's loopback: reach the export through a
    /// unix socket passed in `extra`).
    pub fn start_in(
        netns: Option<&str>,
        volume_id: &str,
        token_file: &Path,
        replicas: &[(String, SocketAddr)],
        state_dir: &Path,
        extra: &[&str],
        log: &Path,
    ) -> EngineProcess {
        // Unique per start: two engines may share one state directory (one authority).
        static STARTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ready = state_dir.join(format!("engine-{n}.ready"));
        let _ = std::fs::remove_file(&ready);
        let mut cmd = in_netns(netns, &binary("barnacle-engine"));
        cmd.arg("--volume-id").arg(volume_id).arg("--token-file").arg(token_file);
        cmd.arg("--state-dir").arg(state_dir).arg("--nbd-listen").arg("127.0.0.1:0");
        cmd.arg("--ready-file").arg(&ready).args(extra);
        for (id, addr) in replicas {
            cmd.arg("--replica").arg(format!("{id}={addr}"));
        }
        let logf = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(logf);
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(body) = std::fs::read_to_string(&ready) {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                let nbd = v["nbd"].as_str().unwrap().parse().unwrap();
                let resynced_bytes = v["resynced_bytes"].as_u64().unwrap();
                let mgmt = v["mgmt"].as_str().unwrap().parse().unwrap();
                let metrics = v["metrics"].as_str().unwrap().parse().unwrap();
                return EngineProcess { child, nbd, mgmt, metrics, resynced_bytes };
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "engine exited early with {status}; log: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "engine did not become ready");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The export's NBD URI.
    pub fn uri(&self, volume_id: &str) -> String {
        format!("nbd://{}/{volume_id}", self.nbd)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the engine with SIGTERM and waits for it.
    pub fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a command, returning its output; panics with stderr when it fails.
pub fn run_ok(cmd: &str, args: &[&str]) -> std::process::Output {
    run(cmd, args)
}

/// Reads the first `len` bytes of each replica directly, taking `epoch` for a throw-away engine
/// identity (so only after the volume's engine stopped: this fences it out).
pub async fn replica_images(
    data: &[SocketAddr],
    volume_id: &str,
    token: &str,
    epoch: u64,
    len: u64,
) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for addr in data {
        let c = fenced_client(*addr, volume_id, token, epoch).await;
        let mut all = Vec::new();
        for off in (0..len).step_by(4 << 20) {
            let n = u32::try_from((len - off).min(4 << 20)).unwrap();
            all.extend_from_slice(&c.read(off, n).await.unwrap());
        }
        out.push(all);
    }
    out
}

/// A replica client that fenced `epoch` in for a new engine identity.
pub async fn fenced_client(
    addr: SocketAddr,
    volume_id: &str,
    token: &str,
    epoch: u64,
) -> barnacle_replica::client::ReplicaClient {
    let engine = uuid::Uuid::new_v4();
    let cfg = barnacle_replica::client::ClientConfig {
        volume_id: volume_id.into(),
        token: token.into(),
        engine_id: engine,
        epoch,
        request_timeout: Duration::from_secs(30),
        heartbeat: Duration::ZERO,
    };
    let c = barnacle_replica::client::ReplicaClient::connect(addr, cfg).await.unwrap();
    c.fence(epoch, engine).await.unwrap();
    c
}

/// `GET path` over plain HTTP/1.0; returns the body.
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"), "{out}");
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()
}

/// The value of the first sample of `metric` whose line contains every one of `labels`.
pub fn metric(body: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(metric))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Starts fio writing 4 KiB blocks at random over the first `size_mib` MiB through NBD `uri`,
/// 8 in flight, then reading everything back against crc32c checksums; JSON report to `out`.
pub fn fio_verified_load(uri: &str, size_mib: u64, out: &Path) -> Child {
    fio_verified_load_bs(uri, size_mib, out, "--bs=4k")
}

/// [`fio_verified_load`] with another block size option (`--bs=...` or `--bsrange=...`).
pub fn fio_verified_load_bs(uri: &str, size_mib: u64, out: &Path, bs: &str) -> Child {
    fio_verified_load_with(uri, size_mib, out, &[bs])
}

/// [`fio_verified_load`] with `extra` options (a block size, a rate, …) in place of `--bs=4k`.
pub fn fio_verified_load_with(uri: &str, size_mib: u64, out: &Path, extra: &[&str]) -> Child {
    Command::new("fio")
        .args([
            "--name=load",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            &format!("--size={size_mib}m"),
            "--iodepth=8",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--randrepeat=0",
            "--output-format=json",
            &format!("--output={}", out.display()),
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for a [`fio_verified_load`] and asserts it succeeded with no verify error and verified
/// its whole `size_mib`.
pub fn fio_verified_ok(child: Child, out: &Path, size_mib: u64) {
    let o = child.wait_with_output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(out).unwrap_or_default())
        .unwrap_or_else(|_| panic!("fio failed: {}", String::from_utf8_lossy(&o.stderr)));
    assert!(o.status.success(), "fio failed: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(report["jobs"][0]["error"].as_u64(), Some(0), "{report}");
    assert!(
        report["jobs"][0]["read"]["io_bytes"].as_u64().unwrap() >= size_mib << 20,
        "fio did not verify everything"
    );
}

/// Pids of live processes whose command line mentions `needle` (a test's scratch directory).
pub fn processes_mentioning(needle: &Path) -> Vec<i32> {
    let needle = needle.display().to_string();
    let me = std::process::id();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if pid.cast_unsigned() == me {
            continue;
        }
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        if stat.rsplit_once(')').and_then(|(_, r)| r.trim_start().chars().next()) == Some('Z') {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            out.push(pid);
        }
    }
    out
}

/// SIGKILLs every process whose command line mentions `needle`.
pub fn kill_processes_mentioning(needle: &Path) {
    for pid in processes_mentioning(needle) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

/// A `barnacle-controller` with the local orchestrator over `nodes` node directories under
/// `root` (`root/nodes/n1`, …), its state in `root/state`, its CSI socket `root/csi.sock`.
/// Dropping it kills the controller and every replica and engine it started.
#[derive(Debug)]
pub struct ControllerProcess {
    pub child: Child,
    pub root: PathBuf,
    pub socket: PathBuf,
    pub nodes: Vec<String>,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    name: String,
    log: PathBuf,
}

impl ControllerProcess {
    pub fn start(root: &Path, nodes: usize) -> ControllerProcess {
        Self::start_with(root, nodes, &[])
    }

    /// [`ControllerProcess::start`] with further arguments.
    pub fn start_with(root: &Path, nodes: usize, extra: &[&str]) -> ControllerProcess {
        let names: Vec<String> = (1..=nodes).map(|i| format!("n{i}")).collect();
        let mut args = vec!["--endpoint".to_owned(), format!("unix://{}", root.join("csi.sock").display())];
        args.extend(["--state-dir".to_owned(), root.join("state").display().to_string()]);
        for n in &names {
            args.extend(["--node".to_owned(), format!("{n}={}", root.join("nodes").join(n).display())]);
        }
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        ControllerProcess::with_args(root, "controller", names, args, Vec::new())
    }

    /// A controller named `name` (its socket, ready file and log are `<root>/<name>.*`) with
    /// `args` after `--endpoint`.
    pub fn with_args(
        root: &Path,
        name: &str,
        nodes: Vec<String>,
        mut args: Vec<String>,
        envs: Vec<(String, String)>,
    ) -> ControllerProcess {
        let socket =
            if name == "controller" { root.join("csi.sock") } else { root.join(format!("{name}.sock")) };
        if !args.iter().any(|a| a == "--endpoint") {
            args.splice(0..0, ["--endpoint".to_owned(), format!("unix://{}", socket.display())]);
        }
        let mut c = ControllerProcess {
            child: Command::new("true").spawn().unwrap(),
            root: root.to_owned(),
            socket,
            nodes,
            args,
            envs,
            name: name.to_owned(),
            log: root.join(format!("{name}.log")),
        };
        let _ = c.child.wait();
        c.spawn();
        c
    }

    fn spawn(&mut self) {
        let ready = self.root.join(format!("{}.ready", self.name));
        let _ = std::fs::remove_file(&ready);
        let logf = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        self.child = Command::new(binary("barnacle-controller"))
            .args(&self.args)
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", "info")
            .envs(self.envs.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("controller exited early with {status}; log:\n{}", self.log_text());
            }
            assert!(Instant::now() < deadline, "controller did not become ready");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, leaving the replicas and engines running.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the controller again on the same state.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Clients of the Identity and Controller services.
    pub fn clients(
        &self,
    ) -> (
        csi_proto::v1::identity_client::IdentityClient<tonic::transport::Channel>,
        csi_proto::v1::controller_client::ControllerClient<tonic::transport::Channel>,
    ) {
        let ch = csi_proto::unix_channel(&self.socket.display().to_string()).unwrap();
        (
            csi_proto::v1::identity_client::IdentityClient::new(ch.clone()),
            csi_proto::v1::controller_client::ControllerClient::new(ch),
        )
    }

    /// Waits until Probe says ready (existing volumes' processes looked after).
    pub async fn wait_probe_ready(&self) {
        let (mut id, _) = self.clients();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = id.probe(csi_proto::v1::ProbeRequest {}).await
                && r.into_inner().ready == Some(true)
            {
                return;
            }
            assert!(Instant::now() < deadline, "controller never ready; log:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        self.kill();
        kill_processes_mentioning(&self.root);
    }
}

/// A single-node-writer capability: Block, or Mount with `fs_type`.
pub fn csi_capability(block: bool, fs_type: &str) -> csi_proto::v1::VolumeCapability {
    use csi_proto::v1::volume_capability::{
        AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode,
    };
    csi_proto::v1::VolumeCapability {
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
        access_type: Some(if block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume { fs_type: fs_type.to_owned(), ..Default::default() })
        }),
    }
}

/// A `barnacle-node` for node `node_id`, its state in `root/node-<id>`, its CSI socket
/// `root/node-<id>.sock`. Dropping it kills the plugin (not what it attached: see
/// [`cleanup_attachments`]).
#[derive(Debug)]
pub struct NodeProcess {
    pub child: Child,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    log: PathBuf,
}

impl NodeProcess {
    pub fn start(root: &Path, node_id: &str, extra: &[&str]) -> NodeProcess {
        let socket = root.join(format!("node-{node_id}.sock"));
        let state_dir = root.join(format!("node-{node_id}"));
        let log = root.join(format!("node-{node_id}.log"));
        let ready = root.join(format!("node-{node_id}.ready"));
        let _ = std::fs::remove_file(&ready);
        let logf = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let mut child = Command::new(binary("barnacle-node"))
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .args(["--node-id", node_id, "--zone", "z1"])
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--ready-file")
            .arg(&ready)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "node plugin exited early with {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "node plugin did not become ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        NodeProcess { child, socket, state_dir, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn clients(
        &self,
    ) -> (
        csi_proto::v1::identity_client::IdentityClient<tonic::transport::Channel>,
        csi_proto::v1::node_client::NodeClient<tonic::transport::Channel>,
    ) {
        let ch = csi_proto::unix_channel(&self.socket.display().to_string()).unwrap();
        (
            csi_proto::v1::identity_client::IdentityClient::new(ch.clone()),
            csi_proto::v1::node_client::NodeClient::new(ch),
        )
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Mount points under `root`, deepest first.
pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut out: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(root))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out
}

/// Loop devices whose backing file is under `root`, and loop devices over those.
pub fn loops_under(root: &Path) -> Vec<PathBuf> {
    let loops: Vec<(PathBuf, PathBuf)> = std::fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let b = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            Some((
                PathBuf::from(format!("/dev/{}", e.file_name().to_string_lossy())),
                PathBuf::from(b.trim_end()),
            ))
        })
        .collect();
    let direct: Vec<PathBuf> =
        loops.iter().filter(|(_, b)| b.starts_with(root)).map(|(d, _)| d.clone()).collect();
    // Loop devices over those (read-only Block publications'), listed first: they go first.
    let mut out: Vec<PathBuf> =
        loops.iter().filter(|(_, b)| direct.contains(b)).map(|(d, _)| d.clone()).collect();
    out.extend(direct);
    out
}

/// Removes whatever a failed test left attached under `root`: loop devices, then mounts.
pub fn cleanup_attachments(root: &Path) {
    for dev in loops_under(root) {
        let _ = Command::new("losetup").arg("-d").arg(&dev).status();
    }
    for m in mounts_under(root) {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A fault injector in front of a real replica's data port: a TCP proxy that passes the replica
/// protocol through request by request until the first request `stall_on` picks, and from then
/// on forwards nothing more on that connection in either direction, holding it open: a replica
/// that hangs at one exact step of a protocol exchange. Connections made later pass untouched.
#[derive(Debug)]
pub struct StallProxy {
    pub addr: SocketAddr,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
    shutdown: tokio_util::sync::CancellationToken,
}

impl StallProxy {
    pub fn start(target: SocketAddr, stall_on: fn(&barnacle_replica::wire::Op) -> bool) -> StallProxy {
        use futures::{SinkExt, StreamExt};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stalled = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let shutdown = tokio_util::sync::CancellationToken::new();
        let (st, sd) = (stalled.clone(), shutdown.clone());
        // A runtime of its own: the test's may be blocked waiting for a process to start.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let (engine, _) = tokio::select! {
                        () = sd.cancelled() => return,
                        a = listener.accept() => a.unwrap(),
                    };
                    let (st, sd) = (st.clone(), sd.clone());
                    tokio::spawn(async move {
                        let Ok(replica) = tokio::net::TcpStream::connect(target).await else { return };
                        let (erd, mut ewr) = engine.into_split();
                        let (mut rrd, rwr) = replica.into_split();
                        let stall = tokio_util::sync::CancellationToken::new();
                        let mut requests = tokio_util::codec::FramedRead::new(
                            erd,
                            barnacle_replica::wire::ServerCodec::default(),
                        );
                        let mut upstream = tokio_util::codec::FramedWrite::new(
                            rwr,
                            barnacle_replica::wire::ClientCodec::default(),
                        );
                        let replies = {
                            let stall = stall.clone();
                            async move {
                                let mut buf = vec![0u8; 1 << 16];
                                loop {
                                    let n = tokio::select! {
                                        () = stall.cancelled() => break,
                                        n = tokio::io::AsyncReadExt::read(&mut rrd, &mut buf) => n,
                                    };
                                    let Ok(n @ 1..) = n else { break };
                                    if tokio::io::AsyncWriteExt::write_all(&mut ewr, &buf[..n]).await.is_err()
                                    {
                                        break;
                                    }
                                }
                                (rrd, ewr)
                            }
                        };
                        let stalled_here = stall.clone();
                        let forward = async move {
                            while let Some(Ok(req)) = requests.next().await {
                                if stall_on(&req.op) && !st.swap(true, Ordering::SeqCst) {
                                    stall.cancel();
                                    break;
                                }
                                if upstream.send(req).await.is_err() {
                                    break;
                                }
                            }
                            (requests, upstream)
                        };
                        let held = tokio::join!(replies, forward);
                        // A stalled connection stays open and silent until the proxy stops,
                        // rather than closing.
                        if stalled_here.is_cancelled() {
                            sd.cancelled().await;
                        }
                        drop(held);
                    });
                }
            });
        });
        StallProxy { addr, stalled, shutdown }
    }

    /// Whether the chosen request arrived (and its connection stalled).
    pub fn stalled(&self) -> bool {
        self.stalled.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
