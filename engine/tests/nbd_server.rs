//! The NBD server's protocol handling, on in-process connections: negotiation replies, error codes
//! for bad requests, and arbitrary bytes (proptest) that must never panic it or stop it serving
//! others. The backend here is a plain in-memory disk: these tests are about the NBD layer, and the
//! replicated backend is exercised against real replicas in the workspace tests.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::Arc;
use std::time::Duration;

use barnacle_engine::nbd::{Backend, ExportConfig, IoError, serve_connection};
use barnacle_nbd_proto::*;
use barnacle_replica::shm::{Area, Slot};
use bytes::Bytes;
use parking_lot::Mutex;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_util::sync::CancellationToken;

const SIZE: u64 = 1 << 20;

/// An in-memory disk that records any request the server should have refused before it.
struct MemDisk {
    data: Mutex<Vec<u8>>,
    leaked: std::sync::atomic::AtomicBool,
    /// Offers shared-memory write buffers, as a volume with a replica on its node does.
    area: Arc<Area>,
    /// Writes whose payload arrived in the area.
    from_area: std::sync::atomic::AtomicUsize,
}

impl MemDisk {
    fn range(&self, offset: u64, len: usize) -> Result<std::ops::Range<usize>, IoError> {
        let ok = offset.is_multiple_of(4096)
            && len.is_multiple_of(4096)
            && len > 0
            && offset.checked_add(len as u64).is_some_and(|e| e <= SIZE)
            && len <= 4 << 20;
        if ok {
            Ok(offset as usize..offset as usize + len)
        } else {
            self.leaked.store(true, std::sync::atomic::Ordering::SeqCst);
            Err(IoError::Invalid("reached the backend".into()))
        }
    }
}

impl Backend for MemDisk {
    fn size(&self) -> u64 {
        SIZE
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        let r = self.range(offset, len as usize)?;
        Ok(Bytes::copy_from_slice(&self.data.lock()[r]))
    }
    fn write_buffer(&self, len: usize) -> Option<Slot> {
        self.area.alloc(len)
    }
    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), IoError> {
        if self.area.offset_of(&data).is_some() {
            self.from_area.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        let r = self.range(offset, data.len())?;
        self.data.lock()[r].copy_from_slice(&data);
        Ok(())
    }
    async fn flush(&self) -> Result<(), IoError> {
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u32) -> Result<(), IoError> {
        let r = self.range(offset, len as usize)?;
        self.data.lock()[r].fill(0);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u32, _fua: bool) -> Result<(), IoError> {
        self.trim(offset, len).await
    }
}

type Server = tokio::task::JoinHandle<Result<(), barnacle_engine::nbd::ConnError>>;

fn start_with_disk() -> (DuplexStream, Server, Arc<MemDisk>) {
    start_with(ExportConfig::new("vol"))
}

fn start_with(cfg: ExportConfig) -> (DuplexStream, Server, Arc<MemDisk>) {
    let (client, server) = tokio::io::duplex(1 << 20);
    let disk = Arc::new(MemDisk {
        data: Mutex::new(vec![0u8; SIZE as usize]),
        leaked: Default::default(),
        area: Area::create().unwrap(),
        from_area: Default::default(),
    });
    let h = tokio::spawn(serve_connection(server, disk.clone(), cfg, CancellationToken::new()));
    (client, h, disk)
}

fn start() -> (DuplexStream, Server) {
    let (c, s, _) = start_with_disk();
    (c, s)
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

fn go(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    option(OPT_GO, &d)
}

fn request(command: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&command.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&length.to_be_bytes());
    b
}

/// Reads one option reply: (option, type, data).
async fn option_reply(c: &mut DuplexStream) -> (u32, u32, Vec<u8>) {
    assert_eq!(c.read_u64().await.unwrap(), OPT_REPLY_MAGIC);
    let opt = c.read_u32().await.unwrap();
    let typ = c.read_u32().await.unwrap();
    let len = c.read_u32().await.unwrap();
    let mut d = vec![0u8; len as usize];
    c.read_exact(&mut d).await.unwrap();
    (opt, typ, d)
}

