//! The NBD frontend: fixed newstyle negotiation (`OPT_GO`, `OPT_INFO`, `OPT_LIST`, `OPT_ABORT`,
//! `OPT_EXPORT_NAME`) and the transmission phase with simple replies (`READ`, `WRITE` with FUA,
//! `FLUSH`, `TRIM`, `WRITE_ZEROES`, `DISC`), over any byte stream (TCP, unix socket).
//!
//! Requests are read as fast as the in-flight limit allows, each runs as its own task against the
//! [`Backend`], and replies leave in completion order. The export advertises a 4 KiB minimum block
//! size (DESIGN rule 4); unaligned requests get `EINVAL`. Multi-connection is advertised because a
//! flush goes to every replica and each replica's flush covers every write it acknowledged, whatever
//! connection it came from.

pub mod proto;

use std::future::Future;
use std::sync::Arc;

use barnacle_replica::shm::Slot;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use self::proto::*;

/// How long a client may take to negotiate an export.
pub const NEGOTIATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Why an IO failed, as the NBD client will see it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IoError {
    #[error("IO error: {0}")]
    Io(String),
    #[error("no space left")]
    NoSpace,
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("the engine is shutting down")]
    Shutdown,
}

impl IoError {
    /// The errno value sent to the NBD client.
    pub fn errno(&self) -> u32 {
        match self {
            IoError::Io(_) => EIO,
            IoError::NoSpace => ENOSPC,
            IoError::Invalid(_) => EINVAL,
            IoError::Shutdown => ESHUTDOWN,
        }
    }
}

/// What an export serves: the volume (replicated in production).
pub trait Backend: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = Result<Bytes, IoError>> + Send;
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> impl Future<Output = Result<(), IoError>> + Send;
    fn flush(&self) -> impl Future<Output = Result<(), IoError>> + Send;
    fn trim(&self, offset: u64, len: u32) -> impl Future<Output = Result<(), IoError>> + Send;
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = Result<(), IoError>> + Send;
    /// Where to put a write payload of `len` bytes so the backend moves it without copying (shared
    /// memory with a replica on this node); `None`: an ordinary buffer. Required, so a wrapper
    /// cannot silently lose it.
    fn write_buffer(&self, len: usize) -> Option<Slot>;
}

/// How an export presents itself.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// The export's name; the empty name (the default export) is accepted too.
    pub name: String,
    pub min_block: u32,
    pub preferred_block: u32,
    /// Largest read or write payload.
    pub max_block: u32,
    /// Requests one connection may have in flight.
    pub max_in_flight: usize,
}

impl ExportConfig {
    pub fn new(name: &str) -> Self {
        ExportConfig {
            name: name.to_owned(),
            min_block: 4096,
            preferred_block: 64 * 1024,
            max_block: barnacle_replica::wire::MAX_IO,
            max_in_flight: 128,
        }
    }

    fn transmission_flags(&self) -> u16 {
        TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
            | TFLAG_CAN_MULTI_CONN
    }
}

/// Ends a connection: an IO error on the stream or a protocol violation.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// Serves one client connection until it disconnects, violates the protocol, or `shutdown` fires.
pub async fn serve_connection<S, B>(
    stream: S,
    backend: Arc<B>,
    cfg: ExportConfig,
    shutdown: CancellationToken,
) -> Result<(), ConnError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    B: Backend,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    // A client that stalls in the handshake is dropped rather than kept forever.
    let negotiated =
        tokio::time::timeout(NEGOTIATION_TIMEOUT, negotiate(&mut rd, &mut wr, backend.as_ref(), &cfg))
            .await
            .map_err(|_| ConnError::Protocol(format!("no export chosen within {NEGOTIATION_TIMEOUT:?}")))?;
    if !negotiated? {
        return Ok(());
    }
    transmission(rd, wr, backend, cfg, shutdown).await
}

