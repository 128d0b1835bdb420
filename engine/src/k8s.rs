//! The membership authority of a volume in a Kubernetes cluster: the `status.membership` of the
//! volume's custom resource (`volumes.barnacle.dev`, named by the volume id). A change is a
//! replace of the status subresource carrying the `resourceVersion` that was read, so the API
//! server refuses it when anything changed the resource since (DESIGN rule 1). The record keeps its
//! own version counter; a conflict caused by a change elsewhere in the resource (its spec) is
//! retried, one caused by another membership is the caller's `Conflict`.
//!
//! The types here are the status schema too: the controller's CRD embeds [`MembershipStatus`].

use kube::api::{ApiResource, DynamicObject, PostParams};
use kube::core::GroupVersionKind;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::authority::{
    AuthorityError, Membership, MembershipAuthority, ReplicaRecord, ReplicaState, Versioned, VolumeSettings,
};

/// The API group of Barnacle's custom resources.
pub const GROUP: &str = "barnacle.dev";
/// Their version.
pub const VERSION: &str = "v1alpha1";

/// A replica in the membership, as the custom resource's status holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MemberStatus {
    pub id: String,
    pub addr: String,
    /// "healthy" or "ejected".
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ejected_at_epoch: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_id: Option<String>,
    #[serde(default)]
    pub tracked_since: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missed_regions: Vec<u64>,
}

/// The volume's membership (DESIGN rule 1), with the version the authority gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MembershipStatus {
    /// Bumped by every change; what a compare-and-set compares.
    pub version: u64,
    pub epoch: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_id: Option<String>,
    pub replicas: Vec<MemberStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<VolumeSettings>,
}

impl MembershipStatus {
    pub fn new(version: u64, m: &Membership) -> MembershipStatus {
        MembershipStatus {
            version,
            epoch: m.epoch,
            engine_id: m.engine_id.map(|u| u.to_string()),
            replicas: m
                .replicas
                .iter()
                .map(|r| {
                    let (state, ejected_at_epoch) = match r.state {
                        ReplicaState::Healthy => ("healthy", None),
                        ReplicaState::Ejected { epoch } => ("ejected", Some(epoch)),
                    };
                    MemberStatus {
                        id: r.id.clone(),
                        addr: r.addr.clone(),
                        state: state.to_owned(),
                        ejected_at_epoch,
                        store_id: r.store_id.map(|u| u.to_string()),
                        tracked_since: r.tracked_since,
                        missed_regions: r.missed_regions.clone(),
                    }
                })
                .collect(),
            settings: m.settings,
        }
    }

    /// The record this status holds; an error names what is malformed.
    pub fn to_versioned(&self) -> Result<Versioned, String> {
        let uuid = |s: &Option<String>| -> Result<Option<Uuid>, String> {
            s.as_deref().map(|u| Uuid::parse_str(u).map_err(|e| format!("{u:?}: {e}"))).transpose()
        };
        let mut replicas = Vec::with_capacity(self.replicas.len());
        for r in &self.replicas {
            let state = match (r.state.as_str(), r.ejected_at_epoch) {
                ("healthy", _) => ReplicaState::Healthy,
                ("ejected", Some(epoch)) => ReplicaState::Ejected { epoch },
                (s, e) => return Err(format!("replica {}: state {s:?} with ejection epoch {e:?}", r.id)),
            };
            replicas.push(ReplicaRecord {
                id: r.id.clone(),
                addr: r.addr.clone(),
                state,
                store_id: uuid(&r.store_id)?,
                tracked_since: r.tracked_since,
                missed_regions: r.missed_regions.clone(),
            });
        }
        Ok(Versioned {
            version: self.version,
            membership: Membership {
                epoch: self.epoch,
                engine_id: uuid(&self.engine_id)?,
                replicas,
                settings: self.settings,
            },
        })
    }
}

/// A client of the Kubernetes API (from `$KUBECONFIG` or the pod's service account) whose
/// requests time out: a call that hangs must not hang an IO or a leader.
pub async fn client() -> Result<kube::Client, kube::Error> {
    let mut cfg = kube::Config::infer().await.map_err(kube::Error::InferConfig)?;
    cfg.connect_timeout = Some(std::time::Duration::from_secs(5));
    cfg.read_timeout = Some(std::time::Duration::from_secs(15));
    cfg.write_timeout = Some(std::time::Duration::from_secs(15));
    kube::Client::try_from(cfg)
}

/// The `volumes.barnacle.dev` resource, untyped (the typed one lives in the controller).
pub fn volume_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, "Volume"), "volumes")
}

/// The membership authority of one volume, on the API server.
#[derive(Clone)]
pub struct KubeAuthority {
    api: kube::Api<DynamicObject>,
    volume_id: String,
    rt: tokio::runtime::Handle,
    /// An engine's attachment generation: its writes are refused once the volume's record
    /// names another (a newer publication, or none).
    generation: Option<u64>,
}

impl std::fmt::Debug for KubeAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeAuthority").field("volume_id", &self.volume_id).finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> AuthorityError {
    AuthorityError::Unavailable(e.to_string())
}

