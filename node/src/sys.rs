//! The node's view of the kernel: mounts (from `/proc/self/mountinfo`), loop devices (from
//! `/sys/block`), signatures on devices (`blkid -p`), the external tools (mkfs, resize2fs,
//! xfs_growfs, losetup), run asynchronously with their stderr in the error, and a volume's group
//! ownership (VOLUME_MOUNT_GROUP).

use std::path::{Path, PathBuf};

use crate::error::NodeError;

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the mounted device.
    pub dev: String,
    /// The root of the mount within its filesystem.
    pub root: String,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
    pub options: String,
    /// The optional fields (`shared:N`, `master:N`, …): the mount's propagation.
    pub propagation: Vec<String>,
}

impl MountEntry {
    /// Whether mounts made under it propagate to its peers (`shared:N`).
    pub fn is_shared(&self) -> bool {
        self.propagation.iter().any(|f| f.starts_with("shared:"))
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, …).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(MountEntry {
                dev: (*l.get(2)?).to_owned(),
                root: unescape(l.get(3)?),
                mount_point: PathBuf::from(unescape(l.get(4)?)),
                fstype: (*r.first()?).to_owned(),
                source: unescape(r.get(1)?),
                options: (*l.get(5)?).to_owned(),
                propagation: l.get(6..).unwrap_or_default().iter().map(|f| (*f).to_owned()).collect(),
            })
        })
        .collect()
}

pub fn mountinfo() -> Result<Vec<MountEntry>, NodeError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| NodeError::Internal(format!("reading mountinfo: {e}")))?;
    Ok(parse_mountinfo(&text))
}

/// The topmost mount at exactly `path`.
pub fn mount_at(path: &Path) -> Result<Option<MountEntry>, NodeError> {
    Ok(mountinfo()?.into_iter().rev().find(|m| m.mount_point == path))
}

