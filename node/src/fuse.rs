//! The userspace attach's FUSE side: a filesystem holding one file, `disk`, whose bytes are the
//! NBD export's. A loop device on that file is the volume's block device on a node without the
//! kernel nbd module.
//!
//! The file is opened in direct-IO mode, so the kernel caches nothing between the loop device and
//! the export; `fsync` is an NBD FLUSH. Requests are answered from tokio tasks, so many are in
//! flight at once. IO not aligned to the export's 4 KiB blocks (the loop device uses 4 KiB
//! sectors, so only stray callers send it) is widened: reads read around it, writes read, modify
//! and write back under a lock that also orders them against each other.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, KernelConfig, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request,
    WriteFlags,
};
use tracing::warn;

use crate::nbd_client::{Client, NbdError};

/// The file's name in the filesystem.
pub const DISK_FILE: &str = "disk";
const ROOT: INodeNo = INodeNo(1);
const DISK: INodeNo = INodeNo(2);
/// The export's block size: IO is aligned to it.
const BLOCK: u64 = 4096;
/// Attributes are never cached: the size changes when the volume grows.
const TTL: Duration = Duration::ZERO;

/// The one-file filesystem over an NBD client.
#[derive(Debug)]
pub struct DiskFs {
    client: Arc<Client>,
    rt: tokio::runtime::Handle,
    /// Aligned writes take it shared, unaligned ones (read-modify-write) exclusive, so no write
    /// can land between an unaligned write's read and its write-back.
    rmw: Arc<tokio::sync::RwLock<()>>,
    read_only: bool,
}

impl DiskFs {
    pub fn new(client: Arc<Client>, rt: tokio::runtime::Handle) -> DiskFs {
        let read_only = client.info().read_only();
        DiskFs { client, rt, rmw: Arc::default(), read_only }
    }