/// Handshake up to transmission; returns the block sizes the server announced.
async fn handshake(c: &mut DuplexStream) -> (u32, u32, u32) {
    assert_eq!(c.read_u64().await.unwrap(), NBD_MAGIC);
    assert_eq!(c.read_u64().await.unwrap(), IHAVEOPT);
    let flags = c.read_u16().await.unwrap();
    assert_eq!(flags & FLAG_FIXED_NEWSTYLE, FLAG_FIXED_NEWSTYLE);
    c.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes()).await.unwrap();
    // An unknown export first: an error, and negotiation goes on.
    c.write_all(&go("nope")).await.unwrap();
    assert_eq!(option_reply(c).await.1, REP_ERR_UNKNOWN);
    // An unsupported option: an error, and negotiation goes on.
    c.write_all(&option(99, b"xyz")).await.unwrap();
    assert_eq!(option_reply(c).await.1, REP_ERR_UNSUP);
    c.write_all(&go("vol")).await.unwrap();
    let mut sizes = (0, 0, 0);
    loop {
        let (_, typ, d) = option_reply(c).await;
        match typ {
            REP_INFO if u16::from_be_bytes([d[0], d[1]]) == INFO_EXPORT => {
                assert_eq!(u64::from_be_bytes(d[2..10].try_into().unwrap()), SIZE);
            }
            REP_INFO if u16::from_be_bytes([d[0], d[1]]) == INFO_BLOCK_SIZE => {
                let g = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().unwrap());
                sizes = (g(2), g(6), g(10));
            }
            REP_INFO => {}
            REP_ACK => return sizes,
            other => panic!("unexpected reply {other:#x}"),
        }
    }
}

