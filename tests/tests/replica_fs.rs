//! The replica store on real filesystems made on loop devices (needs root): thin clones share
//! extents on xfs (reflink) and are copied on ext4; a full disk gives a clear error, loses no
//! acknowledged data, and works again once space is freed.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::io::{Read, Write};

use barnacle_replica::StoreError;
use barnacle_replica::store::{CopyMode, CreateOptions, Store};
use barnacle_tests::{LoopDevice, LoopFs};

const MIB: u64 = 1 << 20;

fn fill(tag: u8, len: u64) -> Vec<u8> {
    (0..len).map(|i| tag ^ (i / 4096) as u8 | 1).collect()
}

fn clone_on(fstype: &str) -> (CopyMode, u64, u64) {
    let fs = LoopFs::new(fstype, 512);
    let opts = CreateOptions {
        volume_id: "src".into(),
        size: 256 * MIB,
        cluster_size: 64 * 1024,
        data_device: None,
        checksums: true,
    };
    let src = Store::create(&fs.mountpoint.join("src"), &opts).unwrap();
    src.write(0, &fill(1, 64 * MIB), false).unwrap();
    src.create_snapshot("s").unwrap();
    src.write(0, &fill(2, 4 * MIB), false).unwrap();
    src.flush().unwrap();
    nix::unistd::sync();
    let before = fs.used_bytes();
    let report = src.clone_snapshot("s", &fs.mountpoint.join("clone"), "dst", |_, _| {}).unwrap();
    nix::unistd::sync();
    let grown = fs.used_bytes() - before;
    let dst = Store::open(&fs.mountpoint.join("clone")).unwrap();
    let mut buf = vec![0u8; 64 * MIB as usize];
    dst.read(0, &mut buf).unwrap();
    assert!(buf == fill(1, 64 * MIB), "clone content differs from the snapshot");
    // Writing the clone leaves the source alone, and the other way round.
    dst.write(0, &fill(3, MIB), false).unwrap();
    src.write(MIB, &fill(4, MIB), false).unwrap();
    let mut one = vec![0u8; MIB as usize];
    src.read_snapshot("s", 0, &mut one).unwrap();
    assert_eq!(one, fill(1, MIB));
    dst.read(MIB, &mut one).unwrap();
    assert_eq!(one, fill(1, 2 * MIB)[MIB as usize..]);
    (report.mode, report.bytes, grown)
}

#[test]
fn clones_share_extents_on_xfs() {
    let (mode, bytes, grown) = clone_on("xfs");
    assert_eq!(mode, CopyMode::Reflink);
    assert_eq!(bytes, 64 * MIB);
    assert!(grown < 8 * MIB, "a reflinked clone of 64 MiB used {grown} bytes");
}

#[test]
fn clones_are_copied_on_ext4() {
    let (mode, bytes, grown) = clone_on("ext4");
    assert_eq!(mode, CopyMode::Copy);
    assert_eq!(bytes, 64 * MIB);
    assert!(grown >= 64 * MIB, "a copied clone must hold its data ({grown} bytes)");
}

#[test]
fn a_full_disk_is_a_clear_error_and_loses_nothing() {
    let fs = LoopFs::new("ext4", 64);
    let opts = CreateOptions {
        volume_id: "full".into(),
        size: 256 * MIB,
        cluster_size: 64 * 1024,
        data_device: None,
        checksums: true,
    };
    let s = Store::create(&fs.mountpoint.join("r"), &opts).unwrap();
    let mut written = 0u64;
    let err = loop {
        match s.write(written, &fill(written as u8, MIB), false) {
            Ok(()) => written += MIB,
            Err(e) => break e,
        }
        assert!(written < 256 * MIB, "a 64 MiB filesystem took 256 MiB");
    };
    match &err {
        StoreError::Io { source, .. } => assert_eq!(source.raw_os_error(), Some(libc_enospc()), "{err}"),
        other => panic!("expected ENOSPC, got {other}"),
    }
    assert!(written >= 16 * MIB, "only {written} bytes fit");
    // Everything acknowledged is intact and durable.
    s.flush().unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for off in (0..written).step_by(MIB as usize) {
        s.read(off, &mut buf).unwrap();
        assert!(buf == fill(off as u8, MIB), "data at {off} damaged by the full disk");
    }
    // Freeing space makes writes work again.
    s.unmap(0, 8 * MIB).unwrap();
    s.flush().unwrap();
    s.write(written, &fill(9, MIB), false).unwrap();
    drop(s);
    let s = Store::open(&fs.mountpoint.join("r")).unwrap();
    s.read(written, &mut buf).unwrap();
    assert_eq!(buf, fill(9, MIB));
}

