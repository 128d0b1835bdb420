//! ControllerModifyVolume: a live volume's mutable parameters (replica count, minimum of healthy
//! replicas, rebuild rate, IO limits), applied without detaching it.
//!
//! The record is written as each step is reached, so a repeated call (the CO retries until it
//! succeeds) finishes what an interrupted one began. Membership changes of a published volume
//! go through its engine, which owns the record while it serves (a write beside it would depose
//! it); those of a detached volume are compare-and-set on the authority directly.
//!
//! - Added replicas are placed like CreateVolume's, recorded, started empty and committed as
//!   out of sync: the engine rebuilds them fully while the volume serves (DESIGN rule 7), or at
//!   its next start when the volume is detached. Modify returns once they are committed;
//!   `barnacle status` shows the rebuild.
//! - Removed replicas are those out of sync first, then healthy ones away from the engine's node,
//!   newest first; never below `minHealthyReplicas` healthy ones, never the last healthy copy.
//! - Settings are committed in the membership record, where a restarting engine finds them.
//!   Raising `minHealthyReplicas` above the replicas healthy now is FailedPrecondition: writes
//!   would fail until a rebuild completes, so the call is repeated once it has.

use std::collections::HashMap;

use barnacle_engine::authority::{Membership, ReplicaRecord, ReplicaState, VolumeSettings};
use barnacle_engine::mgmt::pb as epb;
use tracing::info;

use super::{Service, vkey};
use crate::error::{ControllerError, Result};
use crate::placement;
use crate::rpc;
use crate::store::{ReplicaPlacement, VolumeRecord};

/// Attempts of a compare-and-set on a detached volume's record that lost to another writer.
const CAS_ATTEMPTS: u32 = 5;

impl Service {
    /// ControllerModifyVolume: applies `mutable` to volume `id`; returns its record as changed.
    pub async fn modify_volume(&self, id: &str, mutable: &HashMap<String, String>) -> Result<VolumeRecord> {
        self.ready()?;
        let _g = self.guards.lock(&[vkey(id)])?;
        let mut v = self.live_volume(id).await?;
        let wanted = v.params.with_mutable(mutable)?;
        let current = self.applied_settings(&v).await?;
        let target = wanted.settings();
        // A lower minimum first, so removing replicas is not refused under the old one.
        if target.min_healthy < current.min_healthy {
            self.apply_settings(&v, VolumeSettings { min_healthy: target.min_healthy, ..current }).await?;
        }
        self.commit_recorded_replicas(&v).await?;
        let have = v.replicas.len();
        if wanted.replicas > have {
            self.add_replicas(&mut v, wanted.replicas - have).await?;
        } else if wanted.replicas < have {
            self.remove_some_replicas(&mut v, have - wanted.replicas, wanted.min_healthy_replicas).await?;
        }
        // The replica count is reached: record it before the settings, which may have to wait.
        if v.params.replicas != wanted.replicas {
            v.params.replicas = wanted.replicas;
            v.params.allow_fewer_replicas = wanted.allow_fewer_replicas;
            self.put_volume(&v).await?;
        }
        if target != current {
            self.apply_settings(&v, target).await?;
        }
        if v.params != wanted {
            v.params = wanted;
            self.put_volume(&v).await?;
        }
        info!(volume_id = %v.id, replicas = v.replicas.len(), settings = ?target, "volume modified");
        Ok(v)
    }

    /// The settings the volume's engine serves with (or its record holds, when detached).
    async fn applied_settings(&self, v: &VolumeRecord) -> Result<VolumeSettings> {
        if v.attachment.is_some() {
            let st = self.engine_status(v).await?;
            if let Some(s) = st.settings {
                return Ok(VolumeSettings {
                    min_healthy: s.min_healthy_replicas,
                    rebuild_mib_per_sec: s.rebuild_mib_per_sec,
                    max_iops: s.max_iops,
                    max_mib_per_sec: s.max_mib_per_sec,
                });
            }
        } else if let Some(m) = self.membership(&v.id).await?
            && let Some(s) = m.membership.settings
        {
            return Ok(s);
        }
        // Nothing committed yet (a volume of an older controller): what its engine was started with.
        Ok(v.params.settings())
    }