async fn reply(c: &mut DuplexStream) -> (u32, u64) {
    assert_eq!(c.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
    (c.read_u32().await.unwrap(), c.read_u64().await.unwrap())
}

#[tokio::test]
async fn large_write_payloads_are_read_into_the_backends_buffer() {
    let (mut c, server, disk) = start_with_disk();
    handshake(&mut c).await;
    // Pipelined: 16 KiB to 512 KiB payloads go to the backend's buffers, others to the heap.
    let sizes = [4096usize, 16384, 131_072, 524_288, 262_144, 65536];
    let mut offset = 0u64;
    let mut expect = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let mut w = request(CMD_WRITE, i as u64, offset, n as u32);
        let fill: Vec<u8> = (0..n).map(|j| (j as u8) ^ (i as u8 * 31)).collect();
        w.extend_from_slice(&fill);
        c.write_all(&w).await.unwrap();
        expect.push((offset, fill));
        offset += n as u64;
    }
    let mut cookies: Vec<u64> = Vec::new();
    for _ in &sizes {
        let (err, cookie) = reply(&mut c).await;
        assert_eq!(err, 0);
        cookies.push(cookie);
    }
    cookies.sort_unstable();
    assert_eq!(cookies, (0..sizes.len() as u64).collect::<Vec<_>>());
    assert_eq!(disk.from_area.load(std::sync::atomic::Ordering::SeqCst), 5);
    for (i, (offset, fill)) in expect.iter().enumerate() {
        c.write_all(&request(CMD_READ, 100 + i as u64, *offset, fill.len() as u32)).await.unwrap();
        assert_eq!(reply(&mut c).await, (0, 100 + i as u64));
        let mut got = vec![0u8; fill.len()];
        c.read_exact(&mut got).await.unwrap();
        assert!(got == *fill, "write {i} of {} bytes read back different", fill.len());
    }
    assert_eq!(disk.area.free_units(), 32, "every buffer went back");
    c.write_all(&request(CMD_DISC, 200, 0, 0)).await.unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn pipelined_writes_sent_in_odd_pieces_land_whole_with_or_without_a_buffer() {
    // Requests cut at arbitrary points: a read of the server's can end anywhere in a header or a
    // payload, so each payload is partly in the server's read buffer and partly still in the
    // stream. Once with the backend's buffers, once without (its area dead: the heap path).
    for with_area in [true, false] {
        let (mut c, server, disk) = start_with_disk();
        if !with_area {
            disk.area.kill();
        }
        handshake(&mut c).await;
        let sizes = [4096usize, 131_072, 69_632, 8192, 262_144, 16384, 4096, 200_704];
        let mut stream = Vec::new();
        let mut expect = Vec::new();
        let mut offset = 0u64;
        for (i, &n) in sizes.iter().enumerate() {
            stream.extend_from_slice(&request(CMD_WRITE, i as u64, offset, n as u32));
            let fill: Vec<u8> = (0..n).map(|j| (j as u8).wrapping_mul(7) ^ (i as u8 * 31)).collect();
            stream.extend_from_slice(&fill);
            expect.push((offset, fill));
            offset += n as u64;
        }
        for piece in stream.chunks(12_345) {
            c.write_all(piece).await.unwrap();
            tokio::task::yield_now().await;
        }
        for _ in &sizes {
            assert_eq!(reply(&mut c).await.0, 0);
        }
        let from_area = disk.from_area.load(std::sync::atomic::Ordering::SeqCst);
        if with_area {
            assert_eq!(from_area, 5, "the 16 KiB to 512 KiB writes used the buffers");
        } else {
            assert_eq!(from_area, 0);
        }
        for (i, (offset, fill)) in expect.iter().enumerate() {
            c.write_all(&request(CMD_READ, 100 + i as u64, *offset, fill.len() as u32)).await.unwrap();
            assert_eq!(reply(&mut c).await, (0, 100 + i as u64));
            let mut got = vec![0u8; fill.len()];
            c.read_exact(&mut got).await.unwrap();
            assert!(
                got == *fill,
                "write {i} of {} bytes read back different (area: {with_area})",
                fill.len()
            );
        }
        c.write_all(&request(CMD_DISC, 200, 0, 0)).await.unwrap();
        server.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn a_read_only_export_says_so_and_refuses_every_change() {
    let mut cfg = ExportConfig::new("vol");
    cfg.read_only = true;
    let (mut c, server, disk) = start_with(cfg);
    disk.data.lock()[..4096].fill(0x77);
    // The flags in the export info carry READ_ONLY.
    assert_eq!(c.read_u64().await.unwrap(), NBD_MAGIC);
    assert_eq!(c.read_u64().await.unwrap(), IHAVEOPT);
    c.read_u16().await.unwrap();
    c.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes()).await.unwrap();
    c.write_all(&go("vol")).await.unwrap();
    let mut flags = None;
    loop {
        let (_, typ, d) = option_reply(&mut c).await;
        if typ == REP_ACK {
            break;
        }
        if typ == REP_INFO && u16::from_be_bytes([d[0], d[1]]) == INFO_EXPORT {
            flags = Some(u16::from_be_bytes([d[10], d[11]]));
        }
    }
    assert_eq!(flags.map(|f| f & TFLAG_READ_ONLY), Some(TFLAG_READ_ONLY));
    let mut w = request(CMD_WRITE, 1, 0, 4096);
    w.extend_from_slice(&[1; 4096]);
    c.write_all(&w).await.unwrap();
    assert_eq!(reply(&mut c).await, (EPERM, 1));
    c.write_all(&request(CMD_TRIM, 2, 0, 4096)).await.unwrap();
    assert_eq!(reply(&mut c).await, (EPERM, 2));
    c.write_all(&request(CMD_WRITE_ZEROES, 3, 0, 4096)).await.unwrap();
    assert_eq!(reply(&mut c).await, (EPERM, 3));
    // Reads still work, and nothing changed.
    c.write_all(&request(CMD_READ, 4, 0, 4096)).await.unwrap();
    assert_eq!(reply(&mut c).await, (0, 4));
    let mut data = vec![0u8; 4096];
    c.read_exact(&mut data).await.unwrap();
    assert!(data.iter().all(|&b| b == 0x77));
    c.write_all(&request(CMD_DISC, 5, 0, 0)).await.unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn negotiation_and_request_errors() {
    let (mut c, server) = start();
    assert_eq!(handshake(&mut c).await, (4096, 64 * 1024, 4 << 20));
    // Write, read back.
    let mut w = request(CMD_WRITE, 1, 8192, 4096);
    w.extend_from_slice(&[0x5a; 4096]);
    c.write_all(&w).await.unwrap();
    assert_eq!(reply(&mut c).await, (0, 1));
    c.write_all(&request(CMD_READ, 2, 8192, 4096)).await.unwrap();
    assert_eq!(reply(&mut c).await, (0, 2));
    let mut data = vec![0u8; 4096];
    c.read_exact(&mut data).await.unwrap();
    assert!(data.iter().all(|&b| b == 0x5a));
    // Errors, each with its cookie: unaligned, beyond the end (read and write), too large, unknown.
    let cases: Vec<(Vec<u8>, u64, u32)> = vec![
        (request(CMD_READ, 3, 100, 4096), 3, EINVAL),
        (request(CMD_READ, 4, SIZE, 4096), 4, EINVAL),
        (request(CMD_TRIM, 5, SIZE - 4096, 8192), 5, ENOSPC),
        (request(CMD_READ, 6, 0, 8 << 20), 6, EINVAL),
        (request(77, 7, 0, 4096), 7, EINVAL),
        (request(CMD_READ, 8, u64::MAX - 4095, 4096), 8, EINVAL),
    ];
    for (req, cookie, errno) in cases {
        c.write_all(&req).await.unwrap();
        assert_eq!(reply(&mut c).await, (errno, cookie));
    }
    let mut w = request(CMD_WRITE, 9, SIZE, 4096);
    w.extend_from_slice(&[1; 4096]);
    c.write_all(&w).await.unwrap();
    assert_eq!(reply(&mut c).await, (ENOSPC, 9));
    // Still serving: flush, then disconnect cleanly.
    c.write_all(&request(CMD_FLUSH, 10, 0, 0)).await.unwrap();
    assert_eq!(reply(&mut c).await, (0, 10));
    c.write_all(&request(CMD_DISC, 11, 0, 0)).await.unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_bad_handshake_closes_only_that_connection() {
    let (mut c, server) = start();
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).await.unwrap();
    c.write_all(&CLIENT_FIXED_NEWSTYLE.to_be_bytes()).await.unwrap();
    c.write_all(b"NOTMAGIC\0\0\0\x07\0\0\0\0").await.unwrap();
    assert!(server.await.unwrap().is_err());
    // Another connection is unaffected.
    let (mut c2, _s2) = start();
    handshake(&mut c2).await;
}

async fn feed(bytes: Vec<u8>) {
    let (mut c, server, disk) = start_with_disk();
    let writer = async {
        let _ = c.write_all(&bytes).await;
        let _ = c.shutdown().await;
        let mut sink = vec![0u8; 1 << 16];
        while let Ok(n) = c.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    let res = tokio::time::timeout(Duration::from_secs(5), server).await.expect("server hung on garbage");
    assert!(res.is_ok(), "server task panicked: {res:?}");
    assert!(!disk.leaked.load(std::sync::atomic::Ordering::SeqCst), "an invalid request reached the backend");
}

fn prelude() -> Vec<u8> {
    let mut b = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes().to_vec();
    b.extend_from_slice(&go("vol"));
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Arbitrary bytes during negotiation.
    #[test]
    fn arbitrary_negotiation_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        tokio::runtime::Runtime::new().unwrap().block_on(feed(bytes));
    }

    /// A valid negotiation followed by arbitrary, and by well-framed random, requests.
    #[test]
    fn arbitrary_requests_never_panic(
        tail in prop::collection::vec(any::<u8>(), 0..512),
        reqs in prop::collection::vec((any::<u16>(), 0u16..10, any::<u64>(), any::<u32>(), any::<u64>()), 0..16),
    ) {
        let mut bytes = prelude();
        for (flags, cmd, cookie, len, off) in reqs {
            let mut r = REQUEST_MAGIC.to_be_bytes().to_vec();
            r.extend_from_slice(&flags.to_be_bytes());
            r.extend_from_slice(&cmd.to_be_bytes());
            r.extend_from_slice(&cookie.to_be_bytes());
            // Small offsets and lengths half the time, so some requests are valid.
            let (off, len) = if cookie % 2 == 0 { ((off % 256) * 4096, (len % 4) * 4096) } else { (off, len % (1 << 16)) };
            r.extend_from_slice(&off.to_be_bytes());
            r.extend_from_slice(&len.to_be_bytes());
            if cmd == CMD_WRITE {
                r.extend(std::iter::repeat_n(0xAB, len as usize));
            }
            bytes.extend_from_slice(&r);
        }
        bytes.extend_from_slice(&tail);
        tokio::runtime::Runtime::new().unwrap().block_on(feed(bytes));
    }
}

#[tokio::test(start_paused = true)]
async fn a_client_that_never_negotiates_is_dropped() {
    let (mut c, server) = start();
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).await.unwrap();
    // Say nothing; with time paused, the timeout elapses at once.
    let res =
        tokio::time::timeout(barnacle_engine::nbd::NEGOTIATION_TIMEOUT * 2, server).await.unwrap().unwrap();
    assert!(res.is_err(), "a silent client must be dropped");
}
