//! `barnacle-engine`: serves one volume as an NBD export, replicated synchronously to its replicas.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use barnacle_engine::authority::{FileAuthority, MembershipAuthority};
use barnacle_engine::nbd::ExportConfig;
use barnacle_engine::volume::{Volume, VolumeConfig};
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use uuid::Uuid;

/// Serve one Barnacle volume over NBD, replicated to its replicas.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The volume; replicas must belong to it, and it is the NBD export name.
    #[arg(long)]
    volume_id: String,
    /// File holding the volume's token (never on the command line).
    #[arg(long, env = "BARNACLE_TOKEN_FILE")]
    token_file: PathBuf,
    /// A replica as ID=HOST:PORT; repeat for each. Used when the membership record does not exist
    /// yet; afterwards the record is the authority.
    #[arg(long = "replica", value_parser = parse_replica)]
    replicas: Vec<(String, String)>,
    /// Directory of the standalone membership authority (membership.json).
    #[arg(long, required_unless_present = "kube_namespace", conflicts_with = "kube_namespace")]
    state_dir: Option<PathBuf>,
    /// Keep the membership in the volume's custom resource (volumes.barnacle.dev, named by the
    /// volume id) in this namespace, reached with the pod's service account or $KUBECONFIG.
    #[arg(long)]
    kube_namespace: Option<String>,
    /// With --kube-namespace: the attachment generation this engine serves; its membership writes
    /// are refused once the volume's record names another.
    #[arg(long, requires = "kube_namespace")]
    generation: Option<u64>,
    /// Serve NBD on this TCP address (development and tests).
    #[arg(long)]
    nbd_listen: Option<String>,
    /// Serve NBD on this unix socket (created 0600).
    #[arg(long)]
    nbd_socket: Option<PathBuf>,
    /// Writes need at least this many healthy replicas. This and the other settings below apply
    /// while the membership record holds none; once it does (the controller commits them), the
    /// record's win.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    min_healthy_replicas: u32,
    /// Eject a replica that does not answer within this.
    #[arg(long, default_value_t = 5000)]
    replica_timeout_ms: u64,
    /// Heartbeat interval towards replicas.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// Rebuild copy rate limit in MiB/s (0: unlimited).
    #[arg(long, default_value_t = barnacle_engine::authority::DEFAULT_REBUILD_MIB_PER_SEC)]
    rebuild_mib_per_sec: u64,
    /// Reads and writes per second through the export (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_iops: u64,
    /// MiB per second read and written through the export (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_mib_per_sec: u64,
    /// How often replicas out of the configuration are tried for a rebuild.
    #[arg(long, default_value_t = 2000)]
    rebuild_retry_ms: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, default_value = "127.0.0.1:0")]
    metrics_listen: String,
    /// Serve the gRPC management API here.
    #[arg(long, default_value = "127.0.0.1:0")]
    mgmt_listen: String,
    /// This engine's identity (default: a new one each start).
    #[arg(long)]
    engine_id: Option<Uuid>,
    /// Serve the export read-only (a readonly publication): writes, trims and zeroes get EPERM.
    #[arg(long)]
    read_only: bool,
    /// Async worker threads (disk IO runs on a separate blocking pool).
    #[arg(long, default_value_t = barnacle_daemon::process::DEFAULT_WORKER_THREADS)]
    worker_threads: usize,
    /// Write {"nbd": ADDR, "socket": PATH, "mgmt": ADDR, "metrics": ADDR, "pid": N,
    /// "resynced_bytes": N} here once serving.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

fn parse_replica(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((id, addr)) if !id.is_empty() && barnacle_engine::valid_replica_address(addr) => {
            Ok((id.to_owned(), addr.to_owned()))
        }
        _ => Err(format!("{s:?} is not ID=HOST:PORT or ID=unix:/PATH (e.g. r0=127.0.0.1:7400)")),
    }
}