    /// Commits `settings` in the membership record (through the engine when published).
    async fn apply_settings(&self, v: &VolumeRecord, settings: VolumeSettings) -> Result<()> {
        if v.attachment.is_some() {
            let mut c = self.engine_client(v).await?;
            let s = epb::Settings {
                min_healthy_replicas: settings.min_healthy,
                rebuild_mib_per_sec: settings.rebuild_mib_per_sec,
                max_iops: settings.max_iops,
                max_mib_per_sec: settings.max_mib_per_sec,
            };
            return match c.configure(rpc::req(s)).await {
                Ok(_) => Ok(()),
                Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                    Err(ControllerError::FailedPrecondition(format!("volume {}: {}", v.id, s.message())))
                }
                Err(s) => Err(rpc::call_err(&v.id, "configure", &s)),
            };
        }
        let (volume, recorded_min) = (v.id.clone(), v.params.min_healthy_replicas);
        self.change_membership(v, move |m| {
            let healthy = m.healthy().count();
            let current = m.settings.map_or(recorded_min, |s| s.min_healthy as usize);
            let wanted = settings.min_healthy as usize;
            if wanted > healthy && wanted > current {
                return Err(ControllerError::FailedPrecondition(format!(
                    "volume {volume}: only {healthy} replicas are in sync; a minimum of {wanted} needs a \
                     rebuild first, which happens when the volume is published"
                )));
            }
            m.settings = Some(settings);
            Ok(())
        })
        .await
    }

    /// Changes a detached volume's membership record by compare-and-set, reading it again when
    /// another writer got there first.
    async fn change_membership(
        &self,
        v: &VolumeRecord,
        f: impl Fn(&mut Membership) -> Result<()> + Send + Sync + 'static,
    ) -> Result<()> {
        let authority = self
            .orch
            .authority(&v.id, false)?
            .ok_or_else(|| ControllerError::orchestrator(&v.id, "the volume has no membership record"))?;
        let id = v.id.clone();
        let f = std::sync::Arc::new(f);
        for _ in 0..CAS_ATTEMPTS {
            let (a, f, vid) = (authority.clone(), f.clone(), id.clone());
            // Some(()) when done, None when another writer won and the change is made again.
            let done = tokio::task::spawn_blocking(move || -> Result<Option<()>> {
                let err =
                    |e: barnacle_engine::authority::AuthorityError| ControllerError::orchestrator(&vid, e);
                let cur = a
                    .load()
                    .map_err(err)?
                    .ok_or_else(|| ControllerError::orchestrator(&vid, "the membership record is gone"))?;
                let mut m = cur.membership.clone();
                f(&mut m)?;
                if m == cur.membership {
                    return Ok(Some(()));
                }
                match a.compare_and_set(Some(cur.version), &m) {
                    Ok(_) => Ok(Some(())),
                    Err(barnacle_engine::authority::AuthorityError::Conflict { .. }) => Ok(None),
                    Err(e) => Err(err(e)),
                }
            })
            .await
            .map_err(|e| ControllerError::orchestrator(&id, e))??;
            if done.is_some() {
                return Ok(());
            }
        }
        Err(ControllerError::Aborted(format!("volume {id}: its membership record kept changing; retry")))
    }

    /// The membership's replicas, from the engine when published.
    async fn member_states(&self, v: &VolumeRecord) -> Result<HashMap<String, bool>> {
        if v.attachment.is_some() {
            let st = self.engine_status(v).await?;
            return Ok(st.replicas.into_iter().map(|r| (r.id, r.state == "healthy")).collect());
        }
        Ok(self
            .membership(&v.id)
            .await?
            .map(|m| {
                m.membership
                    .replicas
                    .iter()
                    .map(|r| (r.id.clone(), r.state == ReplicaState::Healthy))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Replicas in the record that the membership lacks (a modify interrupted between recording
    /// a placement and committing it): started and committed now.
    async fn commit_recorded_replicas(&self, v: &VolumeRecord) -> Result<()> {
        let members = self.member_states(v).await?;
        for r in v.replicas.iter().filter(|r| !members.contains_key(&r.id)) {
            self.start_and_commit(v, r).await?;
        }
        Ok(())
    }

    /// Starts a new, empty replica and commits it to the membership as out of sync.
    async fn start_and_commit(&self, v: &VolumeRecord, r: &ReplicaPlacement) -> Result<()> {
        let ep = self.orch.ensure_replica(v, r, Some(v.size)).await?;
        if v.attachment.is_some() {
            let mut c = self.engine_client(v).await?;
            c.add_replica(rpc::req(epb::AddReplicaRequest { id: r.id.clone(), address: ep.data.clone() }))
                .await
                .map_err(|s| rpc::call_err(&v.id, &format!("add replica {}", r.id), &s))?;
        } else {
            let (id, addr) = (r.id.clone(), ep.data.clone());
            self.change_membership(v, move |m| {
                if m.replica(&id).is_none() {
                    let epoch = m.epoch;
                    m.replicas.push(ReplicaRecord::joining(&id, &addr, epoch));
                }
                Ok(())
            })
            .await?;
        }
        info!(volume_id = %v.id, replica = %r.id, node = %r.node, attached = v.attachment.is_some(),
              "replica added; it joins by a full rebuild");
        Ok(())
    }

    /// Places `n` more replicas like CreateVolume's, records, starts and commits them.
    pub(super) async fn add_replicas(&self, v: &mut VolumeRecord, n: usize) -> Result<()> {
        let placing = self.placing.lock().await;
        let all = self.db(|s| s.volumes()).await?;
        let exclude: Vec<String> = v.replicas.iter().map(|r| r.node.clone()).collect();
        let nodes = self.place_more(
            &all,
            &placement::Request {
                size: v.size,
                replicas: n,
                allow_fewer: false,
                thin: v.params.thin,
                overcommit: self.cfg.overcommit,
                requisite: &[],
                preferred: &[],
                exclude: &exclude,
                pod: None,
                compute_used: &Default::default(),
            },
        )?;
        // Ids are never reused: a removed replica's process or pod may still be going.
        let members = self.member_states(v).await?;
        let mut next = v
            .replicas
            .iter()
            .map(|r| r.id.as_str())
            .chain(members.keys().map(String::as_str))
            .filter_map(|id| id.strip_prefix('r')?.parse::<usize>().ok())
            .max()
            .map_or(0, |m| m + 1)
            .max(v.replica_ids_issued);
        let mut added = Vec::new();
        for node in nodes {
            let port = self.assign_port(&all, &node).await?;
            let r = ReplicaPlacement { id: format!("r{next}"), node, port };
            next += 1;
            v.replica_ids_issued = next;
            v.replicas.push(r.clone());
            added.push(r);
        }
        // Recorded before anything is made, so nothing made is ever unowned.
        self.put_volume(v).await?;
        drop(placing);
        for r in &added {
            self.start_and_commit(v, r).await?;
        }
        Ok(())
    }

    /// Removes `n` replicas, keeping at least `min_healthy` healthy ones (and one in any case).
    async fn remove_some_replicas(&self, v: &mut VolumeRecord, n: usize, min_healthy: usize) -> Result<()> {
        let members = self.member_states(v).await?;
        let engine_node = v.attachment.as_ref().map(|a| a.node.clone());
        let mut order: Vec<&ReplicaPlacement> = v.replicas.iter().collect();
        // Out of sync first, then away from the engine's node, then the newest.
        order.sort_by_key(|r| {
            let healthy = members.get(&r.id).copied().unwrap_or(false);
            let local = engine_node.as_deref() == Some(r.node.as_str());
            let index = r.id.strip_prefix('r').and_then(|i| i.parse::<usize>().ok()).unwrap_or(0);
            (healthy, local, std::cmp::Reverse(index))
        });
        let victims: Vec<ReplicaPlacement> = order.into_iter().take(n).cloned().collect();
        let healthy_now = members.values().filter(|h| **h).count();
        let healthy_lost = victims.iter().filter(|r| members.get(&r.id).copied().unwrap_or(false)).count();
        let left = healthy_now - healthy_lost;
        if left < min_healthy.max(1) {
            return Err(ControllerError::FailedPrecondition(format!(
                "volume {}: removing {n} replicas would leave {left} in sync, and {} are required; \
                 wait for the rebuild in progress or lower minHealthyReplicas",
                v.id,
                min_healthy.max(1)
            )));
        }
        for r in &victims {
            self.remove_member(v, &r.id).await?;
            self.orch.remove_replica(&v.id, r).await?;
            v.replicas.retain(|x| x.id != r.id);
            self.put_volume(v).await?;
            info!(volume_id = %v.id, replica = %r.id, node = %r.node, "replica removed");
        }
        Ok(())
    }

    /// Takes a replica out of the membership (ejected, then forgotten).
    pub(super) async fn remove_member(&self, v: &VolumeRecord, replica: &str) -> Result<()> {
        if v.attachment.is_some() {
            let mut c = self.engine_client(v).await?;
            // A healthy member is ejected by the first call and forgotten by the second.
            for _ in 0..2 {
                let st = c
                    .status(rpc::req(epb::StatusRequest {}))
                    .await
                    .map_err(|s| rpc::call_err(&v.id, "status", &s))?;
                if !st.get_ref().replicas.iter().any(|r| r.id == replica) {
                    return Ok(());
                }
                c.remove_replica(rpc::req(epb::RemoveReplicaRequest { id: replica.to_owned() }))
                    .await
                    .map_err(|s| rpc::call_err(&v.id, &format!("remove replica {replica}"), &s))?;
            }
            return Ok(());
        }
        let (id, volume) = (replica.to_owned(), v.id.clone());
        self.change_membership(v, move |m| {
            let healthy_left = m.healthy().filter(|r| r.id != id).count();
            if m.replica(&id).is_some_and(|r| r.state == ReplicaState::Healthy) && healthy_left == 0 {
                return Err(ControllerError::FailedPrecondition(format!(
                    "volume {volume}: replica {id} is its last in-sync copy"
                )));
            }
            m.replicas.retain(|r| r.id != id);
            Ok(())
        })
        .await
    }
}
