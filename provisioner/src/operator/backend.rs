//! `--backend operator`: the [`Backend`] operations done through
//! `MlflowInstance` resources. Create makes a resource (`generateName:
//! mli-`, a ttl, labels to find it by), the operator does the rest; get and
//! list read the resources and their status; extend sets `expiresAt`; delete
//! deletes the resource (the garbage collector removes its objects); gc
//! deletes the expired ones the operator has not (when it is down).

use super::crd::{ArtifactsSource, MlflowInstance, MlflowInstanceSpec};
use super::instance_id;
use crate::backend::{Backend, ListFilter, NewInstance, Removed};
use crate::instance::{Artifacts, Instance, InstanceId, Phase, parse_idle_after, show_idle_after};
use crate::labels::{ARTIFACTS_DIGEST, INSTANCE, OWNER, WORKLOAD, digest_label};
use crate::settings::KubeSettings;
use crate::{Error, Result};
use async_trait::async_trait;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

/// The field manager of the backend's writes.
const FIELD_MANAGER: &str = "flowgate";

/// Instances as `MlflowInstance` resources, for the operator to reconcile.
pub struct OperatorBackend {
    api: Api<MlflowInstance>,
    settings: KubeSettings,
}

/// A duration as the CRD's ttl wants it (Go syntax, whole seconds).
pub fn go_duration(d: Duration) -> String {
    let s = d.as_secs().max(1);
    if s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// An `idle_after` as the CRD's `idleAfter` wants it: `0` or a Go duration.
pub fn go_idle_after(d: Duration) -> String {
    if d.is_zero() {
        "0".into()
    } else {
        go_duration(d)
    }
}

/// Reads an instance from its resource (the id from the uid; the expiry from
/// the spec, so an extension shows at once; phase, URL and message from the
/// status, Pending and the URL `settings` would give until the operator
/// writes one).
pub fn instance_from_resource(
    r: &MlflowInstance,
    settings: &KubeSettings,
    now: Timestamp,
) -> Result<Instance> {
    let uid =
        r.metadata.uid.as_deref().ok_or_else(|| {
            Error::Internal(format!("MlflowInstance {} has no uid", r.name_any()))
        })?;
    let id = instance_id(uid);
    let created_at = r.metadata.creation_timestamp.as_ref().map_or(now, |t| t.0);
    let expires_at = r.expires_at().unwrap_or(created_at);
    let status = r.status_or_default();
    let phase = if expires_at <= now {
        Phase::Expired
    } else {
        status.phase.unwrap_or(Phase::Pending)
    };
    Ok(Instance {
        url: status.url.clone().unwrap_or_else(|| settings.url_for(&id)),
        id,
        workload: r.spec.workload.clone(),
        owner: r.spec.owner.clone(),
        artifacts: Artifacts {
            url: r.spec.artifacts.url.clone(),
            sha256: r.spec.artifacts.sha256.clone(),
        },
        created_at,
        expires_at,
        phase,
        message: status.message,
        writes: r.spec.writes,
        access: r.spec.access,
        access_url: None,
        credentials: r.spec.credentials.clone(),
        idle_after: r
            .spec
            .idle_after
            .as_deref()
            .and_then(|raw| parse_idle_after(raw).ok())
            .map(show_idle_after),
    })
}

impl OperatorBackend {
    /// The backend for the namespace in `settings` (where the operator runs).
    pub fn new(client: Client, settings: KubeSettings) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
        }
    }

    async fn all(&self) -> Result<Vec<MlflowInstance>> {
        Ok(self.api.list(&ListParams::default()).await?.items)
    }

    /// The resource of instance `id`: by its label, else (not labelled by the
    /// operator yet) by computing every resource's id.
    async fn find(&self, id: &InstanceId) -> Result<MlflowInstance> {
        let labelled = self
            .api
            .list(&ListParams::default().labels(&format!("{INSTANCE}={id}")))
            .await?
            .items;
        let candidates = if labelled.is_empty() {
            self.all().await?
        } else {
            labelled
        };
        candidates
            .into_iter()
            .find(|r| r.metadata.uid.as_deref().map(instance_id).as_ref() == Some(id))
            .ok_or_else(|| Error::NotFound(id.to_string()))
    }

    fn to_instances(&self, resources: &[MlflowInstance], now: Timestamp) -> Vec<Instance> {
        resources
            .iter()
            .filter(|r| r.metadata.deletion_timestamp.is_none())
            .filter_map(|r| match instance_from_resource(r, &self.settings, now) {
                Ok(i) => Some(i),
                Err(e) => {
                    tracing::warn!(name = %r.name_any(), error = %e, "skipping a resource");
                    None
                }
            })
            .collect()
    }
}

