//! The CSI node plugin with real processes (replicas, engines, controller, node plugin), real
//! filesystems and mounts, on the userspace attach (FUSE file + loop device; this machine has no
//! nbd module): stage, publish, restage on a fresh plugin, block volumes, never reformatting,
//! online expansion, stats and volume condition, idempotency, and a plugin SIGKILLed while a
//! volume is staged and published. Needs root.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use barnacle_tests::{
    ControllerProcess, NodeProcess, cleanup_attachments, csi_capability, kill_processes_mentioning,
    loops_under, mounts_under, processes_mentioning, run_ok,
};
use csi::node_client::NodeClient;
use csi_proto::v1 as csi;
use tonic::Code;
use tonic::transport::Channel;

const MIB: i64 = 1 << 20;

/// A controller with three nodes and the node plugin of node n1. Dropping it detaches and
/// unmounts whatever a failed test left, then kills every process.
struct Env {
    ctl: ControllerProcess,
    node: NodeProcess,
    root: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Env {
    async fn new(node_args: &[&str]) -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_owned();
        let ctl = ControllerProcess::start(&root, 3);
        ctl.wait_probe_ready().await;
        let node = NodeProcess::start(&root, "n1", node_args);
        Env { ctl, node, root, _tmp: tmp }
    }

    fn node(&self) -> NodeClient<Channel> {
        self.node.clients().1
    }

    fn restart_node(&mut self, node_args: &[&str]) {
        self.node.kill();
        self.node = NodeProcess::start(&self.root, "n1", node_args);
    }

    /// Creates a volume and publishes it to n1 through the controller; returns (id, publish context,
    /// volume context).
    async fn volume(
        &self,
        name: &str,
        mib: i64,
        params: &[(&str, &str)],
    ) -> (String, std::collections::HashMap<String, String>, std::collections::HashMap<String, String>) {
        let (_, mut c) = self.ctl.clients();
        let v = c
            .create_volume(csi::CreateVolumeRequest {
                name: name.to_owned(),
                capacity_range: Some(csi::CapacityRange { required_bytes: mib * MIB, limit_bytes: 0 }),
                volume_capabilities: vec![csi_capability(false, "")],
                parameters: params.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let ctx = c
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: v.volume_id.clone(),
                node_id: "n1".into(),
                volume_capability: Some(csi_capability(false, "")),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .publish_context;
        (v.volume_id, ctx, v.volume_context)
    }

    fn staging(&self, vol: &str) -> PathBuf {
        let p = self.root.join("kubelet/staging").join(vol);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn target(&self, pod: &str, vol: &str) -> PathBuf {
        let p = self.root.join("kubelet/pods").join(pod);
        std::fs::create_dir_all(&p).unwrap();
        p.join(vol)
    }

    /// Nothing attached or mounted under the test's root, and no helper process.
    fn assert_clean(&self) {
        assert!(mounts_under(&self.root).is_empty(), "mounts left: {:?}", mounts_under(&self.root));
        assert!(loops_under(&self.root).is_empty(), "loop devices left: {:?}", loops_under(&self.root));
        let helpers: Vec<i32> = processes_mentioning(&self.root.join("node-n1"))
            .into_iter()
            .filter(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("barnacle-nbd-fuse"))
            })
            .collect();
        assert!(helpers.is_empty(), "attach helpers left: {helpers:?}");
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.node.kill();
        cleanup_attachments(&self.root);
        kill_processes_mentioning(&self.root);
    }
}

fn mount_cap(fs: &str) -> csi::VolumeCapability {
    csi_capability(false, fs)
}

fn block_cap() -> csi::VolumeCapability {
    csi_capability(true, "")
}

async fn stage(
    n: &mut NodeClient<Channel>,
    vol: &str,
    ctx: &std::collections::HashMap<String, String>,
    vctx: &std::collections::HashMap<String, String>,
    staging: &Path,
    cap: csi::VolumeCapability,
) -> Result<(), tonic::Status> {
    n.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: vol.to_owned(),
        publish_context: ctx.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap),
        volume_context: vctx.clone(),
        ..Default::default()
    })
    .await
    .map(|_| ())
}

async fn publish(
    n: &mut NodeClient<Channel>,
    vol: &str,
    staging: &Path,
    target: &Path,
    cap: csi::VolumeCapability,
    readonly: bool,
) -> Result<(), tonic::Status> {
    n.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: vol.to_owned(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap),
        readonly,
        ..Default::default()
    })
    .await
    .map(|_| ())
}

async fn unpublish(n: &mut NodeClient<Channel>, vol: &str, target: &Path) -> Result<(), tonic::Status> {
    n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: vol.to_owned(),
        target_path: target.display().to_string(),
    })
    .await
    .map(|_| ())
}