fn main() -> anyhow::Result<()> {
    barnacle_daemon::process::init_tracing();
    let args = Args::parse();
    barnacle_daemon::process::runtime(args.worker_threads)?.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    barnacle_daemon::process::set_io_flusher();
    barnacle_daemon::process::tune_malloc();
    anyhow::ensure!(
        args.nbd_listen.is_some() || args.nbd_socket.is_some(),
        "give --nbd-listen or --nbd-socket"
    );
    let token = barnacle_daemon::process::read_token(&args.token_file)?;
    let cfg = VolumeConfig {
        volume_id: args.volume_id.clone(),
        token: token.clone(),
        engine_id: args.engine_id.unwrap_or_else(Uuid::new_v4),
        replicas: args.replicas.clone(),
        settings: barnacle_engine::authority::VolumeSettings {
            min_healthy: args.min_healthy_replicas,
            rebuild_mib_per_sec: args.rebuild_mib_per_sec,
            max_iops: args.max_iops,
            max_mib_per_sec: args.max_mib_per_sec,
        },
        replica_timeout: Duration::from_millis(args.replica_timeout_ms),
        heartbeat: Duration::from_millis(args.heartbeat_ms),
        rebuild_retry: Duration::from_millis(args.rebuild_retry_ms),
    };
    let authority: Arc<dyn MembershipAuthority> = match (&args.kube_namespace, &args.state_dir) {
        (Some(ns), _) => {
            let client = barnacle_engine::k8s::client().await.context("connecting to the Kubernetes API")?;
            let rt = tokio::runtime::Handle::current();
            let a = barnacle_engine::k8s::KubeAuthority::new(client, ns, &args.volume_id, rt);
            Arc::new(match args.generation {
                Some(g) => a.for_generation(g),
                None => a,
            })
        }
        (None, Some(dir)) => Arc::new(FileAuthority::new(dir)?),
        (None, None) => anyhow::bail!("give --state-dir or --kube-namespace"),
    };
    let volume = Volume::start(cfg, authority).await.context("starting the volume")?;
    let mut export = ExportConfig::new(&args.volume_id);
    export.read_only = args.read_only;
    let metrics = Arc::new(barnacle_engine::metrics::Metrics::new());
    let metered =
        Arc::new(barnacle_engine::metrics::Metered { inner: volume.clone(), metrics: metrics.clone() });
    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();
    let mut ready =
        serde_json::json!({ "pid": std::process::id(), "resynced_bytes": volume.resynced_bytes() });
    if let Some(addr) = &args.nbd_listen {
        let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        ready["nbd"] = l.local_addr()?.to_string().into();
        info!(volume_id = %args.volume_id, nbd = %l.local_addr()?, "NBD on TCP");
        tasks.push(tokio::spawn(barnacle_engine::serve(
            l,
            metered.clone(),
            export.clone(),
            shutdown.clone(),
        )));
    }
    if let Some(path) = &args.nbd_socket {
        let _ = std::fs::remove_file(path);
        let l =
            tokio::net::UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        ready["socket"] = path.display().to_string().into();
        info!(volume_id = %args.volume_id, socket = %path.display(), "NBD on a unix socket");
        tasks.push(tokio::spawn(barnacle_engine::serve(
            l,
            metered.clone(),
            export.clone(),
            shutdown.clone(),
        )));
    }
    let ml = tokio::net::TcpListener::bind(&args.metrics_listen)
        .await
        .with_context(|| format!("binding {}", args.metrics_listen))?;
    ready["metrics"] = ml.local_addr()?.to_string().into();
    info!(volume_id = %args.volume_id, metrics = %ml.local_addr()?, "metrics at /metrics");
    tasks.push(tokio::spawn({
        let (m, v, sd) = (metrics.clone(), volume.clone(), shutdown.clone());
        async move {
            if let Err(e) = barnacle_engine::metrics::serve(ml, m, v, sd).await {
                error!(error = %e, "metrics endpoint failed");
            }
        }
    }));
    let mgmt = tokio::net::TcpListener::bind(&args.mgmt_listen)
        .await
        .with_context(|| format!("binding {}", args.mgmt_listen))?;
    ready["mgmt"] = mgmt.local_addr()?.to_string().into();
    info!(volume_id = %args.volume_id, mgmt = %mgmt.local_addr()?, "management API");
    let stop_requested = CancellationToken::new();
    let service = barnacle_engine::mgmt::Manager::service(volume.clone(), &token, stop_requested.clone());
    let sd = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(mgmt);
        let res = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async move { sd.cancelled().await })
            .await;
        if let Err(e) = res {
            error!(error = %e, "management API failed");
        }
    }));
    if let Some(path) = &args.ready_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, ready.to_string())?;
        std::fs::rename(&tmp, path)?;
    }
    let deposed = volume.deposed();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let code = tokio::select! {
        _ = tokio::signal::ctrl_c() => 0,
        _ = term.recv() => 0,
        () = stop_requested.cancelled() => 0,
        () = deposed.cancelled() => 3,
    };
    shutdown.cancel();
    for t in tasks {
        let _ = t.await;
    }
    // The socket goes with this engine: a successor binds its own (a path of its generation).
    if let Some(path) = &args.nbd_socket {
        let _ = std::fs::remove_file(path);
    }
    if code != 0 {
        error!(volume_id = %args.volume_id, "deposed by a newer engine; exiting");
        std::process::exit(code);
    }
    Ok(())
}
