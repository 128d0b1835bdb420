//! The RocksDB key space of one replica store and the records kept in it.
//!
//! Every key starts with a one-byte tag so one column family holds everything and a single write
//! batch can change any mix of records atomically:
//!
//! | key | value |
//! |---|---|
//! | `C` | [`Config`] (JSON): immutable identity and geometry, written once at create |
//! | `H` | [`Head`] (JSON): size and the head's generation |
//! | `E` | [`EpochRecord`] (JSON): the highest epoch accepted through a fence, and its engine |
//! | `s` generation(u64 BE) | [`SnapshotRecord`] (JSON) |
//! | `m` cluster(u64 BE) generation(u64 BE) | 8 bytes: physical cluster (u64 LE); empty: reads as zeros |
//! | `g` generation(u64 BE) cluster(u64 BE) | empty: index of the clusters a generation wrote |
//! | `d` region(u64 BE) | empty: write-intent mark (the region may differ between replicas) |
//! | `w` region(u64 BE) | epoch (u64 BE): the last epoch in which the region was written |
//! | `P` | clone in progress marker |
//!
//! Map keys sort by logical cluster, then generation, so "the entry a reader at generation `r` sees
//! for cluster `c`" is one `seek_for_prev(m c r)`, however many snapshots exist.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub(crate) const CONFIG: &[u8] = b"C";
pub(crate) const HEAD: &[u8] = b"H";
pub(crate) const EPOCH: &[u8] = b"E";
pub(crate) const SNAP_TAG: u8 = b's';
pub(crate) const MAP_TAG: u8 = b'm';
pub(crate) const GEN_TAG: u8 = b'g';
pub(crate) const INTENT_TAG: u8 = b'd';
pub(crate) const STAMP_TAG: u8 = b'w';

/// Layout version written into [`Config`]; an unknown version is refused at open.
pub(crate) const LAYOUT_VERSION: u32 = 1;

/// Identity and geometry of a store; never changes after create.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Config {
    pub layout_version: u32,
    pub volume_id: String,
    /// Identity of this copy of the data: a different store id means a different history.
    pub store_id: Uuid,
    pub cluster_size: u64,
    pub created_unix: u64,
    /// Raw partition holding the data; `None`: the `data` file in the store's directory.
    #[serde(default)]
    pub data_device: Option<std::path::PathBuf>,
    /// Block checksums kept in `sums` (stores from before checksums existed get them at open).
    #[serde(default = "checksums_on")]
    pub checksums: bool,
}

fn checksums_on() -> bool {
    true
}

/// The writable head: its size and the generation its writes are tagged with.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Head {
    pub size: u64,
    pub generation: u64,
}

/// The highest epoch this replica accepted through a fence, and the engine that holds it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub(crate) struct EpochRecord {
    pub epoch: u64,
    pub engine_id: Option<Uuid>,
}

/// One snapshot: the frozen generation `generation` of the head.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct SnapshotRecord {
    pub name: String,
    pub generation: u64,
    pub size: u64,
    pub created_unix: u64,
}

pub(crate) fn snap_key(generation: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = SNAP_TAG;
    k[1..].copy_from_slice(&generation.to_be_bytes());
    k
}

pub(crate) fn map_key(cluster: u64, generation: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = MAP_TAG;
    k[1..9].copy_from_slice(&cluster.to_be_bytes());
    k[9..].copy_from_slice(&generation.to_be_bytes());
    k
}

pub(crate) fn gen_key(generation: u64, cluster: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = GEN_TAG;
    k[1..9].copy_from_slice(&generation.to_be_bytes());
    k[9..].copy_from_slice(&cluster.to_be_bytes());
    k
}

/// Splits a generation-index key into (generation, cluster); `None` for any other key.
pub(crate) fn parse_gen_key(k: &[u8]) -> Option<(u64, u64)> {
    if k.len() != 17 || k[0] != GEN_TAG {
        return None;
    }
    Some((u64::from_be_bytes(k[1..9].try_into().ok()?), u64::from_be_bytes(k[9..].try_into().ok()?)))
}

/// Adds map entry (cluster, generation) and its index entry to a batch.
pub(crate) fn put_map(b: &mut rocksdb::WriteBatch, cluster: u64, generation: u64, m: Mapping) {
    b.put(map_key(cluster, generation), m.encode());
    b.put(gen_key(generation, cluster), []);
}

/// Removes map entry (cluster, generation) and its index entry in a batch.
pub(crate) fn delete_map(b: &mut rocksdb::WriteBatch, cluster: u64, generation: u64) {
    b.delete(map_key(cluster, generation));
    b.delete(gen_key(generation, cluster));
}

/// Splits a map key into (cluster, generation); `None` for any other key.
pub(crate) fn parse_map_key(k: &[u8]) -> Option<(u64, u64)> {
    if k.len() != 17 || k[0] != MAP_TAG {
        return None;
    }
    let c = u64::from_be_bytes(k[1..9].try_into().ok()?);
    let g = u64::from_be_bytes(k[9..].try_into().ok()?);
    Some((c, g))
}

/// What a map entry says about its cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mapping {
    /// Data lives in this physical cluster of the data file.
    Phys(u64),
    /// Reads as zeros (masks an older entry that a snapshot still sees).
    Zero,
}

impl Mapping {
    pub(crate) fn encode(self) -> Vec<u8> {
        match self {
            Mapping::Phys(p) => p.to_le_bytes().to_vec(),
            Mapping::Zero => Vec::new(),
        }
    }

    pub(crate) fn decode(v: &[u8]) -> Option<Mapping> {
        match v.len() {
            0 => Some(Mapping::Zero),
            8 => Some(Mapping::Phys(u64::from_le_bytes(v.try_into().ok()?))),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_keys_sort_by_cluster_then_generation() {
        let mut keys = [map_key(2, 1), map_key(1, 300), map_key(1, 2), map_key(256, 0)];
        keys.sort();
        let parsed: Vec<_> = keys.iter().map(|k| parse_map_key(k).unwrap()).collect();
        assert_eq!(parsed, vec![(1, 2), (1, 300), (2, 1), (256, 0)]);
    }

    #[test]
    fn mapping_round_trips_and_rejects_garbage() {
        for m in [Mapping::Zero, Mapping::Phys(0), Mapping::Phys(u64::MAX - 1)] {
            assert_eq!(Mapping::decode(&m.encode()), Some(m));
        }
        assert_eq!(Mapping::decode(&[1, 2, 3]), None);
        assert_eq!(parse_map_key(b"s12345678"), None);
    }
}
