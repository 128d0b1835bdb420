//! A pipelined client of the replica data protocol.
//!
//! One TCP connection; any number of requests in flight, each with its own id and timeout; replies
//! are matched by id in whatever order they arrive. A background task pings at a fixed interval so
//! an idle connection stays alive and a dead replica is noticed. Used by the engine, the tests and
//! the benchmarks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use uuid::Uuid;

use crate::shm::{Area, Slot};
use crate::wire::{
    self, ClientCodec, Hello, HelloReply, Op, Reply, Request, SnapshotEntry, StatReply, Status,
};

/// How to reach and authenticate to a replica.
#[derive(Clone)]
pub struct ClientConfig {
    pub volume_id: String,
    pub token: String,
    pub engine_id: Uuid,
    pub epoch: u64,
    /// Longest wait for any one reply.
    pub request_timeout: Duration,
    /// Interval of keep-alive pings; zero disables them.
    pub heartbeat: Duration,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("volume_id", &self.volume_id)
            .field("engine_id", &self.engine_id)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// Why a request did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("replica answered {status:?}: {message}")]
    Remote { status: Status, message: String },
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("connection closed")]
    Closed,
}

impl ClientError {
    /// The replica's status, when the replica answered.
    pub fn status(&self) -> Option<Status> {
        match self {
            ClientError::Remote { status, .. } => Some(*status),
            _ => None,
        }
    }
}

enum Waiter {
    One(oneshot::Sender<(Reply, Option<Keep>)>),
    Stream(mpsc::Sender<Reply>),
}

/// Shared memory a request in flight uses: kept until the replica answered it (see
/// [`crate::shm`]), then handed back with the reply.
enum Keep {
    /// A write's payload, in the area.
    Data(#[allow(dead_code)] Bytes),
    /// A read's destination.
    Slot(Slot),
}

struct Pending {
    waiter: Waiter,
    keep: Option<Keep>,
}

struct Shared {
    pending: Mutex<HashMap<u64, Pending>>,
    /// The shared memory of a unix connection whose replica mapped it.
    shm: Option<Arc<Area>>,
    closed: CancellationToken,
    /// When the connection was made; `last_reply_ms` counts from here.
    born: std::time::Instant,
    /// Milliseconds after `born` of the last reply of any kind (pings included).
    last_reply_ms: AtomicU64,
}

impl Shared {
    fn touch(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_reply_ms.store(ms, Ordering::Relaxed);
    }

    fn silence(&self) -> Duration {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(ms.saturating_sub(self.last_reply_ms.load(Ordering::Relaxed)))
    }

    /// Closes the connection and fails every waiter. The shared memory is killed first: the
    /// replica may still be working on any slot that was in flight.
    fn close(&self) {
        if let Some(a) = &self.shm {
            a.kill();
        }
        self.closed.cancel();
        self.pending.lock().clear();
    }
}

/// A connected, authenticated client. Dropping it closes the connection.
pub struct ReplicaClient {
    shared: Arc<Shared>,
    out: mpsc::Sender<Request>,
    /// The connection's write half. A caller that finds it free and nothing queued writes its
    /// request itself; otherwise the request queues for the writer task, which batches.
    writer: Arc<tokio::sync::Mutex<FrameWriter>>,
    next_id: AtomicU64,
    timeout: Duration,
    hello: HelloReply,
}

impl std::fmt::Debug for ReplicaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaClient").field("hello", &self.hello).finish_non_exhaustive()
    }
}

impl Drop for ReplicaClient {
    fn drop(&mut self) {
        self.shared.closed.cancel();
    }
}

fn remote(r: Reply) -> ClientError {
    ClientError::Remote { status: r.status, message: String::from_utf8_lossy(&r.payload).into_owned() }
}

fn parse<T: serde::de::DeserializeOwned>(r: &Reply) -> Result<T, ClientError> {
    serde_json::from_slice(&r.payload).map_err(|e| ClientError::Protocol(e.to_string()))
}

