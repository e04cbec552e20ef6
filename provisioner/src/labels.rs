//! The label and annotation keys that make Kubernetes objects the store of
//! instances (no database): labels to select, annotations to hold raw values.

/// `app.kubernetes.io/name`.
pub const NAME: &str = "app.kubernetes.io/name";
/// `app.kubernetes.io/managed-by`.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// `app.kubernetes.io/component`.
pub const COMPONENT: &str = "app.kubernetes.io/component";
/// The instance id.
pub const INSTANCE: &str = "flowgate.io/instance";
/// The workload, label-safe (see [`crate::instance::label_safe`]).
pub const WORKLOAD: &str = "flowgate.io/workload";
/// The owner, label-safe.
pub const OWNER: &str = "flowgate.io/owner";
/// The first 40 hex digits of the artefacts' sha256 (idempotent create).
pub const ARTIFACTS_DIGEST: &str = "flowgate.io/artifacts-sha256";

/// Raw workload id.
pub const ANN_WORKLOAD: &str = "flowgate.io/workload";
/// Raw owner.
pub const ANN_OWNER: &str = "flowgate.io/owner";
/// Artefact URL.
pub const ANN_ARTIFACTS_URL: &str = "flowgate.io/artifacts-url";
/// Full artefact sha256.
pub const ANN_ARTIFACTS_SHA256: &str = "flowgate.io/artifacts-sha256";
/// RFC 3339 creation time.
pub const ANN_CREATED_AT: &str = "flowgate.io/created-at";
/// RFC 3339 expiry.
pub const ANN_EXPIRES_AT: &str = "flowgate.io/expires-at";
/// The browser URL.
pub const ANN_URL: &str = "flowgate.io/url";
/// `true` when visitors may write (the adapter's `--writes on`); absent or
/// anything else: read-only.
pub const ANN_WRITES: &str = "flowgate.io/writes";
/// `link` (opens only through an access link; the adapter has the access
/// keys) or `public`; absent on instances made before access modes: public.
pub const ANN_ACCESS: &str = "flowgate.io/access";
/// The credentials set (a Secret mounted into the fetch init container only).
pub const ANN_CREDENTIALS: &str = "flowgate.io/credentials";
/// `creating` until every object of the instance exists, then `complete`.
pub const ANN_STATE: &str = "flowgate.io/state";
/// `sleeping` (scaled to zero, its Service selects the activator) or `waking`
/// (scaled up, the Service handed back once a pod is ready); absent: awake.
pub const ANN_SLEEP: &str = "flowgate.io/sleep";
/// Its own idle time before it sleeps (`0`: never); absent: the server's.
pub const ANN_IDLE_AFTER: &str = "flowgate.io/idle-after";

/// The value of [`MANAGED_BY`].
pub const MANAGER: &str = "flowgate";
/// Server-side apply field manager.
pub const FIELD_MANAGER: &str = "flowgate";
/// The value of [`MANAGED_BY`] on the objects the operator makes.
pub const OPERATOR_MANAGER: &str = "flowgate-operator";
/// The operator's server-side apply field manager.
pub const OPERATOR_FIELD_MANAGER: &str = "flowgate-operator";

/// Selector for every object Flowgate manages.
pub fn managed_selector() -> String {
    format!("{MANAGED_BY}={MANAGER}")
}

/// The artefact digest label value for a full sha256.
pub fn digest_label(sha256: &str) -> &str {
    &sha256[..40.min(sha256.len())]
}
