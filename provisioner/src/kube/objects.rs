//! The Kubernetes objects of one instance, built without a server: the
//! Deployment (init container `fetch`, containers `mlflow` and `adapter`), the
//! Service, and the Ingress, OpenShift Route or Gateway API HTTPRoute. The CLI, the REST API and the
//! operator all build through these functions: the provisioner's objects are
//! owned by their Deployment, the operator's all by their `MlflowInstance`
//! ([`InstanceSpec::controller`]).

use super::phase::observe;
use crate::instance::{
    Access, Artifacts, Instance, InstanceId, Phase, label_safe, show_idle_after,
};
use crate::labels::*;
use crate::settings::{GatewayRef, KubeSettings, RouteKind};
use crate::{Error, Result};
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// Where the init container unpacks the store, inside the shared emptyDir.
pub const STORE_DIR: &str = "/data/store";
/// MLflow listens here only (never exposed outside the pod).
pub const MLFLOW_PORT: u16 = 5000;
/// The adapter's port, the only one the Service reaches.
pub const ADAPTER_PORT: u16 = 8080;
/// The Service's port (to the adapter's), where Ingresses, Routes and
/// HTTPRoutes send visitors.
pub const SERVICE_PORT: u16 = 80;

/// Everything that defines one instance's objects.
#[derive(Clone, Debug)]
pub struct InstanceSpec {
    /// Id.
    pub id: InstanceId,
    /// Raw workload id.
    pub workload: String,
    /// Owner.
    pub owner: String,
    /// Artefacts.
    pub artifacts: Artifacts,
    /// Creation time.
    pub created_at: Timestamp,
    /// Expiry.
    pub expires_at: Timestamp,
    /// Visitors may write (the adapter's `FLOWGATE_WRITES=on`); off by default.
    pub writes: bool,
    /// Who may open it: `link` mounts the access keys' Secret into the adapter.
    pub access: Access,
    /// The credentials Secret mounted into the fetch init container only.
    pub credentials: Option<String>,
    /// Its own idle time before it sleeps (zero: never); none: the server's.
    pub idle_after: Option<std::time::Duration>,
    /// The operator's `MlflowInstance` that owns every object, Deployment
    /// included (the objects are then labelled managed-by
    /// [`OPERATOR_MANAGER`]). None on the provisioner's path, where the
    /// Deployment owns the others.
    pub controller: Option<OwnerReference>,
}

impl InstanceSpec {
    /// The `app.kubernetes.io/managed-by` value of the objects.
    pub fn manager(&self) -> &'static str {
        if self.controller.is_some() {
            OPERATOR_MANAGER
        } else {
            MANAGER
        }
    }
}

/// The labels every object of the instance carries.
pub fn labels(spec: &InstanceSpec) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME.into(), "mlflow".into()),
        (MANAGED_BY.into(), spec.manager().into()),
        (INSTANCE.into(), spec.id.to_string()),
        (WORKLOAD.into(), label_safe(&spec.workload)),
        (OWNER.into(), label_safe(&spec.owner)),
        (
            ARTIFACTS_DIGEST.into(),
            digest_label(&spec.artifacts.sha256).into(),
        ),
    ])
}

/// The annotations that hold the raw values.
pub fn annotations(
    spec: &InstanceSpec,
    settings: &KubeSettings,
    state: &str,
) -> BTreeMap<String, String> {
    let mut annotations = BTreeMap::from([
        (ANN_WORKLOAD.into(), spec.workload.clone()),
        (ANN_OWNER.into(), spec.owner.clone()),
        (ANN_ARTIFACTS_URL.into(), spec.artifacts.url.clone()),
        (ANN_ARTIFACTS_SHA256.into(), spec.artifacts.sha256.clone()),
        (ANN_CREATED_AT.into(), spec.created_at.to_string()),
        (ANN_EXPIRES_AT.into(), spec.expires_at.to_string()),
        (ANN_URL.into(), settings.url_for(&spec.id)),
        (ANN_WRITES.into(), spec.writes.to_string()),
        (ANN_ACCESS.into(), spec.access.as_str().into()),
        (ANN_STATE.into(), state.into()),
    ]);
    if let Some(name) = &spec.credentials {
        annotations.insert(ANN_CREDENTIALS.into(), name.clone());
    }
    if let Some(idle) = spec.idle_after {
        annotations.insert(ANN_IDLE_AFTER.into(), show_idle_after(idle));
    }
    annotations
}

/// The fetch init container's arguments. The archive and the tree unpacked from
/// it lie side by side in the `data` emptyDir while fetch unpacks (the archive is
/// removed after), and MLflow needs room beyond the store (a schema upgrade, the
/// journal): so the download may take 40% of the volume's size limit and the
/// unpacked tree 50%, and a hostile archive is refused by fetch with a clear
/// error instead of getting the pod evicted for passing the limit.
pub fn fetch_args(spec: &InstanceSpec, s: &KubeSettings) -> Vec<String> {
    let mut args: Vec<String> = [
        "fetch",
        "--url",
        spec.artifacts.url.as_str(),
        "--sha256",
        spec.artifacts.sha256.as_str(),
        "--dest",
        STORE_DIR,
        "--termination-log",
        "/dev/termination-log",
    ]
    .map(String::from)
    .into();
    // An unparsable size is refused by the API server (sizeLimit) anyway.
    if let Ok(size) = crate::settings::quantity_bytes(&s.store_size) {
        args.extend([
            "--max-download-bytes".to_owned(),
            (size / 10 * 4).to_string(),
            "--max-unpacked-bytes".to_owned(),
            (size / 10 * 5).to_string(),
        ]);
    }
    args
}

