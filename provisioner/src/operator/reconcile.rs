//! One reconcile of an `MlflowInstance`: validate the spec, delete it when
//! expired, else server-side apply its Deployment, Service and
//! Ingress/Route/HTTPRoute (built by [`crate::kube::objects`], owned by the
//! resource) and write the status, with Events on transitions. Errors go to the status and are
//! retried with exponential backoff.
//!
//! **Sleep.** The sleeper ([`crate::kube::sleep`], in the operator's pods)
//! records an idle instance's sleep on its Deployment (annotation and zero
//! replicas, one patch). The reconcile applies what that state asks for: the
//! replicas (none asleep, one awake or waking) and the Service's target (the
//! activator's pods while asleep or waking, the instance's own once awake).
//! The Deployment's apply is conditional on the resourceVersion the state
//! was read from, so an apply never undoes a sleep or a wake it did not see.

use super::crd::{MlflowInstance, MlflowInstanceStatus};
use super::instance_id;
use super::metrics::Metrics;
use super::policy::CrdPolicy;
use crate::instance::{
    Artifacts, InstanceId, Phase, TtlPolicy, Workload, label_safe, parse_idle_after, validate_owner,
};
use crate::kube::objects::{
    InstanceSpec, deployment, http_route, ingress, route, route_refusal, service, sleeping_service,
};
use crate::kube::phase::{Fetch, Observed, observe, progress_message};
use crate::kube::sleep::{SleepState, sleep_state};
use crate::labels::{
    ANN_SLEEP, ARTIFACTS_DIGEST, INSTANCE, OPERATOR_FIELD_MANAGER, OWNER, WORKLOAD, digest_label,
};
use crate::settings::{KubeSettings, RouteKind};
use crate::{Error, Result};
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use rand::Rng;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Condition: the instance serves.
pub const READY: &str = "Ready";
/// Condition: the `fetch` init container downloaded the archive and its sha256 matched.
pub const ARTEFACTS_VERIFIED: &str = "ArtefactsVerified";
/// Condition: the instance is past its expiry.
pub const EXPIRED: &str = "Expired";

/// Even with no event, every instance is looked at this often.
const RESYNC: Duration = Duration::from_secs(600);
/// Backoff after errors: 1 s, 2 s, 4 s ... up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// What every reconcile shares.
pub(crate) struct Context {
    pub(crate) api: Api<MlflowInstance>,
    pub(crate) deployments: Api<Deployment>,
    pub(crate) services: Api<Service>,
    pub(crate) ingresses: Api<Ingress>,
    pub(crate) routes: Api<DynamicObject>,
    pub(crate) http_routes: Api<DynamicObject>,
    pub(crate) pods: Api<Pod>,
    pub(crate) settings: KubeSettings,
    pub(crate) route_kind: RouteKind,
    pub(crate) recorder: Recorder,
    pub(crate) metrics: Arc<Metrics>,
    /// Consecutive failures per resource uid, for the backoff.
    pub(crate) failures: Mutex<HashMap<String, u32>>,
    /// How soon a Pending instance is looked at again (pod failures do not
    /// always change the Deployment).
    pub(crate) pending_recheck: Duration,
    /// What a resource may ask for.
    pub(crate) policy: CrdPolicy,
    /// The labels of the pods that run the activator (`--activator-listen`),
    /// which a sleeping instance's Service selects; None: nothing sleeps.
    pub(crate) activator: Option<BTreeMap<String, String>>,
}

fn key(obj: &MlflowInstance) -> String {
    obj.metadata.uid.clone().unwrap_or_else(|| obj.name_any())
}

/// The reconciler given to the Controller.
pub(crate) async fn reconcile(obj: Arc<MlflowInstance>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_inner(&obj, &ctx).await;
    ctx.metrics
        .observe(started.elapsed().as_secs_f64(), result.is_err());
    match &result {
        Ok(_) => {
            ctx.failures
                .lock()
                .expect("not poisoned")
                .remove(&key(&obj));
        }
        Err(e) => {
            tracing::warn!(name = %obj.name_any(), error = %e, "reconcile failed");
            report_error(&obj, &ctx, e).await;
        }
    }
    result
}

