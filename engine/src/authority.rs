//! The membership authority (DESIGN rule 1): a volume's epoch and replica set are one record,
//! changed only by compare-and-set. In a cluster the controller's store implements it; a
//! standalone engine uses [`FileAuthority`].
//!
//! Why a file and not a local RocksDB: RocksDB allows one process per database, so a second engine
//! on the same volume could not even reach the record to lose a CAS against the first — the very
//! contest the authority must decide. A JSON file under an exclusive `flock`, replaced by a synced
//! rename, gives every process on the node the same compare-and-set.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A replica's place in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ReplicaState {
    /// In sync, and written by every write.
    Healthy,
    /// Out of the configuration since `epoch`; rejoins only through a rebuild (rule 7).
    Ejected { epoch: u64 },
}

/// One replica in the membership record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub id: String,
    pub addr: String,
    #[serde(flatten)]
    pub state: ReplicaState,
    /// The identity of the replica's store once the engine saw it; a replica answering with
    /// another identity has another history and rejoins only by a full rebuild.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_id: Option<Uuid>,
    /// The epoch from which this replica's written stamps are complete (0 for an original member,
    /// the join epoch after a full rebuild): it can serve as the source of a delta rebuild for a
    /// replica ejected at or after that epoch.
    #[serde(default)]
    pub tracked_since: u64,
    /// For an ejected replica: intent regions ([`barnacle_replica::store::INTENT_REGION`] bytes)
    /// of the writes in flight when it was ejected, which it may have missed in the epoch before
    /// its ejection. Later writes are found by the survivors' written stamps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missed_regions: Vec<u64>,
}

/// The rebuild copy rate an engine uses when nothing sets one, in MiB/s.
pub const DEFAULT_REBUILD_MIB_PER_SEC: u64 = 200;

/// The volume's settings that may change while it serves (ControllerModifyVolume). They live in
/// the membership record, so an engine that restarts, or a successor on another node, applies
/// what was last committed rather than what its command line said when its pod was made.
/// Also the custom resource's status schema ([`crate::k8s::MembershipStatus`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct VolumeSettings {
    /// Writes need at least this many healthy replicas; below it they fail (nothing is acked).
    pub min_healthy: u32,
    /// Rebuild copy rate limit in MiB/s (0: unlimited).
    pub rebuild_mib_per_sec: u64,
    /// Reads and writes per second through the export (0: no limit).
    #[serde(default)]
    pub max_iops: u64,
    /// MiB per second read and written through the export (0: no limit).
    #[serde(default)]
    pub max_mib_per_sec: u64,
}

impl Default for VolumeSettings {
    fn default() -> Self {
        VolumeSettings {
            min_healthy: 1,
            rebuild_mib_per_sec: DEFAULT_REBUILD_MIB_PER_SEC,
            max_iops: 0,
            max_mib_per_sec: 0,
        }
    }
}

/// The volume's membership: its epoch, the engine holding it, and the replica set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub epoch: u64,
    pub engine_id: Option<Uuid>,
    pub replicas: Vec<ReplicaRecord>,
    /// The settings committed with the record; `None` (a record of an older controller, or a
    /// standalone engine's): the engine's command line decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<VolumeSettings>,
}

impl ReplicaRecord {
    /// A replica added to the configuration at `epoch`: out of sync until a full rebuild makes
    /// it a copy (rule 7), from which its written stamps are complete.
    pub fn joining(id: &str, addr: &str, epoch: u64) -> ReplicaRecord {
        ReplicaRecord {
            id: id.to_owned(),
            addr: addr.to_owned(),
            state: ReplicaState::Ejected { epoch },
            store_id: None,
            tracked_since: epoch,
            missed_regions: Vec::new(),
        }
    }
}

impl Membership {
    pub fn healthy(&self) -> impl Iterator<Item = &ReplicaRecord> {
        self.replicas.iter().filter(|r| r.state == ReplicaState::Healthy)
    }

    pub fn replica(&self, id: &str) -> Option<&ReplicaRecord> {
        self.replicas.iter().find(|r| r.id == id)
    }
}

/// A membership record and the version the authority gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versioned {
    pub version: u64,
    pub membership: Membership,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    /// Someone else changed the record since it was read.
    #[error("membership changed concurrently (expected version {expected:?}, found {found:?})")]
    Conflict { expected: Option<u64>, found: Option<u64> },
    #[error("membership authority unavailable: {0}")]
    Unavailable(String),
}

