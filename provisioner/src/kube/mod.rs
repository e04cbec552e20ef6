//! The Kubernetes backend: instances are Deployments (+ Service + Ingress,
//! Route or HTTPRoute) created by server-side apply; their labels and
//! annotations are the only store.

pub mod activator;
pub mod ledger;
pub mod objects;
pub mod phase;
pub mod sleep;
pub mod watch;

pub use phase::{PodFailure, pod_failure};

use crate::backend::{Backend, ListFilter, NewInstance, Removed};
use crate::instance::{Instance, InstanceId, Phase, add, label_safe};
use crate::labels::*;
use crate::settings::{KubeSettings, RouteApis, RouteKind};
use crate::{Error, Result};
use async_trait::async_trait;
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use objects::{
    InstanceSpec, deployment, http_route, http_route_resource, ingress, instance_from,
    instance_from_deployment, owner_reference, route, route_refusal, route_resource, service,
};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// The route APIs the cluster serves: route.openshift.io, and
/// gateway.networking.k8s.io/v1 with its `httproutes` resource.
pub async fn served_route_apis(client: &Client) -> Result<RouteApis> {
    const GATEWAY_API: &str = "gateway.networking.k8s.io";
    let groups = client.list_api_groups().await?;
    let openshift_routes = groups.groups.iter().any(|g| g.name == "route.openshift.io");
    let gateway_v1 = groups
        .groups
        .iter()
        .any(|g| g.name == GATEWAY_API && g.versions.iter().any(|v| v.version == "v1"));
    let http_routes = gateway_v1
        && client
            .list_api_group_resources(&format!("{GATEWAY_API}/v1"))
            .await?
            .resources
            .iter()
            .any(|r| r.name == "httproutes");
    Ok(RouteApis {
        openshift_routes,
        http_routes,
    })
}

/// The route kind of `settings` on this cluster (see
/// [`KubeSettings::route_kind_for`]: `auto` resolved, a kind the cluster does
/// not serve refused), and what the cluster serves.
pub async fn resolve_route_kind(
    client: &Client,
    settings: &KubeSettings,
) -> Result<(RouteKind, RouteApis)> {
    let apis = served_route_apis(client).await?;
    Ok((settings.route_kind_for(apis)?, apis))
}

/// Instances on a Kubernetes or OpenShift cluster.
pub struct KubeBackend {
    settings: KubeSettings,
    route_kind: RouteKind,
    served: RouteApis,
    deployments: Api<Deployment>,
    services: Api<Service>,
    ingresses: Api<Ingress>,
    routes: Api<DynamicObject>,
    http_routes: Api<DynamicObject>,
    pods: Api<Pod>,
    /// Idle instances sleep (`flowgate serve --activator-listen` runs the
    /// sleeper): a per-instance `idle_after` is then accepted.
    sleeps: bool,
}

/// Progress of an `upgrade`.
#[derive(Debug, Clone)]
pub struct UpgradeStep {
    /// Instance.
    pub id: String,
    /// Position (1-based) and total.
    pub index: usize,
    /// Total instances.
    pub total: usize,
    /// Done, or what happened.
    pub outcome: std::result::Result<(), String>,
}

impl KubeBackend {
    /// Connects the backend; resolves `--route-kind auto` by asking the API
    /// whether route.openshift.io is served.
    pub async fn new(client: Client, settings: KubeSettings) -> Result<Self> {
        let (route_kind, served) = resolve_route_kind(&client, &settings).await?;
        let ns = settings.namespace.clone();
        Ok(Self {
            route_kind,
            served,
            deployments: Api::namespaced(client.clone(), &ns),
            services: Api::namespaced(client.clone(), &ns),
            ingresses: Api::namespaced(client.clone(), &ns),
            routes: Api::namespaced_with(client.clone(), &ns, &route_resource()),
            http_routes: Api::namespaced_with(client.clone(), &ns, &http_route_resource()),
            pods: Api::namespaced(client, &ns),
            settings,
            sleeps: false,
        })
    }

    /// Marks the backend as one whose idle instances sleep (a sleeper runs
    /// beside it).
    pub fn with_sleep(mut self) -> Self {
        self.sleeps = true;
        self
    }

    /// The route kind in use (auto resolved).
    pub fn route_kind(&self) -> RouteKind {
        self.route_kind
    }

