//! Positioned IO on the data file and the Linux calls the store needs: hole punching, reflink
//! (FICLONERANGE) and in-kernel copy. Everything here blocks; callers run it off async threads.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use nix::fcntl::{FallocateFlags, fallocate};

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
        let n = nix::fcntl::copy_file_range(src, Some(&mut so), dst, Some(&mut dof), chunk)
            .map_err(io::Error::from)?;
        if n == 0 {
            // Source shorter than the range: the rest of the target stays a hole (zeros).
            break;
        }
        done += n as u64;
    }
    Ok(CopyMode::Copy)
}
