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

use bytes::{Buf, Bytes};
use futures::{SinkExt, StreamExt};
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

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
    One(oneshot::Sender<Reply>),
    Stream(mpsc::Sender<Reply>),
}

struct Shared {
    pending: Mutex<HashMap<u64, Waiter>>,
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
}

/// A connected, authenticated client. Dropping it closes the connection.
pub struct ReplicaClient {
    shared: Arc<Shared>,
    out: mpsc::Sender<Request>,
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
        Self::start(Box::new(rd), Box::new(wr), cfg).await
    }

    /// Connects to `address`: `HOST:PORT` (TCP) or `unix:PATH` (a replica on this node).
    pub async fn connect_to(address: &str, cfg: ClientConfig) -> Result<ReplicaClient, ClientError> {
        match address.strip_prefix("unix:") {
            Some(path) => {
                let stream = tokio::time::timeout(cfg.request_timeout, tokio::net::UnixStream::connect(path))
                    .await
                    .map_err(|_| ClientError::Timeout(cfg.request_timeout))??;
                let (rd, wr) = stream.into_split();
                Self::start(Box::new(rd), Box::new(wr), cfg).await
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
    ) -> Result<ReplicaClient, ClientError> {
        let mut reader = FramedRead::new(rd, ClientCodec::default());
        let mut writer = FramedWrite::new(wr, ClientCodec::default());
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
            closed: CancellationToken::new(),
            born: std::time::Instant::now(),
            last_reply_ms: AtomicU64::new(0),
        });
        let (out, mut out_rx) = mpsc::channel::<Request>(256);
        let closed = shared.closed.clone();
        tokio::spawn(async move {
            let write = async {
                while let Some(req) = out_rx.recv().await {
                    writer.feed(req).await?;
                    while let Ok(req) = out_rx.try_recv() {
                        writer.feed(req).await?;
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
                    let w = pending.remove(&reply.id);
                    if let (Some(Waiter::Stream(tx)), true) = (&w, reply.more) {
                        pending.insert(reply.id, Waiter::Stream(tx.clone()));
                    }
                    w
                };
                match waiter {
                    Some(Waiter::One(tx)) => {
                        let _ = tx.send(reply);
                    }
                    Some(Waiter::Stream(tx)) => {
                        // A slow stream consumer slows this connection: the stream is for bulk
                        // copies that own their connection.
                        let _ = tx.send(reply).await;
                    }
                    None => {}
                }
            }
            sh.closed.cancel();
            // Fail everything still waiting.
            sh.pending.lock().clear();
        });
        let client =
            ReplicaClient { shared, out, next_id: AtomicU64::new(1), timeout: cfg.request_timeout, hello };
        if !cfg.heartbeat.is_zero() {
            let out = client.out.clone();
            let shared = client.shared.clone();
            let every = cfg.heartbeat;
            // No reply at all for this long means the replica is gone: close, failing every
            // waiter, instead of letting callers wait out their own timeouts one by one.
            let dead_after = (every * 4).max(Duration::from_secs(1));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                loop {
                    tokio::select! {
                        () = shared.closed.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    if shared.silence() > dead_after {
                        shared.closed.cancel();
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
        if self.is_closed() {
            return Err(ClientError::Closed);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.shared.pending.lock().insert(id, Waiter::One(tx));
        // Queueing counts against the timeout too: a replica that stopped reading fills the queue.
        let exchange = async {
            self.out.send(Request { id, op }).await.map_err(|_| ClientError::Closed)?;
            rx.await.map_err(|_| ClientError::Closed)
        };
        let closed = self.shared.closed.clone();
        let outcome = tokio::select! {
            r = tokio::time::timeout(self.timeout, exchange) => r,
            () = closed.cancelled() => Ok(Err(ClientError::Closed)),
        };
        match outcome {
            Err(_) => {
                self.shared.pending.lock().remove(&id);
                Err(ClientError::Timeout(self.timeout))
            }
            Ok(Err(e)) => {
                self.shared.pending.lock().remove(&id);
                Err(e)
            }
            Ok(Ok(r)) if r.status == Status::Ok => Ok(r),
            Ok(Ok(r)) => Err(remote(r)),
        }
    }

    pub async fn ping(&self) -> Result<(), ClientError> {
        self.call(Op::Ping).await.map(drop)
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ClientError> {
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

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ClientError> {
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
        self.shared.pending.lock().insert(id, Waiter::Stream(tx));
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