fn resources(cpu: &(String, String), memory: &(String, String)) -> Value {
    json!({
        "requests": {"cpu": cpu.0, "memory": memory.0},
        "limits": {"cpu": cpu.1, "memory": memory.1},
    })
}

/// A container securityContext that passes the `restricted` Pod Security
/// level and works under OpenShift's arbitrary UIDs (no fixed runAsUser).
fn restricted() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "runAsNonRoot": true,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    })
}

/// The Deployment. `state` is [`ANN_STATE`]'s value.
pub fn deployment(spec: &InstanceSpec, s: &KubeSettings, state: &str) -> Deployment {
    let name = spec.id.object_name();
    let labels = labels(spec);
    let selector = BTreeMap::from([(INSTANCE.to_owned(), spec.id.to_string())]);
    let adapter_resources = resources(&s.adapter_cpu, &s.adapter_memory);
    let mut value = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": annotations(spec, s, state),
        },
        "spec": {
            "replicas": 1,
            "revisionHistoryLimit": 2,
            "progressDeadlineSeconds": 600,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": false,
                    "enableServiceLinks": false,
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
                    "volumes": [
                        {"name": "data", "emptyDir": {"sizeLimit": s.store_size}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
                    ],
                    "initContainers": [{
                        "name": "fetch",
                        "image": s.adapter_image,
                        "args": fetch_args(spec, s),
                        "env": [{"name": "RUST_LOG", "value": "info"}],
                        "terminationMessagePolicy": "File",
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "tmp", "mountPath": "/tmp"}],
                        "resources": adapter_resources,
                        "securityContext": restricted(),
                    }],
                    "containers": [
                        {
                            "name": "mlflow",
                            "image": s.mlflow_image,
                            "env": [
                                {"name": "FLOWGATE_STORE", "value": STORE_DIR},
                                {"name": "MLFLOW_HOST", "value": "127.0.0.1"},
                                {"name": "MLFLOW_PORT", "value": MLFLOW_PORT.to_string()},
                                {"name": "HOME", "value": "/tmp"},
                            ],
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "tmp", "mountPath": "/tmp"}],
                            "resources": resources(&s.mlflow_cpu, &s.mlflow_memory),
                            // MLflow outlives the adapter's drain (see below).
                            "lifecycle": {"preStop": {"sleep": {"seconds": 10}}},
                            "securityContext": restricted(),
                        },
                        {
                            "name": "adapter",
                            "image": s.adapter_image,
                            "env": [
                                {"name": "FLOWGATE_PREFIX", "value": spec.id.prefix()},
                                {"name": "FLOWGATE_LISTEN", "value": format!("0.0.0.0:{ADAPTER_PORT}")},
                                {"name": "FLOWGATE_UPSTREAM", "value": format!("http://127.0.0.1:{MLFLOW_PORT}")},
                                // the only Host (and origin) the adapter answers and
                                // passes on: a browser's other names for the pod get a 421
                                {"name": "FLOWGATE_PUBLIC_HOST", "value": s.host},
                                {"name": "FLOWGATE_WRITES", "value": if spec.writes { "on" } else { "off" }},
                                {"name": "RUST_LOG", "value": "info"},
                            ],
                            "ports": [{"name": "http", "containerPort": ADAPTER_PORT, "protocol": "TCP"}],
                            // MLflow can take a minute to start on a big store:
                            // the startup probe allows 10 minutes.
                            "startupProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5, "failureThreshold": 120},
                            "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 10, "failureThreshold": 3},
                            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 20, "failureThreshold": 3},
                            "resources": adapter_resources,
                            // The Ingress controller sees the pod leave its
                            // endpoints a moment after the kubelet sends SIGTERM:
                            // keep serving until then (a rollout under load
                            // otherwise fails requests with 502).
                            "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
                            "securityContext": restricted(),
                        },
                    ],
                },
            },
        },
    });
    if let Some(owner) = &spec.controller {
        value["metadata"]["ownerReferences"] = json!([owner]);
    }
    if let Some(account) = &s.fetch_service_account {
        report_progress(&mut value["spec"]["template"]["spec"], account);
    }
    if spec.access == Access::Link {
        mount_access_keys(&mut value["spec"]["template"]["spec"], &s.access_secret);
    }
    if let Some(secret) = &spec.credentials {
        mount_fetch_credentials(&mut value["spec"]["template"]["spec"], secret);
    }
    serde_json::from_value(value).expect("the Deployment template is a valid Deployment")
}

/// A `link` instance: the adapter checks access links and cookies with the
/// installation's keys, the Secret `secret` (key `keys`), mounted into it
/// alone. The pod does not start until the Secret exists.
fn mount_access_keys(pod: &mut Value, secret: &str) {
    pod["volumes"]
        .as_array_mut()
        .expect("volumes")
        .push(json!({"name": "access-keys", "secret": {
            "secretName": secret,
            "items": [{"key": "keys", "path": "keys"}],
            "defaultMode": 0o444,
        }}));
    let adapter = &mut pod["containers"][1];
    adapter["env"]
        .as_array_mut()
        .expect("env")
        .push(json!({"name": "FLOWGATE_ACCESS_KEYS", "value": "/etc/flowgate-access/keys"}));
    adapter["volumeMounts"] =
        json!([{"name": "access-keys", "mountPath": "/etc/flowgate-access", "readOnly": true}]);
}

