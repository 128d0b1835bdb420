//! The node plugin's operations: stage (attach, make the filesystem only on a blank device,
//! mount), publish (bind mount), unpublish, unstage (unmount, detach), stats and expansion. Each
//! runs under a per-volume guard and finds its state in the kernel (mounts, loop devices), so it
//! is idempotent and survives a plugin restart.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::MsFlags;
use parking_lot::Mutex;
use tracing::info;

use crate::attach::Attacher;
use crate::error::NodeError;
use crate::nbd_client;
use crate::sys;

/// Filesystems this plugin makes and grows.
pub const FILESYSTEMS: [&str; 2] = ["ext4", "xfs"];
/// The filesystem when neither the capability nor the volume context names one.
pub const DEFAULT_FS: &str = "ext4";

/// A volume capability, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub block: bool,
    pub fs_type: Option<String>,
    pub mount_flags: Vec<String>,
    /// SINGLE_NODE_SINGLE_WRITER: one publication at a time.
    pub single_writer: bool,
    /// VOLUME_MOUNT_GROUP: the group (the pod's fsGroup) a writable publication gives the
    /// filesystem to.
    pub mount_group: Option<u32>,
}

/// NodeStageVolume, validated.
#[derive(Debug, Clone)]
pub struct Stage {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub capability: Capability,
    pub publish_context: HashMap<String, String>,
    pub volume_context: HashMap<String, String>,
}

/// NodePublishVolume, validated.
#[derive(Debug, Clone)]
pub struct Publish {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub target_path: PathBuf,
    pub capability: Capability,
    pub readonly: bool,
}

/// NodeGetVolumeStats' answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Usage {
    Filesystem {
        bytes_total: u64,
        bytes_available: u64,
        bytes_used: u64,
        inodes_total: u64,
        inodes_free: u64,
    },
    Block {
        bytes_total: u64,
    },
}

/// Settings of the node plugin.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: String,
    pub zone: Option<String>,
    pub max_volumes: i64,
}

/// The node plugin.
#[derive(Debug)]
pub struct NodeService {
    pub cfg: NodeConfig,
    attacher: Attacher,
    busy: Mutex<HashSet<String>>,
}

/// Holds a volume's guard until dropped.
#[derive(Debug)]
pub struct Guard<'a> {
    set: &'a Mutex<HashSet<String>>,
    key: String,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.set.lock().remove(&self.key);
    }
}

/// Splits mount flags into kernel flags and filesystem options.
fn mount_options(flags: &[String]) -> (MsFlags, Vec<String>) {
    let mut ms = MsFlags::empty();
    let mut data = Vec::new();
    for f in flags.iter().flat_map(|f| f.split(',')).filter(|f| !f.is_empty()) {
        match f {
            "ro" => ms |= MsFlags::MS_RDONLY,
            "rw" | "defaults" => {}
            "noatime" => ms |= MsFlags::MS_NOATIME,
            "nodiratime" => ms |= MsFlags::MS_NODIRATIME,
            "relatime" => ms |= MsFlags::MS_RELATIME,
            "strictatime" => ms |= MsFlags::MS_STRICTATIME,
            "lazytime" => ms |= MsFlags::MS_LAZYTIME,
            "nosuid" => ms |= MsFlags::MS_NOSUID,
            "nodev" => ms |= MsFlags::MS_NODEV,
            "noexec" => ms |= MsFlags::MS_NOEXEC,
            "sync" => ms |= MsFlags::MS_SYNCHRONOUS,
            "dirsync" => ms |= MsFlags::MS_DIRSYNC,
            other => data.push(other.to_owned()),
        }
    }
    (ms, data)
}

impl NodeService {
    pub fn new(cfg: NodeConfig, attacher: Attacher) -> NodeService {
        NodeService { cfg, attacher, busy: Mutex::new(HashSet::new()) }
    }

    pub fn attacher(&self) -> &Attacher {
        &self.attacher
    }