/// Exponential backoff per resource, with jitter.
pub(crate) fn error_policy(obj: Arc<MlflowInstance>, _error: &Error, ctx: Arc<Context>) -> Action {
    let n = {
        let mut failures = ctx.failures.lock().expect("not poisoned");
        let n = failures.entry(key(&obj)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    Action::requeue(backoff(n))
}

/// The delay after the `n`th consecutive failure (n >= 1).
pub(crate) fn backoff(n: u32) -> Duration {
    let base = Duration::from_secs(1)
        .saturating_mul(1u32 << n.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    base.mul_f64(rand::rng().random_range(0.9..1.1))
}

/// The spec, checked as the CLI and the API check theirs.
#[derive(Clone)]
struct Checked {
    workload: String,
    owner: String,
    artifacts: Artifacts,
    expires_at: Timestamp,
    /// The credentials Secret, granted by the operator's rules.
    credentials: Option<String>,
    /// `idleAfter` (zero: never); None: the operator's.
    idle_after: Option<Duration>,
}

/// The spec checked, with the expiry capped by `ttl`.
fn check(obj: &MlflowInstance, ttl: &TtlPolicy) -> std::result::Result<Checked, String> {
    let spec = &obj.spec;
    let workload = Workload::parse(&spec.workload).map_err(|e| e.to_string())?;
    let owner = validate_owner(&spec.owner).map_err(|e| e.to_string())?;
    let artifacts = Artifacts::validated(
        &spec.artifacts.url,
        &spec.artifacts.sha256,
        &["https", "http"],
    )
    .map_err(|e| e.to_string())?;
    let expires_at = match (&spec.ttl, &spec.expires_at) {
        (Some(_), Some(_)) | (None, None) => {
            return Err("give exactly one of ttl and expiresAt".into());
        }
        _ => obj
            .expires_at()
            .ok_or_else(|| format!("invalid ttl {:?}", spec.ttl.as_deref().unwrap_or("")))?,
    };
    // Nobody keeps an instance longer than the operator allows, whatever the
    // spec says.
    let created = obj
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or_else(Timestamp::now, |t| t.0);
    let expires_at = ttl.capped(created, expires_at);
    let idle_after = spec
        .idle_after
        .as_deref()
        .map(parse_idle_after)
        .transpose()
        .map_err(|e| format!("idleAfter: {e}"))?;
    Ok(Checked {
        workload: workload.as_str().to_owned(),
        owner,
        artifacts,
        expires_at,
        credentials: None,
        idle_after,
    })
}

fn condition(type_: &str, status: bool, reason: &str, message: impl Into<String>) -> Condition {
    condition3(
        type_,
        if status { "True" } else { "False" },
        reason,
        message,
    )
}

fn condition3(type_: &str, status: &str, reason: &str, message: impl Into<String>) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: Time(Timestamp::now()),
        observed_generation: None,
    }
}

/// `new` conditions, keeping the transition time of those whose status did
/// not change; conditions of other types in `old` stay.
fn merge_conditions(
    old: &[Condition],
    new: Vec<Condition>,
    generation: Option<i64>,
) -> Vec<Condition> {
    let mut out: Vec<Condition> = old
        .iter()
        .filter(|o| !new.iter().any(|n| n.type_ == o.type_))
        .cloned()
        .collect();
    for mut c in new {
        if let Some(prev) = old.iter().find(|o| o.type_ == c.type_)
            && prev.status == c.status
        {
            c.last_transition_time = prev.last_transition_time.clone();
        }
        c.observed_generation = generation;
        out.push(c);
    }
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

async fn write_status(
    ctx: &Context,
    obj: &MlflowInstance,
    status: &MlflowInstanceStatus,
) -> Result<()> {
    if obj.status.as_ref() == Some(status) {
        return Ok(());
    }
    let body = json!({
        "apiVersion": super::crd::API_VERSION,
        "kind": super::crd::KIND,
        "status": status,
    });
    ctx.api
        .patch_status(
            &obj.name_any(),
            &PatchParams::apply(OPERATOR_FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
    Ok(())
}

async fn publish(
    ctx: &Context,
    obj: &MlflowInstance,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        tracing::warn!(name = %obj.name_any(), error = %e, "cannot publish an event");
    }
}

/// Puts a reconcile error into the status (Ready=False, reason
/// ReconcileError; the phase stays) and publishes it as a Warning event.
async fn report_error(obj: &MlflowInstance, ctx: &Context, error: &Error) {
    let old = obj.status_or_default();
    let message = match error {
        Error::Kube(kube::Error::Api(s)) => format!("kubernetes API: {} ({})", s.message, s.code),
        other => other.to_string(),
    };
    let mut status = old.clone();
    if status.id.is_none() {
        status.id = obj
            .metadata
            .uid
            .as_deref()
            .map(|uid| instance_id(uid).to_string());
    }
    status.phase = Some(old.phase.unwrap_or(Phase::Pending));
    status.message = Some(message.clone());
    status.conditions = merge_conditions(
        &old.conditions,
        vec![condition(READY, false, "ReconcileError", &message)],
        obj.metadata.generation,
    );
    if let Err(e) = write_status(ctx, obj, &status).await {
        tracing::debug!(name = %obj.name_any(), error = %e, "cannot write the error into the status");
    }
    if old.message.as_deref() != Some(message.as_str()) {
        publish(ctx, obj, EventType::Warning, "ReconcileError", message).await;
    }
}

/// The labels the operator keeps on the resource (to select by instance,
/// workload, owner or artefacts).
fn resource_labels(obj: &MlflowInstance, id: &InstanceId) -> BTreeMap<String, String> {
    BTreeMap::from([
        (INSTANCE.to_owned(), id.to_string()),
        (WORKLOAD.to_owned(), label_safe(&obj.spec.workload)),
        (OWNER.to_owned(), label_safe(&obj.spec.owner)),
        (
            ARTIFACTS_DIGEST.to_owned(),
            label_safe(digest_label(&obj.spec.artifacts.sha256)),
        ),
    ])
}

async fn ensure_labels(obj: &MlflowInstance, ctx: &Context, id: &InstanceId) -> Result<()> {
    let want = resource_labels(obj, id);
    let have = obj.labels();
    if want.iter().all(|(k, v)| have.get(k) == Some(v)) {
        return Ok(());
    }
    let body = json!({
        "apiVersion": super::crd::API_VERSION,
        "kind": super::crd::KIND,
        "metadata": {"name": obj.name_any(), "labels": want},
    });
    ctx.api
        .patch(
            &obj.name_any(),
            &PatchParams::apply(OPERATOR_FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
    Ok(())
}

/// Marks the resource Expired, says so in an Event, and deletes it (its
/// objects go with it through the garbage collector).
async fn expire(
    obj: &MlflowInstance,
    ctx: &Context,
    id: &InstanceId,
    expires_at: Timestamp,
) -> Result<Action> {
    let old = obj.status_or_default();
    let when = format!("expired at {expires_at}");
    let status = MlflowInstanceStatus {
        id: Some(id.to_string()),
        phase: Some(Phase::Expired),
        url: old.url.clone(),
        expires_at: Some(Time(expires_at)),
        ready_replicas: old.ready_replicas,
        observed_generation: obj.metadata.generation,
        conditions: merge_conditions(
            &old.conditions,
            vec![
                condition(READY, false, "Expired", &when),
                condition(EXPIRED, true, "TtlElapsed", &when),
            ],
            obj.metadata.generation,
        ),
        message: None,
    };
    match write_status(ctx, obj, &status).await {
        Err(Error::Kube(kube::Error::Api(s))) if s.code == 404 => return Ok(Action::await_change()),
        other => other?,
    }
    publish(
        ctx,
        obj,
        EventType::Normal,
        "Expired",
        format!("{when}: deleting"),
    )
    .await;
    match ctx
        .api
        .delete(&obj.name_any(), &DeleteParams::background())
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    tracing::info!(name = %obj.name_any(), %id, "expired: deleted");
    Ok(Action::await_change())
}

/// Server-side applies `object` (field manager `flowgate-operator`, forced).
/// Hand edits can leave an object ours in a shape no apply merges into (a
/// second Service port named `http` on another port number, say): when the
/// apply is refused as invalid but `object` on its own is valid (a dry-run
/// create says AlreadyExists, not Invalid), the object is deleted and applied
/// anew, with a Warning event.
async fn apply<K>(
    ctx: &Context,
    obj: &MlflowInstance,
    uid: &str,
    kind: &str,
    api: &Api<K>,
    object: &K,
) -> Result<K>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let name = object.meta().name.clone().unwrap_or_default();
    let params = PatchParams::apply(OPERATOR_FIELD_MANAGER).force();
    let status = match api.patch(&name, &params, &Patch::Apply(object)).await {
        Ok(applied) => return Ok(applied),
        Err(kube::Error::Api(status)) if status.code == 422 => status,
        Err(e) => return Err(e.into()),
    };
    let ours = api
        .get_opt(&name)
        .await?
        .is_some_and(|existing| controlled_by(existing.owner_references(), uid));
    if !ours {
        return Err(kube::Error::Api(status).into());
    }
    // made anew: no precondition on the version of the one it replaces
    let mut object = object.clone();
    object.meta_mut().resource_version = None;
    let dry_run = PostParams {
        dry_run: true,
        field_manager: Some(OPERATOR_FIELD_MANAGER.into()),
    };
    match api.create(&dry_run, &object).await {
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        _ => return Err(kube::Error::Api(status).into()),
    }
    let note = format!(
        "{kind} {name} no longer takes the operator's apply ({}): recreating it",
        status.message
    );
    tracing::warn!(name = %obj.name_any(), "{note}");
    publish(ctx, obj, EventType::Warning, "Recreated", note).await;
    match api.delete(&name, &DeleteParams::background()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(api.patch(&name, &params, &Patch::Apply(&object)).await?)
}

/// True when `meta` has a controller ownerReference to the resource `uid`.
fn controlled_by(
    owners: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference],
    uid: &str,
) -> bool {
    owners
        .iter()
        .any(|o| o.controller == Some(true) && o.uid == uid)
}

async fn reconcile_inner(obj: &MlflowInstance, ctx: &Context) -> Result<Action> {
    if obj.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let uid = obj
        .metadata
        .uid
        .clone()
        .ok_or_else(|| Error::Internal("MlflowInstance without a uid".into()))?;
    let id = instance_id(&uid);
    ensure_labels(obj, ctx, &id).await?;
    let (checked, settings) = match admit(obj, ctx) {
        Ok(admitted) => admitted,
        Err(message) => {
            refuse(obj, ctx, &id, "InvalidSpec", message).await?;
            return Ok(Action::await_change());
        }
    };
    if checked.expires_at <= Timestamp::now() {
        return expire(obj, ctx, &id, checked.expires_at).await;
    }
    // Objects of that name that are not ours (another instance, or the
    // provisioner's path) are never taken over.
    let name = id.object_name();
    let existing = ctx.deployments.get_opt(&name).await?;
    if let Some(existing) = &existing
        && !controlled_by(existing.owner_references(), &uid)
    {
        let message = format!("a Deployment {name} exists that this resource does not own");
        refuse(obj, ctx, &id, "NameConflict", message).await?;
        return Ok(Action::requeue(RESYNC));
    }
    let sleep = existing.as_ref().map_or(SleepState::Awake, sleep_state);
    if sleep != SleepState::Awake && ctx.activator.is_none() {
        // asleep from a run with sleep on: with no activator now, wake it
        wake_without_activator(ctx, &name).await?;
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let applied = apply_objects(obj, ctx, &uid, &id, checked.clone(), &settings, existing);
    let (d, exposed) = match applied.await {
        // the Deployment changed since it was read (a sleep, a wake, its
        // status): decide again on a fresh read
        Err(Error::Kube(kube::Error::Api(s))) if s.code == 409 => {
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        other => other?,
    };
    let mut observed = if d
        .status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0)
        >= 1
    {
        observe(&d, &[])
    } else {
        let pods = ctx
            .pods
            .list(&ListParams::default().labels(&format!("{INSTANCE}={id}")))
            .await?;
        observe(&d, &pods.items)
    };
    if observed.message.is_none() {
        observed.message = exposed.refusal;
    }
    let old = obj.status_or_default();
    let status = status_of(
        obj,
        &id,
        &ctx.settings.url_for(&id),
        &checked,
        &d,
        &observed,
    );
    write_status(ctx, obj, &status).await?;
    publish_transitions(obj, ctx, &old, &status, &observed, exposed.by).await;
    let until_expiry = checked
        .expires_at
        .duration_since(Timestamp::now())
        .unsigned_abs()
        + Duration::from_secs(1);
    let mut next = until_expiry.min(RESYNC);
    if !matches!(observed.phase, Phase::Ready | Phase::Sleeping) {
        next = next.min(ctx.pending_recheck);
    }
    Ok(Action::requeue(next))
}

/// Clears the sleep state of a Deployment an operator with sleep on left
/// asleep: the next apply scales it up and gives its Service back.
async fn wake_without_activator(ctx: &Context, name: &str) -> Result<()> {
    tracing::info!(%name, "asleep, but this operator runs without an activator: waking it");
    let patch = json!({"metadata": {"annotations": {ANN_SLEEP: null}}});
    let params = PatchParams {
        field_manager: Some(OPERATOR_FIELD_MANAGER.into()),
        ..Default::default()
    };
    ctx.deployments
        .patch(name, &params, &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// The spec checked and the settings it may have, or why not.
fn admit(
    obj: &MlflowInstance,
    ctx: &Context,
) -> std::result::Result<(Checked, KubeSettings), String> {
    let mut checked = check(obj, &ctx.settings.ttl)?;
    if checked.idle_after.is_some_and(|d| !d.is_zero()) && ctx.activator.is_none() {
        return Err(
            "idleAfter: this operator does not put instances to sleep (it runs without --activator-listen)"
                .into(),
        );
    }
    let settings = ctx.policy.settings_for(&ctx.settings, &obj.spec)?;
    checked.credentials = ctx
        .policy
        .credentials
        .resolve(&checked.owner, obj.spec.credentials.as_deref())
        .map_err(|e| e.to_string())?;
    Ok((checked, settings))
}

/// Fails the resource for `reason` (InvalidSpec, NameConflict): the status
/// says why, and a Warning Event on the transition.
async fn refuse(
    obj: &MlflowInstance,
    ctx: &Context,
    id: &InstanceId,
    reason: &str,
    message: String,
) -> Result<()> {
    let old = obj.status_or_default();
    let generation = obj.metadata.generation;
    let status = MlflowInstanceStatus {
        id: Some(id.to_string()),
        phase: Some(Phase::Failed),
        observed_generation: generation,
        conditions: merge_conditions(
            &old.conditions,
            vec![condition(READY, false, reason, &message)],
            generation,
        ),
        message: Some(message.clone()),
        ..Default::default()
    };
    write_status(ctx, obj, &status).await?;
    if old.phase != Some(Phase::Failed) {
        publish(ctx, obj, EventType::Warning, reason, message).await;
    }
    Ok(())
}

/// What exposes an instance: the kind applied, and why its Gateway refuses
/// it (an HTTPRoute's `Accepted=False`), if it does.
struct Exposed {
    by: &'static str,
    refusal: Option<String>,
}

/// Server-side applies the Deployment (conditional on the version of
/// `existing`, whose sleep state it follows), the Service and the Ingress,
/// Route or HTTPRoute, all owned by the resource; returns the Deployment and
/// what exposes it.
async fn apply_objects(
    obj: &MlflowInstance,
    ctx: &Context,
    uid: &str,
    id: &InstanceId,
    checked: Checked,
    settings: &KubeSettings,
    existing: Option<Deployment>,
) -> Result<(Deployment, Exposed)> {
    let sleep = existing.as_ref().map_or(SleepState::Awake, sleep_state);
    let mut owner = obj
        .controller_owner_ref(&())
        .ok_or_else(|| Error::Internal("MlflowInstance without a name or uid".into()))?;
    owner.block_owner_deletion = Some(true);
    let spec = InstanceSpec {
        id: id.clone(),
        workload: checked.workload,
        owner: checked.owner,
        artifacts: checked.artifacts,
        created_at: obj
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or_else(Timestamp::now, |t| t.0),
        expires_at: checked.expires_at,
        writes: obj.spec.writes,
        access: obj.spec.access,
        credentials: checked.credentials,
        idle_after: checked.idle_after,
        controller: Some(owner.clone()),
    };
    let mut d = deployment(&spec, settings, "complete");
    d.metadata.resource_version = existing.and_then(|e| e.metadata.resource_version);
    if let Some(wanted) = d.spec.as_mut() {
        wanted.replicas = Some(i32::from(sleep != SleepState::Sleeping));
    }
    let d = apply(ctx, obj, uid, "Deployment", &ctx.deployments, &d).await?;
    let svc = match &ctx.activator {
        Some(activator) if sleep != SleepState::Awake => sleeping_service(&spec, &owner, activator),
        _ => service(&spec, &owner),
    };
    apply(ctx, obj, uid, "Service", &ctx.services, &svc).await?;
    let (by, refusal) = match ctx.route_kind {
        RouteKind::Route => {
            let r = route(&spec, settings, &owner);
            apply(ctx, obj, uid, "Route", &ctx.routes, &r).await?;
            ("Route", None)
        }
        RouteKind::Gateway => {
            let r = http_route(&spec, settings, &owner)?;
            let applied = apply(ctx, obj, uid, "HTTPRoute", &ctx.http_routes, &r).await?;
            ("HTTPRoute", route_refusal(&applied))
        }
        RouteKind::Ingress | RouteKind::Auto => {
            let i = ingress(&spec, settings, &owner);
            apply(ctx, obj, uid, "Ingress", &ctx.ingresses, &i).await?;
            ("Ingress", None)
        }
    };
    Ok((d, Exposed { by, refusal }))
}

/// The status for what [`observe`] saw.
fn status_of(
    obj: &MlflowInstance,
    id: &InstanceId,
    url: &str,
    checked: &Checked,
    d: &Deployment,
    observed: &Observed,
) -> MlflowInstanceStatus {
    let generation = obj.metadata.generation;
    let ready = match observed.phase {
        Phase::Ready => condition(READY, true, observed.reason, format!("serving at {url}")),
        Phase::Pending => condition(
            READY,
            false,
            observed.reason,
            "waiting for the pod to become ready",
        ),
        Phase::Sleeping => condition(
            READY,
            false,
            observed.reason,
            "asleep: scaled to zero until its next visit",
        ),
        _ => condition(
            READY,
            false,
            observed.reason,
            observed.message.clone().unwrap_or_default(),
        ),
    };
    let verified = match &observed.fetch {
        _ if observed.phase == Phase::Sleeping => condition3(
            ARTEFACTS_VERIFIED,
            "Unknown",
            "Sleeping",
            "fetched again and verified when it wakes",
        ),
        Fetch::Verified => condition(
            ARTEFACTS_VERIFIED,
            true,
            "ChecksumMatched",
            "the archive was fetched and its sha256 matched",
        ),
        Fetch::Failed(m) => condition(ARTEFACTS_VERIFIED, false, "FetchFailed", m),
        Fetch::Downloading { bytes, total } => condition3(
            ARTEFACTS_VERIFIED,
            "Unknown",
            "Downloading",
            progress_message(*bytes, *total),
        ),
        Fetch::Waiting => condition3(
            ARTEFACTS_VERIFIED,
            "Unknown",
            "Fetching",
            "the fetch init container has not finished",
        ),
    };
    let not_expired = condition(
        EXPIRED,
        false,
        "NotExpired",
        format!("expires at {}", checked.expires_at),
    );
    MlflowInstanceStatus {
        id: Some(id.to_string()),
        phase: Some(observed.phase),
        url: Some(url.to_owned()),
        expires_at: Some(Time(checked.expires_at)),
        ready_replicas: Some(
            d.status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0),
        ),
        observed_generation: generation,
        conditions: merge_conditions(
            &obj.status_or_default().conditions,
            vec![ready, verified, not_expired],
            generation,
        ),
        message: observed.message.clone(),
    }
}

/// Events for what changed since `old`.
async fn publish_transitions(
    obj: &MlflowInstance,
    ctx: &Context,
    old: &MlflowInstanceStatus,
    status: &MlflowInstanceStatus,
    observed: &Observed,
    exposed_by: &str,
) {
    let name = status.id.as_deref().map(|id| format!("mlflow-{id}"));
    if old.url.is_none() {
        let note = format!(
            "applied Deployment, Service and {exposed_by} {}",
            name.unwrap_or_default()
        );
        publish(ctx, obj, EventType::Normal, "Created", note).await;
    }
    if old.phase == Some(observed.phase) {
        return;
    }
    if old.phase == Some(Phase::Sleeping) {
        // (a quick wake may go from Sleeping to Ready between two looks)
        let note = "woken by a visit: fetching its store again".to_owned();
        publish(ctx, obj, EventType::Normal, "Waking", note).await;
    }
    match observed.phase {
        Phase::Ready => {
            let note = format!("serving at {}", status.url.clone().unwrap_or_default());
            publish(ctx, obj, EventType::Normal, "Ready", note).await;
        }
        Phase::Failed => {
            let note = observed.message.clone().unwrap_or_default();
            publish(ctx, obj, EventType::Warning, observed.reason, note).await;
        }
        Phase::Pending if old.phase == Some(Phase::Ready) => {
            let note = "no ready replica".to_owned();
            publish(ctx, obj, EventType::Warning, "Unavailable", note).await;
        }
        Phase::Sleeping => {
            let note = "idle: scaled to zero; its next visitor wakes it".to_owned();
            publish(ctx, obj, EventType::Normal, "Sleeping", note).await;
        }

        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        let secs = |n| backoff(n).as_secs_f64();
        assert!((0.9..=1.1).contains(&secs(1)));
        assert!((1.8..=2.2).contains(&secs(2)));
        assert!((7.2..=8.8).contains(&secs(4)));
        assert!((270.0..=330.0).contains(&secs(12)));
        assert!((270.0..=330.0).contains(&secs(u32::MAX)));
    }

    #[test]
    fn unchanged_conditions_keep_their_transition_time() {
        let mut old = condition(READY, false, "Starting", "x");
        old.last_transition_time = Time("2026-01-01T00:00:00Z".parse().unwrap());
        let merged = merge_conditions(
            std::slice::from_ref(&old),
            vec![
                condition(READY, false, "Starting", "y"),
                condition(EXPIRED, false, "NotExpired", "z"),
            ],
            Some(3),
        );
        assert_eq!(merged.len(), 2);
        let ready = merged.iter().find(|c| c.type_ == READY).unwrap();
        assert_eq!(ready.last_transition_time, old.last_transition_time);
        assert_eq!(ready.message, "y");
        assert_eq!(ready.observed_generation, Some(3));
        let flipped = merge_conditions(
            &merged,
            vec![condition(READY, true, "MinimumReplicasAvailable", "")],
            Some(3),
        );
        let ready = flipped.iter().find(|c| c.type_ == READY).unwrap();
        assert_ne!(ready.last_transition_time, old.last_transition_time);
    }
}
