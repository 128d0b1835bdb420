//! Child process supervision for the local orchestrator: start a daemon, wait until its ready file
//! names it, restart it when it dies, and re-adopt one that outlived an earlier controller.
//!
//! A daemon writes a JSON ready file holding its `pid` once it serves. A controller that starts
//! again finds each process by that file: if the pid is alive, not a zombie, and its command line
//! names the same ready file, the process is adopted and watched through a pidfd (it is not our
//! child, so it cannot be waited for); otherwise a new one is started.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How to run one daemon.
#[derive(Debug, Clone)]
pub struct ProcSpec {
    /// For logs: "replica r0" or "engine".
    pub role: String,
    pub volume_id: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    /// The ready file the daemon writes (also named in `args`).
    pub ready_file: PathBuf,
    /// Its stderr is appended here.
    pub log_file: PathBuf,
}

/// A daemon that is serving: its pid and its ready file's content.
#[derive(Debug, Clone)]
pub struct Running {
    pub pid: u32,
    pub ready: serde_json::Value,
    /// Whether this process outlived a previous controller and was adopted.
    pub adopted: bool,
}

enum Proc {
    Child(tokio::process::Child),
    Adopted { pid: u32, fd: AsyncFd<OwnedFd> },
}

impl Proc {
    fn pid(&self) -> Option<u32> {
        match self {
            Proc::Child(c) => c.id(),
            Proc::Adopted { pid, .. } => Some(*pid),
        }
    }

    /// Waits until the process has exited.
    async fn exited(&mut self) {
        match self {
            Proc::Child(c) => {
                let _ = c.wait().await;
            }
            Proc::Adopted { fd, .. } => {
                // A pidfd becomes readable when the process exits (and stays so).
                let _ = fd.readable().await;
            }
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns once the process is gone.
    async fn terminate(&mut self, grace: Duration) {
        let Some(pid) = self.pid() else { return };
        let pid = nix::unistd::Pid::from_raw(pid.cast_signed());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        if tokio::time::timeout(grace, self.exited()).await.is_err() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            self.exited().await;
        }
    }
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no memory is
    // passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::pid_t::try_from(pid).unwrap_or(-1), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::other("pidfd out of range"))?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The ready file's content if it is complete JSON with a pid.
pub fn read_ready(path: &Path) -> Option<(u32, serde_json::Value)> {
    parse_ready(&std::fs::read(path).ok()?)
}

fn parse_ready(bytes: &[u8]) -> Option<(u32, serde_json::Value)> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let pid = u32::try_from(v.get("pid")?.as_u64()?).ok()?;
    Some((pid, v))
}

/// Whether `pid` is a live (not zombie) process whose command line contains `needle`.
pub fn process_matches(pid: u32, needle: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // The state follows the parenthesised command name.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
    if matches!(state, Some('Z' | 'X') | None) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    cmdline.split(|b| *b == 0).any(|arg| arg == needle.as_bytes())
}

/// One supervised daemon. Dropping the handle does not stop the process; [`Supervised::stop`] does.
#[derive(Debug)]
pub struct Supervised {
    spec: ProcSpec,
    state: watch::Receiver<Option<Running>>,
    stop: CancellationToken,
    /// Set when the supervisor loop has ended (after a stop, the process is gone).
    finished: CancellationToken,
    /// When set, leaving the loop (stop) does not kill the process: the controller is exiting and
    /// the data path stays up.
    detach: CancellationToken,
}

impl Supervised {
    /// Starts supervising: adopts the process named by the ready file if it still runs, else
    /// starts one.
    pub fn start(spec: ProcSpec) -> std::sync::Arc<Supervised> {
        let (tx, rx) = watch::channel(None);
        let s = std::sync::Arc::new(Supervised {
            spec,
            state: rx,
            stop: CancellationToken::new(),
            finished: CancellationToken::new(),
            detach: CancellationToken::new(),
        });
        let me = s.clone();
        tokio::spawn(async move {
            me.run(tx).await;
            me.finished.cancel();
        });
        s
    }

    pub fn spec(&self) -> &ProcSpec {
        &self.spec
    }

    /// The process if it is serving now.
    pub fn running(&self) -> Option<Running> {
        self.state.borrow().clone()
    }

