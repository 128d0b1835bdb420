//! The replica's data protocol server: one [`Replica`] per process, serving its store over TCP.
//!
//! Every connection starts with a hello carrying the volume id, the per-volume token, the client's
//! engine id and its epoch; a wrong token or an epoch older than the replica's is refused, logged,
//! and the connection closed. Requests are then read as fast as the in-flight limit allows and
//! driven by the connection's task (store work that may wait on the blocking pool), and replies
//! go back in completion order. Data operations run only for a connection whose epoch and engine are the ones the replica
//! accepted through its last fence (DESIGN rule 3); a fence persists the new epoch, then closes every
//! older-epoch connection and waits for its in-flight requests before it answers.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use parking_lot::{Mutex, RwLock};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};
use uuid::Uuid;

use crate::error::StoreError;
use crate::shm::{Mapping, Ranges};
use crate::store::{CreateOptions, Store};
use crate::wire::{self, HelloReply, Op, Reply, Request, ServerCodec, SnapshotEntry, StatReply, Status};

/// How long a new connection has to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest frame before a connection authenticated: a hello fits easily, and an unauthenticated
/// peer cannot make the server reserve megabytes.
const PRE_AUTH_MAX_FRAME: u32 = 4096;
/// Connections one replica serves at once (an engine needs a handful).
const MAX_CONNECTIONS: usize = 256;
/// Data per reply frame of a READ_ALLOCATED stream.
const STREAM_CHUNK: u64 = 1 << 20;
/// Stream pieces queued for a connection's writer (4 MiB at most).
const STREAM_QUEUE: usize = 4;
/// Reads and writes up to this size may be served on the async threads (see `handle_request`):
/// moving them to the blocking pool costs two thread hand-offs, most of a small request's latency
/// and, measured, a quarter of the bandwidth of 128 KiB writes; a page-cache copy of 256 KiB takes
/// tens of microseconds. Only IO that needs no waiting is done inline (cached reads, in-place
/// writes under uncontended locks).
const INLINE_IO: usize = 256 * 1024;
/// Entries per LIST_WRITTEN / LIST_ALLOCATED reply (a 1 MiB payload at most).
const LIST_PAGE: usize = 65536;

/// Settings of one replica server.
#[derive(Clone)]
pub struct ServerConfig {
    pub volume_id: String,
    /// The per-volume secret every connection must present.
    pub token: String,
    /// A connection that sends nothing (not even a ping) for this long is closed.
    pub idle_timeout: Duration,
    /// Requests one connection may have in flight.
    pub max_in_flight: usize,
    /// Raw partition for the data of a store this replica creates (else a file in its directory).
    pub data_device: Option<std::path::PathBuf>,
    /// A store this replica creates keeps block checksums (off only to measure their cost).
    pub checksums: bool,
    /// The management API may inject disk faults (tests only).
    pub fault_injection: bool,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("volume_id", &self.volume_id)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

/// Compares secrets in time independent of where they differ.
pub fn token_matches(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    let mut diff = u8::from(a.len() != b.len());
    for (i, &x) in b.iter().enumerate() {
        diff |= x ^ a.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

/// Maps a store error to the reply status: the one place the data protocol does so.
pub fn status_of(e: &StoreError) -> Status {
    match e {
        StoreError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => Status::NoSpace,
        StoreError::Io { .. } | StoreError::Db(_) => Status::Io,
        StoreError::NotFound(_) => Status::NoStore,
        StoreError::AlreadyExists(_) | StoreError::SnapshotExists(_) => Status::Exists,
        StoreError::Corrupt { .. } | StoreError::Failed(_) => Status::Failed,
        StoreError::OutOfRange { .. } => Status::OutOfRange,
        StoreError::Unaligned { .. } | StoreError::InvalidArgument(_) | StoreError::Shrink { .. } => {
            Status::Invalid
        }
        StoreError::SnapshotNotFound(_) => Status::NotFound,
        StoreError::TooManySnapshots(_) => Status::NoSpace,
        StoreError::SnapshotBusy(_) => Status::Busy,
        StoreError::Checksum { .. } => Status::Corrupt,
        StoreError::StaleEpoch { .. } => Status::StaleEpoch,
        StoreError::EpochConflict { .. } => Status::EpochConflict,
    }
}

/// The epoch and engine a connection speaks for, and the one it is fencing in, if any.
#[derive(Debug, Clone, Copy)]
struct Authority {
    current: (u64, Uuid),
    /// Set while this connection's fence is being persisted, so its own pipelined requests are
    /// not refused in the instant between the replica taking the epoch and the connection doing so.
    pending: Option<(u64, Uuid)>,
}

#[derive(Debug)]
struct Conn {
    id: u64,
    peer: String,
    authority: Mutex<Authority>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    /// The engine's shared memory, when it offered some over a unix socket.
    shm: Option<Arc<Ranges>>,
}

impl Conn {
    /// True when this connection may do IO for a replica at `(epoch, holder)`.
    fn holds(&self, epoch: u64, holder: Option<Uuid>) -> bool {
        let a = *self.authority.lock();
        let is = |(e, who): (u64, Uuid)| e == epoch && holder == Some(who);
        is(a.current) || a.pending.is_some_and(is)
    }
}

/// One replica process's shared state: its store (if created) and its live connections.
pub struct Replica {
    cfg: ServerConfig,
    dir: std::path::PathBuf,
    store: RwLock<Option<Arc<Store>>>,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    next_conn: AtomicU64,
    fence_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica").field("cfg", &self.cfg).field("dir", &self.dir).finish_non_exhaustive()
    }
}

fn blocking_err(e: tokio::task::JoinError) -> StoreError {
    StoreError::Io { op: "blocking task", source: std::io::Error::other(e.to_string()) }
}

/// Runs blocking store work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.map_err(blocking_err)?
}

impl Replica {
    /// A replica serving the store in `dir`, opened now if it exists.
    pub fn new(cfg: ServerConfig, dir: &std::path::Path) -> Result<Arc<Replica>, StoreError> {
        let store = if crate::store::store_exists(dir) {
            let s = Store::open(dir)?;
            if s.volume_id() != cfg.volume_id {
                return Err(StoreError::InvalidArgument(format!(
                    "store in {} belongs to volume {}, not {}",
                    dir.display(),
                    s.volume_id(),
                    cfg.volume_id
                )));
            }
            Some(Arc::new(s))
        } else {
            None
        };
        Ok(Arc::new(Replica {
            cfg,
            dir: dir.to_owned(),
            store: RwLock::new(store),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            fence_lock: tokio::sync::Mutex::new(()),
        }))
    }