/// Where the fetch init container finds its credentials Secret's files.
pub const CREDENTIALS_DIR: &str = "/etc/flowgate-fetch";

/// An archive behind a token or a client certificate: the Secret `secret`
/// (keys `token`, `headers`, `tls.crt` + `tls.key` or `proxy.pem`, `ca.crt`;
/// see `flowgate-adapter fetch --credentials-dir`) is mounted read-only into
/// the fetch init container alone: neither MLflow nor the adapter, which
/// serve visitors, ever holds it. A Secret volume follows rotations in place,
/// and fetch re-reads the files at each retry.
fn mount_fetch_credentials(pod: &mut Value, secret: &str) {
    pod["volumes"].as_array_mut().expect("volumes").push(
        json!({"name": "fetch-credentials", "secret": {
            "secretName": secret,
            "defaultMode": 0o444,
        }}),
    );
    let fetch = &mut pod["initContainers"][0];
    fetch["args"]
        .as_array_mut()
        .expect("args")
        .extend([json!("--credentials-dir"), json!(CREDENTIALS_DIR)]);
    fetch["volumeMounts"]
        .as_array_mut()
        .expect("mounts")
        .push(json!({"name": "fetch-credentials", "mountPath": CREDENTIALS_DIR, "readOnly": true}));
}

/// Lets the fetch init container report progress in its Pod's status (see
/// [`super::phase`]): the Pod runs as `account`, whose token, bound to the
/// Pod, is mounted into `fetch` only (the other containers get none).
fn report_progress(pod: &mut Value, account: &str) {
    pod["serviceAccountName"] = json!(account);
    pod["volumes"]
        .as_array_mut()
        .expect("volumes")
        .push(json!({"name": "fetch-token", "projected": {"sources": [
            {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        ]}}));
    let fetch = &mut pod["initContainers"][0];
    fetch["args"]
        .as_array_mut()
        .expect("args")
        .push(json!("--report-progress"));
    let env = fetch["env"].as_array_mut().expect("env");
    for (name, path) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        env.push(json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}));
    }
    fetch["volumeMounts"]
        .as_array_mut()
        .expect("mounts")
        .push(json!({"name": "fetch-token", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}));
}

/// An ownerReference to `deployment` (which must have come back from the server).
pub fn owner_reference(deployment: &Deployment) -> Result<OwnerReference> {
    let uid = deployment
        .metadata
        .uid
        .clone()
        .ok_or_else(|| Error::Internal("Deployment without a uid".into()))?;
    Ok(OwnerReference {
        api_version: "apps/v1".into(),
        kind: "Deployment".into(),
        name: deployment.metadata.name.clone().unwrap_or_default(),
        uid,
        controller: Some(true),
        block_owner_deletion: Some(true),
    })
}

/// The Service: port 80 to the adapter.
pub fn service(spec: &InstanceSpec, owner: &OwnerReference) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": spec.id.object_name(), "labels": labels(spec), "ownerReferences": [owner]},
        "spec": {
            "type": "ClusterIP",
            "selector": {INSTANCE: spec.id.to_string()},
            "ports": service_ports(false),
        },
    }))
    .expect("the Service template is a valid Service")
}

/// The Service of a sleeping (or waking) instance: port 80 to the pods
/// `activator` selects, on their [`ACTIVATOR_PORT_NAME`] port.
pub fn sleeping_service(
    spec: &InstanceSpec,
    owner: &OwnerReference,
    activator: &BTreeMap<String, String>,
) -> Service {
    let mut svc = service(spec, owner);
    let target = svc.spec.as_mut().expect("the template has a spec");
    target.selector = Some(activator.clone());
    target.ports = serde_json::from_value(service_ports(true)).ok();
    svc
}

/// The Service's one port, to the adapter or (`asleep`) the activator.
fn service_ports(asleep: bool) -> Value {
    let target = if asleep { ACTIVATOR_PORT_NAME } else { "http" };
    json!([{"name": "http", "port": SERVICE_PORT, "targetPort": target, "protocol": "TCP"}])
}

/// The container port of the activator (`flowgate serve --activator-listen`)
/// in the pods that run it: a sleeping instance's Service sends visitors there.
pub const ACTIVATOR_PORT_NAME: &str = "activator";

/// The merge patch that points the Service of instance `id` at the pods
/// `activator` selects (the API's, on their [`ACTIVATOR_PORT_NAME`] port)
/// while it sleeps, or back at its own pods: [`sleeping_service`] or
/// [`service`]. Nothing else changes, so the Ingress, Route or HTTPRoute in
/// front of it stays as it is.
pub fn service_target(
    id: &InstanceId,
    activator: &BTreeMap<String, String>,
    asleep: bool,
) -> Value {
    let mut selector: serde_json::Map<String, Value> = activator
        .iter()
        .map(|(k, v)| (k.clone(), if asleep { json!(v) } else { Value::Null }))
        .collect();
    selector.insert(
        INSTANCE.into(),
        if asleep {
            Value::Null
        } else {
            json!(id.to_string())
        },
    );
    json!({"spec": {"selector": selector, "ports": service_ports(asleep)}})
}

