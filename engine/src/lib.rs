//! Barnacle engine: one volume's NBD frontend and synchronous replication to its replicas.
//!
//! - [`nbd`]: the NBD server (negotiation and transmission), generic over a [`nbd::Backend`].
//! - [`volume`]: the replicated volume: fan-out writes, ejection through the membership authority,
//!   fencing, range locks.
//! - [`authority`]: the membership authority trait and the standalone file-based implementation.
//! - [`k8s`]: the membership authority of a volume in a Kubernetes cluster (its custom resource).
//!
//! - [`mgmt`]: the gRPC management API (status, snapshots, expansion, adding and removing
//!   replicas, shutdown).
//! - [`metrics`]: the Prometheus `/metrics` endpoint.
//! - [`qos`]: the volume's IO limits (token buckets), changed live.

pub mod authority;
pub mod k8s;
pub mod metrics;
pub mod mgmt;
pub mod nbd;
pub mod qos;
pub mod volume;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

/// A listener NBD clients connect to: TCP, or a unix socket.
pub trait Accept: Send + 'static {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static;
    /// The next connection and a name for its peer.
    fn next(&self) -> impl std::future::Future<Output = std::io::Result<(Self::Stream, String)>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn next(&self) -> std::io::Result<(Self::Stream, String)> {
        let (s, peer) = self.accept().await?;
        let _ = s.set_nodelay(true);
        Ok((s, peer.to_string()))
    }
}

impl Accept for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn next(&self) -> std::io::Result<(Self::Stream, String)> {
        Ok((self.accept().await?.0, "unix".to_owned()))
    }
}

/// Serves `backend` as an NBD export to every client of `listener` until `shutdown` fires. A unix
/// socket should be created 0600 (root only, DESIGN rule 9).
pub async fn serve<L: Accept, B: nbd::Backend>(
    listener: L,
    backend: Arc<B>,
    cfg: nbd::ExportConfig,
    shutdown: CancellationToken,
) {
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            a = listener.next() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
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

/// Whether `addr` is a replica data address: `IP:PORT`, or `unix:/PATH` for a replica on this
/// node.
pub fn valid_replica_address(addr: &str) -> bool {
    match addr.strip_prefix("unix:") {
        Some(path) => path.starts_with('/') && path.len() > 1,
        None => addr.parse::<std::net::SocketAddr>().is_ok(),
    }
}
