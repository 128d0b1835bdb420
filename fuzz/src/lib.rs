//! Fuzz harnesses for what Barnacle reads from other processes. Each takes arbitrary bytes and
//! must neither panic nor hang, and checks what it can besides:
//!
//! - [`nbd_server`]: the bytes are everything an NBD client sends (handshake, options, requests);
//!   the engine's real NBD server answers them over an in-memory stream against a RAM disk that
//!   panics if a request outside the export, unaligned or oversized ever reaches it.
//! - [`replica_frames`]: the bytes are a stream of replica data-protocol frames, decoded by both
//!   codecs; every request decoded is encoded again and must decode to the same request.
//! - [`store_requests`]: the bytes are a sequence of store calls (reads, writes, unmaps, zeroes,
//!   snapshots, resizes, flushes) with arbitrary offsets, lengths and names, against a real
//!   replica store on disk: bad ones must be refused with an error, and a write that succeeded
//!   must read back.
//!
//! `fuzz/targets` runs them under libFuzzer (`bench/fuzz.sh`); `tests/corpus.rs` runs the committed
//! corpora (`fuzz/corpus/<harness>/`) through them in the ordinary test suite.

use std::sync::Arc;
use std::time::Duration;

use barnacle_engine::nbd::{Backend, ExportConfig, IoError, serve_connection};
use barnacle_replica::shm::Slot;
use barnacle_replica::store::{CreateOptions, Store};
use barnacle_replica::wire::{ClientCodec, Op, Request, ServerCodec};
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::{Decoder, Encoder};
use tokio_util::sync::CancellationToken;

/// The RAM disk behind the fuzzed NBD server.
const DISK: u64 = 1 << 20;
#[allow(clippy::cast_possible_truncation)]
const DISK_BYTES: usize = DISK as usize;

struct RamDisk {
    data: Mutex<Vec<u8>>,
    max_block: u32,
}

impl RamDisk {
    /// The buffer range of a request; panics (a finding) if the server let a bad one through.
    /// Reads and writes (`payload`) are also bounded by the export's maximum block; trims and
    /// zeroes carry no payload and may be longer.
    fn range(&self, offset: u64, len: usize, payload: bool) -> std::ops::Range<usize> {
        let end = offset.checked_add(len as u64);
        assert!(
            offset.is_multiple_of(4096)
                && len.is_multiple_of(4096)
                && len > 0
                && (!payload || len <= self.max_block as usize)
                && end.is_some_and(|e| e <= DISK),
            "the NBD server passed a bad request to its backend: offset {offset}, length {len}"
        );
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        start..start + len
    }
}

impl Backend for RamDisk {
    fn size(&self) -> u64 {
        DISK
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        let r = self.range(offset, len as usize, true);
        Ok(Bytes::copy_from_slice(&self.data.lock()[r]))
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), IoError> {
        let r = self.range(offset, data.len(), true);
        self.data.lock()[r].copy_from_slice(&data);
        Ok(())
    }

    async fn flush(&self) -> Result<(), IoError> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), IoError> {
        let r = self.range(offset, len as usize, false);
        self.data.lock()[r].fill(0);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u32, _fua: bool) -> Result<(), IoError> {
        self.trim(offset, len).await
    }

    fn write_buffer(&self, _len: usize) -> Option<Slot> {
        None
    }
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
}

/// Feeds `data` to the engine's NBD server as one client connection's bytes.
pub fn nbd_server(data: &[u8]) {
    // Small limits keep each input cheap; the checks are the same.
    let mut cfg = ExportConfig::new("vol");
    cfg.max_block = 64 << 10;
    cfg.max_in_flight = 4;
    let disk = Arc::new(RamDisk { data: Mutex::new(vec![0; DISK_BYTES]), max_block: cfg.max_block });
    RUNTIME.with(|rt| {
        rt.block_on(async {
            let (client, server) = tokio::io::duplex(64 << 10);
            let (mut rd, mut wr) = tokio::io::split(client);
            let feed = async move {
                // The server may hang up first: that is its right.
                let _ = wr.write_all(data).await;
                let _ = wr.shutdown().await;
            };
            let drain = async move {
                let mut sink = Vec::new();
                let _ = rd.read_to_end(&mut sink).await;
            };
            let serve = serve_connection(server, disk, cfg, CancellationToken::new());
            let all = async { tokio::join!(feed, drain, serve) };
            // A server that keeps a closed connection open is a finding too.
            // Refusing the connection (a protocol violation) is a fine answer to garbage.
            let ((), (), _served) =
                tokio::time::timeout(Duration::from_secs(10), all).await.expect("the NBD server hung");
        });
    });
}

/// Decodes `data` as replica frames with both codecs; requests must survive a round trip.
pub fn replica_frames(data: &[u8]) {
    for max_frame in [barnacle_replica::wire::MAX_FRAME, 64] {
        let mut buf = BytesMut::from(data);
        let mut server = ServerCodec { max_frame };
        while let Ok(Some(req)) = server.decode(&mut buf) {
            if matches!(req.op, Op::Invalid { .. } | Op::Unknown { .. }) {
                continue;
            }
            let mut again = BytesMut::new();
            let Ok(()) =
                ClientCodec::default().encode(Request { id: req.id, op: req.op.clone() }, &mut again)
            else {
                continue;
            };
            let back = ServerCodec::default().decode(&mut again).expect("a re-encoded request decodes");
            assert_eq!(
                back.as_ref().map(|r| (&r.op, r.id)),
                Some((&req.op, req.id)),
                "round trip changed it"
            );
            assert!(again.is_empty(), "a re-encoded request left bytes over");
        }
        let mut buf = BytesMut::from(data);
        let mut client = ClientCodec { max_frame };
        while let Ok(Some(_)) = client.decode(&mut buf) {}
    }
}