    pub fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// The open store, or `NotFound` when none was created yet.
    pub fn store(&self) -> Result<Arc<Store>, StoreError> {
        self.store.read().clone().ok_or_else(|| StoreError::NotFound(self.dir.clone()))
    }

    /// Creates the store. Repeating a create with the same size and cluster size is a no-op.
    pub async fn create_store(&self, size: u64, cluster_size: u64) -> Result<Arc<Store>, StoreError> {
        if let Ok(s) = self.store() {
            return if s.size() == size && s.cluster_size() == cluster_size {
                Ok(s)
            } else {
                Err(StoreError::AlreadyExists(self.dir.clone()))
            };
        }
        let dir = self.dir.clone();
        let opts = CreateOptions {
            volume_id: self.cfg.volume_id.clone(),
            size,
            cluster_size,
            data_device: self.cfg.data_device.clone(),
            checksums: self.cfg.checksums,
        };
        let s = Arc::new(blocking(move || Store::create(&dir, &opts)).await?);
        *self.store.write() = Some(s.clone());
        Ok(s)
    }

    /// Opens the existing store (after it was created by someone else, or closed).
    pub async fn open_store(&self) -> Result<Arc<Store>, StoreError> {
        if let Ok(s) = self.store() {
            return Ok(s);
        }
        let dir = self.dir.clone();
        let s = Arc::new(blocking(move || Store::open(&dir)).await?);
        if s.volume_id() != self.cfg.volume_id {
            return Err(StoreError::InvalidArgument(format!("store belongs to volume {}", s.volume_id())));
        }
        *self.store.write() = Some(s.clone());
        Ok(s)
    }

    /// Closes every connection, waits for their requests, then removes the store and its space.
    pub async fn delete_store(&self) -> Result<(), StoreError> {
        let conns: Vec<_> = self.conns.lock().values().cloned().collect();
        for c in &conns {
            c.cancel.cancel();
        }
        for c in &conns {
            c.tracker.close();
            c.tracker.wait().await;
        }
        let taken = self.store.write().take();
        if let Some(mut s) = taken {
            // Requests that already hold the store finish before it closes.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                match Arc::try_unwrap(s) {
                    Ok(store) => {
                        drop(store);
                        break;
                    }
                    Err(back) if tokio::time::Instant::now() < deadline => {
                        s = back;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(back) => {
                        *self.store.write() = Some(back);
                        return Err(StoreError::InvalidArgument("store still in use".into()));
                    }
                }
            }
        }
        let dir = self.dir.clone();
        blocking(move || Store::destroy(&dir)).await?;
        info!(volume_id = %self.cfg.volume_id, "deleted replica store");
        Ok(())
    }

