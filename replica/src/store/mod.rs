//! The replica store: one volume's data on one node's disk.
//!
//! Layout (docs/replica.md has the reasoning): a sparse `data` file of fixed-size clusters and a
//! RocksDB `meta` directory holding the cluster map, the snapshots, the head and the epoch. Every
//! map entry is keyed by (logical cluster, generation). The head writes at generation `H`; taking
//! a snapshot freezes generation `H` under the snapshot's name and moves the head to `H + 1`, one
//! synced batch whatever the volume's size (O(1)). A reader at generation `r` (the head, or a
//! snapshot) sees for each cluster the entry with the highest generation `<= r`.
//!
//! An entry is *exclusive* to the head when no snapshot's generation lies in `[entry generation, H)`;
//! writes to an exclusive cluster go in place with no metadata write. Any other write allocates a
//! new cluster (copying the old one first for a partial write), makes the data durable, then maps
//! it (DESIGN rule 8). Deleting a snapshot removes every entry no remaining reader can see and frees
//! its cluster.
//!
//! Concurrency: `gate` is read-locked by every IO and write-locked by barriers (snapshot, resize,
//! snapshot delete), so a barrier drains IO first. Within IO, a striped lock per cluster orders an
//! allocation or unmap against other IO on the same cluster. All methods block: run them off async
//! runtime threads.

mod alloc;
mod faults;
mod intent;
mod keys;
mod mapcache;
mod sums;
mod sys;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex, RwLock};
use rocksdb::{DB, WriteBatch, WriteOptions};
use tracing::{debug, info, warn};
use uuid::Uuid;

use self::alloc::Allocator;
use self::faults::Faults;
pub use self::faults::{FaultOp, FaultSpec};
pub use self::intent::INTENT_REGION;
use self::intent::Intent;
use self::keys::{Config, EpochRecord, Head, Mapping, SnapshotRecord};
use self::mapcache::MapCache;
use self::sums::{Sums, Verdict};
pub use self::sys::CopyMode;
use crate::error::{Result, StoreError};

/// The volume's logical block: every offset and length is a multiple of it.
pub const BLOCK_SIZE: u64 = 4096;
/// Cluster size used when the creator does not choose one.
pub const DEFAULT_CLUSTER_SIZE: u64 = 64 * 1024;
/// Longest snapshot name, in bytes.
pub const MAX_SNAPSHOT_NAME: usize = 128;
/// Most snapshots one store keeps (bounds the in-memory snapshot table).
pub const MAX_SNAPSHOTS: usize = 16_384;

const STRIPES: usize = 1024;
const DATA_FILE: &str = "data";
const META_DIR: &str = "meta";
/// The store's identity card (a copy of its config), written once the create is complete. Create
/// and destroy read it instead of opening RocksDB, so neither depends on RocksDB being able to
/// start (it cannot on a full disk).
const IDENTITY_FILE: &str = "store.json";
/// Free space a file-backed store leaves on its filesystem: RocksDB must never meet ENOSPC (the
/// Debian build asserts on a failed log write), so data allocations stop short of a full disk.
const MIN_RESERVE: u64 = 16 << 20;
const MAX_RESERVE: u64 = 1 << 30;
/// Set while a clone fills a new store; a store carrying it is refused at open.
const CLONE_MARKER: &[u8] = b"P";
/// Clusters the data file grows by at a time.
const GROW_CLUSTERS: u64 = 64;
/// Longest run a clone copies in one call (so free space is checked between runs).
const MAX_CLONE_RUN: u64 = 256;

/// What a new store looks like.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub volume_id: String,
    pub size: u64,
    pub cluster_size: u64,
    /// Keep the data on this block device (a raw partition) instead of a file in the store's
    /// directory; the directory then holds only the metadata.
    pub data_device: Option<PathBuf>,
    /// Keep a checksum of every block and verify it on read (on unless measuring their cost).
    pub checksums: bool,
}

impl CreateOptions {
    /// A file-backed store with checksums.
    pub fn new(volume_id: impl Into<String>, size: u64, cluster_size: u64) -> CreateOptions {
        CreateOptions { volume_id: volume_id.into(), size, cluster_size, data_device: None, checksums: true }
    }
}

/// A snapshot as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: String,
    pub size: u64,
    pub created_unix: u64,
}

/// The replica's view of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStat {
    pub volume_id: String,
    pub store_id: Uuid,
    pub size: u64,
    pub cluster_size: u64,
    /// Clusters mapped by the head or any snapshot, in bytes.
    pub allocated_bytes: u64,
    /// Bytes the data file occupies on disk (st_blocks).
    pub disk_bytes: u64,
    pub snapshots: u32,
    pub epoch: u64,
    pub engine_id: Option<Uuid>,
    /// Regions ([`INTENT_REGION`] bytes each) marked as possibly differing from other replicas.
    pub dirty_regions: u64,
    /// `None` while healthy; otherwise why the store refuses IO.
    pub failure: Option<String>,
    /// The raw partition holding the data, if not a file.
    pub data_device: Option<PathBuf>,
    /// Blocks carry checksums verified on read.
    pub checksums: bool,
    /// Blocks found damaged (not matching their checksum) since the store opened.
    pub checksum_errors: u64,
}

/// The result of a fence request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceOutcome {
    /// The epoch was raised and persisted.
    Raised { previous: u64 },
    /// The same engine already held this epoch.
    AlreadyHeld,
}

/// What a clone produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloneReport {
    pub clusters: u64,
    pub bytes: u64,
    /// `Reflink` when every cluster shares extents with the source snapshot.
    pub mode: CopyMode,
}

/// An allocated run of a reader's view, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug)]
struct State {
    head: Head,
    snaps: BTreeMap<u64, SnapshotRecord>,
    by_name: HashMap<String, u64>,
}

impl State {
    /// True when an entry written at `generation` is seen by the head alone.
    fn exclusive(&self, generation: u64) -> bool {
        self.snaps.range(generation..self.head.generation).next().is_none()
    }

    fn snapshot(&self, name: &str) -> Result<&SnapshotRecord> {
        self.by_name
            .get(name)
            .and_then(|g| self.snaps.get(g))
            .ok_or_else(|| StoreError::SnapshotNotFound(name.to_owned()))
    }
}

#[derive(Debug)]
struct AllocState {
    alloc: Allocator,
    /// Clusters the data file currently has room for (fixed for a device).
    file_clusters: u64,
}

