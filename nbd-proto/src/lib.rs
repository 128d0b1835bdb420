//! The NBD protocol's wire format, both sides, with no IO: constants, the client's options and
//! the server's option replies (fixed newstyle negotiation with `OPT_INFO`/`OPT_GO` and their
//! info replies), transmission-phase request headers and simple replies. Values are from the NBD
//! protocol specification. The engine's server (`barnacle_engine::nbd`) and the node plugin's
//! client (`barnacle_node::nbd_client`) speak through it.

/// "NBDMAGIC": first eight bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": the newstyle magic, and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

// Info types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Commands and command flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

// Errors carried in replies (Linux errno values, as the protocol defines them).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ESHUTDOWN: u32 = 108;

/// Length of a request header.
pub const REQUEST_LEN: usize = 28;
/// Longest option payload accepted before the connection is dropped.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// A transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Why a request or reply header cannot be accepted: the connection must be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("bad request magic {0:#x}")]
    BadMagic(u32),
    #[error("bad reply magic {0:#x}")]
    BadReplyMagic(u32),
}

/// Length of a simple reply's header.
pub const SIMPLE_REPLY_LEN: usize = 16;

/// Encodes a 28-byte request header (the client's side).
pub fn encode_request(h: &RequestHeader) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&h.flags.to_be_bytes());
    b[6..8].copy_from_slice(&h.command.to_be_bytes());
    b[8..16].copy_from_slice(&h.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&h.offset.to_be_bytes());
    b[24..28].copy_from_slice(&h.length.to_be_bytes());
    b
}

/// Parses a simple reply's header into (errno, cookie) (the client's side).
pub fn parse_simple_reply(b: &[u8; SIMPLE_REPLY_LEN]) -> Result<(u32, u64), HeaderError> {
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(HeaderError::BadReplyMagic(magic));
    }
    let mut c = [0u8; 8];
    c.copy_from_slice(&b[8..16]);
    Ok((u32::from_be_bytes([b[4], b[5], b[6], b[7]]), u64::from_be_bytes(c)))
}

/// A client option: `IHAVEOPT`, the option, its length and data.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// The data of an `OPT_INFO` / `OPT_GO` option; `None` when the name is too long to encode.
pub fn encode_info_request(name: &str, requests: &[u16]) -> Option<Vec<u8>> {
    let mut d = Vec::with_capacity(6 + name.len() + 2 * requests.len());
    d.extend_from_slice(&u32::try_from(name.len()).ok()?.to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&u16::try_from(requests.len()).ok()?.to_be_bytes());
    for r in requests {
        d.extend_from_slice(&r.to_be_bytes());
    }
    Some(d)
}

/// One `NBD_REP_INFO` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export {
        size: u64,
        flags: u16,
    },
    BlockSize {
        min: u32,
        preferred: u32,
        max: u32,
    },
    Name(String),
    Description(String),
    /// An information type this crate does not know (to be ignored).
    Other(u16),
}

/// Encodes an `NBD_REP_INFO` payload (the server's side).
pub fn encode_info(info: &Info) -> Vec<u8> {
    let mut b = Vec::new();
    match info {
        Info::Export { size, flags } => {
            b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
            b.extend_from_slice(&size.to_be_bytes());
            b.extend_from_slice(&flags.to_be_bytes());
        }
        Info::BlockSize { min, preferred, max } => {
            b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
            for v in [min, preferred, max] {
                b.extend_from_slice(&v.to_be_bytes());
            }
        }
        Info::Name(n) => {
            b.extend_from_slice(&INFO_NAME.to_be_bytes());
            b.extend_from_slice(n.as_bytes());
        }
        Info::Description(d) => {
            b.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
            b.extend_from_slice(d.as_bytes());
        }
        Info::Other(t) => b.extend_from_slice(&t.to_be_bytes()),
    }
    b
}

/// Parses an `NBD_REP_INFO` payload (the client's side); `None` when malformed.
pub fn parse_info(d: &[u8]) -> Option<Info> {
    let kind = u16::from_be_bytes(d.get(..2)?.try_into().ok()?);
    let rest = &d[2..];
    let u32_at = |i: usize| -> Option<u32> { Some(u32::from_be_bytes(rest.get(i..i + 4)?.try_into().ok()?)) };
    match kind {
        INFO_EXPORT if rest.len() == 10 => Some(Info::Export {
            size: u64::from_be_bytes(rest[..8].try_into().ok()?),
            flags: u16::from_be_bytes([rest[8], rest[9]]),
        }),
        INFO_BLOCK_SIZE if rest.len() == 12 => {
            Some(Info::BlockSize { min: u32_at(0)?, preferred: u32_at(4)?, max: u32_at(8)? })
        }
        INFO_NAME => Some(Info::Name(String::from_utf8_lossy(rest).into_owned())),
        INFO_DESCRIPTION => Some(Info::Description(String::from_utf8_lossy(rest).into_owned())),
        INFO_EXPORT | INFO_BLOCK_SIZE => None,
        other => Some(Info::Other(other)),
    }
}