/// How long one authority call may take: a call that hangs must make IO fail, not hang.
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl KubeAuthority {
    /// The authority of `volume_id` in `namespace`. Its calls block: make them from a blocking
    /// thread of the runtime `rt` belongs to.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        volume_id: &str,
        rt: tokio::runtime::Handle,
    ) -> KubeAuthority {
        KubeAuthority {
            api: kube::Api::namespaced_with(client, namespace, &volume_resource()),
            volume_id: volume_id.to_owned(),
            rt,
            generation: None,
        }
    }

    /// The authority of an engine serving the attachment of `generation`: a write fails with
    /// `Conflict` once the volume's record (`spec.attachment.generation`, read in the same
    /// request the write's `resourceVersion` comes from) names another. An engine left running
    /// on a node that was cut off, and restarted there after the volume was published elsewhere,
    /// so cannot take the volume back (rules 1 and 10).
    #[must_use]
    pub fn for_generation(mut self, generation: u64) -> KubeAuthority {
        self.generation = Some(generation);
        self
    }

    fn block_on<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, AuthorityError>>,
    ) -> Result<T, AuthorityError> {
        self.rt.block_on(async {
            tokio::time::timeout(CALL_TIMEOUT, f)
                .await
                .map_err(|_| unavailable("the Kubernetes API did not answer in time"))?
        })
    }

    fn status_of(&self, obj: &DynamicObject) -> Result<Option<MembershipStatus>, AuthorityError> {
        match obj.data.get("status").and_then(|s| s.get("membership")) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| unavailable(format!("volume {}: malformed membership: {e}", self.volume_id))),
        }
    }
}

impl MembershipAuthority for KubeAuthority {
    fn load(&self) -> Result<Option<Versioned>, AuthorityError> {
        self.block_on(async {
            let Some(obj) = self.api.get_opt(&self.volume_id).await.map_err(unavailable)? else {
                return Ok(None);
            };
            self.status_of(&obj)?.map(|s| s.to_versioned().map_err(unavailable)).transpose()
        })
    }

    fn compare_and_set(&self, expected: Option<u64>, new: &Membership) -> Result<u64, AuthorityError> {
        self.block_on(async {
            loop {
                let mut obj = self.api.get(&self.volume_id).await.map_err(|e| match e {
                    kube::Error::Api(s) if s.code == 404 => {
                        unavailable(format!("volume {} has no resource", self.volume_id))
                    }
                    e => unavailable(e),
                })?;
                let found = self.status_of(&obj)?.map(|s| s.version);
                if found != expected {
                    return Err(AuthorityError::Conflict { expected, found });
                }
                if let Some(mine) = self.generation {
                    let current = obj.data.pointer("/spec/attachment/generation").and_then(serde_json::Value::as_u64);
                    if current != Some(mine) {
                        tracing::warn!(volume_id = %self.volume_id, generation = mine, current = ?current,
                            "the volume is published anew: this engine's writes are refused");
                        return Err(AuthorityError::Conflict { expected, found });
                    }
                }
                let version = found.unwrap_or(0) + 1;
                let status = serde_json::to_value(MembershipStatus::new(version, new)).map_err(unavailable)?;
                match obj.data.get_mut("status") {
                    Some(serde_json::Value::Object(s)) => {
                        s.insert("membership".to_owned(), status);
                    }
                    _ => obj.data["status"] = serde_json::json!({ "membership": status }),
                }
                // The read resourceVersion travels in the object: the server refuses the write
                // (409) when the resource changed since.
                match self.api.replace_status(&self.volume_id, &PostParams::default(), &obj).await {
                    Ok(_) => return Ok(version),
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        tracing::debug!(volume_id = %self.volume_id, "volume resource changed; reading again");
                    }
                    Err(e) => return Err(unavailable(e)),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_membership_round_trips_through_its_status() {
        let m = Membership {
            epoch: 7,
            engine_id: Some(Uuid::new_v4()),
            replicas: vec![
                ReplicaRecord {
                    id: "r0".into(),
                    addr: "10.0.0.1:20000".into(),
                    state: ReplicaState::Healthy,
                    store_id: Some(Uuid::new_v4()),
                    tracked_since: 3,
                    missed_regions: vec![],
                },
                ReplicaRecord {
                    id: "r1".into(),
                    addr: "10.0.0.2:20002".into(),
                    state: ReplicaState::Ejected { epoch: 6 },
                    store_id: None,
                    tracked_since: 0,
                    missed_regions: vec![4, 9],
                },
            ],
            settings: Some(VolumeSettings {
                min_healthy: 2,
                rebuild_mib_per_sec: 0,
                max_iops: 500,
                max_mib_per_sec: 40,
            }),
        };
        let s = MembershipStatus::new(12, &m);
        let json = serde_json::to_value(&s).unwrap_or_default();
        let back: MembershipStatus = serde_json::from_value(json).unwrap_or_else(|e| panic!("{e}"));
        let v = back.to_versioned().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v.version, 12);
        assert_eq!(v.membership, m);
    }

    #[test]
    fn malformed_states_are_refused() {
        let mut s = MembershipStatus::new(
            1,
            &Membership { epoch: 1, engine_id: None, replicas: vec![], settings: None },
        );
        s.replicas.push(MemberStatus {
            id: "r0".into(),
            addr: "a:1".into(),
            state: "ejected".into(),
            ejected_at_epoch: None,
            store_id: None,
            tracked_since: 0,
            missed_regions: vec![],
        });
        assert!(s.to_versioned().is_err(), "an ejected replica needs its epoch");
        s.replicas[0].state = "lost".into();
        assert!(s.to_versioned().is_err());
    }
}