/// The Ingress: path `/<id>` (Prefix) on the shared host.
pub fn ingress(spec: &InstanceSpec, s: &KubeSettings, owner: &OwnerReference) -> Ingress {
    let mut value = json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": spec.id.object_name(), "labels": labels(spec), "ownerReferences": [owner]},
        "spec": {
            "rules": [{
                "host": s.host,
                "http": {"paths": [{
                    "path": spec.id.prefix(),
                    "pathType": "Prefix",
                    "backend": {"service": {"name": spec.id.object_name(), "port": {"name": "http"}}},
                }]},
            }],
        },
    });
    if let Some(class) = &s.ingress_class {
        value["spec"]["ingressClassName"] = json!(class);
    }
    if let Some(secret) = &s.tls_secret {
        value["spec"]["tls"] = json!([{"hosts": [s.host], "secretName": secret}]);
    }
    serde_json::from_value(value).expect("the Ingress template is a valid Ingress")
}

/// route.openshift.io/v1 Route.
pub fn route_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("route.openshift.io", "v1", "Route"),
        "routes",
    )
}

/// The Route: path `/<id>` on the shared host, TLS at the edge.
pub fn route(spec: &InstanceSpec, s: &KubeSettings, owner: &OwnerReference) -> DynamicObject {
    let mut route = DynamicObject::new(&spec.id.object_name(), &route_resource()).data(json!({
        "spec": {
            "host": s.host,
            "path": spec.id.prefix(),
            "to": {"kind": "Service", "name": spec.id.object_name(), "weight": 100},
            "port": {"targetPort": "http"},
            "tls": {"termination": "edge", "insecureEdgeTerminationPolicy": "Redirect"},
            "wildcardPolicy": "None",
        },
    }));
    route.metadata.labels = Some(labels(spec));
    route.metadata.owner_references = Some(vec![owner.clone()]);
    route
}

/// gateway.networking.k8s.io/v1 HTTPRoute.
pub fn http_route_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute"),
        "httproutes",
    )
}

/// The HTTPRoute: attached to the configured Gateway, path prefix `/<id>` on
/// the shared host, to the instance's Service (the one an Ingress would
/// point at). TLS is the Gateway listener's; whether the Gateway accepts the
/// route shows in its `status.parents` (see [`route_refusal`]). Refused
/// without a Gateway, as [`KubeSettings::route_kind_for`] refuses it.
pub fn http_route(
    spec: &InstanceSpec,
    s: &KubeSettings,
    owner: &OwnerReference,
) -> Result<DynamicObject> {
    let GatewayRef { namespace, name } = s.gateway.as_ref().ok_or_else(|| {
        Error::invalid(
            "gateway",
            "an HTTPRoute needs --gateway NAMESPACE/NAME (FLOWGATE_GATEWAY)",
        )
    })?;
    let mut route =
        DynamicObject::new(&spec.id.object_name(), &http_route_resource()).data(json!({
            "spec": {
                "parentRefs": [{
                    "group": "gateway.networking.k8s.io",
                    "kind": "Gateway",
                    "namespace": namespace,
                    "name": name,
                }],
                "hostnames": [s.host],
                "rules": [{
                    "matches": [{"path": {"type": "PathPrefix", "value": spec.id.prefix()}}],
                    "backendRefs": [{
                        "group": "",
                        "kind": "Service",
                        "name": spec.id.object_name(),
                        "port": SERVICE_PORT,
                    }],
                }],
            },
        }));
    route.metadata.labels = Some(labels(spec));
    route.metadata.owner_references = Some(vec![owner.clone()]);
    Ok(route)
}

/// At most this many characters of a Gateway's reason and of its message go
/// into the instance's message: the CRD allows 1 KiB and 32 KiB, and every
/// list answer carries one per instance.
const REFUSAL_PART_MAX: usize = 256;

/// Why a Gateway does not take an HTTPRoute: the first parent in its
/// `status.parents` whose `Accepted` condition is False, as
/// "Gateway NS/NAME refused the route: REASON: MESSAGE" (each part clipped).
/// None while it is accepted or not looked at yet.
pub fn route_refusal(route: &DynamicObject) -> Option<String> {
    let clipped = |s: &str| match s.char_indices().nth(REFUSAL_PART_MAX) {
        Some((end, _)) => format!("{}…", &s[..end]),
        None => s.to_owned(),
    };
    let parents = route.data["status"]["parents"].as_array()?;
    parents.iter().find_map(|parent| {
        let accepted = parent["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Accepted")?;
        if accepted["status"] != "False" {
            return None;
        }
        let r = &parent["parentRef"];
        let namespace = r["namespace"]
            .as_str()
            .or(route.metadata.namespace.as_deref())
            .unwrap_or_default();
        Some(format!(
            "Gateway {namespace}/{} refused the route: {}: {}",
            clipped(r["name"].as_str().unwrap_or_default()),
            clipped(accepted["reason"].as_str().unwrap_or("NotAccepted")),
            clipped(accepted["message"].as_str().unwrap_or_default()),
        ))
    })
}

