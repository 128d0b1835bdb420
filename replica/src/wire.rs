//! The engine-replica data protocol: frames and their codecs (docs/protocol.md describes the wire).
//!
//! Every frame is a big-endian `u32` body length followed by the body; a length above the
//! negotiated maximum, or shorter than a header, is a protocol error that closes the connection.
//! Requests carry a client-chosen `u64` id; replies carry the same id and may come in any order.
//! A malformed request whose id could be read gets an `Invalid` reply instead of a closed
//! connection.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder};
use uuid::Uuid;

/// Protocol version spoken by this build.
pub const VERSION: u16 = 1;
/// First bytes of a hello payload.
pub const MAGIC: &[u8; 8] = b"BRNCLRPL";
/// Largest data payload of one read or write.
pub const MAX_IO: u32 = 4 << 20;
/// Largest frame body: one maximal write plus its header.
pub const MAX_FRAME: u32 = MAX_IO + 4096;
/// Longest token or identifier carried in a hello.
pub const MAX_NAME: usize = 1024;

const REQ_HEADER: usize = 24;
const REPLY_HEADER: usize = 16;

/// Request flag: the write is durable before it is acknowledged.
pub const FLAG_FUA: u8 = 1;
/// SNAPSHOT_CREATE flag: `offset` carries the creation time to record (unix seconds).
pub const FLAG_CREATED: u8 = 2;
/// Reply flag: more replies follow for this id (streams).
pub const FLAG_MORE: u16 = 1;

/// Operation codes.
pub mod opcode {
    pub const HELLO: u8 = 0x01;
    pub const PING: u8 = 0x02;
    pub const READ: u8 = 0x10;
    pub const WRITE: u8 = 0x11;
    pub const FLUSH: u8 = 0x12;
    pub const UNMAP: u8 = 0x13;
    pub const WRITE_ZEROES: u8 = 0x14;
    pub const READ_SNAPSHOT: u8 = 0x15;
    pub const READ_SHM: u8 = 0x16;
    pub const WRITE_SHM: u8 = 0x17;
    pub const SNAPSHOT_CREATE: u8 = 0x20;
    pub const SNAPSHOT_DELETE: u8 = 0x21;
    pub const SNAPSHOT_LIST: u8 = 0x22;
    pub const STAT: u8 = 0x23;
    pub const FENCE: u8 = 0x24;
    pub const RESIZE: u8 = 0x25;
    pub const CLEAR_INTENT: u8 = 0x26;
    pub const LIST_INTENT: u8 = 0x27;
    pub const LIST_WRITTEN: u8 = 0x28;
    pub const LIST_ALLOCATED: u8 = 0x29;
    pub const READ_ALLOCATED: u8 = 0x30;
}

/// Reply status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Status {
    Ok = 0,
    Invalid = 1,
    OutOfRange = 2,
    NotFound = 3,
    Exists = 4,
    StaleEpoch = 5,
    NotFenced = 6,
    EpochConflict = 7,
    Auth = 8,
    Io = 9,
    Failed = 10,
    NoStore = 11,
    Unsupported = 12,
    NoSpace = 13,
    Busy = 14,
    /// Data read does not match its checksum: this replica's copy is damaged (the message names
    /// the block). Read it from another replica and repair this one.
    Corrupt = 15,
}

impl Status {
    pub fn from_u16(v: u16) -> Option<Status> {
        use Status::*;
        Some(match v {
            0 => Ok,
            1 => Invalid,
            2 => OutOfRange,
            3 => NotFound,
            4 => Exists,
            5 => StaleEpoch,
            6 => NotFenced,
            7 => EpochConflict,
            8 => Auth,
            9 => Io,
            10 => Failed,
            11 => NoStore,
            12 => Unsupported,
            13 => NoSpace,
            14 => Busy,
            15 => Corrupt,
            _ => return None,
        })
    }
}