/// The store the store harness works on: created on first use, replaced every so often so it
/// stays small whatever the inputs did.
struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    uses: u32,
}

thread_local! {
    static STORE: std::cell::RefCell<Option<Fixture>> = const { std::cell::RefCell::new(None) };
}

const STORE_SIZE: u64 = 8 << 20;

fn fresh_store() -> Fixture {
    // In memory where there is a tmpfs: syncs cost nothing there, and the fuzzer runs many.
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }
        .expect("a scratch directory");
    let store = Store::create(&dir.path().join("r"), &CreateOptions::new("fuzz", STORE_SIZE, 16 << 10))
        .expect("a store for the fuzzer");
    Fixture { _dir: dir, store, uses: 0 }
}

/// Reads a little-endian integer of `n` bytes from `data` at `*at` (zeros past the end).
fn take(data: &[u8], at: &mut usize, n: usize) -> u64 {
    let mut v = 0u64;
    for i in 0..n {
        v |= u64::from(data.get(*at + i).copied().unwrap_or(0)) << (8 * i);
    }
    *at += n;
    v
}

/// Runs `data` as a sequence of calls on a real store. Each call is an op byte, then an offset
/// and a length: with the op's high bit set they are arbitrary 8- and 4-byte values (mostly
/// refused), otherwise a block inside the volume and 1 to 16 blocks. At most 16 calls per input,
/// payloads of at most 64 KiB: the store does real work (RocksDB, the data file), so small
/// inputs keep the executions many. Successful writes must read back.
pub fn store_requests(data: &[u8]) {
    STORE.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().is_none_or(|f| f.uses >= 2000 || f.store.size() > 4 * STORE_SIZE) {
            *cell = None;
            *cell = Some(fresh_store());
        }
        let Some(f) = cell.as_mut() else { return };
        f.uses += 1;
        run_store_calls(&f.store, data);
    });
}

fn run_store_calls(s: &Store, data: &[u8]) {
    let mut at = 0;
    let mut calls = 0;
    while at < data.len() && calls < 16 {
        calls += 1;
        let op = data[at];
        at += 1;
        let (offset, len) = if op & 0x80 != 0 {
            (take(data, &mut at, 8), take(data, &mut at, 4))
        } else {
            let size = s.size();
            let block = take(data, &mut at, 2) * 4096 % size.max(4096);
            let n = (take(data, &mut at, 1) % 16 + 1) * 4096;
            (block, n.min(size - block))
        };
        let len_usize = usize::try_from(len.min(64 << 10)).unwrap_or(0);
        let tag = u8::try_from(calls).unwrap_or(0) ^ op;
        match op & 0x0f {
            0 | 1 => {
                let buf: Vec<u8> = (0..len_usize).map(|i| tag ^ (i >> 12).to_le_bytes()[0] | 1).collect();
                if s.write(offset, &buf, op & 0x10 != 0).is_ok() {
                    let mut back = vec![0u8; buf.len()];
                    s.read(offset, &mut back).expect("a range just written reads");
                    // Compared by checksum: libFuzzer traces every memcmp, and that cost most of
                    // the time.
                    assert!(
                        crc32c::crc32c(&back) == crc32c::crc32c(&buf),
                        "a write at {offset} did not read back"
                    );
                }
            }
            2 => {
                let mut buf = vec![0u8; len_usize];
                let _ = s.read(offset, &mut buf);
                let _ = s.read_cached(offset, &mut buf);
            }
            3 => {
                if s.unmap(offset, len).is_ok() {
                    let mut back = vec![1u8; len_usize];
                    s.read(offset, &mut back).expect("a range just unmapped reads");
                    let zeros = vec![0u8; len_usize];
                    assert!(
                        crc32c::crc32c(&back) == crc32c::crc32c(&zeros),
                        "an unmapped range at {offset} is not zeros"
                    );
                }
            }
            4 => {
                let _ = s.write_zeroes(offset, len);
            }
            5 => {
                let name = format!("s{}", op >> 4);
                let _ = s.create_snapshot(&name);
            }
            6 => {
                let name = format!("s{}", op >> 4);
                let _ = s.delete_snapshot(&name);
            }
            7 => {
                let name = format!("s{}", op >> 4);
                let mut buf = vec![0u8; len_usize];
                let _ = s.read_snapshot(&name, offset, &mut buf);
            }
            8 => {
                // Growing is refused past a bound only to keep the fuzzer's disk small.
                if offset <= 4 * STORE_SIZE {
                    let _ = s.resize(offset);
                }
            }
            9 => {
                let _ = s.flush();
            }
            10 => {
                let _ = s.try_write_inline(offset, &vec![tag; len_usize]);
            }
            11 => {
                let _ = s.allocated_extents(None, offset, usize::try_from(len % 64).unwrap_or(0));
            }
            _ => {
                let _ = s.written_since(offset, len, 16);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "bad request")]
    fn the_ram_disk_reports_a_request_the_server_should_have_refused() {
        let disk = RamDisk { data: Mutex::new(vec![0; DISK_BYTES]), max_block: 4096 };
        disk.range(DISK - 4096, 8192, false);
    }

    #[test]
    fn truncated_and_garbage_inputs_are_handled() {
        for data in [&b""[..], b"\0\0\0\x03", b"IHAVEOPT", &[0xff; 64]] {
            nbd_server(data);
            replica_frames(data);
            store_requests(data);
        }
    }
}