/// Runs a tool; a failure carries its stderr.
pub async fn run(program: &str, args: &[&str]) -> Result<String, NodeError> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| NodeError::Internal(format!("running {program}: {e}")))?;
    if !out.status.success() {
        return Err(NodeError::Internal(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What `blkid -p` finds on a device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Signature {
    /// `TYPE` (a filesystem, swap, RAID member, …).
    pub fs_type: Option<String>,
    /// `PTTYPE` (a partition table).
    pub pt_type: Option<String>,
    /// `USAGE` (filesystem, raid, crypto, other).
    pub usage: Option<String>,
}

impl Signature {
    pub fn is_blank(&self) -> bool {
        self.fs_type.is_none() && self.pt_type.is_none() && self.usage.is_none()
    }

    /// For messages.
    pub fn describe(&self) -> String {
        match (&self.fs_type, &self.pt_type, &self.usage) {
            (Some(t), _, _) => format!("a {t} signature"),
            (None, Some(p), _) => format!("a {p} partition table"),
            (None, None, Some(u)) => format!("a signature of usage {u}"),
            _ => "nothing".to_owned(),
        }
    }
}

/// Parses `blkid -p -o export` output.
pub fn parse_blkid(text: &str) -> Signature {
    let mut s = Signature::default();
    for line in text.lines() {
        match line.split_once('=') {
            Some(("TYPE", v)) => s.fs_type = Some(v.to_owned()),
            Some(("PTTYPE", v)) => s.pt_type = Some(v.to_owned()),
            Some(("USAGE", v)) => s.usage = Some(v.to_owned()),
            _ => {}
        }
    }
    s
}

/// Low-level probe of a device's signatures. blkid exits 2 when it finds nothing; a device that
/// cannot be read is an error, never "blank" (DESIGN rule 11).
pub async fn probe(dev: &Path) -> Result<Signature, NodeError> {
    let d = dev.display().to_string();
    // The whole device must be readable first: blkid reads only a few places.
    let mut f =
        tokio::fs::File::open(dev).await.map_err(|e| NodeError::Internal(format!("opening {d}: {e}")))?;
    let mut head = vec![0u8; 4096];
    tokio::io::AsyncReadExt::read_exact(&mut f, &mut head)
        .await
        .map_err(|e| NodeError::Internal(format!("{d} is not readable: {e}")))?;
    let out = tokio::process::Command::new("blkid")
        .args(["-p", "-o", "export", &d])
        .output()
        .await
        .map_err(|e| NodeError::Internal(format!("running blkid: {e}")))?;
    match out.status.code() {
        Some(0) => Ok(parse_blkid(&String::from_utf8_lossy(&out.stdout))),
        Some(2) => Ok(Signature::default()),
        _ => Err(NodeError::Internal(format!(
            "blkid -p {d} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

/// Mounts `source` at `target`.
pub async fn mount(
    source: &Path,
    target: &Path,
    fstype: &str,
    flags: nix::mount::MsFlags,
    data: &str,
) -> Result<(), NodeError> {
    let (s, t, f, d) = (source.to_owned(), target.to_owned(), fstype.to_owned(), data.to_owned());
    tokio::task::spawn_blocking(move || {
        nix::mount::mount(Some(&s), &t, Some(f.as_str()), flags, Some(d.as_str())).map_err(|e| {
            NodeError::Internal(format!("mount {} at {} ({f}, {d:?}): {e}", s.display(), t.display()))
        })
    })
    .await
    .map_err(|e| NodeError::Internal(e.to_string()))?
}

/// Bind-mounts `source` at `target`, read-only if asked.
pub async fn bind(source: &Path, target: &Path, readonly: bool) -> Result<(), NodeError> {
    use nix::mount::MsFlags;
    let (s, t) = (source.to_owned(), target.to_owned());
    tokio::task::spawn_blocking(move || {
        let err =
            |e: nix::Error| NodeError::Internal(format!("bind {} at {}: {e}", s.display(), t.display()));
        nix::mount::mount(Some(&s), &t, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(err)?;
        if readonly {
            let f = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
            if let Err(e) = nix::mount::mount(None::<&str>, &t, None::<&str>, f, None::<&str>) {
                let _ = nix::mount::umount2(&t, nix::mount::MntFlags::MNT_DETACH);
                return Err(err(e));
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| NodeError::Internal(e.to_string()))?
}

/// Unmounts `target` (every mount stacked there); nothing mounted is fine.
pub async fn umount(target: &Path) -> Result<(), NodeError> {
    let t = target.to_owned();
    tokio::task::spawn_blocking(move || {
        while mount_at(&t)?.is_some() {
            nix::mount::umount2(&t, nix::mount::MntFlags::empty())
                .map_err(|e| NodeError::Internal(format!("umount {}: {e}", t.display())))?;
        }
        Ok(())
    })
    .await
    .map_err(|e| NodeError::Internal(e.to_string()))?
}

/// A block device's size in bytes.
pub fn device_size(dev: &Path) -> Result<u64, NodeError> {
    let name = dev.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let sectors = std::fs::read_to_string(format!("/sys/class/block/{name}/size"))
        .map_err(|e| NodeError::Internal(format!("size of {}: {e}", dev.display())))?;
    let sectors: u64 =
        sectors.trim().parse().map_err(|e| NodeError::Internal(format!("size of {}: {e}", dev.display())))?;
    Ok(sectors * 512)
}

/// Loop devices and their backing files.
pub fn loop_devices() -> Vec<(PathBuf, PathBuf)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/sys/block") else { return out };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(backing) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
            out.push((PathBuf::from(format!("/dev/{name}")), PathBuf::from(backing.trim_end())));
        }
    }
    out
}

/// A new read-only loop device over the block device `device`, for a read-only Block
/// publication. A mount's read-only flag covers the filesystem holding a device node, not IO to
/// the device: a read-only bind of the volume's device would not stop a writer opening it.
pub async fn readonly_loop(device: &Path) -> Result<PathBuf, NodeError> {
    let dev =
        device.to_str().ok_or_else(|| NodeError::Internal(format!("{}: not UTF-8", device.display())))?;
    let out = run("losetup", &["--find", "--show", "--read-only", "--sector-size", "4096", dev]).await?;
    Ok(PathBuf::from(out.trim()))
}

/// The read-only loop devices over the block device `device` (read-only publications').
pub fn readonly_loops_over(device: &Path) -> Vec<PathBuf> {
    loop_devices()
        .into_iter()
        .filter(|(_, backing)| backing == device)
        .filter(|(dev, _)| {
            let name = dev.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            std::fs::read_to_string(format!("/sys/block/{name}/ro")).is_ok_and(|r| r.trim() == "1")
        })
        .map(|(dev, _)| dev)
        .collect()
}

/// The read-only loop device over `device` that a Block publication at `target` binds, if it
/// is one.
pub fn publication_loop(target: &Path, device: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::metadata(target).ok()?;
    if !meta.file_type().is_block_device() {
        return None;
    }
    let (major, minor) = (nix::sys::stat::major(meta.rdev()), nix::sys::stat::minor(meta.rdev()));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let backing = std::fs::read_to_string(sys.join("loop/backing_file")).ok()?;
    let ro = std::fs::read_to_string(sys.join("ro")).ok()?;
    let name = std::fs::read_link(&sys).ok()?.file_name()?.to_string_lossy().into_owned();
    (Path::new(backing.trim_end()) == device && ro.trim() == "1")
        .then(|| PathBuf::from(format!("/dev/{name}")))
}

/// Detaches a loop device (it goes once nothing holds it open).
pub async fn detach_loop(dev: &Path) -> Result<(), NodeError> {
    let d = dev.to_str().ok_or_else(|| NodeError::Internal(format!("{}: not UTF-8", dev.display())))?;
    run("losetup", &["-d", d]).await.map(|_| ())
}

/// Gives a mounted filesystem to group `gid` as the kubelet does for a pod's fsGroup: every file
/// and directory on it (not below other mounts) gets the group and `0660` added to its mode,
/// directories also `0110` and setgid, so new files inherit the group. Symlinks are left alone,
/// and never followed: each entry is opened with `O_PATH | O_NOFOLLOW` and changed through that
/// descriptor, so a pod swapping a file for a symlink mid-walk changes nothing outside the volume.
/// Skipped when the root already has the group and the mode (a repeated publication, like the
/// kubelet's OnRootMismatch); the root changes last, so an interrupted walk is done again.
/// Returns whether it walked. Blocking.
pub fn apply_fs_group(root: &Path, gid: u32) -> std::io::Result<bool> {
    use std::os::fd::{AsRawFd, OwnedFd};

    use nix::fcntl::{AtFlags, OFlag};
    use nix::sys::stat::{Mode, SFlag};

    const SETGID: u32 = 0o2000;
    let want = |mode: u32, dir: bool| mode | 0o660 | if dir { 0o110 | SETGID } else { 0 };
    let io = |e: nix::Error| std::io::Error::from_raw_os_error(e as i32);
    let dir_flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let give = |fd: &OwnedFd, mode: u32, dir: bool| -> std::io::Result<()> {
        nix::unistd::fchownat(fd, "", None, Some(nix::unistd::Gid::from_raw(gid)), AtFlags::AT_EMPTY_PATH)
            .map_err(io)?;
        // chmod through the descriptor's /proc link: the inode it names, never a path again.
        std::fs::set_permissions(
            format!("/proc/self/fd/{}", fd.as_raw_fd()),
            std::os::unix::fs::PermissionsExt::from_mode(want(mode, dir)),
        )
    };
    let root_fd = nix::fcntl::open(root, dir_flags, Mode::empty()).map_err(io)?;
    let top = nix::sys::stat::fstat(&root_fd).map_err(io)?;
    let top_mode = top.st_mode & 0o7777;
    if top.st_gid == gid && want(top_mode, true) == top_mode {
        return Ok(false);
    }
    let mut dirs: Vec<OwnedFd> = vec![root_fd.try_clone()?];
    while let Some(dir) = dirs.pop() {
        let names: Vec<std::ffi::CString> = nix::dir::Dir::from_fd(dir.try_clone()?)
            .map_err(io)?
            .iter()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_owned())
            .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
            .collect();
        for name in names {
            let path_flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            let fd = match nix::fcntl::openat(&dir, name.as_c_str(), path_flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(nix::Error::ENOENT) => continue,
                Err(e) => return Err(io(e)),
            };
            let st = nix::sys::stat::fstat(&fd).map_err(io)?;
            let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
            if kind == SFlag::S_IFLNK || st.st_dev != top.st_dev {
                continue;
            }
            let is_dir = kind == SFlag::S_IFDIR;
            give(&fd, st.st_mode & 0o7777, is_dir)?;
            if is_dir {
                match nix::fcntl::openat(&dir, name.as_c_str(), dir_flags, Mode::empty()) {
                    // Still the directory just changed (not swapped since).
                    Ok(sub) if nix::sys::stat::fstat(&sub).is_ok_and(|s| s.st_ino == st.st_ino) => {
                        dirs.push(sub)
                    }
                    Ok(_) | Err(nix::Error::ENOENT | nix::Error::ELOOP | nix::Error::ENOTDIR) => {}
                    Err(e) => return Err(io(e)),
                }
            }
        }
    }
    give(&root_fd, top_mode, true)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 22 0:50 / /var/lib/x/fuse/vol-1 rw,nosuid,nodev shared:3 - fuse.barnacle barnacle:vol-1 rw,user_id=0\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/a b"));
        assert_eq!(
            (m[0].fstype.as_str(), m[0].source.as_str(), m[0].dev.as_str()),
            ("ext3", "/dev/root", "98:0")
        );
        assert_eq!(m[0].options, "rw,noatime");
        assert_eq!((m[1].fstype.as_str(), m[1].source.as_str()), ("fuse.barnacle", "barnacle:vol-1"));
        assert!(!m[0].is_shared() && m[1].is_shared());
        assert_eq!(m[0].propagation, ["master:1"]);
    }

    #[test]
    fn blkid_export_output_parses() {
        let s = parse_blkid("DEVNAME=/dev/loop3\nUUID=abc\nTYPE=ext4\nUSAGE=filesystem\n");
        assert_eq!(s.fs_type.as_deref(), Some("ext4"));
        assert!(!s.is_blank());
        let p = parse_blkid("DEVNAME=/dev/loop3\nPTUUID=x\nPTTYPE=gpt\n");
        assert_eq!(p.pt_type.as_deref(), Some("gpt"));
        assert_eq!(p.describe(), "a gpt partition table");
        assert!(parse_blkid("").is_blank());
    }
}