#[async_trait]
impl Backend for OperatorBackend {
    fn schemes(&self) -> &'static [&'static str] {
        &["https", "http"]
    }

    /// The operator decides: one without an activator refuses a resource's
    /// `idleAfter` (the instance fails and says why).
    fn sleeps(&self) -> bool {
        true
    }

    async fn create(&self, request: NewInstance) -> Result<Instance> {
        let ttl = request
            .expires_at
            .duration_since(request.created_at)
            .unsigned_abs();
        let labels = BTreeMap::from([
            (WORKLOAD.to_owned(), request.workload.label_value()),
            (
                OWNER.to_owned(),
                crate::instance::label_safe(&request.owner),
            ),
            (
                ARTIFACTS_DIGEST.to_owned(),
                digest_label(&request.artifacts.sha256).to_owned(),
            ),
        ]);
        let resource = MlflowInstance {
            metadata: ObjectMeta {
                generate_name: Some("mli-".into()),
                labels: Some(labels),
                ..Default::default()
            },
            spec: MlflowInstanceSpec {
                workload: request.workload.as_str().to_owned(),
                owner: request.owner.clone(),
                artifacts: ArtifactsSource {
                    url: request.artifacts.url.clone(),
                    sha256: request.artifacts.sha256.clone(),
                },
                ttl: Some(go_duration(ttl)),
                expires_at: None,
                image: None,
                resources: None,
                writes: request.writes,
                access: request.access,
                credentials: request.credentials.clone(),
                idle_after: request.idle_after.map(go_idle_after),
            },
            status: None,
        };
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let created = self.api.create(&params, &resource).await?;
        instance_from_resource(&created, &self.settings, Timestamp::now())
    }

    async fn get(&self, id: &InstanceId) -> Result<Instance> {
        let r = self.find(id).await?;
        instance_from_resource(&r, &self.settings, Timestamp::now())
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Instance>> {
        Ok(filter.apply(self.to_instances(&self.all().await?, Timestamp::now())))
    }

    async fn delete(&self, id: &InstanceId) -> Result<()> {
        let r = self.find(id).await?;
        match self
            .api
            .delete(&r.name_any(), &DeleteParams::background())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Err(Error::NotFound(id.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    async fn set_expiry(&self, id: &InstanceId, expires_at: Timestamp) -> Result<Instance> {
        let r = self.find(id).await?;
        let now = Timestamp::now();
        // Merge patch: `ttl: null` removes it (the CRD wants exactly one).
        let patch = json!({"spec": {"ttl": null, "expiresAt": Time(expires_at)}});
        let r = self
            .api
            .patch(
                &r.name_any(),
                &PatchParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                },
                &Patch::Merge(&patch),
            )
            .await?;
        instance_from_resource(&r, &self.settings, now)
    }

    async fn gc(&self, dry_run: bool) -> Result<Vec<Removed>> {
        let now = Timestamp::now();
        let mut removed = Vec::new();
        for r in self.all().await? {
            if r.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let Some(expires_at) = r.expires_at() else {
                continue;
            };
            if expires_at > now {
                continue;
            }
            if !dry_run {
                match self
                    .api
                    .delete(&r.name_any(), &DeleteParams::background())
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            removed.push(Removed {
                kind: "MlflowInstance".into(),
                name: r.name_any(),
                reason: "expired".into(),
            });
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_are_go_durations() {
        assert_eq!(go_duration(Duration::from_secs(86400)), "24h");
        assert_eq!(go_duration(Duration::from_secs(5400)), "90m");
        assert_eq!(go_duration(Duration::from_secs(61)), "61s");
        for s in ["24h", "90m", "61s"] {
            humantime::parse_duration(s).unwrap();
        }
        assert_eq!(
            humantime::parse_duration("1h30m").unwrap(),
            Duration::from_secs(5400)
        );
    }

    #[test]
    fn idle_times_go_both_ways() {
        for (d, raw) in [(0, "0"), (1800, "30m"), (7200, "2h"), (90, "90s")] {
            let d = Duration::from_secs(d);
            assert_eq!(go_idle_after(d), raw);
            assert_eq!(parse_idle_after(raw).unwrap(), d);
        }
    }
}
