//! Volume group snapshots (the CSI GroupController): snapshots of several volumes that are
//! crash-consistent together — their contents are a state all the volumes were in at one instant.
//!
//! How: every published member's engine holds its IO ([`GROUP_HOLD_LEASE`] at most): it waits
//! for the IO in flight to complete (acknowledged or not) and makes new IO wait. Once every member
//! is held, no member changes, so the members' states at that moment are one instant's; each
//! member's snapshot is then taken under its hold, and the holds are released. A member that is
//! not published has no writer and snapshots on its replicas directly. A hold the controller
//! never releases (it died) lapses at its lease, so a volume's IO waits
//! [`GROUP_HOLD_LEASE`] at most; a hold that lapses before its snapshot was taken fails the group.
//!
//! The group is the set of snapshot records naming it ([`SnapshotGroup`]): ordinary snapshots,
//! usable as volume sources, that go only with their group. Records are written not-ready first,
//! so a repeated create after a crash finds them and starts over.

use std::collections::BTreeSet;
use std::time::Duration;

use barnacle_engine::mgmt::pb as epb;
use futures::future::join_all;
use tracing::{info, warn};

use super::{Service, new_id, now_unix, vkey};
use crate::error::{ControllerError, Result};
use crate::rpc;
use crate::store::{SnapshotGroup, SnapshotRecord, VolumeRecord};

/// Most volumes in one group snapshot.
pub const MAX_GROUP_MEMBERS: usize = 16;
/// How long a member's IO may be held while the group's snapshots are taken.
pub const GROUP_HOLD_LEASE: Duration = Duration::from_secs(10);

impl Service {
    /// CreateVolumeGroupSnapshot: idempotent by name. Returns the group id and its snapshots.
    pub async fn create_group_snapshot(
        &self,
        name: &str,
        volume_ids: &[String],
    ) -> Result<(String, Vec<SnapshotRecord>)> {
        self.ready()?;
        let wanted: BTreeSet<&String> = volume_ids.iter().collect();
        if wanted.len() != volume_ids.len() {
            return Err(ControllerError::InvalidArgument("source_volume_ids names a volume twice".into()));
        }
        if wanted.len() > MAX_GROUP_MEMBERS {
            return Err(ControllerError::InvalidArgument(format!(
                "a group snapshot holds at most {MAX_GROUP_MEMBERS} volumes, not {}",
                wanted.len()
            )));
        }
        let mut keys = vec![format!("group-name/{name}")];
        keys.extend(volume_ids.iter().map(|v| vkey(v)));
        let _g = self.guards.lock(&keys)?;
        let mut volumes = Vec::with_capacity(volume_ids.len());
        for id in volume_ids {
            volumes.push(self.live_volume(id).await?);
        }
        let existing = self.group_members_named(name).await?;
        if !existing.is_empty() {
            let had: BTreeSet<&String> = existing.iter().map(|s| &s.volume_id).collect();
            if had != wanted {
                return Err(ControllerError::AlreadyExists(format!(
                    "group snapshot {name} exists for other volumes"
                )));
            }
            if existing.iter().all(|s| s.ready) {
                let id = existing[0].group.as_ref().map(|g| g.id.clone()).unwrap_or_default();
                return Ok((id, existing));
            }
            // Interrupted: its snapshots were never handed out. Start over.
            info!(group = name, "finishing an interrupted group snapshot: starting over");
            self.remove_group_members(&existing).await?;
        }
        let group = SnapshotGroup { id: new_id("group"), name: name.to_owned() };
        let created_unix = now_unix();
        let records: Vec<SnapshotRecord> = volumes
            .iter()
            .map(|v| SnapshotRecord {
                id: new_id("snap"),
                name: format!("{name}/{}", v.id),
                volume_id: v.id.clone(),
                size: v.size,
                created_unix,
                ready: false,
                group: Some(group.clone()),
            })
            .collect();
        for s in &records {
            let s = s.clone();
            self.db(move |st| st.put_snapshot(&s)).await?;
        }
        if let Err(e) = self.take_group(&group, &volumes, &records).await {
            warn!(group = %group.id, name, error = %e, "group snapshot failed; removing its snapshots");
            if let Err(e2) = self.remove_group_members(&records).await {
                warn!(group = %group.id, error = %e2, "a failed group snapshot's snapshots were not all removed");
            }
            return Err(e);
        }
        let mut done = Vec::with_capacity(records.len());
        for mut s in records {
            s.ready = true;
            let s2 = s.clone();
            self.db(move |st| st.put_snapshot(&s2)).await?;
            done.push(s);
        }
        info!(group = %group.id, name, volumes = ?volume_ids, "group snapshot created");
        Ok((group.id, done))
    }

