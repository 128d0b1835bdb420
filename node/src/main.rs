//! `barnacle-node`: the CSI Identity and Node services of one node.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use barnacle_daemon::process;
use barnacle_node::attach::{Attacher, Method};
use barnacle_node::service::{NodeConfig, NodeService};
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Serve Barnacle's CSI node plugin.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Sub>,
    /// The CSI endpoint: unix:///path/to/csi.sock (required to serve).
    #[arg(long, env = "CSI_ENDPOINT", required = true)]
    endpoint: Option<String>,
    /// This node's name, the controller's node id (required to serve).
    #[arg(long, env = "NODE_ID", required = true)]
    node_id: Option<String>,
    /// This node's zone, reported as topology.kubernetes.io/zone.
    #[arg(long)]
    zone: Option<String>,
    /// Volumes this node may attach, reported to the CO (NodeGetInfo). Default: what the attach
    /// path allows (the nbd module's `nbds_max` devices, or loop devices through FUSE).
    #[arg(long)]
    max_volumes: Option<i64>,
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
    /// Register with the kubelet through a socket in this directory (the kubelet's
    /// plugins_registry, e.g. /var/lib/kubelet/plugins_registry), as the node-driver-registrar
    /// sidecar would.
    #[arg(long)]
    registration_dir: Option<PathBuf>,
    /// The CSI socket's path on the node, which the kubelet dials (default: the endpoint's path;
    /// they differ when this runs in a container).
    #[arg(long)]
    kubelet_endpoint: Option<PathBuf>,
    /// Write {"pid": N, "endpoint": PATH} here once serving.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// Check that PATH is on a shared mount of the host (needs the host's PID namespace): the
    /// node plugin's Bidirectional mount of it needs one. Run by the chart's init container.
    HostCheck {
        #[arg(long, default_value = "/var/lib/barnacle")]
        path: PathBuf,
        /// Make it a shared mount (a bind mount of itself) in the host's mount namespace if it is not.
        #[arg(long)]
        fix: bool,
    },
}

fn main() -> anyhow::Result<()> {
    barnacle_daemon::process::init_tracing();
    let args = Args::parse();
    if let Some(Sub::HostCheck { path, fix }) = &args.command {
        return host_check(path, *fix);
    }
    barnacle_daemon::process::runtime(2)?.block_on(serve(args))
}

/// `barnacle-node host-check`: see [`barnacle_node::host`].
fn host_check(path: &std::path::Path, fix: bool) -> anyhow::Result<()> {
    // Runs a command in the host's mount namespace (PID 1's, seen with hostPID).
    let in_host = |cmd: &[String]| -> Result<(), String> {
        let out = std::process::Command::new("nsenter")
            .arg("--mount=/proc/1/ns/mnt")
            .arg("--")
            .args(cmd)
            .output()
            .map_err(|e| format!("nsenter: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    };
    let table = std::fs::read_to_string("/proc/1/mountinfo").context("reading the host's mount table")?;
    match barnacle_node::host::ensure_shared(&table, path, fix, in_host)? {
        barnacle_node::host::SharedMount::Already { mount_point } => {
            info!(path = %path.display(), mount_point = %mount_point.display(), "the host path is on a shared mount");
        }
        barnacle_node::host::SharedMount::Fixed { commands } => {
            info!(path = %path.display(), ?commands, "made the host path a shared mount");
        }
    }
    Ok(())
}

async fn serve(args: Args) -> anyhow::Result<()> {
    // Required by the parser whenever no subcommand is given.
    let (Some(endpoint), Some(node_id)) = (args.endpoint.clone(), args.node_id.clone()) else {
        anyhow::bail!("give --endpoint and --node-id");
    };
    let socket = process::unix_endpoint(&endpoint)?;
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
    let max_volumes = args.max_volumes.unwrap_or_else(|| attacher.attach_limit());
    info!(node_id = %node_id, max_volumes, "attach limit reported to the CO");
    let service = Arc::new(NodeService::new(
        NodeConfig { node_id: node_id.clone(), zone: args.zone.clone(), max_volumes },
        attacher,
    ));
    let listener = process::bind_private_socket(&socket)?;
    let attached = service.attacher().attached();
    info!(endpoint = %socket.display(), node_id = %node_id, attached = attached.len(), "node plugin serving (attached volumes stay attached when it stops)");
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
    let registered = match &args.registration_dir {
        Some(dir) => {
            let path = barnacle_node::registration::socket_path(dir, csi_proto::DRIVER_NAME);
            let endpoint = args.kubelet_endpoint.clone().unwrap_or_else(|| socket.clone());
            let failed = CancellationToken::new();
            let registration = barnacle_node::registration::Registration {
                driver: csi_proto::DRIVER_NAME.to_owned(),
                endpoint: endpoint.display().to_string(),
                failed: failed.clone(),
            };
            let listener = process::bind_private_socket(&path)?;
            info!(socket = %path.display(), kubelet_endpoint = %endpoint.display(), "registering with the kubelet");
            {
                let (sd, failed) = (shutdown.clone(), failed.clone());
                tokio::spawn(async move {
                    failed.cancelled().await;
                    sd.cancel();
                });
            }
            let server = barnacle_node::registration::serve(listener, path, registration, shutdown.clone());
            Some((tokio::spawn(server), failed))
        }
        None => None,
    };
    barnacle_node::run(listener, service, shutdown).await?;
    if let Some((server, failed)) = registered {
        server.await??;
        anyhow::ensure!(!failed.is_cancelled(), "the kubelet refused the registration");
    }
    Ok(())
}
