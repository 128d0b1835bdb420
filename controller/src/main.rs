//! `barnacle-controller`: the CSI Identity and Controller services, either with the RocksDB store
//! and the local orchestrator (replicas and engines as child processes, each node a directory) or
//! in a Kubernetes cluster (records as custom resources, replicas and engines as pods).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use barnacle_controller::k8s::{KubeConfig, KubeOrchestrator};
use barnacle_controller::k8s_store::KubeStore;
use barnacle_controller::leader::Election;
use barnacle_controller::local::{LocalConfig, LocalNode, LocalOrchestrator};
use barnacle_controller::service::{Service, ServiceConfig};
use barnacle_controller::store::RocksStore;
use barnacle_daemon::process;
use clap::Parser;
use k8s_openapi::api::core::v1::ResourceRequirements;
use tracing::{info, warn};

/// Where the volumes' replicas and engines run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OrchestratorKind {
    /// Child processes of this controller; each node a directory (records in RocksDB).
    Local,
    /// Pods of a Kubernetes cluster (records as custom resources).
    Kubernetes,
}

/// Serve Barnacle's CSI controller.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The CSI endpoint: unix:///path/to/csi.sock.
    #[arg(long, env = "CSI_ENDPOINT")]
    endpoint: String,
    #[arg(long, value_enum, default_value_t = OrchestratorKind::Local)]
    orchestrator: OrchestratorKind,
    /// Thin volumes may provision this many times a node's capacity.
    #[arg(long, default_value_t = 2.0)]
    overcommit: f64,
    /// Write {"pid": N, "endpoint": PATH} here once serving.
    #[arg(long)]
    ready_file: Option<PathBuf>,

    /// Local: directory of the controller's state: the record store, tokens, membership records.
    #[arg(long, required_if_eq("orchestrator", "local"))]
    state_dir: Option<PathBuf>,
    /// Local: a node as NAME=DIR[,zone=ZONE][,capacity=SIZE]; repeat for each. DIR stands for its
    /// disk.
    #[arg(long = "node", value_parser = LocalNode::parse)]
    nodes: Vec<LocalNode>,
    /// Local: a JSON file listing nodes ([{"name": .., "dir": .., "zone": .., "capacity": ..}]),
    /// in addition to --node.
    #[arg(long)]
    nodes_file: Option<PathBuf>,
    /// Local: where barnacle-replica and barnacle-engine are (default: beside this program).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Local: stop every replica and engine when the controller exits (default: they keep
    /// serving and the next controller adopts them).
    #[arg(long)]
    stop_processes_on_exit: bool,
    /// How often lost replicas are looked for and, past their volume's `replicaReplenishAfter`,
    /// replaced (milliseconds).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..))]
    replenish_interval_ms: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (volumes, lost and replenished replicas).
    #[arg(long)]
    metrics_listen: Option<String>,

    /// Kubernetes: the namespace of the records, pods and Secrets (the controller's own).
    #[arg(long, env = "POD_NAMESPACE", required_if_eq("orchestrator", "kubernetes"))]
    namespace: Option<String>,
    /// Kubernetes: the ConfigMap naming each node's disk directory.
    #[arg(long, default_value = "barnacle-disks")]
    disks_configmap: String,
    /// Kubernetes: the image of replica and engine pods.
    #[arg(long, env = "BARNACLE_IMAGE", required_if_eq("orchestrator", "kubernetes"))]
    image: Option<String>,
    #[arg(long, default_value = "IfNotPresent")]
    image_pull_policy: String,
    /// Kubernetes: the service account of engine pods.
    #[arg(long, default_value = "barnacle-engine")]
    engine_service_account: String,
    /// Kubernetes: host ports of replicas and engines (two each), as FIRST-LAST.
    #[arg(long, default_value = "20000-29999", value_parser = parse_ports)]
    host_ports: std::ops::RangeInclusive<u16>,
    /// Kubernetes: the host directory of engines' NBD sockets (the node plugin mounts it too).
    #[arg(long, default_value = "/var/lib/barnacle/run")]
    run_dir: String,
    /// Kubernetes: the resources of each replica pod, as Kubernetes ResourceRequirements in JSON.
    /// The default requests what an idle replica uses and leaves CPU unlimited (block IO is not
    /// throttled); placement counts the requests against each node's allocatable.
    #[arg(long, default_value = DEFAULT_POD_RESOURCES, value_parser = parse_resources)]
    replica_resources: ResourceRequirements,
    /// Kubernetes: the resources of each engine pod, as for replicas.
    #[arg(long, default_value = DEFAULT_POD_RESOURCES, value_parser = parse_resources)]
    engine_resources: ResourceRequirements,
    /// Kubernetes: replica and engine pods add the SYS_RESOURCE capability, to mark themselves
    /// as IO flushers (DESIGN rule 12). Set false where the container runtime cannot grant it:
    /// their containers then cannot start ("unable to apply caps").
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    io_flusher_capability: bool,
    /// Kubernetes: a Secret for pulling the image; repeat for each.
    #[arg(long = "image-pull-secret")]
    image_pull_secrets: Vec<String>,
    /// Kubernetes: the priority class of replica and engine pods.
    #[arg(long)]
    priority_class: Option<String>,
    /// Kubernetes: seconds a pod may take to become ready.
    #[arg(long, default_value_t = 120)]
    pod_ready_timeout: u64,
    /// Kubernetes: lead through a Lease, so one of several controller replicas acts.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Kubernetes: the Lease's name.
    #[arg(long, default_value = "barnacle-controller")]
    leader_election_lease: String,
}