    fn apply_params() -> PatchParams {
        PatchParams::apply(FIELD_MANAGER).force()
    }

    async fn managed_deployment(&self, id: &InstanceId) -> Result<Deployment> {
        match self.deployments.get_opt(&id.object_name()).await? {
            Some(d) if d.labels().get(MANAGED_BY).map(String::as_str) == Some(MANAGER) => Ok(d),
            _ => Err(Error::NotFound(id.to_string())),
        }
    }

    /// An id no object uses yet.
    async fn fresh_id(&self) -> Result<InstanceId> {
        for _ in 0..8 {
            let id = InstanceId::random();
            let name = id.object_name();
            if self.deployments.get_opt(&name).await?.is_none()
                && self.services.get_opt(&name).await?.is_none()
            {
                return Ok(id);
            }
        }
        Err(Error::Internal("could not find a free instance id".into()))
    }

    /// Why Gateways refuse the HTTPRoutes `selector` selects, by instance id
    /// (none unless instances get HTTPRoutes): one list, not one read each.
    async fn route_refusals(&self, selector: &str) -> Result<HashMap<String, String>> {
        if self.route_kind != RouteKind::Gateway {
            return Ok(HashMap::new());
        }
        let routes = self
            .http_routes
            .list(&ListParams::default().labels(selector))
            .await?;
        Ok(routes
            .items
            .iter()
            .filter_map(|r| Some((r.labels().get(INSTANCE)?.clone(), route_refusal(r)?)))
            .collect())
    }

    /// The instance's pods.
    async fn pods_of(&self, id: &InstanceId) -> Result<Vec<Pod>> {
        Ok(self
            .pods
            .list(&ListParams::default().labels(&format!("{INSTANCE}={id}")))
            .await?
            .items)
    }

    /// Rolls every instance to new images, `max_parallel` at a time, waiting
    /// for each rollout (unless `wait` is None) before the next batch.
    pub async fn upgrade(
        &self,
        mlflow_image: Option<&str>,
        adapter_image: Option<&str>,
        max_parallel: usize,
        wait: Option<Duration>,
        progress: &(dyn for<'s> Fn(&'s UpgradeStep) + Send + Sync),
    ) -> Result<Vec<UpgradeStep>> {
        let mut containers = Vec::new();
        let mut init = Vec::new();
        if let Some(image) = mlflow_image {
            containers.push(json!({"name": "mlflow", "image": image}));
        }
        if let Some(image) = adapter_image {
            containers.push(json!({"name": "adapter", "image": image}));
            init.push(json!({"name": "fetch", "image": image}));
        }
        if containers.is_empty() {
            return Err(Error::invalid(
                "images",
                "give --mlflow-image and/or --adapter-image",
            ));
        }
        let patch = json!({"spec": {"template": {"spec": {"containers": containers, "initContainers": init}}}});
        let list = self
            .deployments
            .list(&ListParams::default().labels(&managed_selector()))
            .await?;
        let total = list.items.len();
        let mut steps = Vec::new();
        for (batch_no, batch) in list.items.chunks(max_parallel.max(1)).enumerate() {
            let mut names = Vec::new();
            for d in batch {
                let name = d.name_any();
                self.deployments
                    .patch(&name, &PatchParams::default(), &Patch::Strategic(&patch))
                    .await?;
                names.push(name);
            }
            for (i, name) in names.iter().enumerate() {
                let outcome = match wait {
                    Some(timeout) => self.wait_rollout(name, timeout).await,
                    None => Ok(()),
                };
                let step = UpgradeStep {
                    id: name.trim_start_matches("mlflow-").to_owned(),
                    index: batch_no * max_parallel.max(1) + i + 1,
                    total,
                    outcome,
                };
                progress(&step);
                steps.push(step);
            }
        }
        Ok(steps)
    }

    async fn wait_rollout(&self, name: &str, timeout: Duration) -> std::result::Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let d = self
                .deployments
                .get(name)
                .await
                .map_err(|e| e.to_string())?;
            let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let status = d.status.unwrap_or_default();
            let observed =
                status.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0);
            if observed
                && status.updated_replicas.unwrap_or(0) == want
                && status.available_replicas.unwrap_or(0) == want
                && status.replicas.unwrap_or(0) == want
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "rollout not complete after {}",
                    humantime::format_duration(timeout)
                ));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[async_trait]
