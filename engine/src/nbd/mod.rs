//! The NBD frontend: fixed newstyle negotiation (`OPT_GO`, `OPT_INFO`, `OPT_LIST`, `OPT_ABORT`,
//! `OPT_EXPORT_NAME`) and the transmission phase with simple replies (`READ`, `WRITE` with FUA,
//! `FLUSH`, `TRIM`, `WRITE_ZEROES`, `DISC`), over any byte stream (TCP, unix socket).
//!
//! Requests are read as fast as the in-flight limit allows and run against the [`Backend`], all
//! driven by the connection's one task; replies leave in completion order. Large write payloads
//! are read into the backend's shared memory when it offers some ([`Backend::write_buffer`]). The export advertises a 4 KiB minimum block
//! size (DESIGN rule 4); unaligned requests get `EINVAL`. Multi-connection is advertised because a
//! flush goes to every replica and each replica's flush covers every write it acknowledged, whatever
//! connection it came from.

use std::future::Future;
use std::sync::Arc;

use barnacle_replica::shm::Slot;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use barnacle_nbd_proto::*;

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
    /// Advertise the export read-only and refuse writes, trims and zeroes with EPERM (a readonly
    /// publication).
    pub read_only: bool,
}

impl ExportConfig {
    pub fn new(name: &str) -> Self {
        ExportConfig {
            name: name.to_owned(),
            min_block: 4096,
            preferred_block: 64 * 1024,
            max_block: barnacle_replica::wire::MAX_IO,
            max_in_flight: 128,
            read_only: false,
        }
    }

