//! The chaos suite: a 3-replica volume served over NBD while random faults hit it, and an
//! acknowledged-write checker of our own that says whether any acknowledged write was lost.
//!
//! **The checker.** Writers own disjoint blocks. Each 4 KiB block written carries a record: a
//! magic, the writer, the block's own index, the writer's sequence number and a CRC32C of the
//! rest, whose filler bytes are derived from those three numbers, so a record can only be the
//! whole of one write of one writer to that very block. The ledger keeps, per block, the newest
//! sequence number acknowledged (the *floor*) and the newest issued. A block is right when it
//! holds a record of its owner with a sequence number between the two (or zeros when nothing
//! was acknowledged). A FLUSH acknowledged makes the floors it covers *durable*; after a crash
//! of every process only those are owed, so the floors drop to them. Writers read back their
//! own blocks as they go (one writer per block, one request in flight per writer: the read must
//! show what the ledger allows), and at the end every block is read through the engine and
//! then from each replica directly: each replica alone must hold every acknowledged write.
//!
//! **The faults** (one at a time, the volume back to three in-sync replicas before the next):
//! a replica SIGKILLed and restarted, a replica SIGSTOPped beyond the engine's replica timeout,
//! the engine SIGKILLed and restarted, the network between the engine and one replica cut (a
//! veth link between network namespaces taken down) beyond the timeout, ENOSPC and EIO bursts on
//! one replica's disk (its injected disk faults), and every process SIGKILLed at once.
//!
//! The engine and each replica run in network namespaces of their own; the checker talks NBD
//! to the engine over a unix socket with a minimal client of its own (one connection per
//! writer, one request at a time: an acknowledgement is exactly one reply, never a retry).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use barnacle_nbd_proto as nbd;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::netns::{Link, Net, in_netns};
use crate::{EngineProcess, ReplicaProcess, run_ok};

pub const BLOCK: usize = 4096;
const BLOCK_U32: u32 = 4096;
const MAGIC: &[u8; 8] = b"BNCHAOS1";
const VOL: &str = "vol-chaos";
const TOKEN: &str = "chaos-token";
/// Blocks each writer owns.
const BLOCKS_PER_WRITER: u64 = 512;
/// Blocks of one extent write (64 KiB: usually across two clusters).
const EXTENT: u64 = 16;
/// A request unanswered this long is a liveness failure.
const REQUEST_PATIENCE: Duration = Duration::from_secs(90);
/// The engine's replica timeout: a stop or partition lasts longer than this.
const REPLICA_TIMEOUT_MS: u64 = 2000;

// ---------------------------------------------------------------------------------------------
// Records

/// The record a writer puts in `block` with sequence number `seq`.
pub fn record(writer: u32, block: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[..8].copy_from_slice(MAGIC);
    b[8..12].copy_from_slice(&writer.to_le_bytes());
    b[12..20].copy_from_slice(&block.to_le_bytes());
    b[20..28].copy_from_slice(&seq.to_le_bytes());
    // Filler from a xorshift generator seeded by the record's identity.
    let mut x =
        ((u64::from(writer) << 48) ^ block.rotate_left(24) ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
    for chunk in b[32..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let crc = record_crc(&b);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    b
}

fn record_crc(b: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&b[..28]), &b[32..])
}

/// What a block holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Zeros,
    Record {
        writer: u32,
        block: u64,
        seq: u64,
    },
    /// Neither zeros nor a whole record (torn, corrupt or foreign), described.
    Garbage(String),
}

pub fn parse(b: &[u8]) -> Seen {
    if b.iter().all(|x| *x == 0) {
        return Seen::Zeros;
    }
    if b.len() != BLOCK || &b[..8] != MAGIC {
        return Seen::Garbage(format!("no record magic (first bytes {:02x?})", &b[..8.min(b.len())]));
    }
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or_default());
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
    let (writer, block, seq) = (u32_at(8), u64_at(12), u64_at(20));
    if u32_at(28) != record_crc(b) || record(writer, block, seq) != b {
        return Seen::Garbage(format!("a damaged record (writer {writer}, block {block}, seq {seq})"));
    }
    Seen::Record { writer, block, seq }
}

// ---------------------------------------------------------------------------------------------
// The ledger

