//! An NBD client for the userspace attach: fixed newstyle negotiation with `OPT_GO`, then
//! pipelined requests over one connection, answered out of order by cookie.
//!
//! [`Client`] reconnects when the connection breaks (an engine restart) and sends again every
//! request that had no reply: reads, writes of the same bytes and flushes are safe to repeat.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use barnacle_nbd_proto::*;
use bytes::{Buf, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;
use tracing::{info, warn};

/// Why an NBD operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("negotiation: {0}")]
    Negotiation(String),
    /// The server answered the request with this errno.
    #[error("server error {0}")]
    Errno(u32),
    #[error("the engine is unreachable: {0}")]
    Unreachable(String),
}

/// What the server said about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub min_block: u32,
    pub max_block: u32,
}

impl ExportInfo {
    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }
}

fn neg(msg: impl Into<String>) -> NbdError {
    NbdError::Negotiation(msg.into())
}

/// Negotiates `export` on a fresh stream with `OPT_GO` (or `OPT_INFO` when `go` is false, which
/// leaves the stream in negotiation).
pub async fn negotiate(s: &mut UnixStream, export: &str, go: bool) -> Result<ExportInfo, NbdError> {
    if s.read_u64().await? != NBD_MAGIC || s.read_u64().await? != IHAVEOPT {
        return Err(neg("not a newstyle NBD server"));
    }
    let server_flags = s.read_u16().await?;
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(neg("the server does not speak fixed newstyle"));
    }
    let client_flags =
        CLIENT_FIXED_NEWSTYLE | if server_flags & FLAG_NO_ZEROES != 0 { CLIENT_NO_ZEROES } else { 0 };
    s.write_all(&client_flags.to_be_bytes()).await?;
    let d = encode_info_request(export, &[INFO_BLOCK_SIZE]).ok_or_else(|| neg("export name too long"))?;
    let opt = if go { OPT_GO } else { OPT_INFO };
    s.write_all(&encode_option(opt, &d)).await?;
    let mut info = ExportInfo { size: 0, flags: 0, min_block: 1, max_block: 32 << 20 };
    let mut have_export = false;
    loop {
        if s.read_u64().await? != OPT_REPLY_MAGIC {
            return Err(neg("bad option reply magic"));
        }
        let _opt = s.read_u32().await?;
        let typ = s.read_u32().await?;
        let len = s.read_u32().await?;
        if len > MAX_OPTION_LEN {
            return Err(neg(format!("option reply of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;
        match typ {
            REP_ACK => break,
            REP_INFO => match parse_info(&data) {
                Some(Info::Export { size, flags }) => {
                    info.size = size;
                    info.flags = flags;
                    have_export = true;
                }
                Some(Info::BlockSize { min, max, .. }) => {
                    info.min_block = min;
                    info.max_block = max;
                }
                // Other information, or a malformed reply (ignored, as before).
                _ => {}
            },
            t if t & (1 << 31) != 0 => {
                return Err(neg(format!(
                    "export {export:?} refused ({t:#x}): {}",
                    String::from_utf8_lossy(&data)
                )));
            }
            t => return Err(neg(format!("unexpected option reply {t:#x}"))),
        }
    }
    if !have_export {
        return Err(neg("no export information"));
    }
    if !go {
        s.write_all(&encode_option(OPT_ABORT, &[])).await?;
    }
    Ok(info)
}

/// Asks the server at `socket` about `export` without opening it (size, flags), within `timeout`.
pub async fn probe(
    socket: &std::path::Path,
    export: &str,
    timeout: Duration,
) -> Result<ExportInfo, NbdError> {
    let work = async {
        let mut s = UnixStream::connect(socket).await?;
        negotiate(&mut s, export, false).await
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| {
        NbdError::Unreachable(format!("{} did not answer within {timeout:?}", socket.display()))
    })?
}

type Waiter = oneshot::Sender<Result<Option<Bytes>, NbdError>>;

/// A request waiting for its reply; reads say how many payload bytes follow a success.
struct Waiting {
    read_len: Option<usize>,
    waiter: Waiter,
}

type Pending = Arc<Mutex<HashMap<u64, Waiting>>>;

/// One negotiated connection: requests are written under a lock, replies read by a task.
struct Conn {
    wr: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    closed: tokio_util::sync::CancellationToken,
}

impl Conn {
    async fn open(socket: &std::path::Path, export: &str) -> Result<(Arc<Conn>, ExportInfo), NbdError> {
        let mut s = UnixStream::connect(socket).await?;
        let info = negotiate(&mut s, export, true).await?;
        let (rd, wr) = s.into_split();
        let pending: Pending = Arc::default();
        let closed = tokio_util::sync::CancellationToken::new();
        tokio::spawn(read_replies(BufReader::with_capacity(256 * 1024, rd), pending.clone(), closed.clone()));
        Ok((Arc::new(Conn { wr: tokio::sync::Mutex::new(wr), pending, closed }), info))
    }

    /// Sends one request and waits for its reply.
    async fn call(
        &self,
        cookie: u64,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<&Bytes>,
    ) -> Result<Option<Bytes>, NbdError> {
        let (tx, rx) = oneshot::channel();
        let read_len = (command == CMD_READ).then_some(length as usize);
        self.pending.lock().insert(cookie, Waiting { read_len, waiter: tx });
        if self.closed.is_cancelled() {
            self.pending.lock().remove(&cookie);
            return Err(NbdError::Unreachable("connection closed".into()));
        }
        let head = encode_request(&RequestHeader { flags, command, cookie, offset, length });
        // Head and payload leave in one vectored write: sent apart, the server can wake for the
        // head alone and then wait again for the payload (a second wake-up per write).
        let sent: std::io::Result<()> = async {
            let mut wr = self.wr.lock().await;
            match payload {
                Some(p) => wr.write_all_buf(&mut Buf::chain(&head[..], p.clone())).await,
                None => wr.write_all(&head).await,
            }
        }
        .await;
        if let Err(e) = sent {
            self.pending.lock().remove(&cookie);
            self.closed.cancel();
            return Err(e.into());
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(NbdError::Unreachable("connection closed before the reply".into())),
        }
    }
}

async fn read_replies(
    mut rd: BufReader<OwnedReadHalf>,
    pending: Pending,
    closed: tokio_util::sync::CancellationToken,
) {
    let res: Result<(), NbdError> = async {
        loop {
            let mut head = [0u8; SIMPLE_REPLY_LEN];
            tokio::select! {
                r = rd.read_exact(&mut head) => { r?; }
                () = closed.cancelled() => return Ok(()),
            };
            let (errno, cookie) = parse_simple_reply(&head).map_err(|e| neg(e.to_string()))?;
            let Some(w) = pending.lock().remove(&cookie) else {
                return Err(neg(format!("reply to unknown cookie {cookie}")));
            };
            let mut data = None;
            if errno == 0
                && let Some(len) = w.read_len
            {
                let mut buf = BytesMut::zeroed(len);
                rd.read_exact(&mut buf).await?;
                data = Some(buf.freeze());
            }
            let _ = w.waiter.send(if errno == 0 { Ok(data) } else { Err(NbdError::Errno(errno)) });
        }
    }
    .await;
    if let Err(e) = res {
        warn!(error = %e, "NBD connection lost");
    }
    closed.cancel();
    // Fail everything still waiting: the caller reconnects and sends it again.
    pending.lock().clear();
}

/// A client of one export that reconnects when the connection breaks.
pub struct Client {
    socket: PathBuf,
    export: String,
    conn: tokio::sync::RwLock<Option<Arc<Conn>>>,
    info: Mutex<ExportInfo>,
    next: AtomicU64,
    /// How long a request keeps trying to reconnect before it fails.
    patience: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("socket", &self.socket)
            .field("export", &self.export)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects and negotiates; fails at once if the server is not there.
    pub async fn connect(socket: PathBuf, export: String, patience: Duration) -> Result<Client, NbdError> {
        let (conn, info) = Conn::open(&socket, &export).await?;
        Ok(Client {
            socket,
            export,
            conn: tokio::sync::RwLock::new(Some(conn)),
            info: Mutex::new(info),
            next: AtomicU64::new(1),
            patience,
        })
    }

    pub fn info(&self) -> ExportInfo {
        *self.info.lock()
    }

    /// Asks the server for the export's size again (after an expansion) and keeps it.
    pub async fn refresh(&self) -> Result<ExportInfo, NbdError> {
        let info = probe(&self.socket, &self.export, Duration::from_secs(10)).await?;
        *self.info.lock() = info;
        Ok(info)
    }

    /// A live connection, reconnecting if the last one closed.
    async fn conn(&self) -> Result<Arc<Conn>, NbdError> {
        if let Some(c) = self.conn.read().await.as_ref()
            && !c.closed.is_cancelled()
        {
            return Ok(c.clone());
        }
        let mut slot = self.conn.write().await;
        if let Some(c) = slot.as_ref()
            && !c.closed.is_cancelled()
        {
            return Ok(c.clone());
        }
        let deadline = tokio::time::Instant::now() + self.patience;
        let mut delay = Duration::from_millis(50);
        loop {
            match Conn::open(&self.socket, &self.export).await {
                Ok((c, info)) => {
                    info!(export = %self.export, size = info.size, "NBD connection re-established");
                    *self.info.lock() = info;
                    *slot = Some(c.clone());
                    return Ok(c);
                }
                Err(e) if tokio::time::Instant::now() + delay > deadline => {
                    return Err(NbdError::Unreachable(format!("{}: {e}", self.socket.display())));
                }
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Sends a request, again on a new connection when the connection breaks before the reply.
    async fn request(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<Bytes>,
    ) -> Result<Option<Bytes>, NbdError> {
        let deadline = tokio::time::Instant::now() + self.patience;
        loop {
            let conn = self.conn().await?;
            let cookie = self.next.fetch_add(1, Ordering::Relaxed);
            match conn.call(cookie, command, flags, offset, length, payload.as_ref()).await {
                Err(NbdError::Io(_) | NbdError::Unreachable(_)) if tokio::time::Instant::now() < deadline => {
                    conn.closed.cancel();
                }
                other => return other,
            }
        }
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, NbdError> {
        Ok(self.request(CMD_READ, 0, offset, len, None).await?.unwrap_or_default())
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), NbdError> {
        let len = u32::try_from(data.len()).map_err(|_| NbdError::Errno(EINVAL))?;
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.request(CMD_WRITE, flags, offset, len, Some(data)).await.map(|_| ())
    }

    pub async fn flush(&self) -> Result<(), NbdError> {
        self.request(CMD_FLUSH, 0, 0, 0, None).await.map(|_| ())
    }

    pub async fn trim(&self, offset: u64, len: u32) -> Result<(), NbdError> {
        self.request(CMD_TRIM, 0, offset, len, None).await.map(|_| ())
    }

    /// Makes the range read as zeros (the server may unmap it).
    pub async fn write_zeroes(&self, offset: u64, len: u32) -> Result<(), NbdError> {
        self.request(CMD_WRITE_ZEROES, 0, offset, len, None).await.map(|_| ())
    }
}
