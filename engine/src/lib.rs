//! Barnacle engine: one volume's NBD frontend and synchronous replication to its replicas.
//!
//! - [`nbd`]: the NBD server (negotiation and transmission), generic over a [`nbd::Backend`].
//! - [`volume`]: the replicated volume: fan-out writes, ejection through the membership authority,
//!   fencing, range locks.
//! - [`authority`]: the membership authority trait and the standalone file-based implementation.
//!
//! Not built yet (tracked in the engine issue): write-intent marks and resync after an engine
//! crash, delta and full rebuilds, snapshot coordination, expansion, the management API and
//! metrics.

pub mod authority;
pub mod mgmt;
pub mod nbd;
pub mod volume;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

/// Serves `backend` as an NBD export on `listener` until `shutdown` fires.
pub async fn serve_tcp<B: nbd::Backend>(
    listener: tokio::net::TcpListener,
    backend: Arc<B>,
    cfg: nbd::ExportConfig,
    shutdown: CancellationToken,
) {
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let (b, c, sd) = (backend.clone(), cfg.clone(), shutdown.clone());
                let span = info_span!("nbd", volume_id = %cfg.name, %peer);
                tracker.spawn(
                    async move {
                        if let Err(e) = nbd::serve_connection(stream, b, c, sd).await {
                            warn!(error = %e, "NBD connection ended");
                        }
                    }
                    .instrument(span),
                );
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    tracker.close();
    tracker.wait().await;
}

/// Serves `backend` as an NBD export on a unix socket (created 0600: root only, DESIGN rule 9)
/// until `shutdown` fires.
pub async fn serve_unix<B: nbd::Backend>(
    listener: tokio::net::UnixListener,
    backend: Arc<B>,
    cfg: nbd::ExportConfig,
    shutdown: CancellationToken,
) {
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                let (b, c, sd) = (backend.clone(), cfg.clone(), shutdown.clone());
                let span = info_span!("nbd", volume_id = %cfg.name, peer = "unix");
                tracker.spawn(
                    async move {
                        if let Err(e) = nbd::serve_connection(stream, b, c, sd).await {
                            warn!(error = %e, "NBD connection ended");
                        }
                    }
                    .instrument(span),
                );
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    tracker.close();
    tracker.wait().await;
}