/// The objects `create` would apply for `spec`, for `create --dry-run`:
/// the Deployment, the Service and the Ingress, Route or HTTPRoute
/// (`route_kind`, already resolved), each as JSON with its apiVersion and
/// kind, in the instance's namespace. Without a cluster there is no
/// Deployment uid, so the ownership that makes deleting the Deployment
/// remove the rest is left out: applying this by hand makes objects that gc
/// does not tie together.
pub fn preview(spec: &InstanceSpec, s: &KubeSettings, route_kind: RouteKind) -> Result<Vec<Value>> {
    let placeholder = OwnerReference {
        api_version: "apps/v1".into(),
        kind: "Deployment".into(),
        name: spec.id.object_name(),
        uid: String::new(),
        ..Default::default()
    };
    let mut out = vec![
        to_value(deployment(spec, s, "complete"), "apps/v1", "Deployment"),
        to_value(service(spec, &placeholder), "v1", "Service"),
        match route_kind {
            RouteKind::Route => {
                serde_json::to_value(route(spec, s, &placeholder)).expect("a Route")
            }
            RouteKind::Gateway => {
                serde_json::to_value(http_route(spec, s, &placeholder)?).expect("an HTTPRoute")
            }
            RouteKind::Ingress | RouteKind::Auto => to_value(
                ingress(spec, s, &placeholder),
                "networking.k8s.io/v1",
                "Ingress",
            ),
        },
    ];
    for o in &mut out {
        let meta = o["metadata"].as_object_mut().expect("metadata");
        meta.remove("ownerReferences");
        meta.insert("namespace".into(), json!(s.namespace));
    }
    Ok(out)
}

fn to_value<T: serde::Serialize>(object: T, api_version: &str, kind: &str) -> Value {
    let mut v = serde_json::to_value(object).expect("objects serialise");
    v["apiVersion"] = json!(api_version);
    v["kind"] = json!(kind);
    v
}

/// Reads an instance back from its Deployment (labels and annotations are
/// the store); the phase as [`observe`] sees it without the Pods.
pub fn instance_from_deployment(d: &Deployment, now: Timestamp) -> Result<Instance> {
    instance_from(d, &[], now)
}