    fn guard(&self, volume_id: &str) -> Result<Guard<'_>, NodeError> {
        let mut b = self.busy.lock();
        if !b.insert(volume_id.to_owned()) {
            return Err(NodeError::Aborted(format!(
                "an operation on volume {volume_id} is already in progress"
            )));
        }
        Ok(Guard { set: &self.busy, key: volume_id.to_owned() })
    }

    /// NodeStageVolume.
    pub async fn stage(&self, s: Stage) -> Result<(), NodeError> {
        let _g = self.guard(&s.volume_id)?;
        let vol = s.volume_id.as_str();
        let socket = s
            .publish_context
            .get("nbdSocket")
            .map(PathBuf::from)
            .ok_or_else(|| NodeError::InvalidArgument("publish_context has no nbdSocket".into()))?;
        let export = s.publish_context.get("exportName").cloned().unwrap_or_else(|| vol.to_owned());
        let readonly = s.publish_context.get("readonly").is_some_and(|v| v == "true");
        std::fs::create_dir_all(&s.staging_path)
            .map_err(|e| NodeError::Internal(format!("creating {}: {e}", s.staging_path.display())))?;

        if let Some(m) = sys::mount_at(&s.staging_path)? {
            // Staged already: the same volume the same way is fine, anything else is not.
            let ours = self.attacher.find_async(vol).await.map(|a| a.device);
            let want_fs = s.capability.fs_type.clone().or_else(|| s.volume_context.get("fsType").cloned());
            return match ours {
                Some(_) if s.capability.block => Err(NodeError::AlreadyExists(format!(
                    "volume {vol} is staged at {} as a filesystem, not as a block volume",
                    s.staging_path.display()
                ))),
                Some(_) if want_fs.as_ref().is_some_and(|f| *f != m.fstype) => Err(NodeError::AlreadyExists(
                    format!("volume {vol} is staged with {}, not {}", m.fstype, want_fs.unwrap_or_default()),
                )),
                Some(dev) if m.source == dev.display().to_string() => Ok(()),
                _ => Err(NodeError::AlreadyExists(format!(
                    "{} already holds a mount of {}",
                    s.staging_path.display(),
                    m.source
                ))),
            };
        }
        let generation = s.publish_context.get("generation").cloned().unwrap_or_else(|| "0".to_owned());
        let device = self.attacher.attach(vol, &socket, &export, &generation, readonly).await?;
        if s.capability.block {
            info!(volume_id = vol, device = %device.display(), "staged (block)");
            return Ok(());
        }
        let result = self.format_and_mount(&s, &device, readonly).await;
        if result.is_err() {
            let _ = self.attacher.detach(vol).await;
        }
        result
    }

    async fn format_and_mount(&self, s: &Stage, device: &Path, readonly: bool) -> Result<(), NodeError> {
        let vol = s.volume_id.as_str();
        let fs = s
            .capability
            .fs_type
            .clone()
            .or_else(|| s.volume_context.get("fsType").cloned())
            .unwrap_or_else(|| DEFAULT_FS.to_owned());
        if !FILESYSTEMS.contains(&fs.as_str()) {
            return Err(NodeError::InvalidArgument(format!("fsType {fs} is not supported (ext4 or xfs)")));
        }
        let sig = sys::probe(device).await?;
        if sig.is_blank() {
            if readonly {
                return Err(NodeError::FailedPrecondition(format!(
                    "volume {vol} is blank and published read-only: it cannot be formatted"
                )));
            }
            let mut args: Vec<String> = vec!["-q".into()];
            if let Some(o) = s.volume_context.get("mkfsOptions") {
                args.extend(o.split_whitespace().map(str::to_owned));
            }
            args.push(device.display().to_string());
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            sys::run(&format!("mkfs.{fs}"), &a).await?;
            info!(volume_id = vol, fs, device = %device.display(), "made a filesystem on a blank device");
        } else if sig.fs_type.as_deref() != Some(fs.as_str()) {
            // Never reformat (DESIGN rule 11): anything but the expected filesystem is an error.
            return Err(NodeError::FailedPrecondition(format!(
                "volume {vol}: the device holds {}, not a {fs} filesystem; refusing to format it",
                sig.describe()
            )));
        }
        let (mut flags, mut data) = mount_options(&s.capability.mount_flags);
        if readonly {
            flags |= MsFlags::MS_RDONLY;
        }
        if fs == "xfs" {
            // Clones carry their source's UUID; xfs would refuse to mount both on one node.
            data.push("nouuid".into());
        }
        sys::mount(device, &s.staging_path, &fs, flags, &data.join(",")).await?;
        info!(volume_id = vol, fs, device = %device.display(), staging = %s.staging_path.display(), "staged");
        Ok(())
    }

    /// NodeUnstageVolume: idempotent.
    pub async fn unstage(&self, volume_id: &str, staging_path: &Path) -> Result<(), NodeError> {
        let _g = self.guard(volume_id)?;
        sys::umount(staging_path).await?;
        // Read-only publications' loop devices left behind (by a plugin killed mid-way) would
        // keep the device busy.
        if let Some(a) = self.attacher.find_async(volume_id).await {
            for dev in sys::readonly_loops_over(&a.device) {
                sys::detach_loop(&dev).await?;
            }
        }
        self.attacher.detach(volume_id).await?;
        info!(volume_id, staging = %staging_path.display(), "unstaged");
        Ok(())
    }

    /// NodePublishVolume: idempotent.
    pub async fn publish(&self, p: Publish) -> Result<(), NodeError> {
        let _g = self.guard(&p.volume_id)?;
        let vol = p.volume_id.as_str();
        if p.capability.single_writer {
            let (me, vol2, st, tp) =
                (self.attacher.clone(), vol.to_owned(), p.staging_path.clone(), p.target_path.clone());
            let others = tokio::task::spawn_blocking(move || publications(&me, &vol2, &st, &tp))
                .await
                .map_err(|e| NodeError::Internal(e.to_string()))??;
            if !others.is_empty() {
                return Err(NodeError::FailedPrecondition(format!(
                    "volume {vol} is single-writer and already published at {}",
                    others[0].display()
                )));
            }
        }
        if p.capability.block {
            let a = self.attacher.find_async(vol).await.ok_or_else(|| {
                NodeError::FailedPrecondition(format!("volume {vol} is not staged on this node"))
            })?;
            if sys::mount_at(&p.target_path)?.is_some() {
                return Ok(());
            }
            if !p.target_path.exists() {
                std::fs::File::create(&p.target_path)
                    .map_err(|e| NodeError::Internal(format!("creating {}: {e}", p.target_path.display())))?;
            }
            // A read-only publication gets a read-only loop device of its own (sys::readonly_loop).
            let source = if p.readonly { sys::readonly_loop(&a.device).await? } else { a.device.clone() };
            if let Err(e) = sys::bind(&source, &p.target_path, p.readonly).await {
                if p.readonly {
                    let _ = sys::detach_loop(&source).await;
                }
                return Err(e);
            }
        } else {
            if sys::mount_at(&p.staging_path)?.is_none() {
                return Err(NodeError::FailedPrecondition(format!(
                    "volume {vol} is not staged at {}",
                    p.staging_path.display()
                )));
            }
            if let (Some(gid), false) = (p.capability.mount_group, p.readonly) {
                let root = p.staging_path.clone();
                let changed = tokio::task::spawn_blocking(move || sys::apply_fs_group(&root, gid))
                    .await
                    .map_err(|e| NodeError::Internal(e.to_string()))?
                    .map_err(|e| NodeError::Internal(format!("giving volume {vol} to group {gid}: {e}")))?;
                if changed {
                    info!(volume_id = vol, gid, "volume given to the pod's group");
                }
            }
            if sys::mount_at(&p.target_path)?.is_some() {
                return Ok(());
            }
            std::fs::create_dir_all(&p.target_path)
                .map_err(|e| NodeError::Internal(format!("creating {}: {e}", p.target_path.display())))?;
            sys::bind(&p.staging_path, &p.target_path, p.readonly).await?;
        }
        info!(volume_id = vol, target = %p.target_path.display(), readonly = p.readonly, "published");
        Ok(())
    }

    /// NodeUnpublishVolume: idempotent; removes the target path.
    pub async fn unpublish(&self, volume_id: &str, target: &Path) -> Result<(), NodeError> {
        let _g = self.guard(volume_id)?;
        let t = target.to_owned();
        let device = self.attacher.find_async(volume_id).await.map(|a| a.device);
        let own_loop = match device {
            Some(d) => tokio::task::spawn_blocking(move || sys::publication_loop(&t, &d))
                .await
                .map_err(|e| NodeError::Internal(e.to_string()))?,
            None => None,
        };
        sys::umount(target).await?;
        if let Some(dev) = own_loop {
            sys::detach_loop(&dev).await?;
        }
        match std::fs::metadata(target) {
            Ok(m) if m.is_dir() => std::fs::remove_dir(target),
            Ok(_) => std::fs::remove_file(target),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
        .map_err(|e| NodeError::Internal(format!("removing {}: {e}", target.display())))?;
        info!(volume_id, target = %target.display(), "unpublished");
        Ok(())
    }

    /// NodeGetVolumeStats: usage of `path`, and whether the volume's data path works.
    pub async fn stats(&self, volume_id: &str, path: &Path) -> Result<(Usage, Option<String>), NodeError> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let p = path.to_owned();
        let meta = tokio::task::spawn_blocking(move || std::fs::metadata(&p))
            .await
            .map_err(|e| NodeError::Internal(e.to_string()))?
            .map_err(|e| NodeError::NotFound(format!("volume path {}: {e}", path.display())))?;
        let attached =
            self.attacher.find_async(volume_id).await.ok_or_else(|| {
                NodeError::NotFound(format!("volume {volume_id} is not attached on this node"))
            })?;
        let dev_meta = std::fs::metadata(&attached.device)
            .map_err(|e| NodeError::Internal(format!("{}: {e}", attached.device.display())))?;
        let (major, minor) = (nix::sys::stat::major(dev_meta.rdev()), nix::sys::stat::minor(dev_meta.rdev()));
        let usage = if meta.file_type().is_block_device() {
            let own_loop = sys::publication_loop(path, &attached.device).is_some();
            if meta.rdev() != dev_meta.rdev() && !own_loop {
                return Err(NodeError::NotFound(format!("{} is not volume {volume_id}", path.display())));
            }
            Usage::Block { bytes_total: sys::device_size(&attached.device)? }
        } else {
            let mounted = sys::mount_at(path)?;
            if mounted.as_ref().is_none_or(|m| m.dev != format!("{major}:{minor}")) {
                return Err(NodeError::NotFound(format!(
                    "{} is not a mount of volume {volume_id}",
                    path.display()
                )));
            }
            let p = path.to_owned();
            let st = tokio::task::spawn_blocking(move || nix::sys::statvfs::statvfs(&p))
                .await
                .map_err(|e| NodeError::Internal(e.to_string()))?
                .map_err(|e| NodeError::Internal(format!("statvfs {}: {e}", path.display())))?;
            let f = st.fragment_size();
            Usage::Filesystem {
                bytes_total: st.blocks() * f,
                bytes_available: st.blocks_available() * f,
                bytes_used: (st.blocks() - st.blocks_free()) * f,
                inodes_total: st.files(),
                inodes_free: st.files_free(),
            }
        };
        let problem = if attached.backend.is_some() {
            // A kernel device that lost its connections reports no size.
            (sys::device_size(&attached.device).unwrap_or(0) == 0)
                .then(|| format!("{} has no connection to the volume's engine", attached.device.display()))
        } else {
            match (attached.socket, attached.export) {
                (Some(socket), Some(export)) => nbd_client::probe(&socket, &export, Duration::from_secs(2))
                    .await
                    .err()
                    .map(|e| format!("the volume's engine does not answer: {e}")),
                _ => Some("the NBD attach helper is not running".to_owned()),
            }
        };
        Ok((usage, problem))
    }

    /// NodeExpandVolume: makes the device show the grown volume and grows its filesystem online.
    pub async fn expand(&self, volume_id: &str, path: &Path, required: u64) -> Result<u64, NodeError> {
        let _g = self.guard(volume_id)?;
        let size = self.attacher.refresh_size(volume_id, required).await?;
        if size < required {
            return Err(NodeError::OutOfRange(format!(
                "volume {volume_id} is {size} bytes on this node, not {required}: expand it through the controller first"
            )));
        }
        let device =
            self.attacher.find_async(volume_id).await.map(|a| a.device).ok_or_else(|| {
                NodeError::NotFound(format!("volume {volume_id} is not attached on this node"))
            })?;
        let is_block = std::os::unix::fs::FileTypeExt::is_block_device(
            &std::fs::metadata(path)
                .map_err(|e| NodeError::NotFound(format!("volume path {}: {e}", path.display())))?
                .file_type(),
        );
        if !is_block && let Some(m) = sys::mount_at(path)? {
            match m.fstype.as_str() {
                "ext4" => {
                    sys::run("resize2fs", &[&device.display().to_string()]).await?;
                }
                "xfs" => {
                    sys::run("xfs_growfs", &[&path.display().to_string()]).await?;
                }
                other => {
                    return Err(NodeError::FailedPrecondition(format!("cannot grow a {other} filesystem")));
                }
            }
            info!(volume_id, size, fs = %m.fstype, "filesystem grown");
        }
        Ok(size)
    }
}

