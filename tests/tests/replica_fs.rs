//! The replica store on real filesystems made on loop devices (needs root): thin clones share
//! extents on xfs (reflink) and are copied on ext4; a full disk gives a clear error, loses no
//! acknowledged data, and works again once space is freed.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use barnacle_replica::StoreError;
use barnacle_replica::store::{CopyMode, CreateOptions, Store};
use barnacle_tests::LoopFs;

const MIB: u64 = 1 << 20;

fn fill(tag: u8, len: u64) -> Vec<u8> {
    (0..len).map(|i| tag ^ (i / 4096) as u8 | 1).collect()
}

fn clone_on(fstype: &str) -> (CopyMode, u64, u64) {
    let fs = LoopFs::new(fstype, 512);
    let opts = CreateOptions { volume_id: "src".into(), size: 256 * MIB, cluster_size: 64 * 1024 };
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
    let opts = CreateOptions { volume_id: "full".into(), size: 256 * MIB, cluster_size: 64 * 1024 };
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

fn libc_enospc() -> i32 {
    nix::errno::Errno::ENOSPC as i32
}
