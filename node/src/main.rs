//! `barnacle-node`: the CSI Identity and Node services of one node.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use barnacle_node::attach::{Attacher, Method};
use barnacle_node::service::{NodeConfig, NodeService};
use barnacle_replica::process;
use clap::Parser;
use tracing::info;

/// Serve Barnacle's CSI node plugin.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The CSI endpoint: unix:///path/to/csi.sock.
    #[arg(long, env = "CSI_ENDPOINT")]
    endpoint: String,
    /// This node's name (the controller's node id).
    #[arg(long, env = "NODE_ID")]
    node_id: String,
    /// This node's zone, reported as topology.kubernetes.io/zone.
    #[arg(long)]
    zone: Option<String>,
    /// Volumes this node may attach (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_volumes: i64,
    /// Directory for attach state (FUSE mount points, helper logs).
    #[arg(long, default_value = "/var/lib/barnacle-node")]
    state_dir: PathBuf,
    /// How volumes are attached.
    #[arg(long, value_enum, default_value_t = Method::Auto)]
    attach: Method,
    /// Loop devices use direct IO on the FUSE file (no page cache between them).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    loop_direct_io: bool,
    /// The userspace attach helper (default: barnacle-nbd-fuse beside this program).
    #[arg(long)]
    nbd_fuse: Option<PathBuf>,
    /// Write {"pid": N, "endpoint": PATH} here once serving.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    barnacle_replica::process::init_tracing();
    let args = Args::parse();
    barnacle_replica::process::runtime(2)?.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let socket = process::unix_endpoint(&args.endpoint)?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    let helper = match args.nbd_fuse {
        Some(p) => p,
        None => {
            std::env::current_exe()?.parent().context("program has no directory")?.join("barnacle-nbd-fuse")
        }
    };
    anyhow::ensure!(helper.is_file(), "{} not found", helper.display());
    let attacher = Attacher::new(&args.state_dir, helper, args.attach, args.loop_direct_io);
    let service = Arc::new(NodeService::new(
        NodeConfig { node_id: args.node_id.clone(), zone: args.zone.clone(), max_volumes: args.max_volumes },
        attacher,
    ));
    let listener = process::bind_private_socket(&socket)?;
    let attached = service.attacher().attached();
    info!(endpoint = %socket.display(), node_id = %args.node_id, attached = attached.len(), "node plugin serving (attached volumes stay attached when it stops)");
    if let Some(path) = &args.ready_file {
        process::write_ready_file(
            path,
            &serde_json::json!({ "pid": std::process::id(), "endpoint": socket.display().to_string() }),
        )?;
    }
    let shutdown = process::shutdown_on_signals();
    if service.attacher().uses_kernel() {
        // Kernel devices whose engine restarted get new connections.
        tokio::spawn(service.attacher().clone().keep_kernel_devices_connected(shutdown.clone()));
    }
    barnacle_node::run(listener, service, shutdown).await?;
    Ok(())
}
