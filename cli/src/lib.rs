//! The `barnacle` command: `barnacle up` runs a local cluster (a controller and node plugins on
//! this machine), and the other commands drive it the way Kubernetes would, over the CSI sockets
//! (and the controller's admin API for names, status and demo faults). It never reads the
//! controller's or the nodes' files.
//!
//! Layout of the data directory (default `$XDG_STATE_HOME/barnacle`, else
//! `~/.local/state/barnacle`): `controller.sock` and `controller/` (its state), and per node
//! `nodes/<name>/disk` (the node's disk), `nodes/<name>/csi.sock`, `nodes/<name>/plugin` and
//! `nodes/<name>/staging`; logs in `logs/`.

pub mod commands;
pub mod output;
pub mod up;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Why a command failed; the message says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{what}: {status}")]
    Rpc { what: String, status: String },
    #[error("cannot reach {what} at {path}: {reason}\n  is `barnacle up` running with this --data-dir?")]
    Unreachable { what: String, path: String, reason: String },
    #[error("{0}")]
    Io(String),
}

impl CliError {
    pub fn rpc(what: impl Into<String>, s: &tonic::Status) -> CliError {
        CliError::Rpc { what: what.into(), status: format!("{} ({:?})", s.message(), s.code()) }
    }
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

/// Barnacle: replicated block storage for Kubernetes, on this machine.
#[derive(Debug, Parser)]
#[command(name = "barnacle", version, about, propagate_version = true)]
pub struct Cli {
    /// The local cluster's data directory.
    #[arg(long, global = true, env = "BARNACLE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a local cluster in the foreground: a controller and N simulated nodes (Ctrl-C stops it).
    Up {
        /// Simulated nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
    /// Create, list, inspect, expand and delete volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Attach a volume to a node and mount it (or expose its block device) at a path.
    Attach {
        volume: String,
        #[arg(long)]
        node: String,
        /// Where to mount it (a directory), or for a block volume where its device node goes.
        #[arg(long)]
        mount: PathBuf,
        /// Mount read-only.
        #[arg(long)]
        readonly: bool,
    },
    /// Unmount and detach a volume.
    Detach { volume: String },
    /// Take, list and delete snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Every volume's replicas, health, epoch and rebuild progress.
    Status {
        /// Keep refreshing (a progress line per rebuild) until Ctrl-C.
        #[arg(long)]
        watch: bool,
    },
    /// Faults for demos.
    #[command(subcommand)]
    Replica(ReplicaCmd),
    /// The nodes with their capacity.
    Nodes,
    /// Ask a CSI endpoint whether its plugin is ready (Identity.Probe): exit status 0 when it is.
    /// The chart's liveness probes run this inside the plugin's container.
    Probe {
        /// The CSI socket: unix:///path or /path.
        #[arg(long)]
        endpoint: String,
    },
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
}

/// How a volume is consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Fs {
    Ext4,
    Xfs,
    Block,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Create a volume.
    Create {
        name: String,
        /// Size with binary units (1GiB, 512MiB).
        #[arg(long, value_parser = barnacle_daemon::units::parse_size)]
        size: u64,
        /// Replicas, one per node. Default: 3, or as many as there are nodes if fewer. A count
        /// given here that the nodes cannot hold is an error, unless --allow-fewer.
        #[arg(long)]
        replicas: Option<usize>,
        /// With --replicas: place as many as the nodes can hold rather than fail.
        #[arg(long, requires = "replicas")]
        allow_fewer: bool,
        #[arg(long, value_enum, default_value_t = Fs::Ext4)]
        fs: Fs,
        /// Make it from a snapshot (its name).
        #[arg(long, conflicts_with = "from_volume")]
        from_snapshot: Option<String>,
        /// Make it a clone of another volume (its name).
        #[arg(long)]
        from_volume: Option<String>,
    },
    /// List volumes.
    List,
    /// Show one volume.
    Get { name: String },
    /// Grow a volume (online when attached: the filesystem grows too).
    Expand {
        name: String,
        #[arg(long, value_parser = barnacle_daemon::units::parse_size)]
        size: u64,
    },
    /// Change a volume's replica count, minimum of healthy replicas, rebuild rate or IO limits,
    /// attached or not (CSI ControllerModifyVolume). Added replicas are rebuilt while the volume
    /// serves.
    Modify {
        name: String,
        /// Replicas wanted (1 to 5).
        #[arg(long)]
        replicas: Option<u64>,
        /// Healthy replicas writes need.
        #[arg(long)]
        min_healthy: Option<u64>,
        /// Rebuild copy rate in MiB/s.
        #[arg(long)]
        rebuild_mib_per_sec: Option<u64>,
        /// Reads and writes per second (0: no limit).
        #[arg(long)]
        max_iops: Option<u64>,
        /// MiB per second read and written (0: no limit).
        #[arg(long)]
        max_mib_per_sec: Option<u64>,
        /// Follow the rebuild of added replicas until every replica is healthy.
        #[arg(long)]
        wait: bool,
    },
    /// Verify every block of an attached volume against its checksums, on every replica, head
    /// and snapshots; damaged blocks of the head are rewritten from a sound replica. Runs in the
    /// background in the volume's engine; progress shows in `volume get`.
    Scrub {
        name: String,
        /// Follow the scrub until it finished.
        #[arg(long)]
        wait: bool,
    },
    /// Delete a volume (detach it first).
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Snapshot a volume.
    Create { volume: String, name: String },
    /// Snapshot several volumes together, crash-consistent across them: their IO is held (10 s
    /// at most) while each is snapshotted. The members are named NAME/<volume id>; restore one
    /// with `volume create --from-snapshot`, delete them all with `snapshot delete NAME`.
    Group {
        name: String,
        #[arg(required = true, num_args = 2..)]
        volumes: Vec<String>,
    },
    /// List snapshots (of one volume if named).
    List { volume: Option<String> },
    /// Delete a snapshot, or a group snapshot with all its members.
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
pub enum ReplicaCmd {
    /// SIGKILL one replica of a volume; it is restarted and rebuilt (watch with `status --watch`).
    Kill { volume: String, replica: String },
}

/// The data directory: the flag, else `$XDG_STATE_HOME/barnacle`, else `~/.local/state/barnacle`.
pub fn data_dir(flag: Option<PathBuf>) -> PathBuf {
    if let Some(d) = flag {
        return d;
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("barnacle");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".local/state/barnacle")
}

/// Sizes in binary units: `1.5 GiB`, `512 MiB`, `4 KiB`, `17 B`.
pub fn fmt_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut whole = bytes;
    while whole >= 1024 && unit < UNITS.len() - 1 && whole.is_multiple_of(1024) {
        whole /= 1024;
        unit += 1;
    }
    if whole < 1024 || unit == UNITS.len() - 1 {
        return format!("{whole} {}", UNITS[unit]);
    }
    #[allow(clippy::cast_precision_loss)]
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_in_binary_units() {
        assert_eq!(fmt_size(1 << 30), "1 GiB");
        assert_eq!(fmt_size(512 << 20), "512 MiB");
        assert_eq!(fmt_size(1536 << 20), "1.5 GiB");
        assert_eq!(fmt_size(17), "17 B");
        assert_eq!(fmt_size(0), "0 B");
    }

    #[test]
    fn the_command_line_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let c = Cli::parse_from([
            "barnacle", "-o", "json", "volume", "create", "v", "--size", "1GiB", "--fs", "xfs",
        ]);
        assert_eq!(c.output, Format::Json);
        assert!(
            matches!(c.command, Command::Volume(VolumeCmd::Create { size, fs: Fs::Xfs, .. }) if size == 1 << 30)
        );
        assert!(Cli::try_parse_from(["barnacle", "volume", "create", "v", "--size", "lots"]).is_err());
    }
}