/// Compare-and-set storage of one volume's membership.
pub trait MembershipAuthority: Send + Sync + 'static {
    /// The current record, if any.
    fn load(&self) -> Result<Option<Versioned>, AuthorityError>;
    /// Replaces the record if its version is still `expected` (`None`: no record yet); returns
    /// the new version.
    fn compare_and_set(&self, expected: Option<u64>, new: &Membership) -> Result<u64, AuthorityError>;
}

/// The standalone authority: `<dir>/membership.json`, guarded by `flock` on `<dir>/membership.lock`.
#[derive(Debug, Clone)]
pub struct FileAuthority {
    dir: PathBuf,
}

fn unavailable(e: impl std::fmt::Display) -> AuthorityError {
    AuthorityError::Unavailable(e.to_string())
}

struct Flock(File);

impl Flock {
    /// Takes the lock, waiting at most 10 s: a holder that hangs must make IO fail, not hang.
    fn exclusive(path: &Path) -> std::io::Result<Flock> {
        let f = OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            // SAFETY: flock on a file descriptor we own; no memory is passed.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Flock(f));
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) || std::time::Instant::now() > deadline {
                return Err(e);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

impl Drop for Flock {
    fn drop(&mut self) {
        // SAFETY: as above; unlocking a lock we hold.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

impl FileAuthority {
    pub fn new(dir: &Path) -> Result<FileAuthority, AuthorityError> {
        std::fs::create_dir_all(dir).map_err(unavailable)?;
        Ok(FileAuthority { dir: dir.to_owned() })
    }

    fn read(&self) -> Result<Option<Versioned>, AuthorityError> {
        let mut f = match File::open(self.dir.join("membership.json")) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(unavailable(e)),
        };
        let mut s = String::new();
        f.read_to_string(&mut s).map_err(unavailable)?;
        serde_json::from_str(&s).map(Some).map_err(unavailable)
    }
}

impl MembershipAuthority for FileAuthority {
    fn load(&self) -> Result<Option<Versioned>, AuthorityError> {
        let _lock = Flock::exclusive(&self.dir.join("membership.lock")).map_err(unavailable)?;
        self.read()
    }

    fn compare_and_set(&self, expected: Option<u64>, new: &Membership) -> Result<u64, AuthorityError> {
        let _lock = Flock::exclusive(&self.dir.join("membership.lock")).map_err(unavailable)?;
        let found = self.read()?.map(|v| v.version);
        if found != expected {
            return Err(AuthorityError::Conflict { expected, found });
        }
        let version = found.map_or(1, |v| v + 1);
        let body = serde_json::to_vec_pretty(&Versioned { version, membership: new.clone() })
            .map_err(unavailable)?;
        let tmp = self.dir.join("membership.json.tmp");
        let mut f = File::create(&tmp).map_err(unavailable)?;
        f.write_all(&body).map_err(unavailable)?;
        f.sync_all().map_err(unavailable)?;
        std::fs::rename(&tmp, self.dir.join("membership.json")).map_err(unavailable)?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(unavailable)?;
        Ok(version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(epoch: u64) -> Membership {
        Membership {
            epoch,
            engine_id: None,
            replicas: vec![ReplicaRecord {
                id: "r0".into(),
                addr: "127.0.0.1:1".into(),
                state: ReplicaState::Healthy,
                store_id: None,
                tracked_since: 0,
                missed_regions: Vec::new(),
            }],
            settings: None,
        }
    }

    #[test]
    fn compare_and_set_admits_one_writer_per_version() {
        let dir = tempfile::tempdir().unwrap();
        let a = FileAuthority::new(dir.path()).unwrap();
        let b = FileAuthority::new(dir.path()).unwrap();
        assert_eq!(a.load().unwrap(), None);
        assert_eq!(a.compare_and_set(None, &m(1)).unwrap(), 1);
        assert!(matches!(b.compare_and_set(None, &m(1)), Err(AuthorityError::Conflict { .. })));
        assert_eq!(b.compare_and_set(Some(1), &m(2)).unwrap(), 2);
        assert!(matches!(
            a.compare_and_set(Some(1), &m(3)),
            Err(AuthorityError::Conflict { found: Some(2), .. })
        ));
        assert_eq!(a.load().unwrap().unwrap().membership.epoch, 2);
    }

    #[test]
    fn concurrent_writers_never_both_win() {
        let dir = tempfile::tempdir().unwrap();
        FileAuthority::new(dir.path()).unwrap().compare_and_set(None, &m(0)).unwrap();
        let wins: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|i| {
                    let d = dir.path().to_owned();
                    s.spawn(move || {
                        usize::from(FileAuthority::new(&d).unwrap().compare_and_set(Some(1), &m(i)).is_ok())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(wins, 1);
    }
}
