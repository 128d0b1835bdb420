//! Replica replenishment: a replica lost longer than its volume's `replicaReplenishAfter` is
//! replaced by a new one on another node, so a volume does not stay degraded after a node or
//! disk is gone for good.
//!
//! A replica is *lost* when its node is (the orchestrator's [`Orchestrator::node_lost`]: a
//! node directory that cannot be reached, a Kubernetes Node that is not Ready or was removed),
//! or when its published volume's engine has it ejected and is not rebuilding it. The controller
//! notes when it first saw each lost replica (in memory: a controller that restarts starts the
//! wait again, which only delays a replacement). A pass runs every few seconds; a replica past
//! the wait is replaced as ModifyVolume adds and removes replicas (`modify.rs`): the new one is
//! placed like CreateVolume's (spread rules, the volume's nodes excluded, lost nodes never
//! offered), started empty and committed out of sync, so the engine rebuilds it fully while the
//! volume serves (or at its next publish), then the lost one leaves the membership record and
//! the volume's record. Its data is wiped at once when its node is there, else kept in
//! `lost_replicas` and wiped by a later pass once the node is back.
//!
//! Never replaced: the last in-sync copy of a detached volume (its node may come back with the
//! only data), nor anything while another operation holds the volume.
//!
//! [`Orchestrator::node_lost`]: crate::orchestrator::Orchestrator::node_lost

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use barnacle_engine::authority::ReplicaState;
use tracing::{info, warn};

use super::{Service, vkey};
use crate::error::{ControllerError, Result};
use crate::store::{ReplicaPlacement, VolumeRecord, VolumeState};

/// What the controller sees of a replica this pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Fine,
    /// Being rebuilt, or waiting for its rebuild: progress, not a loss.
    Rebuilding,
    /// Lost (ejected and not rebuilding, or its node gone); `in_sync` when the membership still
    /// counts it (a detached volume's copy on a lost node).
    Lost {
        in_sync: bool,
    },
}

