//! The orchestrator trait: how a volume's replica and engine processes come to run, and where a
//! volume's token and membership record live. The local orchestrator ([`crate::local`]) runs them
//! as child processes; the Kubernetes one ([`crate::k8s`]) runs them as pods.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use barnacle_engine::authority::MembershipAuthority;

use crate::error::Result;
use crate::placement::NodeInfo;
use crate::store::{Attachment, ReplicaPlacement, VolumeRecord};

/// Where a running replica serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaEndpoint {
    /// The data address the engine dials: `HOST:PORT`, or `unix:PATH` on the same node.
    pub data: String,
    /// The management API, `http://HOST:PORT`.
    pub mgmt: String,
}

/// Where a running engine serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineEndpoint {
    /// The NBD export's unix socket on the attaching node (0600, DESIGN rule 9).
    pub nbd_socket: PathBuf,
    /// The management API, `http://HOST:PORT`.
    pub mgmt: String,
    pub generation: u64,
}

/// A new volume token: 32 random bytes in hex.
pub fn new_token() -> String {
    use rand::Rng;
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs a volume's processes.
pub trait Orchestrator: Send + Sync + 'static {
    /// The nodes that can hold replicas and run engines.
    fn nodes(&self) -> Vec<NodeInfo>;

    /// The host ports replicas and engines serve on, two consecutive ports each, assigned by the
    /// controller and kept in the records so addresses survive restarts; `None` when the
    /// orchestrator needs none (local processes use unix sockets and ephemeral ports).
    fn ports(&self) -> Option<std::ops::RangeInclusive<u16>> {
        None
    }

    /// Host ports held on `node` by what runs there now, beyond the records (a pod still stopping
    /// keeps its ports until it is gone).
    fn ports_held(
        &self,
        _node: &str,
    ) -> impl Future<Output = Result<std::collections::BTreeSet<u16>>> + Send {
        async { Ok(std::collections::BTreeSet::new()) }
    }

    /// Fails when the orchestrator cannot start anything (for Probe).
    fn check(&self) -> Result<()>;

    /// Creates the volume's token if it has none. Never logged or put in a record.
    fn create_token(&self, volume_id: &str) -> impl Future<Output = Result<String>> + Send;

    /// The volume's token; an error if it has none (the volume was never built, or is gone).
    fn token(&self, volume_id: &str) -> impl Future<Output = Result<String>> + Send;

    /// The volume's membership authority (DESIGN rule 1). With `create` false, `None` when the
    /// volume has none (reads must not bring back what a delete removed).
    fn authority(&self, volume_id: &str, create: bool) -> Result<Option<Arc<dyn MembershipAuthority>>>;

    /// Makes the replica serve, creating its store with `create_size` bytes if it has none.
    /// Without `create_size` the store must exist (for example made by a clone).
    fn ensure_replica(
        &self,
        volume: &VolumeRecord,
        replica: &ReplicaPlacement,
        create_size: Option<u64>,
    ) -> impl Future<Output = Result<ReplicaEndpoint>> + Send;

    /// Watches the replica's process again if one still runs from an earlier controller (so it
    /// can be stopped); starts nothing.
    fn adopt_replica(&self, volume: &VolumeRecord, replica: &ReplicaPlacement);

    /// SIGKILLs the replica's process (a fault for demos); returns its pid (0 for a pod, which is
    /// deleted). Its supervisor restarts it and the engine rebuilds it.
    fn kill_replica(&self, volume_id: &str, replica: &ReplicaPlacement) -> Result<u32>;

    /// The name a clone on the same node gives the new replica's store (the replica protocol's
    /// CloneSnapshot `target_name`).
    fn clone_target_name(&self, volume_id: &str, replica: &ReplicaPlacement) -> String;

    /// Stops the replica and removes its data. Idempotent.
    fn remove_replica(
        &self,
        volume_id: &str,
        replica: &ReplicaPlacement,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Makes the volume's engine serve on the attachment's node, for the attachment's generation.
    fn ensure_engine(
        &self,
        volume: &VolumeRecord,
        attachment: &Attachment,
        replicas: &[(String, String)],
    ) -> impl Future<Output = Result<EngineEndpoint>> + Send;

    /// The volume's engine, if one serves now.
    fn engine(&self, volume_id: &str) -> Option<EngineEndpoint>;

    /// Stops the volume's engine. Idempotent.
    fn stop_engine(&self, volume_id: &str) -> impl Future<Output = Result<()>> + Send;

    /// Removes what remains of a deleted volume (token, membership record). Idempotent.
    fn forget_volume(&self, volume_id: &str) -> impl Future<Output = Result<()>> + Send;

    /// The controller is exiting: stop watching; stop the processes only if configured to.
    fn shutdown(&self) -> impl Future<Output = ()> + Send;
}