    /// Raises the epoch for `engine` through `by`, then closes older-epoch connections and drains
    /// their in-flight requests (DESIGN rule 3).
    async fn fence(&self, by: &Conn, epoch: u64, engine: Uuid) -> Result<(), StoreError> {
        let _serial = tokio::select! {
            g = self.fence_lock.lock() => g,
            () = by.cancel.cancelled() => {
                return Err(StoreError::StaleEpoch { epoch, current: self.store()?.epoch().0 });
            }
        };
        let store = self.store()?;
        by.authority.lock().pending = Some((epoch, engine));
        let fenced = blocking(move || store.fence(epoch, engine)).await;
        {
            let mut a = by.authority.lock();
            a.pending = None;
            if fenced.is_ok() {
                a.current = (epoch, engine);
            }
        }
        fenced?;
        let victims: Vec<Arc<Conn>> = self
            .conns
            .lock()
            .values()
            .filter(|c| {
                let (e, who) = c.authority.lock().current;
                c.id != by.id && (e < epoch || (e == epoch && who != engine))
            })
            .cloned()
            .collect();
        for v in &victims {
            v.cancel.cancel();
        }
        for v in &victims {
            v.tracker.close();
            v.tracker.wait().await;
            info!(volume_id = %self.cfg.volume_id, peer = %v.peer, epoch, "closed older-epoch connection");
        }
        Ok(())
    }
}

type Rd = Box<dyn AsyncRead + Send + Unpin>;
type Wr = Box<dyn AsyncWrite + Send + Unpin>;

/// Where the data protocol is served: TCP, or a unix socket for an engine on the same node (no
/// TCP stack on the data path; the socket file's permissions guard it).
#[derive(Debug)]
pub enum DataListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl From<TcpListener> for DataListener {
    fn from(l: TcpListener) -> Self {
        DataListener::Tcp(l)
    }
}

impl From<UnixListener> for DataListener {
    fn from(l: UnixListener) -> Self {
        DataListener::Unix(l)
    }
}

/// An accepted connection, before its transport preamble.
enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl DataListener {
    async fn accept(&self) -> std::io::Result<(Accepted, String)> {
        match self {
            DataListener::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok((Accepted::Tcp(stream), peer.to_string()))
            }
            DataListener::Unix(l) => {
                let (stream, _) = l.accept().await?;
                let peer = match stream.peer_cred() {
                    Ok(c) => format!("unix pid {}", c.pid().unwrap_or(0)),
                    Err(_) => "unix".to_owned(),
                };
                Ok((Accepted::Unix(stream), peer))
            }
        }
    }
}

/// The unix-socket preamble (docs/protocol.md): one byte, `S` with a memfd (SCM_RIGHTS) the engine
/// offers as shared memory, or `N` without. `Ok(None)` when nothing usable was offered.
async fn unix_preamble(stream: &tokio::net::UnixStream) -> std::io::Result<Option<Mapping>> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let (n, byte, mut fds) = stream
        .async_io(tokio::io::Interest::READABLE, || {
            let mut b = [0u8; 1];
            let mut iov = [std::io::IoSliceMut::new(&mut b)];
            let mut space = nix::cmsg_space!([std::os::fd::RawFd; 2]);
            let msg =
                recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
            let mut fds = Vec::new();
            for c in msg.cmsgs()? {
                if let ControlMessageOwned::ScmRights(received) = c {
                    // SAFETY: descriptors that just arrived with this message belong to no one
                    // else; wrapping them at once closes every one that is not used.
                    fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                }
            }
            let n = msg.bytes;
            Ok((n, b[0], fds))
        })
        .await?;
    match (n, byte, fds.len()) {
        (0, _, _) => Err(std::io::ErrorKind::UnexpectedEof.into()),
        (_, b'N', 0) => Ok(None),
        (_, b'S', 1) => match fds.pop().map(Mapping::attach) {
            Some(Ok(m)) => Ok(Some(m)),
            Some(Err(e)) => {
                warn!(error = %e, "shared memory offered by the engine refused; using the socket");
                Ok(None)
            }
            None => Ok(None),
        },
        (_, b, k) => {
            Err(std::io::Error::other(format!("bad transport preamble {b:#x} with {k} descriptors")))
        }
    }
}