    fn transmission_flags(&self) -> u16 {
        TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
            | TFLAG_CAN_MULTI_CONN
            | if self.read_only { TFLAG_READ_ONLY } else { 0 }
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
                wr.write_all(&export_name_reply(backend.size(), cfg.transmission_flags(), no_zeroes)).await?;
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
                    wr.write_all(&option_reply(option, REP_SERVER, &encode_server_reply(&cfg.name))).await?;
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
                    let mut infos =
                        vec![Info::Export { size: backend.size(), flags: cfg.transmission_flags() }];
                    if req.requests.contains(&INFO_BLOCK_SIZE) {
                        infos.push(Info::BlockSize {
                            min: cfg.min_block,
                            preferred: cfg.preferred_block,
                            max: cfg.max_block,
                        });
                    }
                    if req.requests.contains(&INFO_NAME) {
                        infos.push(Info::Name(cfg.name.clone()));
                    }
                    if req.requests.contains(&INFO_DESCRIPTION) {
                        infos.push(Info::Description("Barnacle replicated volume".into()));
                    }
                    for info in &infos {
                        wr.write_all(&option_reply(option, REP_INFO, &encode_info(info))).await?;
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

/// What the request reader produced: a request to run (with its write payload), or the end.
enum Incoming {
    Request(RequestHeader, Option<Bytes>),
    Disconnect,
}

/// Reads one request (and a write's payload) from `rd`, handing `rd` back for the next one, so
/// the read survives being raced against completions.
async fn read_request<R, B>(
    mut rd: tokio::io::BufReader<R>,
    backend: Arc<B>,
    max_block: u32,
) -> (tokio::io::BufReader<R>, Result<Incoming, ConnError>)
where
    R: AsyncRead + Unpin,
    B: Backend,
{
    let r = read_request_from(&mut rd, backend.as_ref(), max_block).await;
    (rd, r)
}

async fn read_request_from<R, B>(
    rd: &mut tokio::io::BufReader<R>,
    backend: &B,
    max_block: u32,
) -> Result<Incoming, ConnError>
where
    R: AsyncRead + Unpin,
    B: Backend,
{
    let mut head = [0u8; REQUEST_LEN];
    match rd.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Incoming::Disconnect),
        Err(e) => return Err(e.into()),
    }
    let h = parse_request(&head).map_err(|e| ConnError::Protocol(e.to_string()))?;
    if h.command == CMD_DISC {
        debug!("client disconnected");
        return Ok(Incoming::Disconnect);
    }
    if h.command != CMD_WRITE {
        return Ok(Incoming::Request(h, None));
    }
    // A write's payload is read before anything else, so the stream stays in step even when the
    // write is refused; one above the largest block is skipped, not buffered.
    if h.length > max_block {
        let skipped = tokio::io::copy(&mut rd.take(u64::from(h.length)), &mut tokio::io::sink()).await?;
        if skipped != u64::from(h.length) {
            return Ok(Incoming::Disconnect);
        }
        return Ok(Incoming::Request(h, None));
    }
    if let Some(mut slot) = backend.write_buffer(h.length as usize) {
        // Straight into shared memory: the local replica writes it from there.
        read_payload(rd, slot.as_mut_slice()).await?;
        return Ok(Incoming::Request(h, Some(slot.into_bytes())));
    }
    // Read straight into uninitialised capacity: no zeroing of every payload.
    let len = h.length as usize;
    let mut buf = BytesMut::with_capacity(len);
    let held = rd.buffer().len().min(len);
    buf.extend_from_slice(&rd.buffer()[..held]);
    std::pin::Pin::new(&mut *rd).consume(held);
    while buf.len() < len {
        let want = (len - buf.len()) as u64;
        if rd.get_mut().take(want).read_buf(&mut buf).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
    }
    Ok(Incoming::Request(h, Some(buf.freeze())))
}

/// Fills `out` with a write's payload: what the reader's buffer already holds, then the rest
/// straight from the stream. (`BufReader` alone reads a rest shorter than its capacity into its
/// buffer first and copies it a second time.)
async fn read_payload<R: AsyncRead + Unpin>(
    rd: &mut tokio::io::BufReader<R>,
    out: &mut [u8],
) -> std::io::Result<()> {
    let held = rd.buffer().len().min(out.len());
    out[..held].copy_from_slice(&rd.buffer()[..held]);
    std::pin::Pin::new(&mut *rd).consume(held);
    rd.get_mut().read_exact(&mut out[held..]).await.map(drop)
}

/// Runs one request against the backend; returns its reply.
async fn run_request<B: Backend>(
    b: Arc<B>,
    cfg: &ExportConfig,
    h: RequestHeader,
    payload: Option<Bytes>,
) -> Outgoing {
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let no_hole = h.flags & CMD_FLAG_NO_HOLE != 0;
    let size = b.size();
    if cfg.read_only && matches!(h.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) {
        debug!(command = h.command, offset = h.offset, "write refused: the export is read-only");
        return (simple_reply(EPERM, h.cookie), None);
    }
    let outcome: Result<Option<Bytes>, IoError> = match h.command {
        CMD_READ => match check(cfg, size, &h, true) {
            Err(e) => Err(e),
            Ok(()) if h.length > cfg.max_block => {
                Err(IoError::Invalid(format!("read of {} bytes exceeds {}", h.length, cfg.max_block)))
            }
            Ok(()) => b.read(h.offset, h.length).await.map(Some),
        },
        CMD_WRITE => match (check(cfg, size, &h, false), payload) {
            (Err(e), _) => Err(e),
            (Ok(()), _) if h.length > cfg.max_block => {
                Err(IoError::Invalid(format!("write of {} bytes exceeds {}", h.length, cfg.max_block)))
            }
            (Ok(()), Some(data)) => b.write(h.offset, data, fua).await.map(|()| None),
            (Ok(()), None) => Err(IoError::Invalid("write without data".into())),
        },
        CMD_FLUSH => b.flush().await.map(|()| None),
        CMD_TRIM => match check(cfg, size, &h, false) {
            Err(e) => Err(e),
            Ok(()) => {
                let r = b.trim(h.offset, h.length).await;
                match (r, fua) {
                    (Ok(()), true) => b.flush().await.map(|()| None),
                    (r, _) => r.map(|()| None),
                }
            }
        },
        CMD_WRITE_ZEROES => match check(cfg, size, &h, false) {
            Err(e) => Err(e),
            // NO_HOLE: the range must stay allocated, so zeros are written, not punched.
            Ok(()) if no_hole => write_zeros(b.as_ref(), h.offset, h.length, cfg.max_block, fua).await,
            Ok(()) => b.write_zeroes(h.offset, h.length, fua).await.map(|()| None),
        },
        other => Err(IoError::Invalid(format!("command {other} not supported"))),
    };
    match outcome {
        Ok(data) => (simple_reply(0, h.cookie), data),
        Err(e) => {
            debug!(command = h.command, offset = h.offset, length = h.length, error = %e, "request failed");
            (simple_reply(e.errno(), h.cookie), None)
        }
    }
}

/// Writes one reply into the buffered writer.
async fn send_reply<W: AsyncWrite + Unpin>(wr: &mut W, (head, data): &Outgoing) -> std::io::Result<()> {
    wr.write_all(head).await?;
    if let Some(d) = data {
        wr.write_all(d).await?;
    }
    Ok(())
}

/// The transmission phase. One task reads requests, drives every request in flight and writes
/// the replies as they complete, so a request costs no task hand-offs of its own: a small request
/// is read, sent to the replicas and answered by the task its replicas' answers wake.
///
/// A request once read always runs to completion, whatever happens to the connection: dropping a
/// write half-way could leave replicas applying it while the engine believes it finished.
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
    use futures::FutureExt;
    use futures::stream::{FuturesUnordered, StreamExt};
    // Buffered both ways: small requests and replies share syscalls; payloads larger than the
    // buffer go straight through.
    let rd = tokio::io::BufReader::with_capacity(64 * 1024, rd);
    let mut wr = tokio::io::BufWriter::with_capacity(64 * 1024, wr);
    let max_in_flight = cfg.max_in_flight.max(1);
    let mut in_flight = FuturesUnordered::new();
    // The request being read: kept across iterations, so a completion never cuts a read short.
    let mut next = Some(Box::pin(read_request(rd, backend.clone(), cfg.max_block)));
    let result: Result<(), ConnError> = loop {
        if next.is_none() && in_flight.is_empty() {
            break Ok(());
        }
        let can_read = next.is_some() && in_flight.len() < max_in_flight;
        let reading = async {
            match next.as_mut() {
                Some(f) => f.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break Ok(()),
            Some(reply) = in_flight.next(), if !in_flight.is_empty() => {
                // Every reply ready now goes out in one write.
                let mut sent = send_reply(&mut wr, &reply).await;
                while sent.is_ok() {
                    match in_flight.next().now_or_never() {
                        Some(Some(r)) => sent = send_reply(&mut wr, &r).await,
                        _ => break,
                    }
                }
                if let Err(e) = sent {
                    break Err(e.into());
                }
                if let Err(e) = wr.flush().await {
                    break Err(e.into());
                }
            }
            (rd, incoming) = reading, if can_read => {
                match incoming {
                    Ok(Incoming::Request(h, payload)) => {
                        next = Some(Box::pin(read_request(rd, backend.clone(), cfg.max_block)));
                        in_flight.push(run_request(backend.clone(), &cfg, h, payload));
                    }
                    Ok(Incoming::Disconnect) => next = None,
                    Err(e) => break Err(e),
                }
            }
        }
    };
    // Requests already read run to completion; their replies go out while the connection
    // still takes them (a client that sent DISC still gets its answers).
    let mut writable = result.is_ok();
    while let Some(reply) = in_flight.next().await {
        if writable && send_reply(&mut wr, &reply).await.is_err() {
            writable = false;
        }
    }
    if writable && let Err(e) = wr.flush().await {
        warn!(error = %e, "writing replies failed");
    }
    result
}