impl ReplicaClient {
    /// Connects over TCP, sends the hello, and waits for the replica to accept it.
    pub async fn connect(addr: SocketAddr, cfg: ClientConfig) -> Result<ReplicaClient, ClientError> {
        let stream = tokio::time::timeout(cfg.request_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout(cfg.request_timeout))??;
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        Self::start(Box::new(rd), Box::new(wr), cfg, None).await
    }

    /// Connects to `address`: `HOST:PORT` (TCP) or `unix:PATH` (a replica on this node).
    pub async fn connect_to(address: &str, cfg: ClientConfig) -> Result<ReplicaClient, ClientError> {
        match address.strip_prefix("unix:") {
            Some(path) => {
                let stream = tokio::time::timeout(cfg.request_timeout, tokio::net::UnixStream::connect(path))
                    .await
                    .map_err(|_| ClientError::Timeout(cfg.request_timeout))??;
                let area = match Area::create() {
                    Ok(a) => Some(a),
                    Err(e) => {
                        warn!(volume_id = %cfg.volume_id, error = %e, "no shared memory for a local replica; using the socket");
                        None
                    }
                };
                tokio::time::timeout(cfg.request_timeout, send_preamble(&stream, area.as_deref()))
                    .await
                    .map_err(|_| ClientError::Timeout(cfg.request_timeout))??;
                let (rd, wr) = stream.into_split();
                Self::start(Box::new(rd), Box::new(wr), cfg, area).await
            }
            None => {
                let addr = address.parse().map_err(|e| {
                    ClientError::Protocol(format!(
                        "replica address {address:?} is not HOST:PORT or unix:PATH: {e}"
                    ))
                })?;
                Self::connect(addr, cfg).await
            }
        }
    }

