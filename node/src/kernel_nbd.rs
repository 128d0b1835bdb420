//! The kernel nbd attach, through the nbd generic-netlink family (uapi `linux/nbd-netlink.h`):
//! the node negotiates each connection itself (`OPT_GO`), then hands the sockets to the kernel
//! with `NBD_CMD_CONNECT`, which owns them from then on; the device lives on when the node plugin
//! restarts. The backend identifier (`barnacle:<volume>:g<generation>`) is what the kernel keeps
//! to match a device to its volume (DESIGN rule 11), read back from `/sys/block/nbdN/backend`.
//!
//! The development machine has no nbd module, so only the message building and the sysfs lookup
//! are exercised here (unit tests); [`crate::attach`] uses this path only where the module is
//! loaded.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use neli::consts::nl::NlmF;
use neli::consts::socket::NlFamily;
use neli::genl::{AttrTypeBuilder, Genlmsghdr, GenlmsghdrBuilder, Nlattr, NlattrBuilder};
use neli::nl::NlPayload;
use neli::router::synchronous::NlRouter;
use neli::types::{Buffer, GenlBuffer};
use neli::utils::Groups;

use crate::error::NodeError;

pub const FAMILY: &str = "nbd";
pub const VERSION: u8 = 1;

pub const CMD_CONNECT: u8 = 1;
pub const CMD_DISCONNECT: u8 = 2;
pub const CMD_RECONFIGURE: u8 = 3;
pub const CMD_LINK_DEAD: u8 = 4;
/// The multicast group of the nbd family (link-dead notifications).
pub const MCAST_GROUP: &str = "nbd_mc_group";

pub const ATTR_INDEX: u16 = 1;
pub const ATTR_SIZE_BYTES: u16 = 2;
pub const ATTR_BLOCK_SIZE_BYTES: u16 = 3;
pub const ATTR_TIMEOUT: u16 = 4;
pub const ATTR_SERVER_FLAGS: u16 = 5;
pub const ATTR_CLIENT_FLAGS: u16 = 6;
pub const ATTR_SOCKETS: u16 = 7;
pub const ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
pub const ATTR_BACKEND_IDENTIFIER: u16 = 10;
pub const SOCK_ITEM: u16 = 1;
pub const SOCK_FD: u16 = 1;

/// Keep the device (and its queued IO) when the last opener closes it.
pub const CFLAG_DESTROY_ON_DISCONNECT: u64 = 1 << 0;

/// Whether the kernel has the nbd module loaded.
pub fn available() -> bool {
    Path::new("/sys/module/nbd").exists()
}

/// What NBD_CMD_CONNECT and NBD_CMD_RECONFIGURE say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// A device index to use, or any free one.
    pub index: Option<u32>,
    pub size: u64,
    pub block_size: u64,
    /// Seconds a request may take before the kernel retries it on another connection. It must
    /// exceed the engine's replica timeout, an authority CAS and an engine restart (rule 12).
    pub timeout: u64,
    /// Seconds queued IO survives with no live connection, while the node reconnects.
    pub dead_conn_timeout: u64,
    /// The export's transmission flags from negotiation.
    pub server_flags: u64,
    /// `barnacle:<volume>:g<generation>`.
    pub backend: String,
    /// Negotiated connections (one per hardware queue).
    pub sockets: Vec<RawFd>,
}

fn err(e: impl std::fmt::Display) -> NodeError {
    NodeError::Internal(format!("nbd netlink: {e}"))
}

fn attr<P: neli::Size + neli::ToBytes>(kind: u16, payload: P) -> Result<Nlattr<u16, Buffer>, NodeError> {
    NlattrBuilder::default()
        .nla_type(AttrTypeBuilder::default().nla_type(kind).build().map_err(err)?)
        .nla_payload(payload)
        .build()
        .map_err(err)
}

fn nested(kind: u16) -> Result<Nlattr<u16, Buffer>, NodeError> {
    NlattrBuilder::default()
        .nla_type(AttrTypeBuilder::default().nla_type(kind).nla_nested(true).build().map_err(err)?)
        .nla_payload(Vec::<u8>::new())
        .build()
        .map_err(err)
}