#[derive(Debug, Clone, Copy, Default)]
struct BlockState {
    /// The newest sequence number acknowledged (0: none).
    floor: u64,
    /// The newest issued.
    issued: u64,
    /// The newest acknowledged before an acknowledged FLUSH.
    durable: u64,
}

/// What must be where: per block, the window of records it may hold.
#[derive(Debug)]
pub struct Ledger {
    blocks: Mutex<Vec<BlockState>>,
    /// Bumped by a crash of every process: an acknowledgement or flush that started before it
    /// and completed after it is not counted (its reply may have come from the dead).
    generation: AtomicU64,
}

impl Ledger {
    pub fn new(blocks: u64) -> Ledger {
        Ledger {
            blocks: Mutex::new(vec![BlockState::default(); usize::try_from(blocks).unwrap()]),
            generation: AtomicU64::new(0),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    pub fn owner(block: u64) -> u32 {
        u32::try_from(block / BLOCKS_PER_WRITER).unwrap()
    }

    fn issue(&self, first: u64, n: u64, seq: u64) {
        let mut b = self.blocks.lock();
        for i in first..first + n {
            b[usize::try_from(i).unwrap()].issued = seq;
        }
    }

    fn ack(&self, first: u64, n: u64, seq: u64, generation: u64) {
        let mut b = self.blocks.lock();
        if self.generation() != generation {
            return;
        }
        for i in first..first + n {
            let s = &mut b[usize::try_from(i).unwrap()];
            s.floor = s.floor.max(seq);
        }
    }

    /// The floors now, for a FLUSH about to be sent.
    fn floors(&self) -> Vec<u64> {
        self.blocks.lock().iter().map(|s| s.floor).collect()
    }

    fn flushed(&self, floors: &[u64], generation: u64) {
        let mut b = self.blocks.lock();
        if self.generation() != generation {
            return;
        }
        for (s, f) in b.iter_mut().zip(floors) {
            s.durable = s.durable.max(*f);
        }
    }

    /// Every process crashed: only what a FLUSH made durable is owed.
    pub fn crashed(&self) {
        let mut b = self.blocks.lock();
        self.generation.fetch_add(1, Ordering::SeqCst);
        for s in b.iter_mut() {
            s.floor = s.durable;
        }
    }

    /// Whether `content` is allowed in `block`; a description of the violation if not.
    pub fn check(&self, block: u64, content: &[u8]) -> Result<(), String> {
        let s = self.blocks.lock()[usize::try_from(block).unwrap()];
        let owner = Self::owner(block);
        match parse(content) {
            Seen::Zeros if s.floor == 0 => Ok(()),
            Seen::Zeros => Err(format!("block {block}: zeros, but seq {} was acknowledged", s.floor)),
            Seen::Record { writer, block: b, seq }
                if writer == owner && b == block && seq >= s.floor && seq <= s.issued =>
            {
                Ok(())
            }
            Seen::Record { writer, block: b, seq } => Err(format!(
                "block {block}: a record of writer {writer} for block {b} with seq {seq}; allowed: writer \
                 {owner}, seq {}..={}",
                s.floor, s.issued
            )),
            Seen::Garbage(what) => Err(format!("block {block}: {what}")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal NBD client: one request at a time, no retries.

#[derive(Debug)]
enum NbdError {
    /// The connection broke or timed out: the request may or may not have been applied.
    Connection(String),
    /// The server answered with this errno.
    Errno(u32),
}

impl NbdError {
    /// A name for the report's error counts.
    fn kind(&self) -> String {
        match self {
            NbdError::Connection(_) => "connection lost".to_owned(),
            NbdError::Errno(nbd::EIO) => "EIO".to_owned(),
            NbdError::Errno(nbd::ENOSPC) => "ENOSPC".to_owned(),
            NbdError::Errno(nbd::ESHUTDOWN) => "ESHUTDOWN".to_owned(),
            NbdError::Errno(e) => format!("errno {e}"),
        }
    }
}

struct Nbd {
    s: UnixStream,
    cookie: u64,
}

impl Nbd {
    async fn connect(socket: &Path) -> Result<Nbd, String> {
        let fut = async {
            let mut s = UnixStream::connect(socket).await.map_err(|e| e.to_string())?;
            let mut hello = [0u8; 18];
            s.read_exact(&mut hello).await.map_err(|e| e.to_string())?;
            if hello[..8] != nbd::NBD_MAGIC.to_be_bytes() || hello[8..16] != nbd::IHAVEOPT.to_be_bytes() {
                return Err("not a newstyle NBD server".to_owned());
            }
            let flags = nbd::CLIENT_FIXED_NEWSTYLE | nbd::CLIENT_NO_ZEROES;
            s.write_all(&flags.to_be_bytes()).await.map_err(|e| e.to_string())?;
            let go = nbd::encode_info_request(VOL, &[]).unwrap();
            s.write_all(&nbd::encode_option(nbd::OPT_GO, &go)).await.map_err(|e| e.to_string())?;
            loop {
                let mut h = [0u8; 20];
                s.read_exact(&mut h).await.map_err(|e| e.to_string())?;
                let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
                let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
                let mut data = vec![0u8; len as usize];
                s.read_exact(&mut data).await.map_err(|e| e.to_string())?;
                if kind == nbd::REP_ACK {
                    return Ok(Nbd { s, cookie: 0 });
                }
                if kind & (1 << 31) != 0 {
                    return Err(format!("OPT_GO refused ({kind:#x}): {}", String::from_utf8_lossy(&data)));
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), fut)
            .await
            .map_err(|_| "handshake timed out".to_owned())?
    }

    async fn call(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<&[u8]>,
    ) -> Result<Vec<u8>, NbdError> {
        self.cookie += 1;
        let cookie = self.cookie;
        let fut = async {
            let head = nbd::encode_request(&nbd::RequestHeader { flags, command, cookie, offset, length });
            let mut msg = head.to_vec();
            if let Some(p) = payload {
                msg.extend_from_slice(p);
            }
            self.s.write_all(&msg).await?;
            let mut reply = [0u8; nbd::SIMPLE_REPLY_LEN];
            self.s.read_exact(&mut reply).await?;
            let (errno, got) =
                nbd::parse_simple_reply(&reply).map_err(|e| std::io::Error::other(format!("{e:?}")))?;
            if got != cookie {
                return Err(std::io::Error::other(format!("reply for cookie {got}, expected {cookie}")));
            }
            let mut data = Vec::new();
            if errno == 0 && command == nbd::CMD_READ {
                data.resize(length as usize, 0);
                self.s.read_exact(&mut data).await?;
            }
            Ok((errno, data))
        };
        match tokio::time::timeout(REQUEST_PATIENCE, fut).await {
            Err(_) => Err(NbdError::Connection(format!("no reply within {REQUEST_PATIENCE:?}"))),
            Ok(Err(e)) => Err(NbdError::Connection(e.to_string())),
            Ok(Ok((0, data))) => Ok(data),
            Ok(Ok((errno, _))) => Err(NbdError::Errno(errno)),
        }
    }
}

/// A connection that is opened again when it broke.
struct Conn {
    socket: PathBuf,
    nbd: Option<Nbd>,
    stats: Arc<Stats>,
}

impl Conn {
    /// Sends one request on a live connection (reconnecting first if needed). A broken
    /// connection fails the request; the next call reconnects.
    async fn call(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<&[u8]>,
    ) -> Result<Vec<u8>, NbdError> {
        if self.nbd.is_none() {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                match Nbd::connect(&self.socket).await {
                    Ok(n) => {
                        self.nbd = Some(n);
                        self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Err(e) if Instant::now() > deadline => {
                        self.stats.violation(format!("the export stayed unreachable for 120 s: {e}"));
                        return Err(NbdError::Connection(e));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        let n = self.nbd.as_mut().unwrap();
        let r = n.call(command, flags, offset, length, payload).await;
        if let Err(NbdError::Connection(e)) = &r {
            if e.starts_with("no reply") {
                self.stats.violation(format!("a request at offset {offset} had {e}"));
            }
            self.nbd = None;
        }
        r
    }
}

// ---------------------------------------------------------------------------------------------
// Load

/// Counters of a run.
#[derive(Debug, Default)]
pub struct Stats {
    pub writes_issued: AtomicU64,
    pub writes_acked: AtomicU64,
    pub writes_failed: AtomicU64,
    pub reads_checked: AtomicU64,
    pub reads_failed: AtomicU64,
    pub flushes_acked: AtomicU64,
    pub reconnects: AtomicU64,
    /// Failed writes by error.
    pub errors: Mutex<BTreeMap<String, u64>>,
    pub violations: Mutex<Vec<String>>,
}

impl Stats {
    fn violation(&self, what: String) {
        say(&format!("VIOLATION: {what}"));
        self.violations.lock().push(what);
    }
}

fn say(line: &str) {
    eprintln!("[chaos {:>8.1}s] {line}", START.elapsed().as_secs_f64());
}

static START: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

struct Load {
    ledger: Arc<Ledger>,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What the writers and the flusher share.
struct Shared {
    socket: PathBuf,
    ledger: Arc<Ledger>,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    seed: u64,
}

/// One writer: QD1 over its own connection; `extent` blocks per write; `fua` on every write.
async fn writer(id: u32, extent: u64, fua: bool, shared: Arc<Shared>) {
    let Shared { socket, ledger, stats, stop, seed } = &*shared;
    let (socket, seed) = (socket.clone(), *seed);
    let mut rng = StdRng::seed_from_u64(seed ^ u64::from(id));
    let mut conn = Conn { socket, nbd: None, stats: stats.clone() };
    let first = u64::from(id) * BLOCKS_PER_WRITER;
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let block = first + rng.random_range(0..=BLOCKS_PER_WRITER - extent);
        seq += 1;
        let mut data = Vec::with_capacity(BLOCK * usize::try_from(extent).unwrap());
        for b in block..block + extent {
            data.extend_from_slice(&record(id, b, seq));
        }
        let generation = ledger.generation();
        ledger.issue(block, extent, seq);
        stats.writes_issued.fetch_add(1, Ordering::Relaxed);
        let flags = if fua { nbd::CMD_FLAG_FUA } else { 0 };
        let len = u32::try_from(data.len()).unwrap();
        match conn.call(nbd::CMD_WRITE, flags, block * BLOCK as u64, len, Some(&data)).await {
            Ok(_) => {
                ledger.ack(block, extent, seq, generation);
                stats.writes_acked.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                stats.writes_failed.fetch_add(1, Ordering::Relaxed);
                *stats.errors.lock().entry(e.kind()).or_default() += 1;
                // The volume may be down for a moment (every process killed): do not spin.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // Read one of its own blocks back now and then: nobody else writes it, so it must hold
        // a record the ledger allows.
        if seq.is_multiple_of(4) {
            let b = first + rng.random_range(0..BLOCKS_PER_WRITER);
            if let Ok(data) = conn.call(nbd::CMD_READ, 0, b * BLOCK as u64, BLOCK_U32, None).await {
                stats.reads_checked.fetch_add(1, Ordering::Relaxed);
                if let Err(v) = ledger.check(b, &data) {
                    stats.violation(format!("read back during the run: {v}"));
                }
            } else {
                stats.reads_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Sends FLUSH every 100–300 ms; each one acknowledged makes the floors before it durable.
async fn flusher(shared: Arc<Shared>) {
    let Shared { socket, ledger, stats, stop, seed } = &*shared;
    let (socket, seed) = (socket.clone(), *seed);
    let mut rng = StdRng::seed_from_u64(seed ^ 0xf1);
    let mut conn = Conn { socket, nbd: None, stats: stats.clone() };
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..300))).await;
        let generation = ledger.generation();
        let floors = ledger.floors();
        if conn.call(nbd::CMD_FLUSH, 0, 0, 0, None).await.is_ok() {
            ledger.flushed(&floors, generation);
            stats.flushes_acked.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Load {
    /// Six writers of single blocks (one of them FUA) and two of 64 KiB extents, and a flusher.
    fn start(socket: &Path, seed: u64) -> Load {
        let ledger = Arc::new(Ledger::new(WRITERS * BLOCKS_PER_WRITER));
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            socket: socket.to_owned(),
            ledger: ledger.clone(),
            stats: stats.clone(),
            stop: stop.clone(),
            seed,
        });
        let mut tasks = Vec::new();
        for id in 0..u32::try_from(WRITERS).unwrap() {
            let extent = if id >= 6 { EXTENT } else { 1 };
            tasks.push(tokio::spawn(writer(id, extent, id == 1, shared.clone())));
        }
        tasks.push(tokio::spawn(flusher(shared)));
        Load { ledger, stats, stop, tasks }
    }

    async fn stop(self) -> (Arc<Ledger>, Arc<Stats>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        (self.ledger, self.stats)
    }
}

const WRITERS: u64 = 8;

// ---------------------------------------------------------------------------------------------
// The volume and its faults

/// The kinds of fault, in the order a round goes through them (shuffled per round).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    ReplicaKill,
    ReplicaStop,
    EngineKill,
    Partition,
    DiskFull,
    DiskErrors,
    KillAll,
}

impl Fault {
    pub const ALL: [Fault; 7] = [
        Fault::ReplicaKill,
        Fault::ReplicaStop,
        Fault::EngineKill,
        Fault::Partition,
        Fault::DiskFull,
        Fault::DiskErrors,
        Fault::KillAll,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::ReplicaKill => "replica SIGKILL + restart",
            Fault::ReplicaStop => "replica SIGSTOP beyond the timeout",
            Fault::EngineKill => "engine SIGKILL + restart",
            Fault::Partition => "network partition engine-replica",
            Fault::DiskFull => "ENOSPC burst on a replica disk",
            Fault::DiskErrors => "EIO burst on a replica disk",
            Fault::KillAll => "every process SIGKILLed",
        }
    }
}

struct Volume {
    net: Net,
    /// Holds the stores, logs and sockets until the volume is dropped.
    _root: tempfile::TempDir,
    token: PathBuf,
    log: PathBuf,
    engine_ns: String,
    links: Vec<Link>,
    replicas: Vec<ReplicaProcess>,
    replica_ns: Vec<String>,
    engine: Option<EngineProcess>,
    state: PathBuf,
    socket: PathBuf,
}

fn engine_args(socket: &Path) -> Vec<String> {
    [
        "--nbd-socket",
        &socket.display().to_string(),
        "--replica-timeout-ms",
        &REPLICA_TIMEOUT_MS.to_string(),
        "--heartbeat-ms",
        "250",
        "--rebuild-retry-ms",
        "500",
        "--rebuild-mib-per-sec",
        "0",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

impl Volume {
    fn start() -> Volume {
        let mut net = Net::new('c', 81);
        let root = tempfile::tempdir().unwrap();
        let token = root.path().join("token");
        std::fs::write(&token, TOKEN).unwrap();
        let log = root.path().join("log");
        let engine_ns = net.ns("E");
        let replica_ns: Vec<String> = (0..3).map(|i| net.ns(&format!("R{i}"))).collect();
        let serve: Vec<String> = (0..3).map(|i| format!("10.82.0.{}", 10 + i)).collect();
        let mut links = Vec::new();
        for (i, ns) in replica_ns.iter().enumerate() {
            run_ok("ip", &["-n", ns, "addr", "add", &format!("{}/32", serve[i]), "dev", "lo"]);
            links.push(net.link(ns, &engine_ns, u8::try_from(i + 1).unwrap(), &[&serve[i]], &[]));
        }
        let replicas = (0..3)
            .map(|i| {
                ReplicaProcess::start_in_netns(
                    &replica_ns[i],
                    &root.path().join(format!("r{i}")),
                    VOL,
                    &token,
                    Some("64MiB"),
                    &log,
                    format!("{}:7400", serve[i]).parse().unwrap(),
                    &["--fault-injection"],
                )
            })
            .collect();
        let state = root.path().join("authority");
        let socket = root.path().join("nbd.sock");
        let mut v = Volume {
            net,
            _root: root,
            token,
            log,
            engine_ns,
            links,
            replicas,
            replica_ns,
            engine: None,
            state,
            socket,
        };
        v.start_engine();
        v
    }

    fn ids(&self) -> Vec<(String, SocketAddr)> {
        self.replicas.iter().enumerate().map(|(i, r)| (format!("r{i}"), r.data)).collect()
    }

    fn start_engine(&mut self) {
        let args = engine_args(&self.socket);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.engine = Some(EngineProcess::start_in(
            Some(&self.engine_ns),
            VOL,
            &self.token,
            &self.ids(),
            &self.state,
            &args,
            &self.log,
        ));
    }

    fn membership(&self) -> serde_json::Value {
        let body = std::fs::read_to_string(self.state.join("membership.json")).unwrap_or_default();
        serde_json::from_str::<serde_json::Value>(&body).map(|v| v["membership"].clone()).unwrap_or_default()
    }

    /// Waits until every replica is in sync again; an error naming the states if not in time.
    async fn wait_in_sync(&self, patience: Duration) -> Result<Duration, String> {
        let t = Instant::now();
        loop {
            let m = self.membership();
            let states: Vec<String> = m["replicas"]
                .as_array()
                .map(|a| a.iter().map(|r| r["state"].as_str().unwrap_or("?").to_owned()).collect())
                .unwrap_or_default();
            if states.len() == 3 && states.iter().all(|s| s == "healthy") {
                return Ok(t.elapsed());
            }
            if t.elapsed() > patience {
                return Err(format!("replicas not back in sync within {patience:?}: {states:?}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn inject(&self, replica: usize, faults: Vec<barnacle_replica::mgmt::pb::Fault>) {
        let mgmt = self.replicas[replica].mgmt;
        let ns = self.replica_ns[replica].clone();
        let call = move || async move {
            use barnacle_replica::mgmt::pb::{
                InjectFaultsRequest, replica_manager_client::ReplicaManagerClient,
            };
            let mut c = ReplicaManagerClient::connect(format!("http://{mgmt}")).await.unwrap();
            let mut req = tonic::Request::new(InjectFaultsRequest { faults });
            req.metadata_mut().insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
            c.inject_faults(req).await.unwrap();
        };
        tokio::task::block_in_place(|| in_netns(&ns, call));
    }

    /// Inflicts `fault` (on replica `r` where it takes one) and undoes it; returns once the
    /// processes run again (the rebuild may still be going).
    async fn inflict(&mut self, fault: Fault, r: usize, rng: &mut StdRng, ledger: &Ledger) {
        let beyond_timeout = Duration::from_millis(REPLICA_TIMEOUT_MS + rng.random_range(500..2000));
        match fault {
            Fault::ReplicaKill => {
                self.replicas[r].kill();
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..2000))).await;
                tokio::task::block_in_place(|| self.replicas[r].restart());
            }
            Fault::ReplicaStop => {
                let pid = nix::unistd::Pid::from_raw(i32::try_from(self.replicas[r].child.id()).unwrap());
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
                tokio::time::sleep(beyond_timeout).await;
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
            }
            Fault::EngineKill => {
                self.engine.as_mut().unwrap().kill();
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..1000))).await;
                tokio::task::block_in_place(|| self.start_engine());
            }
            Fault::Partition => {
                self.net.cut(&self.links[r]);
                tokio::time::sleep(beyond_timeout).await;
                self.net.heal(&self.links[r]);
            }
            Fault::DiskFull | Fault::DiskErrors => {
                let error = if fault == Fault::DiskFull { "enospc" } else { "eio" };
                let ms = rng.random_range(500..3000);
                let f = |op: &str| barnacle_replica::mgmt::pb::Fault {
                    op: op.into(),
                    error: error.into(),
                    offset: 0,
                    length: 0,
                    count: 0,
                    duration_ms: ms,
                };
                let faults =
                    if fault == Fault::DiskFull { vec![f("write")] } else { vec![f("write"), f("read")] };
                self.inject(r, faults).await;
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            Fault::KillAll => {
                self.engine.as_mut().unwrap().kill();
                for rep in &mut self.replicas {
                    rep.kill();
                }
                ledger.crashed();
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..1000))).await;
                tokio::task::block_in_place(|| {
                    for rep in &mut self.replicas {
                        rep.restart();
                    }
                    self.start_engine();
                });
            }
        }
    }

    /// Reads the first `len` bytes through a fresh NBD connection.
    async fn read_export(&self, len: u64) -> Vec<u8> {
        let mut conn = Nbd::connect(&self.socket).await.unwrap();
        let mut out = Vec::new();
        for off in (0..len).step_by(1 << 20) {
            let n = u32::try_from((len - off).min(1 << 20)).unwrap();
            out.extend(
                conn.call(nbd::CMD_READ, 0, off, n, None).await.map_err(|e| format!("{e:?}")).unwrap(),
            );
        }
        out
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        if let Some(mut e) = self.engine.take() {
            e.kill();
        }
        for r in &mut self.replicas {
            // A stopped process cannot die until it is continued.
            let pid = nix::unistd::Pid::from_raw(i32::try_from(r.child.id()).unwrap());
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
            r.kill();
        }
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- last lines of the processes' log ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A run

/// What a run did.
#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    pub faults: BTreeMap<&'static str, u64>,
    pub writes_issued: u64,
    pub writes_acked: u64,
    pub writes_failed: u64,
    pub reads_checked: u64,
    pub flushes_acked: u64,
    pub reconnects: u64,
    pub write_errors: BTreeMap<String, u64>,
    /// Blocks checked at the end (through the engine, then on each replica).
    pub blocks_checked: u64,
    pub violations: Vec<String>,
    pub seconds: f64,
    /// The longest wait for the replicas to be in sync again after a fault.
    pub longest_recovery_s: f64,
}

impl Report {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "seed": self.seed,
            "faults": self.faults,
            "faults_total": self.faults.values().sum::<u64>(),
            "writes_issued": self.writes_issued,
            "writes_acked": self.writes_acked,
            "writes_failed": self.writes_failed,
            "reads_checked": self.reads_checked,
            "flushes_acked": self.flushes_acked,
            "reconnects": self.reconnects,
            "write_errors": self.write_errors,
            "blocks_checked": self.blocks_checked,
            "violations": self.violations.len(),
            "violation_list": self.violations.iter().take(20).collect::<Vec<_>>(),
            "seconds": self.seconds,
            "longest_recovery_s": self.longest_recovery_s,
        })
    }
}

/// Runs `faults` faults against a fresh volume under load, then checks every block.
pub async fn run(faults: usize, seed: u64) -> Report {
    let started = Instant::now();
    std::sync::LazyLock::force(&START);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut vol = Volume::start();
    let load = Load::start(&vol.socket, seed);
    let mut counts: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut longest = Duration::ZERO;
    let mut order = Vec::new();
    let mut failure = None;
    for n in 0..faults {
        if order.is_empty() {
            order = Fault::ALL.to_vec();
            // Shuffled per round, so every kind comes once per seven faults.
            for i in (1..order.len()).rev() {
                order.swap(i, rng.random_range(0..=i));
            }
        }
        let fault = order.pop().unwrap();
        let r = rng.random_range(0..3);
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
        let target = match fault {
            Fault::EngineKill | Fault::KillAll => String::new(),
            _ => format!(" (replica r{r})"),
        };
        say(&format!("fault {}/{faults}: {}{target}", n + 1, fault.name()));
        vol.inflict(fault, r, &mut rng, &load.ledger).await;
        *counts.entry(fault.name()).or_default() += 1;
        match vol.wait_in_sync(Duration::from_secs(180)).await {
            Ok(d) => longest = longest.max(d),
            Err(e) => {
                failure = Some(format!("after fault {} ({}): {e}", n + 1, fault.name()));
                break;
            }
        }
    }
    // Some load on the healed volume, then stop and check every block.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ledger, stats) = load.stop().await;
    if let Some(f) = failure {
        stats.violation(f);
    }
    let len = WRITERS * BLOCKS_PER_WRITER * BLOCK as u64;
    let mut blocks_checked = 0;
    let image = vol.read_export(len).await;
    for (b, content) in image.chunks(BLOCK).enumerate() {
        blocks_checked += 1;
        if let Err(v) = ledger.check(b as u64, content) {
            stats.violation(format!("through the engine at the end: {v}"));
        }
    }
    // Each replica alone must hold every acknowledged write: read them directly, fenced at a
    // new epoch once the engine stopped.
    let mut engine = vol.engine.take().unwrap();
    engine.stop();
    let epoch = vol.membership()["epoch"].as_u64().unwrap_or(0) + 1;
    let addrs: Vec<SocketAddr> = vol.replicas.iter().map(|r| r.data).collect();
    let read = move || async move { crate::replica_images(&addrs, VOL, TOKEN, epoch, len).await };
    let images = tokio::task::block_in_place(|| in_netns(&vol.engine_ns, read));
    for (i, img) in images.iter().enumerate() {
        for (b, content) in img.chunks(BLOCK).enumerate() {
            blocks_checked += 1;
            if let Err(v) = ledger.check(b as u64, content) {
                stats.violation(format!("on replica r{i} at the end: {v}"));
            }
        }
        if img != &image {
            stats.violation(format!("replica r{i} differs from what the engine served"));
        }
    }
    let violations = stats.violations.lock().clone();
    Report {
        seed,
        faults: counts,
        writes_issued: stats.writes_issued.load(Ordering::Relaxed),
        writes_acked: stats.writes_acked.load(Ordering::Relaxed),
        writes_failed: stats.writes_failed.load(Ordering::Relaxed),
        reads_checked: stats.reads_checked.load(Ordering::Relaxed),
        flushes_acked: stats.flushes_acked.load(Ordering::Relaxed),
        reconnects: stats.reconnects.load(Ordering::Relaxed),
        write_errors: stats.errors.lock().clone(),
        blocks_checked,
        violations,
        seconds: started.elapsed().as_secs_f64(),
        longest_recovery_s: longest.as_secs_f64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger_with(floor: u64, issued: u64) -> Ledger {
        let l = Ledger::new(BLOCKS_PER_WRITER * 2);
        l.issue(BLOCKS_PER_WRITER, 1, issued);
        if floor > 0 {
            l.ack(BLOCKS_PER_WRITER, 1, floor, 0);
        }
        l
    }

    #[test]
    fn a_record_parses_back_and_any_flipped_bit_is_caught() {
        let r = record(3, 77, 12345);
        assert_eq!(parse(&r), Seen::Record { writer: 3, block: 77, seq: 12345 });
        for bit in [0, 8 * 9, 8 * 21, 8 * 29, 8 * 100 + 3, 8 * 4095 + 7] {
            let mut bad = r.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(matches!(parse(&bad), Seen::Garbage(_)), "bit {bit} not caught");
        }
        // Half of a newer write over an older one (a torn write) is not a record.
        let mut torn = record(3, 77, 12346);
        torn[2048..].copy_from_slice(&r[2048..]);
        assert!(matches!(parse(&torn), Seen::Garbage(_)));
        assert_eq!(parse(&[0u8; BLOCK]), Seen::Zeros);
    }

    #[test]
    fn the_ledger_allows_exactly_the_window_between_acknowledged_and_issued() {
        let b = BLOCKS_PER_WRITER; // writer 1's first block
        let l = ledger_with(5, 8);
        assert!(l.check(b, &record(1, b, 5)).is_ok());
        assert!(l.check(b, &record(1, b, 8)).is_ok());
        assert!(l.check(b, &record(1, b, 4)).is_err(), "an acknowledged write lost");
        assert!(l.check(b, &record(1, b, 9)).is_err(), "a write never issued");
        assert!(l.check(b, &record(0, b, 6)).is_err(), "another writer's record");
        assert!(l.check(b, &record(1, b + 1, 6)).is_err(), "a record misplaced");
        assert!(l.check(b, &[0u8; BLOCK]).is_err(), "zeros after an acknowledgement");
        // Nothing acknowledged yet: zeros or an issued record.
        let l = ledger_with(0, 3);
        assert!(l.check(b, &[0u8; BLOCK]).is_ok());
        assert!(l.check(b, &record(1, b, 3)).is_ok());
    }

    #[test]
    fn after_a_crash_only_what_a_flush_covered_is_owed() {
        let b = BLOCKS_PER_WRITER;
        let l = ledger_with(5, 5);
        let floors = l.floors();
        l.flushed(&floors, l.generation());
        l.issue(b, 1, 9);
        l.ack(b, 1, 9, l.generation());
        assert!(l.check(b, &record(1, b, 5)).is_err());
        l.crashed();
        assert!(l.check(b, &record(1, b, 5)).is_ok(), "durable: 5");
        assert!(l.check(b, &record(1, b, 9)).is_ok());
        assert!(l.check(b, &[0u8; BLOCK]).is_err(), "the flushed write is owed");
        // An acknowledgement of a write issued before the crash is not counted after it.
        let before = l.generation() - 1;
        l.ack(b, 1, 9, before);
        assert!(l.check(b, &record(1, b, 5)).is_ok());
    }
}