    async fn start(
        rd: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
        wr: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
        cfg: ClientConfig,
        area: Option<Arc<Area>>,
    ) -> Result<ReplicaClient, ClientError> {
        let mut reader = FramedRead::new(rd, ClientCodec::default());
        let mut writer = FrameWriter::new(wr);
        let hello = Hello {
            version: wire::VERSION,
            volume_id: cfg.volume_id.clone(),
            token: cfg.token.clone(),
            epoch: cfg.epoch,
            engine_id: cfg.engine_id,
        };
        writer.send(Request { id: 0, op: Op::Hello(hello) }).await.map_err(wire_err)?;
        let reply = tokio::time::timeout(cfg.request_timeout, reader.next())
            .await
            .map_err(|_| ClientError::Timeout(cfg.request_timeout))?
            .ok_or(ClientError::Closed)?
            .map_err(wire_err)?;
        if reply.status != Status::Ok {
            return Err(remote(reply));
        }
        let hello: HelloReply = parse(&reply)?;

        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            shm: area.filter(|_| hello.shm),
            closed: CancellationToken::new(),
            born: std::time::Instant::now(),
            last_reply_ms: AtomicU64::new(0),
        });
        let (out, mut out_rx) = mpsc::channel::<Request>(256);
        let closed = shared.closed.clone();
        let writer = Arc::new(tokio::sync::Mutex::new(writer));
        let queue_writer = writer.clone();
        tokio::spawn(async move {
            let write = async {
                while let Some(req) = out_rx.recv().await {
                    let mut writer = queue_writer.lock().await;
                    writer.feed(req)?;
                    while let Ok(req) = out_rx.try_recv() {
                        writer.feed(req)?;
                    }
                    writer.flush().await?;
                }
                Ok::<(), wire::WireError>(())
            };
            // A replica that stopped reading must not hold this task (or its callers) forever.
            tokio::select! {
                () = closed.cancelled() => {}
                _ = write => {}
            }
            closed.cancel();
        });
        let sh = shared.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    () = sh.closed.cancelled() => break,
                    n = reader.next() => n,
                };
                let Some(Ok(reply)) = next else { break };
                sh.touch();
                let waiter = {
                    let mut pending = sh.pending.lock();
                    let p = pending.remove(&reply.id);
                    if let (Some(Pending { waiter: Waiter::Stream(tx), .. }), true) = (&p, reply.more) {
                        pending.insert(reply.id, Pending { waiter: Waiter::Stream(tx.clone()), keep: None });
                    }
                    p
                };
                match waiter {
                    // A caller that gave up drops the slot here, after the reply: safe to reuse.
                    Some(Pending { waiter: Waiter::One(tx), keep }) => {
                        let _ = tx.send((reply, keep));
                    }
                    Some(Pending { waiter: Waiter::Stream(tx), .. }) => {
                        // A slow stream consumer slows this connection: the stream is for bulk
                        // copies that own their connection.
                        let _ = tx.send(reply).await;
                    }
                    None => {}
                }
            }
            // Fail everything still waiting.
            sh.close();
        });
        let client = ReplicaClient {
            shared,
            out,
            writer,
            next_id: AtomicU64::new(1),
            timeout: cfg.request_timeout,
            hello,
        };
        if !cfg.heartbeat.is_zero() {
            let out = client.out.clone();
            let shared = client.shared.clone();
            let every = cfg.heartbeat;
            // No reply at all, pings included, for a request timeout (the configured replica
            // timeout) and four more beats means the replica is gone: close, failing every
            // waiter, instead of letting callers wait out their own timeouts one by one. Derived
            // from the timeout, never a fixed second: a replica busy with a fence or a sync on a
            // loaded machine is slow, not dead. (The engine's lease, timeout + 2 beats, acts
            // before this on the IO path.)
            let dead_after = cfg.request_timeout + every * 4;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                loop {
                    tokio::select! {
                        () = shared.closed.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    if shared.silence() > dead_after {
                        shared.close();
                        break;
                    }
                    // Ping replies carry id 0 and are simply dropped by the reader; a full queue
                    // skips a beat rather than waiting.
                    let _ = out.try_send(Request { id: 0, op: Op::Ping });
                }
            });
        }
        Ok(client)
    }

    /// What the replica said in its hello reply.
    pub fn hello(&self) -> &HelloReply {
        &self.hello
    }

    /// True once the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.is_cancelled()
    }

    /// How long since the replica last answered anything (a heartbeat included): what an engine's
    /// lease is judged by.
    pub fn silence(&self) -> Duration {
        self.shared.silence()
    }

    async fn call(&self, op: Op) -> Result<Reply, ClientError> {
        self.exchange(op, None).await.map(|(r, _)| r)
    }

    /// Sends `op` and waits for its reply; `keep` (shared memory the request uses) stays in the
    /// pending table until the replica answered, and comes back with the reply.
    async fn exchange(&self, op: Op, keep: Option<Keep>) -> Result<(Reply, Option<Keep>), ClientError> {
        if self.is_closed() {
            return Err(ClientError::Closed);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let shared_memory = keep.is_some();
        self.shared.pending.lock().insert(id, Pending { waiter: Waiter::One(tx), keep });
        // Queueing counts against the timeout too: a replica that stopped reading fills the queue.
        let exchange = async {
            let req = Request { id, op };
            // A lone request (nothing else in flight or queued) leaves from here, with no hand-off
            // to the writer task; under load the writer task batches many frames per syscall.
            let idle =
                self.shared.pending.lock().len() <= 1 && self.out.capacity() == self.out.max_capacity();
            match self.writer.try_lock() {
                Ok(mut w) if idle => {
                    if let Err(e) = w.send(req).await {
                        self.shared.close();
                        return Err(wire_err(e));
                    }
                }
                _ => self.out.send(req).await.map_err(|_| ClientError::Closed)?,
            }
            rx.await.map_err(|_| ClientError::Closed)
        };
        let closed = self.shared.closed.clone();
        let outcome = tokio::select! {
            r = tokio::time::timeout(self.timeout, exchange) => r,
            () = closed.cancelled() => Ok(Err(ClientError::Closed)),
        };
        match outcome {
            Err(_) => {
                if shared_memory {
                    // The replica may still be using the slot: nothing of the area is reused.
                    self.shared.close();
                } else {
                    self.shared.pending.lock().remove(&id);
                }
                Err(ClientError::Timeout(self.timeout))
            }
            Ok(Err(e)) => {
                if shared_memory {
                    self.shared.close();
                } else {
                    self.shared.pending.lock().remove(&id);
                }
                Err(e)
            }
            Ok(Ok((r, keep))) if r.status == Status::Ok => Ok((r, keep)),
            Ok(Ok((r, _))) => Err(remote(r)),
        }
    }

    /// Whether this connection moves large payloads through shared memory.
    pub fn has_shared_memory(&self) -> bool {
        self.shared.shm.as_ref().is_some_and(|a| !a.is_dead())
    }

    /// A buffer for a write payload of `len` bytes in this connection's shared memory, if it has
    /// some and room: a write of it to this replica then moves no payload over the socket.
    pub fn write_buffer(&self, len: usize) -> Option<Slot> {
        self.shared.shm.as_ref()?.alloc(len)
    }

    pub async fn ping(&self) -> Result<(), ClientError> {
        self.call(Op::Ping).await.map(drop)
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ClientError> {
        if let Some(slot) = self.shared.shm.as_ref().and_then(|a| a.alloc(len as usize)) {
            let op = Op::ReadShm { offset, len, shm_offset: slot.offset() };
            return match self.exchange(op, Some(Keep::Slot(slot))).await? {
                (r, _) if !r.payload.is_empty() => {
                    Err(ClientError::Protocol("a shared-memory read answered with a payload".into()))
                }
                (_, Some(Keep::Slot(slot))) => Ok(slot.into_bytes()),
                _ => Err(ClientError::Protocol("a shared-memory read lost its slot".into())),
            };
        }
        let r = self.call(Op::Read { offset, len }).await?;
        if r.payload.len() != len as usize {
            return Err(ClientError::Protocol(format!("read returned {} bytes, not {len}", r.payload.len())));
        }
        Ok(r.payload)
    }

    pub async fn read_snapshot(&self, name: &str, offset: u64, len: u32) -> Result<Bytes, ClientError> {
        let r = self.call(Op::ReadSnapshot { name: name.to_owned(), offset, len }).await?;
        if r.payload.len() != len as usize {
            return Err(ClientError::Protocol(format!("read returned {} bytes, not {len}", r.payload.len())));
        }
        Ok(r.payload)
    }

    /// Writes `data`; when it lies in this connection's shared memory (see
    /// [`ReplicaClient::write_buffer`]) only its offset there crosses the socket.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ClientError> {
        let in_area = self.shared.shm.as_ref().and_then(|a| a.offset_of(&data));
        if let (Some(shm_offset), Ok(len)) = (in_area, u32::try_from(data.len())) {
            let op = Op::WriteShm { offset, len, shm_offset, fua };
            return self.exchange(op, Some(Keep::Data(data))).await.map(drop);
        }
        self.call(Op::Write { offset, data, fua }).await.map(drop)
    }

    /// Flushes; returns the flush point to pass to [`ReplicaClient::clear_intent`] once the flush
    /// completed on every member.
    pub async fn flush(&self) -> Result<u64, ClientError> {
        let r = self.call(Op::Flush).await?;
        u64_payload(&r)
    }

    /// Clears the write-intent marks a completed flush covered; returns how many were cleared.
    pub async fn clear_intent(&self, point: u64) -> Result<u64, ClientError> {
        let r = self.call(Op::ClearIntent { point }).await?;
        u64_payload(&r)
    }

    /// The write-intent marks: (region size in bytes, dirty region indexes).
    pub async fn list_intent(&self) -> Result<(u64, Vec<u64>), ClientError> {
        let r = self.call(Op::ListIntent).await?;
        if r.payload.len() < 8 || r.payload.len() % 8 != 0 {
            return Err(ClientError::Protocol("malformed intent list".into()));
        }
        let mut words = r.payload.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])));
        let size = words.next().unwrap_or(0);
        Ok((size, words.collect()))
    }

    /// Regions written in epoch `since` or later: (region size in bytes, region indexes in order).
    pub async fn list_written(&self, since: u64) -> Result<(u64, Vec<u64>), ClientError> {
        let mut out = Vec::new();
        let mut from = 0;
        loop {
            let r = self.call(Op::ListWritten { since, from }).await?;
            let words = words(&r.payload, "written list")?;
            if words.len() < 2 {
                return Err(ClientError::Protocol("malformed written list".into()));
            }
            let (size, next) = (words[0], words[1]);
            out.extend_from_slice(&words[2..]);
            if next == u64::MAX {
                return Ok((size, out));
            }
            if next < from {
                return Err(ClientError::Protocol("written list went backwards".into()));
            }
            from = next;
        }
    }

    /// Allocated extents `(offset, length)` of the head (`None`) or a snapshot, in order.
    pub async fn list_allocated(&self, snapshot: Option<&str>) -> Result<Vec<(u64, u64)>, ClientError> {
        let mut out = Vec::new();
        let mut from = 0;
        loop {
            let r = self.call(Op::ListAllocated { snapshot: snapshot.map(str::to_owned), from }).await?;
            let words = words(&r.payload, "allocation list")?;
            if words.len() % 2 != 1 {
                return Err(ClientError::Protocol("malformed allocation list".into()));
            }
            out.extend(words[1..].chunks_exact(2).map(|p| (p[0], p[1])));
            if words[0] == u64::MAX {
                return Ok(out);
            }
            if words[0] <= from {
                return Err(ClientError::Protocol("allocation list went backwards".into()));
            }
            from = words[0];
        }
    }

    pub async fn unmap(&self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.call(Op::Unmap { offset, len }).await.map(drop)
    }

    pub async fn write_zeroes(&self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.call(Op::WriteZeroes { offset, len }).await.map(drop)
    }

    pub async fn snapshot_create(&self, name: &str) -> Result<(), ClientError> {
        self.call(Op::SnapshotCreate { name: name.to_owned(), created_unix: None }).await.map(drop)
    }

    /// Creates snapshot `name` recording `created_unix` as its creation time (a rebuild
    /// recreating another replica's snapshot).
    pub async fn snapshot_create_at(&self, name: &str, created_unix: u64) -> Result<(), ClientError> {
        self.call(Op::SnapshotCreate { name: name.to_owned(), created_unix: Some(created_unix) })
            .await
            .map(drop)
    }

    pub async fn snapshot_delete(&self, name: &str) -> Result<(), ClientError> {
        self.call(Op::SnapshotDelete { name: name.to_owned() }).await.map(drop)
    }

    pub async fn snapshot_list(&self) -> Result<Vec<SnapshotEntry>, ClientError> {
        parse(&self.call(Op::SnapshotList).await?)
    }

    pub async fn stat(&self) -> Result<StatReply, ClientError> {
        parse(&self.call(Op::Stat).await?)
    }

    /// Raises the replica to `epoch` for `engine_id`; this connection then speaks for that epoch.
    pub async fn fence(&self, epoch: u64, engine_id: Uuid) -> Result<(), ClientError> {
        self.call(Op::Fence { epoch, engine_id }).await.map(drop)
    }

    pub async fn resize(&self, size: u64) -> Result<(), ClientError> {
        self.call(Op::Resize { size }).await.map(drop)
    }

    /// Streams `(offset, data)` pieces of the allocated data of the head (no name) or a snapshot.
    /// The receiver ends after the last piece; an error ends it early.
    pub async fn read_allocated(
        &self,
        snapshot: Option<&str>,
        offset: u64,
        len: u64,
    ) -> Result<mpsc::Receiver<Result<(u64, Bytes), ClientError>>, ClientError> {
        if self.is_closed() {
            return Err(ClientError::Closed);
        }
        if !len.is_multiple_of(4096) || (len >> 12) > u64::from(u32::MAX) {
            return Err(ClientError::Protocol(format!(
                "stream length {len} must be a multiple of 4096 below 16 TiB"
            )));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel::<Reply>(8);
        self.shared.pending.lock().insert(id, Pending { waiter: Waiter::Stream(tx), keep: None });
        let op = Op::ReadAllocated { snapshot: snapshot.map(str::to_owned), offset, len };
        if self.out.send(Request { id, op }).await.is_err() {
            self.shared.pending.lock().remove(&id);
            return Err(ClientError::Closed);
        }
        let (otx, orx) = mpsc::channel(8);
        let timeout = self.timeout;
        tokio::spawn(async move {
            loop {
                let item = match tokio::time::timeout(timeout, rx.recv()).await {
                    Err(_) => Err(ClientError::Timeout(timeout)),
                    Ok(None) => Err(ClientError::Closed),
                    Ok(Some(r)) if r.status != Status::Ok => Err(remote(r)),
                    Ok(Some(r)) if !r.more => break,
                    Ok(Some(mut r)) if r.payload.len() >= 8 => {
                        let at = r.payload.get_u64();
                        Ok((at, r.payload))
                    }
                    Ok(Some(_)) => Err(ClientError::Protocol("short stream piece".into())),
                };
                let stop = item.is_err();
                if otx.send(item).await.is_err() || stop {
                    break;
                }
            }
        });
        Ok(orx)
    }
}

