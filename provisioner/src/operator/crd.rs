//! The `MlflowInstance` custom resource (`flowgate.io/v1alpha1`, short name
//! `mli`): its spec and status as Rust types, from which the
//! CustomResourceDefinition is generated (`flowgate crd`, checked in as
//! `k8s/crd/mlflowinstance.yaml`). The apiserver validates specs with the
//! OpenAPI patterns and the CEL rules declared here.

use crate::instance::{Access, Phase, add};
use jiff::Timestamp;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group.
pub const GROUP: &str = "flowgate.io";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` of the resource.
pub const API_VERSION: &str = "flowgate.io/v1alpha1";
/// The kind.
pub const KIND: &str = "MlflowInstance";

/// One MLflow instance for a job's artefacts, served under
/// `https://<host>/<id>/` until it expires.
#[allow(clippy::duplicated_attributes)] // printcolumn(type_ = ...) repeats by design
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "flowgate.io",
    version = "v1alpha1",
    kind = "MlflowInstance",
    plural = "mlflowinstances",
    singular = "mlflowinstance",
    shortname = "mli",
    category = "flowgate",
    namespaced,
    status = "MlflowInstanceStatus",
    derive = "PartialEq",
    doc = "An MLflow instance serving one job's artefacts under https://<host>/<id>/ until it expires. Reconciled by `flowgate operator` into a Deployment, a Service and an Ingress (or an OpenShift Route, or a Gateway API HTTPRoute), all owned by this resource.",
    printcolumn(
        name = "ID",
        type_ = "string",
        json_path = ".status.id",
        description = "instance id, the URL path"
    ),
    printcolumn(
        name = "Workload",
        type_ = "string",
        json_path = ".spec.workload",
        priority = 1
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "URL", type_ = "string", json_path = ".status.url"),
    printcolumn(name = "Expires", type_ = "string", json_path = ".status.expiresAt"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("has(self.ttl) != has(self.expiresAt)").message("give exactly one of ttl and expiresAt").reason(Reason::FieldValueInvalid))]
#[serde(rename_all = "camelCase")]
pub struct MlflowInstanceSpec {
    /// The portal's job or task id: 1 to 253 characters, no surrounding spaces.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^\S(.*\S)?$"))]
    pub workload: String,
    /// Who asked for the instance: 1 to 128 characters, no spaces. The
    /// admission policy of k8s/operator holds it to the requesting user's name.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^\S+$"))]
    pub owner: String,
    /// The job's artefact archive (immutable: make a new resource for other artefacts).
    #[x_kube(validation = Rule::new("self == oldSelf").message("artifacts are immutable: create a new MlflowInstance"))]
    pub artifacts: ArtifactsSource,
    /// Time to live, counted from the resource's creation, as a Go duration
    /// (`24h`, `90m`, `1h30m`; at least `1m`). Exactly one of ttl and expiresAt;
    /// either is capped at the operator's longest TTL from the creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = r"^([0-9]+(h|m|s))+$"))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1m')").message("ttl must be at least 1m"))]
    pub ttl: Option<String>,
    /// When the instance is deleted (RFC 3339). Exactly one of ttl and expiresAt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// Images other than the operator's defaults: only ones the operator allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageOverrides>,
    /// Resources other than the operator's defaults, up to the operator's ceilings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceOverrides>,
    /// Let visitors write (create experiments, delete runs, ...). Off by
    /// default: the instance is a read-only viewer of the job's results.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub writes: bool,
    /// Who may open it: `link` (the default: only through a signed access
    /// link minted by the API; the pod mounts the installation's access keys)
    /// or `public` (the URL alone).
    #[serde(default)]
    pub access: Access,
    /// The Secret (in this namespace) the fetch init container reads the
    /// archive's credentials from: token, headers, tls.crt + tls.key or
    /// proxy.pem, ca.crt. Only names the operator grants the owner
    /// (`--allow-credentials`); none: the operator's `--default-credentials`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub credentials: Option<String>,
    /// Sleep after this long without a visit, as a Go duration (`30m`, `2h`;
    /// at least `1m`), or `0`: never. Without it, the operator's
    /// `--idle-after`. A sleeping instance is scaled to zero and keeps its
    /// URL; its next visitor wakes it (the store fetched again and verified).
    /// Needs an operator that runs the activator (`--activator-listen`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32), regex(pattern = r"^(0|([0-9]+(h|m|s))+)$"))]
    #[x_kube(validation = Rule::new("self == '0' || duration(self) >= duration('1m')").message("idleAfter must be 0 (never) or at least 1m"))]
    pub idle_after: Option<String>,
}

