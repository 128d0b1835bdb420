//! Process set-up shared by the Barnacle daemons: logging, the async runtime, private unix
//! sockets, ready files, signal shutdown, and for those that serve block IO the IO-flusher flag
//! and malloc tuning.

use std::path::{Path, PathBuf};

use tracing::warn;

/// Why a daemon could not set itself up; each names what it was working on.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("reading token file {path}: {source}")]
    Token { path: PathBuf, source: std::io::Error },
    #[error("token file {0} is empty")]
    EmptyToken(PathBuf),
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("endpoint {0:?} is not unix:///PATH")]
    Endpoint(String),
    #[error("{what} {path}: {source}")]
    Path { what: &'static str, path: PathBuf, source: std::io::Error },
}

fn at(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DaemonError {
    let path = path.to_owned();
    move |source| DaemonError::Path { what, path, source }
}

/// Marks this process as one that frees memory by doing IO (`PR_SET_IO_FLUSHER`), so memory
/// reclaim does not deadlock waiting on it (DESIGN rule 12). Logged, not fatal, when refused.
pub fn set_io_flusher() {
    /// `PR_SET_IO_FLUSHER` from linux/prctl.h (Linux 5.6+); not exported by the libc crate.
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl with PR_SET_IO_FLUSHER takes plain integer arguments and touches no memory.
    let r = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if r != 0 {
        warn!(error = %std::io::Error::last_os_error(), "PR_SET_IO_FLUSHER not set");
    }
}

/// Sets up logging to stderr (`RUST_LOG` filters; colours only on a terminal).
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Keeps glibc malloc from hoarding memory, so a daemon's resident set stays small after bursts
/// of large IO buffers: at most two arenas (one per core here, rather than eight per core), a
/// fixed mmap threshold of 1 MiB (glibc otherwise raises it after each large free, so multi-MiB
/// buffers land in arenas and stay resident), and freed heap tops above 4 MiB returned at once.
pub fn tune_malloc() {
    for (param, value) in
        [(libc::M_ARENA_MAX, 2), (libc::M_MMAP_THRESHOLD, 1 << 20), (libc::M_TRIM_THRESHOLD, 4 << 20)]
    {
        // SAFETY: mallopt takes two integers and only changes allocator tunables, under the
        // allocator's own lock; it touches no memory of ours.
        if unsafe { libc::mallopt(param, value) } != 1 {
            warn!(param, value, "mallopt refused a tunable");
        }
    }
}

/// Reads a volume token from `path` (surrounding whitespace dropped); an empty file is an error.
pub fn read_token(path: &Path) -> Result<String, DaemonError> {
    let token = std::fs::read_to_string(path)
        .map_err(|source| DaemonError::Token { path: path.to_owned(), source })?
        .trim()
        .to_owned();
    if token.is_empty() {
        return Err(DaemonError::EmptyToken(path.to_owned()));
    }
    Ok(token)
}

/// Default async worker threads of a per-volume daemon. A node runs one engine and one replica
/// process per volume, so parallelism comes from the number of volumes; within one volume a
/// single async thread (with the blocking pool for large disk IO) avoids cross-thread wake-ups,
/// which measured faster than one thread per core (docs/performance.md).
pub const DEFAULT_WORKER_THREADS: usize = 1;

/// Builds the multi-threaded tokio runtime of a daemon with `worker_threads` async threads
/// (at least one). The blocking pool (disk IO, RocksDB) is separate and not limited by this.
pub fn runtime(worker_threads: usize) -> Result<tokio::runtime::Runtime, DaemonError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads.max(1))
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)
}

/// The socket path of a `unix:///path` endpoint (the form CSI endpoints take).
pub fn unix_endpoint(endpoint: &str) -> Result<PathBuf, DaemonError> {
    endpoint
        .strip_prefix("unix://")
        .filter(|p| p.starts_with('/'))
        .map(PathBuf::from)
        .ok_or_else(|| DaemonError::Endpoint(endpoint.to_owned()))
}

/// Binds a unix socket only root may use (0600), replacing a stale one and creating its directory.
pub fn bind_private_socket(path: &Path) -> Result<tokio::net::UnixListener, DaemonError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(at("creating", dir))?;
    }
    // A socket left by an earlier run would make bind fail.
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path).map_err(at("binding", path))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(at("setting the mode of", path))?;
    Ok(listener)
}

/// Writes a ready file atomically (a reader sees the whole JSON or nothing).
pub fn write_ready_file(path: &Path, body: &serde_json::Value) -> Result<(), DaemonError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body.to_string()).map_err(at("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(at("renaming into", path))?;
    Ok(())
}

/// A token cancelled on SIGINT or SIGTERM (logged).
pub fn shutdown_on_signals() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}