/// Accepts connections until `shutdown` fires.
pub async fn serve(listener: impl Into<DataListener>, replica: Arc<Replica>, shutdown: CancellationToken) {
    let listener = listener.into();
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    warn!(volume_id = %replica.cfg.volume_id, %peer, "refused connection: too many connections");
                    continue;
                };
                let r = replica.clone();
                let sd = shutdown.clone();
                let span = info_span!("conn", volume_id = %replica.cfg.volume_id, %peer);
                tracker.spawn(
                    async move {
                        handle_conn(r, stream, peer, sd).await;
                        drop(slot);
                    }
                    .instrument(span),
                );
            }
            Err(e) => {
                warn!(volume_id = %replica.cfg.volume_id, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracker.close();
    tracker.wait().await;
}

async fn handshake(
    replica: &Replica,
    reader: &mut FramedRead<Rd, ServerCodec>,
    writer: &mut FramedWrite<Wr, ServerCodec>,
    shm: bool,
) -> Option<(u64, Uuid)> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, reader.next()).await;
    let (id, hello) = match first {
        Ok(Some(Ok(Request { id, op: Op::Hello(h) }))) => (id, h),
        Ok(Some(Ok(_))) => {
            warn!("first frame was not a hello; closing");
            return None;
        }
        Ok(Some(Err(e))) => {
            warn!(error = %e, "malformed hello; closing");
            return None;
        }
        Ok(None) => return None,
        Err(_) => {
            warn!("no hello in time; closing");
            return None;
        }
    };
    let refuse = |status: Status, msg: String| Reply::error(id, status, msg);
    let reply = if hello.version != wire::VERSION {
        Err(refuse(Status::Unsupported, format!("protocol version {} not supported", hello.version)))
    } else if !token_matches(&hello.token, &replica.cfg.token) || hello.volume_id != replica.cfg.volume_id {
        warn!(claimed_volume = %hello.volume_id, engine = %hello.engine_id, "refused connection: wrong token or volume");
        Err(refuse(Status::Auth, "authentication failed".into()))
    } else {
        match replica.store() {
            Err(e) => Err(refuse(Status::NoStore, e.to_string())),
            Ok(store) => {
                let (current, holder) = store.epoch();
                let size = {
                    let s = store.clone();
                    blocking(move || Ok(s.size())).await.unwrap_or(0)
                };
                if hello.epoch < current {
                    warn!(epoch = hello.epoch, current, engine = %hello.engine_id, "refused connection: stale epoch");
                    Err(refuse(Status::StaleEpoch, format!("epoch {} is older than {current}", hello.epoch)))
                } else if hello.epoch == current && holder.is_some_and(|h| h != hello.engine_id) {
                    warn!(epoch = current, engine = %hello.engine_id, "refused connection: epoch held by another engine");
                    Err(refuse(Status::EpochConflict, format!("epoch {current} is held by another engine")))
                } else {
                    let r = HelloReply {
                        version: wire::VERSION,
                        volume_id: replica.cfg.volume_id.clone(),
                        store_id: store.store_id(),
                        size,
                        epoch: current,
                        max_io: wire::MAX_IO,
                        shm,
                    };
                    Ok(Reply::ok(id, Bytes::from(serde_json::to_vec(&r).unwrap_or_default())))
                }
            }
        }
    };
    match reply {
        Ok(r) => writer.send(r).await.ok().map(|()| (hello.epoch, hello.engine_id)),
        Err(r) => {
            let _ = writer.send(r).await;
            None
        }
    }
}

async fn handle_conn(replica: Arc<Replica>, stream: Accepted, peer: String, shutdown: CancellationToken) {
    let (rd, wr, shm): (Rd, Wr, _) = match stream {
        Accepted::Tcp(s) => {
            let (rd, wr) = s.into_split();
            (Box::new(rd), Box::new(wr), None)
        }
        Accepted::Unix(s) => {
            let shm = match tokio::time::timeout(HELLO_TIMEOUT, unix_preamble(&s)).await {
                Ok(Ok(m)) => m.map(Ranges::new),
                Ok(Err(e)) => {
                    warn!(error = %e, "transport preamble failed; closing");
                    return;
                }
                Err(_) => {
                    warn!("no transport preamble in time; closing");
                    return;
                }
            };
            let (rd, wr) = s.into_split();
            (Box::new(rd), Box::new(wr), shm)
        }
    };
    let mut reader = FramedRead::new(rd, ServerCodec { max_frame: PRE_AUTH_MAX_FRAME });
    let mut writer = FramedWrite::new(wr, ServerCodec::default());
    let Some(authority) = handshake(&replica, &mut reader, &mut writer, shm.is_some()).await else { return };
    reader.decoder_mut().max_frame = wire::MAX_FRAME;
    let conn = Arc::new(Conn {
        id: replica.next_conn.fetch_add(1, Ordering::Relaxed),
        peer,
        authority: Mutex::new(Authority { current: authority, pending: None }),
        cancel: CancellationToken::new(),
        tracker: TaskTracker::new(),
        shm,
    });
    replica.conns.lock().insert(conn.id, conn.clone());
    debug!(epoch = authority.0, engine = %authority.1, "connection accepted");

    serve_requests(&replica, &conn, reader, writer, &shutdown).await;
    conn.tracker.close();
    conn.tracker.wait().await;
    if conn.cancel.is_cancelled() {
        debug!("connection closed by a fence or delete");
    }
    replica.conns.lock().remove(&conn.id);
    debug!("connection closed");
}

