//! The shared-memory data channel between an engine and a replica on the same node.
//!
//! Over a unix socket the engine may hand the replica a sealed memfd (SCM_RIGHTS, in the one-byte
//! transport preamble, see docs/protocol.md). Large reads and writes then carry only an offset into
//! that area: the engine reads a client's write payload straight into the area and the replica
//! writes it to disk from there; the replica reads from disk into the area and the engine sends it
//! to the client from there. Each byte crosses one socket (the client's) instead of two, as with a
//! server that owns the disk itself.
//!
//! - [`Mapping`]: a shared mapping of a memfd, created sealed by the engine, attached (after its
//!   seals and size are checked) by the replica.
//! - [`Area`] and [`Slot`]: the engine's allocator over its mapping. A slot is owned by exactly one
//!   request; it returns to the area only after the replica answered that request, so a late
//!   replica can never touch a slot that another request holds. When a request times out or the
//!   connection closes, the area is killed: nothing returns to it any more and new requests use the
//!   socket.
//! - [`Ranges`]: the replica's record of which parts of the area its requests are using, so two
//!   requests never alias the same bytes.

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};
use parking_lot::Mutex;

/// Allocation unit of an engine's area.
pub const UNIT: usize = 64 * 1024;
/// Units in an engine's area (one bit each in the free mask).
pub const UNITS: usize = 32;
/// Size of the area an engine creates: 16 requests of 128 KiB in flight.
pub const AREA_BYTES: usize = UNIT * UNITS;
/// Requests smaller than this go through the socket: for them the copy is cheaper than a slot.
pub const MIN_IO: usize = 16 * 1024;
/// Requests larger than this go through the socket, so one request cannot take the whole area.
pub const MAX_IO: usize = 512 * 1024;
/// Largest area a replica accepts.
pub const MAX_AREA_BYTES: u64 = 64 << 20;

