//! Errors of the replica store and its servers.

use std::io;
use std::path::PathBuf;

/// Everything a store operation can fail with. Each variant carries the values involved so the
/// message alone tells what was refused.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} failed: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("metadata store: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("no replica store at {0}")]
    NotFound(PathBuf),
    #[error("a replica store already exists at {0}")]
    AlreadyExists(PathBuf),
    #[error("store at {path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("range {offset}+{len} is outside the volume (size {size})")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("range {offset}+{len} is not aligned to {align} bytes")]
    Unaligned { offset: u64, len: u64, align: u64 },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("snapshot {0:?} not found")]
    SnapshotNotFound(String),
    #[error("snapshot {0:?} already exists")]
    SnapshotExists(String),
    #[error("snapshot {0:?} is in use by a clone; try again when it finished")]
    SnapshotBusy(String),
    #[error("too many snapshots (limit {0})")]
    TooManySnapshots(usize),
    #[error("cannot shrink from {size} to {requested} bytes")]
    Shrink { size: u64, requested: u64 },
    #[error("epoch {epoch} is older than the replica's epoch {current}")]
    StaleEpoch { epoch: u64, current: u64 },
    #[error("epoch {epoch} is already held by engine {holder}")]
    EpochConflict { epoch: u64, holder: uuid::Uuid },
    #[error("the block at {offset} does not match its checksum: this copy is damaged")]
    Checksum { offset: u64 },
    #[error("store failed earlier and refuses IO until reopened: {0}")]
    Failed(String),
}

impl StoreError {
    pub(crate) fn io(op: &'static str) -> impl FnOnce(io::Error) -> StoreError {
        move |source| StoreError::Io { op, source }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