    /// Waits until the process serves (at most `timeout`).
    pub async fn ready(&self, timeout: Duration) -> Result<Running, String> {
        let mut rx = self.state.clone();
        let wait = async {
            loop {
                if let Some(r) = rx.borrow_and_update().clone() {
                    return Ok(r);
                }
                if rx.changed().await.is_err() {
                    return Err("supervisor ended".to_owned());
                }
            }
        };
        tokio::select! {
            r = wait => r,
            () = self.finished.cancelled() => Err("stopped".to_owned()),
            () = tokio::time::sleep(timeout) => Err(format!(
                "{} did not become ready within {timeout:?} (log: {})",
                self.spec.role,
                self.spec.log_file.display()
            )),
        }
    }

    /// Stops the process (SIGTERM, SIGKILL after 10 s) and waits until it is gone.
    pub async fn stop(&self) {
        self.stop.cancel();
        self.finished.cancelled().await;
    }

    /// Stops watching, leaving the process running (for a controller that exits).
    pub async fn detach(&self) {
        self.detach.cancel();
        self.stop.cancel();
        self.finished.cancelled().await;
    }

    fn adopt(&self) -> Option<(Proc, serde_json::Value)> {
        let (pid, ready) = read_ready(&self.spec.ready_file)?;
        if !process_matches(pid, &self.spec.ready_file.display().to_string()) {
            return None;
        }
        let fd = pidfd_open(pid).ok()?;
        // SAFETY: `fd` is an OwnedFd, moved into the AsyncFd: it stays open and the same
        // descriptor until the AsyncFd is dropped, and OwnedFd::as_raw_fd always returns it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok()?;
        // Recheck after opening the pidfd: the pid may have been reused in between.
        if !process_matches(pid, &self.spec.ready_file.display().to_string()) {
            return None;
        }
        Some((Proc::Adopted { pid, fd }, ready))
    }

    async fn spawn(&self) -> std::io::Result<Proc> {
        let _ = std::fs::remove_file(&self.spec.ready_file);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.spec.log_file)?;
        let mut cmd = tokio::process::Command::new(&self.spec.program);
        cmd.args(&self.spec.args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            // Its own process group: a Ctrl-C meant for the controller does not stop the data path.
            .process_group(0)
            .kill_on_drop(false);
        Ok(Proc::Child(cmd.spawn()?))
    }

    /// Waits for the ready file of `proc` (or its exit).
    async fn wait_ready(&self, proc: &mut Proc) -> Option<serde_json::Value> {
        let pid = proc.pid()?;
        let poll = async {
            loop {
                // Polled off the async threads (tokio::fs): a slow disk must not stall the runtime.
                let bytes = tokio::fs::read(&self.spec.ready_file).await.unwrap_or_default();
                if let Some((p, v)) = parse_ready(&bytes)
                    && p == pid
                {
                    return v;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            v = poll => Some(v),
            () = proc.exited() => None,
            () = self.stop.cancelled() => None,
        }
    }

    async fn run(&self, tx: watch::Sender<Option<Running>>) {
        let (vol, role) = (self.spec.volume_id.as_str(), self.spec.role.as_str());
        let mut backoff = Duration::from_millis(100);
        let mut first = true;
        loop {
            let adopted = if first { self.adopt() } else { None };
            first = false;
            let (mut proc, ready, was_adopted) = match adopted {
                Some((p, ready)) => {
                    info!(volume_id = %vol, role, pid = p.pid(), "adopted a running process");
                    (p, Some(ready), true)
                }
                None => match self.spawn().await {
                    Ok(p) => {
                        info!(volume_id = %vol, role, pid = p.pid(), "started");
                        (p, None, false)
                    }
                    Err(e) => {
                        warn!(volume_id = %vol, role, program = %self.spec.program.display(), error = %e, "cannot start");
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            () = self.stop.cancelled() => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                },
            };
            let ready = match ready {
                Some(r) => Some(r),
                None => self.wait_ready(&mut proc).await,
            };
            let started = tokio::time::Instant::now();
            if let (Some(ready), Some(pid)) = (ready, proc.pid()) {
                tx.send_replace(Some(Running { pid, ready, adopted: was_adopted }));
                tokio::select! {
                    () = proc.exited() => {}
                    () = self.stop.cancelled() => {}
                }
            }
            tx.send_replace(None);
            if self.stop.is_cancelled() {
                if !self.detach.is_cancelled() {
                    proc.terminate(Duration::from_secs(10)).await;
                    info!(volume_id = %vol, role, "stopped");
                }
                return;
            }
            // It exited (or died before it was ready): make sure it is gone, then start another.
            proc.terminate(Duration::from_secs(1)).await;
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            warn!(volume_id = %vol, role, retry_in = ?backoff, log = %self.spec.log_file.display(), "process exited; restarting it");
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = self.stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}