/// The request loop of an authenticated connection. One task reads requests, drives every request
/// in flight (a `FuturesUnordered`, each tracked by the connection's tracker so a fence can wait for
/// them) and writes their replies as they complete: a small request costs no task spawn and no
/// hand-off to a writer task, only the wake-up of this task by the socket. Replies of a streamed
/// request's pieces (READ_ALLOCATED) come through a channel this task drains.
///
/// Writing never blocks a fence: a cancelled connection (fenced or deleted) stops writing at once.
/// A request once read runs to completion whatever happens to the connection; after the loop
/// ends, the requests still in flight are driven to the end (their replies written only while
/// the connection still takes them).
async fn serve_requests(
    replica: &Arc<Replica>,
    conn: &Arc<Conn>,
    mut reader: FramedRead<Rd, ServerCodec>,
    mut writer: FramedWrite<Wr, ServerCodec>,
    shutdown: &CancellationToken,
) {
    use futures::stream::FuturesUnordered;
    let max_in_flight = replica.cfg.max_in_flight.max(1);
    let (stx, mut srx) = mpsc::channel::<Reply>(STREAM_QUEUE);
    let mut in_flight = FuturesUnordered::new();
    let cancelled = conn.cancel.clone().cancelled_owned();
    let stopped = shutdown.clone().cancelled_owned();
    tokio::pin!(cancelled, stopped);
    // The idle timer is pushed back lazily: a frame only records when it came, and the timer,
    // when it fires, is re-armed from there (no timer-wheel work per request).
    let idle = replica.cfg.idle_timeout;
    let mut last_frame = tokio::time::Instant::now();
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    let mut writable = true;
    loop {
        let can_read = in_flight.len() < max_in_flight;
        // What to write: a completed request's reply, or a stream piece.
        let first = tokio::select! {
            biased;
            () = &mut cancelled => break,
            () = &mut stopped => break,
            Some(reply) = in_flight.next(), if !in_flight.is_empty() => (reply, false),
            Some(piece) = srx.recv() => (piece, true),
            () = &mut timer => {
                let due = last_frame + idle;
                if tokio::time::Instant::now() >= due {
                    warn!("no request or heartbeat within the idle timeout; closing");
                    break;
                }
                timer.as_mut().reset(due);
                continue;
            }
            next = reader.next(), if can_read => {
                let req = match next {
                    None => break,
                    Some(Err(e)) => {
                        warn!(error = %e, "protocol error; closing");
                        break;
                    }
                    Some(Ok(req)) => req,
                };
                last_frame = tokio::time::Instant::now();
                in_flight.push(conn.tracker.track_future(handle_request(replica, conn, req, &stx)));
                continue;
            }
        };
        let written = tokio::select! {
            biased;
            () = &mut cancelled => break,
            () = &mut stopped => break,
            w = write_ready(&mut writer, first, &mut in_flight, &mut srx) => w,
        };
        if let Err(e) = written {
            debug!(error = %e, "writing replies failed; closing");
            writable = false;
            break;
        }
    }
    // Everything read runs to its end. A connection closed by a fence or delete gets no more
    // replies. Stream pieces already queued go out first; a stream still running then fails at
    // its next piece, so no stream ends with a success reply after a lost piece.
    writable &= !conn.cancel.is_cancelled();
    while writable && let Ok(piece) = srx.try_recv() {
        writable = tokio::select! {
            biased;
            () = conn.cancel.cancelled() => false,
            r = writer.feed(piece) => r.is_ok(),
        };
    }
    drop(srx);
    while let Some(reply) = in_flight.next().await {
        if writable {
            // A peer that stopped reading must not keep the rest from finishing, nor a fence
            // waiting for them.
            writable = tokio::select! {
                biased;
                () = conn.cancel.cancelled() => false,
                r = writer.feed(reply) => r.is_ok(),
            };
        }
    }
    if writable {
        tokio::select! {
            () = conn.cancel.cancelled() => {}
            _ = writer.flush() => {}
        }
    }
}