/// A read-write shared mapping of a whole memfd.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is plain shared memory owned by this value until drop; every access goes
// through `Slot` (one owner per range, engine side) or `Ranges` (one request per range, replica
// side), which keep accesses from different threads disjoint.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only hands out the base pointer and length.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Creates a memfd of `len` bytes, seals its size (so the peer's mapping can never lose its
    /// pages under it), and maps it.
    pub fn create(len: usize) -> std::io::Result<Mapping> {
        let fd = memfd_create("barnacle-shm", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)?;
        nix::unistd::ftruncate(&fd, i64::try_from(len).map_err(std::io::Error::other)?)?;
        fcntl(
            &fd,
            FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL),
        )?;
        Self::map(fd, len)
    }

    /// Maps a memfd received from an engine, after checking that its size is sealed and sensible.
    pub fn attach(fd: OwnedFd) -> std::io::Result<Mapping> {
        let seals = SealFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GET_SEALS)?);
        if !seals.contains(SealFlag::F_SEAL_SHRINK) {
            return Err(std::io::Error::other("the shared memory is not sealed against shrinking"));
        }
        let size = nix::sys::stat::fstat(&fd)?.st_size;
        let size = u64::try_from(size).map_err(std::io::Error::other)?;
        if size == 0 || size > MAX_AREA_BYTES || !size.is_multiple_of(4096) {
            return Err(std::io::Error::other(format!(
                "shared memory of {size} bytes (must be a multiple of 4 KiB up to {MAX_AREA_BYTES})"
            )));
        }
        Self::map(fd, usize::try_from(size).map_err(std::io::Error::other)?)
    }

    fn map(fd: OwnedFd, len: usize) -> std::io::Result<Mapping> {
        let nz = NonZeroUsize::new(len).ok_or_else(|| std::io::Error::other("empty shared memory"))?;
        // SAFETY: a fresh mapping chosen by the kernel (no address hint), so it overlaps nothing;
        // the memfd's size is at least `len` and sealed against shrinking, so every page stays
        // backed while mapped.
        let ptr = unsafe {
            mmap(None, nz, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED, &fd, 0)?
        };
        Ok(Mapping { ptr: ptr.cast(), len, fd })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memfd, to pass to the peer.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn base(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned; nothing borrows the mapping any
        // more (slots and ranges hold an `Arc` of their mapping).
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}

/// The engine's allocator over its mapping.
#[derive(Debug)]
pub struct Area {
    map: Mapping,
    /// Bit `i` set: unit `i` is free.
    free: Mutex<u32>,
    dead: AtomicBool,
}

impl Area {
    /// A new area of [`AREA_BYTES`].
    pub fn create() -> std::io::Result<Arc<Area>> {
        Ok(Arc::new(Area {
            map: Mapping::create(AREA_BYTES)?,
            free: Mutex::new(u32::MAX),
            dead: AtomicBool::new(false),
        }))
    }

    /// The memfd, to pass to the replica.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.map.fd()
    }

    /// Whether a request of `len` bytes should use the area.
    pub fn suits(len: usize) -> bool {
        (MIN_IO..=MAX_IO).contains(&len)
    }

    /// A slot of `len` bytes, or `None` when the area is dead, `len` does not suit it, or no run
    /// of free units is long enough (the caller then uses the socket).
    pub fn alloc(self: &Arc<Self>, len: usize) -> Option<Slot> {
        if !Self::suits(len) || self.dead.load(Ordering::Acquire) {
            return None;
        }
        let units = len.div_ceil(UNIT);
        let want = if units >= 32 { u32::MAX } else { (1u32 << units) - 1 };
        let mut free = self.free.lock();
        let first = (0..=UNITS - units).find(|&i| (*free >> i) & want == want)?;
        *free &= !(want << first);
        Some(Slot { area: self.clone(), first, units, len })
    }

    /// Where `data` starts in the area, if it lies wholly inside it.
    pub fn offset_of(&self, data: &[u8]) -> Option<u64> {
        let base = self.map.base() as usize;
        let start = data.as_ptr() as usize;
        let off = start.checked_sub(base)?;
        (off + data.len() <= self.map.len()).then_some(off as u64)
    }

    /// Stops all reuse: after a request timed out or the connection closed, the replica may still
    /// be using any slot it was given.
    pub fn kill(&self) {
        self.dead.store(true, Ordering::Release);
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Free units, for tests and metrics.
    pub fn free_units(&self) -> u32 {
        self.free.lock().count_ones()
    }
}

/// One request's part of an [`Area`]. Dropping it returns the units, unless the area was killed.
#[derive(Debug)]
pub struct Slot {
    area: Arc<Area>,
    first: usize,
    units: usize,
    len: usize,
}

impl Slot {
    /// Offset of the slot in the area, as sent to the replica.
    pub fn offset(&self) -> u64 {
        (self.first * UNIT) as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The slot's bytes, to fill before a write.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the units are this slot's alone (the allocator hands each out once), in bounds
        // of the live mapping the `Arc` keeps; the memory is initialised (memfd pages read as zero
        // until written). The replica touches a slot only while a request naming it is in flight,
        // and the engine does not fill a slot it has sent.
        unsafe { std::slice::from_raw_parts_mut(self.area.map.base().add(self.first * UNIT), self.len) }
    }

    /// The slot as bytes (for a read's data, once the replica answered, or a filled write).
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for Slot {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: as in `as_mut_slice`; shared access to the slot's own units.
        unsafe { std::slice::from_raw_parts(self.area.map.base().add(self.first * UNIT), self.len) }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.area.is_dead() {
            return;
        }
        let want = if self.units >= 32 { u32::MAX } else { (1u32 << self.units) - 1 };
        *self.area.free.lock() |= want << self.first;
    }
}

/// The replica's side of a connection's area: the mapping and the ranges requests are using.
#[derive(Debug)]
pub struct Ranges {
    map: Mapping,
    busy: Mutex<Vec<(usize, usize)>>,
}

/// Why a request's area range was refused.
#[derive(Debug, thiserror::Error)]
pub enum RangeError {
    #[error("shared-memory range {offset}+{len} is outside the {size}-byte area")]
    Outside { offset: u64, len: u32, size: usize },
    #[error("shared-memory range {offset}+{len} overlaps a request in flight")]
    Overlap { offset: u64, len: u32 },
}

impl Ranges {
    pub fn new(map: Mapping) -> Arc<Ranges> {
        Arc::new(Ranges { map, busy: Mutex::new(Vec::new()) })
    }

    /// Takes `[offset, offset+len)` of the area for one request.
    pub fn take(self: &Arc<Self>, offset: u64, len: u32) -> Result<Range, RangeError> {
        let size = self.map.len();
        let start = usize::try_from(offset).ok().filter(|&s| s <= size);
        let Some(start) = start.filter(|&s| size - s >= len as usize) else {
            return Err(RangeError::Outside { offset, len, size });
        };
        let end = start + len as usize;
        let mut busy = self.busy.lock();
        if busy.iter().any(|&(s, e)| start < e && s < end) {
            return Err(RangeError::Overlap { offset, len });
        }
        busy.push((start, end));
        Ok(Range { ranges: self.clone(), start, end })
    }
}

/// One request's range of a replica's mapping; released on drop.
#[derive(Debug)]
pub struct Range {
    ranges: Arc<Ranges>,
    start: usize,
    end: usize,
}

impl Range {
    /// The range's bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: in bounds of the live mapping (checked in `take`; the `Arc` keeps it mapped);
        // no other request of this process holds an overlapping range. The engine contracts not to
        // touch the range until it has the reply; if it broke that, only the bytes of this one
        // request would be affected.
        unsafe { std::slice::from_raw_parts(self.ranges.map.base().add(self.start), self.end - self.start) }
    }

    /// The range's bytes, to fill for a read.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only access from this process.
        unsafe {
            std::slice::from_raw_parts_mut(self.ranges.map.base().add(self.start), self.end - self.start)
        }
    }
}

