//! `barnacle-replica`: serves one replica of one volume from a directory on the node's disk.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use barnacle_daemon::units::parse_size;
use barnacle_replica::server::{Replica, ServerConfig};
use barnacle_replica::store::DEFAULT_CLUSTER_SIZE;
use clap::Parser;
use tracing::info;

/// Serve one replica of one Barnacle volume.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Directory holding this replica's store (created on demand).
    #[arg(long)]
    dir: PathBuf,
    /// The volume this replica belongs to; connections must name it.
    #[arg(long)]
    volume_id: String,
    /// File holding the volume's authentication token (never passed on the command line).
    #[arg(long, env = "BARNACLE_TOKEN_FILE")]
    token_file: PathBuf,
    /// Address of the data protocol listener.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Also serve the data protocol on this unix socket (created 0600), for an engine on the same
    /// node: the data path then skips the TCP stack.
    #[arg(long)]
    listen_unix: Option<PathBuf>,
    /// Address of the gRPC management listener.
    #[arg(long, default_value = "127.0.0.1:0")]
    mgmt_listen: String,
    /// Create the store with this size (e.g. 10GiB) if the directory holds none.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Keep the data on this raw partition (block device) instead of a file in --dir; --dir
    /// then holds only the metadata. Used when the store is created.
    #[arg(long)]
    data_device: Option<PathBuf>,
    /// Cluster size for a store created by --size.
    #[arg(long, value_parser = parse_size, default_value_t = DEFAULT_CLUSTER_SIZE)]
    cluster_size: u64,
    /// Close a data connection that sends nothing, not even a heartbeat, for this long.
    #[arg(long, default_value_t = 30_000)]
    idle_timeout_ms: u64,
    /// Requests one data connection may have in flight (each holds up to 4 MiB of data).
    #[arg(long, default_value_t = 64)]
    max_in_flight: usize,
    /// Async worker threads (disk IO runs on a separate blocking pool).
    #[arg(long, default_value_t = barnacle_daemon::process::DEFAULT_WORKER_THREADS)]
    worker_threads: usize,
    /// Create the store without block checksums (they are verified on every read; this exists to
    /// measure what they cost).
    #[arg(long)]
    no_checksums: bool,
    /// Let the management API inject disk faults (EIO, ENOSPC) into this replica's data IO. For
    /// fault tests only; refused otherwise.
    #[arg(long, env = "BARNACLE_FAULT_INJECTION")]
    fault_injection: bool,
    /// Write the bound addresses here as JSON once serving.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    barnacle_daemon::process::init_tracing();
    let args = Args::parse();
    barnacle_daemon::process::runtime(args.worker_threads)?.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    barnacle_daemon::process::set_io_flusher();
    barnacle_daemon::process::tune_malloc();
    let token = barnacle_daemon::process::read_token(&args.token_file)?;
    let cfg = ServerConfig {
        volume_id: args.volume_id.clone(),
        token,
        idle_timeout: Duration::from_millis(args.idle_timeout_ms),
        max_in_flight: args.max_in_flight,
        data_device: args.data_device.clone(),
        checksums: !args.no_checksums,
        fault_injection: args.fault_injection,
    };
    let replica = Replica::new(cfg, &args.dir).context("opening the replica store")?;
    if let Some(size) = args.size
        && replica.store().is_err()
    {
        replica.create_store(size, args.cluster_size).await.context("creating the replica store")?;
    }
    let data = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let mgmt = tokio::net::TcpListener::bind(&args.mgmt_listen)
        .await
        .with_context(|| format!("binding {}", args.mgmt_listen))?;
    let data_unix = match &args.listen_unix {
        Some(path) => Some(barnacle_daemon::process::bind_private_socket(path)?),
        None => None,
    };
    let (data_addr, mgmt_addr) = (data.local_addr()?, mgmt.local_addr()?);
    info!(volume_id = %args.volume_id, data = %data_addr, mgmt = %mgmt_addr, dir = %args.dir.display(), "replica serving");
    if let Some(path) = &args.ready_file {
        let mut body = serde_json::json!({ "data": data_addr.to_string(), "mgmt": mgmt_addr.to_string(), "pid": std::process::id() });
        if let Some(path) = &args.listen_unix {
            body["data_unix"] = format!("unix:{}", path.display()).into();
        }
        barnacle_daemon::process::write_ready_file(path, &body)?;
    }
    let shutdown = barnacle_daemon::process::shutdown_on_signals();
    barnacle_replica::run(data, data_unix, mgmt, replica, shutdown).await?;
    Ok(())
}
