//! Sleep and wake on Kubernetes, run by `flowgate serve --backend kubernetes
//! --activator-listen ADDR` (the API pods are the activator).
//!
//! **Activity.** Every tick the sleeper reads the adapter's `/metrics` at
//! each awake, serving instance's pod address: the last activity (a request
//! started or a response body ended) and whether a request or a response body
//! (a download, an event stream) is open now. The instances' NetworkPolicy
//! lets the API pods reach the adapter's port for this. Reading (rather than
//! the adapter reporting) keeps the instance pods without credentials or any
//! knowledge of the API; a missed read only puts off a sleep.
//!
//! **Sleep.** One merge patch of the Deployment, conditional on the
//! resourceVersion the decision was made on, so two API replicas cannot both
//! act on one state: [`ANN_SLEEP`] `sleeping` and zero replicas. Then the
//! Service selects the activator ([`service_target`]): the Ingress, Route or
//! HTTPRoute never changes.
//!
//! **The operator's instances** ([`Manager::Operator`], `flowgate operator
//! --activator-listen`): the same sleeper runs in the operator's pods, which
//! are then the activator. It patches only the Deployment; the reconcile
//! applies the Service's target and the replicas from the Deployment's sleep
//! state ([`crate::operator::reconcile`]), so no two writers own a field.
//!
//! **Wake** ([`Sleeper::wake`], on a page visit the instance's access gate
//! admits): `sleeping` → `waking` and one replica, in one conditional patch,
//! so of concurrent visits (to any replica) one wakes it. The `fetch` init
//! container fetches the store again and verifies its checksum; a store that
//! is gone or changed fails the instance like a launch. Once a pod is
//! available the Service is handed back and the annotation removed
//! ([`Sleeper::hand_back`]); every tick also hands back what a restarted API
//! left waking.

use super::objects::{ADAPTER_PORT, service_target};
use super::watch::Watch;
use crate::instance::{InstanceId, parse_idle_after};
use crate::labels::{
    ANN_EXPIRES_AT, ANN_IDLE_AFTER, ANN_SLEEP, ANN_STATE, FIELD_MANAGER, INSTANCE, MANAGED_BY,
    MANAGER, OPERATOR_FIELD_MANAGER, OPERATOR_MANAGER,
};
use crate::{Error, Result};
use futures_util::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The metrics page is a few kilobytes; more is not an adapter's.
const MAX_METRICS_BYTES: usize = 256 * 1024;
/// Instances read at once in a tick.
const READ_CONCURRENCY: usize = 16;
/// A wake followed by the replica that won it ends here (the next ticks go on).
const FOLLOW_WAKE_FOR: Duration = Duration::from_secs(15 * 60);

/// Whose instances a sleeper looks after, and so who points their Services.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Manager {
    /// `flowgate serve --backend kubernetes`: the sleeper points the Services.
    Provisioner,
    /// `flowgate operator`: its reconcile points them, from the sleep state.
    Operator,
}

impl Manager {
    /// The `app.kubernetes.io/managed-by` of its Deployments.
    pub fn label(self) -> &'static str {
        match self {
            Self::Provisioner => MANAGER,
            Self::Operator => OPERATOR_MANAGER,
        }
    }

    fn field_manager(self) -> &'static str {
        match self {
            Self::Provisioner => FIELD_MANAGER,
            Self::Operator => OPERATOR_FIELD_MANAGER,
        }
    }

    /// Whether the sleeper itself points the instances' Services.
    fn points_services(self) -> bool {
        self == Self::Provisioner
    }
}

/// How the sleeper works.
#[derive(Clone, Debug)]
pub struct SleepSettings {
    /// Whose instances these are.
    pub manager: Manager,
    /// The server's idle time (`--idle-after`); None: only instances given
    /// their own sleep.
    pub idle_after: Option<Duration>,
    /// The labels of the pods that run the activator (`--activator-selector`).
    pub activator: BTreeMap<String, String>,
    /// How often instances are looked at.
    pub tick: Duration,
    /// The bound on reading one adapter's metrics.
    pub read_timeout: Duration,
}