    /// Holds every published member's IO, snapshots every member, releases the holds.
    async fn take_group(
        &self,
        group: &SnapshotGroup,
        volumes: &[VolumeRecord],
        records: &[SnapshotRecord],
    ) -> Result<()> {
        // One client per published member, for its hold, snapshot and release.
        let mut engines = Vec::new();
        for v in volumes.iter().filter(|v| v.attachment.is_some()) {
            engines.push((v.id.clone(), self.engine_client(v).await?));
        }
        let hold = epb::HoldIoRequest {
            hold_id: group.id.clone(),
            lease_ms: u32::try_from(GROUP_HOLD_LEASE.as_millis()).unwrap_or(u32::MAX),
        };
        let held = join_all(engines.iter_mut().map(|(vid, c)| {
            let h = hold.clone();
            async move { c.hold_io(rpc::req(h)).await.map_err(|s| rpc::call_err(vid, "hold IO", &s)) }
        }))
        .await;
        let result = match held.into_iter().find_map(std::result::Result::err) {
            Some(e) => Err(e),
            None => {
                info!(group = %group.id, held = engines.len(), "IO held on every published member");
                let engines = &engines;
                let taken = join_all(volumes.iter().zip(records).map(|(v, s)| async move {
                    if let Some((_, c)) = engines.iter().find(|(id, _)| *id == v.id) {
                        let mut c = c.clone();
                        let req = epb::SnapshotRequest { name: s.id.clone(), hold_id: group.id.clone() };
                        c.create_snapshot(rpc::req(req))
                            .await
                            .map(drop)
                            .map_err(|st| rpc::call_err(&v.id, "snapshot under the IO hold", &st))
                    } else {
                        self.snapshot_on_replicas_or_engine(v, &s.id).await
                    }
                }))
                .await;
                taken.into_iter().collect::<Result<Vec<()>>>().map(drop)
            }
        };
        let release = epb::HoldIoRequest { hold_id: group.id.clone(), lease_ms: 0 };
        let released = join_all(engines.iter_mut().map(|(vid, c)| {
            let r = release.clone();
            async move { (vid.clone(), c.release_io(rpc::req(r)).await) }
        }))
        .await;
        for (vid, r) in released {
            match r {
                Ok(r) if r.get_ref().released => {}
                // Lapsed: the snapshot under it was refused or completed before the lease ended.
                Ok(_) => {
                    warn!(volume_id = %vid, group = %group.id, "the IO hold had lapsed before its release")
                }
                Err(s) => {
                    warn!(volume_id = %vid, group = %group.id, error = %s, "releasing the IO hold failed; it lapses at its lease");
                }
            }
        }
        result
    }

    /// The snapshots of the group named `name`.
    async fn group_members_named(&self, name: &str) -> Result<Vec<SnapshotRecord>> {
        let name = name.to_owned();
        self.db(move |st| {
            Ok(st
                .snapshots()?
                .into_iter()
                .filter(|s| s.group.as_ref().is_some_and(|g| g.name == name))
                .collect())
        })
        .await
    }

    /// The snapshots of group `id` (none: no such group).
    pub async fn group_members(&self, id: &str) -> Result<Vec<SnapshotRecord>> {
        let id = id.to_owned();
        self.db(move |st| {
            Ok(st.snapshots()?.into_iter().filter(|s| s.group.as_ref().is_some_and(|g| g.id == id)).collect())
        })
        .await
    }

    /// Removes the member snapshots; the caller holds their volumes' keys (a create) or theirs.
    async fn remove_group_members(&self, members: &[SnapshotRecord]) -> Result<()> {
        for s in members {
            self.remove_snapshot(s.clone()).await?;
        }
        Ok(())
    }

    /// DeleteVolumeGroupSnapshot: deletes every member; OK when the group does not exist.
    /// `snapshot_ids`, when given, must be the group's (InvalidArgument otherwise).
    pub async fn delete_group_snapshot(&self, id: &str, snapshot_ids: &[String]) -> Result<()> {
        self.ready()?;
        let members = self.group_members(id).await?;
        if members.is_empty() {
            return Ok(());
        }
        check_members(id, &members, snapshot_ids)?;
        let mut keys = vec![format!("group/{id}")];
        keys.extend(members.iter().flat_map(super::snapshot_keys));
        let _g = self.guards.lock(&keys)?;
        self.remove_group_members(&members).await?;
        info!(group = id, "group snapshot deleted");
        Ok(())
    }

    /// GetVolumeGroupSnapshot: NotFound when the group does not exist.
    pub async fn get_group_snapshot(&self, id: &str, snapshot_ids: &[String]) -> Result<Vec<SnapshotRecord>> {
        let members = self.group_members(id).await?;
        if members.is_empty() {
            return Err(ControllerError::NotFound(format!("group snapshot {id} does not exist")));
        }
        check_members(id, &members, snapshot_ids)?;
        Ok(members)
    }
}

/// A request's `snapshot_ids` (when it lists any) must be exactly the group's.
fn check_members(id: &str, members: &[SnapshotRecord], snapshot_ids: &[String]) -> Result<()> {
    if snapshot_ids.is_empty() {
        return Ok(());
    }
    let have: BTreeSet<&String> = members.iter().map(|s| &s.id).collect();
    let asked: BTreeSet<&String> = snapshot_ids.iter().collect();
    if have != asked {
        return Err(ControllerError::InvalidArgument(format!(
            "snapshot_ids are not the snapshots of group snapshot {id}"
        )));
    }
    Ok(())
}
