//! Volume and snapshot records behind the [`Store`] trait, and its embedded RocksDB backend.
//!
//! Records are JSON values keyed by id, with a name index, written atomically (a write batch,
//! synced) so a controller killed at any instant finds each record whole or absent.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ControllerError, Result};
use crate::params::VolumeParams;

/// Where one replica of a volume lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ReplicaPlacement {
    /// Unique within the volume (`r0`, `r1`, …); the membership record uses the same id.
    pub id: String,
    pub node: String,
    /// Where an orchestrator with host ports serves it: the data protocol on this port of the
    /// node, the management API on the next (see [`crate::orchestrator::Orchestrator::ports`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// What a volume was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum VolumeSource {
    Snapshot(String),
    Volume(String),
}

/// The schema of an optional [`VolumeSource`] as one object (`{kind, id}`): a Kubernetes
/// structural schema cannot express the enum's alternatives.
fn source_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "nullable": true,
        "required": ["kind", "id"],
        "properties": {
            "kind": {"type": "string", "enum": ["snapshot", "volume"]},
            "id": {"type": "string"}
        }
    })
}

/// A publication of the volume on a node: its engine runs there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Attachment {
    pub node: String,
    /// Issued anew by every publish (DESIGN rule 10): a node's device reconnects only to an
    /// engine of its generation.
    pub generation: u64,
    pub readonly: bool,
    /// Whether the capability was Block (else Mount).
    pub block: bool,
    /// The CSI access mode number.
    pub access_mode: i32,
    /// Where an orchestrator with host ports serves the engine: the management API on this port
    /// of the node, metrics on the next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// A volume's life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    /// Being created: a repeated CreateVolume finishes it.
    Creating,
    Ready,
    /// Deleted by the user, kept (hidden) until its last snapshot is deleted, since the snapshots'
    /// data lives in its replicas.
    Deleted,
}

/// A volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct VolumeRecord {
    pub id: String,
    /// The CSI name (the PV name in Kubernetes); unique among live volumes.
    pub name: String,
    pub size: u64,
    pub params: VolumeParams,
    pub replicas: Vec<ReplicaPlacement>,
    #[schemars(schema_with = "source_schema")]
    pub source: Option<VolumeSource>,
    pub attachment: Option<Attachment>,
    /// The last attachment generation issued.
    pub generation: u64,
    pub state: VolumeState,
    pub created_unix: u64,
    /// Notes of the CLI or an operator (for example where the CLI mounted the volume).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Replica ids issued so far (`r0` … `r{n-1}`): a replica added later gets a new one, never
    /// the id of a removed replica whose process or pod may still be going.
    #[serde(default)]
    pub replica_ids_issued: usize,
    /// Replicas replaced while their node was away: their data is wiped when it comes back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lost_replicas: Vec<ReplicaPlacement>,
    /// Replicas replaced so far because they stayed lost (replenishment).
    #[serde(default)]
    pub replicas_replenished: u64,
}

/// A snapshot of a volume, held by the volume's replicas under the snapshot's id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SnapshotRecord {
    pub id: String,
    pub name: String,
    pub volume_id: String,
    pub size: u64,
    pub created_unix: u64,
    pub ready: bool,
    /// The group snapshot this snapshot belongs to (its members are taken together and deleted
    /// together); a group is the set of snapshot records naming it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<SnapshotGroup>,
}

/// A group snapshot, as its member snapshots record it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SnapshotGroup {
    pub id: String,
    /// The CSI name (CreateVolumeGroupSnapshot's idempotency key).
    pub name: String,
}

