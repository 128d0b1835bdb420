//! Serving gRPC on a unix socket to every client the kubelet's generation of grpc-go makes.
//!
//! A kubelet before 1.26 (grpc-go before it set `localhost`) sends the socket's *path* as the
//! HTTP/2 `:authority` of every call to a CSI driver or plugin-registration socket, e.g.
//! `/var/lib/kubelet/plugins/csi.barnacle.dev/csi.sock`. That is no URI authority, and the h2
//! server under tonic resets such a stream with PROTOCOL_ERROR, so the driver never registers.
//!
//! [`FixAuthority`] sits between the socket and the server and rewrites the client's request
//! headers: every HEADERS/CONTINUATION header block is HPACK-decoded (with the client's dynamic
//! table), an `:authority` that is not a valid authority becomes `localhost`, and the block is
//! encoded again with an encoder of our own whose dynamic table the server's decoder mirrors.
//! Every other frame, and everything the server sends, passes through byte for byte. A
//! connection that does not open with the HTTP/2 preface passes through untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame payload every HTTP/2 peer accepts (SETTINGS_MAX_FRAME_SIZE's minimum).
const MAX_FRAME: usize = 16_384;
/// A header block larger than this is refused (the connection fails) rather than buffered.
const MAX_BLOCK: usize = 1 << 20;

/// The `:authority` given when the client's is not a valid one.
pub const REPLACEMENT_AUTHORITY: &str = "localhost";

enum State {
    /// Waiting for the 24-byte client preface.
    Preface,
    /// At a frame boundary.
    Frames,
    /// Copying the rest of a frame that needs no change.
    Passing(usize),
    /// Not HTTP/2 with prior knowledge: everything passes.
    Transparent,
}

/// A header block being collected over HEADERS and CONTINUATION frames.
struct Block {
    stream: u32,
    end_stream: bool,
    /// The HEADERS frame's priority fields, if it had them.
    priority: Option<[u8; 5]>,
    fragment: BytesMut,
}

/// A server-side connection whose client's `:authority` headers are made valid (see the module
/// docs). Reads are rewritten; writes pass through.
pub struct FixAuthority<S> {
    inner: S,
    state: State,
    /// Bytes read from the client, not yet looked at.
    input: BytesMut,
    /// Bytes ready for the server.
    output: BytesMut,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    eof: bool,
    /// How many `:authority` values were replaced (for tests and logs).
    rewritten: u64,
}

impl<S> std::fmt::Debug for FixAuthority<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FixAuthority").field("rewritten", &self.rewritten).finish_non_exhaustive()
    }
}