impl Backend for KubeBackend {
    fn schemes(&self) -> &'static [&'static str] {
        &["https", "http"]
    }
    fn sleeps(&self) -> bool {
        self.sleeps
    }

    async fn create(&self, new: NewInstance) -> Result<Instance> {
        let spec = InstanceSpec {
            id: self.fresh_id().await?,
            workload: new.workload.as_str().to_owned(),
            owner: new.owner,
            artifacts: new.artifacts,
            created_at: new.created_at,
            expires_at: new.expires_at,
            writes: new.writes,
            access: new.access,
            credentials: new.credentials,
            idle_after: new.idle_after,
            controller: None,
        };
        let name = spec.id.object_name();
        let params = Self::apply_params();
        // The Deployment first, marked `creating`: if anything after it fails
        // it is deleted (its children go with it), and if even that fails, gc
        // removes it once it has been `creating` for too long.
        let created = self
            .deployments
            .patch(
                &name,
                &params,
                &Patch::Apply(deployment(&spec, &self.settings, "creating")),
            )
            .await?;
        let children = async {
            let owner = owner_reference(&created)?;
            self.services
                .patch(&name, &params, &Patch::Apply(service(&spec, &owner)))
                .await?;
            match self.route_kind {
                RouteKind::Route => {
                    self.routes
                        .patch(
                            &name,
                            &params,
                            &Patch::Apply(route(&spec, &self.settings, &owner)),
                        )
                        .await?;
                }
                RouteKind::Gateway => {
                    self.http_routes
                        .patch(
                            &name,
                            &params,
                            &Patch::Apply(http_route(&spec, &self.settings, &owner)?),
                        )
                        .await?;
                }
                RouteKind::Ingress | RouteKind::Auto => {
                    self.ingresses
                        .patch(
                            &name,
                            &params,
                            &Patch::Apply(ingress(&spec, &self.settings, &owner)),
                        )
                        .await?;
                }
            }
            Ok::<_, Error>(
                self.deployments
                    .patch(
                        &name,
                        &params,
                        &Patch::Apply(deployment(&spec, &self.settings, "complete")),
                    )
                    .await?,
            )
        };
        match children.await {
            Ok(d) => instance_from_deployment(&d, Timestamp::now()),
            Err(e) => {
                if let Err(cleanup) = self
                    .deployments
                    .delete(&name, &DeleteParams::background())
                    .await
                {
                    tracing::warn!(%name, error = %cleanup, "could not remove the half-made instance; gc will");
                }
                Err(e)
            }
        }
    }

    async fn get(&self, id: &InstanceId) -> Result<Instance> {
        let d = self.managed_deployment(id).await?;
        let now = Timestamp::now();
        let mut instance = instance_from_deployment(&d, now)?;
        if instance.phase == Phase::Pending {
            instance = instance_from(&d, &self.pods_of(id).await?, now)?;
        }
        if self.route_kind == RouteKind::Gateway && instance.message.is_none() {
            let route = self.http_routes.get_opt(&id.object_name()).await?;
            instance.message = route.as_ref().and_then(route_refusal);
        }
        Ok(instance)
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Instance>> {
        let mut selector = managed_selector();
        if let Some(w) = &filter.workload {
            selector.push_str(&format!(",{WORKLOAD}={}", label_safe(w)));
        }
        if let Some(o) = &filter.owner {
            selector.push_str(&format!(",{OWNER}={}", label_safe(o)));
        }
        let now = Timestamp::now();
        let list = self
            .deployments
            .list(&ListParams::default().labels(&selector))
            .await?;
        let refusals = self.route_refusals(&selector).await?;
        let instances = list.items.iter().filter_map(|d| match instance_from_deployment(d, now) {
            Ok(mut i) => {
                if i.message.is_none() {
                    i.message = refusals.get(i.id.as_str()).cloned();
                }
                Some(i)
            }
            Err(e) => {
                tracing::warn!(name = ?d.metadata.name, error = %e, "skipping a malformed instance");
                None
            }
        });
        Ok(filter.apply(instances))
    }

    async fn delete(&self, id: &InstanceId) -> Result<()> {
        self.managed_deployment(id).await?;
        self.deployments
            .delete(&id.object_name(), &DeleteParams::background())
            .await?;
        Ok(())
    }

    async fn set_expiry(&self, id: &InstanceId, expires_at: Timestamp) -> Result<Instance> {
        self.managed_deployment(id).await?;
        let now = Timestamp::now();
        let patch = json!({"metadata": {"annotations": {ANN_EXPIRES_AT: expires_at.to_string()}}});
        let d = self
            .deployments
            .patch(
                &id.object_name(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        instance_from_deployment(&d, now)
    }

    /// Counts unexpired instances from object metadata only (no specs or
    /// statuses are read: this runs on every create).
    async fn count_live(&self, owner: Option<&str>) -> Result<usize> {
        let now = Timestamp::now();
        let mut selector = managed_selector();
        if let Some(o) = owner {
            selector.push_str(&format!(",{OWNER}={}", label_safe(o)));
        }
        let metas = self
            .deployments
            .list_metadata(&ListParams::default().labels(&selector))
            .await?;
        Ok(metas
            .items
            .iter()
            .filter(|m| {
                owner.is_none_or(|want| m.annotations().get(ANN_OWNER).is_some_and(|o| o == want))
            })
            .filter(|m| {
                m.annotations()
                    .get(ANN_EXPIRES_AT)
                    .and_then(|t| t.parse::<Timestamp>().ok())
                    .is_some_and(|t| t > now)
            })
            .count())
    }

    async fn gc(&self, dry_run: bool) -> Result<Vec<Removed>> {
        let now = Timestamp::now();
        let mut removed = Vec::new();
        let deployments = self
            .deployments
            .list(&ListParams::default().labels(&managed_selector()))
            .await?;
        // Every instance that has a Deployment: its other objects are not
        // orphans (those of Deployments removed below go with them).
        let live: HashSet<String> = deployments
            .items
            .iter()
            .filter_map(|d| d.labels().get(INSTANCE).cloned())
            .collect();
        for d in &deployments.items {
            let name = d.name_any();
            let ann = d.annotations();
            let expired = ann
                .get(ANN_EXPIRES_AT)
                .and_then(|t| t.parse::<Timestamp>().ok())
                .is_none_or(|t| t <= now);
            let stuck = ann.get(ANN_STATE).map(String::as_str) != Some("complete")
                && d.metadata
                    .creation_timestamp
                    .as_ref()
                    .is_some_and(|t| add(t.0, self.settings.stuck_after) <= now);
            let reason = if expired {
                "expired"
            } else if stuck {
                "half-made (creation never completed)"
            } else {
                continue;
            };
            if !dry_run {
                self.deployments
                    .delete(&name, &DeleteParams::background())
                    .await?;
            }
            removed.push(Removed {
                kind: "Deployment".into(),
                name,
                reason: reason.into(),
            });
        }
        // Leftovers whose Deployment is gone (the garbage collector removes
        // owned ones, but not objects that lost or never had their owner).
        let orphan = |labels: &std::collections::BTreeMap<String, String>| {
            !labels.get(INSTANCE).is_some_and(|i| live.contains(i))
        };
        let lp = ListParams::default().labels(&managed_selector());
        for s in self.services.list(&lp).await?.items {
            if orphan(s.labels()) {
                if !dry_run {
                    self.services
                        .delete(&s.name_any(), &DeleteParams::background())
                        .await?;
                }
                removed.push(Removed {
                    kind: "Service".into(),
                    name: s.name_any(),
                    reason: "no Deployment".into(),
                });
            }
        }
        for i in self.ingresses.list(&lp).await?.items {
            if orphan(i.labels()) {
                if !dry_run {
                    self.ingresses
                        .delete(&i.name_any(), &DeleteParams::background())
                        .await?;
                }
                removed.push(Removed {
                    kind: "Ingress".into(),
                    name: i.name_any(),
                    reason: "no Deployment".into(),
                });
            }
        }
        for (served, kind, api) in [
            (self.served.openshift_routes, "Route", &self.routes),
            (self.served.http_routes, "HTTPRoute", &self.http_routes),
        ] {
            if !served {
                continue;
            }
            for r in api.list(&lp).await?.items {
                if orphan(r.labels()) {
                    if !dry_run {
                        api.delete(&r.name_any(), &DeleteParams::background())
                            .await?;
                    }
                    removed.push(Removed {
                        kind: kind.into(),
                        name: r.name_any(),
                        reason: "no Deployment".into(),
                    });
                }
            }
        }
        Ok(removed)
    }
}