/// Group commit for fdatasync of the data file: a caller whose write completed before a sync
/// started is covered by that sync, so concurrent callers share one.
#[derive(Debug, Default)]
struct SyncGroup {
    state: Mutex<SyncState>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct SyncState {
    requested: u64,
    synced: u64,
    running: bool,
    poisoned: Option<String>,
}

impl SyncGroup {
    fn sync(&self, sync: impl Fn() -> io::Result<()>) -> io::Result<()> {
        let mut g = self.state.lock();
        g.requested += 1;
        let ticket = g.requested;
        loop {
            if let Some(e) = &g.poisoned {
                return Err(io::Error::other(e.clone()));
            }
            if g.synced >= ticket {
                return Ok(());
            }
            if !g.running {
                g.running = true;
                let target = g.requested;
                drop(g);
                let r = sync();
                g = self.state.lock();
                g.running = false;
                match &r {
                    Ok(()) => g.synced = target,
                    // After a failed fdatasync the kernel may have dropped dirty pages: no later
                    // sync can vouch for them, so every caller from now on fails.
                    Err(e) => g.poisoned = Some(format!("fdatasync of the data file: {e}")),
                }
                self.done.notify_all();
                return r;
            }
            self.done.wait(&mut g);
        }
    }
}

/// One replica's store. See the module docs.
pub struct Store {
    dir: PathBuf,
    config: Config,
    cluster_shift: u32,
    db: DB,
    data: File,
    /// Data on a raw partition: it cannot grow, and freed clusters are not holes, so a new
    /// cluster is written whole (zeros around the data) instead of relying on punched holes.
    on_device: bool,
    gate: RwLock<State>,
    stripes: Box<[RwLock<()>]>,
    /// Recent map lookups (see [`mapcache`] for the locking they rely on).
    map_cache: MapCache,
    alloc: Mutex<AllocState>,
    data_sync: SyncGroup,
    /// Snapshots (by generation) a clone is reading; they cannot be deleted meanwhile.
    pins: Mutex<HashMap<u64, u32>>,
    /// Clusters not available for data (a device's superblock).
    reserved_clusters: u64,
    epoch: Mutex<EpochRecord>,
    intent: Intent,
    /// Checksums of the data's blocks (see [`sums`]).
    sums: Sums,
    /// Blocks found not to match their checksum since the store opened.
    checksum_errors: std::sync::atomic::AtomicU64,
    faults: Faults,
    failure: Mutex<Option<String>>,
    nosync: WriteOptions,
    sync: WriteOptions,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("volume_id", &self.config.volume_id)
            .field("store_id", &self.config.store_id)
            .finish_non_exhaustive()
    }
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn db_options(create: bool) -> rocksdb::Options {
    let mut o = rocksdb::Options::default();
    o.create_if_missing(create);
    o.set_paranoid_checks(true);
    // Bounded memory per store: small memtables and block cache, few open files.
    o.set_write_buffer_size(4 << 20);
    o.set_max_write_buffer_number(2);
    o.set_max_open_files(128);
    o.set_keep_log_file_num(2);
    // Warnings and worse only: fewer writes to RocksDB's own log.
    o.set_log_level(rocksdb::LogLevel::Warn);
    o.set_max_background_jobs(2);
    let mut bb = rocksdb::BlockBasedOptions::default();
    if let Ok(cache) = rocksdb::Cache::new_lru_cache(8 << 20) {
        bb.set_block_cache(&cache);
    }
    bb.set_bloom_filter(10.0, false);
    o.set_block_based_table_factory(&bb);
    o
}

/// The free space a file-backed store leaves on a filesystem of `fs_size` bytes.
fn reserve_for(fs_size: u64) -> u64 {
    (fs_size / 100).clamp(MIN_RESERVE, MAX_RESERVE)
}

fn to_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Serialising these plain structs cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// True when `dir` holds (the beginnings of) a store.
pub fn store_exists(dir: &Path) -> bool {
    dir.join(META_DIR).exists()
}

/// One piece of a byte range that falls in a single cluster.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    cluster: u64,
    /// Offset inside the cluster.
    at: u64,
    len: u64,
    /// Offset inside the caller's buffer.
    pos: usize,
}

impl Store {
    /// Creates a new, empty store in `dir` (created if missing) and opens it. A directory left
    /// behind by an interrupted create is wiped and reused; a complete store is `AlreadyExists`.
    pub fn create(dir: &Path, opts: &CreateOptions) -> Result<Store> {
        Self::create_inner(dir, opts, false)
    }

