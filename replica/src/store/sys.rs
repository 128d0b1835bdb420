//! Positioned IO on the data file and the Linux calls the store needs: hole punching, reflink
//! (FICLONERANGE) and in-kernel copy. Everything here blocks, except [`read_cached_at`], which
//! reads only what the page cache already holds.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use nix::fcntl::{FallocateFlags, fallocate};

/// Like [`read_full_at`], but only from the page cache (`RWF_NOWAIT`): `Ok(false)` when some of
/// the range would have to come from the device, with `buf` then partly filled.
pub(crate) fn read_cached_at(f: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<bool> {
    while !buf.is_empty() {
        let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        let at = libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: one iovec describing `buf`, which is valid for writes of its length and borrowed
        // mutably for the whole call; the fd is open for the life of `f`.
        let n = unsafe { libc::preadv2(f.as_raw_fd(), &raw const iov, 1, at, libc::RWF_NOWAIT) };
        match n {
            // A mapped cluster lies inside the file; let the blocking path sort out anything odd.
            0 => return Ok(false),
            n if n > 0 => {
                let n = usize::try_from(n).unwrap_or(0);
                buf = &mut buf[n..];
                offset += n as u64;
            }
            _ => {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    // EAGAIN (not cached), or no support here (old kernel, seccomp, odd file
                    // system): the blocking read reports any real error.
                    _ => return Ok(false),
                }
            }
        }
    }
    Ok(true)
}

/// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as zeros.
pub(crate) fn read_full_at(f: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match f.read_at(buf, offset) {
            Ok(0) => {
                buf.fill(0);
                return Ok(());
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub(crate) fn write_full_at(f: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    f.write_all_at(buf, offset)
}

fn off(v: u64) -> io::Result<i64> {
    i64::try_from(v).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond i64"))
}

/// Deallocates `[offset, offset+len)`; the range reads as zeros afterwards and the file size is
/// unchanged.
pub(crate) fn punch_hole(f: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    fallocate(
        f,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        off(offset)?,
        off(len)?,
    )
    .map_err(io::Error::from)
}

/// (bytes available to unprivileged users, total bytes) of the filesystem holding `path`.
pub(crate) fn free_space(path: &std::path::Path) -> io::Result<(u64, u64)> {
    let s = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    let unit = s.fragment_size();
    Ok((s.blocks_available() * unit, s.blocks() * unit))
}

/// Opens a block device for the store's data: its file and size in bytes.
pub(crate) fn open_device(path: &std::path::Path) -> io::Result<(File, u64)> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::fs::OpenOptionsExt;
    // O_EXCL on a block device: refused while it is mounted or held by another store.
    let mut f = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_EXCL).open(path)?;
    if !f.metadata()?.file_type().is_block_device() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a block device", path.display()),
        ));
    }
    let len = f.seek(SeekFrom::End(0))?;
    Ok((f, len))
}

const SUPERBLOCK_MAGIC: &[u8; 8] = b"BRNCLDEV";
const SUPERBLOCK_LEN: usize = 4096;

/// Writes the superblock naming `store_id` and `volume_id` at the start of a data device.
pub(crate) fn write_superblock(f: &File, store_id: uuid::Uuid, volume_id: &str) -> io::Result<()> {
    let mut b = vec![0u8; SUPERBLOCK_LEN];
    b[..8].copy_from_slice(SUPERBLOCK_MAGIC);
    b[8..12].copy_from_slice(&1u32.to_be_bytes());
    b[12..28].copy_from_slice(store_id.as_bytes());
    let v = volume_id.as_bytes();
    let n = v.len().min(SUPERBLOCK_LEN - 30);
    #[allow(clippy::cast_possible_truncation)]
    b[28..30].copy_from_slice(&(n as u16).to_be_bytes());
    b[30..30 + n].copy_from_slice(&v[..n]);
    write_full_at(f, &b, 0)?;
    f.sync_data()
}

/// The (store id, volume id) a data device belongs to, or `None` when it carries no superblock.
pub(crate) fn read_superblock(f: &File) -> io::Result<Option<(uuid::Uuid, String)>> {
    let mut b = vec![0u8; SUPERBLOCK_LEN];
    read_full_at(f, &mut b, 0)?;
    if &b[..8] != SUPERBLOCK_MAGIC {
        return Ok(None);
    }
    let id = uuid::Uuid::from_slice(&b[12..28]).map_err(io::Error::other)?;
    let n = usize::from(u16::from_be_bytes([b[28], b[29]])).min(SUPERBLOCK_LEN - 30);
    Ok(Some((id, String::from_utf8_lossy(&b[30..30 + n]).into_owned())))
}

pub(crate) fn clear_superblock(f: &File) -> io::Result<()> {
    write_full_at(f, &vec![0u8; SUPERBLOCK_LEN], 0)?;
    f.sync_data()
}

/// `struct file_clone_range` from linux/fs.h.
#[repr(C)]
#[derive(Debug)]
struct FileCloneRange {
    src_fd: i64,
    src_offset: u64,
    src_length: u64,
    dest_offset: u64,
}

nix::ioctl_write_ptr!(ficlonerange, 0x94, 13, FileCloneRange);

/// How a range reached its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMode {
    /// Extents shared with the source (FICLONERANGE): no data written.
    Reflink,
    /// Copied by the kernel (copy_file_range), which may itself share extents.
    Copy,
}

/// Makes `[dst_off, dst_off+len)` of `dst` hold the bytes of `[src_off, src_off+len)` of `src`:
/// shares the extents when the filesystem supports reflink, copies in the kernel otherwise.
pub(crate) fn clone_or_copy(
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    len: u64,
    try_reflink: bool,
) -> io::Result<CopyMode> {
    if try_reflink {
        let arg = FileCloneRange {
            src_fd: i64::from(src.as_raw_fd()),
            src_offset: src_off,
            src_length: len,
            dest_offset: dst_off,
        };
        // SAFETY: `arg` is a valid, initialised file_clone_range that outlives the call, and
        // `dst` is an open file descriptor; the kernel only reads the struct.
        match unsafe { ficlonerange(dst.as_raw_fd(), &raw const arg) } {
            Ok(_) => return Ok(CopyMode::Reflink),
            Err(
                nix::errno::Errno::EOPNOTSUPP
                | nix::errno::Errno::EXDEV
                | nix::errno::Errno::EINVAL
                | nix::errno::Errno::ENOTTY,
            ) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut done = 0u64;
    while done < len {
        let mut so = off(src_off + done)?;
        let mut dof = off(dst_off + done)?;
        let chunk = usize::try_from(len - done).unwrap_or(usize::MAX).min(1 << 30);
        let n = match nix::fcntl::copy_file_range(src, Some(&mut so), dst, Some(&mut dof), chunk) {
            Ok(n) => n,
            // Block devices (raw partitions) and some filesystems: copy through user space.
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::EXDEV | nix::errno::Errno::EOPNOTSUPP) => {
                copy_through_buffer(src, src_off + done, dst, dst_off + done, len - done)?;
                return Ok(CopyMode::Copy);
            }
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            // Source shorter than the range: the rest of the target stays a hole (zeros).
            break;
        }
        done += n as u64;
    }
    Ok(CopyMode::Copy)
}

fn copy_through_buffer(src: &File, src_off: u64, dst: &File, dst_off: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from(len - done).unwrap_or(usize::MAX).min(buf.len());
        read_full_at(src, &mut buf[..n], src_off + done)?;
        write_full_at(dst, &buf[..n], dst_off + done)?;
        done += n as u64;
    }
    Ok(())
}