/// Writes `first` (a reply, or a stream piece when `.1`) and everything else ready now, in one
/// flush: the replies of requests that completed meanwhile and the queued stream pieces. A
/// stream's pieces are all queued before its final reply completes, and go out before it.
async fn write_ready<S>(
    writer: &mut FramedWrite<Wr, ServerCodec>,
    (first, piece): (Reply, bool),
    in_flight: &mut S,
    pieces: &mut mpsc::Receiver<Reply>,
) -> Result<(), wire::WireError>
where
    S: futures::Stream<Item = Reply> + Unpin,
{
    use futures::FutureExt;
    if !piece {
        while let Ok(p) = pieces.try_recv() {
            writer.feed(p).await?;
        }
    }
    writer.feed(first).await?;
    loop {
        while let Ok(p) = pieces.try_recv() {
            writer.feed(p).await?;
        }
        match in_flight.next().now_or_never() {
            Some(Some(r)) => writer.feed(r).await?,
            _ => break,
        }
    }
    writer.flush().await
}

/// Reads the head into `buf`: on this thread when the page cache holds it all and it is small
/// (`Store::read_cached` never waits), else on the blocking pool. Gives `buf` back.
async fn read_into<B: AsMut<[u8]> + Send + 'static>(
    store: Arc<Store>,
    offset: u64,
    mut buf: B,
) -> Result<B, StoreError> {
    if buf.as_mut().len() <= INLINE_IO && store.read_cached(offset, buf.as_mut())? {
        return Ok(buf);
    }
    blocking(move || store.read(offset, buf.as_mut()).map(|()| buf)).await
}

/// Writes `data` to the head: on this thread when it can land in place without waiting (see
/// `Store::try_write_inline`), saving two thread hand-offs, else on the blocking pool.
async fn write_from<B: AsRef<[u8]> + Send + 'static>(
    store: Arc<Store>,
    offset: u64,
    data: B,
    fua: bool,
) -> Result<B, StoreError> {
    if !fua && data.as_ref().len() <= INLINE_IO && store.try_write_inline(offset, data.as_ref())? {
        return Ok(data);
    }
    blocking(move || store.write(offset, data.as_ref(), fua).map(|()| data)).await
}

/// The part of the connection's shared memory a request names.
fn shm_range(conn: &Conn, offset: u64, len: u32) -> Result<crate::shm::Range, StoreError> {
    if len > wire::MAX_IO {
        return Err(StoreError::InvalidArgument(format!("length {len} exceeds {}", wire::MAX_IO)));
    }
    let Some(ranges) = &conn.shm else {
        return Err(StoreError::InvalidArgument("this connection has no shared memory".into()));
    };
    ranges.take(offset, len).map_err(|e| StoreError::InvalidArgument(e.to_string()))
}

/// `None` when `conn` holds the replica's current epoch; otherwise the refusal.
fn authorize(store: &Store, conn: &Conn) -> Option<(Status, String)> {
    let (current, holder) = store.epoch();
    if conn.holds(current, holder) {
        return None;
    }
    let (epoch, engine) = conn.authority.lock().current;
    Some(if epoch < current {
        warn!(epoch, current, "refused request: stale epoch");
        (Status::StaleEpoch, format!("epoch {epoch} is older than {current}"))
    } else if epoch > current {
        (Status::NotFenced, format!("epoch {epoch} has not been fenced in (replica at {current})"))
    } else {
        (Status::EpochConflict, format!("epoch {epoch} is not held by engine {engine}"))
    })
}

fn store_reply(id: u64, r: Result<Bytes, StoreError>) -> Reply {
    match r {
        Ok(b) => Reply::ok(id, b),
        Err(e) => Reply::error(id, status_of(&e), e.to_string()),
    }
}

