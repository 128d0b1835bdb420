//! Attaching a volume's NBD export as a block device on this node.
//!
//! With the kernel nbd module the export becomes `/dev/nbdN`: the node negotiates two connections
//! and hands them to the kernel ([`crate::kernel_nbd`]), which keeps the volume's backend
//! identifier.
//! Without it (as on the development machine) the userspace fallback runs `barnacle-nbd-fuse`, a
//! process that mounts a one-file FUSE filesystem over the export, and puts a loop device (4 KiB
//! sectors, the export's block size) on that file.
//!
//! A kernel device whose connections die (its engine restarted) is reconnected by
//! [`Attacher::keep_kernel_devices_connected`], from a record the attach keeps in the state
//! directory.
//!
//! Everything is found again from the kernel's state, so a node plugin that restarted (and lost its
//! memory) can still detach: the FUSE mount is `<state>/fuse/<volume>` (source `barnacle:<volume>`
//! in mountinfo), and the volume's loop device is the one whose backing file is `disk` in it. The
//! helper's command line names the engine's socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{info, warn};

use crate::error::NodeError;
use crate::fuse::DISK_FILE;
use crate::{kernel_nbd, nbd_client, sys};

/// How volumes are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// The kernel nbd module when loaded, else FUSE and a loop device.
    Auto,
    /// The kernel nbd module (fails where it is not loaded).
    Kernel,
    /// FUSE and a loop device.
    Fuse,
}

/// What reconnecting a kernel device needs, kept in `<state>/kernel/<volume>.json` from attach to
/// detach (the kernel itself keeps only the backend identifier).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelRecord {
    pub volume_id: String,
    /// The engine's NBD socket on this node.
    pub socket: PathBuf,
    pub export: String,
    pub generation: String,
    /// `/dev/nbd<index>`.
    pub index: u32,
}

impl KernelRecord {
    pub fn device(&self) -> PathBuf {
        PathBuf::from(format!("/dev/nbd{}", self.index))
    }

    /// Whether its device still serves this attachment (its backend identifier). Reads sysfs.
    pub fn is_current(&self) -> bool {
        let backend = kernel_nbd::backend_id(&self.volume_id, &self.generation);
        kernel_nbd::find(Path::new("/sys/block"), &self.volume_id)
            .is_some_and(|(d, b)| d == self.device() && b == backend)
    }
}

/// A volume's block device on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub device: PathBuf,
    /// The engine's NBD socket the helper serves from (none: the kernel holds the sockets, or
    /// the helper is gone).
    pub socket: Option<PathBuf>,
    /// The export name the helper opened.
    pub export: Option<String>,
    /// For a kernel device: its backend identifier (`barnacle:<volume>:g<generation>`).
    pub backend: Option<String>,
}

/// Attaches and finds volumes' block devices.
#[derive(Debug, Clone)]
pub struct Attacher {
    state_dir: PathBuf,
    helper: PathBuf,
    loop_direct_io: bool,
    /// Attach through the kernel nbd module.
    kernel: bool,
}

/// Kernel nbd: connections per device (the engine advertises multi-connection).
const KERNEL_CONNECTIONS: usize = 2;
/// Kernel nbd request timeout, above the engine's replica timeout (5 s), an authority CAS and an
/// engine restart (DESIGN rule 12).
const KERNEL_TIMEOUT_SECS: u64 = 60;
/// Kernel nbd: how long queued IO waits for a connection to come back.
const KERNEL_DEAD_CONN_SECS: u64 = 120;

/// How long the FUSE helper keeps retrying a lost engine before IO fails.
pub const RECONNECT_PATIENCE: Duration = Duration::from_secs(120);

impl Attacher {
    pub fn new(state_dir: &Path, helper: PathBuf, method: Method, loop_direct_io: bool) -> Attacher {
        let loaded = kernel_nbd::available();
        let kernel = match method {
            Method::Kernel => true,
            Method::Fuse => false,
            Method::Auto => loaded,
        };
        if kernel {
            info!(loaded, "attaching volumes through the kernel nbd module (netlink)");
        } else {
            info!(loop_direct_io, loaded, "attaching volumes through FUSE and a loop device");
        }
        Attacher { state_dir: state_dir.to_owned(), helper, loop_direct_io, kernel }
    }