async fn unstage(n: &mut NodeClient<Channel>, vol: &str, staging: &Path) -> Result<(), tonic::Status> {
    n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: vol.to_owned(),
        staging_target_path: staging.display().to_string(),
    })
    .await
    .map(|_| ())
}

/// The status code of an RPC's result.
fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    r.err().map_or(Code::Ok, |s| s.code())
}

async fn stats(n: &mut NodeClient<Channel>, vol: &str, path: &Path) -> csi::NodeGetVolumeStatsResponse {
    n.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
        volume_id: vol.to_owned(),
        volume_path: path.display().to_string(),
        staging_target_path: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
}

fn fstype_at(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .filter(|l| l.split(' ').nth(4) == Some(path.to_str().unwrap()))
        .filter_map(|l| l.split(" - ").nth(1)?.split(' ').next().map(str::to_owned))
        .next_back()
}

/// Deterministic bytes for a file or region.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40503)) >> 7) as u8).collect()
}

fn write_synced(path: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

async fn fs_round_trip(fs: &str, mib: i64) {
    let mut env = Env::new(&[]).await;
    let (vol, ctx, vctx) = env.volume(&format!("fs-{fs}"), mib, &[("fsType", fs)]).await;
    assert_eq!(vctx.get("fsType").map(String::as_str), Some(fs), "fsType reaches the node");
    let staging = env.staging(&vol);
    let target = env.target("pod-a", &vol);
    let mut n = env.node();
    stage(&mut n, &vol, &ctx, &vctx, &staging, mount_cap(fs)).await.unwrap();
    publish(&mut n, &vol, &staging, &target, mount_cap(fs), false).await.unwrap();
    assert_eq!(fstype_at(&target).as_deref(), Some(fs));
    let small = b"hello from barnacle\n".to_vec();
    let large = pattern(7, 5 << 20);
    write_synced(&target.join("small.txt"), &small);
    std::fs::create_dir(target.join("dir")).unwrap();
    write_synced(&target.join("dir/large.bin"), &large);
    unpublish(&mut n, &vol, &target).await.unwrap();
    assert!(!target.exists(), "the target path is removed");
    unstage(&mut n, &vol, &staging).await.unwrap();
    env.assert_clean();

    // A fresh plugin stages again: the filesystem is kept (never reformatted) with its files.
    env.restart_node(&[]);
    let mut n = env.node();
    let target2 = env.target("pod-b", &vol);
    stage(&mut n, &vol, &ctx, &vctx, &staging, mount_cap(fs)).await.unwrap();
    publish(&mut n, &vol, &staging, &target2, mount_cap(fs), true).await.unwrap();
    assert_eq!(std::fs::read(target2.join("small.txt")).unwrap(), small);
    assert!(std::fs::read(target2.join("dir/large.bin")).unwrap() == large, "large file differs");
    assert!(std::fs::write(target2.join("nope"), b"x").is_err(), "a readonly publication refuses writes");
    unpublish(&mut n, &vol, &target2).await.unwrap();
    unstage(&mut n, &vol, &staging).await.unwrap();
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_files_survive_unstage_and_a_fresh_node_plugin() {
    fs_round_trip("ext4", 128).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfs_files_survive_unstage_and_a_fresh_node_plugin() {
    fs_round_trip("xfs", 512).await;
}

/// Writes and reads back regions of the block device at `dev`, small and large, with O_DIRECT
/// when `direct`.
fn block_io(dev: &Path, direct: bool, seed: u64) -> Vec<(u64, Vec<u8>)> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true);
    if direct {
        opts.custom_flags(libc_o_direct());
    }
    let mut f = opts.open(dev).unwrap();
    let regions: Vec<(u64, usize)> =
        vec![(0, 4096), (8192, 65536), (1 << 20, 1 << 20), (3 << 20, 4 << 20), (12 << 20, 4096)];
    let mut written = Vec::new();
    for (i, (off, len)) in regions.into_iter().enumerate() {
        let data = pattern(seed + i as u64, len);
        let buf = Aligned::from(&data);
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(buf.as_slice()).unwrap();
        written.push((off, data));
    }
    f.sync_all().unwrap();
    for (off, data) in &written {
        let mut buf = Aligned::zeroed(data.len());
        f.seek(SeekFrom::Start(*off)).unwrap();
        f.read_exact(buf.as_mut_slice()).unwrap();
        assert!(buf.as_slice() == data.as_slice(), "read back differs at {off} (direct {direct})");
    }
    written
}

fn libc_o_direct() -> i32 {
    0o40000
}

/// A 4 KiB-aligned buffer (O_DIRECT needs one).
struct Aligned {
    ptr: *mut u8,
    len: usize,
}

impl Aligned {
    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len.max(4096), 4096).unwrap()
    }

    fn zeroed(len: usize) -> Aligned {
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(Self::layout(len)) };
        assert!(!ptr.is_null());
        Aligned { ptr, len }
    }

    fn from(data: &[u8]) -> Aligned {
        let mut a = Aligned::zeroed(data.len());
        a.as_mut_slice().copy_from_slice(data);
        a
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr holds len initialised bytes, owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr holds len initialised bytes, owned by self and borrowed mutably here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in zeroed() with the same layout.
        unsafe { std::alloc::dealloc(self.ptr, Self::layout(self.len)) }
    }
}

