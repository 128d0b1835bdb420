//! The orchestrator trait: how a volume's replica and engine processes come to run, and where a
//! volume's token and membership record live. The local orchestrator ([`crate::local`]) runs them
//! as child processes; the Kubernetes one ([`crate::k8s`]) runs them as pods.

use std::path::PathBuf;
use std::sync::Arc;

use barnacle_engine::authority::MembershipAuthority;

use crate::error::Result;
use crate::placement::{Compute, NodeInfo};
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

/// What Barnacle's pods request of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodRequests {
    pub replica: Compute,
    pub engine: Compute,
}

/// A new volume token: 32 random bytes in hex.
pub fn new_token() -> String {
    use rand::Rng;
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs a volume's processes. Used as `dyn Orchestrator`, so the controller's service is compiled
/// once for both orchestrators.
#[async_trait::async_trait]
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
    async fn ports_held(&self, _node: &str) -> Result<std::collections::BTreeSet<u16>> {
        Ok(std::collections::BTreeSet::new())
    }

    /// What one replica pod and one engine pod request, where nodes' CPU and memory are counted
    /// (pods on Kubernetes); `None`: not counted.
    fn pod_requests(&self) -> Option<PodRequests> {
        None
    }

    /// Whether node `name` is gone for now: not known any more, or known to be down (a node
    /// directory that cannot be reached; a Kubernetes Node not Ready). A lost node's replicas are
    /// replaced after the volume's `replicaReplenishAfter`. False when the orchestrator cannot
    /// tell (it has not read the cluster yet).
    fn node_lost(&self, _name: &str) -> bool {
        false
    }

    /// Fails when the orchestrator cannot start anything (for Probe).
    fn check(&self) -> Result<()>;

    /// Creates the volume's token if it has none. Never logged or put in a record.
    async fn create_token(&self, volume_id: &str) -> Result<String>;

    /// The volume's token; an error if it has none (the volume was never built, or is gone).
    async fn token(&self, volume_id: &str) -> Result<String>;

    /// The volume's membership authority (DESIGN rule 1). With `create` false, `None` when the
    /// volume has none (reads must not bring back what a delete removed).
    fn authority(&self, volume_id: &str, create: bool) -> Result<Option<Arc<dyn MembershipAuthority>>>;

    /// Makes the replica serve, creating its store with `create_size` bytes if it has none.
    /// Without `create_size` the store must exist (for example made by a clone).
    async fn ensure_replica(
        &self,
        volume: &VolumeRecord,
        replica: &ReplicaPlacement,
        create_size: Option<u64>,
    ) -> Result<ReplicaEndpoint>;

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
    async fn remove_replica(&self, volume_id: &str, replica: &ReplicaPlacement) -> Result<()>;

    /// Makes the volume's engine serve on the attachment's node, for the attachment's generation.
    async fn ensure_engine(
        &self,
        volume: &VolumeRecord,
        attachment: &Attachment,
        replicas: &[(String, String)],
    ) -> Result<EngineEndpoint>;

    /// The volume's engine, if one serves now.
    fn engine(&self, volume_id: &str) -> Option<EngineEndpoint>;

    /// Stops the volume's engine. Idempotent.
    async fn stop_engine(&self, volume_id: &str) -> Result<()>;

    /// Removes what remains of a deleted volume (token, membership record). Idempotent.
    async fn forget_volume(&self, volume_id: &str) -> Result<()>;

    /// The controller is exiting: stop watching; stop the processes only if configured to.
    async fn shutdown(&self);
}
