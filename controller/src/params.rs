//! StorageClass parameters, parsed once into [`VolumeParams`]; an unknown key is an error.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::ControllerError;

/// Keys the external-provisioner adds with `--extra-create-metadata`: accepted and kept as labels.
pub const PVC_NAME: &str = "csi.storage.k8s.io/pvc/name";
pub const PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";
pub const PV_NAME: &str = "csi.storage.k8s.io/pv/name";

/// Keys the external-snapshotter adds with `--extra-create-metadata` to CreateSnapshot.
pub const SNAPSHOT_NAME: &str = "csi.storage.k8s.io/volumesnapshot/name";
pub const SNAPSHOT_NAMESPACE: &str = "csi.storage.k8s.io/volumesnapshot/namespace";
pub const SNAPSHOT_CONTENT_NAME: &str = "csi.storage.k8s.io/volumesnapshotcontent/name";

/// Keys the external-snapshotter adds with `--extra-create-metadata` to CreateVolumeGroupSnapshot.
pub const GROUP_SNAPSHOT_KEYS: [&str; 3] = [
    "csi.storage.k8s.io/volumegroupsnapshot/name",
    "csi.storage.k8s.io/volumegroupsnapshot/namespace",
    "csi.storage.k8s.io/volumegroupsnapshotcontent/name",
];

/// Checks CreateVolumeGroupSnapshot parameters: none of their own; the snapshotter's metadata keys
/// are accepted (and not kept).
pub fn check_group_snapshot_params(params: &HashMap<String, String>) -> Result<(), ControllerError> {
    let mut keys: Vec<&String> = params.keys().collect();
    keys.sort();
    match keys.into_iter().find(|k| !GROUP_SNAPSHOT_KEYS.contains(&k.as_str())) {
        Some(k) => Err(ControllerError::InvalidArgument(format!(
            "unknown group snapshot parameter {k:?} (group snapshots take none; the snapshotter's \
             metadata keys are accepted)"
        ))),
        None => Ok(()),
    }
}

/// Checks CreateSnapshot parameters: snapshots take none of their own; the snapshotter's
/// metadata keys are accepted (and not kept). Any other key is an error that names it.
pub fn check_snapshot_params(params: &HashMap<String, String>) -> Result<(), ControllerError> {
    let mut keys: Vec<&String> = params.keys().collect();
    keys.sort();
    match keys
        .into_iter()
        .find(|k| ![SNAPSHOT_NAME, SNAPSHOT_NAMESPACE, SNAPSHOT_CONTENT_NAME].contains(&k.as_str()))
    {
        Some(k) => Err(ControllerError::InvalidArgument(format!(
            "unknown snapshot parameter {k:?} (snapshots take none; the snapshotter's {SNAPSHOT_NAME}, \
             {SNAPSHOT_NAMESPACE} and {SNAPSHOT_CONTENT_NAME} are accepted)"
        ))),
        None => Ok(()),
    }
}

/// Most replicas a volume may ask for.
pub const MAX_REPLICAS: usize = 5;

/// Filesystems the node plugin makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }

    pub fn parse(s: &str) -> Result<FsType, ControllerError> {
        match s {
            "ext4" => Ok(FsType::Ext4),
            "xfs" => Ok(FsType::Xfs),
            other => Err(ControllerError::InvalidArgument(format!(
                "fsType {other:?} is not supported (use ext4 or xfs)"
            ))),
        }
    }
}

/// The schema of an optional [`FsType`]: a nullable string enum (a `null` among the enum's values,
/// as derived, is refused by Kubernetes 1.20's API server).
fn fs_type_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "string", "enum": ["ext4", "xfs"], "nullable": true})
}

