//! What every backend (Kubernetes, operator, local) does: make, read, list
//! and remove the objects or processes of an instance. The rules (dedupe,
//! quotas, TTL bounds, owners, events) are the service's
//! ([`crate::service::Provisioner`]).

use crate::Result;
use crate::events::EventLog;
use crate::instance::{Access, Artifacts, Instance, InstanceId, Workload};
use async_trait::async_trait;
use jiff::Timestamp;

/// An instance to make, checked by the service.
#[derive(Debug, Clone)]
pub struct NewInstance {
    /// The job or task id.
    pub workload: Workload,
    /// Who asked.
    pub owner: String,
    /// The artefacts.
    pub artifacts: Artifacts,
    /// Now.
    pub created_at: Timestamp,
    /// When it is removed.
    pub expires_at: Timestamp,
    /// Let visitors write through the adapter (default: read-only).
    pub writes: bool,
    /// Who may open it.
    pub access: Access,
    /// The credentials set its fetch uses (granted by the service).
    pub credentials: Option<String>,
    /// Its own idle time before sleeping (zero: never); none: the backend's.
    pub idle_after: Option<std::time::Duration>,
}

/// Which instances to list.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only this workload.
    pub workload: Option<String>,
    /// Only this owner.
    pub owner: Option<String>,
}

impl ListFilter {
    /// The instances that match, oldest first (ties by id).
    pub fn apply(&self, instances: impl IntoIterator<Item = Instance>) -> Vec<Instance> {
        let mut out: Vec<Instance> = instances
            .into_iter()
            .filter(|i| self.workload.as_deref().is_none_or(|w| i.workload == w))
            .filter(|i| self.owner.as_deref().is_none_or(|o| i.owner == o))
            .collect();
        out.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        out
    }
}

/// One thing `gc` removed (or would remove, on a dry run).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Removed {
    /// Object kind (Deployment, Service, Ingress, Route, process).
    pub kind: String,
    /// Object name.
    pub name: String,
    /// Why.
    pub reason: String,
}

/// The objects or processes of instances.
#[async_trait]
pub trait Backend: Send + Sync {
    /// URL schemes this backend can fetch artefacts from.
    fn schemes(&self) -> &'static [&'static str];
    /// Whether it puts idle instances to sleep (and so honours `idle_after`).
    fn sleeps(&self) -> bool {
        false
    }
    /// The live event log of an instance's launch, where the backend keeps one.
    fn event_log(&self, _id: &InstanceId) -> Option<EventLog> {
        None
    }

    /// Makes an instance (no checks: the service made them).
    async fn create(&self, new: NewInstance) -> Result<Instance>;
    /// One instance.
    async fn get(&self, id: &InstanceId) -> Result<Instance>;
    /// Instances matching `filter`.
    async fn list(&self, filter: &ListFilter) -> Result<Vec<Instance>>;
    /// Deletes an instance and everything it owns.
    async fn delete(&self, id: &InstanceId) -> Result<()>;
    /// Sets the expiry.
    async fn set_expiry(&self, id: &InstanceId, expires_at: Timestamp) -> Result<Instance>;
    /// Removes expired instances and leftovers.
    async fn gc(&self, dry_run: bool) -> Result<Vec<Removed>>;

    /// How many instances (of `owner`, or of everyone) are live, for quotas.
    async fn count_live(&self, owner: Option<&str>) -> Result<usize> {
        let all = self
            .list(&ListFilter {
                workload: None,
                owner: owner.map(str::to_owned),
            })
            .await?;
        Ok(all.iter().filter(|i| i.phase.is_live()).count())
    }
}