/// Where the job's artefacts are, and their checksum.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct ArtifactsSource {
    /// `https://` or `http://` URL of the archive (.tar.gz, .tgz, .tar or .zip).
    #[schemars(length(max = 2048), regex(pattern = r"^https?://\S+$"))]
    pub url: String,
    /// sha256 of the archive: 64 lower-case hex digits.
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: String,
}

/// Image overrides.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct ImageOverrides {
    /// The MLflow image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub mlflow: Option<String>,
    /// The adapter image (sidecar and `fetch` init container).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub adapter: Option<String>,
}

/// Resource overrides.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ResourceOverrides {
    /// The MLflow container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlflow: Option<ContainerResources>,
    /// The adapter and fetch containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<ContainerResources>,
    /// Size limit of the artefact volume (a quantity, e.g. `20Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("isQuantity(self)").message("storeSize must be a quantity such as 20Gi"))]
    pub store_size: Option<String>,
}

/// CPU and memory of one container.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct ContainerResources {
    /// CPU request and limit (e.g. `100m` and `1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<RequestLimit>,
    /// Memory request and limit (e.g. `512Mi` and `2Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<RequestLimit>,
}

/// A request and a limit, as Kubernetes quantities.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("isQuantity(self.request) && isQuantity(self.limit)").message("request and limit must be quantities such as 100m, 1, 512Mi"))]
#[x_kube(validation = Rule::new("!isQuantity(self.request) || !isQuantity(self.limit) || quantity(self.request).compareTo(quantity(self.limit)) <= 0").message("the request must not exceed the limit"))]
pub struct RequestLimit {
    /// What the container is guaranteed.
    #[schemars(length(min = 1, max = 32))]
    pub request: String,
    /// What it may use at most.
    #[schemars(length(min = 1, max = 32))]
    pub limit: String,
}

/// What the operator last saw and did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MlflowInstanceStatus {
    /// The instance id (`[a-z][a-z0-9]{6}`, derived from the resource's uid):
    /// the URL path and the objects' name `mlflow-<id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Pending, Ready, Sleeping, Failed or Expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Where a browser opens the instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// When the instance is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// Ready replicas of the Deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, ArtefactsVerified and Expired.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Why the instance failed, or the last reconcile error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl MlflowInstance {
    /// When the instance expires: `expiresAt`, or the creation time plus
    /// `ttl`. None while the resource has no creation time (not yet stored)
    /// or the ttl does not parse.
    pub fn expires_at(&self) -> Option<Timestamp> {
        if let Some(t) = &self.spec.expires_at {
            return Some(t.0);
        }
        let created = self.metadata.creation_timestamp.as_ref()?.0;
        let ttl = humantime::parse_duration(self.spec.ttl.as_deref()?).ok()?;
        Some(add(created, ttl))
    }

    /// The status, or an empty one.
    pub fn status_or_default(&self) -> MlflowInstanceStatus {
        self.status.clone().unwrap_or_default()
    }

    /// A condition of the status by type.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
    }
}

/// The header of the generated YAML.
const HEADER: &str = "# Generated by `flowgate crd` from provisioner/src/operator/crd.rs: do not edit.\n\
# Regenerate: cargo run -p provisioner -- crd > k8s/crd/mlflowinstance.yaml\n";

/// The CustomResourceDefinition: the derived one, with `nullable` taken off
/// the spec's optional fields (an explicit `null` then is pruned by the
/// apiserver instead of reaching the CEL rules).
pub fn crd() -> CustomResourceDefinition {
    fn strip_nullable(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                map.remove("nullable");
                map.values_mut().for_each(strip_nullable);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip_nullable),
            _ => {}
        }
    }
    let mut value = serde_json::to_value(MlflowInstance::crd()).expect("the CRD serialises");
    for version in value["spec"]["versions"]
        .as_array_mut()
        .expect("the CRD has versions")
    {
        strip_nullable(&mut version["schema"]["openAPIV3Schema"]["properties"]["spec"]);
    }
    serde_json::from_value(value).expect("the CRD deserialises")
}

/// The CustomResourceDefinition as YAML (what `flowgate crd` prints and
/// `k8s/crd/mlflowinstance.yaml` holds).
pub fn crd_yaml() -> String {
    let body = serde_saphyr::to_string(&crd()).expect("the CRD serialises");
    format!("{HEADER}{body}")
}