/// Write data at least this large goes out from its own buffer in a vectored write; smaller data
/// is copied into the frame (one buffer to write instead of two).
const VECTORED_MIN: usize = 16 * 1024;
/// Buffers one vectored write takes at most (the kernel's limit is 1024).
const MAX_IOV: usize = 64;

/// Writes request frames to the connection. A write's data is not copied into a frame buffer:
/// frame heads are encoded into one buffer, and heads and data go out together in vectored
/// writes, from where the data lies (on the engine, where the NBD server read it). Measured: the
/// copy was 8 % of a three-replica volume's CPU on 128 KiB writes (docs/performance.md).
///
/// What `flush` has not written yet stays queued, so a flush cut short (a timeout) leaves no
/// partial frame behind: the next flush goes on from there.
struct FrameWriter {
    io: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    codec: ClientCodec,
    /// Encoded heads (and small data) not yet moved to `parts`.
    buf: BytesMut,
    /// What is to be written, in order.
    parts: VecDeque<Bytes>,
}

impl FrameWriter {
    fn new(io: Box<dyn tokio::io::AsyncWrite + Send + Unpin>) -> FrameWriter {
        FrameWriter { io, codec: ClientCodec::default(), buf: BytesMut::new(), parts: VecDeque::new() }
    }

    /// Queues a request; nothing is written until [`FrameWriter::flush`].
    fn feed(&mut self, req: Request) -> Result<(), wire::WireError> {
        if let Some(data) = self.codec.encode_head(req, &mut self.buf)? {
            if data.len() < VECTORED_MIN {
                self.buf.extend_from_slice(&data);
            } else {
                self.parts.push_back(self.buf.split().freeze());
                self.parts.push_back(data);
            }
        }
        Ok(())
    }

