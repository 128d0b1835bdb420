//! Barnacle's records as Kubernetes custom resources (group `barnacle.dev`): the types of the
//! Kubernetes store, and the source of the CRD YAML shipped in `charts/barnacle/crds/` (a test
//! keeps that file equal to what these types generate).
//!
//! A volume's spec is its record; its status holds the membership (epoch and replica set), which
//! only changes by an update carrying the resource's `resourceVersion` (DESIGN rule 1). The volume's
//! token is a Secret, never in a resource (rule 9).

use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::store::{SnapshotRecord, VolumeRecord};
pub use barnacle_engine::k8s::{MemberStatus, MembershipStatus};

/// A volume: its record is the spec.
#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "barnacle.dev",
    version = "v1alpha1",
    kind = "Volume",
    plural = "volumes",
    shortname = "bvol",
    namespaced,
    status = "VolumeStatus",
    printcolumn = r#"{"name":"Name","type":"string","jsonPath":".spec.name"}"#,
    printcolumn = r#"{"name":"Size","type":"integer","jsonPath":".spec.size"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".spec.state"}"#,
    printcolumn = r#"{"name":"Epoch","type":"integer","jsonPath":".status.membership.epoch"}"#
)]
pub struct VolumeSpec {
    #[serde(flatten)]
    pub record: VolumeRecord,
}

/// What the membership authority keeps of a volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VolumeStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membership: Option<MembershipStatus>,
}

/// A snapshot: its record is the spec.
#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "barnacle.dev",
    version = "v1alpha1",
    kind = "Snapshot",
    plural = "snapshots",
    shortname = "bsnap",
    namespaced,
    status = "SnapshotStatus",
    printcolumn = r#"{"name":"Name","type":"string","jsonPath":".spec.name"}"#,
    printcolumn = r#"{"name":"Volume","type":"string","jsonPath":".spec.volume_id"}"#,
    printcolumn = r#"{"name":"Ready","type":"boolean","jsonPath":".status.ready"}"#
)]
pub struct SnapshotSpec {
    #[serde(flatten)]
    pub record: SnapshotRecord,
}

/// Written with the record: whether the snapshot can be used as a source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SnapshotStatus {
    #[serde(default)]
    pub ready: bool,
}

/// A publication of a volume on a node (its engine pod runs there).
#[derive(CustomResource, Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "barnacle.dev",
    version = "v1alpha1",
    kind = "Attachment",
    plural = "attachments",
    shortname = "batt",
    namespaced,
    status = "AttachmentStatus",
    printcolumn = r#"{"name":"Volume","type":"string","jsonPath":".spec.volume_id"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.node"}"#,
    printcolumn = r#"{"name":"Generation","type":"integer","jsonPath":".spec.generation"}"#
)]
pub struct AttachmentSpec {
    pub volume_id: String,
    pub node: String,
    pub generation: u64,
    pub readonly: bool,
    pub block: bool,
    pub access_mode: i32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AttachmentStatus {
    /// The engine pod serves the volume's NBD socket on the node.
    #[serde(default)]
    pub engine_ready: bool,
}

/// The CRDs of every kind, as one multi-document YAML file (the chart's `crds/barnacle.dev.yaml`).
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::from(
        "# Generated from controller/src/crd.rs: do not edit. Regenerate with\n\
         #   BARNACLE_WRITE_CRDS=1 cargo test -p barnacle-controller crds\n",
    );
    for crd in [Volume::crd(), Snapshot::crd(), Attachment::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crds_shipped_in_the_chart_are_the_generated_ones() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../charts/barnacle/crds/barnacle.dev.yaml");
        let generated = crds_yaml().unwrap_or_else(|e| panic!("{e}"));
        if std::env::var_os("BARNACLE_WRITE_CRDS").is_some() {
            std::fs::write(&path, &generated).unwrap_or_else(|e| panic!("{e}"));
        }
        let shipped = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            shipped == generated,
            "{} differs from the types: run BARNACLE_WRITE_CRDS=1 cargo test -p barnacle-controller crds",
            path.display()
        );
    }

    #[test]
    fn a_record_round_trips_through_its_custom_resource() {
        let record = VolumeRecord {
            id: "vol-1".into(),
            name: "pvc-1".into(),
            size: 1 << 30,
            params: crate::params::VolumeParams::default(),
            replicas: vec![crate::store::ReplicaPlacement {
                id: "r0".into(),
                node: "n1".into(),
                port: Some(20000),
            }],
            source: Some(crate::store::VolumeSource::Snapshot("snap-1".into())),
            attachment: None,
            generation: 2,
            state: crate::store::VolumeState::Ready,
            created_unix: 5,
            annotations: Default::default(),
            replica_ids_issued: 1,
            lost_replicas: Vec::new(),
            replicas_replenished: 0,
        };
        let cr = Volume::new("vol-1", VolumeSpec { record: record.clone() });
        let json = serde_json::to_value(&cr).unwrap_or_default();
        assert_eq!(json["spec"]["name"], "pvc-1", "the record's fields sit directly in spec");
        let back: Volume = serde_json::from_value(json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.spec.record, record);
    }
}