/// Durable storage of volume and snapshot records. Calls block (run them off the async threads).
pub trait Store: Send + Sync + 'static {
    /// Fails when the store cannot be used (for Probe).
    fn check(&self) -> Result<()>;
    fn volume(&self, id: &str) -> Result<Option<VolumeRecord>>;
    /// The live (not deleted) volume holding `name`.
    fn volume_by_name(&self, name: &str) -> Result<Option<VolumeRecord>>;
    fn put_volume(&self, v: &VolumeRecord) -> Result<()>;
    fn delete_volume(&self, id: &str) -> Result<()>;
    /// Every volume record, deleted ones included, ordered by id.
    fn volumes(&self) -> Result<Vec<VolumeRecord>>;
    fn snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>>;
    fn snapshot_by_name(&self, name: &str) -> Result<Option<SnapshotRecord>>;
    fn put_snapshot(&self, s: &SnapshotRecord) -> Result<()>;
    fn delete_snapshot(&self, id: &str) -> Result<()>;
    /// Every snapshot record, ordered by id.
    fn snapshots(&self) -> Result<Vec<SnapshotRecord>>;
}

/// The embedded store: one RocksDB database.
pub struct RocksStore {
    db: rocksdb::DB,
}

impl std::fmt::Debug for RocksStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksStore").field("path", &self.db.path()).finish()
    }
}

const VOLUME: &str = "v/";
const VOLUME_NAME: &str = "vn/";
const SNAPSHOT: &str = "s/";
const SNAPSHOT_NAME: &str = "sn/";

fn store_err(e: impl std::fmt::Display) -> ControllerError {
    ControllerError::Store(e.to_string())
}

impl RocksStore {
    /// Opens (creating if needed) the database in `dir`.
    pub fn open(dir: &Path) -> Result<RocksStore> {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        // Records are small and few: keep the memory of an idle controller small.
        opts.set_write_buffer_size(4 << 20);
        opts.set_max_write_buffer_number(2);
        opts.set_keep_log_file_num(2);
        let db = rocksdb::DB::open(&opts, dir)
            .map_err(|e| store_err(format!("opening {}: {e}", dir.display())))?;
        Ok(RocksStore { db })
    }

    fn get<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.db.get(key.as_bytes()).map_err(store_err)? {
            Some(v) => {
                serde_json::from_slice(&v).map(Some).map_err(|e| store_err(format!("record {key}: {e}")))
            }
            None => Ok(None),
        }
    }

    fn get_string(&self, key: &str) -> Result<Option<String>> {
        Ok(self.db.get(key.as_bytes()).map_err(store_err)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    fn write(&self, batch: rocksdb::WriteBatch) -> Result<()> {
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo).map_err(store_err)
    }

    fn scan<T: serde::de::DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>> {
        let mut out = Vec::new();
        let iter =
            self.db.iterator(rocksdb::IteratorMode::From(prefix.as_bytes(), rocksdb::Direction::Forward));
        for item in iter {
            let (k, v) = item.map_err(store_err)?;
            if !k.starts_with(prefix.as_bytes()) {
                break;
            }
            out.push(
                serde_json::from_slice(&v)
                    .map_err(|e| store_err(format!("record {}: {e}", String::from_utf8_lossy(&k))))?,
            );
        }
        Ok(out)
    }
}

impl Store for RocksStore {
    fn check(&self) -> Result<()> {
        self.db.get(b"probe").map(|_| ()).map_err(store_err)
    }

    fn volume(&self, id: &str) -> Result<Option<VolumeRecord>> {
        self.get(&format!("{VOLUME}{id}"))
    }

    fn volume_by_name(&self, name: &str) -> Result<Option<VolumeRecord>> {
        match self.get_string(&format!("{VOLUME_NAME}{name}"))? {
            Some(id) => Ok(self.volume(&id)?.filter(|v| v.name == name && v.state != VolumeState::Deleted)),
            None => Ok(None),
        }
    }