/// Where the volume is published besides `except` (mounts of its device or staging mount).
fn publications(
    attacher: &Attacher,
    volume_id: &str,
    staging: &Path,
    except: &Path,
) -> Result<Vec<PathBuf>, NodeError> {
    let mounts = sys::mountinfo()?;
    let device = attacher.find(volume_id).map(|a| a.device);
    // Binds of the device node, or of a read-only publication's loop device over it: devtmpfs,
    // rooted at the device's name.
    let mut dev_names: Vec<String> = device
        .iter()
        .cloned()
        .chain(device.iter().flat_map(|d| sys::readonly_loops_over(d)))
        .filter_map(|d| d.file_name().map(|n| format!("/{}", n.to_string_lossy())))
        .collect();
    dev_names.sort();
    let device = device.map(|d| d.display().to_string());
    let staged_dev = mounts.iter().rev().find(|m| m.mount_point == staging).map(|m| m.dev.clone());
    Ok(mounts
        .iter()
        .filter(|m| m.mount_point != staging && m.mount_point != except)
        .filter(|m| {
            staged_dev.as_ref().is_some_and(|d| *d == m.dev)
                || device.as_ref().is_some_and(|d| m.source == *d)
                || (m.fstype == "devtmpfs" && dev_names.binary_search(&m.root).is_ok())
        })
        .map(|m| m.mount_point.clone())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_flags_split_into_kernel_flags_and_options() {
        let (ms, data) = mount_options(&["noatime,ro".into(), "discard".into(), "nodev".into()]);
        assert!(ms.contains(MsFlags::MS_NOATIME | MsFlags::MS_RDONLY | MsFlags::MS_NODEV));
        assert_eq!(data, ["discard"]);
    }
}
