//! Block checksums: a CRC32C of every 4 KiB block of every physical cluster, kept in the `sums`
//! file beside the data (4 bytes per block, at `(physical cluster × blocks per cluster + block) ×
//! 4`), so an in-place overwrite still costs no metadata write. A read verifies the blocks it
//! returns; a mismatch is reported as a damaged copy, never returned as data.
//!
//! A stored value of zero means "no checksum recorded" (a block never written since its cluster
//! was allocated, or punched); such blocks are not verified. A block whose CRC happens to be zero
//! is therefore never verified either (one in 2^32).
//!
//! Crash consistency: the checksum is written after the data, and both files are synced together,
//! so a crash can leave a block whose data and checksum disagree only where a write was in flight.
//! Every such write lies in a region with a write-intent mark, and opening the store recomputes
//! the checksums of the head's clusters in marked regions from their data (`Store::reseal`).

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

use super::{BLOCK_SIZE, sys};

pub(crate) const SUMS_FILE: &str = "sums";
const SUM_LEN: u64 = 4;
const UNRECORDED: u32 = 0;
/// Largest cluster (4 MiB) / block size × 4 bytes: one cluster's checksums fit in this buffer.
const MAX_CLUSTER_SUMS: usize = 4096;
/// [`BLOCK_SIZE`] as a buffer length.
#[allow(clippy::cast_possible_truncation)]
const BLOCK: usize = BLOCK_SIZE as usize;

/// What a verification found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Every block with a recorded checksum matched it.
    Good,
    /// Block `n` of the range (counted from its start) does not match its checksum.
    Bad(u64),
    /// The checksums are not in the page cache (only when asked not to wait).
    NotCached,
}

/// The checksum file of one store; `None` inside when the store keeps no checksums.
#[derive(Debug)]
pub(crate) struct Sums {
    file: Option<File>,
    blocks_per_cluster: u64,
}

fn crc(block: &[u8]) -> u32 {
    crc32c::crc32c(block)
}

impl Sums {
    /// Opens (creating if missing: a store from before checksums has none recorded) the checksum
    /// file in `dir`, or keeps none when `enabled` is false.
    pub(crate) fn open(dir: &Path, enabled: bool, cluster_size: u64) -> io::Result<Sums> {
        let file = if enabled {
            Some(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(dir.join(SUMS_FILE))?,
            )
        } else {
            None
        };
        Ok(Sums { file, blocks_per_cluster: cluster_size / BLOCK_SIZE })
    }

    pub(crate) fn enabled(&self) -> bool {
        self.file.is_some()
    }

    fn pos(&self, p: u64, at: u64) -> u64 {
        (p * self.blocks_per_cluster + at / BLOCK_SIZE) * SUM_LEN
    }

    /// Encodes the checksums of `data` (whole blocks) into `out`; returns the bytes used.
    fn encode(data: &[u8], out: &mut [u8]) -> usize {
        let mut n = 0;
        for block in data.chunks(BLOCK) {
            out[n..n + 4].copy_from_slice(&crc(block).to_le_bytes());
            n += 4;
        }
        n
    }

    /// Records the checksums of `data` (inside one cluster), written at offset `at` of physical
    /// cluster `p`.
    pub(crate) fn record(&self, p: u64, at: u64, data: &[u8]) -> io::Result<()> {
        let Some(f) = &self.file else { return Ok(()) };
        debug_assert!(data.len() <= MAX_CLUSTER_SUMS / 4 * BLOCK);
        let mut buf = [0u8; MAX_CLUSTER_SUMS];
        let n = Self::encode(data, &mut buf);
        sys::write_full_at(f, &buf[..n], self.pos(p, at))
    }

    /// Records the checksums of a freshly allocated cluster `p` of which only `data` at `at` was
    /// written: the rest of the cluster (a hole) has none.
    pub(crate) fn record_fresh(&self, p: u64, at: u64, data: &[u8]) -> io::Result<()> {
        let Some(f) = &self.file else { return Ok(()) };
        let mut buf = [0u8; MAX_CLUSTER_SUMS];
        let first = usize::try_from(at / BLOCK_SIZE * SUM_LEN).unwrap_or(0);
        let n = Self::encode(data, &mut buf[first..]);
        debug_assert!(first + n <= buf.len());
        let whole = usize::try_from(self.blocks_per_cluster * SUM_LEN).unwrap_or(MAX_CLUSTER_SUMS);
        sys::write_full_at(f, &buf[..whole], self.pos(p, 0))
    }

    /// Forgets the checksums of `len` bytes at `at` of cluster `p` (punched or zeroed in place).
    pub(crate) fn clear(&self, p: u64, at: u64, len: u64) -> io::Result<()> {
        let Some(f) = &self.file else { return Ok(()) };
        let n = usize::try_from(len / BLOCK_SIZE * SUM_LEN).unwrap_or(0);
        let zeros = [0u8; MAX_CLUSTER_SUMS];
        sys::write_full_at(f, &zeros[..n.min(MAX_CLUSTER_SUMS)], self.pos(p, at))
    }

