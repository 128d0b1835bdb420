//! The host directory the node plugin shares with the host and the engine pods
//! (`/var/lib/barnacle`: engine sockets, FUSE mounts) is mounted into its container with
//! Bidirectional propagation, which the container runtime allows only when that host path is on
//! a shared mount. Hosts booted by systemd have `/` shared; others (this project's test machine,
//! some minimal images) do not, and the kubelet then cannot start the container at all ("path
//! ... is mounted on / but it is not a shared mount"). The chart's init container runs
//! [`ensure_shared`] first, with the host's mount table: it says exactly what is wrong and what
//! to run, or with `fix` makes the path a shared mount of its own.

use std::path::{Path, PathBuf};

use crate::sys::{MountEntry, parse_mountinfo};

/// What [`ensure_shared`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedMount {
    /// `path` is on a shared mount (at `mount_point`).
    Already { mount_point: PathBuf },
    /// `path` was made a shared mount: these commands ran in the host's mount namespace.
    Fixed { commands: Vec<Vec<String>> },
}

/// Why the host path cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(
        "{path} is on the mount {mount_point}, which is not a shared mount ({propagation}): the node \
         plugin's Bidirectional mount of it cannot start. On the node run\n  {fix}\n(or install the chart \
         with node.makeHostPathShared=true to have the plugin do it; systemd hosts have / shared already)"
    )]
    NotShared { path: String, mount_point: String, propagation: String, fix: String },
    #[error("no mount holds {0} in the host's mount table")]
    NoMount(String),
    #[error("{0}")]
    Io(String),
}

/// The mount holding `path`: the last-mounted entry whose mount point is `path` or its nearest
/// ancestor.
pub fn holding_mount<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| path.starts_with(&m.mount_point))
        .max_by_key(|(i, m)| (m.mount_point.components().count(), *i))
        .map(|(_, m)| m)
}

/// The commands that make `path` (held by `mount`) a shared mount: a bind mount of itself (made
/// first) unless it is a mount point already, then `--make-shared`.
pub fn fix_commands(mount: &MountEntry, path: &Path) -> Vec<Vec<String>> {
    let p = path.display().to_string();
    let mut cmds = Vec::new();
    if mount.mount_point != path {
        cmds.push(vec!["mkdir".into(), "-p".into(), p.clone()]);
        cmds.push(vec!["mount".into(), "--bind".into(), p.clone(), p.clone()]);
    }
    cmds.push(vec!["mount".into(), "--make-shared".into(), p]);
    cmds
}

/// Checks that `path` is on a shared mount in the mount table `mountinfo` (the host's: read
/// `/proc/1/mountinfo` with the host's PID namespace); if not, with `fix`, runs the commands that
/// make it one through `run` (in the host's mount namespace), else explains.
pub fn ensure_shared(
    mountinfo: &str,
    path: &Path,
    fix: bool,
    run: impl Fn(&[String]) -> Result<(), String>,
) -> Result<SharedMount, HostError> {
    let mounts = parse_mountinfo(mountinfo);
    let m = holding_mount(&mounts, path).ok_or_else(|| HostError::NoMount(path.display().to_string()))?;
    if m.is_shared() {
        return Ok(SharedMount::Already { mount_point: m.mount_point.clone() });
    }
    let commands = fix_commands(m, path);
    if !fix {
        return Err(HostError::NotShared {
            path: path.display().to_string(),
            mount_point: m.mount_point.display().to_string(),
            propagation: if m.propagation.is_empty() { "private".into() } else { m.propagation.join(" ") },
            fix: commands.iter().map(|c| c.join(" ")).collect::<Vec<_>>().join(" && "),
        });
    }
    for c in &commands {
        run(c).map_err(|e| HostError::Io(format!("{}: {e}", c.join(" "))))?;
    }
    Ok(SharedMount::Fixed { commands })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
30 22 0:25 / /run rw,nosuid shared:5 - tmpfs tmpfs rw
41 22 254:0 /var/lib/kubelet-data /var/lib/kubelet rw,relatime shared:9 - ext4 /dev/vda rw
";

    #[test]
    fn the_nearest_mount_decides_and_a_private_one_is_explained() {
        let path = Path::new("/var/lib/barnacle");
        let never = |_: &[String]| -> Result<(), String> { Err("must not run".into()) };
        match ensure_shared(TABLE, path, false, never) {
            Err(e @ HostError::NotShared { .. }) => {
                let m = e.to_string();
                assert!(m.contains("on the mount /, which is not a shared mount (private)"), "{m}");
                assert!(
                    m.contains(
                        "mkdir -p /var/lib/barnacle && mount --bind /var/lib/barnacle /var/lib/barnacle && \
                         mount --make-shared /var/lib/barnacle"
                    ),
                    "{m}"
                );
            }
            other => panic!("expected NotShared, got {other:?}"),
        }
        let kubelet = Path::new("/var/lib/kubelet/plugins/x");
        assert_eq!(
            ensure_shared(TABLE, kubelet, false, never).ok(),
            Some(SharedMount::Already { mount_point: "/var/lib/kubelet".into() })
        );
    }

    #[test]
    fn fixing_binds_the_path_onto_itself_then_shares_it() {
        let ran = std::cell::RefCell::new(Vec::new());
        let run = |c: &[String]| {
            ran.borrow_mut().push(c.join(" "));
            Ok(())
        };
        let got = ensure_shared(TABLE, Path::new("/var/lib/barnacle"), true, run).ok();
        assert!(matches!(got, Some(SharedMount::Fixed { .. })));
        assert_eq!(
            *ran.borrow(),
            [
                "mkdir -p /var/lib/barnacle",
                "mount --bind /var/lib/barnacle /var/lib/barnacle",
                "mount --make-shared /var/lib/barnacle"
            ]
        );
        // A mount point of its own only needs sharing; a failing command is the error.
        let table = format!("{TABLE}50 22 254:0 /x /var/lib/barnacle rw - ext4 /dev/vda rw\n");
        let fail = |_: &[String]| Err("permission denied".to_owned());
        match ensure_shared(&table, Path::new("/var/lib/barnacle"), true, fail) {
            Err(HostError::Io(m)) => {
                assert_eq!(m, "mount --make-shared /var/lib/barnacle: permission denied")
            }
            other => panic!("expected Io, got {other:?}"),
        }
    }
}