impl Service {
    /// One replenishment pass over every live volume (called periodically).
    pub async fn replenish(&self) -> Result<()> {
        if self.ready().is_err() {
            return Ok(());
        }
        self.replenish_counters.passes.fetch_add(1, Ordering::Relaxed);
        let volumes = match self.db(|s| s.volumes()).await {
            Ok(v) => v,
            Err(e) => {
                self.replenish_counters.errors.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        let live: Vec<String> =
            volumes.iter().filter(|v| v.state == VolumeState::Ready).map(|v| v.id.clone()).collect();
        // Forget what was noted of volumes that are gone.
        self.lost_since.lock().retain(|(vid, _), _| live.contains(vid));
        for id in live {
            // A volume busy with another operation waits for the next pass.
            let Ok(_g) = self.guards.lock(&[vkey(&id)]) else { continue };
            let Ok(Some(mut v)) = self.volume(&id).await else { continue };
            if v.state != VolumeState::Ready {
                continue;
            }
            if let Err(e) = self.replenish_volume(&mut v).await {
                self.replenish_counters.errors.fetch_add(1, Ordering::Relaxed);
                warn!(volume_id = %v.id, error = %e, "replenishment: not done this pass");
            }
        }
        Ok(())
    }

    /// What the replenishment passes did since this controller started.
    pub fn replenish_counters(&self) -> &crate::metrics::ReplenishCounters {
        &self.replenish_counters
    }

    /// Every replica seen lost now: (volume id, replica id, lost for).
    pub fn lost_replicas_now(&self) -> Vec<(String, String, Duration)> {
        self.lost_since.lock().iter().map(|((v, r), t)| (v.clone(), r.clone(), t.elapsed())).collect()
    }

    /// How long replica `replica` of volume `volume` has been seen lost, if it is.
    pub(super) fn lost_for(&self, volume: &str, replica: &str) -> Option<Duration> {
        self.lost_since.lock().get(&(volume.to_owned(), replica.to_owned())).map(Instant::elapsed)
    }

    async fn replenish_volume(&self, v: &mut VolumeRecord) -> Result<()> {
        self.wipe_returned(v).await?;
        let seen = self.seen(v).await?;
        let wait = v.params.replenish_after();
        let now = Instant::now();
        let mut due = Vec::new();
        {
            let mut since = self.lost_since.lock();
            for r in &v.replicas {
                let key = (v.id.clone(), r.id.clone());
                match seen.get(&r.id).copied().unwrap_or(Seen::Fine) {
                    Seen::Lost { in_sync } => {
                        let first = *since.entry(key).or_insert_with(|| {
                            warn!(volume_id = %v.id, replica = %r.id, node = %r.node, replace_after = ?wait,
                                  "replica lost");
                            now
                        });
                        if wait.is_some_and(|w| now.duration_since(first) >= w) {
                            due.push((r.clone(), in_sync));
                        }
                    }
                    Seen::Fine | Seen::Rebuilding => {
                        if since.remove(&key).is_some() {
                            info!(volume_id = %v.id, replica = %r.id, node = %r.node, "replica back");
                        }
                    }
                }
            }
        }
        for (r, in_sync) in due {
            let others_in_sync =
                v.replicas.iter().filter(|o| o.id != r.id && seen.get(&o.id) == Some(&Seen::Fine)).count();
            if in_sync && others_in_sync == 0 {
                warn!(volume_id = %v.id, replica = %r.id, node = %r.node,
                      "the only in-sync copy is on a lost node: waiting for the node, not replacing it");
                continue;
            }
            self.replace(v, &r).await?;
        }
        Ok(())
    }

    /// Each replica's state for replenishment. An engine that does not answer says nothing this
    /// pass (it may be restarting): an error, and nothing changes.
    async fn seen(&self, v: &VolumeRecord) -> Result<HashMap<String, Seen>> {
        let mut out = HashMap::new();
        if v.attachment.is_some() {
            let st = self.engine_status(v).await?;
            // One rebuild runs at a time: while one does, the other ejected replicas wait their
            // turn, which is no loss (a lost node still counts, below).
            let rebuilding = st.rebuild.is_some();
            for r in &st.replicas {
                let s = match r.state.as_str() {
                    "healthy" => Seen::Fine,
                    _ if rebuilding || r.state == "rebuilding" => Seen::Rebuilding,
                    _ => Seen::Lost { in_sync: false },
                };
                out.insert(r.id.clone(), s);
            }
        } else if let Some(m) = self.membership(&v.id).await? {
            // Detached: an out-of-sync replica is rebuilt at the next publish; only a lost node
            // loses a replica.
            for r in &m.membership.replicas {
                out.insert(
                    r.id.clone(),
                    if r.state == ReplicaState::Healthy { Seen::Fine } else { Seen::Rebuilding },
                );
            }
        }
        for r in &v.replicas {
            if self.orch.node_lost(&r.node) {
                let in_sync = out.get(&r.id) == Some(&Seen::Fine);
                out.insert(r.id.clone(), Seen::Lost { in_sync });
            }
        }
        Ok(out)
    }

    /// Replaces lost replica `r` of `v`: a new replica first (rebuilt fully by the engine), then
    /// the lost one leaves the membership and the record.
    async fn replace(&self, v: &mut VolumeRecord, r: &ReplicaPlacement) -> Result<()> {
        let lost_for = self.lost_for(&v.id, &r.id).unwrap_or_default();
        let before: Vec<String> = v.replicas.iter().map(|x| x.id.clone()).collect();
        self.add_replicas(v, 1).await.map_err(|e| match e {
            ControllerError::ResourceExhausted(m) => ControllerError::ResourceExhausted(format!(
                "no node can take a replacement for replica {}: {m}",
                r.id
            )),
            e => e,
        })?;
        let added = v.replicas.iter().find(|x| !before.contains(&x.id)).cloned();
        self.remove_member(v, &r.id).await?;
        let node_lost = self.orch.node_lost(&r.node);
        if node_lost {
            // Stopped and wiped when the node is back.
            v.lost_replicas.push(r.clone());
        }
        v.replicas.retain(|x| x.id != r.id);
        v.replicas_replenished += 1;
        self.replenish_counters.replaced.fetch_add(1, Ordering::Relaxed);
        self.put_volume(v).await?;
        self.lost_since.lock().remove(&(v.id.clone(), r.id.clone()));
        if !node_lost {
            self.orch.remove_replica(&v.id, r).await?;
        }
        info!(volume_id = %v.id, lost = %r.id, lost_node = %r.node, lost_for = ?lost_for,
              replacement = ?added.as_ref().map(|a| &a.id), node = ?added.as_ref().map(|a| &a.node),
              "replica replenished: the replacement is rebuilt from the in-sync replicas");
        Ok(())
    }

    /// Wipes replicas replaced while their node was away, once it is back.
    async fn wipe_returned(&self, v: &mut VolumeRecord) -> Result<()> {
        let back: Vec<ReplicaPlacement> =
            v.lost_replicas.iter().filter(|r| !self.orch.node_lost(&r.node)).cloned().collect();
        for r in back {
            self.orch.remove_replica(&v.id, &r).await?;
            v.lost_replicas.retain(|x| x.id != r.id);
            self.put_volume(v).await?;
            info!(volume_id = %v.id, replica = %r.id, node = %r.node,
                  "the node of a replaced replica is back: its data was wiped");
        }
        Ok(())
    }
}
