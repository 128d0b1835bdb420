//! Barnacle replica: one replica of one volume on one node's disk.
//!
//! - [`store`]: the thin, copy-on-write store (data file + RocksDB metadata).
//! - [`wire`]: the engine-replica data protocol's frames and their codec.
//! - [`server`]: the data protocol server over TCP and unix sockets.
//! - [`shm`]: the shared-memory data channel to an engine on the same node.
//! - [`client`]: a pipelined client of that protocol (used by the engine, tests and benchmarks).
//! - [`mgmt`]: the gRPC management API (create, open, delete, snapshots, clone, resize, stat).

pub mod client;
pub mod error;
pub mod mgmt;
pub mod server;
pub mod shm;
pub mod store;
pub mod wire;

use std::sync::Arc;

pub use error::StoreError;
pub use store::Store;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serves `replica` on the data listener (and a unix socket, if given) and the management
/// listener until `shutdown` fires.
pub async fn run(
    data: TcpListener,
    data_unix: Option<tokio::net::UnixListener>,
    mgmt: TcpListener,
    replica: Arc<server::Replica>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let data_task = tokio::spawn(server::serve(data, replica.clone(), shutdown.clone()));
    let unix_task = data_unix.map(|l| tokio::spawn(server::serve(l, replica.clone(), shutdown.clone())));
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(mgmt);
    let sd = shutdown.clone();
    let res = tonic::transport::Server::builder()
        .add_service(mgmt::Manager::service(replica))
        .serve_with_incoming_shutdown(incoming, async move { sd.cancelled().await })
        .await;
    shutdown.cancel();
    let _ = data_task.await;
    if let Some(t) = unix_task {
        let _ = t.await;
    }
    res
}