/// The first frame of a connection: who is calling, with what authority.
#[derive(Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub volume_id: String,
    pub token: String,
    pub epoch: u64,
    pub engine_id: Uuid,
}

impl std::fmt::Debug for Hello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token never reaches a log.
        f.debug_struct("Hello")
            .field("version", &self.version)
            .field("volume_id", &self.volume_id)
            .field("epoch", &self.epoch)
            .field("engine_id", &self.engine_id)
            .finish_non_exhaustive()
    }
}

/// What the replica answers to a hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    pub version: u16,
    pub volume_id: String,
    pub store_id: Uuid,
    pub size: u64,
    pub epoch: u64,
    pub max_io: u32,
    /// The replica mapped the shared memory the engine offered: `READ_SHM` / `WRITE_SHM` work.
    #[serde(default)]
    pub shm: bool,
}

/// The replica's state as reported by `STAT`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatReply {
    pub volume_id: String,
    pub store_id: Uuid,
    pub size: u64,
    pub cluster_size: u64,
    pub allocated_bytes: u64,
    pub disk_bytes: u64,
    pub snapshots: u32,
    pub epoch: u64,
    pub engine_id: Option<Uuid>,
    #[serde(default)]
    pub dirty_regions: u64,
    pub healthy: bool,
    pub failure: Option<String>,
    #[serde(default)]
    pub checksums: bool,
    #[serde(default)]
    pub checksum_errors: u64,
}

/// One snapshot as listed by `SNAPSHOT_LIST`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    pub name: String,
    pub size: u64,
    pub created_unix: u64,
}

/// A decoded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: u64,
    pub op: Op,
}

/// The operation of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Hello(Hello),
    Ping,
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    /// Reads `len` bytes at `offset` into the shared memory at `shm_offset`; the reply has no
    /// payload.
    ReadShm {
        offset: u64,
        len: u32,
        shm_offset: u64,
    },
    /// Writes the `len` bytes at `shm_offset` of the shared memory to `offset`.
    WriteShm {
        offset: u64,
        len: u32,
        shm_offset: u64,
        fua: bool,
    },
    Flush,
    Unmap {
        offset: u64,
        len: u32,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
    },
    ReadSnapshot {
        name: String,
        offset: u64,
        len: u32,
    },
    SnapshotCreate {
        name: String,
        /// Creation time to record instead of now (unix seconds).
        created_unix: Option<u64>,
    },
    SnapshotDelete {
        name: String,
    },
    SnapshotList,
    Stat,
    Fence {
        epoch: u64,
        engine_id: Uuid,
    },
    Resize {
        size: u64,
    },
    /// Clears the write-intent marks a completed flush covered (its reply gave `point`).
    ClearIntent {
        point: u64,
    },
    /// Lists the write-intent marks: reply `u64 region size ++ u64 region...`.
    ListIntent,
    /// Lists the regions written in epoch `since` or later, from region `from`: reply `u64 region
    /// size ++ u64 next region (u64::MAX: done) ++ u64 region...`.
    ListWritten {
        since: u64,
        from: u64,
    },
    /// Lists the allocated extents of the head (no name) or a snapshot from byte `from`: reply
    /// `u64 next offset (u64::MAX: done) ++ (u64 offset, u64 length)...`.
    ListAllocated {
        snapshot: Option<String>,
        from: u64,
    },
    /// Streams the allocated data of the head (no name) or a snapshot from `offset` on, for at most
    /// `len` bytes (0: to the end).
    ReadAllocated {
        snapshot: Option<String>,
        offset: u64,
        len: u64,
    },
    /// The request was framed correctly but its contents are not: answered with `Invalid`.
    Invalid {
        reason: String,
    },
    /// An opcode this build does not know: answered with `Unsupported`.
    Unknown {
        code: u8,
    },
}

/// A reply frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub id: u64,
    pub status: Status,
    pub more: bool,
    pub payload: Bytes,
}