impl SleepSettings {
    /// For `manager`'s instances, sleeping after `idle_after` (None: only
    /// those given their own), woken through the pods `activator` selects:
    /// ticks of [`Self::tick_for`], a 3 s bound on reading an adapter.
    pub fn new(
        manager: Manager,
        idle_after: Option<Duration>,
        activator: BTreeMap<String, String>,
    ) -> Self {
        Self {
            manager,
            idle_after,
            activator,
            tick: Self::tick_for(idle_after),
            read_timeout: Duration::from_secs(3),
        }
    }

    /// `--activator-selector`: `key=value` pairs, comma-separated.
    pub fn parse_selector(raw: &str) -> Result<BTreeMap<String, String>> {
        let mut labels = BTreeMap::new();
        for pair in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .filter(|(k, v)| !k.is_empty() && label_ok(k) && label_ok(v))
                .ok_or_else(|| {
                    Error::invalid(
                        "activator-selector",
                        format!("{pair:?}: expected key=value (label syntax)"),
                    )
                })?;
            labels.insert(k.to_owned(), v.to_owned());
        }
        if labels.is_empty() {
            return Err(Error::invalid(
                "activator-selector",
                "give the labels of the pods that run the activator",
            ));
        }
        if labels.contains_key(INSTANCE) {
            return Err(Error::invalid(
                "activator-selector",
                format!("{INSTANCE} selects instance pods, not the activator's"),
            ));
        }
        Ok(labels)
    }

    /// The tick for an idle time: a quarter of it, between 1 s and 30 s.
    pub fn tick_for(idle_after: Option<Duration>) -> Duration {
        idle_after.map_or(Duration::from_secs(30), |d| {
            (d / 4).clamp(Duration::from_secs(1), Duration::from_secs(30))
        })
    }
}

/// A label key or value as a selector may hold it (the API server checks
/// the rest).
fn label_ok(s: &str) -> bool {
    s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
}

/// What an adapter's metrics say of its activity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Activity {
    /// Unix seconds of the last request start or response body end (the
    /// adapter's start before any).
    pub last: u64,
    /// A request or a response body is open now.
    pub busy: bool,
}

impl Activity {
    /// From the adapter's OpenMetrics text; None without the activity gauge.
    pub fn parse(text: &str) -> Option<Self> {
        let mut last = None;
        let mut busy = false;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let mut parts = line.split_whitespace();
            let (Some(name), Some(value)) = (parts.next(), parts.next()) else {
                continue;
            };
            let value: f64 = match value.parse() {
                Ok(v) if f64::is_finite(v) && v >= 0.0 => v,
                _ => continue,
            };
            match name {
                "flowgate_adapter_last_activity_timestamp_seconds" => last = Some(value as u64),
                "flowgate_adapter_open_response_bodies" | "flowgate_adapter_in_flight_requests" => {
                    busy |= value > 0.0
                }
                _ => {}
            }
        }
        Some(Self { last: last?, busy })
    }

    /// Idle for at least `after` at `now` (unix seconds).
    pub fn idle_for_at_least(&self, after: Duration, now: u64) -> bool {
        !self.busy && now.saturating_sub(self.last) >= after.as_secs()
    }
}

/// The idle time of the instance of `d`: its own ([`ANN_IDLE_AFTER`], `0`
/// never) or the server's.
pub fn idle_after_of(d: &Deployment, server: Option<Duration>) -> Option<Duration> {
    match d.annotations().get(ANN_IDLE_AFTER) {
        Some(own) => parse_idle_after(own).ok().filter(|d| !d.is_zero()),
        None => server,
    }
}

/// Where the instance of `d` is, for the sleeper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SleepState {
    /// Serving (or starting): a candidate for sleep once ready and idle.
    Awake,
    /// Scaled to zero; its Service selects the activator.
    Sleeping,
    /// Scaled up by a visit; its Service still selects the activator.
    Waking,
}

/// The sleep state recorded on `d`.
pub fn sleep_state(d: &Deployment) -> SleepState {
    match d.annotations().get(ANN_SLEEP).map(String::as_str) {
        Some("sleeping") => SleepState::Sleeping,
        Some("waking") => SleepState::Waking,
        _ => SleepState::Awake,
    }
}