/// A volume's parameters, from its StorageClass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct VolumeParams {
    /// Replicas wanted.
    pub replicas: usize,
    /// Whether fewer replicas than wanted may be placed when fewer nodes can hold one. True when
    /// the count is the default (no `replicas` parameter) or `allowFewerReplicas` is "true";
    /// otherwise a count the cluster cannot place is refused.
    #[serde(default)]
    pub allow_fewer_replicas: bool,
    /// Writes need at least this many healthy replicas.
    pub min_healthy_replicas: usize,
    /// Thin volumes count against a node's capacity times the overcommit ratio; thick ones
    /// reserve their full size on the node's disk.
    pub thin: bool,
    /// Filesystem for Filesystem-mode volumes; passed to the node in the volume context.
    // Absent rather than null: Kubernetes 1.20 checks a null against the enum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "fs_type_schema")]
    pub fs_type: Option<FsType>,
    /// Extra options for mkfs, passed to the node in the volume context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mkfs_options: Option<String>,
    /// Rebuild copy rate limit (MiB/s) given to the volume's engine; `None`: the engine's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild_mib_per_sec: Option<u64>,
    /// Reads and writes per second through the volume's export (0: no limit).
    #[serde(default)]
    pub max_iops: u64,
    /// MiB per second read and written through the volume's export (0: no limit).
    #[serde(default)]
    pub max_mib_per_sec: u64,
    /// Seconds a replica may stay lost (ejected and not rebuilding, or on a node that is gone)
    /// before another replaces it; `None`: [`DEFAULT_REPLENISH_AFTER_SECS`]; 0: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_replenish_after_secs: Option<u64>,
    /// PVC and PV names from the external-provisioner, kept for display.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

impl Default for VolumeParams {
    fn default() -> Self {
        VolumeParams {
            replicas: 3,
            allow_fewer_replicas: true,
            min_healthy_replicas: 1,
            thin: true,
            fs_type: None,
            mkfs_options: None,
            rebuild_mib_per_sec: None,
            max_iops: 0,
            max_mib_per_sec: 0,
            replica_replenish_after_secs: None,
            labels: Default::default(),
        }
    }
}

fn bad(key: &str, value: &str, want: &str) -> ControllerError {
    ControllerError::InvalidArgument(format!("parameter {key}={value:?}: {want}"))
}

fn bool_param(key: &str, value: &str) -> Result<bool, ControllerError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(bad(key, value, "expected true or false")),
    }
}

/// The parameters that may change while a volume lives (ControllerModifyVolume, and a
/// VolumeAttributesClass's parameters at CreateVolume).
pub const MUTABLE: [&str; 6] = [
    "replicas",
    "minHealthyReplicas",
    "rebuildMiBPerSec",
    "maxIops",
    "maxMiBPerSec",
    "replicaReplenishAfter",
];

/// How long a lost replica waits to be replaced when the volume does not say (Longhorn waits
/// 600 s; a node reboot usually takes less than five minutes).
pub const DEFAULT_REPLENISH_AFTER_SECS: u64 = 300;

/// Parses `replicaReplenishAfter`: "never", or a positive duration: `90`, `90s`, `5m`, `1h`.
fn replenish_param(key: &str, value: &str) -> Result<u64, ControllerError> {
    if value == "never" {
        return Ok(0);
    }
    let (digits, unit) = value.split_at(value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len()));
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => 0,
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|n| (1..=30 * 86_400).contains(n))
        .ok_or_else(|| {
            bad(key, value, "expected \"never\" or a duration from 1s to 720h, such as 90s, 5m or 1h")
        })
}

fn count_param(key: &str, value: &str) -> Result<usize, ControllerError> {
    value
        .parse()
        .ok()
        .filter(|n| (1..=MAX_REPLICAS).contains(n))
        .ok_or_else(|| bad(key, value, &format!("expected 1 to {MAX_REPLICAS}")))
}

fn limit_param(key: &str, value: &str) -> Result<u64, ControllerError> {
    value.parse().map_err(|_| bad(key, value, "expected a whole number, 0 for no limit"))
}

