//! The records of a cluster as custom resources ([`crate::crd`]) in the controller's namespace:
//! a Volume per volume record (named by its id, the record is its spec), a Snapshot per snapshot
//! record, and an Attachment per published volume (a view of the volume record's attachment for
//! operators; the volume's spec stays the truth). The volume's status holds its membership, which
//! only the membership authority writes ([`barnacle_engine::k8s::KubeAuthority`]).
//!
//! The [`Store`] trait is blocking: calls run on a blocking thread and wait for the API server
//! there, each within a timeout.

use std::time::Duration;

use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};

use crate::crd::{Attachment, AttachmentSpec, Snapshot, SnapshotSpec, Volume, VolumeSpec};
use crate::error::{ControllerError, Result};
use crate::store::{SnapshotRecord, Store, VolumeRecord, VolumeState};

/// The label naming the volume a resource belongs to.
pub const VOLUME_LABEL: &str = "barnacle.dev/volume";

const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Records in one namespace of the Kubernetes API.
#[derive(Clone)]
pub struct KubeStore {
    volumes: Api<Volume>,
    snapshots: Api<Snapshot>,
    attachments: Api<Attachment>,
    rt: tokio::runtime::Handle,
}

impl std::fmt::Debug for KubeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeStore").finish_non_exhaustive()
    }
}

fn store_err(e: impl std::fmt::Display) -> ControllerError {
    ControllerError::Store(format!("Kubernetes API: {e}"))
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

fn meta(name: &str, volume_id: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        labels: Some([(VOLUME_LABEL.to_owned(), volume_id.to_owned())].into()),
        ..ObjectMeta::default()
    }
}

impl KubeStore {
    /// The store of `namespace`. Its calls block: make them from a blocking thread of `rt`.
    pub fn new(client: Client, namespace: &str, rt: tokio::runtime::Handle) -> KubeStore {
        KubeStore {
            volumes: Api::namespaced(client.clone(), namespace),
            snapshots: Api::namespaced(client.clone(), namespace),
            attachments: Api::namespaced(client, namespace),
            rt,
        }
    }

    fn block_on<T>(&self, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        self.rt.block_on(async {
            tokio::time::timeout(CALL_TIMEOUT, f).await.map_err(|_| store_err("no answer within 30 s"))?
        })
    }

    /// Creates the resource, or replaces its spec (re-reading on a conflict with a status write).
    async fn upsert<K>(api: &Api<K>, obj: K, set_spec: impl Fn(&mut K, &K)) -> Result<()>
    where
        K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let name = obj.meta().name.clone().unwrap_or_default();
        for _ in 0..20 {
            match api.get_opt(&name).await.map_err(store_err)? {
                None => match api.create(&PostParams::default(), &obj).await {
                    Ok(_) => return Ok(()),
                    Err(e) if is_status(&e, 409) => continue,
                    Err(e) => return Err(store_err(e)),
                },
                Some(mut cur) => {
                    set_spec(&mut cur, &obj);
                    match api.replace(&name, &PostParams::default(), &cur).await {
                        Ok(_) => return Ok(()),
                        Err(e) if is_status(&e, 409) => continue,
                        Err(e) => return Err(store_err(e)),
                    }
                }
            }
        }
        Err(store_err(format!("{name} kept changing while being written")))
    }

    async fn delete<K>(api: &Api<K>, name: &str) -> Result<()>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) => Err(store_err(e)),
        }
    }
}

impl Store for KubeStore {
    fn check(&self) -> Result<()> {
        self.block_on(async {
            self.volumes.list(&ListParams::default().limit(1)).await.map_err(store_err)?;
            Ok(())
        })
    }

    fn volume(&self, id: &str) -> Result<Option<VolumeRecord>> {
        self.block_on(async { Ok(self.volumes.get_opt(id).await.map_err(store_err)?.map(|v| v.spec.record)) })
    }

    fn volume_by_name(&self, name: &str) -> Result<Option<VolumeRecord>> {
        Ok(self.volumes()?.into_iter().find(|v| v.name == name && v.state != VolumeState::Deleted))
    }

    fn put_volume(&self, v: &VolumeRecord) -> Result<()> {
        self.block_on(async {
            let obj =
                Volume { metadata: meta(&v.id, &v.id), spec: VolumeSpec { record: v.clone() }, status: None };
            Self::upsert(&self.volumes, obj, |cur, new| cur.spec = new.spec.clone()).await?;
            match &v.attachment {
                Some(a) => {
                    let att = Attachment {
                        metadata: meta(&v.id, &v.id),
                        spec: AttachmentSpec {
                            volume_id: v.id.clone(),
                            node: a.node.clone(),
                            generation: a.generation,
                            readonly: a.readonly,
                            block: a.block,
                            access_mode: a.access_mode,
                        },
                        status: None,
                    };
                    Self::upsert(&self.attachments, att, |cur, new| cur.spec = new.spec.clone()).await
                }
                None => Self::delete(&self.attachments, &v.id).await,
            }
        })
    }

    fn delete_volume(&self, id: &str) -> Result<()> {
        self.block_on(async {
            Self::delete(&self.attachments, id).await?;
            Self::delete(&self.volumes, id).await
        })
    }

    fn volumes(&self) -> Result<Vec<VolumeRecord>> {
        self.block_on(async {
            let mut out: Vec<VolumeRecord> = self
                .volumes
                .list(&ListParams::default())
                .await
                .map_err(store_err)?
                .items
                .into_iter()
                .map(|v| v.spec.record)
                .collect();
            out.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(out)
        })
    }

    fn snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>> {
        self.block_on(async {
            Ok(self.snapshots.get_opt(id).await.map_err(store_err)?.map(|s| s.spec.record))
        })
    }

    fn snapshot_by_name(&self, name: &str) -> Result<Option<SnapshotRecord>> {
        Ok(self.snapshots()?.into_iter().find(|s| s.name == name))
    }

    fn put_snapshot(&self, s: &SnapshotRecord) -> Result<()> {
        self.block_on(async {
            let obj = Snapshot {
                metadata: meta(&s.id, &s.volume_id),
                spec: SnapshotSpec { record: s.clone() },
                status: None,
            };
            Self::upsert(&self.snapshots, obj, |cur, new| cur.spec = new.spec.clone()).await?;
            let status = serde_json::json!({ "status": { "ready": s.ready } });
            self.snapshots
                .patch_status(&s.id, &PatchParams::default(), &Patch::Merge(&status))
                .await
                .map_err(store_err)?;
            Ok(())
        })
    }

    fn delete_snapshot(&self, id: &str) -> Result<()> {
        self.block_on(Self::delete(&self.snapshots, id))
    }

    fn snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        self.block_on(async {
            let mut out: Vec<SnapshotRecord> = self
                .snapshots
                .list(&ListParams::default())
                .await
                .map_err(store_err)?
                .items
                .into_iter()
                .map(|s| s.spec.record)
                .collect();
            out.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(out)
        })
    }
}