/// The attributes of a connect (or, without size and flags, a reconfigure).
pub fn connect_attrs(c: &Connect, reconfigure: bool) -> Result<GenlBuffer<u16, Buffer>, NodeError> {
    let mut attrs = Vec::new();
    if let Some(i) = c.index {
        attrs.push(attr(ATTR_INDEX, i)?);
    }
    if reconfigure && c.size > 0 {
        // A grown export (the kernel applies a size on reconfigure since Linux 5.12).
        attrs.push(attr(ATTR_SIZE_BYTES, c.size)?);
    }
    if !reconfigure {
        attrs.push(attr(ATTR_SIZE_BYTES, c.size)?);
        attrs.push(attr(ATTR_BLOCK_SIZE_BYTES, c.block_size)?);
        attrs.push(attr(ATTR_SERVER_FLAGS, c.server_flags)?);
        attrs.push(attr(ATTR_CLIENT_FLAGS, CFLAG_DESTROY_ON_DISCONNECT)?);
        attrs.push(attr(ATTR_BACKEND_IDENTIFIER, c.backend.as_str())?);
    }
    attrs.push(attr(ATTR_TIMEOUT, c.timeout)?);
    attrs.push(attr(ATTR_DEAD_CONN_TIMEOUT, c.dead_conn_timeout)?);
    let mut socks = nested(ATTR_SOCKETS)?;
    for fd in &c.sockets {
        let fd = u32::try_from(*fd).map_err(|_| err(format!("bad descriptor {fd}")))?;
        let item = nested(SOCK_ITEM)?.nest(&attr(SOCK_FD, fd)?).map_err(err)?;
        socks = socks.nest(&item).map_err(err)?;
    }
    attrs.push(socks);
    Ok(attrs.into_iter().collect())
}

fn message(cmd: u8, attrs: GenlBuffer<u16, Buffer>) -> Result<Genlmsghdr<u8, u16>, NodeError> {
    GenlmsghdrBuilder::default().cmd(cmd).version(VERSION).attrs(attrs).build().map_err(err)
}