    fn put_volume(&self, v: &VolumeRecord) -> Result<()> {
        let mut batch = rocksdb::WriteBatch::default();
        batch.put(format!("{VOLUME}{}", v.id), serde_json::to_vec(v).map_err(store_err)?);
        let name_key = format!("{VOLUME_NAME}{}", v.name);
        if v.state == VolumeState::Deleted {
            // The name is free again once the volume is deleted, even while it is kept.
            if self.get_string(&name_key)?.as_deref() == Some(v.id.as_str()) {
                batch.delete(name_key);
            }
        } else {
            batch.put(name_key, v.id.as_bytes());
        }
        self.write(batch)
    }

    fn delete_volume(&self, id: &str) -> Result<()> {
        let mut batch = rocksdb::WriteBatch::default();
        if let Some(v) = self.volume(id)? {
            let name_key = format!("{VOLUME_NAME}{}", v.name);
            if self.get_string(&name_key)?.as_deref() == Some(id) {
                batch.delete(name_key);
            }
        }
        batch.delete(format!("{VOLUME}{id}"));
        self.write(batch)
    }

    fn volumes(&self) -> Result<Vec<VolumeRecord>> {
        self.scan(VOLUME)
    }

    fn snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>> {
        self.get(&format!("{SNAPSHOT}{id}"))
    }

    fn snapshot_by_name(&self, name: &str) -> Result<Option<SnapshotRecord>> {
        match self.get_string(&format!("{SNAPSHOT_NAME}{name}"))? {
            Some(id) => Ok(self.snapshot(&id)?.filter(|s| s.name == name)),
            None => Ok(None),
        }
    }

    fn put_snapshot(&self, s: &SnapshotRecord) -> Result<()> {
        let mut batch = rocksdb::WriteBatch::default();
        batch.put(format!("{SNAPSHOT}{}", s.id), serde_json::to_vec(s).map_err(store_err)?);
        batch.put(format!("{SNAPSHOT_NAME}{}", s.name), s.id.as_bytes());
        self.write(batch)
    }

    fn delete_snapshot(&self, id: &str) -> Result<()> {
        let mut batch = rocksdb::WriteBatch::default();
        if let Some(s) = self.snapshot(id)? {
            batch.delete(format!("{SNAPSHOT_NAME}{}", s.name));
        }
        batch.delete(format!("{SNAPSHOT}{id}"));
        self.write(batch)
    }

    fn snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        self.scan(SNAPSHOT)
    }
}

/// Provisioned bytes per node, from the live and kept volume records (kept ones still hold data).
pub fn provisioned_by_node(volumes: &[VolumeRecord]) -> BTreeMap<String, (u64, u64)> {
    let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for v in volumes {
        for r in &v.replicas {
            let e = out.entry(r.node.clone()).or_default();
            if v.params.thin {
                e.0 += v.size;
            } else {
                e.1 += v.size;
            }
        }
    }
    out
}

/// CPU and memory the records' replica and engine pods request on each node, each replica pod
/// asking `replica` and each engine `engine`; the volume `except` is left out (its own pods are
/// being placed).
pub fn compute_by_node(
    volumes: &[VolumeRecord],
    replica: crate::placement::Compute,
    engine: crate::placement::Compute,
    except: Option<&str>,
) -> crate::placement::UsedCompute {
    let mut out = crate::placement::UsedCompute::new();
    for v in volumes.iter().filter(|v| Some(v.id.as_str()) != except) {
        for r in &v.replicas {
            out.entry(r.node.clone()).or_default().add(&replica);
        }
        if let Some(a) = &v.attachment {
            out.entry(a.node.clone()).or_default().add(&engine);
        }
    }
    out
}

/// Host ports held on `node` by replicas and engines (the first of each pair).
pub fn ports_on_node(volumes: &[VolumeRecord], node: &str) -> std::collections::BTreeSet<u16> {
    let mut out = std::collections::BTreeSet::new();
    for v in volumes {
        out.extend(v.replicas.iter().filter(|r| r.node == node).filter_map(|r| r.port));
        out.extend(v.attachment.iter().filter(|a| a.node == node).filter_map(|a| a.port));
    }
    out
}