/// What a wake asked for found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// This call woke it.
    Woken,
    /// Another visit (here or on another replica) already had.
    AlreadyWaking,
    /// It is not asleep (awake, expired or gone).
    NotAsleep,
}

/// Puts idle instances to sleep and wakes them.
pub struct Sleeper {
    deployments: Api<Deployment>,
    services: Api<Service>,
    watch: Arc<Watch>,
    settings: SleepSettings,
    http: reqwest::Client,
    /// Sleeping instances whose Service this process saw pointed at the
    /// activator (the rest are pointed there on the next tick).
    routed: Mutex<HashSet<String>>,
    /// Wakes this process made (of concurrent visits, only the one that woke).
    wakes: AtomicU64,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(r) if r.code == 409)
}

fn expired(d: &Deployment, now: Timestamp) -> bool {
    d.annotations()
        .get(ANN_EXPIRES_AT)
        .and_then(|t| t.parse::<Timestamp>().ok())
        .is_none_or(|t| t <= now)
}

fn available(d: &Deployment) -> bool {
    d.status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0)
        >= 1
}

/// When the instance of `d` last became available (its Deployment's
/// `Available` condition turning true), in unix seconds.
fn available_since(d: &Deployment) -> Option<u64> {
    d.status
        .as_ref()?
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Available" && c.status == "True")?
        .last_transition_time
        .as_ref()
        .map(|t| t.0.as_second().max(0) as u64)
}

/// The address of a ready pod's adapter.
fn adapter_address(pods: &[Pod]) -> Option<SocketAddr> {
    pods.iter().find_map(|p| {
        let status = p.status.as_ref()?;
        let ready = status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let ip: IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
        (ready && p.metadata.deletion_timestamp.is_none())
            .then_some(SocketAddr::new(ip, ADAPTER_PORT))
    })
}