    /// Writes everything queued.
    async fn flush(&mut self) -> Result<(), wire::WireError> {
        if !self.buf.is_empty() {
            self.parts.push_back(self.buf.split().freeze());
        }
        while !self.parts.is_empty() {
            let mut n = {
                // On the stack: a flush allocates nothing of its own.
                let mut iov = [IoSlice::new(&[]); MAX_IOV];
                let k = iov.iter_mut().zip(&self.parts).map(|(slot, b)| *slot = IoSlice::new(b)).count();
                self.io.write_vectored(&iov[..k]).await?
            };
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
            }
            while n > 0 {
                let Some(front) = self.parts.front_mut() else { break };
                if front.len() <= n {
                    n -= front.len();
                    self.parts.pop_front();
                } else {
                    front.advance(n);
                    n = 0;
                }
            }
        }
        self.io.flush().await?;
        Ok(())
    }

    async fn send(&mut self, req: Request) -> Result<(), wire::WireError> {
        self.feed(req)?;
        self.flush().await
    }
}

/// The unix-socket preamble (docs/protocol.md): `S` and the memfd of `area`, or `N`.
async fn send_preamble(stream: &tokio::net::UnixStream, area: Option<&Area>) -> std::io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    use std::os::fd::{AsRawFd, RawFd};
    let fds: Vec<RawFd> = area.map(|a| a.fd().as_raw_fd()).into_iter().collect();
    let byte = if fds.is_empty() { b"N" } else { b"S" };
    stream
        .async_io(tokio::io::Interest::WRITABLE, || {
            let iov = [std::io::IoSlice::new(byte)];
            let cmsgs: Vec<ControlMessage<'_>> =
                if fds.is_empty() { Vec::new() } else { vec![ControlMessage::ScmRights(&fds)] };
            let n = sendmsg::<()>(stream.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
            if n == 1 { Ok(()) } else { Err(std::io::ErrorKind::WriteZero.into()) }
        })
        .await
}