/// Sends one nbd command; returns the payloads of the replies.
fn request(cmd: u8, attrs: GenlBuffer<u16, Buffer>) -> Result<Vec<Genlmsghdr<u8, u16>>, NodeError> {
    let (router, _) = NlRouter::connect(NlFamily::Generic, None, Groups::empty()).map_err(err)?;
    let family = router.resolve_genl_family(FAMILY).map_err(err)?;
    let replies = router
        .send::<u16, Genlmsghdr<u8, u16>, u16, Genlmsghdr<u8, u16>>(
            family,
            NlmF::ACK,
            NlPayload::Payload(message(cmd, attrs)?),
        )
        .map_err(err)?;
    let mut out = Vec::new();
    for reply in replies {
        if let Some(p) = reply.map_err(err)?.get_payload() {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// Sends one nbd command and returns the device index of the reply, if it carries one.
fn call(cmd: u8, attrs: GenlBuffer<u16, Buffer>) -> Result<Option<u32>, NodeError> {
    Ok(request(cmd, attrs)?
        .iter()
        .find_map(|p| p.attrs().get_attr_handle().get_attr_payload_as::<u32>(ATTR_INDEX).ok()))
}

/// The device index of an `NBD_CMD_LINK_DEAD` notification: one of the device's connections
/// died (its engine restarted, say), and the kernel keeps its IO queued for the dead-connection
/// timeout.
pub fn link_dead_index(msg: &Genlmsghdr<u8, u16>) -> Option<u32> {
    if *msg.cmd() != CMD_LINK_DEAD {
        return None;
    }
    msg.attrs().get_attr_handle().get_attr_payload_as::<u32>(ATTR_INDEX).ok()
}

/// Listens to the nbd family's multicast group: sends `None` once subscribed (notifications
/// before then were missed), then `Some(index)` for every device whose connection died, until
/// `events` is closed (`Ok`) or the socket fails (`Err`: subscribe again). Blocking: run it on a
/// thread of its own.
pub fn watch_link_dead(events: &tokio::sync::mpsc::UnboundedSender<Option<u32>>) -> Result<(), NodeError> {
    let (router, mut notifications) =
        NlRouter::connect(NlFamily::Generic, None, Groups::empty()).map_err(err)?;
    let group = router.resolve_nl_mcast_group(FAMILY, MCAST_GROUP).map_err(err)?;
    router.add_mcast_membership(Groups::new_groups(&[group])).map_err(err)?;
    if events.send(None).is_err() {
        return Ok(());
    }
    while let Some(msg) = notifications.next_typed::<u16, Genlmsghdr<u8, u16>>() {
        let msg = msg.map_err(err)?;
        if let Some(index) = msg.get_payload().and_then(link_dead_index)
            && events.send(Some(index)).is_err()
        {
            return Ok(());
        }
    }
    Err(err("the netlink socket closed"))
}
/// Connects a device; returns its index (`/dev/nbd<index>`). Blocking: run off the async threads.
pub fn connect(c: &Connect) -> Result<u32, NodeError> {
    let index = call(CMD_CONNECT, connect_attrs(c, false)?)?;
    index.or(c.index).ok_or_else(|| err("the kernel did not say which device it connected"))
}

/// Gives a connected device new sockets (after the engine restarted). Blocking.
pub fn reconfigure(c: &Connect) -> Result<(), NodeError> {
    call(CMD_RECONFIGURE, connect_attrs(c, true)?).map(|_| ())
}

/// Disconnects a device (its sockets close, queued IO fails). Blocking.
pub fn disconnect(index: u32) -> Result<(), NodeError> {
    call(CMD_DISCONNECT, std::iter::once(attr(ATTR_INDEX, index)?).collect()).map(|_| ())
}

/// The backend identifier of a volume's attachment.
pub fn backend_id(volume_id: &str, generation: &str) -> String {
    format!("barnacle:{volume_id}:g{generation}")
}

/// Devices with a backend identifier, from `sysfs` (a `/sys/block` directory).
pub fn devices(sysfs: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(sysfs) else { return out };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("nbd") {
            continue;
        }
        if let Ok(b) = std::fs::read_to_string(e.path().join("backend")) {
            out.push((PathBuf::from(format!("/dev/{name}")), b.trim_end().to_owned()));
        }
    }
    out.sort();
    out
}

/// The device attached for `volume_id` (any generation).
pub fn find(sysfs: &Path, volume_id: &str) -> Option<(PathBuf, String)> {
    let prefix = format!("barnacle:{volume_id}:g");
    devices(sysfs).into_iter().find(|(_, b)| b.starts_with(&prefix))
}

#[cfg(test)]
mod tests {
    use super::*;
    use neli::ToBytes;

    /// Walks netlink attributes: (type without flags, nested flag, payload).
    fn walk(mut b: &[u8]) -> Vec<(u16, bool, Vec<u8>)> {
        let mut out = Vec::new();
        while b.len() >= 4 {
            let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
            let kind = u16::from_ne_bytes([b[2], b[3]]);
            out.push((kind & 0x3fff, kind & 0x8000 != 0, b[4..len].to_vec()));
            let padded = len.div_ceil(4) * 4;
            b = &b[padded.min(b.len())..];
        }
        out
    }

    fn spec() -> Connect {
        Connect {
            index: None,
            size: 10 << 30,
            block_size: 4096,
            timeout: 60,
            dead_conn_timeout: 120,
            server_flags: 0x15d,
            backend: backend_id("vol-1", "3"),
            sockets: vec![7, 9],
        }
    }

    #[test]
    fn a_connect_carries_size_timeouts_backend_and_every_socket() {
        let attrs = connect_attrs(&spec(), false).unwrap_or_else(|e| panic!("{e}"));
        let mut bytes = std::io::Cursor::new(Vec::new());
        attrs.to_bytes(&mut bytes).unwrap_or_else(|e| panic!("{e}"));
        let top = walk(bytes.get_ref());
        let get = |k: u16| top.iter().find(|(t, _, _)| *t == k).map(|(_, n, p)| (*n, p.clone()));
        let u64_of = |p: Vec<u8>| u64::from_ne_bytes(p[..8].try_into().unwrap_or([0; 8]));
        assert_eq!(get(ATTR_INDEX), None, "no index: the kernel picks a free device");
        assert_eq!(get(ATTR_SIZE_BYTES).map(|x| u64_of(x.1)), Some(10 << 30));
        assert_eq!(get(ATTR_BLOCK_SIZE_BYTES).map(|x| u64_of(x.1)), Some(4096));
        assert_eq!(get(ATTR_TIMEOUT).map(|x| u64_of(x.1)), Some(60));
        assert_eq!(get(ATTR_DEAD_CONN_TIMEOUT).map(|x| u64_of(x.1)), Some(120));
        assert_eq!(get(ATTR_SERVER_FLAGS).map(|x| u64_of(x.1)), Some(0x15d));
        assert_eq!(get(ATTR_CLIENT_FLAGS).map(|x| u64_of(x.1)), Some(CFLAG_DESTROY_ON_DISCONNECT));
        let backend = get(ATTR_BACKEND_IDENTIFIER).map(|x| x.1).unwrap_or_default();
        assert_eq!(
            backend.split(|b| *b == 0).next(),
            Some(&b"barnacle:vol-1:g3"[..]),
            "NUL-terminated string"
        );
        let (is_nested, socks) = get(ATTR_SOCKETS).unwrap_or_default();
        assert!(is_nested);
        let items = walk(&socks);
        assert_eq!(items.len(), 2);
        let fds: Vec<u32> = items
            .iter()
            .map(|(t, n, p)| {
                assert_eq!((*t, *n), (SOCK_ITEM, true));
                let inner = walk(p);
                assert_eq!(inner[0].0, SOCK_FD);
                u32::from_ne_bytes(inner[0].2[..4].try_into().unwrap_or([0; 4]))
            })
            .collect();
        assert_eq!(fds, [7, 9]);
    }

    #[test]
    fn a_reconfigure_names_the_device_and_only_sockets_and_timeouts() {
        let mut c = spec();
        c.index = Some(4);
        c.size = 0;
        let attrs = connect_attrs(&c, true).unwrap_or_else(|e| panic!("{e}"));
        let mut bytes = std::io::Cursor::new(Vec::new());
        attrs.to_bytes(&mut bytes).unwrap_or_else(|e| panic!("{e}"));
        let kinds: Vec<u16> = walk(bytes.get_ref()).iter().map(|(t, _, _)| *t).collect();
        assert_eq!(kinds, [ATTR_INDEX, ATTR_TIMEOUT, ATTR_DEAD_CONN_TIMEOUT, ATTR_SOCKETS]);
        c.size = 20 << 30;
        let attrs = connect_attrs(&c, true).unwrap_or_else(|e| panic!("{e}"));
        let mut bytes = std::io::Cursor::new(Vec::new());
        attrs.to_bytes(&mut bytes).unwrap_or_else(|e| panic!("{e}"));
        let kinds: Vec<u16> = walk(bytes.get_ref()).iter().map(|(t, _, _)| *t).collect();
        assert_eq!(
            kinds,
            [ATTR_INDEX, ATTR_SIZE_BYTES, ATTR_TIMEOUT, ATTR_DEAD_CONN_TIMEOUT, ATTR_SOCKETS],
            "a resize"
        );
    }

    #[test]
    fn a_link_dead_notification_names_its_device() {
        let note = |cmd: u8| {
            message(cmd, std::iter::once(attr(ATTR_INDEX, 7u32).unwrap_or_else(|e| panic!("{e}"))).collect())
                .unwrap_or_else(|e| panic!("{e}"))
        };
        assert_eq!(link_dead_index(&note(CMD_LINK_DEAD)), Some(7));
        assert_eq!(link_dead_index(&note(CMD_CONNECT)), None, "other commands are not notifications");
        let bare = message(CMD_LINK_DEAD, GenlBuffer::new()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(link_dead_index(&bare), None);
    }

    #[test]
    fn devices_are_matched_to_volumes_by_the_backend_the_kernel_keeps() {
        let dir = std::env::temp_dir().join(format!("nbd-sysfs-{}", std::process::id()));
        for (name, backend) in [
            ("nbd0", Some("barnacle:vol-a:g1\n")),
            ("nbd1", None),
            ("nbd2", Some("barnacle:vol-b:g7\n")),
            ("loop0", Some("x")),
        ] {
            std::fs::create_dir_all(dir.join(name)).unwrap_or_else(|e| panic!("{e}"));
            if let Some(b) = backend {
                std::fs::write(dir.join(name).join("backend"), b).unwrap_or_else(|e| panic!("{e}"));
            }
        }
        assert_eq!(find(&dir, "vol-b"), Some((PathBuf::from("/dev/nbd2"), "barnacle:vol-b:g7".to_owned())));
        assert_eq!(find(&dir, "vol-a").map(|x| x.0), Some(PathBuf::from("/dev/nbd0")));
        assert_eq!(find(&dir, "vol"), None, "a prefix of another volume's id does not match");
        assert_eq!(devices(&dir).len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