async fn block_round_trip(loop_direct_io: bool) {
    let arg = format!("--loop-direct-io={loop_direct_io}");
    let mut env = Env::new(&[&arg]).await;
    let (vol, ctx, vctx) = env.volume(&format!("blk-{loop_direct_io}"), 64, &[]).await;
    let staging = env.staging(&vol);
    let target = env.target("pod-a", &vol);
    let mut n = env.node();
    stage(&mut n, &vol, &ctx, &vctx, &staging, block_cap()).await.unwrap();
    publish(&mut n, &vol, &staging, &target, block_cap(), false).await.unwrap();
    let meta = std::fs::metadata(&target).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()), "target is the device node");
    let mut written = block_io(&target, true, 1);
    written.extend(block_io(&target, false, 100));
    // Discard reaches the engine: the range reads as zeros (here and through qemu-img below).
    run_ok("blkdiscard", &["-o", "8192", "-l", "65536", target.to_str().unwrap()]);
    for (off, data) in &mut written {
        if *off == 8192 {
            data.iter_mut().for_each(|b| *b = 0);
        }
    }
    let mut f = std::fs::File::open(&target).unwrap();
    let mut got = vec![1u8; 65536];
    f.seek(SeekFrom::Start(8192)).unwrap();
    f.read_exact(&mut got).unwrap();
    assert!(got.iter().all(|b| *b == 0), "discarded range reads as zeros");
    drop(f);
    // An unaligned write to the helper's file takes the read-modify-write path.
    let disk = env.node.state_dir.join("fuse").join(&vol).join("disk");
    {
        use std::os::unix::fs::FileExt;
        let fuse_file = std::fs::OpenOptions::new().read(true).write(true).open(&disk).unwrap();
        let odd = pattern(55, 5000);
        fuse_file.write_all_at(&odd, (20 << 20) + 1000).unwrap();
        fuse_file.sync_all().unwrap();
        let mut back = vec![0u8; 7000];
        fuse_file.read_exact_at(&mut back, 20 << 20).unwrap();
        assert!(
            back[..1000].iter().all(|b| *b == 0)
                && back[1000..6000] == odd[..]
                && back[6000..].iter().all(|b| *b == 0)
        );
    }
    let st = stats(&mut n, &vol, &target).await;
    assert_eq!(st.usage[0].total, 64 * MIB);
    // Online expansion of a block volume: the device grows, nothing else to do.
    let (_, mut c) = env.ctl.clients();
    c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
        volume_id: vol.clone(),
        capacity_range: Some(csi::CapacityRange { required_bytes: 96 * MIB, limit_bytes: 0 }),
        volume_capability: Some(block_cap()),
        ..Default::default()
    })
    .await
    .unwrap();
    let grown = n
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: vol.clone(),
            volume_path: target.display().to_string(),
            capacity_range: Some(csi::CapacityRange { required_bytes: 96 * MIB, limit_bytes: 0 }),
            volume_capability: Some(block_cap()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 96 * MIB);
    assert_eq!(stats(&mut n, &vol, &target).await.usage[0].total, 96 * MIB);
    unpublish(&mut n, &vol, &target).await.unwrap();
    unstage(&mut n, &vol, &staging).await.unwrap();
    env.assert_clean();

    // A client we did not write reads what went through FUSE and the loop device.
    let uri = format!("nbd+unix:///{}?socket={}", ctx["exportName"], ctx["nbdSocket"]);
    let image = env.root.join("image.raw");
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &uri, image.to_str().unwrap()]);
    let bytes = std::fs::read(&image).unwrap();
    for (off, data) in written.iter().skip(5) {
        let o = *off as usize;
        assert!(bytes[o..o + data.len()] == data[..], "qemu-img sees other bytes at {off}");
    }

    // Staged again by a fresh plugin, the device holds the same bytes.
    env.restart_node(&[&arg]);
    let mut n = env.node();
    stage(&mut n, &vol, &ctx, &vctx, &staging, block_cap()).await.unwrap();
    publish(&mut n, &vol, &staging, &target, block_cap(), false).await.unwrap();
    let mut f = std::fs::File::open(&target).unwrap();
    for (off, data) in written.iter().skip(5) {
        let mut got = vec![0u8; data.len()];
        f.seek(SeekFrom::Start(*off)).unwrap();
        f.read_exact(&mut got).unwrap();
        assert!(got == *data, "restaged device differs at {off}");
    }
    drop(f);
    // A read-only publication is a read-only device: writes fail, reads work.
    let target_ro = env.target("pod-ro", &vol);
    publish(&mut n, &vol, &staging, &target_ro, block_cap(), true).await.unwrap();
    publish(&mut n, &vol, &staging, &target_ro, block_cap(), true).await.unwrap();
    // (The kernel may let the device open for writing; the write itself must fail.)
    let refused = std::fs::OpenOptions::new().write(true).open(&target_ro).and_then(|f| {
        std::os::unix::fs::FileExt::write_all_at(&f, &[0xee; 4096], 0).and_then(|()| f.sync_all())
    });
    assert!(refused.is_err(), "a read-only publication takes a write");
    let (off, data) = &written[6];
    let mut got = vec![0u8; data.len()];
    let mut f = std::fs::File::open(&target_ro).unwrap();
    f.seek(SeekFrom::Start(*off)).unwrap();
    f.read_exact(&mut got).unwrap();
    assert!(got == *data, "the read-only device reads the volume");
    drop(f);
    let rdev = |p: &Path| std::os::unix::fs::MetadataExt::rdev(&std::fs::metadata(p).unwrap());
    assert_ne!(rdev(&target_ro), rdev(&target), "a device of its own");
    // The attach's loop device, by its device number, and the loop devices backed by it.
    let sys_name = |p: &Path| {
        let (ma, mi) = (nix::sys::stat::major(rdev(p)), nix::sys::stat::minor(rdev(p)));
        let link = std::fs::read_link(format!("/sys/dev/block/{ma}:{mi}")).unwrap();
        link.file_name().unwrap().to_string_lossy().into_owned()
    };
    let attach_dev = PathBuf::from(format!("/dev/{}", sys_name(&target)));
    let over_attach = || -> Vec<String> {
        std::fs::read_dir("/sys/block")
            .unwrap()
            .flatten()
            .filter(|e| {
                let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).unwrap_or_default();
                Path::new(backing.trim_end()) == attach_dev
            })
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(over_attach(), [sys_name(&target_ro)], "the read-only publication's loop device");
    // Stats work on the read-only publication, and a single-writer publication sees it as the
    // one publication left.
    assert_eq!(stats(&mut n, &vol, &target_ro).await.usage[0].total, 96 * MIB);
    unpublish(&mut n, &vol, &target).await.unwrap();
    let exclusive = env.target("pod-x", &vol);
    let mut sw = block_cap();
    sw.access_mode = Some(csi::volume_capability::AccessMode {
        mode: csi::volume_capability::access_mode::Mode::SingleNodeSingleWriter as i32,
    });
    let refused = publish(&mut n, &vol, &staging, &exclusive, sw, false).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    unpublish(&mut n, &vol, &target_ro).await.unwrap();
    assert!(over_attach().is_empty(), "unpublish detaches the read-only loop device");
    unpublish(&mut n, &vol, &target).await.unwrap();
    unstage(&mut n, &vol, &staging).await.unwrap();
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_volume_through_a_loop_device_with_direct_io() {
    block_round_trip(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_volume_through_a_loop_device_with_buffered_io() {
    block_round_trip(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_an_unknown_signature_is_never_formatted() {
    let env = Env::new(&[]).await;
    let (vol, ctx, vctx) = env.volume("sig", 64, &[]).await;
    let staging = env.staging(&vol);
    let mut n = env.node();
    // Put a swap signature on the volume through its block device.
    stage(&mut n, &vol, &ctx, &vctx, &staging, block_cap()).await.unwrap();
    let dev = loops_under(&env.root).pop().unwrap();
    run_ok("mkswap", &[dev.to_str().unwrap()]);
    unstage(&mut n, &vol, &staging).await.unwrap();

    let err = stage(&mut n, &vol, &ctx, &vctx, &staging, mount_cap("ext4")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("swap"), "the error names what is there: {}", err.message());
    env.assert_clean();
    // The signature is still there: nothing was formatted.
    stage(&mut n, &vol, &ctx, &vctx, &staging, block_cap()).await.unwrap();
    let dev = loops_under(&env.root).pop().unwrap();
    let out = run_ok("blkid", &["-p", "-o", "export", dev.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("TYPE=swap"));
    unstage(&mut n, &vol, &staging).await.unwrap();
    env.assert_clean();
}

/// Whether this process holds CAP_SYS_RESOURCE (bit 24 of the effective set).
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap().trim();
    u64::from_str_radix(eff, 16).unwrap() & (1 << 24) != 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_expansion_grows_the_mounted_filesystem() {
    let env = Env::new(&[]).await;
    for (fs, from, to) in [("ext4", 64, 128), ("xfs", 512, 768)] {
        let (vol, ctx, vctx) = env.volume(&format!("grow-{fs}"), from, &[("fsType", fs)]).await;
        let staging = env.staging(&vol);
        let target = env.target("pod-a", &vol);
        let mut n = env.node();
        stage(&mut n, &vol, &ctx, &vctx, &staging, mount_cap(fs)).await.unwrap();
        publish(&mut n, &vol, &staging, &target, mount_cap(fs), false).await.unwrap();
        let data = pattern(3, 3 << 20);
        write_synced(&target.join("before.bin"), &data);
        let size_of = |p: &Path| {
            let s = nix::sys::statvfs::statvfs(p).unwrap();
            s.blocks() * s.fragment_size()
        };
        let before = size_of(&target);
        let (_, mut c) = env.ctl.clients();
        let r = c
            .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: vol.clone(),
                capacity_range: Some(csi::CapacityRange { required_bytes: to * MIB, limit_bytes: 0 }),
                volume_capability: Some(mount_cap(fs)),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.node_expansion_required);
        let grown = n
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: vol.clone(),
                volume_path: target.display().to_string(),
                capacity_range: Some(csi::CapacityRange { required_bytes: to * MIB, limit_bytes: 0 }),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(mount_cap(fs)),
                ..Default::default()
            })
            .await;
        if fs == "ext4" && !has_cap_sys_resource() {
            // ext4 grows online only with CAP_SYS_RESOURCE, which this sandbox withholds even from
            // root (the node plugin's privileged pod has it). The error must say why.
            let e = grown.unwrap_err();
            assert!(e.message().contains("resize2fs") && e.message().contains("Permission denied"), "{e:?}");
            unpublish(&mut n, &vol, &target).await.unwrap();
            unstage(&mut n, &vol, &staging).await.unwrap();
            continue;
        }
        let grown = grown.unwrap().into_inner();
        assert_eq!(grown.capacity_bytes, to * MIB);
        let after = size_of(&target);
        assert!(after > before + ((to - from) as u64 * MIB as u64) / 2, "{fs}: df {before} -> {after}");
        let df = run_ok("df", &["-B1", "--output=size", target.to_str().unwrap()]);
        let df_size: u64 =
            String::from_utf8_lossy(&df.stdout).lines().nth(1).unwrap().trim().parse().unwrap();
        assert_eq!(df_size, after, "df agrees");
        assert!(
            std::fs::read(target.join("before.bin")).unwrap() == data,
            "{fs}: the file written before is intact"
        );
        unpublish(&mut n, &vol, &target).await.unwrap();
        unstage(&mut n, &vol, &staging).await.unwrap();
    }
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_follow_usage_and_the_engine_s_health() {
    let mut env = Env::new(&[]).await;
    let (vol, ctx, vctx) = env.volume("stats", 128, &[("fsType", "ext4")]).await;
    let staging = env.staging(&vol);
    let target = env.target("pod-a", &vol);
    let mut n = env.node();
    stage(&mut n, &vol, &ctx, &vctx, &staging, mount_cap("ext4")).await.unwrap();
    publish(&mut n, &vol, &staging, &target, mount_cap("ext4"), false).await.unwrap();
    let used = |s: &csi::NodeGetVolumeStatsResponse| s.usage.iter().find(|u| u.unit == 1).unwrap().used;
    let s1 = stats(&mut n, &vol, &target).await;
    assert!(!s1.volume_condition.as_ref().unwrap().abnormal, "{s1:?}");
    assert!(s1.usage.iter().any(|u| u.unit == 2 && u.total > 0), "inodes reported");
    let data = pattern(9, 16 << 20);
    write_synced(&target.join("f.bin"), &data);
    let s2 = stats(&mut n, &vol, &target).await;
    assert!(used(&s2) >= used(&s1) + (15 << 20), "used {} -> {}", used(&s1), used(&s2));

    // The engine dies while no controller can restart it: the condition turns abnormal.
    env.ctl.kill();
    let ready = env.root.join("nodes/n1/run").join(format!("{vol}-engine.ready"));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&ready).unwrap()).unwrap();
    let pid = nix::unistd::Pid::from_raw(v["pid"].as_i64().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let s3 = stats(&mut n, &vol, &target).await;
    let c3 = s3.volume_condition.unwrap();
    assert!(c3.abnormal && c3.message.contains("engine"), "{c3:?}");

    // The controller comes back and restarts the engine; the attach reconnects and the data is there.
    env.ctl.restart();
    env.ctl.wait_probe_ready().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while stats(&mut n, &vol, &target).await.volume_condition.unwrap().abnormal {
        assert!(Instant::now() < deadline, "never normal again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Drop the page cache so the read goes through the attach.
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    assert!(std::fs::read(target.join("f.bin")).unwrap() == data);
    write_synced(&target.join("g.bin"), &data[..1 << 20]);
    unpublish(&mut n, &vol, &target).await.unwrap();
    unstage(&mut n, &vol, &staging).await.unwrap();
    env.assert_clean();
}

/// VOLUME_MOUNT_GROUP: a writable publication with a group (the pod's fsGroup, which the kubelet
/// then delegates to the driver) gives every file and directory on the volume to it, as the
/// kubelet would; a read-only one changes nothing; a group that is not a number is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_gives_the_filesystem_to_the_pod_s_group() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let env = Env::new(&[]).await;
    let mut n = env.node();
    let caps = n.node_get_capabilities(csi::NodeGetCapabilitiesRequest {}).await.unwrap().into_inner();
    let advertised = caps.capabilities.iter().any(|c| {
        matches!(&c.r#type, Some(csi::node_service_capability::Type::Rpc(r))
            if r.r#type == csi::node_service_capability::rpc::Type::VolumeMountGroup as i32)
    });
    assert!(advertised, "VOLUME_MOUNT_GROUP is advertised");
    let (vol, ctx, vctx) = env.volume("fsgroup", 64, &[("fsType", "ext4")]).await;
    let (staging, a, b, c) =
        (env.staging(&vol), env.target("pod-a", &vol), env.target("pod-b", &vol), env.target("pod-c", &vol));
    stage(&mut n, &vol, &ctx, &vctx, &staging, mount_cap("ext4")).await.unwrap();
    publish(&mut n, &vol, &staging, &a, mount_cap("ext4"), false).await.unwrap();
    std::fs::create_dir_all(a.join("data/sub")).unwrap();
    write_synced(&a.join("data/sub/file"), b"owned by root\n");
    std::fs::set_permissions(a.join("data/sub/file"), std::fs::Permissions::from_mode(0o600)).unwrap();
    // A symlink out of the volume, to a file of the test's own.
    let outside = env.root.join("outside");
    write_synced(&outside, b"not the volume's\n");
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(&outside, a.join("data/link")).unwrap();
    let with_group = |g: &str| {
        let mut cap = mount_cap("ext4");
        if let Some(csi::volume_capability::AccessType::Mount(m)) = cap.access_type.as_mut() {
            m.volume_mount_group = g.to_owned();
        }
        cap
    };
    let err = publish(&mut n, &vol, &staging, &b, with_group("staff"), false).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    publish(&mut n, &vol, &staging, &b, with_group("4321"), false).await.unwrap();
    for (p, dir) in [
        (b.clone(), true),
        (b.join("data"), true),
        (b.join("data/sub"), true),
        (b.join("data/sub/file"), false),
    ] {
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.gid(), 4321, "{}", p.display());
        assert_eq!(m.mode() & 0o060, 0o060, "{}: group read and write", p.display());
        assert_eq!(m.mode() & 0o2000 != 0, dir, "{}: setgid on directories only", p.display());
    }
    assert_eq!(std::fs::metadata(a.join("data/sub/file")).unwrap().mode() & 0o7777, 0o660);
    let o = std::fs::metadata(&outside).unwrap();
    assert!(o.gid() != 4321 && o.mode() & 0o7777 == 0o600, "symlinks are not followed");
    // New files inherit the group.
    write_synced(&b.join("data/new"), b"x");
    assert_eq!(std::fs::metadata(b.join("data/new")).unwrap().gid(), 4321);

    // A read-only publication with another group changes nothing.
    publish(&mut n, &vol, &staging, &c, with_group("5555"), true).await.unwrap();
    assert_eq!(std::fs::metadata(&c).unwrap().gid(), 4321);
    for t in [&a, &b, &c] {
        unpublish(&mut n, &vol, t).await.unwrap();
    }
    unstage(&mut n, &vol, &staging).await.unwrap();
    env.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_is_idempotent_and_a_killed_plugin_is_cleaned_up_by_the_next() {
    let mut env = Env::new(&[]).await;
    let (vol, ctx, vctx) = env.volume("idem", 64, &[("fsType", "ext4")]).await;
    let staging = env.staging(&vol);
    let target = env.target("pod-a", &vol);
    let mut n = env.node();
    for _ in 0..10 {
        stage(&mut n, &vol, &ctx, &vctx, &staging, mount_cap("ext4")).await.unwrap();
    }
    for _ in 0..10 {
        publish(&mut n, &vol, &staging, &target, mount_cap("ext4"), false).await.unwrap();
    }
    assert_eq!(mounts_under(&env.root.join("kubelet")).len(), 2, "one staging and one target mount");
    // SINGLE_NODE_SINGLE_WRITER: a second publication is refused.
    let mut single = mount_cap("ext4");
    single.access_mode = Some(csi::volume_capability::AccessMode {
        mode: csi::volume_capability::access_mode::Mode::SingleNodeSingleWriter as i32,
    });
    let second = env.target("pod-b", &vol);
    let e = publish(&mut n, &vol, &staging, &second, single, false).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(!second.exists() || mounts_under(&second).is_empty());
    let first = stats(&mut n, &vol, &target).await;
    for _ in 0..9 {
        let again = stats(&mut n, &vol, &target).await;
        assert_eq!(again.usage.len(), first.usage.len());
        assert_eq!(again.volume_condition, first.volume_condition);
    }
    let info = n.node_get_info(csi::NodeGetInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.node_id, "n1");
    let segs = info.accessible_topology.unwrap().segments;
    assert_eq!(segs.get("topology.barnacle.dev/node").map(String::as_str), Some("n1"));
    assert_eq!(segs.get("topology.kubernetes.io/zone").map(String::as_str), Some("z1"));
    for _ in 0..10 {
        unpublish(&mut n, &vol, &target).await.unwrap();
    }
    for _ in 0..10 {
        unstage(&mut n, &vol, &staging).await.unwrap();
    }
    env.assert_clean();

    // Staged and published, then the plugin is SIGKILLed: the next one cleans up.
    stage(&mut n, &vol, &ctx, &vctx, &staging, mount_cap("ext4")).await.unwrap();
    publish(&mut n, &vol, &staging, &target, mount_cap("ext4"), false).await.unwrap();
    write_synced(&target.join("kept.txt"), b"kept");
    env.restart_node(&[]);
    let mut n = env.node();
    assert_eq!(std::fs::read(target.join("kept.txt")).unwrap(), b"kept", "IO goes on without the plugin");
    for _ in 0..2 {
        unpublish(&mut n, &vol, &target).await.unwrap();
        unstage(&mut n, &vol, &staging).await.unwrap();
    }
    env.assert_clean();

    // Bad requests get the spec's codes.
    let cases: Vec<(&str, Code, Result<(), tonic::Status>)> = vec![
        (
            "stage without volume id",
            Code::InvalidArgument,
            stage(&mut n, "", &ctx, &vctx, &staging, mount_cap("ext4")).await,
        ),
        (
            "stage without publish context",
            Code::InvalidArgument,
            stage(&mut n, &vol, &Default::default(), &vctx, &staging, mount_cap("ext4")).await,
        ),
        (
            "stage with a relative path",
            Code::InvalidArgument,
            stage(&mut n, &vol, &ctx, &vctx, Path::new("rel"), mount_cap("ext4")).await,
        ),
        (
            "stage btrfs",
            Code::InvalidArgument,
            stage(&mut n, &vol, &ctx, &vctx, &staging, mount_cap("btrfs")).await,
        ),
        (
            "publish unstaged",
            Code::FailedPrecondition,
            publish(&mut n, &vol, &staging, &target, mount_cap("ext4"), false).await,
        ),
        (
            "publish without target",
            Code::InvalidArgument,
            publish(&mut n, &vol, &staging, Path::new(""), mount_cap("ext4"), false).await,
        ),
        ("unpublish without volume id", Code::InvalidArgument, unpublish(&mut n, "", &target).await),
        ("unstage without path", Code::InvalidArgument, unstage(&mut n, &vol, Path::new("")).await),
    ];
    let mut failures = Vec::new();
    for (name, want, got) in cases {
        let code = got.err().map_or(Code::Ok, |s| s.code());
        if code != want {
            failures.push(format!("{name}: want {want:?}, got {code:?}"));
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
    // Stats of a path that is not the volume's.
    let other = n
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: "vol-0000000000000000".into(),
            volume_path: staging.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::NotFound);
    let missing = n
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: vol.clone(),
            volume_path: target.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    env.assert_clean();
}

/// One plugin behind two sockets: the node socket describes the plugin as the controller's does
/// (a CO that asks only the node socket must still learn there is a Controller service, or it
/// never runs the lifecycle of a real volume). NodeGetInfo reports the attach limit of the path in
/// use (here FUSE + loop devices, which loop-control makes up to the driver's minors) unless
/// `--max-volumes` sets one. Stats and expansion of a volume this node does not have answer
/// NotFound before judging the path's form, as the spec's error tables order them; for an
/// attached volume a malformed path is InvalidArgument.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sockets_describe_one_plugin_and_node_errors_follow_the_spec_s_order() {
    use csi::plugin_capability::{Type, service};
    let mut env = Env::new(&[]).await;
    let (mut ci, _) = env.ctl.clients();
    let (mut ni, mut n) = env.node.clients();
    let from_ctl =
        ci.get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {}).await.unwrap().into_inner();
    let from_node =
        ni.get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {}).await.unwrap().into_inner();
    assert_eq!(from_ctl, from_node);
    let services: Vec<i32> = from_node
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    assert!(services.contains(&(service::Type::ControllerService as i32)), "{from_node:?}");
    let info_ctl = ci.get_plugin_info(csi::GetPluginInfoRequest {}).await.unwrap().into_inner();
    let info_node = ni.get_plugin_info(csi::GetPluginInfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info_ctl.name, info_ctl.vendor_version), (info_node.name, info_node.vendor_version));

    let limit = n.node_get_info(csi::NodeGetInfoRequest {}).await.unwrap().into_inner().max_volumes_per_node;
    let max_part = std::fs::read_to_string("/sys/module/loop/parameters/max_part")
        .map_or(0, |s| s.trim().parse::<u32>().unwrap());
    if max_part == 0 {
        assert_eq!(limit, 1 << 20, "a loop device per volume, one minor each");
    } else {
        assert!(limit > 0 && limit < 1 << 20, "{limit}");
    }

    let relative = Path::new("relative/path");
    let (vol, ctx, vctx) = env.volume("order", 16, &[]).await;
    let staging = env.staging(&vol);
    stage(&mut n, &vol, &ctx, &vctx, &staging, mount_cap("ext4")).await.unwrap();
    let stats_of = |vol: &str, path: &Path| csi::NodeGetVolumeStatsRequest {
        volume_id: vol.to_owned(),
        volume_path: path.display().to_string(),
        staging_target_path: String::new(),
    };
    let expand_of = |vol: &str, path: &Path| csi::NodeExpandVolumeRequest {
        volume_id: vol.to_owned(),
        volume_path: path.display().to_string(),
        capacity_range: Some(csi::CapacityRange { required_bytes: 16 * MIB, limit_bytes: 0 }),
        ..Default::default()
    };
    let unknown = "vol-0000000000000000";
    let cases = [
        (
            "stats, unknown volume, relative path",
            Code::NotFound,
            code(n.node_get_volume_stats(stats_of(unknown, relative)).await),
        ),
        (
            "stats, unknown volume, no path",
            Code::InvalidArgument,
            code(n.node_get_volume_stats(stats_of(unknown, Path::new(""))).await),
        ),
        (
            "stats, attached volume, relative path",
            Code::InvalidArgument,
            code(n.node_get_volume_stats(stats_of(&vol, relative)).await),
        ),
        (
            "stats, attached volume, staging path",
            Code::Ok,
            code(n.node_get_volume_stats(stats_of(&vol, &staging)).await),
        ),
        (
            "expand, unknown volume, relative path",
            Code::NotFound,
            code(n.node_expand_volume(expand_of(unknown, relative)).await),
        ),
        (
            "expand, attached volume, relative path",
            Code::InvalidArgument,
            code(n.node_expand_volume(expand_of(&vol, relative)).await),
        ),
    ];
    let failures: Vec<String> = cases
        .iter()
        .filter(|(_, want, got)| want != got)
        .map(|(name, want, got)| format!("{name}: want {want:?}, got {got:?}"))
        .collect();
    assert!(failures.is_empty(), "{failures:?}");
    unstage(&mut n, &vol, &staging).await.unwrap();
    env.assert_clean();

    env.restart_node(&["--max-volumes", "5"]);
    let (_, mut n) = env.node.clients();
    let limit = n.node_get_info(csi::NodeGetInfoRequest {}).await.unwrap().into_inner().max_volumes_per_node;
    assert_eq!(limit, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kernel_attach_fails_clearly_where_the_nbd_module_is_missing() {
    if Path::new("/sys/module/nbd").exists() {
        return; // This test is about machines without the module, like the development one.
    }
    let env = Env::new(&["--attach", "kernel"]).await;
    let (vol, ctx, vctx) = env.volume("kern", 16, &[]).await;
    let staging = env.staging(&vol);
    let mut n = env.node();
    let e = stage(&mut n, &vol, &ctx, &vctx, &staging, block_cap()).await.unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e:?}");
    assert!(e.message().contains("nbd") && e.message().contains("netlink"), "{}", e.message());
    env.assert_clean();
}