impl VolumeParams {
    /// Sets a mutable parameter; false when `key` is not one (see [`MUTABLE`]).
    fn set_mutable(&mut self, key: &str, value: &str) -> Result<bool, ControllerError> {
        match key {
            "replicas" => self.replicas = count_param(key, value)?,
            "minHealthyReplicas" => self.min_healthy_replicas = count_param(key, value)?,
            "rebuildMiBPerSec" => {
                self.rebuild_mib_per_sec = Some(
                    value
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| bad(key, value, "expected a positive number of MiB per second"))?,
                );
            }
            "maxIops" => self.max_iops = limit_param(key, value)?,
            "maxMiBPerSec" => self.max_mib_per_sec = limit_param(key, value)?,
            "replicaReplenishAfter" => self.replica_replenish_after_secs = Some(replenish_param(key, value)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn check(&self) -> Result<(), ControllerError> {
        if self.min_healthy_replicas > self.replicas {
            return Err(ControllerError::InvalidArgument(format!(
                "minHealthyReplicas {} is more than replicas {}",
                self.min_healthy_replicas, self.replicas
            )));
        }
        Ok(())
    }

    /// These parameters with `mutable` applied (ControllerModifyVolume's `mutable_parameters`, or
    /// CreateVolume's from a VolumeAttributesClass, which win over the StorageClass's). A key that
    /// is not mutable, or a bad value, is InvalidArgument naming it.
    pub fn with_mutable(&self, mutable: &HashMap<String, String>) -> Result<VolumeParams, ControllerError> {
        let mut p = self.clone();
        let mut keys: Vec<&String> = mutable.keys().collect();
        keys.sort();
        for key in keys {
            if !p.set_mutable(key, &mutable[key])? {
                return Err(ControllerError::InvalidArgument(format!(
                    "parameter {key:?} cannot be changed on a volume (mutable: {})",
                    MUTABLE.join(", ")
                )));
            }
            if key == "replicas" {
                // A count asked for by name is strict, as in a StorageClass.
                p.allow_fewer_replicas = false;
            }
        }
        p.check()?;
        Ok(p)
    }

    /// How long a lost replica waits before it is replaced; `None`: never.
    pub fn replenish_after(&self) -> Option<std::time::Duration> {
        match self.replica_replenish_after_secs.unwrap_or(DEFAULT_REPLENISH_AFTER_SECS) {
            0 => None,
            s => Some(std::time::Duration::from_secs(s)),
        }
    }

    /// The engine's settings these parameters make.
    pub fn settings(&self) -> barnacle_engine::authority::VolumeSettings {
        barnacle_engine::authority::VolumeSettings {
            min_healthy: u32::try_from(self.min_healthy_replicas).unwrap_or(u32::MAX),
            rebuild_mib_per_sec: self
                .rebuild_mib_per_sec
                .unwrap_or(barnacle_engine::authority::DEFAULT_REBUILD_MIB_PER_SEC),
            max_iops: self.max_iops,
            max_mib_per_sec: self.max_mib_per_sec,
        }
    }

    /// Whether a volume with these parameters satisfies a request's: the immutable ones equal,
    /// and each mutable one the request names equal (ValidateVolumeCapabilities).
    pub fn satisfies(
        &self,
        params: &HashMap<String, String>,
        mutable: &HashMap<String, String>,
    ) -> Result<bool, ControllerError> {
        let asked = VolumeParams::parse(params)?.with_mutable(mutable)?;
        let named = |k: &str| params.contains_key(k) || mutable.contains_key(k);
        Ok(asked.thin == self.thin
            && asked.fs_type == self.fs_type
            && asked.mkfs_options == self.mkfs_options
            && (!named("replicas") || asked.replicas == self.replicas)
            && (!named("minHealthyReplicas") || asked.min_healthy_replicas == self.min_healthy_replicas)
            && (!named("rebuildMiBPerSec") || asked.rebuild_mib_per_sec == self.rebuild_mib_per_sec)
            && (!named("maxIops") || asked.max_iops == self.max_iops)
            && (!named("maxMiBPerSec") || asked.max_mib_per_sec == self.max_mib_per_sec)
            && (!named("replicaReplenishAfter") || asked.replenish_after() == self.replenish_after()))
    }

    /// Parses CreateVolume parameters. Every key is known or an error names it.
    pub fn parse(params: &HashMap<String, String>) -> Result<VolumeParams, ControllerError> {
        let mut p = VolumeParams::default();
        let mut allow_fewer = None;
        let mut keys: Vec<&String> = params.keys().collect();
        keys.sort();
        for key in keys {
            let value = params[key].as_str();
            if p.set_mutable(key, value)? {
                if key == "replicas" {
                    p.allow_fewer_replicas = false;
                }
                continue;
            }
            match key.as_str() {
                "allowFewerReplicas" => allow_fewer = Some(bool_param(key, value)?),
                "thin" => p.thin = bool_param(key, value)?,
                "fsType" => p.fs_type = Some(FsType::parse(value)?),
                "mkfsOptions" => {
                    if value.contains(['\n', '\0']) {
                        return Err(bad(key, value, "no newlines or NUL bytes"));
                    }
                    p.mkfs_options = Some(value.to_owned()).filter(|v| !v.trim().is_empty());
                }
                PVC_NAME | PVC_NAMESPACE | PV_NAME => {
                    p.labels.insert(key.clone(), value.to_owned());
                }
                other => {
                    return Err(ControllerError::InvalidArgument(format!(
                        "unknown parameter {other:?} (known: replicas, allowFewerReplicas, minHealthyReplicas, \
                         thin, fsType, mkfsOptions, rebuildMiBPerSec, maxIops, maxMiBPerSec, \
                         replicaReplenishAfter)"
                    )));
                }
            }
        }
        if let Some(a) = allow_fewer {
            p.allow_fewer_replicas = a;
        }
        p.check()?;
        Ok(p)
    }

    /// What the node needs to know, for the volume context (never a secret: DESIGN rule 9).
    pub fn volume_context(&self) -> HashMap<String, String> {
        let mut ctx = HashMap::new();
        if let Some(fs) = self.fs_type {
            ctx.insert("fsType".to_owned(), fs.as_str().to_owned());
        }
        if let Some(o) = &self.mkfs_options {
            ctx.insert("mkfsOptions".to_owned(), o.clone());
        }
        ctx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(kv: &[(&str, &str)]) -> Result<VolumeParams, ControllerError> {
        VolumeParams::parse(&kv.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect())
    }

    #[test]
    fn defaults_when_empty() {
        assert_eq!(parse(&[]).ok(), Some(VolumeParams::default()));
    }

    #[test]
    fn every_key_parses() {
        let p = parse(&[
            ("replicas", "2"),
            ("minHealthyReplicas", "2"),
            ("thin", "false"),
            ("fsType", "xfs"),
            ("mkfsOptions", "-m 0"),
            ("rebuildMiBPerSec", "50"),
            (PVC_NAME, "data-0"),
        ])
        .ok();
        let p = p.as_ref();
        assert_eq!(p.map(|p| (p.replicas, p.min_healthy_replicas, p.thin)), Some((2, 2, false)));
        assert_eq!(p.map(|p| p.allow_fewer_replicas), Some(false), "an explicit count is strict");
        assert_eq!(p.and_then(|p| p.fs_type), Some(FsType::Xfs));
        assert_eq!(p.and_then(|p| p.mkfs_options.as_deref()), Some("-m 0"));
        assert_eq!(p.and_then(|p| p.rebuild_mib_per_sec), Some(50));
        assert_eq!(p.and_then(|p| p.labels.get(PVC_NAME)).map(String::as_str), Some("data-0"));
        let ctx = p.map(VolumeParams::volume_context).unwrap_or_default();
        assert_eq!(ctx.get("fsType").map(String::as_str), Some("xfs"));
    }

    fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn mutable_parameters_apply_over_the_class_and_only_they_may_change() {
        let base =
            parse(&[("replicas", "3"), ("minHealthyReplicas", "2"), ("maxIops", "100")]).unwrap_or_default();
        let p = base
            .with_mutable(&map(&[
                ("replicas", "2"),
                ("maxIops", "0"),
                ("maxMiBPerSec", "40"),
                ("rebuildMiBPerSec", "10"),
            ]))
            .ok();
        let p = p.as_ref();
        assert_eq!(p.map(|p| (p.replicas, p.min_healthy_replicas)), Some((2, 2)));
        assert_eq!(p.map(|p| (p.max_iops, p.max_mib_per_sec)), Some((0, 40)), "0 lifts a limit");
        let s = p.map(VolumeParams::settings);
        assert_eq!(s.map(|s| (s.min_healthy, s.rebuild_mib_per_sec, s.max_mib_per_sec)), Some((2, 10, 40)));
        assert_eq!(
            VolumeParams::default().settings().rebuild_mib_per_sec,
            barnacle_engine::authority::DEFAULT_REBUILD_MIB_PER_SEC
        );
        for kv in [
            ("thin", "false"),
            ("fsType", "xfs"),
            ("replica", "2"),
            ("replicas", "9"),
            ("maxIops", "-1"),
            ("maxMiBPerSec", "lots"),
            ("rebuildMiBPerSec", "0"),
            // Below the volume's minHealthyReplicas of 2.
            ("replicas", "1"),
        ] {
            match base.with_mutable(&map(&[kv])) {
                Err(ControllerError::InvalidArgument(m)) => assert!(m.contains(kv.0), "{kv:?}: {m}"),
                other => panic!("{kv:?} must be refused, got {other:?}"),
            }
        }
        assert_eq!(
            base.with_mutable(&HashMap::new()).ok(),
            Some(base.clone()),
            "nothing asked, nothing changes"
        );
    }

    #[test]
    fn a_volume_satisfies_what_a_request_names() {
        let v = parse(&[("replicas", "2"), ("fsType", "xfs")]).ok().unwrap_or_default();
        let yes = |p: &[(&str, &str)], m: &[(&str, &str)]| v.satisfies(&map(p), &map(m)).ok();
        assert_eq!(yes(&[("fsType", "xfs")], &[]), Some(true), "unnamed mutable parameters do not matter");
        assert_eq!(yes(&[("fsType", "xfs")], &[("replicas", "2")]), Some(true));
        assert_eq!(yes(&[("fsType", "xfs")], &[("replicas", "3")]), Some(false));
        assert_eq!(yes(&[("fsType", "ext4")], &[]), Some(false));
        assert_eq!(yes(&[("fsType", "xfs"), ("maxIops", "5")], &[]), Some(false));
        assert_eq!(
            yes(&[], &[("thin", "true")]),
            None,
            "an immutable key among the mutable ones is an error"
        );
    }

    #[test]
    fn snapshots_accept_the_snapshotters_metadata_and_nothing_else() {
        let p = |kv: &[(&str, &str)]| {
            check_snapshot_params(&kv.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect())
        };
        assert!(p(&[]).is_ok());
        assert!(
            p(&[
                (SNAPSHOT_NAME, "s"),
                (SNAPSHOT_NAMESPACE, "default"),
                (SNAPSHOT_CONTENT_NAME, "snapcontent-1")
            ])
            .is_ok()
        );
        match p(&[(SNAPSHOT_NAME, "s"), ("replicas", "2")]) {
            Err(ControllerError::InvalidArgument(m)) => assert!(m.contains("\"replicas\""), "{m}"),
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn the_replenishment_wait_is_a_duration_or_never() {
        let wait = |v: &str| parse(&[("replicaReplenishAfter", v)]).ok().map(|p| p.replenish_after());
        let secs = |s| Some(Some(std::time::Duration::from_secs(s)));
        assert_eq!(parse(&[]).ok().map(|p| p.replenish_after()), secs(DEFAULT_REPLENISH_AFTER_SECS));
        assert_eq!(wait("90"), secs(90));
        assert_eq!(wait("90s"), secs(90));
        assert_eq!(wait("5m"), secs(300));
        assert_eq!(wait("2h"), secs(7200));
        assert_eq!(wait("never"), Some(None));
        // Mutable: a live volume's wait changes.
        let v = parse(&[]).ok().unwrap_or_default();
        let changed =
            v.with_mutable(&map(&[("replicaReplenishAfter", "1m")])).ok().map(|p| p.replenish_after());
        assert_eq!(changed, secs(60));
    }

    #[test]
    fn only_the_default_count_or_an_explicit_allowance_may_place_fewer() {
        let allow = |kv: &[(&str, &str)]| parse(kv).ok().map(|p| p.allow_fewer_replicas);
        assert_eq!(allow(&[]), Some(true));
        assert_eq!(allow(&[("replicas", "3")]), Some(false));
        assert_eq!(allow(&[("replicas", "3"), ("allowFewerReplicas", "true")]), Some(true));
        assert_eq!(allow(&[("allowFewerReplicas", "false")]), Some(false));
    }

    #[test]
    fn bad_values_and_unknown_keys_are_invalid() {
        for kv in [
            ("replicas", "0"),
            ("replicas", "6"),
            ("replicas", "three"),
            ("minHealthyReplicas", "0"),
            ("thin", "yes"),
            ("fsType", "btrfs"),
            ("rebuildMiBPerSec", "0"),
            ("maxIops", "many"),
            ("mkfsOptions", "a\nb"),
            ("allowFewerReplicas", "1"),
            ("replica", "3"),
            ("replicaReplenishAfter", "0"),
            ("replicaReplenishAfter", "0s"),
            ("replicaReplenishAfter", "5 m"),
            ("replicaReplenishAfter", "5d"),
            ("replicaReplenishAfter", "-1"),
            ("replicaReplenishAfter", "721h"),
        ] {
            assert!(
                matches!(parse(&[kv]), Err(ControllerError::InvalidArgument(_))),
                "{kv:?} must be refused"
            );
        }
        assert!(matches!(
            parse(&[("replicas", "1"), ("minHealthyReplicas", "2")]),
            Err(ControllerError::InvalidArgument(_))
        ));
    }
}