/// The handshake. `Ok(true)` moves on to transmission; `Ok(false)` means the client aborted.
async fn negotiate<R, W, B>(
    rd: &mut R,
    wr: &mut W,
    backend: &B,
    cfg: &ExportConfig,
) -> Result<bool, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    B: Backend,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    wr.write_all(&hello).await?;
    wr.flush().await?;
    let client_flags = rd.read_u32().await?;
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(ConnError::Protocol(format!("unknown client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    loop {
        let magic = rd.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(ConnError::Protocol(format!("bad option magic {magic:#x}")));
        }
        let option = rd.read_u32().await?;
        let len = rd.read_u32().await?;
        if len > MAX_OPTION_LEN {
            return Err(ConnError::Protocol(format!("option of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        rd.read_exact(&mut data).await?;
        let name_ok = |n: &str| n.is_empty() || n == cfg.name;
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                if !name_ok(&name) {
                    // This option has no error reply: the protocol says to close.
                    return Err(ConnError::Protocol(format!("unknown export {name:?}")));
                }
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&backend.size().to_be_bytes());
                b.extend_from_slice(&cfg.transmission_flags().to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                wr.write_all(&b).await?;
                wr.flush().await?;
                return Ok(true);
            }
            OPT_ABORT => {
                wr.write_all(&option_reply(option, REP_ACK, &[])).await?;
                wr.flush().await?;
                return Ok(false);
            }
            OPT_LIST => {
                if data.is_empty() {
                    let mut d = Vec::new();
                    d.extend_from_slice(&u32::try_from(cfg.name.len()).unwrap_or(0).to_be_bytes());
                    d.extend_from_slice(cfg.name.as_bytes());
                    wr.write_all(&option_reply(option, REP_SERVER, &d)).await?;
                    wr.write_all(&option_reply(option, REP_ACK, &[])).await?;
                } else {
                    wr.write_all(&option_reply(option, REP_ERR_INVALID, b"OPT_LIST takes no data")).await?;
                }
            }
            OPT_STARTTLS => {
                wr.write_all(&option_reply(option, REP_ERR_POLICY, b"TLS is not offered")).await?;
            }
            OPT_INFO | OPT_GO => match parse_info_request(&data) {
                None => wr.write_all(&option_reply(option, REP_ERR_INVALID, b"malformed request")).await?,
                Some(req) if !name_ok(&req.name) => {
                    wr.write_all(&option_reply(option, REP_ERR_UNKNOWN, b"no such export")).await?;
                }
                Some(req) => {
                    let mut export = Vec::with_capacity(12);
                    export.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                    export.extend_from_slice(&backend.size().to_be_bytes());
                    export.extend_from_slice(&cfg.transmission_flags().to_be_bytes());
                    wr.write_all(&option_reply(option, REP_INFO, &export)).await?;
                    if req.requests.contains(&INFO_BLOCK_SIZE) {
                        let mut bs = Vec::with_capacity(14);
                        bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                        bs.extend_from_slice(&cfg.min_block.to_be_bytes());
                        bs.extend_from_slice(&cfg.preferred_block.to_be_bytes());
                        bs.extend_from_slice(&cfg.max_block.to_be_bytes());
                        wr.write_all(&option_reply(option, REP_INFO, &bs)).await?;
                    }
                    if req.requests.contains(&INFO_NAME) {
                        let mut n = INFO_NAME.to_be_bytes().to_vec();
                        n.extend_from_slice(cfg.name.as_bytes());
                        wr.write_all(&option_reply(option, REP_INFO, &n)).await?;
                    }
                    if req.requests.contains(&INFO_DESCRIPTION) {
                        let mut n = INFO_DESCRIPTION.to_be_bytes().to_vec();
                        n.extend_from_slice(b"Barnacle replicated volume");
                        wr.write_all(&option_reply(option, REP_INFO, &n)).await?;
                    }
                    wr.write_all(&option_reply(option, REP_ACK, &[])).await?;
                    if option == OPT_GO {
                        wr.flush().await?;
                        return Ok(true);
                    }
                }
            },
            _ => wr.write_all(&option_reply(option, REP_ERR_UNSUP, b"option not supported")).await?,
        }
        wr.flush().await?;
    }
}

/// Writes real zeros over `[offset, offset+len)` in pieces of at most `max` bytes.
async fn write_zeros<B: Backend>(
    b: &B,
    offset: u64,
    len: u32,
    max: u32,
    fua: bool,
) -> Result<Option<Bytes>, IoError> {
    let zeros = Bytes::from(vec![0u8; len.min(max) as usize]);
    let mut done = 0u32;
    while done < len {
        let n = (len - done).min(max);
        b.write(offset + u64::from(done), zeros.slice(..n as usize), false).await?;
        done += n;
    }
    if fua {
        b.flush().await?;
    }
    Ok(None)
}

/// A reply ready to be written: header and, for reads, data.
type Outgoing = ([u8; 16], Option<Bytes>);

/// Checks a request's range: alignment, then bounds (reads: EINVAL, others: ENOSPC).
fn check(cfg: &ExportConfig, size: u64, h: &RequestHeader, is_read: bool) -> Result<(), IoError> {
    let min = u64::from(cfg.min_block);
    if h.length == 0 || !h.offset.is_multiple_of(min) || !u64::from(h.length).is_multiple_of(min) {
        return Err(IoError::Invalid(format!("{}+{} is not aligned to {min}", h.offset, h.length)));
    }
    match h.offset.checked_add(u64::from(h.length)) {
        Some(end) if end <= size => Ok(()),
        _ if is_read => Err(IoError::Invalid(format!("{}+{} is beyond the end", h.offset, h.length))),
        _ => Err(IoError::NoSpace),
    }
}

async fn transmission<R, W, B>(
    rd: R,
    wr: W,
    backend: Arc<B>,
    cfg: ExportConfig,
    shutdown: CancellationToken,
) -> Result<(), ConnError>
where
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
    B: Backend,
{
    // Buffered both ways: small requests and replies share syscalls; payloads larger than the
    // buffer go straight through.
    let mut rd = tokio::io::BufReader::with_capacity(64 * 1024, rd);
    let mut wr = tokio::io::BufWriter::with_capacity(64 * 1024, wr);
    let (tx, mut rx) = mpsc::channel::<Outgoing>(cfg.max_in_flight.max(1));
    let writer = tokio::spawn(async move {
        while let Some((head, data)) = rx.recv().await {
            wr.write_all(&head).await?;
            if let Some(d) = data {
                wr.write_all(&d).await?;
            }
            while let Ok((head, data)) = rx.try_recv() {
                wr.write_all(&head).await?;
                if let Some(d) = data {
                    wr.write_all(&d).await?;
                }
            }
            wr.flush().await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let tasks = TaskTracker::new();
    let limit = Arc::new(Semaphore::new(cfg.max_in_flight.max(1)));
    let result = loop {
        let mut head = [0u8; REQUEST_LEN];
        let read = tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            r = rd.read_exact(&mut head) => r,
        };
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e.into()),
        }
        let h = match parse_request(&head) {
            Ok(h) => h,
            Err(e) => break Err(ConnError::Protocol(e.to_string())),
        };
        let fua = h.flags & CMD_FLAG_FUA != 0;
        let no_hole = h.flags & CMD_FLAG_NO_HOLE != 0;
        if h.command == CMD_DISC {
            debug!("client disconnected");
            break Ok(());
        }
        // The permit comes before the payload, so buffered payloads are bounded by the in-flight
        // limit times the largest block.
        let Ok(permit) = limit.clone().acquire_owned().await else { break Ok(()) };
        // A write's payload is read before anything else, so the stream stays in step even when the
        // write is refused; one above the largest block is skipped, not buffered.
        let payload = if h.command == CMD_WRITE {
            if h.length > cfg.max_block {
                let skipped =
                    tokio::io::copy(&mut (&mut rd).take(u64::from(h.length)), &mut tokio::io::sink()).await;
                match skipped {
                    Ok(n) if n == u64::from(h.length) => None,
                    Ok(_) => break Ok(()),
                    Err(e) => break Err(e.into()),
                }
            } else if let Some(mut slot) = backend.write_buffer(h.length as usize) {
                // Straight into shared memory: the local replica writes it from there.
                match rd.read_exact(slot.as_mut_slice()).await {
                    Ok(_) => Some(slot.into_bytes()),
                    Err(e) => break Err(e.into()),
                }
            } else {
                // Read straight into uninitialised capacity: no zeroing of every payload.
                let len = h.length as usize;
                let mut buf = BytesMut::with_capacity(len);
                let mut failed = None;
                while buf.len() < len {
                    let want = (len - buf.len()) as u64;
                    match (&mut rd).take(want).read_buf(&mut buf).await {
                        Ok(0) => {
                            failed = Some(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
                            break;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                if let Some(e) = failed {
                    break Err(e.into());
                }
                Some(buf.freeze())
            }
        } else {
            None
        };
        let (b, tx, cfg2) = (backend.clone(), tx.clone(), cfg.clone());
        tasks.spawn(async move {
            let size = b.size();
            let outcome: Result<Option<Bytes>, IoError> = match h.command {
                CMD_READ => match check(&cfg2, size, &h, true) {
                    Err(e) => Err(e),
                    Ok(()) if h.length > cfg2.max_block => {
                        Err(IoError::Invalid(format!("read of {} bytes exceeds {}", h.length, cfg2.max_block)))
                    }
                    Ok(()) => b.read(h.offset, h.length).await.map(Some),
                },
                CMD_WRITE => match (check(&cfg2, size, &h, false), payload) {
                    (Err(e), _) => Err(e),
                    (Ok(()), _) if h.length > cfg2.max_block => {
                        Err(IoError::Invalid(format!("write of {} bytes exceeds {}", h.length, cfg2.max_block)))
                    }
                    (Ok(()), Some(data)) => b.write(h.offset, data, fua).await.map(|()| None),
                    (Ok(()), None) => Err(IoError::Invalid("write without data".into())),
                },
                CMD_FLUSH => b.flush().await.map(|()| None),
                CMD_TRIM => match check(&cfg2, size, &h, false) {
                    Err(e) => Err(e),
                    Ok(()) => {
                        let r = b.trim(h.offset, h.length).await;
                        match (r, fua) {
                            (Ok(()), true) => b.flush().await.map(|()| None),
                            (r, _) => r.map(|()| None),
                        }
                    }
                },
                CMD_WRITE_ZEROES => match check(&cfg2, size, &h, false) {
                    Err(e) => Err(e),
                    // NO_HOLE: the range must stay allocated, so zeros are written, not punched.
                    Ok(()) if no_hole => write_zeros(b.as_ref(), h.offset, h.length, cfg2.max_block, fua).await,
                    Ok(()) => b.write_zeroes(h.offset, h.length, fua).await.map(|()| None),
                },
                other => Err(IoError::Invalid(format!("command {other} not supported"))),
            };
            let reply = match outcome {
                Ok(data) => (simple_reply(0, h.cookie), data),
                Err(e) => {
                    debug!(command = h.command, offset = h.offset, length = h.length, error = %e, "request failed");
                    (simple_reply(e.errno(), h.cookie), None)
                }
            };
            let _ = tx.send(reply).await;
            drop(permit);
        });
    };
    tasks.close();
    tasks.wait().await;
    drop(tx);
    match writer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "writing replies failed"),
        Err(e) => warn!(error = %e, "reply writer panicked"),
    }
    result
}
