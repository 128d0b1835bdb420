//! Process set-up shared by the Barnacle daemons that serve block IO.

use tracing::warn;

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