/// The first free pair of consecutive ports in `range` (pairs start at its first port).
pub fn free_port_pair(
    range: &std::ops::RangeInclusive<u16>,
    taken: &std::collections::BTreeSet<u16>,
) -> Option<u16> {
    (*range.start()..*range.end()).step_by(2).find(|p| !taken.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(id: &str, name: &str) -> VolumeRecord {
        VolumeRecord {
            id: id.into(),
            name: name.into(),
            size: 1 << 30,
            params: VolumeParams::default(),
            replicas: vec![ReplicaPlacement { id: "r0".into(), node: "n1".into(), port: None }],
            source: None,
            attachment: None,
            generation: 0,
            state: VolumeState::Ready,
            created_unix: 1,
            annotations: BTreeMap::new(),
            replica_ids_issued: 0,
            lost_replicas: Vec::new(),
            replicas_replenished: 0,
        }
    }

    #[test]
    fn records_survive_reopen_and_names_index_live_volumes() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        {
            let s = RocksStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
            s.put_volume(&vol("vol-b", "pvc-b")).unwrap_or_else(|e| panic!("{e}"));
            s.put_volume(&vol("vol-a", "pvc-a")).unwrap_or_else(|e| panic!("{e}"));
            let snap = SnapshotRecord {
                id: "snap-1".into(),
                name: "s1".into(),
                volume_id: "vol-a".into(),
                size: 1,
                created_unix: 2,
                ready: true,
                group: Some(SnapshotGroup { id: "group-1".into(), name: "g".into() }),
            };
            s.put_snapshot(&snap).unwrap_or_else(|e| panic!("{e}"));
        }
        let s = RocksStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let ids: Vec<String> = s.volumes().unwrap_or_default().into_iter().map(|v| v.id).collect();
        assert_eq!(ids, ["vol-a", "vol-b"]);
        assert_eq!(s.volume_by_name("pvc-b").ok().flatten().map(|v| v.id).as_deref(), Some("vol-b"));
        assert_eq!(s.snapshot_by_name("s1").ok().flatten().map(|v| v.volume_id).as_deref(), Some("vol-a"));

        let mut a = vol("vol-a", "pvc-a");
        a.state = VolumeState::Deleted;
        s.put_volume(&a).unwrap_or_else(|e| panic!("{e}"));
        assert!(s.volume_by_name("pvc-a").ok().flatten().is_none(), "a deleted volume frees its name");
        assert!(s.volume("vol-a").ok().flatten().is_some(), "but its record is kept");
        s.delete_volume("vol-a").unwrap_or_else(|e| panic!("{e}"));
        s.delete_snapshot("snap-1").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.volumes().unwrap_or_default().len(), 1);
        assert!(s.snapshots().unwrap_or_default().is_empty());
        assert!(s.snapshot_by_name("s1").ok().flatten().is_none());
    }

    #[test]
    fn port_pairs_are_never_shared_on_a_node() {
        let mut a = vol("v1", "a");
        a.replicas[0].port = Some(20000);
        let mut b = vol("v2", "b");
        b.replicas[0].port = Some(20002);
        b.attachment = Some(Attachment {
            node: "n1".into(),
            generation: 1,
            readonly: false,
            block: false,
            access_mode: 1,
            port: Some(20006),
        });
        let taken = ports_on_node(&[a.clone(), b], "n1");
        assert_eq!(taken.iter().copied().collect::<Vec<_>>(), vec![20000, 20002, 20006]);
        assert_eq!(free_port_pair(&(20000..=20009), &taken), Some(20004));
        assert!(ports_on_node(&[a], "n2").is_empty());
        let full: std::collections::BTreeSet<u16> = [20000, 20002].into();
        assert_eq!(free_port_pair(&(20000..=20003), &full), None);
        assert_eq!(free_port_pair(&(20000..=20004), &full), None, "a lone last port is no pair");
    }
}
