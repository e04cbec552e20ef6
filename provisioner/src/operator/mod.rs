//! `flowgate operator`: a controller for the `MlflowInstance` custom resource
//! ([`crd`]). Each resource is reconciled ([`reconcile`]) into the same
//! Deployment, Service and Ingress/Route/HTTPRoute the provisioner makes
//! (the route kind chosen by the same rule, [`KubeSettings::route_kind_for`]),
//! built by the
//! same functions ([`crate::kube::objects`]), all owned by the resource (so
//! deleting it cascades through the garbage collector) and server-side
//! applied with field manager `flowgate-operator`. Owned objects are watched,
//! so hand edits are put back; a resource is deleted when it expires.
//! Replicas elect a leader on a Lease ([`leader`]); metrics and `/healthz`
//! are served by [`metrics`]. With `--activator-listen` every replica also
//! runs the sleeper and the activator of [`crate::kube::sleep`]: idle
//! instances sleep, and their next visitor wakes them. [`backend`] is the CLI's and the API's way in
//! (`--backend operator`).
//!
//! ## The instance id
//!
//! The id is derived from the resource's uid: the sha256 of the uid, its first
//! byte mapped onto `a-z` and the next six onto `a-z0-9` (rehashed with a
//! counter in the unlikely case of `healthz`, `readyz` or `metrics`). It is
//! stable across operator restarts and needs no write before the objects are
//! made, any client can compute it from the uid the create returns, and
//! uids are unique; the operator still refuses to take over a Deployment of
//! that name it does not own. It is also published as `status.id` and the
//! label `flowgate.io/instance` on the resource.

pub mod backend;
pub mod crd;
pub mod leader;
pub mod metrics;
pub mod policy;
pub mod reconcile;

pub use crd::{MlflowInstance, MlflowInstanceSpec, MlflowInstanceStatus};

use crate::instance::InstanceId;
use crate::kube::objects::{http_route_resource, route_resource};
use crate::kube::resolve_route_kind;
use crate::labels::{MANAGED_BY, OPERATOR_MANAGER};
use crate::settings::{KubeSettings, RouteKind};
use crate::{Error, Result};
use futures_util::future::FusedFuture;
use futures_util::{FutureExt, StreamExt};
use kube::Client;
use kube::api::Api;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use leader::{HoldEnd, LeaderElector, LeaseSettings};
use metrics::Metrics;
use policy::CrdPolicy;
use reconcile::{Context, error_policy, reconcile};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The instance id of the resource with `uid` (see the module docs).
pub fn instance_id(uid: &str) -> InstanceId {
    const FIRST: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
    const REST: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    for attempt in 0u32.. {
        let digest = if attempt == 0 {
            Sha256::digest(uid.as_bytes())
        } else {
            Sha256::digest(format!("{uid}/{attempt}").as_bytes())
        };
        let mut id = String::with_capacity(7);
        id.push(FIRST[usize::from(digest[0]) % FIRST.len()] as char);
        for b in &digest[1..7] {
            id.push(REST[usize::from(*b) % REST.len()] as char);
        }
        if let Ok(id) = InstanceId::parse(&id) {
            return id;
        }
    }
    unreachable!("some attempt yields a valid id")
}

/// How the operator runs.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// Namespace (watched and where objects go), host, images, resources.
    pub settings: KubeSettings,
    /// Reconciles at once.
    pub concurrency: u16,
    /// This replica's name (Events' reporting instance, Lease holder).
    pub identity: String,
    /// Leader election; None: this replica reconciles at once, alone.
    pub leader_election: Option<LeaseSettings>,
    /// How soon an instance not Ready yet is looked at again.
    pub pending_recheck: Duration,
    /// What a resource may ask for (images, resources).
    pub policy: CrdPolicy,
    /// The labels of the pods that run the activator, which a sleeping
    /// instance's Service selects (`--activator-listen`); None: nothing sleeps.
    pub activator: Option<BTreeMap<String, String>>,
}

impl OperatorConfig {
    /// Defaults around `settings`: 16 reconciles at once, leader election on
    /// the Lease `flowgate-operator`, Pending instances rechecked every 15 s.
    pub fn new(settings: KubeSettings) -> Self {
        Self {
            settings,
            concurrency: 16,
            identity: default_identity(),
            leader_election: Some(LeaseSettings::default()),
            pending_recheck: Duration::from_secs(15),
            policy: CrdPolicy::default(),
            activator: None,
        }
    }
}

/// `$POD_NAME`, else the host name, plus a random suffix (two processes on
/// one host are two candidates).
pub fn default_identity() -> String {
    let host = std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "flowgate-operator".into());
    format!("{host}_{}", InstanceId::random())
}