    fn attr(&self, ino: INodeNo) -> FileAttr {
        let now = SystemTime::now();
        let (kind, perm, size, nlink) = if ino == ROOT {
            (FileType::Directory, 0o700, 0, 2)
        } else {
            (FileType::RegularFile, if self.read_only { 0o400 } else { 0o600 }, self.client.info().size, 1)
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

fn errno(e: &NbdError) -> Errno {
    match e {
        NbdError::Errno(n) => Errno::from_i32(i32::try_from(*n).unwrap_or(libc::EIO)),
        _ => Errno::EIO,
    }
}

/// Reads `[offset, offset + len)` through aligned NBD reads.
async fn read_range(client: &Client, offset: u64, len: u64) -> Result<Bytes, NbdError> {
    let start = offset / BLOCK * BLOCK;
    let end = (offset + len).div_ceil(BLOCK) * BLOCK;
    let span = u32::try_from(end - start).map_err(|_| NbdError::Errno(libc::EINVAL.cast_unsigned()))?;
    let data = client.read(start, span).await?;
    let from = usize::try_from(offset - start).unwrap_or(0);
    let to = from + usize::try_from(len).unwrap_or(0);
    Ok(data.slice(from..to.min(data.len())))
}

impl Filesystem for DiskFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_background(64);
        // Without it the kernel waits for each asynchronous direct IO on the file before taking
        // the next: a loop device in direct-IO mode then has one request in flight whatever the
        // queue depth above it (measured: 4 KiB random IO at QD32 at 0.4 × nbdfuse, which asks
        // for it through libfuse's defaults; bench/fs.sh, docs/performance.md).
        if let Err(missing) = config.add_capabilities(fuser::InitFlags::FUSE_ASYNC_DIO) {
            warn!(
                ?missing,
                "the kernel does not offer asynchronous direct IO over FUSE: the loop device will do one request at a time"
            );
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == ROOT && name == DISK_FILE {
            reply.entry(&TTL, &self.attr(DISK), fuser::Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == ROOT || ino == DISK {
            reply.attr(&TTL, &self.attr(ino));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The size is the volume's: it changes only by expansion, never by truncation here.
        if size.is_some_and(|s| s != self.client.info().size) {
            reply.error(Errno::EPERM);
        } else {
            reply.attr(&TTL, &self.attr(ino));
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let writing = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        if ino != DISK {
            reply.error(Errno::EISDIR);
        } else if writing && self.read_only {
            reply.error(Errno::EROFS);
        } else {
            reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let total = self.client.info().size;
        let len = u64::from(size).min(total.saturating_sub(offset));
        if len == 0 {
            reply.data(&[]);
            return;
        }
        let client = self.client.clone();
        self.rt.spawn(async move {
            let r = if offset.is_multiple_of(BLOCK) && len.is_multiple_of(BLOCK) {
                client.read(offset, u32::try_from(len).unwrap_or(u32::MAX)).await
            } else {
                read_range(&client, offset, len).await
            };
            match r {
                Ok(d) => reply.data(&d),
                Err(e) => {
                    warn!(offset, len, error = %e, "read failed");
                    reply.error(errno(&e));
                }
            }
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let total = self.client.info().size;
        let len = data.len() as u64;
        if offset.saturating_add(len) > total {
            reply.error(Errno::ENOSPC);
            return;
        }
        let fua = flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0;
        let data = Bytes::copy_from_slice(data);
        let (client, rmw) = (self.client.clone(), self.rmw.clone());
        self.rt.spawn(async move {
            let written = u32::try_from(data.len()).unwrap_or(u32::MAX);
            let r = if offset.is_multiple_of(BLOCK) && len.is_multiple_of(BLOCK) {
                let _g = rmw.read().await;
                client.write(offset, data, fua).await
            } else {
                let _g = rmw.write().await;
                let start = offset / BLOCK * BLOCK;
                let end = (offset + len).div_ceil(BLOCK) * BLOCK;
                match read_range(&client, start, end - start).await {
                    Ok(old) => {
                        let mut buf = BytesMut::from(&old[..]);
                        let at = usize::try_from(offset - start).unwrap_or(0);
                        buf[at..at + data.len()].copy_from_slice(&data);
                        client.write(start, buf.freeze(), fua).await
                    }
                    Err(e) => Err(e),
                }
            };
            match r {
                Ok(()) => reply.written(written),
                Err(e) => {
                    warn!(offset, len, error = %e, "write failed");
                    reply.error(errno(&e));
                }
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let client = self.client.clone();
        self.rt.spawn(async move {
            match client.flush().await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    /// Hole punching and zero ranges (what a loop device sends for discard and write-zeroes)
    /// become NBD WRITE_ZEROES: the range reads as zeros afterwards and the engine may unmap it.
    #[allow(clippy::too_many_arguments)]
    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let zeroing = mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0;
        if !zeroing {
            // Plain preallocation: the export is always fully sized.
            reply.ok();
            return;
        }
        if self.read_only {
            reply.error(Errno::EROFS);
            return;
        }
        if !offset.is_multiple_of(BLOCK) || !length.is_multiple_of(BLOCK) {
            reply.error(Errno::EOPNOTSUPP);
            return;
        }
        if offset.saturating_add(length) > self.client.info().size {
            reply.error(Errno::EINVAL);
            return;
        }
        let (client, rmw) = (self.client.clone(), self.rmw.clone());
        self.rt.spawn(async move {
            let _g = rmw.read().await;
            let mut at = offset;
            let end = offset + length;
            let mut r = Ok(());
            while at < end && r.is_ok() {
                let n = (end - at).min(1 << 30);
                r = client.write_zeroes(at, u32::try_from(n).unwrap_or(1 << 30)).await;
                at += n;
            }
            match r {
                Ok(()) => reply.ok(),
                Err(e) => {
                    warn!(offset, length, error = %e, "zeroing failed");
                    reply.error(errno(&e));
                }
            }
        });
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let client = self.client.clone();
        self.rt.spawn(async move {
            match client.flush().await {
                Ok(()) => reply.ok(),
                Err(e) => {
                    warn!(error = %e, "flush failed");
                    reply.error(errno(&e));
                }
            }
        });
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino != ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (DISK, FileType::RegularFile, DISK_FILE),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(usize::try_from(offset).unwrap_or(0)) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}