    pub fn fuse_dir(&self, volume_id: &str) -> PathBuf {
        self.state_dir.join("fuse").join(volume_id)
    }

    fn log_file(&self, volume_id: &str) -> PathBuf {
        self.state_dir.join("logs").join(format!("{volume_id}.fuse.log"))
    }

    /// The volume's device, if attached.
    pub fn find(&self, volume_id: &str) -> Option<Attached> {
        if let Some((device, backend)) = kernel_nbd::find(Path::new("/sys/block"), volume_id) {
            return Some(Attached { device, socket: None, export: None, backend: Some(backend) });
        }
        let disk = self.fuse_dir(volume_id).join(DISK_FILE);
        let device = sys::loop_devices().into_iter().find(|(_, b)| *b == disk).map(|(d, _)| d)?;
        let (socket, export) = self.helper_args(volume_id);
        Some(Attached { device, socket, export, backend: None })
    }

    /// [`Attacher::find`] off the async threads (it reads `/proc`, which can stall on a process
    /// stuck in IO).
    pub async fn find_async(&self, volume_id: &str) -> Option<Attached> {
        let (me, vol) = (self.clone(), volume_id.to_owned());
        tokio::task::spawn_blocking(move || me.find(&vol)).await.ok().flatten()
    }

    /// Volumes attached on this node.
    pub fn attached(&self) -> Vec<(String, PathBuf)> {
        let root = self.state_dir.join("fuse");
        sys::loop_devices()
            .into_iter()
            .filter_map(|(dev, backing)| {
                let vol = backing.strip_prefix(&root).ok()?.parent()?.to_string_lossy().into_owned();
                Some((vol, dev))
            })
            .collect()
    }