impl Sleeper {
    /// A sleeper of `namespace`'s instances, reading them from `watch`.
    pub fn new(
        client: Client,
        namespace: &str,
        watch: Arc<Watch>,
        settings: SleepSettings,
    ) -> Result<Self> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(settings.read_timeout)
            .connect_timeout(settings.read_timeout)
            .build()
            .map_err(|e| Error::Internal(format!("metrics client: {e}")))?;
        Ok(Self {
            deployments: Api::namespaced(client.clone(), namespace),
            services: Api::namespaced(client, namespace),
            watch,
            settings,
            http,
            routed: Mutex::default(),
            wakes: AtomicU64::new(0),
        })
    }

    /// How many wakes this process made.
    pub fn wakes(&self) -> u64 {
        self.wakes.load(Ordering::Relaxed)
    }

    /// The watch the sleeper reads.
    pub fn watch(&self) -> &Arc<Watch> {
        &self.watch
    }

    /// Whether `d` is an instance this sleeper looks after: its manager's,
    /// and made in full.
    pub fn manages(&self, d: &Deployment) -> bool {
        d.labels().get(MANAGED_BY).map(String::as_str) == Some(self.settings.manager.label())
            && d.annotations().get(ANN_STATE).map(String::as_str) == Some("complete")
    }

    fn params(&self) -> PatchParams {
        PatchParams {
            field_manager: Some(self.settings.manager.field_manager().into()),
            ..Default::default()
        }
    }

    /// Looks at every instance once, then again every tick, for ever.
    pub fn spawn(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            self.watch.ready().await;
            let mut every = tokio::time::interval(self.settings.tick);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                self.tick().await;
            }
        })
    }

    /// One look at every instance: idle ones sleep, sleeping ones are routed
    /// to the activator, waking ones with a pod available are handed back.
    pub async fn tick(&self) {
        let now = Timestamp::now();
        let deployments: Vec<_> = self
            .watch
            .deployments()
            .into_iter()
            .filter(|d| self.manages(d) && !expired(d, now))
            .collect();
        // forget instances no longer asleep (deleted, expired, woken elsewhere)
        let asleep: HashSet<&str> = deployments
            .iter()
            .filter(|d| sleep_state(d) == SleepState::Sleeping)
            .filter_map(|d| d.labels().get(INSTANCE).map(String::as_str))
            .collect();
        self.routed
            .lock()
            .expect("routed lock")
            .retain(|id| asleep.contains(id.as_str()));
        futures_util::stream::iter(deployments)
            .for_each_concurrent(READ_CONCURRENCY, |d| async move {
                let Some(id) = d
                    .labels()
                    .get(INSTANCE)
                    .and_then(|i| InstanceId::parse(i).ok())
                else {
                    return;
                };
                let outcome = match sleep_state(&d) {
                    SleepState::Waking if available(&d) => self.hand_back(&id).await,
                    SleepState::Waking => Ok(()),
                    SleepState::Sleeping => self.route_to_activator(&id, false).await,
                    SleepState::Awake => self.sleep_if_idle(&id, &d).await.map(|_| ()),
                };
                if let Err(e) = outcome {
                    tracing::warn!(%id, error = %e, "sleep or wake");
                }
            })
            .await;
    }

    /// Reads the instance's activity and puts it to sleep when it has been
    /// idle long enough. True when it went to sleep.
    async fn sleep_if_idle(&self, id: &InstanceId, d: &Deployment) -> Result<bool> {
        let Some(after) = idle_after_of(d, self.settings.idle_after) else {
            return Ok(false);
        };
        if !available(d) {
            return Ok(false);
        }
        let Some(addr) = adapter_address(&self.watch.pods_of(id)) else {
            return Ok(false);
        };
        let activity = match self.activity(addr).await {
            Ok(a) => a,
            Err(why) => {
                // not read: not idle (an adapter that does not answer is
                // the kubelet's to restart, not ours to put to sleep)
                tracing::debug!(%id, %addr, %why, "activity not read");
                return Ok(false);
            }
        };
        // Idle time counts from the adapter's last activity, but not from
        // before the instance could be visited: an MLflow slower to start
        // than the idle time would otherwise sleep the moment it is ready.
        let activity = Activity {
            last: activity.last.max(available_since(d).unwrap_or(0)),
            ..activity
        };
        let now = Timestamp::now().as_second().max(0) as u64;
        if !activity.idle_for_at_least(after, now) {
            return Ok(false);
        }
        self.sleep(id, d).await
    }

    /// The adapter's activity at `addr`, within the read timeout.
    async fn activity(&self, addr: SocketAddr) -> std::result::Result<Activity, String> {
        let mut r = self
            .http
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            return Err(format!("status {}", r.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = r.chunk().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > MAX_METRICS_BYTES {
                return Err(format!("more than {MAX_METRICS_BYTES} bytes of metrics"));
            }
            body.extend_from_slice(&chunk);
        }
        Activity::parse(&String::from_utf8_lossy(&body))
            .ok_or_else(|| "no flowgate_adapter_last_activity_timestamp_seconds".to_owned())
    }

    /// Puts the instance of `d` to sleep unless, by the time the patch lands,
    /// it is no longer awake and serving (another replica or a visit acted):
    /// the patch is conditional on the resourceVersion it was decided on, and a
    /// conflict (a status update, most often) is decided again on a fresh
    /// read. True when it went to sleep.
    pub async fn sleep(&self, id: &InstanceId, d: &Deployment) -> Result<bool> {
        let mut version = d.resource_version();
        for _ in 0..3 {
            match self.set_sleep(id, version, "sleeping", 0).await {
                Ok(()) => {
                    tracing::info!(%id, "idle: sleeping (scaled to zero, its Service to select the activator)");
                    self.route_to_activator(id, true).await?;
                    return Ok(true);
                }
                Err(e) if is_conflict(&e) => {
                    let Some(now) = self.deployments.get_opt(&id.object_name()).await? else {
                        return Ok(false);
                    };
                    if sleep_state(&now) != SleepState::Awake || !available(&now) {
                        return Ok(false);
                    }
                    version = now.resource_version();
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(false)
    }

    /// Sets the sleep state and the replicas in one merge patch, conditional
    /// on `version` (a 409 when the Deployment changed since).
    async fn set_sleep(
        &self,
        id: &InstanceId,
        version: Option<String>,
        state: &str,
        replicas: i32,
    ) -> std::result::Result<(), kube::Error> {
        let patch = json!({
            "metadata": {"resourceVersion": version, "annotations": {ANN_SLEEP: state}},
            "spec": {"replicas": replicas},
        });
        self.deployments
            .patch(&id.object_name(), &self.params(), &Patch::Merge(&patch))
            .await
            .map(drop)
    }

    /// Points the Service at the activator (once per process unless `force`;
    /// the operator's reconcile does it for its instances).
    async fn route_to_activator(&self, id: &InstanceId, force: bool) -> Result<()> {
        if !self.settings.manager.points_services() {
            return Ok(());
        }
        if !force
            && self
                .routed
                .lock()
                .expect("routed lock")
                .contains(id.as_str())
        {
            return Ok(());
        }
        let patch = service_target(id, &self.settings.activator, true);
        self.services
            .patch(&id.object_name(), &self.params(), &Patch::Merge(&patch))
            .await?;
        self.routed
            .lock()
            .expect("routed lock")
            .insert(id.to_string());
        Ok(())
    }

    /// Wakes a sleeping instance: of concurrent calls (on any replica), one
    /// gets [`Wake::Woken`].
    pub async fn wake(&self, id: &InstanceId) -> Result<Wake> {
        for _ in 0..3 {
            let Some(d) = self.deployments.get_opt(&id.object_name()).await? else {
                return Ok(Wake::NotAsleep);
            };
            if !self.manages(&d) || expired(&d, Timestamp::now()) {
                return Ok(Wake::NotAsleep);
            }
            match sleep_state(&d) {
                SleepState::Awake => return Ok(Wake::NotAsleep),
                SleepState::Waking => return Ok(Wake::AlreadyWaking),
                SleepState::Sleeping => {}
            }
            match self.set_sleep(id, d.resource_version(), "waking", 1).await {
                Ok(()) => {
                    self.wakes.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%id, "woken by a visit: scaled to one, fetching its store again");
                    return Ok(Wake::Woken);
                }
                // changed under us: look again
                Err(e) if is_conflict(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Wake::AlreadyWaking)
    }

    /// Gives a woken instance its route back: the Service selects its pods
    /// again (for the operator's instances, its reconcile does on seeing the
    /// Deployment awake), then the Deployment is marked awake.
    pub async fn hand_back(&self, id: &InstanceId) -> Result<()> {
        if self.settings.manager.points_services() {
            let patch = service_target(id, &self.settings.activator, false);
            self.services
                .patch(&id.object_name(), &self.params(), &Patch::Merge(&patch))
                .await?;
            self.routed.lock().expect("routed lock").remove(id.as_str());
        }
        let patch = json!({"metadata": {"annotations": {ANN_SLEEP: null}}});
        self.deployments
            .patch(&id.object_name(), &self.params(), &Patch::Merge(&patch))
            .await?;
        tracing::info!(%id, "awake: its Service selects its pod again");
        Ok(())
    }

    /// After [`Wake::Woken`]: hands the route back as soon as a pod is
    /// available (the watch tells), instead of at the next tick. Gives up
    /// when the wake fails, the instance goes, or after a while.
    pub async fn follow_wake(self: Arc<Self>, id: InstanceId) {
        let mut changes = self.watch.changes();
        let follow = async {
            loop {
                match self.watch.deployment(&id) {
                    None => return,
                    Some(d) if sleep_state(&d) != SleepState::Waking => return,
                    Some(d) if available(&d) => {
                        if let Err(e) = self.hand_back(&id).await {
                            tracing::warn!(%id, error = %e, "handing the route back (the next tick retries)");
                        }
                        return;
                    }
                    Some(_) => {}
                }
                if self
                    .watch
                    .look(&id)
                    .is_some_and(|(i, _)| i.phase == crate::instance::Phase::Failed)
                {
                    return;
                }
                loop {
                    match changes.recv().await {
                        Ok(changed) if changed == id.as_str() => break,
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                }
            }
        };
        let _ = tokio::time::timeout(FOLLOW_WAKE_FOR, follow).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "# HELP flowgate_adapter_last_activity_timestamp_seconds x\n\
        # TYPE flowgate_adapter_last_activity_timestamp_seconds gauge\n\
        flowgate_adapter_last_activity_timestamp_seconds 1764000000\n\
        flowgate_adapter_in_flight_requests 0\n\
        flowgate_adapter_open_response_bodies 0\n\
        flowgate_adapter_requests_total{class=\"ui\",code=\"2xx\"} 12\n# EOF\n";

    #[test]
    fn activity_from_the_adapter_s_metrics() {
        let a = Activity::parse(METRICS).unwrap();
        assert_eq!(
            a,
            Activity {
                last: 1_764_000_000,
                busy: false
            }
        );
        let thirty_min = Duration::from_secs(1800);
        assert!(!a.idle_for_at_least(thirty_min, 1_764_000_000 + 1799));
        assert!(a.idle_for_at_least(thirty_min, 1_764_000_000 + 1800));
        // a clock behind the adapter's is not idle
        assert!(!a.idle_for_at_least(thirty_min, 1_763_000_000));
        // an open download or event stream keeps it awake however old the last start
        let open = METRICS.replace("open_response_bodies 0", "open_response_bodies 1");
        let a = Activity::parse(&open).unwrap();
        assert!(a.busy && !a.idle_for_at_least(thirty_min, u64::MAX));
        let in_flight = METRICS.replace("in_flight_requests 0", "in_flight_requests 2");
        assert!(Activity::parse(&in_flight).unwrap().busy);
        // hostile or foreign pages: no activity, so no sleep
        assert_eq!(Activity::parse("<html>not metrics</html>"), None);
        assert_eq!(
            Activity::parse("flowgate_adapter_last_activity_timestamp_seconds NaN\n"),
            None
        );
        assert_eq!(
            Activity::parse("flowgate_adapter_last_activity_timestamp_seconds -5\n"),
            None
        );
    }

    #[test]
    fn activator_selectors() {
        let labels = SleepSettings::parse_selector(
            "app.kubernetes.io/name=flowgate, app.kubernetes.io/component=api",
        )
        .unwrap();
        assert_eq!(labels.len(), 2);
        assert_eq!(labels["app.kubernetes.io/component"], "api");
        for bad in [
            "",
            "name",
            "=x",
            "a=b c",
            "flowgate.io/instance=k3x9q2a",
            "a=\"b\"",
        ] {
            assert!(SleepSettings::parse_selector(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ticks() {
        assert_eq!(SleepSettings::tick_for(None), Duration::from_secs(30));
        assert_eq!(
            SleepSettings::tick_for(Some(Duration::from_secs(1800))),
            Duration::from_secs(30)
        );
        assert_eq!(
            SleepSettings::tick_for(Some(Duration::from_secs(20))),
            Duration::from_secs(5)
        );
        assert_eq!(
            SleepSettings::tick_for(Some(Duration::from_secs(2))),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn idle_time_counts_from_when_the_instance_became_available() {
        let d: Deployment = serde_json::from_value(serde_json::json!({
            "status": {"conditions": [
                {"type": "Progressing", "status": "True", "lastTransitionTime": "2026-12-03T09:00:00Z"},
                {"type": "Available", "status": "True", "lastTransitionTime": "2026-12-03T09:11:40Z"},
            ]},
        }))
        .unwrap();
        let ready: u64 = "2026-12-03T09:11:40Z"
            .parse::<Timestamp>()
            .unwrap()
            .as_second() as u64;
        assert_eq!(available_since(&d), Some(ready));
        let unavailable: Deployment = serde_json::from_value(serde_json::json!({
            "status": {"conditions": [{"type": "Available", "status": "False", "lastTransitionTime": "2026-12-03T09:11:40Z"}]},
        }))
        .unwrap();
        assert_eq!(available_since(&unavailable), None);
        assert_eq!(available_since(&Deployment::default()), None);
    }

    #[test]
    fn own_idle_times() {
        let d = |ann: Option<&str>| {
            let mut d = Deployment::default();
            if let Some(v) = ann {
                d.metadata
                    .annotations
                    .get_or_insert_default()
                    .insert(ANN_IDLE_AFTER.into(), v.into());
            }
            d
        };
        let server = Some(Duration::from_secs(1800));
        assert_eq!(idle_after_of(&d(None), server), server);
        assert_eq!(idle_after_of(&d(Some("0")), server), None);
        assert_eq!(
            idle_after_of(&d(Some("2h")), None),
            Some(Duration::from_secs(7200))
        );
    }
}