impl<S> FixAuthority<S> {
    pub fn new(inner: S) -> FixAuthority<S> {
        FixAuthority {
            inner,
            state: State::Preface,
            input: BytesMut::with_capacity(MAX_FRAME + FRAME_HEADER),
            output: BytesMut::new(),
            block: None,
            decoder: loona_hpack::Decoder::new(),
            encoder: loona_hpack::Encoder::new(),
            eof: false,
            rewritten: 0,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// How many `:authority` headers were replaced so far.
    pub fn rewritten(&self) -> u64 {
        self.rewritten
    }

    /// Moves what can be decided from `input` to `output`. Returns false when more input is
    /// needed.
    fn step(&mut self) -> io::Result<bool> {
        match self.state {
            State::Transparent => {
                if self.input.is_empty() {
                    return Ok(false);
                }
                let all = self.input.split();
                self.output.extend_from_slice(&all);
                Ok(true)
            }
            State::Preface => {
                let n = self.input.len().min(PREFACE.len());
                if self.input[..n] != PREFACE[..n] {
                    self.state = State::Transparent;
                    return Ok(true);
                }
                if n < PREFACE.len() {
                    return Ok(false);
                }
                let preface = self.input.split_to(PREFACE.len());
                self.output.extend_from_slice(&preface);
                self.state = State::Frames;
                Ok(true)
            }
            State::Passing(left) => {
                if self.input.is_empty() {
                    return Ok(false);
                }
                let n = left.min(self.input.len());
                let part = self.input.split_to(n);
                self.output.extend_from_slice(&part);
                self.state = if n == left { State::Frames } else { State::Passing(left - n) };
                Ok(true)
            }
            State::Frames => {
                if self.input.len() < FRAME_HEADER {
                    return Ok(false);
                }
                let len = (usize::from(self.input[0]) << 16)
                    | (usize::from(self.input[1]) << 8)
                    | usize::from(self.input[2]);
                let kind = self.input[3];
                if kind != HEADERS && kind != CONTINUATION {
                    let header = self.input.split_to(FRAME_HEADER);
                    self.output.extend_from_slice(&header);
                    self.state = if len == 0 { State::Frames } else { State::Passing(len) };
                    return Ok(true);
                }
                if len > MAX_BLOCK {
                    return Err(invalid(format!("a header frame of {len} bytes")));
                }
                if self.input.len() < FRAME_HEADER + len {
                    return Ok(false);
                }
                let mut frame = self.input.split_to(FRAME_HEADER + len);
                let flags = frame[4];
                let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
                frame.advance(FRAME_HEADER);
                self.header_frame(kind, flags, stream, frame)?;
                Ok(true)
            }
        }
    }

    fn header_frame(&mut self, kind: u8, flags: u8, stream: u32, mut payload: BytesMut) -> io::Result<()> {
        if kind == HEADERS {
            if self.block.is_some() {
                return Err(invalid("HEADERS while a header block is open".into()));
            }
            if flags & PADDED != 0 {
                let pad =
                    usize::from(*payload.first().ok_or_else(|| invalid("empty padded HEADERS".into()))?);
                payload.advance(1);
                if pad > payload.len() {
                    return Err(invalid("HEADERS padding longer than the frame".into()));
                }
                payload.truncate(payload.len() - pad);
            }
            let priority = if flags & PRIORITY != 0 {
                if payload.len() < 5 {
                    return Err(invalid("HEADERS priority fields cut short".into()));
                }
                let mut p = [0u8; 5];
                p.copy_from_slice(&payload[..5]);
                payload.advance(5);
                Some(p)
            } else {
                None
            };
            self.block =
                Some(Block { stream, end_stream: flags & END_STREAM != 0, priority, fragment: payload });
        } else {
            let block = self.block.as_mut().ok_or_else(|| invalid("CONTINUATION without HEADERS".into()))?;
            if block.stream != stream {
                return Err(invalid("CONTINUATION on another stream".into()));
            }
            if block.fragment.len() + payload.len() > MAX_BLOCK {
                return Err(invalid("a header block over 1 MiB".into()));
            }
            block.fragment.extend_from_slice(&payload);
        }
        if flags & END_HEADERS != 0 {
            let block = self.block.take().ok_or_else(|| invalid("no header block".into()))?;
            self.rewrite(block)?;
        }
        Ok(())
    }

    fn rewrite(&mut self, block: Block) -> io::Result<()> {
        let mut headers = self
            .decoder
            .decode(&block.fragment)
            .map_err(|e| invalid(format!("undecodable header block: {e:?}")))?;
        for (name, value) in &mut headers {
            if name.as_slice() == b":authority" && http::uri::Authority::try_from(value.as_slice()).is_err() {
                *value = REPLACEMENT_AUTHORITY.as_bytes().to_vec();
                self.rewritten += 1;
            }
        }
        let encoded = self.encoder.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let mut first = Vec::with_capacity(5 + encoded.len().min(MAX_FRAME));
        let mut flags = if block.end_stream { END_STREAM } else { 0 };
        if let Some(p) = block.priority {
            first.extend_from_slice(&p);
            flags |= PRIORITY;
        }
        let room = MAX_FRAME - first.len();
        let (head, mut rest) = encoded.split_at(encoded.len().min(room));
        first.extend_from_slice(head);
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        self.frame(HEADERS, flags, block.stream, &first);
        while !rest.is_empty() {
            let (part, more) = rest.split_at(rest.len().min(MAX_FRAME));
            self.frame(CONTINUATION, if more.is_empty() { END_HEADERS } else { 0 }, block.stream, part);
            rest = more;
        }
        Ok(())
    }

    fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        self.output.put_slice(&len.to_be_bytes()[1..]);
        self.output.put_u8(kind);
        self.output.put_u8(flags);
        self.output.put_u32(stream);
        self.output.put_slice(payload);
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("HTTP/2 from the client: {msg}"))
}

impl<S: AsyncRead + Unpin> AsyncRead for FixAuthority<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.step()? {
                continue;
            }
            if this.eof {
                // A frame cut short by the client's close is dropped; the server sees the close.
                return Poll::Ready(Ok(()));
            }
            this.input.reserve(MAX_FRAME);
            let mut chunk = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                this.eof = true;
            } else {
                this.input.extend_from_slice(rb.filled());
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FixAuthority<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for FixAuthority<tokio::net::UnixStream> {
    type ConnectInfo = tonic::transport::server::UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// The connections of `listener`, each wrapped in [`FixAuthority`], for tonic's
/// `serve_with_incoming*`.
pub fn incoming(
    listener: tokio::net::UnixListener,
) -> impl tokio_stream::Stream<Item = io::Result<FixAuthority<tokio::net::UnixStream>>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::UnixListenerStream::new(listener).map(|c| c.map(FixAuthority::new))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(0).to_be_bytes()[1..]);
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Runs `input` through the rewriter in pieces of `chunk` bytes; returns the output.
    async fn through(input: &[u8], chunk: usize) -> (Vec<u8>, u64) {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let data = input.to_vec();
        let writer = tokio::spawn(async move {
            for piece in data.chunks(chunk) {
                tokio::io::AsyncWriteExt::write_all(&mut client, piece).await.ok();
            }
        });
        let mut fixed = FixAuthority::new(server);
        let mut out = Vec::new();
        let reading = async {
            let mut buf = [0u8; 100];
            loop {
                match fixed.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                }
            }
        };
        let _ = tokio::join!(writer, reading);
        let n = fixed.rewritten();
        (out, n)
    }

    /// Splits HTTP/2 bytes after the preface into (kind, flags, stream, payload).
    fn frames(mut b: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        b = &b[PREFACE.len()..];
        let mut out = Vec::new();
        while b.len() >= FRAME_HEADER {
            let len = (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]);
            let stream = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
            out.push((b[3], b[4], stream, b[FRAME_HEADER..FRAME_HEADER + len].to_vec()));
            b = &b[FRAME_HEADER + len..];
        }
        out
    }

    fn request(authority: &[u8]) -> Vec<(&'static [u8], Vec<u8>)> {
        vec![
            (b":method", b"POST".to_vec()),
            (b":scheme", b"http".to_vec()),
            (b":path", b"/csi.v1.Node/NodeGetInfo".to_vec()),
            (b":authority", authority.to_vec()),
            (b"content-type", b"application/grpc".to_vec()),
        ]
    }

    #[tokio::test]
    async fn a_socket_path_authority_becomes_localhost_and_the_rest_passes_unchanged() {
        let mut client = loona_hpack::Encoder::new();
        let path = b"/var/lib/kubelet/plugins/csi.barnacle.dev/csi.sock";
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        // Two requests: the second refers to the first's dynamic-table entries.
        for stream in [1u32, 3] {
            let h = request(path);
            let block = client.encode(h.iter().map(|(n, v)| (*n, v.as_slice())));
            // Split over HEADERS (padded, with priority) and a CONTINUATION.
            let (a, b) = block.split_at(block.len() / 2);
            let mut headers = vec![3u8, 0, 0, 0, 0, 16];
            headers.extend_from_slice(a);
            headers.extend_from_slice(&[0, 0, 0]);
            input.extend(frame(HEADERS, PADDED | PRIORITY, stream, &headers));
            input.extend(frame(CONTINUATION, END_HEADERS, stream, b));
            input.extend(frame(0x0, END_STREAM, stream, b"\0\0\0\0\x05hello"));
        }
        for chunk in [1, 7, 4096] {
            let (out, n) = through(&input, chunk).await;
            assert_eq!(n, 2, "chunk {chunk}");
            assert!(out.starts_with(PREFACE));
            let mut server = loona_hpack::Decoder::new();
            let fs = frames(&out);
            let kinds: Vec<u8> = fs.iter().map(|f| f.0).collect();
            assert_eq!(kinds, [0x4, HEADERS, 0x0, HEADERS, 0x0], "chunk {chunk}");
            for (i, stream) in [(1usize, 1u32), (3, 3)] {
                let (_, flags, s, payload) = &fs[i];
                assert_eq!(*s, stream);
                assert_eq!(flags & (END_HEADERS | PRIORITY), END_HEADERS | PRIORITY);
                assert_eq!(&payload[..5], &[0, 0, 0, 0, 16], "priority kept");
                let decoded = server.decode(&payload[5..]).map_err(|e| format!("{e:?}"));
                let want: Vec<(Vec<u8>, Vec<u8>)> =
                    request(b"localhost").into_iter().map(|(n, v)| (n.to_vec(), v)).collect();
                assert_eq!(decoded, Ok(want));
                assert_eq!(fs[i + 1].3, b"\0\0\0\0\x05hello");
                assert_eq!(fs[i + 1].1, END_STREAM);
            }
        }
    }

    #[tokio::test]
    async fn a_valid_authority_is_kept_and_non_http2_passes_through() {
        let mut client = loona_hpack::Encoder::new();
        let h = request(b"localhost:1234");
        let block = client.encode(h.iter().map(|(n, v)| (*n, v.as_slice())));
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &block));
        let (out, n) = through(&input, 5).await;
        assert_eq!(n, 0);
        let fs = frames(&out);
        let decoded = loona_hpack::Decoder::new().decode(&fs[0].3).map_err(|e| format!("{e:?}"));
        assert_eq!(decoded.map(|d| d[3].1.clone()), Ok(b"localhost:1234".to_vec()));
        assert_eq!(fs[0].1, END_HEADERS | END_STREAM);

        let other = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(through(&other, 3).await, (other, 0));
    }

    #[tokio::test]
    async fn a_large_header_block_is_split_into_continuations() {
        let mut client = loona_hpack::Encoder::new();
        let big = vec![b'x'; 40_000];
        let mut h = request(b"/run/x.sock");
        h.push((b"x-big", big.clone()));
        let block = client.encode(h.iter().map(|(n, v)| (*n, v.as_slice())));
        let mut input = PREFACE.to_vec();
        for (i, part) in block.chunks(MAX_FRAME).enumerate() {
            let last = (i + 1) * MAX_FRAME >= block.len();
            let kind = if i == 0 { HEADERS } else { CONTINUATION };
            input.extend(frame(kind, if last { END_HEADERS } else { 0 }, 5, part));
        }
        let (out, n) = through(&input, 1000).await;
        assert_eq!(n, 1);
        let fs = frames(&out);
        assert!(fs.len() >= 3 && fs.iter().all(|f| f.3.len() <= MAX_FRAME));
        assert_eq!(fs[0].0, HEADERS);
        assert!(fs[1..].iter().all(|f| f.0 == CONTINUATION));
        assert_eq!(fs.last().map(|f| f.1), Some(END_HEADERS));
        let all: Vec<u8> = fs.iter().flat_map(|f| f.3.clone()).collect();
        let decoded = loona_hpack::Decoder::new().decode(&all).unwrap_or_default();
        assert_eq!(decoded[3].1, b"localhost");
        assert_eq!(decoded[5].1, big);
    }

    #[tokio::test]
    async fn malformed_header_frames_fail_the_connection() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b"abc"));
        let (mut client, server) = tokio::io::duplex(4096);
        tokio::io::AsyncWriteExt::write_all(&mut client, &input).await.ok();
        let mut fixed = FixAuthority::new(server);
        let mut buf = vec![0u8; 4096];
        let _preface = fixed.read(&mut buf).await;
        let e = fixed.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }
}