fn u64_payload(r: &Reply) -> Result<u64, ClientError> {
    let b: [u8; 8] =
        r.payload[..].try_into().map_err(|_| ClientError::Protocol("expected 8 bytes".into()))?;
    Ok(u64::from_be_bytes(b))
}

fn wire_err(e: wire::WireError) -> ClientError {
    match e {
        wire::WireError::Io(e) => ClientError::Io(e),
        other => ClientError::Protocol(other.to_string()),
    }
}

/// A payload of big-endian u64 words, at least one.
fn words(payload: &[u8], what: &str) -> Result<Vec<u64>, ClientError> {
    if payload.len() < 8 || !payload.len().is_multiple_of(8) {
        return Err(ClientError::Protocol(format!("malformed {what}")));
    }
    Ok(payload.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8]))).collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio_util::codec::Decoder;

    /// Takes at most `step` bytes per write, from the first buffer of a vectored write only, and
    /// says "not now" every other call: the worst a socket does.
    struct Trickle {
        out: Arc<Mutex<Vec<u8>>>,
        step: usize,
        calls: usize,
    }

    impl tokio::io::AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.calls += 1;
            if self.calls.is_multiple_of(2) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = buf.len().min(self.step);
            self.out.lock().extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn data(tag: u8, len: usize) -> Bytes {
        (0..len).map(|i| tag.wrapping_add((i / 512) as u8)).collect::<Vec<u8>>().into()
    }

    #[tokio::test]
    async fn frames_survive_short_writes_and_large_data_goes_out_unchanged() {
        let out = Arc::new(Mutex::new(Vec::new()));
        for step in [1, 7, 4096, 100_000] {
            out.lock().clear();
            let mut w = FrameWriter::new(Box::new(Trickle { out: out.clone(), step, calls: 0 }));
            let ops = [
                Op::Write { offset: 0, data: data(1, 4096), fua: false },
                Op::Write { offset: 1 << 20, data: data(2, 256 * 1024), fua: true },
                Op::Ping,
                Op::Write { offset: 8192, data: data(3, VECTORED_MIN), fua: false },
                Op::Read { offset: 4096, len: 4096 },
            ];
            // Some frames fed together (one flush), then one sent alone.
            for (i, op) in ops.iter().take(4).enumerate() {
                w.feed(Request { id: i as u64 + 1, op: op.clone() }).unwrap();
            }
            w.flush().await.unwrap();
            assert!(w.parts.is_empty() && w.buf.is_empty(), "a flush writes everything queued");
            w.send(Request { id: 5, op: ops[4].clone() }).await.unwrap();
            let mut wire = BytesMut::from(&out.lock()[..]);
            let mut codec = wire::ServerCodec::default();
            for (i, op) in ops.iter().enumerate() {
                let got =
                    codec.decode(&mut wire).unwrap().unwrap_or_else(|| panic!("frame {i} (step {step})"));
                assert_eq!(got.id, i as u64 + 1);
                assert!(got.op == *op, "frame {i} (step {step}) differs");
            }
            assert!(wire.is_empty(), "nothing after the last frame (step {step})");
        }
    }
}
