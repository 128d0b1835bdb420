//! Clients of the replicas' and engines' management APIs and the replicas' data protocol, as the
//! controller uses them: snapshots, clones, resizes, status, and fencing on detach.

use std::time::Duration;

use barnacle_engine::mgmt::pb as epb;
use barnacle_replica::client::{ClientConfig, ReplicaClient};
use barnacle_replica::mgmt::pb as rpb;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use uuid::Uuid;

use crate::error::{ControllerError, Result};

/// Adds the volume's token to every call.
#[derive(Clone, Debug)]
pub struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut().insert("authorization", self.0.clone());
        Ok(r)
    }
}

pub type ReplicaMgmt = rpb::replica_manager_client::ReplicaManagerClient<InterceptedService<Channel, Bearer>>;
pub type EngineMgmt = epb::engine_manager_client::EngineManagerClient<InterceptedService<Channel, Bearer>>;

/// Longest wait for a management call that does no bulk work.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

async fn channel(volume_id: &str, url: &str, token: &str) -> Result<(Channel, Bearer)> {
    let ch = Endpoint::from_shared(url.to_owned())
        .map_err(|e| ControllerError::orchestrator(volume_id, format!("{url}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| ControllerError::orchestrator(volume_id, format!("connecting to {url}: {e}")))?;
    let value = format!("Bearer {token}")
        .parse()
        .map_err(|_| ControllerError::orchestrator(volume_id, "the token is not ASCII"))?;
    Ok((ch, Bearer(value)))
}

pub async fn replica_mgmt(volume_id: &str, url: &str, token: &str) -> Result<ReplicaMgmt> {
    let (ch, b) = channel(volume_id, url, token).await?;
    Ok(rpb::replica_manager_client::ReplicaManagerClient::with_interceptor(ch, b))
}

pub async fn engine_mgmt(volume_id: &str, url: &str, token: &str) -> Result<EngineMgmt> {
    let (ch, b) = channel(volume_id, url, token).await?;
    Ok(epb::engine_manager_client::EngineManagerClient::with_interceptor(ch, b))
}

/// A request with the call timeout.
pub fn req<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(CALL_TIMEOUT);
    r
}

/// A failed management call. The peer's code is kept in the message, not passed on: what a CSI
/// caller should see is the service's decision (a replica's AlreadyExists is no name conflict).
pub fn call_err(volume_id: &str, what: &str, s: &tonic::Status) -> ControllerError {
    ControllerError::orchestrator(volume_id, format!("{what}: {} ({:?})", s.message(), s.code()))
}

/// Fences one replica at `epoch` (DESIGN rules 3 and 10): afterwards it refuses every request of
/// an older epoch, so an engine that outlived its detach cannot write.
pub async fn fence_replica(
    volume_id: &str,
    token: &str,
    address: &str,
    epoch: u64,
    fencer: Uuid,
) -> Result<()> {
    let cfg = ClientConfig {
        volume_id: volume_id.to_owned(),
        token: token.to_owned(),
        engine_id: fencer,
        epoch,
        request_timeout: Duration::from_secs(5),
        heartbeat: Duration::ZERO,
    };
    let c = ReplicaClient::connect_to(address, cfg)
        .await
        .map_err(|e| ControllerError::orchestrator(volume_id, format!("fencing {address}: {e}")))?;
    c.fence(epoch, fencer)
        .await
        .map_err(|e| ControllerError::orchestrator(volume_id, format!("fencing {address}: {e}")))
}