impl Reply {
    pub fn ok(id: u64, payload: Bytes) -> Reply {
        Reply { id, status: Status::Ok, more: false, payload }
    }

    pub fn error(id: u64, status: Status, message: impl Into<String>) -> Reply {
        Reply { id, status, more: false, payload: Bytes::from(message.into()) }
    }
}

/// Framing errors: the connection cannot continue.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: u32, max: u32 },
    #[error("frame of {len} bytes is shorter than its header")]
    TooShort { len: u32 },
    #[error("unknown reply status {0}")]
    BadStatus(u16),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn take_frame(src: &mut BytesMut, header: usize, max: u32) -> Result<Option<BytesMut>, WireError> {
    if src.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
    if len > max {
        return Err(WireError::TooLarge { len, max });
    }
    if (len as usize) < header {
        return Err(WireError::TooShort { len });
    }
    let total = 4 + len as usize;
    if src.len() < total {
        src.reserve(total - src.len());
        return Ok(None);
    }
    src.advance(4);
    Ok(Some(src.split_to(len as usize)))
}

fn get_string(b: &mut BytesMut, what: &str) -> Result<String, String> {
    if b.len() < 2 {
        return Err(format!("{what}: missing length"));
    }
    let n = b.get_u16() as usize;
    if n > MAX_NAME || b.len() < n {
        return Err(format!("{what}: bad length {n}"));
    }
    String::from_utf8(b.split_to(n).to_vec()).map_err(|_| format!("{what}: not UTF-8"))
}

fn put_string(b: &mut BytesMut, s: &str) {
    let n = s.len().min(MAX_NAME);
    #[allow(clippy::cast_possible_truncation)]
    b.put_u16(n as u16);
    b.put_slice(&s.as_bytes()[..n]);
}

fn name_payload(b: &mut BytesMut) -> Result<String, String> {
    let s = std::str::from_utf8(b).map_err(|_| "name is not UTF-8".to_owned())?;
    if s.is_empty() || s.len() > MAX_NAME {
        return Err(format!("name must be 1 to {MAX_NAME} bytes"));
    }
    Ok(s.to_owned())
}