    /// Verifies `data`, read from offset `at` of cluster `p` (whole blocks, inside one cluster).
    /// With `cached`, only checksums already in the page cache are read.
    pub(crate) fn verify(&self, p: u64, at: u64, data: &[u8], cached: bool) -> io::Result<Verdict> {
        let Some(f) = &self.file else { return Ok(Verdict::Good) };
        let mut buf = [0u8; MAX_CLUSTER_SUMS];
        let n = (data.len() / BLOCK * 4).min(MAX_CLUSTER_SUMS);
        if cached {
            if !sys::read_cached_at(f, &mut buf[..n], self.pos(p, at))? {
                return Ok(Verdict::NotCached);
            }
        } else {
            sys::read_full_at(f, &mut buf[..n], self.pos(p, at))?;
        }
        for (i, block) in data.chunks(BLOCK).enumerate() {
            let stored = u32::from_le_bytes([buf[4 * i], buf[4 * i + 1], buf[4 * i + 2], buf[4 * i + 3]]);
            if stored != UNRECORDED && stored != crc(block) {
                return Ok(Verdict::Bad(i as u64));
            }
        }
        Ok(Verdict::Good)
    }

    /// Makes the recorded checksums durable.
    pub(crate) fn sync(&self) -> io::Result<()> {
        match &self.file {
            Some(f) => f.sync_data(),
            None => Ok(()),
        }
    }

    /// Copies the checksums of clusters `[p0, p0 + n)` to clusters `[t0, t0 + n)` of `dst`.
    pub(crate) fn copy_to(&self, p0: u64, dst: &Sums, t0: u64, n: u64) -> io::Result<()> {
        let (Some(src), Some(to)) = (&self.file, &dst.file) else { return Ok(()) };
        if self.blocks_per_cluster != dst.blocks_per_cluster {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "clone with another cluster size"));
        }
        let len = n * self.blocks_per_cluster * SUM_LEN;
        sys::clone_or_copy(src, self.pos(p0, 0), to, dst.pos(t0, 0), len, false).map(drop)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn sums(cs: u64) -> (tempfile::TempDir, Sums) {
        let d = tempfile::tempdir().unwrap();
        let s = Sums::open(d.path(), true, cs).unwrap();
        (d, s)
    }

    #[test]
    fn recorded_blocks_verify_and_a_flipped_bit_is_found_in_its_block() {
        let (_d, s) = sums(64 << 10);
        let mut data: Vec<u8> = (0..16 * 4096u32).map(|i| (i * 7 + 3) as u8).collect();
        s.record(3, 0, &data).unwrap();
        assert_eq!(s.verify(3, 0, &data, false).unwrap(), Verdict::Good);
        assert_eq!(s.verify(3, 8192, &data[8192..16384], false).unwrap(), Verdict::Good);
        data[5 * 4096 + 17] ^= 0x10;
        assert_eq!(s.verify(3, 0, &data, false).unwrap(), Verdict::Bad(5));
        assert_eq!(s.verify(3, 4 * 4096, &data[4 * 4096..6 * 4096], false).unwrap(), Verdict::Bad(1));
        // Another cluster's checksums are untouched.
        assert_eq!(s.verify(2, 0, &data, false).unwrap(), Verdict::Good, "cluster 2 has none recorded");
        s.record(2, 0, &data[..4096]).unwrap();
        assert_eq!(s.verify(3, 0, &data[..4096], false).unwrap(), Verdict::Good);
    }

    #[test]
    fn a_fresh_cluster_has_no_checksum_outside_what_was_written() {
        let (_d, s) = sums(64 << 10);
        let old = vec![9u8; 64 << 10];
        s.record(0, 0, &old).unwrap();
        let new = vec![1u8; 8192];
        s.record_fresh(0, 16384, &new).unwrap();
        // The hole around the write reads as zeros: no checksum, so it verifies.
        let mut cluster = vec![0u8; 64 << 10];
        cluster[16384..24576].copy_from_slice(&new);
        assert_eq!(s.verify(0, 0, &cluster, false).unwrap(), Verdict::Good);
        s.clear(0, 16384, 4096).unwrap();
        cluster[16384] = 77;
        assert_eq!(
            s.verify(0, 0, &cluster, false).unwrap(),
            Verdict::Good,
            "a cleared block is not verified"
        );
        cluster[20480] = 77;
        assert_eq!(s.verify(0, 0, &cluster, false).unwrap(), Verdict::Bad(5));
    }

    #[test]
    fn large_clusters_and_disabled_stores() {
        let (_d, s) = sums(4 << 20);
        let data: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 251) as u8).collect();
        s.record(1, 0, &data).unwrap();
        assert_eq!(s.verify(1, 0, &data, false).unwrap(), Verdict::Good);
        let mut bad = data.clone();
        bad[(4 << 20) - 1] ^= 1;
        assert_eq!(s.verify(1, 0, &bad, false).unwrap(), Verdict::Bad(1023));
        let d = tempfile::tempdir().unwrap();
        let off = Sums::open(d.path(), false, 64 << 10).unwrap();
        off.record(0, 0, &data[..4096]).unwrap();
        assert_eq!(off.verify(0, 0, &bad[..4096], false).unwrap(), Verdict::Good);
        assert!(!d.path().join(SUMS_FILE).exists());
    }
}