/// The server's answer to `OPT_EXPORT_NAME`: size, transmission flags and, unless the client
/// asked for none, 124 zero bytes.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(134);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        b.extend_from_slice(&[0u8; 124]);
    }
    b
}

/// The data of an `NBD_REP_SERVER` reply to `OPT_LIST`: one export's name.
pub fn encode_server_reply(name: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(4 + name.len());
    d.extend_from_slice(&u32::try_from(name.len()).unwrap_or(0).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d
}

/// Parses a 28-byte request header.
pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<RequestHeader, HeaderError> {
    let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let u64_at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        u64::from_be_bytes(a)
    };
    let magic = u32_at(0);
    if magic != REQUEST_MAGIC {
        return Err(HeaderError::BadMagic(magic));
    }
    Ok(RequestHeader {
        flags: u16_at(4),
        command: u16_at(6),
        cookie: u64_at(8),
        offset: u64_at(16),
        length: u32_at(24),
    })
}

/// The 16-byte header of a simple reply.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// An option reply: header plus payload.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    b.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// What an `OPT_INFO` / `OPT_GO` payload asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

/// Parses an `OPT_INFO` / `OPT_GO` payload; `None` when malformed.
pub fn parse_info_request(d: &[u8]) -> Option<InfoRequest> {
    let name_len = usize::try_from(u32::from_be_bytes(d.get(..4)?.try_into().ok()?)).ok()?;
    let name_end = 4usize.checked_add(name_len)?;
    let name = std::str::from_utf8(d.get(4..name_end)?).ok()?.to_owned();
    let n = usize::from(u16::from_be_bytes(d.get(name_end..name_end + 2)?.try_into().ok()?));
    let rest = d.get(name_end + 2..)?;
    if rest.len() != n * 2 {
        return None;
    }
    let requests = rest.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
    Some(InfoRequest { name, requests })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_header_round_trip() {
        let mut b = [0u8; REQUEST_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&CMD_FLAG_FUA.to_be_bytes());
        b[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&7u64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..].copy_from_slice(&512u32.to_be_bytes());
        let h = parse_request(&b).unwrap();
        assert_eq!(h, RequestHeader { flags: 1, command: 1, cookie: 7, offset: 4096, length: 512 });
        b[0] = 0;
        assert!(parse_request(&b).is_err());
    }

    #[test]
    fn info_requests_parse_and_reject_garbage() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            parse_info_request(&d),
            Some(InfoRequest { name: "vol".into(), requests: vec![INFO_BLOCK_SIZE, INFO_NAME] })
        );
        assert_eq!(parse_info_request(&d[..d.len() - 1]), None);
        assert_eq!(parse_info_request(&[0xff, 0xff, 0xff, 0xff, 0, 0]), None);
    }

    proptest! {
        #[test]
        fn option_payload_parsing_never_panics(d in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_info_request(&d);
            let _ = parse_info(&d);
        }

        #[test]
        fn requests_round_trip(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
            let h = RequestHeader { flags, command, cookie, offset, length };
            prop_assert_eq!(parse_request(&encode_request(&h)), Ok(h));
        }

        #[test]
        fn info_requests_round_trip(name in "[a-z0-9-]{0,40}", requests in prop::collection::vec(any::<u16>(), 0..8)) {
            let d = encode_info_request(&name, &requests).unwrap();
            prop_assert_eq!(parse_info_request(&d), Some(InfoRequest { name, requests }));
        }

        #[test]
        fn info_replies_round_trip(size: u64, flags: u16, min: u32, preferred: u32, max: u32, name in "[a-z]{0,20}") {
            for info in [
                Info::Export { size, flags },
                Info::BlockSize { min, preferred, max },
                Info::Name(name.clone()),
                Info::Description(name.clone()),
            ] {
                prop_assert_eq!(parse_info(&encode_info(&info)), Some(info));
            }
        }

        #[test]
        fn simple_replies_round_trip(errno: u32, cookie: u64) {
            prop_assert_eq!(parse_simple_reply(&simple_reply(errno, cookie)), Ok((errno, cookie)));
        }
    }

    #[test]
    fn options_and_short_infos_are_framed_as_the_protocol_says() {
        let o = encode_option(OPT_GO, b"ab");
        assert_eq!(&o[..8], &IHAVEOPT.to_be_bytes());
        assert_eq!(&o[8..12], &OPT_GO.to_be_bytes());
        assert_eq!(&o[12..16], &2u32.to_be_bytes());
        assert_eq!(&o[16..], b"ab");
        assert_eq!(parse_info(&[0, 0, 1, 2]), None, "an export info cut short");
        assert_eq!(parse_info(&[0, 9]), Some(Info::Other(9)));
        assert_eq!(export_name_reply(4096, 1, false).len(), 134);
        assert_eq!(export_name_reply(4096, 1, true).len(), 10);
        let mut bad = simple_reply(0, 1);
        bad[0] = 0;
        assert!(parse_simple_reply(&bad).is_err());
    }
}