    /// `create`; with `for_clone` the store is marked incomplete in the same batch that creates it,
    /// so a crash before the clone finished can never leave a store that opens.
    fn create_inner(dir: &Path, opts: &CreateOptions, for_clone: bool) -> Result<Store> {
        let cs = opts.cluster_size;
        if !cs.is_power_of_two() || !(BLOCK_SIZE..=(4 << 20)).contains(&cs) {
            return Err(StoreError::InvalidArgument(format!(
                "cluster size {cs} must be a power of two from {BLOCK_SIZE} to 4 MiB"
            )));
        }
        if opts.size == 0 || !opts.size.is_multiple_of(BLOCK_SIZE) {
            return Err(StoreError::InvalidArgument(format!(
                "size {} must be a non-zero multiple of {BLOCK_SIZE}",
                opts.size
            )));
        }
        if opts.volume_id.is_empty() {
            return Err(StoreError::InvalidArgument("empty volume id".into()));
        }
        std::fs::create_dir_all(dir).map_err(StoreError::io("create store directory"))?;
        let meta = dir.join(META_DIR);
        if dir.join(IDENTITY_FILE).exists() {
            return Err(StoreError::AlreadyExists(dir.to_owned()));
        }
        if meta.exists() {
            warn!(dir = %dir.display(), "removing an interrupted store create");
            Self::destroy(dir)?;
        }
        if opts.data_device.is_none() {
            let (free, reserve) = sys::free_space(dir).map_err(StoreError::io("statvfs"))?;
            if free < reserve_for(reserve) {
                return Err(StoreError::io("create store")(io::Error::from_raw_os_error(libc::ENOSPC)));
            }
        }
        let store_id = Uuid::new_v4();
        if let Some(dev) = &opts.data_device {
            let (f, len) = sys::open_device(dev).map_err(StoreError::io("open data device"))?;
            if len < 2 * cs {
                return Err(StoreError::InvalidArgument(format!(
                    "device {} holds {len} bytes, less than two clusters",
                    dev.display()
                )));
            }
            if let Some((other, _)) =
                sys::read_superblock(&f).map_err(StoreError::io("read device superblock"))?
            {
                return Err(StoreError::InvalidArgument(format!(
                    "device {} already holds store {other}; delete that store first",
                    dev.display()
                )));
            }
        } else {
            let data = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.join(DATA_FILE))
                .map_err(StoreError::io("create data file"))?;
            data.sync_all().map_err(StoreError::io("sync data file"))?;
        }
        let db = DB::open(&db_options(true), &meta)?;
        let config = Config {
            layout_version: keys::LAYOUT_VERSION,
            volume_id: opts.volume_id.clone(),
            store_id,
            cluster_size: cs,
            created_unix: now_unix(),
            data_device: opts.data_device.clone(),
            checksums: opts.checksums,
        };
        let mut b = WriteBatch::default();
        b.put(keys::HEAD, to_json(&Head { size: opts.size, generation: 1 }));
        b.put(keys::EPOCH, to_json(&EpochRecord::default()));
        if for_clone {
            b.put(CLONE_MARKER, b"");
        }
        // The config goes last in the same batch: its presence marks a complete create.
        b.put(keys::CONFIG, to_json(&config));
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        db.write_opt(b, &sync)?;
        drop(db);
        let tmp = dir.join(format!("{IDENTITY_FILE}.tmp"));
        let card = File::create(&tmp).and_then(|mut f| {
            io::Write::write_all(&mut f, &to_json(&config))?;
            f.sync_all()
        });
        card.and_then(|()| std::fs::rename(&tmp, dir.join(IDENTITY_FILE)))
            .map_err(StoreError::io("write store identity"))?;
        sync_dir(dir).map_err(StoreError::io("sync store directory"))?;
        if let Some(dev) = &opts.data_device {
            // The device now names its store: opening it for another store, or this store on
            // another device, is refused.
            let (f, _) = sys::open_device(dev).map_err(StoreError::io("open data device"))?;
            sys::write_superblock(&f, store_id, &opts.volume_id)
                .map_err(StoreError::io("write device superblock"))?;
        }
        info!(volume_id = %opts.volume_id, store_id = %config.store_id, dir = %dir.display(),
              size = opts.size, cluster_size = cs, "created replica store");
        Self::open_inner(dir, for_clone)
    }

    /// Opens an existing store, rebuilding the allocation bitmap from the map and punching every
    /// free cluster (so clusters allocated by writes that never got mapped read as zeros again).
    pub fn open(dir: &Path) -> Result<Store> {
        Self::open_inner(dir, false)
    }

    fn open_inner(dir: &Path, filling_clone: bool) -> Result<Store> {
        let meta = dir.join(META_DIR);
        if !meta.exists() {
            return Err(StoreError::NotFound(dir.to_owned()));
        }
        let corrupt = |detail: String| StoreError::Corrupt { path: dir.to_owned(), detail };
        let db = DB::open(&db_options(false), &meta)?;
        let config: Config = match db.get(keys::CONFIG)? {
            Some(v) => serde_json::from_slice(&v).map_err(|e| corrupt(format!("config: {e}")))?,
            None => return Err(corrupt("no config record (interrupted create)".into())),
        };
        if config.layout_version != keys::LAYOUT_VERSION {
            return Err(corrupt(format!("unknown layout version {}", config.layout_version)));
        }
        if !filling_clone && db.get(CLONE_MARKER)?.is_some() {
            return Err(corrupt("an interrupted clone; delete the store and clone again".into()));
        }
        let head: Head = match db.get(keys::HEAD)? {
            Some(v) => serde_json::from_slice(&v).map_err(|e| corrupt(format!("head: {e}")))?,
            None => return Err(corrupt("no head record".into())),
        };
        let epoch: EpochRecord = match db.get(keys::EPOCH)? {
            Some(v) => serde_json::from_slice(&v).map_err(|e| corrupt(format!("epoch: {e}")))?,
            None => EpochRecord::default(),
        };
        let mut snaps = BTreeMap::new();
        let mut by_name = HashMap::new();
        let mut it = db.raw_iterator();
        it.seek([keys::SNAP_TAG]);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if k.first() != Some(&keys::SNAP_TAG) {
                break;
            }
            let rec: SnapshotRecord =
                serde_json::from_slice(v).map_err(|e| corrupt(format!("snapshot: {e}")))?;
            if rec.generation >= head.generation {
                return Err(corrupt(format!("snapshot {:?} is newer than the head", rec.name)));
            }
            by_name.insert(rec.name.clone(), rec.generation);
            snaps.insert(rec.generation, rec);
            it.next();
        }
        it.status()?;
        let cs = config.cluster_size;
        let mut alloc = Allocator::new();
        // On a device, cluster 0 holds the superblock.
        let reserved_clusters = u64::from(config.data_device.is_some());
        if reserved_clusters == 1 {
            alloc.mark_used(0);
        }
        it.seek([keys::MAP_TAG]);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let Some((c, g)) = keys::parse_map_key(k) else { break };
            if g > head.generation || c.saturating_mul(cs) >= head.size {
                return Err(corrupt(format!("map entry ({c}, {g}) beyond the head")));
            }
            match Mapping::decode(v) {
                Some(Mapping::Phys(p)) => {
                    if !alloc.mark_used(p) {
                        return Err(corrupt(format!("physical cluster {p} mapped twice")));
                    }
                }
                Some(Mapping::Zero) => {}
                None => return Err(corrupt(format!("map entry ({c}, {g}) unreadable"))),
            }
            it.next();
        }
        it.status()?;
        let mut marked = Vec::new();
        it.seek([keys::INTENT_TAG]);
        while let Some(k) = it.key() {
            if k.len() != 9 || k[0] != keys::INTENT_TAG {
                break;
            }
            marked.push(u64::from_be_bytes(k[1..].try_into().map_err(|_| corrupt("intent mark".into()))?));
            it.next();
        }
        it.status()?;
        drop(it);
        let (data, len) = match &config.data_device {
            Some(dev) => {
                let (f, len) = sys::open_device(dev).map_err(StoreError::io("open data device"))?;
                match sys::read_superblock(&f).map_err(StoreError::io("read device superblock"))? {
                    Some((id, _)) if id == config.store_id => {}
                    Some((id, vol)) => {
                        return Err(corrupt(format!(
                            "device {} holds store {id} of volume {vol}, not this store {}",
                            dev.display(),
                            config.store_id
                        )));
                    }
                    None => {
                        return Err(corrupt(format!(
                            "device {} carries no Barnacle superblock (wrong device, or an interrupted create)",
                            dev.display()
                        )));
                    }
                }
                (f, len)
            }
            None => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(dir.join(DATA_FILE))
                    .map_err(StoreError::io("open data file"))?;
                let len = f.metadata().map_err(StoreError::io("stat data file"))?.len();
                (f, len)
            }
        };
        let on_device = config.data_device.is_some();
        // A device's last partial cluster is never used.
        let file_clusters = if on_device { len / cs } else { len.div_ceil(cs) };
        if alloc.high_water() > file_clusters {
            return Err(corrupt(format!(
                "map points at cluster {} but the data file holds {file_clusters}",
                alloc.high_water() - 1
            )));
        }
        if !on_device {
            // Free clusters must be holes; this also clears clusters a crash left written but
            // never mapped. (On a device new clusters are written whole instead.)
            for (first, n) in alloc.free_runs() {
                sys::punch_hole(&data, first * cs, n * cs).map_err(StoreError::io("punch free clusters"))?;
            }
            let hw = alloc.high_water();
            sys::punch_hole(&data, hw * cs, len.saturating_sub(hw * cs))
                .map_err(StoreError::io("punch free clusters"))?;
        }
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        let mut nosync = WriteOptions::default();
        nosync.set_sync(false);
        let sums = Sums::open(dir, config.checksums, cs).map_err(StoreError::io("open checksum file"))?;
        info!(volume_id = %config.volume_id, store_id = %config.store_id, size = head.size,
              snapshots = snaps.len(), clusters = alloc.used_count(), epoch = epoch.epoch,
              checksums = config.checksums, "opened replica store");
        let dirty = marked.clone();
        let store = Store {
            dir: dir.to_owned(),
            cluster_shift: cs.trailing_zeros(),
            config,
            db,
            data,
            on_device,
            gate: RwLock::new(State { head, snaps, by_name }),
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            map_cache: MapCache::new(STRIPES),
            alloc: Mutex::new(AllocState { alloc, file_clusters }),
            data_sync: SyncGroup::default(),
            pins: Mutex::new(HashMap::new()),
            reserved_clusters,
            epoch: Mutex::new(epoch),
            intent: Intent::load(marked, epoch.epoch),
            sums,
            checksum_errors: std::sync::atomic::AtomicU64::new(0),
            faults: Faults::default(),
            failure: Mutex::new(None),
            nosync,
            sync,
        };
        store.reseal(&dirty)?;
        Ok(store)
    }

    /// Recomputes the checksums of the head's clusters in the marked `regions` from their data:
    /// a crash can leave a block written there whose checksum was not (see [`sums`]).
    fn reseal(&self, regions: &[u64]) -> Result<()> {
        if !self.sums.enabled() || regions.is_empty() {
            return Ok(());
        }
        let st = self.gate.read();
        let cs = self.config.cluster_size;
        let mut buf = vec![0u8; usize::try_from(cs).unwrap_or(usize::MAX)];
        let mut clusters = BTreeSet::new();
        for r in regions {
            let start = r * INTENT_REGION;
            let end = (start + INTENT_REGION).min(st.head.size);
            let mut c = start >> self.cluster_shift;
            while c << self.cluster_shift < end {
                clusters.insert(c);
                c += 1;
            }
        }
        let mut resealed = 0u64;
        for c in clusters {
            if let Some((g, Mapping::Phys(p))) = self.lookup(c, st.head.generation)?
                && st.exclusive(g)
            {
                sys::read_full_at(&self.data, &mut buf, self.phys_offset(p, 0))
                    .map_err(StoreError::io("read data to reseal its checksums"))?;
                self.sums.record(p, 0, &buf).map_err(StoreError::io("write checksums"))?;
                resealed += 1;
            }
        }
        self.sums.sync().map_err(StoreError::io("sync checksums"))?;
        info!(volume_id = %self.config.volume_id, regions = regions.len(), clusters = resealed,
              "recomputed the checksums of regions written before the last open");
        Ok(())
    }

    /// Arms injected disk faults (replacing any armed before; empty disarms). For tests: the
    /// management API allows it only on a replica started with `--fault-injection`.
    pub fn inject_faults(&self, faults: Vec<FaultSpec>) {
        warn!(volume_id = %self.config.volume_id, ?faults, "disk faults injected");
        self.faults.set(faults);
    }

    fn fault(&self, op: FaultOp, offset: u64, len: u64, what: &'static str) -> Result<()> {
        self.faults.check(op, offset, len).map_err(StoreError::io(what))
    }

    /// Removes the store in `dir` (which must not be open). Missing pieces are not an error. A
    /// raw data partition is left as it is: a later store on it never reads what it did not write.
    pub fn destroy(dir: &Path) -> Result<()> {
        let meta = dir.join(META_DIR);
        let config: Option<Config> =
            std::fs::read(dir.join(IDENTITY_FILE)).ok().and_then(|v| serde_json::from_slice(&v).ok());
        if let Some(Config { data_device: Some(dev), store_id, .. }) = &config {
            // Release the device: clear its superblock, but only if it is this store's.
            let (f, _) = sys::open_device(dev).map_err(StoreError::io("open data device"))?;
            if sys::read_superblock(&f)
                .map_err(StoreError::io("read device superblock"))?
                .is_some_and(|(id, _)| id == *store_id)
            {
                sys::clear_superblock(&f).map_err(StoreError::io("clear device superblock"))?;
            }
        }
        // The identity card goes first: a store without it is an interrupted create or destroy.
        match std::fs::remove_file(dir.join(IDENTITY_FILE)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("remove store identity")(e)),
        }
        if meta.exists() {
            std::fs::remove_dir_all(&meta).map_err(StoreError::io("remove metadata"))?;
        }
        for (file, what) in [(DATA_FILE, "remove data file"), (sums::SUMS_FILE, "remove checksum file")] {
            match std::fs::remove_file(dir.join(file)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io(what)(e)),
            }
        }
        if dir.exists() {
            sync_dir(dir).map_err(StoreError::io("sync store directory"))?;
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn volume_id(&self) -> &str {
        &self.config.volume_id
    }

    pub fn store_id(&self) -> Uuid {
        self.config.store_id
    }

    pub fn cluster_size(&self) -> u64 {
        self.config.cluster_size
    }

    pub fn size(&self) -> u64 {
        self.gate.read().head.size
    }

    // ----- health -------------------------------------------------------------------------

    fn check_ok(&self) -> Result<()> {
        match &*self.failure.lock() {
            Some(why) => Err(StoreError::Failed(why.clone())),
            None => Ok(()),
        }
    }

    /// Records a durability failure: from now on the store refuses IO until reopened.
    fn fail(&self, why: String) -> StoreError {
        warn!(volume_id = %self.config.volume_id, reason = %why, "replica store failed");
        let mut f = self.failure.lock();
        f.get_or_insert(why.clone());
        StoreError::Failed(why)
    }

    /// Makes the data and its checksums durable.
    fn sync_data(&self) -> Result<()> {
        self.data_sync
            .sync(|| {
                self.faults.check(FaultOp::Sync, 0, 0)?;
                self.data.sync_data()?;
                self.sums.sync()
            })
            .map_err(|e| self.fail(format!("fdatasync: {e}")))
    }

    // ----- geometry -----------------------------------------------------------------------

    fn check_range(&self, offset: u64, len: u64, size: u64) -> Result<()> {
        if !offset.is_multiple_of(BLOCK_SIZE) || !len.is_multiple_of(BLOCK_SIZE) {
            return Err(StoreError::Unaligned { offset, len, align: BLOCK_SIZE });
        }
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(StoreError::OutOfRange { offset, len, size }),
        }
    }

    fn chunks(&self, offset: u64, len: u64) -> impl Iterator<Item = Chunk> + use<> {
        let cs = self.config.cluster_size;
        let shift = self.cluster_shift;
        let end = offset + len;
        let mut cur = offset;
        std::iter::from_fn(move || {
            if cur >= end {
                return None;
            }
            let cluster = cur >> shift;
            let at = cur - (cluster << shift);
            let n = (cs - at).min(end - cur);
            // Buffers are in memory, so their offsets fit in usize.
            #[allow(clippy::cast_possible_truncation)]
            let chunk = Chunk { cluster, at, len: n, pos: (cur - offset) as usize };
            cur += n;
            Some(chunk)
        })
    }

    /// True when `c` covers its whole cluster, or everything of it inside a volume of `size`.
    fn covers_cluster(&self, c: Chunk, size: u64) -> bool {
        c.at == 0 && (c.len == self.config.cluster_size || (c.cluster << self.cluster_shift) + c.len == size)
    }

    fn stripe(&self, cluster: u64) -> &RwLock<()> {
        // The modulo is below STRIPES, which fits in usize.
        #[allow(clippy::cast_possible_truncation)]
        &self.stripes[(cluster % STRIPES as u64) as usize]
    }

    fn phys_offset(&self, p: u64, at: u64) -> u64 {
        (p << self.cluster_shift) + at
    }

    // ----- map ----------------------------------------------------------------------------

    /// The entry a reader at generation `reader` sees for `cluster`: (its generation, mapping).
    /// Answered from [`MapCache`] when it can be; a head reader must hold the cluster's stripe
    /// lock until it has used the answer.
    fn lookup(&self, cluster: u64, reader: u64) -> Result<Option<(u64, Mapping)>> {
        if let Some(answer) = self.map_cache.get(cluster, reader) {
            return Ok(answer);
        }
        let answer = self.lookup_db(cluster, reader)?;
        self.map_cache.put(cluster, reader, answer);
        Ok(answer)
    }

    fn lookup_db(&self, cluster: u64, reader: u64) -> Result<Option<(u64, Mapping)>> {
        // Most lookups find an entry written by the reader's own generation (the head's, when no
        // snapshot came since): a point get, filtered by the bloom filters, answers those far
        // more cheaply than an iterator merging the memtable and every table file. An entry at
        // exactly `reader` is the newest one at or below it.
        if let Some(v) = self.db.get_pinned(keys::map_key(cluster, reader))? {
            return match Mapping::decode(&v) {
                Some(m) => Ok(Some((reader, m))),
                None => Err(StoreError::Corrupt {
                    path: self.dir.clone(),
                    detail: format!("map entry ({cluster}, {reader}) unreadable"),
                }),
            };
        }
        let mut it = self.db.raw_iterator();
        it.seek_for_prev(keys::map_key(cluster, reader));
        let (Some(k), Some(v)) = (it.key(), it.value()) else {
            it.status()?;
            return Ok(None);
        };
        match keys::parse_map_key(k) {
            Some((c, g)) if c == cluster => match Mapping::decode(v) {
                Some(m) => Ok(Some((g, m))),
                None => Err(StoreError::Corrupt {
                    path: self.dir.clone(),
                    detail: format!("map entry ({c}, {g}) unreadable"),
                }),
            },
            _ => Ok(None),
        }
    }

    /// True when `cluster` has an entry older than generation `generation`.
    fn has_older(&self, cluster: u64, generation: u64) -> Result<bool> {
        Ok(generation > 0 && self.lookup(cluster, generation - 1)?.is_some())
    }

    fn allocate(&self) -> Result<u64> {
        if !self.on_device {
            let (free, size) = sys::free_space(&self.dir).map_err(StoreError::io("statvfs"))?;
            if free < reserve_for(size) {
                return Err(StoreError::io("allocate a cluster")(io::Error::from_raw_os_error(libc::ENOSPC)));
            }
        }
        let mut a = self.alloc.lock();
        let p = a.alloc.allocate();
        if p >= a.file_clusters && self.on_device {
            a.alloc.release(p);
            return Err(StoreError::io("allocate a cluster")(io::Error::from_raw_os_error(libc::ENOSPC)));
        }
        if p >= a.file_clusters {
            let want = (p + 1).max(a.file_clusters + GROW_CLUSTERS);
            if let Err(e) = self.data.set_len(want << self.cluster_shift) {
                a.alloc.release(p);
                return Err(StoreError::io("grow data file")(e));
            }
            a.file_clusters = want;
        }
        Ok(p)
    }

    /// Punches and releases clusters whose unmapping is now durable.
    fn release(&self, clusters: Vec<u64>) {
        if clusters.is_empty() {
            return;
        }
        let cs = self.config.cluster_size;
        let mut a = self.alloc.lock();
        for p in clusters {
            if self.on_device {
                a.alloc.release(p);
                continue;
            }
            match sys::punch_hole(&self.data, p * cs, cs) {
                Ok(()) => a.alloc.release(p),
                // Left allocated: reopening punches and frees it.
                Err(e) => warn!(volume_id = %self.config.volume_id, cluster = p, error = %e,
                                "could not punch a freed cluster; it stays allocated until reopen"),
            }
        }
    }

    /// Writes the new contents of one cluster into a fresh physical cluster and maps it at the
    /// head's generation: `base` is copied first when the write does not cover the whole cluster,
    /// then `fill` changes it and writes it to physical cluster `p` (it records the checksums of
    /// what it writes when it leaves `buf` empty). The data and its checksums are durable before
    /// the mapping is written.
    fn remap(
        &self,
        st: &State,
        c: Chunk,
        prev: Option<(u64, Mapping)>,
        fill: impl FnOnce(&mut Vec<u8>, u64) -> Result<()>,
    ) -> Result<()> {
        let h = st.head.generation;
        let p = self.allocate()?;
        let res = (|| {
            let cs = self.config.cluster_size;
            // On a device the bytes past the volume's end in its last cluster are not zeros, so
            // only a full cluster counts as whole there.
            let whole = self.covers_cluster(c, st.head.size) && (!self.on_device || c.len == cs);
            let mut buf = Vec::new();
            let cluster_buf = || vec![0u8; usize::try_from(cs).unwrap_or(usize::MAX)];
            match (prev, whole) {
                (Some((_, Mapping::Phys(old))), false) => {
                    buf = cluster_buf();
                    sys::read_full_at(&self.data, &mut buf, self.phys_offset(old, 0))
                        .map_err(StoreError::io("read cluster for copy-on-write"))?;
                }
                // A device's free cluster holds old bytes: write it whole, zeros around the data.
                (_, false) if self.on_device => buf = cluster_buf(),
                _ => {}
            }
            fill(&mut buf, p)?;
            if !buf.is_empty() {
                // The whole cluster was written: its checksums with it.
                self.sums.record(p, 0, &buf).map_err(StoreError::io("write checksums"))?;
            }
            self.sync_data()?;
            let mut b = WriteBatch::default();
            keys::put_map(&mut b, c.cluster, h, Mapping::Phys(p));
            if let Some((g, Mapping::Zero)) = prev
                && g < h
                && st.exclusive(g)
            {
                keys::delete_map(&mut b, c.cluster, g);
            }
            self.map_cache.forget(c.cluster);
            self.db.write_opt(b, &self.nosync)?;
            Ok(())
        })();
        if res.is_err() {
            // It may hold some of the data: punched before it is reused.
            self.alloc.lock().alloc.free_after_sync(p);
        }
        res
    }

    // ----- IO -----------------------------------------------------------------------------

    /// Reads the head.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_ok()?;
        let st = self.gate.read();
        self.check_range(offset, buf.len() as u64, st.head.size)?;
        self.read_at_gen(st.head.generation, offset, buf, true)
    }

    /// Reads snapshot `name`.
    pub fn read_snapshot(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_ok()?;
        let st = self.gate.read();
        let snap = st.snapshot(name)?;
        self.check_range(offset, buf.len() as u64, snap.size)?;
        // A snapshot's clusters never change while it exists, and it cannot be deleted while the
        // gate is held: no stripe locks needed.
        self.read_at_gen(snap.generation, offset, buf, false)
    }

    fn read_at_gen(&self, reader: u64, offset: u64, buf: &mut [u8], lock: bool) -> Result<()> {
        self.read_at_gen_with(reader, offset, buf, lock, false).map(drop)
    }

    /// Reads the head like [`Store::read`], but only if its data is in the page cache: `Ok(false)`
    /// (with `buf` partly filled) when some of it would have to come from the device. Lets a
    /// server answer cached reads on its async threads and send the rest to a blocking pool.
    /// Never waits on a lock either: a snapshot, resize or copy-on-write holding one (possibly
    /// through a sync) makes it decline.
    pub fn read_cached(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        self.check_ok()?;
        let Some(st) = self.gate.try_read() else { return Ok(false) };
        self.check_range(offset, buf.len() as u64, st.head.size)?;
        self.read_at_gen_with(st.head.generation, offset, buf, true, true)
    }

    fn read_at_gen_with(
        &self,
        reader: u64,
        offset: u64,
        buf: &mut [u8],
        lock: bool,
        cached: bool,
    ) -> Result<bool> {
        for c in self.chunks(offset, buf.len() as u64) {
            #[allow(clippy::cast_possible_truncation)]
            let out = &mut buf[c.pos..c.pos + c.len as usize];
            self.fault(FaultOp::Read, (c.cluster << self.cluster_shift) + c.at, c.len, "read data")?;
            let g = match (lock, cached) {
                (false, _) => None,
                (true, false) => Some(self.stripe(c.cluster).read()),
                (true, true) => match self.stripe(c.cluster).try_read() {
                    Some(g) => Some(g),
                    None => return Ok(false),
                },
            };
            match self.lookup(c.cluster, reader)? {
                Some((_, Mapping::Phys(p))) if cached => {
                    if !sys::read_cached_at(&self.data, out, self.phys_offset(p, c.at))
                        .map_err(StoreError::io("read data"))?
                    {
                        return Ok(false);
                    }
                    // Checksums not cached, or a mismatch: the blocking path reads again and
                    // decides.
                    if self.sums.verify(p, c.at, out, true).map_err(StoreError::io("read checksums"))?
                        != Verdict::Good
                    {
                        return Ok(false);
                    }
                }
                Some((_, Mapping::Phys(p))) => {
                    sys::read_full_at(&self.data, out, self.phys_offset(p, c.at))
                        .map_err(StoreError::io("read data"))?;
                    if self.sums.verify(p, c.at, out, false).map_err(StoreError::io("read checksums"))?
                        != Verdict::Good
                    {
                        drop(g);
                        self.read_suspect(reader, c, out, lock)?;
                    }
                }
                _ => out.fill(0),
            }
        }
        Ok(true)
    }

    /// Reads chunk `c` again after it did not match its checksums, this time with no write in
    /// flight on its cluster (an in-place write lands its data before its checksums, so a read
    /// racing one can see them disagree). A second mismatch is a damaged copy: counted, logged
    /// and returned as [`StoreError::Checksum`], never as data.
    fn read_suspect(&self, reader: u64, c: Chunk, out: &mut [u8], lock: bool) -> Result<()> {
        let _w = lock.then(|| self.stripe(c.cluster).write());
        let Some((_, Mapping::Phys(p))) = self.lookup(c.cluster, reader)? else {
            out.fill(0);
            return Ok(());
        };
        sys::read_full_at(&self.data, out, self.phys_offset(p, c.at)).map_err(StoreError::io("read data"))?;
        match self.sums.verify(p, c.at, out, false).map_err(StoreError::io("read checksums"))? {
            Verdict::Bad(block) => {
                let offset = (c.cluster << self.cluster_shift) + c.at + block * BLOCK_SIZE;
                self.checksum_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                warn!(volume_id = %self.config.volume_id, offset, generation = reader, physical_cluster = p,
                      "block does not match its checksum: this copy is damaged");
                Err(StoreError::Checksum { offset })
            }
            _ => Ok(()),
        }
    }

    /// Writes the head like [`Store::write`] (not FUA), but only if that needs no waiting:
    /// every region already marked and stamped in this epoch, every cluster already held by the
    /// head alone (written in place, no copy-on-write or allocation), and no lock contended.
    /// `Ok(false)` otherwise, possibly after writing some of the chunks: the caller then does the
    /// whole write with [`Store::write`], which rewrites the same bytes. Lets a server run most
    /// small writes on its async threads.
    pub fn try_write_inline(&self, offset: u64, data: &[u8]) -> Result<bool> {
        self.check_ok()?;
        let Some(st) = self.gate.try_read() else { return Ok(false) };
        let len = data.len() as u64;
        self.check_range(offset, len, st.head.size)?;
        if !self.intent.begin_if_covered(offset, len) {
            return Ok(false);
        }
        let h = st.head.generation;
        let res = (|| {
            for c in self.chunks(offset, len) {
                self.fault(FaultOp::Write, (c.cluster << self.cluster_shift) + c.at, c.len, "write data")?;
                let Some(_r) = self.stripe(c.cluster).try_read() else { return Ok(false) };
                match self.lookup(c.cluster, h)? {
                    Some((g, Mapping::Phys(p))) if st.exclusive(g) => {
                        #[allow(clippy::cast_possible_truncation)]
                        self.write_in_place(p, c.at, &data[c.pos..c.pos + c.len as usize])?;
                    }
                    _ => return Ok(false),
                }
            }
            Ok(true)
        })();
        self.intent.end(offset, len);
        res
    }

    /// Writes the head; with `fua` the data is durable when this returns.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check_ok()?;
        {
            let st = self.gate.read();
            let len = data.len() as u64;
            self.check_range(offset, len, st.head.size)?;
            self.intent.begin(&self.db, &self.sync, offset, len)?;
            let res = self.chunks(offset, len).try_for_each(|c| {
                #[allow(clippy::cast_possible_truncation)]
                self.write_chunk(&st, c, &data[c.pos..c.pos + c.len as usize])
            });
            self.intent.end(offset, len);
            res?;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn write_chunk(&self, st: &State, c: Chunk, data: &[u8]) -> Result<()> {
        let h = st.head.generation;
        self.fault(FaultOp::Write, (c.cluster << self.cluster_shift) + c.at, c.len, "write data")?;
        {
            let _r = self.stripe(c.cluster).read();
            if let Some((g, Mapping::Phys(p))) = self.lookup(c.cluster, h)?
                && st.exclusive(g)
            {
                return self.write_in_place(p, c.at, data);
            }
        }
        let _w = self.stripe(c.cluster).write();
        let prev = self.lookup(c.cluster, h)?;
        if let Some((g, Mapping::Phys(p))) = prev
            && st.exclusive(g)
        {
            return self.write_in_place(p, c.at, data);
        }
        self.remap(st, c, prev, |buf, p| {
            if buf.is_empty() {
                // Fresh cluster (a hole): only the written part needs writing.
                sys::write_full_at(&self.data, data, self.phys_offset(p, c.at))
                    .map_err(StoreError::io("write data"))?;
                self.sums.record_fresh(p, c.at, data).map_err(StoreError::io("write checksums"))
            } else {
                #[allow(clippy::cast_possible_truncation)]
                buf[c.at as usize..c.at as usize + data.len()].copy_from_slice(data);
                sys::write_full_at(&self.data, buf, self.phys_offset(p, 0))
                    .map_err(StoreError::io("write data"))
            }
        })
    }

    /// Overwrites part of a cluster the head alone holds, then its checksums. The caller holds
    /// the cluster's stripe lock.
    fn write_in_place(&self, p: u64, at: u64, data: &[u8]) -> Result<()> {
        sys::write_full_at(&self.data, data, self.phys_offset(p, at))
            .map_err(StoreError::io("write data"))?;
        self.sums.record(p, at, data).map_err(StoreError::io("write checksums"))
    }

    /// Deallocates a range: it reads as zeros afterwards and frees whole clusters the head alone
    /// held (partial clusters are punched).
    pub fn unmap(&self, offset: u64, len: u64) -> Result<()> {
        self.check_ok()?;
        let st = self.gate.read();
        self.check_range(offset, len, st.head.size)?;
        self.intent.begin(&self.db, &self.sync, offset, len)?;
        let res = self.chunks(offset, len).try_for_each(|c| self.zero_chunk(&st, c));
        self.intent.end(offset, len);
        res
    }

    /// Zeroes a range. The store is thin, so this deallocates exactly like [`Store::unmap`]; both
    /// leave every replica reading zeros, so replicas cannot diverge on either.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.unmap(offset, len)
    }

    fn zero_chunk(&self, st: &State, c: Chunk) -> Result<()> {
        let h = st.head.generation;
        let whole = self.covers_cluster(c, st.head.size);
        let _w = self.stripe(c.cluster).write();
        let prev = self.lookup(c.cluster, h)?;
        match prev {
            None | Some((_, Mapping::Zero)) => Ok(()),
            Some((g, Mapping::Phys(p))) if st.exclusive(g) => {
                if whole {
                    let mut b = WriteBatch::default();
                    if self.has_older(c.cluster, g)? {
                        // Snapshots still see an older entry: mask it for the head.
                        keys::put_map(&mut b, c.cluster, g, Mapping::Zero);
                    } else {
                        keys::delete_map(&mut b, c.cluster, g);
                    }
                    self.map_cache.forget(c.cluster);
                    self.db.write_opt(b, &self.nosync)?;
                    self.alloc.lock().alloc.free_after_sync(p);
                    Ok(())
                } else {
                    if self.on_device {
                        let zeros = vec![0u8; usize::try_from(c.len).unwrap_or(usize::MAX)];
                        sys::write_full_at(&self.data, &zeros, self.phys_offset(p, c.at))
                            .map_err(StoreError::io("zero range"))?;
                    } else {
                        sys::punch_hole(&self.data, self.phys_offset(p, c.at), c.len)
                            .map_err(StoreError::io("punch hole"))?;
                    }
                    self.sums.clear(p, c.at, c.len).map_err(StoreError::io("clear checksums"))
                }
            }
            Some((_, Mapping::Phys(_))) => {
                if whole {
                    let mut b = WriteBatch::default();
                    keys::put_map(&mut b, c.cluster, h, Mapping::Zero);
                    self.map_cache.forget(c.cluster);
                    self.db.write_opt(b, &self.nosync)?;
                    Ok(())
                } else {
                    self.remap(st, c, prev, |buf, p| {
                        #[allow(clippy::cast_possible_truncation)]
                        buf[c.at as usize..(c.at + c.len) as usize].fill(0);
                        sys::write_full_at(&self.data, buf, self.phys_offset(p, 0))
                            .map_err(StoreError::io("write data"))
                    })
                }
            }
        }
    }

    /// Makes every write acknowledged before this call durable: data fdatasync'd first, then the
    /// metadata log synced. Clusters unmapped before the call become reusable afterwards. Returns
    /// the flush point to give [`Store::clear_intent`] once this flush completed on every replica.
    pub fn flush(&self) -> Result<u64> {
        self.check_ok()?;
        let point = self.intent.flush_point();
        let pending = self.alloc.lock().alloc.take_pending();
        let res = self
            .sync_data()
            .and_then(|()| self.db.flush_wal(true).map_err(|e| self.fail(format!("metadata sync: {e}"))));
        match res {
            Ok(()) => {
                self.release(pending);
                Ok(point)
            }
            Err(e) => {
                let mut a = self.alloc.lock();
                for p in pending {
                    a.alloc.free_after_sync(p);
                }
                Err(e)
            }
        }
    }

    /// Clears the write-intent marks a flush with `point` covered (the engine calls this once that
    /// flush completed on every member). Returns how many regions became clean.
    pub fn clear_intent(&self, point: u64) -> Result<u64> {
        self.check_ok()?;
        self.intent.clear(&self.db, &self.nosync, point)
    }

    /// Regions ([`INTENT_REGION`] bytes each) that may differ from the other replicas.
    pub fn dirty_regions(&self) -> Vec<u64> {
        self.intent.dirty()
    }

    /// Regions ([`INTENT_REGION`] bytes each) written or unmapped in epoch `since` or later, from
    /// region `from` on, at most `max` of them; the second value is where to continue (`None`: no
    /// more). A superset of what changed since then: the delta a replica ejected in `since` needs.
    pub fn written_since(&self, since: u64, from: u64, max: usize) -> Result<(Vec<u64>, Option<u64>)> {
        self.check_ok()?;
        let mut it = self.db.raw_iterator();
        it.seek(intent::stamp_key(from));
        let mut out = Vec::new();
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if k.len() != 9 || k[0] != keys::STAMP_TAG {
                break;
            }
            let region = u64::from_be_bytes(k[1..].try_into().unwrap_or_default());
            let epoch = u64::from_be_bytes(v.try_into().map_err(|_| StoreError::Corrupt {
                path: self.dir.clone(),
                detail: format!("written stamp of region {region}"),
            })?);
            if epoch >= since {
                if out.len() >= max {
                    return Ok((out, Some(region)));
                }
                out.push(region);
            }
            it.next();
        }
        it.status()?;
        Ok((out, None))
    }

    // ----- snapshots and size -------------------------------------------------------------

    /// Takes snapshot `name` of the head: drains IO, makes everything durable, and freezes the
    /// head's generation. O(1) in the volume's size.
    pub fn create_snapshot(&self, name: &str) -> Result<SnapshotInfo> {
        self.create_snapshot_at(name, None)
    }

    /// [`Store::create_snapshot`], recording `created_unix` as its creation time when given (a
    /// rebuild recreating another replica's snapshot keeps that snapshot's time).
    pub fn create_snapshot_at(&self, name: &str, created_unix: Option<u64>) -> Result<SnapshotInfo> {
        self.check_ok()?;
        if name.is_empty() || name.len() > MAX_SNAPSHOT_NAME {
            return Err(StoreError::InvalidArgument(format!(
                "snapshot name must be 1 to {MAX_SNAPSHOT_NAME} bytes"
            )));
        }
        let mut st = self.gate.write();
        if st.by_name.contains_key(name) {
            return Err(StoreError::SnapshotExists(name.to_owned()));
        }
        if st.snaps.len() >= MAX_SNAPSHOTS {
            return Err(StoreError::TooManySnapshots(MAX_SNAPSHOTS));
        }
        let pending = self.alloc.lock().alloc.take_pending();
        if let Err(e) = self.sync_data() {
            self.requeue(pending);
            return Err(e);
        }
        let rec = SnapshotRecord {
            name: name.to_owned(),
            generation: st.head.generation,
            size: st.head.size,
            created_unix: created_unix.unwrap_or_else(now_unix),
        };
        let head = Head { size: st.head.size, generation: st.head.generation + 1 };
        let mut b = WriteBatch::default();
        b.put(keys::snap_key(rec.generation), to_json(&rec));
        b.put(keys::HEAD, to_json(&head));
        self.map_cache.clear();
        if let Err(e) = self.db.write_opt(b, &self.sync) {
            self.requeue(pending);
            return Err(e.into());
        }
        self.release(pending);
        st.head = head;
        st.by_name.insert(rec.name.clone(), rec.generation);
        st.snaps.insert(rec.generation, rec.clone());
        info!(volume_id = %self.config.volume_id, snapshot = name, "created snapshot");
        Ok(SnapshotInfo { name: rec.name, size: rec.size, created_unix: rec.created_unix })
    }

    fn requeue(&self, pending: Vec<u64>) {
        let mut a = self.alloc.lock();
        for p in pending {
            a.alloc.free_after_sync(p);
        }
    }

    /// Snapshots, oldest first.
    pub fn list_snapshots(&self) -> Vec<SnapshotInfo> {
        self.gate
            .read()
            .snaps
            .values()
            .map(|r| SnapshotInfo { name: r.name.clone(), size: r.size, created_unix: r.created_unix })
            .collect()
    }

    /// Deletes snapshot `name` and frees every cluster no other reader sees. Returns the number of
    /// clusters freed.
    pub fn delete_snapshot(&self, name: &str) -> Result<u64> {
        self.check_ok()?;
        let mut st = self.gate.write();
        let generation = st.snapshot(name)?.generation;
        if self.pins.lock().contains_key(&generation) {
            return Err(StoreError::SnapshotBusy(name.to_owned()));
        }
        let mut readers: BTreeSet<u64> = st.snaps.keys().copied().filter(|g| *g != generation).collect();
        readers.insert(st.head.generation);
        // Only entries written after the previous live snapshot can have been seen by this one
        // alone: the scan is proportional to what the snapshot owns, not to the volume.
        let previous = st.snaps.range(..generation).next_back().map_or(0, |(g, _)| *g);
        let mut b = WriteBatch::default();
        b.delete(keys::snap_key(generation));
        let freed = self.collect_garbage(&readers, previous + 1..=generation, &mut b)?;
        let mut pending = self.alloc.lock().alloc.take_pending();
        // Data first (rule 8), then the batch that unmaps, synced, before anything is reused.
        if let Err(e) = self.sync_data() {
            self.requeue(pending);
            return Err(e);
        }
        self.map_cache.clear();
        if let Err(e) = self.db.write_opt(b, &self.sync) {
            self.requeue(pending);
            return Err(e.into());
        }
        let n = freed.len() as u64;
        pending.extend(freed);
        self.release(pending);
        st.snaps.remove(&generation);
        st.by_name.remove(name);
        info!(volume_id = %self.config.volume_id, snapshot = name, freed_clusters = n,
              "deleted snapshot");
        Ok(n)
    }

    /// Adds to `b` the deletion of every map entry that no reader in `readers` sees, and of zero
    /// entries that mask nothing, for the clusters that have an entry in `generations`; returns
    /// the physical clusters the deleted entries held.
    fn collect_garbage(
        &self,
        readers: &BTreeSet<u64>,
        generations: std::ops::RangeInclusive<u64>,
        b: &mut WriteBatch,
    ) -> Result<Vec<u64>> {
        let corrupt = |c: u64, g: u64| StoreError::Corrupt {
            path: self.dir.clone(),
            detail: format!("map entry ({c}, {g}) unreadable"),
        };
        let mut freed = Vec::new();
        let mut done: HashSet<u64> = HashSet::new();
        let mut index = self.db.raw_iterator();
        let mut map = self.db.raw_iterator();
        index.seek(keys::gen_key(*generations.start(), 0));
        while let Some(k) = index.key() {
            let Some((g, c)) = keys::parse_gen_key(k) else { break };
            if g > *generations.end() {
                break;
            }
            index.next();
            if !done.insert(c) {
                continue;
            }
            // The cluster's entries, oldest first.
            let mut group: Vec<(u64, Mapping)> = Vec::new();
            map.seek(keys::map_key(c, 0));
            while let (Some(k), Some(v)) = (map.key(), map.value()) {
                match keys::parse_map_key(k) {
                    Some((mc, mg)) if mc == c => {
                        group.push((mg, Mapping::decode(v).ok_or_else(|| corrupt(c, mg))?))
                    }
                    _ => break,
                }
                map.next();
            }
            map.status()?;
            let mut previous_is_zero = true; // "nothing before" reads as zeros too
            for i in 0..group.len() {
                let (g, m) = group[i];
                let upper = group.get(i + 1).map_or(u64::MAX, |e| e.0);
                if readers.range(g..upper).next().is_none() {
                    keys::delete_map(b, c, g);
                    if let Mapping::Phys(p) = m {
                        freed.push(p);
                    }
                } else if m == Mapping::Zero && previous_is_zero {
                    keys::delete_map(b, c, g);
                } else {
                    previous_is_zero = m == Mapping::Zero;
                }
            }
        }
        index.status()?;
        Ok(freed)
    }

    /// Grows the volume to `new_size` (a multiple of the block size). Shrinking is refused.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.check_ok()?;
        if !new_size.is_multiple_of(BLOCK_SIZE) {
            return Err(StoreError::InvalidArgument(format!(
                "size {new_size} must be a multiple of {BLOCK_SIZE}"
            )));
        }
        let mut st = self.gate.write();
        if new_size < st.head.size {
            return Err(StoreError::Shrink { size: st.head.size, requested: new_size });
        }
        if new_size == st.head.size {
            return Ok(());
        }
        let head = Head { size: new_size, generation: st.head.generation };
        let mut b = WriteBatch::default();
        b.put(keys::HEAD, to_json(&head));
        self.map_cache.clear();
        self.db.write_opt(b, &self.sync)?;
        info!(volume_id = %self.config.volume_id, from = st.head.size, to = new_size, "resized");
        st.head = head;
        Ok(())
    }

    // ----- epochs -------------------------------------------------------------------------

    /// The highest epoch accepted so far and its engine.
    pub fn epoch(&self) -> (u64, Option<Uuid>) {
        let e = self.epoch.lock();
        (e.epoch, e.engine_id)
    }

    /// Raises the replica's epoch to `epoch` for `engine`, durably (synced) before returning.
    /// An older epoch is `StaleEpoch`; the same epoch from another engine is `EpochConflict`.
    pub fn fence(&self, epoch: u64, engine: Uuid) -> Result<FenceOutcome> {
        self.check_ok()?;
        let mut e = self.epoch.lock();
        if epoch < e.epoch {
            return Err(StoreError::StaleEpoch { epoch, current: e.epoch });
        }
        if epoch == e.epoch {
            return match e.engine_id {
                Some(holder) if holder == engine => Ok(FenceOutcome::AlreadyHeld),
                Some(holder) => Err(StoreError::EpochConflict { epoch, holder }),
                None if epoch == 0 => Err(StoreError::StaleEpoch { epoch, current: 0 }),
                None => Err(StoreError::Corrupt {
                    path: self.dir.clone(),
                    detail: format!("epoch {epoch} recorded without an engine"),
                }),
            };
        }
        let rec = EpochRecord { epoch, engine_id: Some(engine) };
        let mut b = WriteBatch::default();
        b.put(keys::EPOCH, to_json(&rec));
        self.db.write_opt(b, &self.sync)?;
        let previous = e.epoch;
        *e = rec;
        self.intent.set_epoch(epoch);
        info!(volume_id = %self.config.volume_id, epoch, previous, engine = %engine, "fenced");
        Ok(FenceOutcome::Raised { previous })
    }

    // ----- inspection, streaming and clones -----------------------------------------------

    /// RocksDB's latest sequence number: it moves with every metadata write, so tests and
    /// diagnostics can tell whether an operation wrote metadata.
    pub fn metadata_sequence(&self) -> u64 {
        self.db.latest_sequence_number()
    }

    pub fn stat(&self) -> Result<StoreStat> {
        let st = self.gate.read();
        let allocated = (self.alloc.lock().alloc.used_count() - self.reserved_clusters) << self.cluster_shift;
        let disk = if self.on_device {
            allocated
        } else {
            self.data.metadata().map_err(StoreError::io("stat data file"))?.blocks() * 512
        };
        let (epoch, engine_id) = self.epoch();
        Ok(StoreStat {
            volume_id: self.config.volume_id.clone(),
            store_id: self.config.store_id,
            size: st.head.size,
            cluster_size: self.config.cluster_size,
            allocated_bytes: allocated,
            disk_bytes: disk,
            snapshots: u32::try_from(st.snaps.len()).unwrap_or(u32::MAX),
            epoch,
            engine_id,
            dirty_regions: self.intent.dirty().len() as u64,
            failure: self.failure.lock().clone(),
            data_device: self.config.data_device.clone(),
            checksums: self.sums.enabled(),
            checksum_errors: self.checksum_errors.load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Calls `visit(cluster, physical)` for every allocated cluster a reader at `reader` sees,
    /// in logical order, streaming over the map (memory stays bounded).
    /// Starts at logical cluster `from`; stops early when `visit` returns false.
    fn visit_visible(
        &self,
        reader: u64,
        from: u64,
        mut visit: impl FnMut(u64, u64) -> Result<bool>,
    ) -> Result<()> {
        let mut it = self.db.raw_iterator();
        it.seek(keys::map_key(from, 0));
        let mut best: Option<(u64, Mapping)> = None;
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let Some((c, g)) = keys::parse_map_key(k) else { break };
            if let Some((bc, m)) = best
                && bc != c
            {
                if let Mapping::Phys(p) = m
                    && !visit(bc, p)?
                {
                    return Ok(());
                }
                best = None;
            }
            if g <= reader {
                let m = Mapping::decode(v).ok_or_else(|| StoreError::Corrupt {
                    path: self.dir.clone(),
                    detail: format!("map entry ({c}, {g}) unreadable"),
                })?;
                best = Some((c, m));
            }
            it.next();
        }
        it.status()?;
        if let Some((bc, Mapping::Phys(p))) = best {
            visit(bc, p)?;
        }
        Ok(())
    }

    /// Allocated extents of the head (`None`) or of a snapshot, merged into runs, starting at
    /// byte `from` (rounded down to its cluster), at most `max` of them: call again from the end
    /// of the last one for more (memory stays bounded). Everything outside them reads as zeros.
    pub fn allocated_extents(&self, snapshot: Option<&str>, from: u64, max: usize) -> Result<Vec<Extent>> {
        let st = self.gate.read();
        let (reader, size) = match snapshot {
            Some(name) => st.snapshot(name).map(|s| (s.generation, s.size))?,
            None => (st.head.generation, st.head.size),
        };
        let cs = self.config.cluster_size;
        let mut out: Vec<Extent> = Vec::new();
        self.visit_visible(reader, from >> self.cluster_shift, |c, _| {
            let offset = c * cs;
            let len = cs.min(size.saturating_sub(offset));
            let full = out.len() >= max;
            match out.last_mut() {
                Some(last) if last.offset + last.len == offset => last.len += len,
                _ if full => return Ok(false),
                _ => out.push(Extent { offset, len }),
            }
            Ok(true)
        })?;
        Ok(out)
    }

    /// Creates a new store in `target` holding the contents of snapshot `name`, sharing the
    /// snapshot's extents (FICLONERANGE) where the filesystem can, copying in the kernel where it
    /// cannot. `progress(done, total)` is called in bytes as clusters land. The target is closed
    /// on return; while the clone runs, it is marked incomplete and refuses to open.
    pub fn clone_snapshot(
        &self,
        name: &str,
        target: &Path,
        volume_id: &str,
        progress: impl FnMut(u64, u64),
    ) -> Result<CloneReport> {
        self.check_ok()?;
        let snap = {
            let st = self.gate.read();
            let snap = st.snapshot(name)?.clone();
            // The pin keeps the snapshot, and so its clusters, alive without holding the gate (which
            // would stall snapshots and resizes, and through them IO, for the whole copy).
            *self.pins.lock().entry(snap.generation).or_insert(0) += 1;
            snap
        };
        let unpin = || {
            let mut pins = self.pins.lock();
            if let Some(n) = pins.get_mut(&snap.generation) {
                *n -= 1;
                if *n == 0 {
                    pins.remove(&snap.generation);
                }
            }
        };
        let opts = CreateOptions {
            volume_id: volume_id.to_owned(),
            size: snap.size,
            cluster_size: self.config.cluster_size,
            data_device: None,
            checksums: self.config.checksums,
        };
        let dst = match Store::create_inner(target, &opts, true) {
            Ok(d) => d,
            Err(e) => {
                unpin();
                return Err(e);
            }
        };
        let res = self.fill_clone(&snap, &dst, progress);
        unpin();
        drop(dst);
        match res {
            Ok(report) => {
                info!(volume_id = %self.config.volume_id, snapshot = name, clone_volume_id = volume_id,
                      clusters = report.clusters, mode = ?report.mode, "cloned snapshot");
                debug!(target = %target.display(), "clone written");
                Ok(report)
            }
            Err(e) => {
                warn!(volume_id = %self.config.volume_id, snapshot = name, error = %e,
                      "clone failed; removing the partial target");
                if let Err(d) = Store::destroy(target) {
                    warn!(volume_id = %self.config.volume_id, error = %d, "could not remove a failed clone");
                }
                Err(e)
            }
        }
    }

    fn fill_clone(
        &self,
        snap: &SnapshotRecord,
        dst: &Store,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<CloneReport> {
        let cs = self.config.cluster_size;
        let mut total = 0u64;
        self.visit_visible(snap.generation, 0, |_, _| {
            total += 1;
            Ok(true)
        })?;
        dst.data.set_len(total * cs).map_err(StoreError::io("size clone data file"))?;
        let mut all_reflink = true;
        let mut done = 0u64;
        // A run: (first logical cluster, first source physical, first target physical, count).
        let mut run: Option<(u64, u64, u64, u64)> = None;
        let mut batch = WriteBatch::default();
        let mut in_batch = 0u64;
        let mut copy_run = |run: (u64, u64, u64, u64), batch: &mut WriteBatch| -> Result<()> {
            let (c0, p0, t0, n) = run;
            if !all_reflink {
                // Copying: keep the target filesystem's reserve free.
                let (free, size) = sys::free_space(&dst.dir).map_err(StoreError::io("statvfs"))?;
                if free < n * cs + reserve_for(size) {
                    return Err(StoreError::io("clone snapshot data")(io::Error::from_raw_os_error(
                        libc::ENOSPC,
                    )));
                }
            }
            let mode = sys::clone_or_copy(&self.data, p0 * cs, &dst.data, t0 * cs, n * cs, all_reflink)
                .map_err(StoreError::io("clone snapshot data"))?;
            all_reflink &= mode == CopyMode::Reflink;
            self.sums.copy_to(p0, &dst.sums, t0, n).map_err(StoreError::io("copy checksums"))?;
            for i in 0..n {
                keys::put_map(batch, c0 + i, 1, Mapping::Phys(t0 + i));
            }
            done += n;
            progress(done * cs, total * cs);
            Ok(())
        };
        let mut next_target = 0u64;
        self.visit_visible(snap.generation, 0, |c, p| {
            let t = next_target;
            next_target += 1;
            run = match run {
                Some((c0, p0, t0, n)) if c0 + n == c && p0 + n == p && n < MAX_CLONE_RUN => {
                    Some((c0, p0, t0, n + 1))
                }
                Some(r) => {
                    copy_run(r, &mut batch)?;
                    in_batch += r.3;
                    Some((c, p, t, 1))
                }
                None => Some((c, p, t, 1)),
            };
            if in_batch >= 4096 {
                // Data durable before the mappings that point at it.
                dst.sync_data()?;
                dst.db.write_opt(std::mem::take(&mut batch), &dst.nosync)?;
                in_batch = 0;
            }
            Ok(true)
        })?;
        if let Some(r) = run {
            copy_run(r, &mut batch)?;
        }
        if total == 0 {
            progress(0, 0);
        }
        dst.sync_data()?;
        batch.delete(CLONE_MARKER);
        dst.db.write_opt(batch, &dst.sync)?;
        let mode = if all_reflink { CopyMode::Reflink } else { CopyMode::Copy };
        Ok(CloneReport { clusters: total, bytes: total * cs, mode })
    }
}