impl AsRef<[u8]> for Range {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsMut<[u8]> for Range {
    fn as_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl Drop for Range {
    fn drop(&mut self) {
        let mut busy = self.ranges.busy.lock();
        if let Some(i) = busy.iter().position(|&(s, e)| s == self.start && e == self.end) {
            busy.swap_remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
    use super::*;

    #[test]
    fn slots_are_disjoint_and_return_after_drop() {
        let area = Area::create().unwrap();
        assert!(area.alloc(4096).is_none(), "small requests use the socket");
        assert!(area.alloc(MAX_IO + 1).is_none(), "large requests use the socket");
        let mut slots: Vec<Slot> = (0..16).map(|_| area.alloc(128 * 1024).unwrap()).collect();
        assert!(area.alloc(MIN_IO).is_none(), "the area is full");
        let mut offsets: Vec<u64> = slots.iter().map(Slot::offset).collect();
        offsets.sort_unstable();
        offsets.dedup();
        assert_eq!(offsets.len(), 16);
        for (i, s) in slots.iter_mut().enumerate() {
            s.as_mut_slice().fill(i as u8);
        }
        for (i, s) in slots.iter().enumerate() {
            assert!(s.as_ref().iter().all(|&b| b == i as u8), "slot {i} was overwritten");
        }
        let last = slots.last().unwrap().offset();
        let b = slots.pop().unwrap().into_bytes();
        assert_eq!(area.offset_of(&b), Some(last));
        assert_eq!(area.free_units(), 0, "bytes keep their slot");
        drop(b);
        assert_eq!(area.free_units(), 2);
        drop(slots);
        assert_eq!(area.free_units(), 32);
        let big = area.alloc(MAX_IO).unwrap();
        assert_eq!(area.free_units(), 24);
        drop(big);
    }

    #[test]
    fn offsets_are_found_only_inside_the_area() {
        let area = Area::create().unwrap();
        let mut s = area.alloc(64 * 1024).unwrap();
        let off = s.offset();
        let b = {
            s.as_mut_slice()[0] = 7;
            s.into_bytes()
        };
        assert_eq!(area.offset_of(&b), Some(off));
        assert_eq!(area.offset_of(&b[4096..8192]), Some(off + 4096));
        let heap = vec![0u8; 65536];
        assert_eq!(area.offset_of(&heap), None);
    }

    #[test]
    fn a_killed_area_takes_nothing_back() {
        let area = Area::create().unwrap();
        let s = area.alloc(128 * 1024).unwrap();
        area.kill();
        drop(s);
        assert_eq!(area.free_units(), 30, "a slot the replica may still use is never reused");
        assert!(area.alloc(128 * 1024).is_none());
    }

    #[test]
    fn the_replica_sees_what_the_engine_wrote() {
        let area = Area::create().unwrap();
        let fd = area.fd().try_clone_to_owned().unwrap();
        let ranges = Ranges::new(Mapping::attach(fd).unwrap());
        let mut s = area.alloc(128 * 1024).unwrap();
        s.as_mut_slice().fill(0xa5);
        let mut r = ranges.take(s.offset(), 128 * 1024).unwrap();
        assert!(r.as_slice().iter().all(|&b| b == 0xa5));
        r.as_mut_slice().fill(0x5a);
        drop(r);
        assert!(s.as_ref().iter().all(|&b| b == 0x5a));
    }

    #[test]
    fn replica_ranges_are_checked() {
        let area = Area::create().unwrap();
        let ranges = Ranges::new(Mapping::attach(area.fd().try_clone_to_owned().unwrap()).unwrap());
        let size = AREA_BYTES as u64;
        assert!(matches!(ranges.take(size, 1), Err(RangeError::Outside { .. })));
        assert!(matches!(ranges.take(size - 4096, 8192), Err(RangeError::Outside { .. })));
        assert!(matches!(ranges.take(u64::MAX, 4096), Err(RangeError::Outside { .. })));
        let a = ranges.take(0, 65536).unwrap();
        assert!(matches!(ranges.take(4096, 4096), Err(RangeError::Overlap { .. })));
        let b = ranges.take(65536, 65536).unwrap();
        drop(a);
        let _c = ranges.take(4096, 4096).unwrap();
        drop(b);
        assert!(ranges.take(size - 4096, 4096).is_ok());
    }

    #[test]
    fn unsealed_or_odd_memory_is_refused() {
        let fd = memfd_create("t", MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&fd, 65536).unwrap();
        let e = Mapping::attach(fd).unwrap_err();
        assert!(e.to_string().contains("sealed"), "{e}");
        let fd = memfd_create("t", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
        nix::unistd::ftruncate(&fd, 1000).unwrap();
        fcntl(&fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK)).unwrap();
        let e = Mapping::attach(fd).unwrap_err();
        assert!(e.to_string().contains("multiple"), "{e}");
        let fd = memfd_create("t", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
        nix::unistd::ftruncate(&fd, i64::try_from(MAX_AREA_BYTES).unwrap() + 4096).unwrap();
        fcntl(&fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK)).unwrap();
        assert!(Mapping::attach(fd).is_err());
    }
}