fn json<T: serde::Serialize>(v: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

/// Runs one request; returns its (final) reply. A streamed request sends its pieces through `tx`
/// first.
async fn handle_request(replica: &Replica, conn: &Conn, req: Request, tx: &mpsc::Sender<Reply>) -> Reply {
    let id = req.id;
    let store = match replica.store() {
        Ok(s) => s,
        Err(e) => return Reply::error(id, Status::NoStore, e.to_string()),
    };
    // Operations any authenticated connection may make.
    let reply = match req.op {
        Op::Ping => Some(Reply::ok(id, Bytes::new())),
        Op::Stat => {
            let s2 = store.clone();
            let r = blocking(move || s2.stat()).await.map(|s| {
                json(&StatReply {
                    volume_id: s.volume_id,
                    store_id: s.store_id,
                    size: s.size,
                    cluster_size: s.cluster_size,
                    allocated_bytes: s.allocated_bytes,
                    disk_bytes: s.disk_bytes,
                    snapshots: s.snapshots,
                    epoch: s.epoch,
                    engine_id: s.engine_id,
                    dirty_regions: s.dirty_regions,
                    healthy: s.failure.is_none(),
                    failure: s.failure,
                    checksums: s.checksums,
                    checksum_errors: s.checksum_errors,
                })
            });
            Some(store_reply(id, r))
        }
        Op::Fence { epoch, engine_id } => {
            let r = replica.fence(conn, epoch, engine_id).await.map(|()| Bytes::new());
            if let Err(e) = &r {
                warn!(epoch, engine = %engine_id, error = %e, "fence refused");
            }
            Some(store_reply(id, r))
        }
        Op::Hello(_) => Some(Reply::error(id, Status::Invalid, "hello after the handshake")),
        Op::Invalid { ref reason } => Some(Reply::error(id, Status::Invalid, reason.clone())),
        Op::Unknown { code } => {
            Some(Reply::error(id, Status::Unsupported, format!("unknown opcode {code:#x}")))
        }
        _ => None,
    };
    if let Some(r) = reply {
        return r;
    }
    // Everything else needs the authority of the replica's current epoch.
    let refused = authorize(&store, conn);
    if let Some((status, msg)) = refused {
        return Reply::error(id, status, msg);
    }
    let io_len = |len: u32| {
        if len > wire::MAX_IO {
            Err(StoreError::InvalidArgument(format!("length {len} exceeds {}", wire::MAX_IO)))
        } else {
            Ok(len as usize)
        }
    };
    let r: Result<Bytes, StoreError> = match req.op {
        Op::Read { offset, len } => match io_len(len) {
            Ok(n) => read_into(store, offset, vec![0u8; n]).await.map(Bytes::from),
            Err(e) => Err(e),
        },
        Op::ReadSnapshot { name, offset, len } => match io_len(len) {
            Ok(n) => {
                blocking(move || {
                    let mut buf = vec![0u8; n];
                    store.read_snapshot(&name, offset, &mut buf).map(|()| Bytes::from(buf))
                })
                .await
            }
            Err(e) => Err(e),
        },
        Op::Write { offset, data, fua } => write_from(store, offset, data, fua).await.map(|_| Bytes::new()),
        Op::ReadShm { offset, len, shm_offset } => match shm_range(conn, shm_offset, len) {
            Ok(range) => read_into(store, offset, range).await.map(|_| Bytes::new()),
            Err(e) => Err(e),
        },
        Op::WriteShm { offset, len, shm_offset, fua } => match shm_range(conn, shm_offset, len) {
            Ok(range) => write_from(store, offset, range, fua).await.map(|_| Bytes::new()),
            Err(e) => Err(e),
        },
        Op::Flush => {
            blocking(move || store.flush().map(|point| Bytes::copy_from_slice(&point.to_be_bytes()))).await
        }
        Op::ClearIntent { point } => {
            blocking(move || store.clear_intent(point).map(|n| Bytes::copy_from_slice(&n.to_be_bytes())))
                .await
        }
        Op::ListIntent => {
            blocking(move || {
                let mut b = BytesMut::new();
                b.put_u64(crate::store::INTENT_REGION);
                for r in store.dirty_regions() {
                    b.put_u64(r);
                }
                Ok(b.freeze())
            })
            .await
        }
        Op::ListWritten { since, from } => {
            blocking(move || {
                let (regions, next) = store.written_since(since, from, LIST_PAGE)?;
                let mut b = BytesMut::with_capacity(16 + 8 * regions.len());
                b.put_u64(crate::store::INTENT_REGION);
                b.put_u64(next.unwrap_or(u64::MAX));
                for r in regions {
                    b.put_u64(r);
                }
                Ok(b.freeze())
            })
            .await
        }
        Op::ListAllocated { snapshot, from } => {
            blocking(move || {
                let extents = store.allocated_extents(snapshot.as_deref(), from, LIST_PAGE)?;
                // The next page starts at the next cluster (the last extent may end mid-cluster at
                // the end of the volume).
                let next = if extents.len() < LIST_PAGE {
                    u64::MAX
                } else {
                    extents
                        .last()
                        .map_or(u64::MAX, |e| (e.offset + e.len).next_multiple_of(store.cluster_size()))
                };
                let mut b = BytesMut::with_capacity(8 + 16 * extents.len());
                b.put_u64(next);
                for e in extents {
                    b.put_u64(e.offset);
                    b.put_u64(e.len);
                }
                Ok(b.freeze())
            })
            .await
        }
        Op::Unmap { offset, len } => {
            blocking(move || store.unmap(offset, u64::from(len)).map(|()| Bytes::new())).await
        }
        Op::WriteZeroes { offset, len } => {
            blocking(move || store.write_zeroes(offset, u64::from(len)).map(|()| Bytes::new())).await
        }
        Op::SnapshotCreate { name, created_unix } => {
            blocking(move || store.create_snapshot_at(&name, created_unix).map(|_| Bytes::new())).await
        }
        Op::SnapshotDelete { name } => {
            blocking(move || store.delete_snapshot(&name).map(|_| Bytes::new())).await
        }
        Op::SnapshotList => {
            blocking(move || {
                Ok(json(
                    &store
                        .list_snapshots()
                        .into_iter()
                        .map(|s| SnapshotEntry { name: s.name, size: s.size, created_unix: s.created_unix })
                        .collect::<Vec<_>>(),
                ))
            })
            .await
        }
        Op::Resize { size } => blocking(move || store.resize(size).map(|()| Bytes::new())).await,
        Op::ReadAllocated { snapshot, offset, len } => {
            stream_allocated(store, conn, id, snapshot, offset, len, tx).await
        }
        // Handled above.
        Op::Ping | Op::Stat | Op::Fence { .. } | Op::Hello(_) | Op::Invalid { .. } | Op::Unknown { .. } => {
            Ok(Bytes::new())
        }
    };
    if let Err(e) = &r {
        debug!(request = id, error = %e, "request failed");
    }
    store_reply(id, r)
}

/// Sends the allocated data of the head or a snapshot in `[offset, offset+len)` (len 0: to the
/// end) as `MORE` replies, each `offset (u64 BE) ++ data`; the caller sends the final reply.
/// Between pieces it stops if the connection was closed or lost the replica's epoch, so a fence
/// never waits for a whole volume to stream.
async fn stream_allocated(
    store: Arc<Store>,
    conn: &Conn,
    id: u64,
    snapshot: Option<String>,
    offset: u64,
    len: u64,
    tx: &mpsc::Sender<Reply>,
) -> Result<Bytes, StoreError> {
    let end = if len == 0 { u64::MAX } else { offset.saturating_add(len) };
    let mut from = offset;
    let stale =
        || StoreError::StaleEpoch { epoch: conn.authority.lock().current.0, current: store.epoch().0 };
    while from < end {
        // A page of extents at a time: memory stays bounded however fragmented the volume.
        let (s, snap) = (store.clone(), snapshot.clone());
        let extents = blocking(move || s.allocated_extents(snap.as_deref(), from, 1024)).await?;
        let Some(last) = extents.last() else { break };
        // The next page starts at the next cluster (the last extent may end mid-cluster at the
        // end of the volume).
        from = (last.offset + last.len).next_multiple_of(store.cluster_size());
        for e in extents {
            let (mut at, stop) = (e.offset.max(offset), (e.offset + e.len).min(end));
            while at < stop {
                if conn.cancel.is_cancelled() || authorize(&store, conn).is_some() {
                    return Err(stale());
                }
                let n = (stop - at).min(STREAM_CHUNK);
                let (s, snap) = (store.clone(), snapshot.clone());
                let payload = blocking(move || {
                    let mut buf = BytesMut::with_capacity(8 + n as usize);
                    buf.put_u64(at);
                    buf.resize(8 + n as usize, 0);
                    match &snap {
                        Some(name) => s.read_snapshot(name, at, &mut buf[8..])?,
                        None => s.read(at, &mut buf[8..])?,
                    }
                    Ok(buf.freeze())
                })
                .await?;
                if tx.send(Reply { id, status: Status::Ok, more: true, payload }).await.is_err() {
                    return Err(stale());
                }
                at += n;
            }
        }
    }
    Ok(Bytes::new())
}

#[cfg(test)]
mod tests {
    use super::token_matches;

    #[test]
    fn tokens_compare_whole() {
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abd", "abc"));
        assert!(!token_matches("ab", "abc"));
        assert!(!token_matches("abcd", "abc"));
        assert!(!token_matches("", "abc"));
    }
}