#[test]
fn a_raw_partition_holds_the_data_and_never_shows_old_bytes() {
    let dev = LoopDevice::new(16);
    // Old contents of the partition that no volume may ever see.
    std::fs::write(&dev.path, vec![0xFFu8; 16 * MIB as usize]).unwrap();
    let dir = dev.scratch().join("meta-only");
    let opts = CreateOptions {
        volume_id: "raw".into(),
        size: 64 * MIB, // thin: larger than the partition
        cluster_size: 64 * 1024,
        data_device: Some(dev.path.clone()),
        checksums: true,
    };
    let s = Store::create(&dir, &opts).unwrap();
    assert!(!dir.join("data").exists(), "data must live on the partition");
    let mut cluster = vec![0u8; 64 * 1024];
    s.write(4096, &fill(1, 4096), false).unwrap();
    s.read(0, &mut cluster).unwrap();
    assert!(
        cluster[..4096].iter().all(|&b| b == 0) && cluster[8192..].iter().all(|&b| b == 0),
        "old bytes exposed"
    );
    assert_eq!(cluster[4096..8192], fill(1, 4096)[..]);
    // Unmapped, never-written and partially unmapped ranges read zeros; snapshots keep their data.
    s.write(MIB, &fill(2, MIB), false).unwrap();
    s.create_snapshot("s").unwrap();
    s.unmap(MIB, 8192).unwrap();
    s.unmap(MIB + 64 * 1024, 64 * 1024).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    s.read(MIB, &mut buf).unwrap();
    assert!(buf[..8192].iter().all(|&b| b == 0) && buf[64 * 1024..128 * 1024].iter().all(|&b| b == 0));
    assert_eq!(buf[128 * 1024..], fill(2, MIB)[128 * 1024..]);
    s.read_snapshot("s", MIB, &mut buf).unwrap();
    assert_eq!(buf, fill(2, MIB));
    s.read(32 * MIB, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    // Filling the partition ends in a clear ENOSPC, not damage.
    let mut off = 2 * MIB;
    let err = loop {
        match s.write(off, &fill(3, MIB), false) {
            Ok(()) => off += MIB,
            Err(e) => break e,
        }
        assert!(off < 64 * MIB);
    };
    assert!(
        matches!(&err, StoreError::Io { source, .. } if source.raw_os_error() == Some(libc_enospc())),
        "{err}"
    );
    s.flush().unwrap();
    s.read_snapshot("s", MIB, &mut buf).unwrap();
    assert_eq!(buf, fill(2, MIB));
    // Reopen finds it all; a clone copies out to a file-backed store.
    drop(s);
    let s = Store::open(&dir).unwrap();
    s.read(2 * MIB, &mut buf).unwrap();
    assert_eq!(buf, fill(3, MIB));
    let report = s.clone_snapshot("s", &dev.scratch().join("clone"), "raw-clone", |_, _| {}).unwrap();
    assert_eq!(report.mode, CopyMode::Copy);
    let c = Store::open(&dev.scratch().join("clone")).unwrap();
    c.read(MIB, &mut buf).unwrap();
    assert_eq!(buf, fill(2, MIB));
    assert_eq!(s.stat().unwrap().data_device.as_deref(), Some(dev.path.as_path()));
    // The partition belongs to this store: another store cannot take it, open or closed.
    let other = CreateOptions { volume_id: "intruder".into(), ..opts.clone() };
    assert!(Store::create(&dev.scratch().join("other"), &other).is_err(), "device taken while in use");
    drop(s);
    let e = Store::create(&dev.scratch().join("other2"), &other).unwrap_err();
    assert!(e.to_string().contains("already holds store"), "{e}");
    // A second partition works for a second store.
    let dev2 = LoopDevice::new(16);
    let moved = dev.scratch().join("moved");
    let store2 =
        Store::create(&moved, &CreateOptions { data_device: Some(dev2.path.clone()), ..opts.clone() })
            .unwrap();
    drop(store2);
    Store::destroy(&moved).unwrap();
    Store::destroy(&dir).unwrap();
    assert!(dev.path.exists(), "destroy must not remove the device node");
    // Released: a new store may take the partition now, and never sees the old data.
    let s = Store::create(&dev.scratch().join("again"), &other).unwrap();
    s.read(2 * MIB, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn a_store_refuses_a_device_that_holds_another_store() {
    let (a, b) = (LoopDevice::new(8), LoopDevice::new(8));
    let opts = |dev: &LoopDevice, vol: &str| CreateOptions {
        volume_id: vol.into(),
        size: 8 * MIB,
        cluster_size: 64 * 1024,
        data_device: Some(dev.path.clone()),
        checksums: true,
    };
    drop(Store::create(&a.scratch().join("sa"), &opts(&a, "va")).unwrap());
    drop(Store::create(&b.scratch().join("sb"), &opts(&b, "vb")).unwrap());
    // Device A now carries store B's superblock, as if disks had been renamed under A.
    let mut sb = vec![0u8; 4096];
    std::fs::File::open(&b.path).unwrap().read_exact(&mut sb).unwrap();
    let mut fa = std::fs::OpenOptions::new().write(true).open(&a.path).unwrap();
    fa.write_all(&sb).unwrap();
    fa.sync_all().unwrap();
    drop(fa);
    let e = Store::open(&a.scratch().join("sa")).unwrap_err();
    assert!(e.to_string().contains("of volume vb"), "{e}");
    // Destroying A must not clear B's superblock.
    Store::destroy(&a.scratch().join("sa")).unwrap();
    Store::open(&b.scratch().join("sb")).unwrap();
}

#[test]
fn a_failed_clone_leaves_nothing_behind_and_can_be_retried() {
    let big = LoopFs::new("ext4", 256);
    let small = LoopFs::new("ext4", 24);
    let opts = CreateOptions {
        volume_id: "src".into(),
        size: 128 * MIB,
        cluster_size: 64 * 1024,
        data_device: None,
        checksums: true,
    };
    let src = Store::create(&big.mountpoint.join("src"), &opts).unwrap();
    src.write(0, &fill(5, 64 * MIB), false).unwrap();
    src.create_snapshot("s").unwrap();
    let target = small.mountpoint.join("clone");
    let e = src.clone_snapshot("s", &target, "dst", |_, _| {}).unwrap_err();
    assert!(
        matches!(&e, StoreError::Io { source, .. } if source.raw_os_error() == Some(libc_enospc())),
        "{e}"
    );
    assert!(!target.join("meta").exists() && !target.join("data").exists(), "partial clone left behind");
    let retry = big.mountpoint.join("clone");
    let report = src.clone_snapshot("s", &retry, "dst", |_, _| {}).unwrap();
    assert_eq!(report.bytes, 64 * MIB);
    // The snapshot is deletable again once the clone is done.
    src.delete_snapshot("s").unwrap();
}

fn libc_enospc() -> i32 {
    nix::errno::Errno::ENOSPC as i32
}
