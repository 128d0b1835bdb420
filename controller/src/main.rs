//! `barnacle-controller`: the CSI Identity and Controller services, with the RocksDB store and the
//! local orchestrator (replicas and engines as child processes, each node a directory).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use barnacle_controller::local::{LocalConfig, LocalNode, LocalOrchestrator};
use barnacle_controller::service::{Service, ServiceConfig};
use barnacle_controller::store::RocksStore;
use barnacle_replica::process;
use clap::Parser;
use tracing::info;

/// Serve Barnacle's CSI controller.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The CSI endpoint: unix:///path/to/csi.sock.
    #[arg(long, env = "CSI_ENDPOINT")]
    endpoint: String,
    /// Directory of the controller's state: the record store, tokens, membership records.
    #[arg(long)]
    state_dir: PathBuf,
    /// A node as NAME=DIR[,zone=ZONE][,capacity=SIZE]; repeat for each. DIR stands for its disk.
    #[arg(long = "node", value_parser = LocalNode::parse)]
    nodes: Vec<LocalNode>,
    /// A JSON file listing nodes ([{"name": .., "dir": .., "zone": .., "capacity": ..}]), in
    /// addition to --node.
    #[arg(long)]
    nodes_file: Option<PathBuf>,
    /// Where barnacle-replica and barnacle-engine are (default: beside this program).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Thin volumes may provision this many times a node's capacity.
    #[arg(long, default_value_t = 2.0)]
    overcommit: f64,
    /// Stop every replica and engine when the controller exits (default: they keep serving and
    /// the next controller adopts them).
    #[arg(long)]
    stop_processes_on_exit: bool,
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
    anyhow::ensure!(args.overcommit >= 1.0, "--overcommit must be at least 1");
    let mut nodes = args.nodes.clone();
    if let Some(f) = &args.nodes_file {
        let text = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        let more: Vec<LocalNode> =
            serde_json::from_slice(&text).with_context(|| format!("parsing {}", f.display()))?;
        nodes.extend(more);
    }
    anyhow::ensure!(!nodes.is_empty(), "give at least one --node NAME=DIR");
    let bin_dir = match args.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()?.parent().context("program has no directory")?.to_owned(),
    };
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    let store = RocksStore::open(&args.state_dir.join("store")).context("opening the record store")?;
    let orch = LocalOrchestrator::new(LocalConfig {
        state_dir: args.state_dir.clone(),
        nodes,
        bin_dir,
        stop_on_exit: args.stop_processes_on_exit,
    })?;
    let service = Arc::new(Service::new(
        Arc::new(store),
        Arc::new(orch),
        ServiceConfig { overcommit: args.overcommit },
    ));

    let listener = process::bind_private_socket(&socket)?;
    info!(endpoint = %socket.display(), state_dir = %args.state_dir.display(), "controller serving");
    if let Some(path) = &args.ready_file {
        process::write_ready_file(
            path,
            &serde_json::json!({ "pid": std::process::id(), "endpoint": socket.display().to_string() }),
        )?;
    }
    let shutdown = process::shutdown_on_signals();
    barnacle_controller::run(listener, service, shutdown).await?;
    Ok(())
}