/// Reads an instance back from its Deployment and Pods.
pub fn instance_from(d: &Deployment, pods: &[Pod], now: Timestamp) -> Result<Instance> {
    let ann = d.metadata.annotations.clone().unwrap_or_default();
    let get = |k: &str| {
        ann.get(k).cloned().ok_or_else(|| {
            Error::Internal(format!(
                "Deployment {:?} lacks annotation {k}",
                d.metadata.name
            ))
        })
    };
    let time = |k: &str| -> Result<Timestamp> {
        get(k)?
            .parse()
            .map_err(|e| Error::Internal(format!("annotation {k}: {e}")))
    };
    let id_label = d
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(INSTANCE))
        .cloned()
        .unwrap_or_default();
    let expires_at = time(ANN_EXPIRES_AT)?;
    let (phase, message) = if expires_at <= now {
        (Phase::Expired, None)
    } else {
        let o = observe(d, pods);
        (o.phase, o.message)
    };
    Ok(Instance {
        id: InstanceId::parse(&id_label)?,
        workload: get(ANN_WORKLOAD)?,
        owner: get(ANN_OWNER)?,
        artifacts: Artifacts {
            url: get(ANN_ARTIFACTS_URL)?,
            sha256: get(ANN_ARTIFACTS_SHA256)?,
        },
        created_at: time(ANN_CREATED_AT)?,
        expires_at,
        url: get(ANN_URL)?,
        phase,
        message,
        writes: ann.get(ANN_WRITES).map(String::as_str) == Some("true"),
        access: match ann.get(ANN_ACCESS).map(String::as_str) {
            Some("link") => Access::Link,
            _ => Access::Public,
        },
        access_url: None,
        credentials: ann.get(ANN_CREDENTIALS).cloned(),
        idle_after: ann.get(ANN_IDLE_AFTER).cloned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{KubeArgs, KubeSettings};
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        kube: KubeArgs,
    }

    pub(crate) fn settings() -> KubeSettings {
        let args =
            Wrap::parse_from(["x", "--host", "ml.example.org", "--ingress-class", "nginx"]).kube;
        KubeSettings::from_args(&args, "flowgate").unwrap()
    }

    fn spec() -> InstanceSpec {
        InstanceSpec {
            id: InstanceId::parse("k3x9q2a").unwrap(),
            workload: "panda job/123".into(),
            owner: "alice".into(),
            artifacts: Artifacts {
                url: "https://store.example/job.tgz".into(),
                sha256: "ab".repeat(32),
            },
            created_at: "2026-11-26T10:00:00Z".parse().unwrap(),
            expires_at: "2026-11-27T10:00:00Z".parse().unwrap(),
            writes: false,
            access: Access::Link,
            credentials: None,
            idle_after: None,
            controller: None,
        }
    }

    #[test]
    fn only_the_fetch_container_gets_the_credentials() {
        let mut spec = spec();
        let now: Timestamp = "2026-11-26T12:00:00Z".parse().unwrap();
        let text = serde_json::to_string(&deployment(&spec, &settings(), "complete")).unwrap();
        assert!(!text.contains("fetch-credentials") && !text.contains(CREDENTIALS_DIR));

        spec.credentials = Some("panda-token".into());
        let d = deployment(&spec, &settings(), "complete");
        assert_eq!(
            instance_from_deployment(&d, now)
                .unwrap()
                .credentials
                .as_deref(),
            Some("panda-token")
        );
        let v = serde_json::to_value(d).unwrap();
        let pod = &v["spec"]["template"]["spec"];
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "fetch-credentials")
            .expect("the credentials volume");
        assert_eq!(volume["secret"]["secretName"], "panda-token");
        let fetch = &pod["initContainers"][0];
        assert!(fetch["volumeMounts"].as_array().unwrap().iter().any(|m| {
            m["name"] == "fetch-credentials"
                && m["mountPath"] == CREDENTIALS_DIR
                && m["readOnly"] == true
        }));
        let args: Vec<&str> = fetch["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(
            args.windows(2)
                .any(|w| w == ["--credentials-dir", CREDENTIALS_DIR]),
            "{args:?}"
        );
        for other in pod["containers"].as_array().unwrap() {
            assert!(!other.to_string().contains("fetch-credentials"), "{other}");
        }
    }

    #[test]
    fn the_adapter_gets_the_public_host_and_read_only_by_default() {
        let env = |spec: &InstanceSpec| -> BTreeMap<String, String> {
            let v = serde_json::to_value(deployment(spec, &settings(), "creating")).unwrap();
            v["spec"]["template"]["spec"]["containers"][1]["env"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    (
                        e["name"].as_str().unwrap().to_owned(),
                        e["value"].as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        };
        let mut spec = spec();
        let e = env(&spec);
        assert_eq!(e["FLOWGATE_PUBLIC_HOST"], "ml.example.org");
        assert_eq!(e["FLOWGATE_WRITES"], "off");
        spec.writes = true;
        assert_eq!(env(&spec)["FLOWGATE_WRITES"], "on");
        let d = deployment(&spec, &settings(), "complete");
        let now: Timestamp = "2026-11-26T12:00:00Z".parse().unwrap();
        assert!(instance_from_deployment(&d, now).unwrap().writes);
        spec.writes = false;
        let d = deployment(&spec, &settings(), "complete");
        assert!(!instance_from_deployment(&d, now).unwrap().writes);
    }

    #[test]
    fn only_a_link_instance_s_adapter_gets_the_access_keys() {
        let mut spec = spec();
        let now: Timestamp = "2026-11-26T12:00:00Z".parse().unwrap();
        let v = serde_json::to_value(deployment(&spec, &settings(), "complete")).unwrap();
        let pod = &v["spec"]["template"]["spec"];
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "access-keys")
            .expect("the access-keys volume");
        assert_eq!(volume["secret"]["secretName"], "flowgate-access-keys");
        let adapter = &pod["containers"][1];
        assert_eq!(adapter["name"], "adapter");
        assert!(adapter["env"].as_array().unwrap().iter().any(|e| {
            e["name"] == "FLOWGATE_ACCESS_KEYS" && e["value"] == "/etc/flowgate-access/keys"
        }));
        assert_eq!(adapter["volumeMounts"][0]["readOnly"], true);
        // neither MLflow nor fetch sees the keys
        for other in [&pod["containers"][0], &pod["initContainers"][0]] {
            let mounts = other["volumeMounts"].as_array().unwrap();
            assert!(mounts.iter().all(|m| m["name"] != "access-keys"), "{other}");
        }
        let d = deployment(&spec, &settings(), "complete");
        assert_eq!(
            instance_from_deployment(&d, now).unwrap().access,
            Access::Link
        );

        spec.access = Access::Public;
        let v = serde_json::to_value(deployment(&spec, &settings(), "complete")).unwrap();
        let text = v.to_string();
        assert!(!text.contains("access-keys") && !text.contains("FLOWGATE_ACCESS_KEYS"));
        let d = deployment(&spec, &settings(), "complete");
        assert_eq!(
            instance_from_deployment(&d, now).unwrap().access,
            Access::Public
        );
    }

    #[test]
    fn fetch_limits_stay_below_the_volume() {
        let mut s = settings();
        let v = serde_json::to_value(deployment(&spec(), &s, "creating")).unwrap();
        let pod = &v["spec"]["template"]["spec"];
        assert_eq!(pod["volumes"][0]["emptyDir"]["sizeLimit"], "10Gi");
        let args: Vec<String> =
            serde_json::from_value(pod["initContainers"][0]["args"].clone()).unwrap();
        let flag = |args: &[String], name: &str| -> u64 {
            let i = args.iter().position(|a| a == name).unwrap();
            args[i + 1].parse().unwrap()
        };
        let size = 10u64 << 30;
        let (down, unpacked) = (
            flag(&args, "--max-download-bytes"),
            flag(&args, "--max-unpacked-bytes"),
        );
        assert!(
            unpacked < size && down + unpacked < size,
            "{down} + {unpacked} vs {size}"
        );
        assert!(unpacked >= size / 2 - 10);
        s.store_size = "500M".into();
        let args = fetch_args(&spec(), &s);
        assert_eq!(flag(&args, "--max-unpacked-bytes"), 250_000_000);
        assert_eq!(flag(&args, "--max-download-bytes"), 200_000_000);
    }

    #[test]
    fn deployment_is_hardened_and_labelled() {
        let d = deployment(&spec(), &settings(), "creating");
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["metadata"]["name"], "mlflow-k3x9q2a");
        let labels = &v["metadata"]["labels"];
        assert_eq!(labels["app.kubernetes.io/name"], "mlflow");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "flowgate");
        assert_eq!(labels["flowgate.io/instance"], "k3x9q2a");
        assert!(
            labels["flowgate.io/workload"]
                .as_str()
                .unwrap()
                .starts_with("h-")
        );
        assert_eq!(
            v["metadata"]["annotations"]["flowgate.io/workload"],
            "panda job/123"
        );
        assert_eq!(
            v["metadata"]["annotations"]["flowgate.io/expires-at"],
            "2026-11-27T10:00:00Z"
        );
        let pod = &v["spec"]["template"]["spec"];
        assert_eq!(pod["automountServiceAccountToken"], false);
        assert!(
            pod["securityContext"]["runAsUser"].is_null(),
            "arbitrary UIDs must work"
        );
        assert_eq!(v["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
        let init = &pod["initContainers"][0];
        assert_eq!(init["args"][0], "fetch");
        assert_eq!(init["args"][4], "ab".repeat(32));
        for c in pod["containers"]
            .as_array()
            .unwrap()
            .iter()
            .chain(pod["initContainers"].as_array().unwrap())
        {
            assert_eq!(
                c["securityContext"]["readOnlyRootFilesystem"], true,
                "{}",
                c["name"]
            );
            assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
            assert!(c["resources"]["limits"]["memory"].is_string());
        }
        let adapter = &pod["containers"][1];
        assert_eq!(adapter["env"][0]["value"], "/k3x9q2a");
        assert_eq!(adapter["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(adapter["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert!(
            pod["containers"][0]["ports"].is_null(),
            "MLflow's port is never exposed"
        );
    }

    #[test]
    fn ingress_and_route_point_at_the_service() {
        let owner = OwnerReference {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            name: "mlflow-k3x9q2a".into(),
            uid: "u1".into(),
            ..Default::default()
        };
        let i = serde_json::to_value(ingress(&spec(), &settings(), &owner)).unwrap();
        assert_eq!(i["spec"]["ingressClassName"], "nginx");
        assert_eq!(i["spec"]["rules"][0]["host"], "ml.example.org");
        assert_eq!(
            i["spec"]["rules"][0]["http"]["paths"][0]["path"],
            "/k3x9q2a"
        );
        assert_eq!(
            i["spec"]["rules"][0]["http"]["paths"][0]["pathType"],
            "Prefix"
        );
        assert_eq!(i["metadata"]["ownerReferences"][0]["uid"], "u1");
        let r = serde_json::to_value(route(&spec(), &settings(), &owner)).unwrap();
        assert_eq!(r["apiVersion"], "route.openshift.io/v1");
        assert_eq!(r["spec"]["path"], "/k3x9q2a");
        assert_eq!(r["spec"]["to"]["name"], "mlflow-k3x9q2a");
        let s = serde_json::to_value(service(&spec(), &owner)).unwrap();
        assert_eq!(s["spec"]["ports"][0]["port"], 80);
        assert_eq!(s["spec"]["ports"][0]["targetPort"], "http");
    }

    #[test]
    fn an_http_route_attaches_to_the_gateway_and_points_at_the_service() {
        let owner = OwnerReference {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            name: "mlflow-k3x9q2a".into(),
            uid: "u1".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        let mut s = settings();
        s.gateway = None;
        assert!(matches!(
            http_route(&spec(), &s, &owner),
            Err(Error::Invalid {
                field: "gateway",
                ..
            })
        ));
        s.gateway = Some("gateway-system/shared".parse().unwrap());
        let r = serde_json::to_value(http_route(&spec(), &s, &owner).unwrap()).unwrap();
        assert_eq!(r["apiVersion"], "gateway.networking.k8s.io/v1");
        assert_eq!(r["kind"], "HTTPRoute");
        assert_eq!(r["metadata"]["name"], "mlflow-k3x9q2a");
        assert_eq!(
            r["metadata"]["labels"],
            serde_json::to_value(labels(&spec())).unwrap()
        );
        assert_eq!(r["metadata"]["ownerReferences"][0]["uid"], "u1");
        let spec_ = &r["spec"];
        assert_eq!(
            spec_["parentRefs"],
            json!([{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                    "namespace": "gateway-system", "name": "shared"}])
        );
        assert_eq!(spec_["hostnames"], json!(["ml.example.org"]));
        assert_eq!(spec_["rules"].as_array().unwrap().len(), 1);
        assert_eq!(
            spec_["rules"][0]["matches"],
            json!([{"path": {"type": "PathPrefix", "value": "/k3x9q2a"}}])
        );
        // the Service and port the Ingress reaches
        let svc = serde_json::to_value(service(&spec(), &owner)).unwrap();
        assert_eq!(
            spec_["rules"][0]["backendRefs"],
            json!([{"group": "", "kind": "Service", "name": svc["metadata"]["name"],
                    "port": svc["spec"]["ports"][0]["port"]}])
        );
        assert!(spec_.get("tls").is_none() && !r.to_string().contains("secret"));
    }

    #[test]
    fn a_refused_http_route_says_which_gateway_and_why() {
        let mut s = settings();
        s.gateway = Some("gateway-system/shared".parse().unwrap());
        let owner = OwnerReference::default();
        let mut r = http_route(&spec(), &s, &owner).unwrap();
        r.metadata.namespace = Some("flowgate".into());
        assert_eq!(route_refusal(&r), None);
        let parent = |status: &str, reason: &str| {
            json!({"parentRef": {"name": "shared", "namespace": "gateway-system"},
                   "controllerName": "example.net/gateway",
                   "conditions": [
                       {"type": "ResolvedRefs", "status": "True", "reason": "ResolvedRefs"},
                       {"type": "Accepted", "status": status, "reason": reason,
                        "message": "namespace flowgate is not allowed"}]})
        };
        r.data["status"] = json!({"parents": [parent("True", "Accepted")]});
        assert_eq!(route_refusal(&r), None);
        r.data["status"] = json!({"parents": [parent("True", "Accepted"), parent("False", "NotAllowedByListeners")]});
        assert_eq!(
            route_refusal(&r).as_deref(),
            Some(
                "Gateway gateway-system/shared refused the route: NotAllowedByListeners: \
                 namespace flowgate is not allowed"
            )
        );
        // a parentRef without a namespace is in the route's
        r.data["status"]["parents"][1]["parentRef"] = json!({"name": "local"});
        assert!(
            route_refusal(&r)
                .unwrap()
                .starts_with("Gateway flowgate/local refused")
        );
        // a controller's long message is clipped, on a character boundary
        r.data["status"]["parents"][1]["conditions"][1]["message"] = json!("é".repeat(30_000));
        let said = route_refusal(&r).unwrap();
        assert!(
            said.ends_with(&format!("{}…", "é".repeat(REFUSAL_PART_MAX))),
            "{said}"
        );
        assert!(
            said.chars().count() < 400,
            "{} characters",
            said.chars().count()
        );
    }

    #[test]
    fn the_preview_shows_the_resolved_route_kind() {
        let mut s = settings();
        s.gateway = Some("gateway-system/shared".parse().unwrap());
        let kinds = |kind| -> Vec<String> {
            preview(&spec(), &s, kind)
                .unwrap()
                .iter()
                .map(|o| {
                    format!(
                        "{} {}",
                        o["apiVersion"].as_str().unwrap(),
                        o["kind"].as_str().unwrap()
                    )
                })
                .collect()
        };
        assert_eq!(
            kinds(RouteKind::Gateway),
            [
                "apps/v1 Deployment",
                "v1 Service",
                "gateway.networking.k8s.io/v1 HTTPRoute"
            ]
        );
        assert_eq!(kinds(RouteKind::Ingress)[2], "networking.k8s.io/v1 Ingress");
        assert_eq!(kinds(RouteKind::Route)[2], "route.openshift.io/v1 Route");
        let objects = preview(&spec(), &s, RouteKind::Gateway).unwrap();
        assert_eq!(objects[2]["metadata"]["namespace"], "flowgate");
        assert!(objects[2]["metadata"].get("ownerReferences").is_none());
    }

    #[test]
    fn instance_round_trips_through_the_deployment() {
        let mut d = deployment(&spec(), &settings(), "complete");
        let now: Timestamp = "2026-11-26T12:00:00Z".parse().unwrap();
        let i = instance_from_deployment(&d, now).unwrap();
        assert_eq!(i.id.as_str(), "k3x9q2a");
        assert_eq!(i.workload, "panda job/123");
        assert_eq!(i.url, "https://ml.example.org/k3x9q2a/");
        assert_eq!(i.phase, Phase::Pending);
        d.status = Some(k8s_openapi::api::apps::v1::DeploymentStatus {
            available_replicas: Some(1),
            ..Default::default()
        });
        assert_eq!(
            instance_from_deployment(&d, now).unwrap().phase,
            Phase::Ready
        );
        let later: Timestamp = "2026-11-28T00:00:00Z".parse().unwrap();
        assert_eq!(
            instance_from_deployment(&d, later).unwrap().phase,
            Phase::Expired
        );
    }

    #[test]
    fn the_operator_path_owns_the_deployment_too() {
        let owner = OwnerReference {
            api_version: "flowgate.io/v1alpha1".into(),
            kind: "MlflowInstance".into(),
            name: "job-1".into(),
            uid: "u2".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        };
        let mut spec = spec();
        let plain = serde_json::to_value(deployment(&spec, &settings(), "complete")).unwrap();
        assert!(plain["metadata"]["ownerReferences"].is_null());
        spec.controller = Some(owner.clone());
        let d = serde_json::to_value(deployment(&spec, &settings(), "complete")).unwrap();
        assert_eq!(
            d["metadata"]["ownerReferences"][0]["kind"],
            "MlflowInstance"
        );
        assert_eq!(d["metadata"]["ownerReferences"][0]["controller"], true);
        assert_eq!(
            d["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "flowgate-operator"
        );
        assert_eq!(
            d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "flowgate-operator"
        );
        let s = serde_json::to_value(service(&spec, &owner)).unwrap();
        assert_eq!(s["metadata"]["ownerReferences"][0]["uid"], "u2");
        assert_eq!(
            s["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "flowgate-operator"
        );
    }
}