fn decode_op(code: u8, flags: u8, offset: u64, length: u32, mut body: BytesMut) -> Result<Op, String> {
    use opcode::*;
    let no_payload = |body: &BytesMut, op: Op| {
        if body.is_empty() { Ok(op) } else { Err(format!("opcode {code:#x} takes no payload")) }
    };
    match code {
        HELLO => {
            if body.len() < 8 + 2 + 8 + 16 || &body[..8] != MAGIC {
                return Err("bad hello magic".into());
            }
            body.advance(8);
            let version = body.get_u16();
            let epoch = body.get_u64();
            let engine_id = Uuid::from_slice(&body.split_to(16)).map_err(|e| e.to_string())?;
            let volume_id = get_string(&mut body, "volume id")?;
            let token = get_string(&mut body, "token")?;
            no_payload(&body, Op::Hello(Hello { version, volume_id, token, epoch, engine_id }))
        }
        PING => no_payload(&body, Op::Ping),
        READ => no_payload(&body, Op::Read { offset, len: length }),
        WRITE => {
            if body.len() != length as usize {
                return Err(format!("write length {length} but {} bytes of data", body.len()));
            }
            Ok(Op::Write { offset, data: body.freeze(), fua: flags & FLAG_FUA != 0 })
        }
        READ_SHM | WRITE_SHM => {
            if body.len() != 8 {
                return Err("a shared-memory request takes an 8-byte area offset".into());
            }
            let shm_offset = body.get_u64();
            Ok(if code == READ_SHM {
                Op::ReadShm { offset, len: length, shm_offset }
            } else {
                Op::WriteShm { offset, len: length, shm_offset, fua: flags & FLAG_FUA != 0 }
            })
        }
        FLUSH => no_payload(&body, Op::Flush),
        UNMAP => no_payload(&body, Op::Unmap { offset, len: length }),
        WRITE_ZEROES => no_payload(&body, Op::WriteZeroes { offset, len: length }),
        READ_SNAPSHOT => Ok(Op::ReadSnapshot { name: name_payload(&mut body)?, offset, len: length }),
        SNAPSHOT_CREATE => Ok(Op::SnapshotCreate {
            name: name_payload(&mut body)?,
            created_unix: (flags & FLAG_CREATED != 0).then_some(offset),
        }),
        SNAPSHOT_DELETE => Ok(Op::SnapshotDelete { name: name_payload(&mut body)? }),
        SNAPSHOT_LIST => no_payload(&body, Op::SnapshotList),
        STAT => no_payload(&body, Op::Stat),
        FENCE => {
            if body.len() != 16 {
                return Err("fence takes a 16-byte engine id".into());
            }
            let engine_id = Uuid::from_slice(&body).map_err(|e| e.to_string())?;
            Ok(Op::Fence { epoch: offset, engine_id })
        }
        RESIZE => no_payload(&body, Op::Resize { size: offset }),
        CLEAR_INTENT => no_payload(&body, Op::ClearIntent { point: offset }),
        LIST_INTENT => no_payload(&body, Op::ListIntent),
        LIST_WRITTEN => {
            if body.len() != 8 {
                return Err("list-written takes an 8-byte start region".into());
            }
            Ok(Op::ListWritten { since: offset, from: body.get_u64() })
        }
        LIST_ALLOCATED => {
            let snapshot = if body.is_empty() { None } else { Some(name_payload(&mut body)?) };
            Ok(Op::ListAllocated { snapshot, from: offset })
        }
        READ_ALLOCATED => {
            let snapshot = if body.is_empty() { None } else { Some(name_payload(&mut body)?) };
            Ok(Op::ReadAllocated { snapshot, offset, len: u64::from(length) << 12 })
        }
        code => Ok(Op::Unknown { code }),
    }
}

/// Server side: decodes requests, encodes replies.
#[derive(Debug, Clone, Copy)]
pub struct ServerCodec {
    pub max_frame: u32,
}

impl Default for ServerCodec {
    fn default() -> Self {
        ServerCodec { max_frame: MAX_FRAME }
    }
}

impl Decoder for ServerCodec {
    type Item = Request;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Request>, WireError> {
        let Some(mut body) = take_frame(src, REQ_HEADER, self.max_frame)? else { return Ok(None) };
        let code = body.get_u8();
        let flags = body.get_u8();
        let _reserved = body.get_u16();
        let id = body.get_u64();
        let offset = body.get_u64();
        let length = body.get_u32();
        let op = decode_op(code, flags, offset, length, body).unwrap_or_else(|reason| Op::Invalid { reason });
        Ok(Some(Request { id, op }))
    }
}

impl Encoder<Reply> for ServerCodec {
    type Error = WireError;

    fn encode(&mut self, r: Reply, dst: &mut BytesMut) -> Result<(), WireError> {
        let len = REPLY_HEADER + r.payload.len();
        let len32 =
            u32::try_from(len).map_err(|_| WireError::TooLarge { len: u32::MAX, max: self.max_frame })?;
        dst.reserve(4 + len);
        dst.put_u32(len32);
        dst.put_u64(r.id);
        dst.put_u16(r.status as u16);
        dst.put_u16(if r.more { FLAG_MORE } else { 0 });
        dst.put_u32(0);
        dst.put_slice(&r.payload);
        Ok(())
    }
}

/// Client side: encodes requests, decodes replies.
#[derive(Debug, Clone, Copy)]
pub struct ClientCodec {
    pub max_frame: u32,
}

impl Default for ClientCodec {
    fn default() -> Self {
        ClientCodec { max_frame: MAX_FRAME }
    }
}