/// Runs the operator until `shutdown` is cancelled: waits for the lead (when
/// electing), runs the controller while leading, steps down when the Lease
/// is lost and competes again; on shutdown lets running reconciles finish
/// and releases the Lease.
pub async fn run(
    client: Client,
    config: OperatorConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<()> {
    let (route_kind, _) = resolve_route_kind(&client, &config.settings).await?;
    let ns = config.settings.namespace.clone();
    let reporter = Reporter {
        controller: OPERATOR_MANAGER.into(),
        instance: Some(config.identity.clone()),
    };
    let ctx = Arc::new(Context {
        api: Api::namespaced(client.clone(), &ns),
        deployments: Api::namespaced(client.clone(), &ns),
        services: Api::namespaced(client.clone(), &ns),
        ingresses: Api::namespaced(client.clone(), &ns),
        routes: Api::namespaced_with(client.clone(), &ns, &route_resource()),
        http_routes: Api::namespaced_with(client.clone(), &ns, &http_route_resource()),
        pods: Api::namespaced(client.clone(), &ns),
        settings: config.settings.clone(),
        route_kind,
        recorder: Recorder::new(client.clone(), reporter),
        metrics: Arc::clone(&metrics),
        failures: Mutex::default(),
        pending_recheck: config.pending_recheck,
        policy: config.policy.clone(),
        activator: config.activator.clone(),
    });
    tracing::info!(namespace = %ns, identity = %config.identity, route_kind = ?route_kind, "operator starting");
    let Some(lease) = config.leader_election.clone() else {
        metrics.set_leader(true);
        run_controller(Arc::clone(&ctx), config.concurrency, shutdown.clone()).await;
        metrics.set_leader(false);
        return Ok(());
    };
    lease.check()?;
    let mut elector = LeaderElector::new(client, &ns, &config.identity, lease);
    loop {
        if !elector.acquire(&shutdown).await {
            return Ok(());
        }
        tracing::info!(identity = %elector.identity(), "leading: starting the controller");
        metrics.set_leader(true);
        let stop = shutdown.child_token();
        // Not spawned: dropping `run` (a crash, in tests) drops the controller too.
        let controller = run_controller(Arc::clone(&ctx), config.concurrency, stop.clone()).fuse();
        tokio::pin!(controller);
        let end = tokio::select! {
            biased;
            end = elector.hold(&shutdown) => Some(end),
            () = &mut controller => shutdown.is_cancelled().then_some(HoldEnd::Shutdown),
        };
        stop.cancel();
        if !controller.is_terminated() {
            controller.await;
        }
        metrics.set_leader(false);
        match end {
            Some(HoldEnd::Lost) => {
                tracing::warn!("lost the lead: the controller stopped; competing again");
            }
            Some(HoldEnd::Shutdown) => {
                elector.release().await;
                return Ok(());
            }
            None => {
                elector.release().await;
                metrics.set_unhealthy();
                return Err(Error::Internal("the controller stopped by itself".into()));
            }
        }
    }
}

/// The kube-runtime Controller: the resources and their Deployments, Services
/// and Ingresses, Routes or HTTPRoutes (an HTTPRoute's status, where its
/// Gateway accepts or refuses it, shows in the resource's). (A reconcile writes the status or labels only
/// when they change, so the watch events of its own writes end after one
/// more reconcile.)
async fn run_controller(ctx: Arc<Context>, concurrency: u16, stop: CancellationToken) {
    let ours = watcher::Config::default().labels(&format!("{MANAGED_BY}={OPERATOR_MANAGER}"));
    let mut controller = Controller::new(ctx.api.clone(), watcher::Config::default())
        .with_config(
            ControllerConfig::default()
                .concurrency(concurrency)
                .debounce(Duration::from_millis(500)),
        )
        .owns(ctx.deployments.clone(), ours.clone())
        .owns(ctx.services.clone(), ours.clone());
    controller = match ctx.route_kind {
        RouteKind::Route => controller.owns_with(ctx.routes.clone(), route_resource(), ours),
        RouteKind::Gateway => {
            controller.owns_with(ctx.http_routes.clone(), http_route_resource(), ours)
        }
        RouteKind::Ingress | RouteKind::Auto => controller.owns(ctx.ingresses.clone(), ours),
    };
    controller
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(name = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "controller"),
            }
        })
        .await;
    tracing::info!("controller stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_from_uids_are_stable_and_valid() {
        let uid = "0b6bb2a1-3c39-4c4e-9d7e-6b3f2f1f3a10";
        assert_eq!(instance_id(uid), instance_id(uid));
        assert_ne!(instance_id(uid), instance_id("another-uid"));
        let ids: std::collections::HashSet<_> = (0..5000)
            .map(|i| instance_id(&format!("uid-{i}")))
            .collect();
        assert_eq!(ids.len(), 5000);
        for id in ids {
            InstanceId::parse(id.as_str()).unwrap();
        }
    }
}
