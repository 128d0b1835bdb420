//! `barnacle-nbd-fuse`: the userspace attach helper. Serves one NBD export as the file `disk` in a
//! FUSE filesystem at `--mountpoint` until that filesystem is unmounted; the node plugin puts a
//! loop device on the file. SIGHUP re-reads the export's size (after an expansion).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use barnacle_node::attach::RECONNECT_PATIENCE;
use barnacle_node::fuse::DiskFs;
use barnacle_node::nbd_client::Client;
use clap::Parser;
use tracing::{info, warn};

/// Serve an NBD export as a one-file FUSE filesystem.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[arg(long)]
    volume_id: String,
    /// The engine's NBD unix socket.
    #[arg(long)]
    socket: PathBuf,
    #[arg(long)]
    export: String,
    #[arg(long)]
    mountpoint: PathBuf,
    /// Mount read-only.
    #[arg(long)]
    read_only: bool,
    /// Async worker threads (NBD requests and replies). One keeps the reply reader and the
    /// requests' tasks on one thread, with no wake-ups between threads: measured faster at queue
    /// depth 1 than two, and no slower at 32 (docs/performance.md).
    #[arg(long, default_value_t = barnacle_daemon::process::DEFAULT_WORKER_THREADS)]
    worker_threads: usize,
    /// Threads reading FUSE requests from the kernel.
    #[arg(long, default_value_t = 2)]
    fuse_threads: usize,
}

fn main() -> anyhow::Result<()> {
    barnacle_daemon::process::init_tracing();
    let args = Args::parse();
    // It serves block IO: memory reclaim must not wait on it (DESIGN rule 12).
    barnacle_daemon::process::set_io_flusher();
    let rt = barnacle_daemon::process::runtime(args.worker_threads)?;
    let client = rt
        .block_on(Client::connect(args.socket.clone(), args.export.clone(), RECONNECT_PATIENCE))
        .with_context(|| format!("connecting to {}", args.socket.display()))?;
    let client = Arc::new(client);
    info!(volume_id = %args.volume_id, size = client.info().size, socket = %args.socket.display(), "export opened");
    {
        let (c, vol) = (client.clone(), args.volume_id.clone());
        rt.spawn(async move {
            let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
                return;
            };
            while hup.recv().await.is_some() {
                match c.refresh().await {
                    Ok(i) => info!(volume_id = %vol, size = i.size, "export size re-read"),
                    Err(e) => warn!(volume_id = %vol, error = %e, "export size not re-read"),
                }
            }
        });
    }
    let fs = DiskFs::new(client, rt.handle().clone());
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::FSName(format!("barnacle:{}", args.volume_id)),
        fuser::MountOption::Subtype("barnacle".into()),
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoExec,
        fuser::MountOption::DefaultPermissions,
    ];
    if args.read_only {
        cfg.mount_options.push(fuser::MountOption::RO);
    }
    cfg.n_threads = Some(args.fuse_threads.max(1));
    fuser::mount(fs, &args.mountpoint, &cfg)
        .with_context(|| format!("serving FUSE at {}", args.mountpoint.display()))?;
    info!(volume_id = %args.volume_id, "unmounted; exiting");
    Ok(())
}