/// Serves the controller's metrics on `addr`, if given.
async fn spawn_metrics(
    addr: Option<&str>,
    service: &Arc<Service>,
    stop: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<Option<std::net::SocketAddr>> {
    let Some(addr) = addr else { return Ok(None) };
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    let bound = listener.local_addr()?;
    info!(metrics = %bound, "metrics at /metrics");
    let (s, stop) = (service.clone(), stop.clone());
    tokio::spawn(async move {
        if let Err(e) = barnacle_controller::metrics::serve(listener, s, stop).await {
            warn!(error = %e, "the metrics server stopped");
        }
    });
    Ok(Some(bound))
}

fn parse_ports(s: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (a, b) = s.split_once('-').ok_or_else(|| format!("{s:?}: expected FIRST-LAST"))?;
    let (a, b): (u16, u16) = (
        a.trim().parse().map_err(|_| format!("{a:?} is not a port"))?,
        b.trim().parse().map_err(|_| format!("{b:?} is not a port"))?,
    );
    if a == 0 || b <= a {
        return Err(format!("{s:?}: need 0 < FIRST < LAST"));
    }
    Ok(a..=b)
}

/// What an idle replica or engine uses, measured on a real node (docs/kubernetes.md), with
/// room for IO buffers under the memory limit.
const DEFAULT_POD_RESOURCES: &str =
    r#"{"requests":{"cpu":"50m","memory":"64Mi"},"limits":{"memory":"512Mi"}}"#;

fn parse_resources(s: &str) -> Result<ResourceRequirements, String> {
    let r: ResourceRequirements =
        serde_json::from_str(s).map_err(|e| format!("{s:?}: expected ResourceRequirements in JSON: {e}"))?;
    barnacle_controller::k8s::check_resources(&r)?;
    Ok(r)
}

fn main() -> anyhow::Result<()> {
    barnacle_daemon::process::init_tracing();
    let args = Args::parse();
    barnacle_daemon::process::runtime(2)?.block_on(serve(args))
}

/// Runs the replenishment pass every `period` until `stop` fires.
fn spawn_replenish(service: &Arc<Service>, period: Duration, stop: &tokio_util::sync::CancellationToken) {
    let (s, stop) = (service.clone(), stop.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(period) => {}
            }
            if let Err(e) = s.replenish().await {
                warn!(error = %e, "replenishment pass failed");
            }
        }
    });
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let socket = process::unix_endpoint(&args.endpoint)?;
    anyhow::ensure!(args.overcommit >= 1.0, "--overcommit must be at least 1");
    let cfg = ServiceConfig { overcommit: args.overcommit };
    let shutdown = process::shutdown_on_signals();
    match args.orchestrator {
        OrchestratorKind::Local => {
            let state_dir = args.state_dir.clone().context("give --state-dir")?;
            let mut nodes = args.nodes.clone();
            if let Some(f) = &args.nodes_file {
                let text = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
                let more: Vec<LocalNode> =
                    serde_json::from_slice(&text).with_context(|| format!("parsing {}", f.display()))?;
                nodes.extend(more);
            }
            anyhow::ensure!(!nodes.is_empty(), "give at least one --node NAME=DIR");
            let bin_dir = match &args.bin_dir {
                Some(d) => d.clone(),
                None => std::env::current_exe()?.parent().context("program has no directory")?.to_owned(),
            };
            std::fs::create_dir_all(&state_dir)
                .with_context(|| format!("creating {}", state_dir.display()))?;
            let store = RocksStore::open(&state_dir.join("store")).context("opening the record store")?;
            let orch = LocalOrchestrator::new(LocalConfig {
                state_dir: state_dir.clone(),
                nodes,
                bin_dir,
                stop_on_exit: args.stop_processes_on_exit,
            })?;
            let service = Arc::new(Service::new(Arc::new(store), Arc::new(orch), cfg));
            spawn_replenish(&service, Duration::from_millis(args.replenish_interval_ms), &shutdown);
            let metrics = spawn_metrics(args.metrics_listen.as_deref(), &service, &shutdown).await?;
            let listener = listen(&args, &socket, metrics)?;
            info!(endpoint = %socket.display(), state_dir = %state_dir.display(), "controller serving");
            barnacle_controller::run(listener, service, shutdown, Box::pin(std::future::ready(()))).await?;
        }
        OrchestratorKind::Kubernetes => {
            let namespace = args.namespace.clone().context("give --namespace")?;
            let client = barnacle_engine::k8s::client().await.context("connecting to the Kubernetes API")?;
            let rt = tokio::runtime::Handle::current();
            let store = KubeStore::new(client.clone(), &namespace, rt.clone());
            let orch = Arc::new(KubeOrchestrator::new(
                client.clone(),
                KubeConfig {
                    namespace: namespace.clone(),
                    image: args.image.clone().context("give --image")?,
                    image_pull_policy: args.image_pull_policy.clone(),
                    disks_configmap: args.disks_configmap.clone(),
                    ports: args.host_ports.clone(),
                    engine_service_account: args.engine_service_account.clone(),
                    run_dir: args.run_dir.clone(),
                    replica_resources: args.replica_resources.clone(),
                    engine_resources: args.engine_resources.clone(),
                    io_flusher_capability: args.io_flusher_capability,
                    ready_timeout: Duration::from_secs(args.pod_ready_timeout),
                    image_pull_secrets: args.image_pull_secrets.clone(),
                    priority_class: args.priority_class.clone().filter(|p| !p.is_empty()),
                },
                rt,
            ));
            let _ = orch.refresh().await;
            tokio::spawn(orch.clone().refresh_every(Duration::from_secs(5), shutdown.clone()));
            let service = Arc::new(Service::new(Arc::new(store), orch, cfg));
            spawn_replenish(&service, Duration::from_millis(args.replenish_interval_ms), &shutdown);
            let metrics = spawn_metrics(args.metrics_listen.as_deref(), &service, &shutdown).await?;
            {
                let (s, stop) = (service.clone(), shutdown.clone());
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_secs(10)) => {}
                        }
                        if let Err(e) = s.reconcile().await {
                            warn!(error = %e, "reconcile failed");
                        }
                    }
                });
            }
            let start: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
                if args.leader_election {
                    let election = Election {
                        namespace: namespace.clone(),
                        lease: args.leader_election_lease.clone(),
                        identity: format!(
                            "{}-{}",
                            std::env::var("POD_NAME").unwrap_or_else(|_| "barnacle-controller".into()),
                            &uuid::Uuid::new_v4().simple().to_string()[..8]
                        ),
                        lease_duration: Duration::from_secs(15),
                        renew_deadline: Duration::from_secs(10),
                        retry_every: Duration::from_secs(2),
                    };
                    Box::pin(election.lead(client))
                } else {
                    Box::pin(std::future::ready(()))
                };
            let listener = listen(&args, &socket, metrics)?;
            info!(endpoint = %socket.display(), namespace, "controller serving (Kubernetes)");
            barnacle_controller::run(listener, service, shutdown.clone(), start).await?;
        }
    }
    Ok(())
}

/// Binds the CSI socket and writes the ready file.
fn listen(
    args: &Args,
    socket: &std::path::Path,
    metrics: Option<std::net::SocketAddr>,
) -> anyhow::Result<tokio::net::UnixListener> {
    let listener = process::bind_private_socket(socket)?;
    if let Some(path) = &args.ready_file {
        process::write_ready_file(
            path,
            &serde_json::json!({
                "pid": std::process::id(),
                "endpoint": socket.display().to_string(),
                "metrics": metrics.map(|m| m.to_string()),
            }),
        )?;
    }
    Ok(listener)
}
