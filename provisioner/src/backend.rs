//! The lifecycle every backend offers (Kubernetes, local). The CLI and the
//! REST API call only this.

use crate::Result;
use crate::events::EventLog;
use crate::instance::{CreateRequest, Instance, InstanceId, Phase, TtlPolicy};
use async_trait::async_trait;
use std::time::{Duration, Instant};

/// The result of a create.
#[derive(Debug, Clone)]
pub struct Created {
    /// The instance (new, or the live one for the same workload and artefacts).
    pub instance: Instance,
    /// False when an existing instance was returned.
    pub created: bool,
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

/// Instance lifecycle operations.
#[async_trait]
pub trait Backend: Send + Sync {
    /// URL schemes this backend can fetch artefacts from.
    fn allowed_schemes(&self) -> &'static [&'static str];
    /// TTL bounds.
    fn ttl_policy(&self) -> TtlPolicy;
    /// The live event log of an instance's launch, where the backend keeps one.
    fn event_log(&self, _id: &InstanceId) -> Option<EventLog> {
        None
    }

    /// Creates an instance, or returns the live one for the same workload and checksum.
    async fn create(&self, request: CreateRequest) -> Result<Created>;
    /// One instance.
    async fn get(&self, id: &InstanceId) -> Result<Instance>;
    /// Instances matching `filter`.
    async fn list(&self, filter: &ListFilter) -> Result<Vec<Instance>>;
    /// Deletes an instance and everything it owns.
    async fn delete(&self, id: &InstanceId) -> Result<()>;
    /// Pushes the expiry `ttl` further (from the current expiry, or now if past).
    async fn extend(&self, id: &InstanceId, ttl: Duration) -> Result<Instance>;
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
        Ok(all
            .iter()
            .filter(|i| matches!(i.phase, Phase::Pending | Phase::Ready))
            .count())
    }

    /// Waits until the instance is Ready (or Failed, or the timeout passes),
    /// calling `progress` whenever the phase or message changes.
    async fn wait_ready(
        &self,
        id: &InstanceId,
        timeout: Duration,
        progress: &(dyn for<'i> Fn(&'i Instance) + Send + Sync),
    ) -> Result<Instance> {
        let deadline = Instant::now() + timeout;
        let mut last: Option<(Phase, Option<String>)> = None;
        loop {
            let instance = self.get(id).await?;
            let now = (instance.phase, instance.message.clone());
            if last.as_ref() != Some(&now) {
                progress(&instance);
                last = Some(now);
            }
            match instance.phase {
                Phase::Ready => return Ok(instance),
                Phase::Failed | Phase::Expired => {
                    return Err(crate::Error::Failed {
                        id: id.to_string(),
                        reason: instance
                            .message
                            .unwrap_or_else(|| instance.phase.to_string()),
                    });
                }
                Phase::Pending => {}
            }
            if Instant::now() >= deadline {
                return Err(crate::Error::Timeout(format!(
                    "instance {id} not ready after {}",
                    humantime::format_duration(timeout)
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