impl Decoder for ClientCodec {
    type Item = Reply;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Reply>, WireError> {
        let Some(mut body) = take_frame(src, REPLY_HEADER, self.max_frame)? else { return Ok(None) };
        let id = body.get_u64();
        let raw = body.get_u16();
        let status = Status::from_u16(raw).ok_or(WireError::BadStatus(raw))?;
        let flags = body.get_u16();
        let _reserved = body.get_u32();
        Ok(Some(Reply { id, status, more: flags & FLAG_MORE != 0, payload: body.freeze() }))
    }
}

impl Encoder<Request> for ClientCodec {
    type Error = WireError;

    fn encode(&mut self, r: Request, dst: &mut BytesMut) -> Result<(), WireError> {
        if let Some(b) = self.encode_head(r, dst)? {
            dst.put_slice(&b);
        }
        Ok(())
    }
}

impl ClientCodec {
    /// Encodes `r` into `dst` except for a write's data, which it returns: the frame is `dst`'s
    /// new bytes followed by those. A writer can then send the data from where it lies (a
    /// vectored write) instead of copying it into the frame.
    pub fn encode_head(&mut self, r: Request, dst: &mut BytesMut) -> Result<Option<Bytes>, WireError> {
        use opcode::*;
        let (code, flags, offset, length): (u8, u8, u64, u32);
        let mut payload = BytesMut::new();
        let mut bulk: Option<Bytes> = None;
        let len32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        match r.op {
            Op::Hello(h) => {
                (code, flags, offset, length) = (HELLO, 0, 0, 0);
                payload.put_slice(MAGIC);
                payload.put_u16(h.version);
                payload.put_u64(h.epoch);
                payload.put_slice(h.engine_id.as_bytes());
                put_string(&mut payload, &h.volume_id);
                put_string(&mut payload, &h.token);
            }
            Op::Ping => (code, flags, offset, length) = (PING, 0, 0, 0),
            Op::Read { offset: o, len } => (code, flags, offset, length) = (READ, 0, o, len),
            Op::Write { offset: o, data, fua } => {
                (code, flags, offset, length) = (WRITE, if fua { FLAG_FUA } else { 0 }, o, len32(data.len()));
                // Copied once, straight into the frame below.
                bulk = Some(data);
            }
            Op::ReadShm { offset: o, len, shm_offset } => {
                (code, flags, offset, length) = (READ_SHM, 0, o, len);
                payload.put_u64(shm_offset);
            }
            Op::WriteShm { offset: o, len, shm_offset, fua } => {
                (code, flags, offset, length) = (WRITE_SHM, if fua { FLAG_FUA } else { 0 }, o, len);
                payload.put_u64(shm_offset);
            }
            Op::Flush => (code, flags, offset, length) = (FLUSH, 0, 0, 0),
            Op::Unmap { offset: o, len } => (code, flags, offset, length) = (UNMAP, 0, o, len),
            Op::WriteZeroes { offset: o, len } => (code, flags, offset, length) = (WRITE_ZEROES, 0, o, len),
            Op::ReadSnapshot { name, offset: o, len } => {
                (code, flags, offset, length) = (READ_SNAPSHOT, 0, o, len);
                payload.put_slice(name.as_bytes());
            }
            Op::SnapshotCreate { name, created_unix } => {
                (code, flags, offset, length) = match created_unix {
                    Some(t) => (SNAPSHOT_CREATE, FLAG_CREATED, t, 0),
                    None => (SNAPSHOT_CREATE, 0, 0, 0),
                };
                payload.put_slice(name.as_bytes());
            }
            Op::SnapshotDelete { name } => {
                (code, flags, offset, length) = (SNAPSHOT_DELETE, 0, 0, 0);
                payload.put_slice(name.as_bytes());
            }
            Op::SnapshotList => (code, flags, offset, length) = (SNAPSHOT_LIST, 0, 0, 0),
            Op::Stat => (code, flags, offset, length) = (STAT, 0, 0, 0),
            Op::Fence { epoch, engine_id } => {
                (code, flags, offset, length) = (FENCE, 0, epoch, 0);
                payload.put_slice(engine_id.as_bytes());
            }
            Op::Resize { size } => (code, flags, offset, length) = (RESIZE, 0, size, 0),
            Op::ClearIntent { point } => (code, flags, offset, length) = (CLEAR_INTENT, 0, point, 0),
            Op::ListIntent => (code, flags, offset, length) = (LIST_INTENT, 0, 0, 0),
            Op::ListWritten { since, from } => {
                (code, flags, offset, length) = (LIST_WRITTEN, 0, since, 0);
                payload.put_u64(from);
            }
            Op::ListAllocated { snapshot, from } => {
                (code, flags, offset, length) = (LIST_ALLOCATED, 0, from, 0);
                if let Some(s) = snapshot {
                    payload.put_slice(s.as_bytes());
                }
            }
            Op::ReadAllocated { snapshot, offset: o, len } => {
                (code, flags, offset, length) =
                    (READ_ALLOCATED, 0, o, u32::try_from(len >> 12).unwrap_or(u32::MAX));
                if let Some(s) = snapshot {
                    payload.put_slice(s.as_bytes());
                }
            }
            Op::Invalid { .. } | Op::Unknown { .. } => {
                return Err(WireError::Io(std::io::Error::other("cannot encode an invalid request")));
            }
        }
        let len = REQ_HEADER + payload.len() + bulk.as_ref().map_or(0, Bytes::len);
        if len > self.max_frame as usize {
            return Err(WireError::TooLarge { len: len32(len), max: self.max_frame });
        }
        dst.reserve(4 + len);
        dst.put_u32(len32(len));
        dst.put_u8(code);
        dst.put_u8(flags);
        dst.put_u16(0);
        dst.put_u64(r.id);
        dst.put_u64(offset);
        dst.put_u32(length);
        dst.put_slice(&payload);
        Ok(bulk)
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(op: Op) -> Op {
        let mut buf = BytesMut::new();
        ClientCodec::default().encode(Request { id: 42, op }, &mut buf).unwrap();
        let req = ServerCodec::default().decode(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        assert_eq!(req.id, 42);
        req.op
    }

    #[test]
    fn requests_round_trip() {
        let ops = vec![
            Op::Hello(Hello {
                version: VERSION,
                volume_id: "vol".into(),
                token: "secret".into(),
                epoch: 7,
                engine_id: Uuid::new_v4(),
            }),
            Op::Ping,
            Op::Read { offset: 4096, len: 8192 },
            Op::Write { offset: 0, data: Bytes::from(vec![7u8; 4096]), fua: true },
            Op::ReadShm { offset: 1 << 30, len: 131_072, shm_offset: 65536 },
            Op::WriteShm { offset: 4096, len: 65536, shm_offset: 0, fua: false },
            Op::WriteShm { offset: 8192, len: 16384, shm_offset: 1 << 20, fua: true },
            Op::Flush,
            Op::Unmap { offset: 1 << 40, len: 4096 },
            Op::WriteZeroes { offset: 8192, len: 4096 },
            Op::ReadSnapshot { name: "s1".into(), offset: 0, len: 4096 },
            Op::SnapshotCreate { name: "s2".into(), created_unix: None },
            Op::SnapshotCreate { name: "s3".into(), created_unix: Some(1_700_000_000) },
            Op::SnapshotDelete { name: "s2".into() },
            Op::SnapshotList,
            Op::Stat,
            Op::Fence { epoch: 9, engine_id: Uuid::new_v4() },
            Op::Resize { size: 1 << 30 },
            Op::ClearIntent { point: 77 },
            Op::ListIntent,
            Op::ListWritten { since: 9, from: 12 },
            Op::ListAllocated { snapshot: None, from: 4096 },
            Op::ListAllocated { snapshot: Some("s1".into()), from: 0 },
            Op::ReadAllocated { snapshot: Some("s1".into()), offset: 0, len: 0 },
            Op::ReadAllocated { snapshot: None, offset: 4096, len: 1 << 20 },
        ];
        for op in ops {
            assert_eq!(round_trip(op.clone()), op);
        }
    }

    #[test]
    fn replies_round_trip_and_partial_frames_wait() {
        let mut buf = BytesMut::new();
        let r = Reply { id: 3, status: Status::StaleEpoch, more: true, payload: Bytes::from_static(b"old") };
        ServerCodec::default().encode(r.clone(), &mut buf).unwrap();
        let mut part = buf.split_to(10);
        assert!(ClientCodec::default().decode(&mut part).unwrap().is_none());
        part.unsplit(buf);
        assert_eq!(ClientCodec::default().decode(&mut part).unwrap().unwrap(), r);
    }

    #[test]
    fn oversize_and_undersize_frames_are_errors() {
        let mut buf = BytesMut::new();
        buf.put_u32(MAX_FRAME + 1);
        assert!(matches!(ServerCodec::default().decode(&mut buf), Err(WireError::TooLarge { .. })));
        let mut buf = BytesMut::new();
        buf.put_u32(3);
        buf.put_slice(&[0, 0, 0]);
        assert!(matches!(ServerCodec::default().decode(&mut buf), Err(WireError::TooShort { .. })));
    }

    #[test]
    fn malformed_contents_keep_the_request_id() {
        // A write whose length field disagrees with its payload.
        let mut buf = BytesMut::new();
        buf.put_u32(REQ_HEADER as u32 + 10);
        buf.put_u8(opcode::WRITE);
        buf.put_u8(0);
        buf.put_u16(0);
        buf.put_u64(77);
        buf.put_u64(0);
        buf.put_u32(4096);
        buf.put_slice(&[1u8; 10]);
        let req = ServerCodec::default().decode(&mut buf).unwrap().unwrap();
        assert_eq!(req.id, 77);
        assert!(matches!(req.op, Op::Invalid { .. }));
        let mut buf = BytesMut::new();
        buf.put_u32(REQ_HEADER as u32);
        buf.put_u8(0xEE);
        buf.put_bytes(0, 3);
        buf.put_u64(5);
        buf.put_bytes(0, 12);
        let req = ServerCodec::default().decode(&mut buf).unwrap().unwrap();
        assert_eq!(req.op, Op::Unknown { code: 0xEE });
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

        /// Arbitrary bytes never panic either decoder; they yield frames, wait for more, or fail.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256), small in 0u32..300) {
            for max in [MAX_FRAME, small] {
                let mut a = BytesMut::from(&bytes[..]);
                let mut codec = ServerCodec { max_frame: max };
                while let Ok(Some(_)) = codec.decode(&mut a) {}
                let mut b = BytesMut::from(&bytes[..]);
                let mut codec = ClientCodec { max_frame: max };
                while let Ok(Some(_)) = codec.decode(&mut b) {}
            }
        }

        /// Well-framed requests with arbitrary header fields and payloads never panic and keep
        /// their id.
        #[test]
        fn arbitrary_request_bodies_keep_their_id(code in any::<u8>(), flags in any::<u8>(), id in any::<u64>(),
                                                  offset in any::<u64>(), length in any::<u32>(),
                                                  payload in prop::collection::vec(any::<u8>(), 0..64)) {
            let mut buf = BytesMut::new();
            buf.put_u32((REQ_HEADER + payload.len()) as u32);
            buf.put_u8(code);
            buf.put_u8(flags);
            buf.put_u16(0);
            buf.put_u64(id);
            buf.put_u64(offset);
            buf.put_u32(length);
            buf.put_slice(&payload);
            let req = ServerCodec::default().decode(&mut buf).unwrap().unwrap();
            prop_assert_eq!(req.id, id);
        }
    }
}