    /// Pids of the volume's FUSE helper (normally one).
    fn helper_pids(&self, volume_id: &str) -> Vec<i32> {
        let mnt = self.fuse_dir(volume_id).display().to_string();
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir("/proc") else { return out };
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { continue };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let named = args.windows(2).any(|w| w[0] == b"--mountpoint" && w[1] == mnt.as_bytes());
            if named {
                out.push(pid);
            }
        }
        out
    }

    /// The socket and export of the volume's running helper.
    fn helper_args(&self, volume_id: &str) -> (Option<PathBuf>, Option<String>) {
        let Some(pid) = self.helper_pids(volume_id).first().copied() else { return (None, None) };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return (None, None) };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let arg = |name: &[u8]| {
            args.windows(2).find(|w| w[0] == name).map(|w| String::from_utf8_lossy(w[1]).into_owned())
        };
        (arg(b"--socket").map(PathBuf::from), arg(b"--export"))
    }

    /// Negotiates the kernel's connections with the engine's socket (blocking sockets, for the
    /// kernel to own).
    async fn kernel_sockets(
        socket: &Path,
        export: &str,
    ) -> Result<(Vec<std::os::fd::OwnedFd>, nbd_client::ExportInfo), NodeError> {
        let mut fds = Vec::new();
        let mut info = None;
        for _ in 0..KERNEL_CONNECTIONS {
            let mut s = tokio::net::UnixStream::connect(socket)
                .await
                .map_err(|e| NodeError::Unavailable(format!("connecting to {}: {e}", socket.display())))?;
            let i = nbd_client::negotiate(&mut s, export, true)
                .await
                .map_err(|e| NodeError::Unavailable(format!("negotiating {export}: {e}")))?;
            info = Some(i);
            let s = s.into_std().map_err(|e| NodeError::Internal(e.to_string()))?;
            s.set_nonblocking(false).map_err(|e| NodeError::Internal(e.to_string()))?;
            fds.push(std::os::fd::OwnedFd::from(s));
        }
        let info = info.ok_or_else(|| NodeError::Internal("no connection".into()))?;
        Ok((fds, info))
    }

    fn kernel_record(&self, volume_id: &str, generation: &str) -> PathBuf {
        self.state_dir.join("kernel").join(format!("{volume_id}.g{generation}.json"))
    }

    /// Whether volumes attach through the kernel nbd module.
    pub fn uses_kernel(&self) -> bool {
        self.kernel
    }

    /// How many volumes this node can attach at once, as its attach path limits them (reported
    /// to the CO as NodeGetInfo's `max_volumes_per_node`); see [`attach_limit`].
    pub fn attach_limit(&self) -> i64 {
        attach_limit(Path::new("/sys/module"), self.kernel)
    }

    /// Attaches the export through the kernel: negotiates the connections, then hands them over.
    async fn attach_kernel(
        &self,
        volume_id: &str,
        socket: &Path,
        export: &str,
        generation: &str,
    ) -> Result<PathBuf, NodeError> {
        let backend = kernel_nbd::backend_id(volume_id, generation);
        let (fds, info) = Self::kernel_sockets(socket, export).await?;
        let c = kernel_connect(None, info.size, u64::from(info.flags), backend, &fds);
        // The kernel takes its own references to the sockets; ours close when `fds` drops.
        let index = tokio::task::spawn_blocking(move || {
            let r = kernel_nbd::connect(&c);
            drop(fds);
            r
        })
        .await
        .map_err(|e| NodeError::Internal(e.to_string()))??;
        let device = PathBuf::from(format!("/dev/nbd{index}"));
        let record = KernelRecord {
            volume_id: volume_id.to_owned(),
            socket: socket.to_owned(),
            export: export.to_owned(),
            generation: generation.to_owned(),
            index,
        };
        let path = self.kernel_record(volume_id, generation);
        let write = async {
            tokio::fs::create_dir_all(path.parent().unwrap_or(&self.state_dir)).await?;
            let tmp = path.with_extension("tmp");
            tokio::fs::write(&tmp, serde_json::to_vec(&record)?).await?;
            tokio::fs::rename(&tmp, &path).await
        };
        if let Err(e) = write.await {
            // The device works; only a reconnect after an engine restart would be missed.
            warn!(volume_id, error = %e, "the kernel device's record was not written");
        }
        info!(volume_id, device = %device.display(), socket = %socket.display(), "attached through the kernel nbd module");
        Ok(device)
    }

    /// The records of kernel devices that still serve their attachment; the others (the device
    /// is gone, or carries another backend now) are removed, and so are unreadable ones.
    pub async fn current_kernel_records(&self) -> Vec<KernelRecord> {
        let mut out = Vec::new();
        let Ok(mut dir) = tokio::fs::read_dir(self.state_dir.join("kernel")).await else { return out };
        while let Ok(Some(e)) = dir.next_entry().await {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let record = match tokio::fs::read(&path)
                .await
                .map(|t| serde_json::from_slice::<KernelRecord>(&t))
            {
                Ok(Ok(r)) => r,
                Ok(Err(err)) => {
                    warn!(record = %path.display(), error = %err, "unreadable kernel device record; removing it");
                    let _ = tokio::fs::remove_file(&path).await;
                    continue;
                }
                Err(_) => continue,
            };
            if record.is_current() {
                out.push(record);
            } else {
                // Named by generation: a newer attachment's record is another file.
                let _ = tokio::fs::remove_file(&path).await;
            }
        }
        out
    }

    /// Gives the recorded device connections negotiated with its engine's socket again
    /// (`NBD_CMD_RECONFIGURE`, which replaces dead ones; for a device with none dead the kernel
    /// takes nothing and answers success).
    pub async fn reconnect_kernel(&self, record: &KernelRecord) -> Result<(), NodeError> {
        let negotiation = tokio::time::timeout(
            Duration::from_secs(10),
            Self::kernel_sockets(&record.socket, &record.export),
        );
        let (fds, info) = negotiation.await.map_err(|_| {
            NodeError::Unavailable(format!("{} did not negotiate in 10 s", record.socket.display()))
        })??;
        let c = kernel_connect(Some(record.index), info.size, u64::from(info.flags), String::new(), &fds);
        let r = record.clone();
        tokio::task::spawn_blocking(move || {
            // Checked again right before: the device index may have gone to another volume
            // while the connections were negotiated, and the kernel does not check the backend.
            if !r.is_current() {
                return Err(NodeError::NotFound(format!(
                    "{} no longer serves volume {}",
                    r.device().display(),
                    r.volume_id
                )));
            }
            let res = kernel_nbd::reconfigure(&c);
            drop(fds);
            res
        })
        .await
        .map_err(|e| NodeError::Internal(e.to_string()))?
    }

    /// Keeps kernel devices connected while the plugin runs. A thread listens for the kernel's
    /// link-dead notifications (resubscribing after an error); each dead device is reconnected,
    /// retrying every second for the dead-connection timeout while its engine restarts, then
    /// every 5 s while the device still serves its attachment. After every subscription, every
    /// recorded device is offered new connections once, in case a notification was missed.
    pub async fn keep_kernel_devices_connected(self, stop: tokio_util::sync::CancellationToken) {
        let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            loop {
                match kernel_nbd::watch_link_dead(&tx) {
                    Ok(()) => return,
                    Err(e) => {
                        warn!(error = %e, "watching nbd link-dead notifications failed; resubscribing in 5 s")
                    }
                }
                if tx.is_closed() {
                    return;
                }
                std::thread::sleep(Duration::from_secs(5));
            }
        });
        let busy = std::sync::Arc::new(parking_lot::Mutex::new(std::collections::HashSet::new()));
        loop {
            let event = tokio::select! {
                () = stop.cancelled() => return,
                e = events.recv() => match e { Some(e) => e, None => return },
            };
            let me = self.clone();
            match event {
                None => {
                    tokio::spawn(async move {
                        for r in me.current_kernel_records().await {
                            if let Err(e) = me.reconnect_kernel(&r).await {
                                warn!(volume_id = %r.volume_id, device = %r.device().display(), error = %e, "offering an nbd device new connections failed");
                            }
                        }
                    });
                }
                Some(index) => {
                    if !busy.lock().insert(index) {
                        continue;
                    }
                    warn!(device = %format!("/dev/nbd{index}"), "an nbd connection died; reconnecting");
                    let busy = busy.clone();
                    tokio::spawn(async move {
                        let start = tokio::time::Instant::now();
                        loop {
                            let records = me.current_kernel_records().await;
                            let Some(r) = records.into_iter().find(|r| r.index == index) else { break };
                            match me.reconnect_kernel(&r).await {
                                Ok(()) => {
                                    info!(volume_id = %r.volume_id, device = %r.device().display(), "nbd device reconnected to its engine");
                                    break;
                                }
                                Err(e) => {
                                    warn!(volume_id = %r.volume_id, device = %r.device().display(), error = %e, "reconnecting the nbd device failed; retrying")
                                }
                            }
                            let patient = start.elapsed() < Duration::from_secs(KERNEL_DEAD_CONN_SECS);
                            tokio::time::sleep(Duration::from_secs(if patient { 1 } else { 5 })).await;
                        }
                        busy.lock().remove(&index);
                    });
                }
            }
        }
    }

    /// Attaches the export (idempotent: an attached volume returns its device).
    pub async fn attach(
        &self,
        volume_id: &str,
        socket: &Path,
        export: &str,
        generation: &str,
        readonly: bool,
    ) -> Result<PathBuf, NodeError> {
        if let Some(a) = self.find_async(volume_id).await {
            let current = match &a.backend {
                Some(b) => *b == kernel_nbd::backend_id(volume_id, generation),
                None => a.socket.as_deref() == Some(socket),
            };
            if current {
                return Ok(a.device);
            }
            // An attachment of another generation (its engine is gone: DESIGN rule 10), or one
            // whose helper died: its device can never work again.
            warn!(volume_id, device = %a.device.display(), "replacing a stale attachment");
            self.detach(volume_id).await?;
        }
        if self.kernel {
            return self.attach_kernel(volume_id, socket, export, generation).await;
        }
        match self.attach_fuse(volume_id, socket, export, readonly).await {
            Ok(d) => Ok(d),
            Err(e) => {
                // Leave nothing half-attached behind.
                let _ = self.detach(volume_id).await;
                Err(e)
            }
        }
    }

    async fn attach_fuse(
        &self,
        volume_id: &str,
        socket: &Path,
        export: &str,
        readonly: bool,
    ) -> Result<PathBuf, NodeError> {
        let mnt = self.fuse_dir(volume_id);
        let fuse_mounted = is_helper_mount(sys::mount_at(&mnt)?.as_ref(), volume_id);
        if fuse_mounted && self.helper_pids(volume_id).is_empty() {
            // A helper that died leaves a dead mount behind.
            warn!(volume_id, "removing the dead FUSE mount of an earlier attach");
            lazy_umount(&mnt).await?;
        }
        if !fuse_mounted || self.helper_pids(volume_id).is_empty() {
            self.start_helper(volume_id, socket, export, readonly).await?;
        }
        let disk = mnt.join(DISK_FILE);
        let mut args = vec!["--find", "--show", "--sector-size", "4096"];
        args.push(if self.loop_direct_io { "--direct-io=on" } else { "--direct-io=off" });
        if readonly {
            args.push("--read-only");
        }
        let d = disk.display().to_string();
        args.push(&d);
        let device = PathBuf::from(sys::run("losetup", &args).await?.trim());
        info!(volume_id, device = %device.display(), socket = %socket.display(), "attached through FUSE and a loop device");
        Ok(device)
    }

    async fn start_helper(
        &self,
        volume_id: &str,
        socket: &Path,
        export: &str,
        readonly: bool,
    ) -> Result<(), NodeError> {
        let mnt = self.fuse_dir(volume_id);
        std::fs::create_dir_all(&mnt)
            .map_err(|e| NodeError::Internal(format!("creating {}: {e}", mnt.display())))?;
        let logs = self.state_dir.join("logs");
        std::fs::create_dir_all(&logs)
            .map_err(|e| NodeError::Internal(format!("creating {}: {e}", logs.display())))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file(volume_id))
            .map_err(|e| NodeError::Internal(format!("helper log: {e}")))?;
        let mut cmd = tokio::process::Command::new(&self.helper);
        cmd.arg("--volume-id")
            .arg(volume_id)
            .arg("--socket")
            .arg(socket)
            .arg("--export")
            .arg(export)
            .arg("--mountpoint")
            .arg(&mnt)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            // Not in the node plugin's process group: it must outlive a plugin restart.
            .process_group(0)
            .kill_on_drop(false);
        if readonly {
            cmd.arg("--read-only");
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| NodeError::Internal(format!("starting {}: {e}", self.helper.display())))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if is_helper_mount(sys::mount_at(&mnt)?.as_ref(), volume_id) && mnt.join(DISK_FILE).exists() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(self.log_file(volume_id)).unwrap_or_default();
                let tail: String = log
                    .lines()
                    .rev()
                    .take(5)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                return Err(NodeError::Unavailable(format!(
                    "the NBD attach helper for {volume_id} exited ({status}): {tail}"
                )));
            }
            if tokio::time::Instant::now() > deadline {
                let _ = child.kill().await;
                return Err(NodeError::Unavailable(format!(
                    "the NBD attach helper for {volume_id} did not mount in 30 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Reap it when it exits (while this plugin lives).
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok(())
    }

    /// Detaches the volume: the loop device, the FUSE mount, the helper. Nothing attached is fine.
    pub async fn detach(&self, volume_id: &str) -> Result<(), NodeError> {
        if let Some((device, _)) = kernel_nbd::find(Path::new("/sys/block"), volume_id) {
            let index: u32 = device
                .to_string_lossy()
                .trim_start_matches("/dev/nbd")
                .parse()
                .map_err(|_| NodeError::Internal(format!("odd nbd device {}", device.display())))?;
            tokio::task::spawn_blocking(move || kernel_nbd::disconnect(index))
                .await
                .map_err(|e| NodeError::Internal(e.to_string()))??;
            info!(volume_id, device = %device.display(), "nbd device disconnected");
            if let Ok(mut dir) = tokio::fs::read_dir(self.state_dir.join("kernel")).await {
                let prefix = format!("{volume_id}.g");
                while let Ok(Some(e)) = dir.next_entry().await {
                    if e.file_name().to_string_lossy().starts_with(&prefix) {
                        let _ = tokio::fs::remove_file(e.path()).await;
                    }
                }
            }
            return Ok(());
        }
        if let Some(a) = self.find(volume_id) {
            let d = a.device.display().to_string();
            sys::run("losetup", &["-d", &d]).await?;
            info!(volume_id, device = %d, "loop device detached");
        }
        let mnt = self.fuse_dir(volume_id);
        if sys::mount_at(&mnt)?.is_some() {
            // The loop device lets go of the file asynchronously (after its in-flight IO, and
            // after whoever else opened the device, udev's probe say, closes it): a busy unmount
            // is retried. 1 s was not enough on a loaded two-core machine (a CI run); the kubelet
            // gives NodeUnstageVolume minutes.
            let deadline = tokio::time::Instant::now() + UNMOUNT_BUSY_WAIT;
            loop {
                match sys::umount(&mnt).await {
                    Ok(()) => break,
                    Err(_) if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        // The helper exits when its filesystem is unmounted; one that does not is killed.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let log = self.log_file(volume_id);
        loop {
            let pids = self.helper_pids(volume_id);
            if pids.is_empty() {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                // Its log goes with the volume: keep its end in this plugin's log.
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(20).collect();
                warn!(volume_id, pids = ?pids, last_lines = ?tail, "the FUSE helper did not exit: killing it");
                for p in pids {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = std::fs::remove_dir(&mnt);
        let _ = std::fs::remove_file(&log);
        Ok(())
    }

    /// Read-only publications' loop devices over `device` take its new size.
    async fn refresh_readonly_loops(&self, device: &Path) -> Result<(), NodeError> {
        let d = device.to_owned();
        let loops = tokio::task::spawn_blocking(move || sys::readonly_loops_over(&d))
            .await
            .map_err(|e| NodeError::Internal(e.to_string()))?;
        for l in loops {
            sys::run("losetup", &["-c", &l.display().to_string()]).await?;
        }
        Ok(())
    }

    /// Makes the device show the export's current size (after an expansion); returns it.
    pub async fn refresh_size(&self, volume_id: &str, want: u64) -> Result<u64, NodeError> {
        let a = self
            .find(volume_id)
            .ok_or_else(|| NodeError::NotFound(format!("volume {volume_id} is not attached on this node")))?;
        if let Some((device, _)) = kernel_nbd::find(Path::new("/sys/block"), volume_id) {
            let index: u32 = device
                .to_string_lossy()
                .trim_start_matches("/dev/nbd")
                .parse()
                .map_err(|_| NodeError::Internal(format!("odd nbd device {}", device.display())))?;
            let c = kernel_connect(Some(index), want, 0, String::new(), &[]);
            tokio::task::spawn_blocking(move || kernel_nbd::reconfigure(&c))
                .await
                .map_err(|e| NodeError::Internal(e.to_string()))??;
            self.refresh_readonly_loops(&device).await?;
            return sys::device_size(&device);
        }
        for p in self.helper_pids(volume_id) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGHUP);
        }
        let disk = self.fuse_dir(volume_id).join(DISK_FILE);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(&disk).map(|m| m.len()).unwrap_or(0) < want {
            if tokio::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let d = a.device.display().to_string();
        sys::run("losetup", &["-c", &d]).await?;
        self.refresh_readonly_loops(&a.device).await?;
        sys::device_size(&a.device)
    }
}

/// What NBD_CMD_CONNECT or NBD_CMD_RECONFIGURE say for one of our devices (4 KiB blocks, our
/// timeouts); the kernel takes its own references to `sockets`.
fn kernel_connect(
    index: Option<u32>,
    size: u64,
    server_flags: u64,
    backend: String,
    sockets: &[std::os::fd::OwnedFd],
) -> kernel_nbd::Connect {
    kernel_nbd::Connect {
        index,
        size,
        block_size: 4096,
        timeout: KERNEL_TIMEOUT_SECS,
        dead_conn_timeout: KERNEL_DEAD_CONN_SECS,
        server_flags,
        backend,
        sockets: sockets.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect(),
    }
}

/// Whether `m` is the FUSE mount of the volume's helper (source `barnacle:<volume>`).
fn is_helper_mount(m: Option<&sys::MountEntry>, volume_id: &str) -> bool {
    m.is_some_and(|m| m.fstype.starts_with("fuse") && m.source == format!("barnacle:{volume_id}"))
}

/// Lazily unmounts a (dead) mount.
async fn lazy_umount(path: &Path) -> Result<(), NodeError> {
    let p = path.to_owned();
    tokio::task::spawn_blocking(move || {
        nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH)
            .map_err(|e| NodeError::Internal(format!("umount -l {}: {e}", p.display())))
    })
    .await
    .map_err(|e| NodeError::Internal(e.to_string()))?
}

/// How long a detach waits for the FUSE mount to stop being busy once its loop device is gone.
const UNMOUNT_BUSY_WAIT: Duration = Duration::from_secs(20);

/// The nbd module's default device count (`nbds_max`).
const NBDS_MAX_DEFAULT: i64 = 16;
/// Minor-number bits of a block device (the kernel's MINORBITS).
const MINOR_BITS: u32 = 20;

/// How many volumes can be attached at once, from the module parameters under `sys_module`
/// (`/sys/module`). Through the kernel each volume holds one of the nbd module's devices, and
/// there are `nbds_max` of them (16 unless the module was loaded with more; the default when the
/// module is not loaded yet). Through FUSE each volume holds one loop device; loop-control makes
/// them on demand (`max_loop` only pre-creates some), up to the loop driver's minor numbers:
/// 2^20 of them, divided among each device's `max_part` partitions rounded up to a power of two.
pub fn attach_limit(sys_module: &Path, kernel: bool) -> i64 {
    let param = |module: &str, name: &str| -> Option<i64> {
        std::fs::read_to_string(sys_module.join(module).join("parameters").join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    if kernel {
        return param("nbd", "nbds_max").filter(|n| *n > 0).unwrap_or(NBDS_MAX_DEFAULT);
    }
    let max_part = param("loop", "max_part").unwrap_or(0).clamp(0, 1 << MINOR_BITS);
    // The driver gives each device 2^part_shift minors, part_shift = fls(max_part).
    let part_shift = u64::BITS - u64::try_from(max_part).unwrap_or(0).leading_zeros();
    (1i64 << MINOR_BITS) >> part_shift.min(MINOR_BITS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attach_limit_follows_the_module_parameters() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let set = |module: &str, name: &str, value: &str| {
            let d = dir.path().join(module).join("parameters");
            std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
            std::fs::write(d.join(name), format!("{value}\n")).unwrap_or_else(|e| panic!("{e}"));
        };
        // Nothing loaded: the nbd module's default, and loop devices without partitions.
        assert_eq!(attach_limit(dir.path(), true), 16);
        assert_eq!(attach_limit(dir.path(), false), 1 << 20);
        set("nbd", "nbds_max", "64");
        assert_eq!(attach_limit(dir.path(), true), 64);
        set("nbd", "nbds_max", "garbage");
        assert_eq!(attach_limit(dir.path(), true), 16);
        set("loop", "max_part", "0");
        set("loop", "max_loop", "8");
        assert_eq!(attach_limit(dir.path(), false), 1 << 20, "max_loop only pre-creates devices");
        // max_part 15 → 16 minors a device; 16 → 32 (the driver rounds up to a power of two).
        set("loop", "max_part", "15");
        assert_eq!(attach_limit(dir.path(), false), 1 << 16);
        set("loop", "max_part", "16");
        assert_eq!(attach_limit(dir.path(), false), 1 << 15);
    }

    /// No nbd device exists on the development machine, so a record is always stale here: it is
    /// read and removed, as after a reboot; an unreadable one goes too, and other files stay.
    #[tokio::test]
    async fn kernel_records_of_devices_that_are_gone_are_removed() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let a = Attacher::new(dir.path(), PathBuf::from("/bin/false"), Method::Fuse, false);
        let record = KernelRecord {
            volume_id: "vol-1".into(),
            socket: PathBuf::from("/var/lib/barnacle/run/vol-1.g2.nbd"),
            export: "vol-1".into(),
            generation: "2".into(),
            index: 3,
        };
        let kdir = dir.path().join("kernel");
        std::fs::create_dir_all(&kdir).unwrap_or_else(|e| panic!("{e}"));
        let json = serde_json::to_vec(&record).unwrap_or_default();
        assert_eq!(serde_json::from_slice::<KernelRecord>(&json).ok(), Some(record));
        std::fs::write(kdir.join("vol-1.g2.json"), json).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(kdir.join("vol-2.g1.json"), b"{not json").unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(kdir.join("notes.txt"), b"kept").unwrap_or_else(|e| panic!("{e}"));
        assert!(a.current_kernel_records().await.is_empty());
        let mut left: Vec<String> = std::fs::read_dir(&kdir)
            .unwrap_or_else(|e| panic!("{e}"))
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["notes.txt"]);
    }
}
