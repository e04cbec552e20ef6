//! `flowgate serve`: the REST API the portal calls (axum), over the
//! [`Provisioner`]. Errors are JSON `{error, message}` with the status that
//! fits; bad input is a 4xx, never a 500 or a panic. Messages say what is
//! wrong without internals (the log keeps the details).

pub mod auth;
pub mod server;

use crate::backend::ListFilter;
use crate::events::Event;
use crate::hosts::PublicHosts;
use crate::instance::{Access, Artifacts, CreateRequest, Instance, InstanceId, Phase, Workload};
use crate::service::{Caller, Provisioner};
use crate::{Error, Result};
use auth::Tokens;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{Stream, StreamExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use utoipa::{OpenApi, ToSchema};

pub use crate::service::Quotas;

/// What the API needs.
pub struct ApiState {
    provisioner: Arc<Provisioner>,
    tokens: Option<Tokens>,
    registry: Registry,
    requests: Family<[(&'static str, String); 1], Counter>,
    connections: adapter::metrics::ConnectionMetrics,
    applied: AppliedKeys,
}

impl ApiState {
    /// State over the service.
    pub fn new(provisioner: Arc<Provisioner>, tokens: Option<Tokens>) -> Arc<Self> {
        let mut registry = Registry::with_prefix("flowgate_api");
        let requests = Family::<[(&'static str, String); 1], Counter>::default();
        registry.register(
            "requests",
            "API requests answered, by status",
            requests.clone(),
        );
        let connections = adapter::metrics::ConnectionMetrics::default();
        connections.register(&mut registry);
        Arc::new(Self {
            provisioner,
            tokens,
            registry,
            requests,
            connections,
            applied: AppliedKeys::default(),
        })
    }
}

/// The body of an error response: an RFC 9457 problem document
/// (`application/problem+json`) with two extension members, `error` (the
/// stable code) and `message` (the same text as `detail`, as the first
/// version of the API named it).
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct ApiError {
    /// `urn:flowgate:error:<code>`: what kind of problem, stable.
    #[serde(rename = "type")]
    pub kind: String,
    /// The HTTP status phrase.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong, for people.
    pub detail: String,
    /// A stable code: `invalid`, `unauthorized`, `forbidden`, `not_found`, `quota`, `failed`, `timeout`, `upstream`, `insufficient_storage`, `unavailable`, `internal`, `misdirected`.
    pub error: String,
    /// The same as `detail`.
    pub message: String,
}

/// An error as a response.
#[derive(Debug)]
pub struct ApiFailure(StatusCode, Box<ApiError>);

impl ApiFailure {
    fn new(status: StatusCode, error: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        Self(
            status,
            Box::new(ApiError {
                kind: format!("urn:flowgate:error:{error}"),
                title: status.canonical_reason().unwrap_or("Error").into(),
                status: status.as_u16(),
                detail: message.clone(),
                error: error.into(),
                message,
            }),
        )
    }
}

impl From<Error> for ApiFailure {
    fn from(e: Error) -> Self {
        let (status, code) = match &e {
            Error::Invalid { .. } => (StatusCode::BAD_REQUEST, "invalid"),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Error::Quota(_) => (StatusCode::TOO_MANY_REQUESTS, "quota"),
            Error::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Error::Failed { .. } => (StatusCode::CONFLICT, "failed"),
            Error::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            Error::Kube(_) => (StatusCode::BAD_GATEWAY, "upstream"),
            Error::Storage(_) => (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage"),
            Error::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Error::Io { .. } | Error::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        if status.is_server_error() {
            tracing::error!(error = %e, source = ?std::error::Error::source(&e), "request failed");
        }
        Self::new(status, code, e.public_message())
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        let mut response = (self.0, Json(self.1)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/problem+json"),
        );
        response
    }
}

type ApiResult<T> = std::result::Result<T, ApiFailure>;

/// Query strings whose rejections are problem documents too.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequestParts<S>
    for QueryParams<T>
{
    type Rejection = ApiFailure;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> std::result::Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(Self(v)),
            Err(rejection) => Err(ApiFailure::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                rejection.body_text(),
            )),
        }
    }
}

/// JSON bodies whose rejections are JSON errors too.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiFailure;
    async fn from_request(req: Request, state: &S) -> std::result::Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(rejection) => {
                // One status for every malformed body (wrong content type,
                // bad JSON, wrong fields): the message says which.
                Err(ApiFailure::new(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    rejection.body_text(),
                ))
            }
        }
    }
}

/// The caller, from the bearer token ([`Caller::Anyone`] when auth is off).
fn caller(state: &ApiState, headers: &HeaderMap) -> ApiResult<Caller> {
    let Some(tokens) = &state.tokens else {
        return Ok(Caller::Anyone);
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .ok_or_else(|| {
            ApiFailure::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send `Authorization: Bearer <token>`",
            )
        })?;
    let owner = tokens.owner_of(presented.trim()).ok_or_else(|| {
        ApiFailure::new(StatusCode::UNAUTHORIZED, "unauthorized", "unknown token")
    })?;
    Ok(Caller::Owner(owner.to_owned()))
}

/// `POST /api/v1/instances`.
#[derive(Deserialize, ToSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    /// The portal's job or task id.
    #[schema(
        min_length = 1,
        max_length = 253,
        pattern = r"^[^\s\x00-\x1f\x7f-\x9f]([^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f])?$"
    )]
    pub workload: String,
    /// The artefact archive.
    pub artifacts: Artifacts,
    /// Time to live, e.g. `24h` (default: the server's; bounds are the server's).
    #[serde(default)]
    #[schema(pattern = r"^[0-9]+(s|m|h|d)$", example = "24h")]
    pub ttl: Option<String>,
    /// Owner (only without token auth; with a token, the token's owner).
    #[serde(default)]
    #[schema(pattern = r"^\S{1,128}$")]
    pub owner: Option<String>,
    /// Let visitors write through the instance (create experiments, delete
    /// runs, ...). Default false: a read-only viewer.
    #[serde(default)]
    pub writes: bool,
    /// Who may open it: `link` (default: only through the `access_url` the
    /// API shows) or `public` (the URL alone).
    #[serde(default)]
    pub access: Access,
    /// The credentials set the archive is fetched with (a private archive
    /// behind a token or a client certificate): only a name the installation
    /// grants this owner (403 otherwise); default: the installation's.
    #[serde(default)]
    #[schema(
        min_length = 1,
        max_length = 253,
        pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
    )]
    pub credentials: Option<String>,
    /// Sleep after this long without a visit, e.g. `2h`; `0`: never (default:
    /// the server's `--idle-after`). A sleeping instance keeps its id and URL
    /// and wakes on the next visit. At least 1m; backends without sleep: 400.
    #[serde(default)]
    #[schema(pattern = r"^(0|[0-9]+(s|m|h|d))$", example = "2h")]
    pub idle_after: Option<String>,
}

/// `POST /api/v1/instances/{id}/links`.
#[derive(Deserialize, ToSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct LinkBody {
    /// How long the link may be used to sign in, e.g. `1h` (default 10m, at
    /// most 7d, never past the instance's expiry).
    #[serde(default)]
    #[schema(pattern = r"^[0-9]+(s|m|h|d)$", example = "1h")]
    pub ttl: Option<String>,
}

/// A minted access link.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct AccessLink {
    /// Opens the instance; signs the browser in until the instance expires.
    pub access_url: String,
}

/// `POST /api/v1/instances/{id}/extend`: exactly one of `expires_at` and
/// `ttl`. `expires_at` is idempotent by itself (an expiry already at or past
/// it is left alone); `ttl` adds to the current expiry, so a retry carries
/// the first try's `Idempotency-Key` header and is not applied twice.
#[derive(Deserialize, ToSchema, Debug)]
#[serde(deny_unknown_fields)]
pub struct ExtendBody {
    /// How much longer, e.g. `12h`.
    #[serde(default)]
    #[schema(pattern = r"^[0-9]+(s|m|h|d)$", example = "12h")]
    pub ttl: Option<String>,
    /// The new expiry (RFC 3339), at most the longest TTL from now.
    #[serde(default)]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<jiff::Timestamp>,
}

/// Idempotency keys of `extend` calls already applied (per API process), so
/// a retried relative extension is not applied twice. Kept as digests: a
/// caller's keys cost 32 bytes each however long they are.
#[derive(Default)]
pub struct AppliedKeys(std::sync::Mutex<HashMap<[u8; 32], std::time::Instant>>);

impl AppliedKeys {
    /// How long a key is remembered.
    const KEEP: Duration = Duration::from_secs(3600);
    /// Most keys remembered.
    const MAX: usize = 10_000;

    /// True the first time `key` is seen (within [`Self::KEEP`]).
    fn first(&self, key: String) -> bool {
        let key: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let now = std::time::Instant::now();
        let mut keys = self.0.lock().expect("keys lock");
        if keys.len() >= Self::MAX {
            keys.retain(|_, at| now.duration_since(*at) < Self::KEEP);
            if keys.len() >= Self::MAX {
                keys.clear();
            }
        }
        match keys.get(&key) {
            Some(at) if now.duration_since(*at) < Self::KEEP => false,
            _ => {
                keys.insert(key, now);
                true
            }
        }
    }
}

/// `GET /api/v1/instances` query.
#[derive(Deserialize, Debug, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this workload.
    pub workload: Option<String>,
    /// Only this owner.
    pub owner: Option<String>,
    /// At most this many instances (1 to 1000); the answer's `continue`
    /// fetches the next page. Without it: every instance, one page.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    pub limit: Option<String>,
    /// The `continue` of the previous page.
    #[serde(rename = "continue")]
    #[param(rename = "continue")]
    pub after: Option<String>,
}

/// One page of instances, oldest first (ties by id), as Kubernetes lists page.
#[derive(Serialize, Deserialize, ToSchema, Debug)]
pub struct InstanceList {
    /// The instances of this page.
    pub items: Vec<Instance>,
    /// Opaque: pass as `continue` for the next page; absent on the last one.
    #[serde(rename = "continue", default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// Where a page starts: after this (created_at, id).
fn cursor(i: &Instance) -> String {
    hex::encode(format!("{}|{}", i.created_at, i.id))
}

fn parse_cursor(token: &str) -> Option<(jiff::Timestamp, String)> {
    let raw = String::from_utf8(hex::decode(token).ok()?).ok()?;
    let (at, id) = raw.split_once('|')?;
    InstanceId::parse(id).ok()?;
    Some((at.parse().ok()?, id.to_owned()))
}

/// The page of `all` after `after`, at most `limit` long.
fn page(
    mut all: Vec<Instance>,
    limit: Option<usize>,
    after: Option<&str>,
) -> ApiResult<InstanceList> {
    all.sort_by(|a, b| (a.created_at, a.id.as_str()).cmp(&(b.created_at, b.id.as_str())));
    if let Some(token) = after {
        let (at, id) = parse_cursor(token).ok_or_else(|| {
            ApiFailure::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                "continue: not a token this API gave",
            )
        })?;
        all.retain(|i| (i.created_at, i.id.as_str()) > (at, id.as_str()));
    }
    let Some(limit) = limit else {
        return Ok(InstanceList {
            items: all,
            next: None,
        });
    };
    if !(1..=1000).contains(&limit) {
        return Err(ApiFailure::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            "limit: between 1 and 1000",
        ));
    }
    let next = (all.len() > limit).then(|| cursor(&all[limit - 1]));
    all.truncate(limit);
    Ok(InstanceList { items: all, next })
}

/// One server-sent event as framed on the wire: `event:` names the step,
/// `data:` holds an [`Event`] as JSON.
#[derive(ToSchema)]
pub struct SseFrame {
    /// The step (`created`, ..., `ready` or `failed`).
    pub event: String,
    /// The [`Event`], as JSON.
    #[schema(content_media_type = "application/json")]
    pub data: String,
}

/// The OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(title = "Flowgate", description = "Short-lived MLflow instances for job results", version = "1"),
    paths(create, list, get_one, events, extend, links, delete),
    components(schemas(Instance, Artifacts, Phase, Access, CreateBody, ExtendBody, LinkBody, AccessLink, InstanceList, ApiError, Event, SseFrame)),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Builds the router.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/api/v1/instances", post(create).get(list))
        .route("/api/v1/instances/{id}", get(get_one).delete(delete))
        .route("/api/v1/instances/{id}/events", get(events))
        .route("/api/v1/instances/{id}/extend", post(extend))
        .route("/api/v1/instances/{id}/links", post(links))
        .route(
            "/api/v1/openapi.json",
            get(|| async { Json(ApiDoc::openapi()) }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiFailure::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .layer(middleware::from_fn_with_state(Arc::clone(&state), count))
        .with_state(state)
}

/// `router` answering 421 Misdirected Request to a `Host` not in `hosts`
/// (probe paths excepted): see [`crate::hosts`].
pub fn guard_hosts(router: Router, hosts: Arc<PublicHosts>) -> Router {
    router.layer(middleware::from_fn(move |req: Request, next: Next| {
        let hosts = Arc::clone(&hosts);
        async move {
            if hosts.admits(&req) {
                next.run(req).await
            } else {
                ApiFailure::new(
                    StatusCode::MISDIRECTED_REQUEST,
                    "misdirected",
                    "this host name is not served here (see flowgate serve --public-host)",
                )
                .into_response()
            }
        }
    }))
}

async fn count(State(state): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    state
        .requests
        .get_or_create(&[("status", response.status().as_u16().to_string())])
        .inc();
    response
}

async fn metrics(State(state): State<Arc<ApiState>>) -> impl IntoResponse {
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &state.registry);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
}

fn parse_id(raw: &str) -> ApiResult<InstanceId> {
    InstanceId::parse(raw).map_err(|_| {
        ApiFailure::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no instance {raw:?}"),
        )
    })
}

/// Create an instance, or return the live one for the same workload and artefacts.
#[utoipa::path(post, path = "/api/v1/instances", request_body = CreateBody, responses(
    (status = 201, description = "created", body = Instance,
        headers(("Location" = String, description = "the instance: /api/v1/instances/{id}"))),
    (status = 200, description = "the live instance for this workload and checksum", body = Instance,
        headers(("Location" = String, description = "the instance: /api/v1/instances/{id}"))),
    (status = 400, body = ApiError, content_type = "application/problem+json"), (status = 401, body = ApiError, content_type = "application/problem+json"), (status = 403, body = ApiError, content_type = "application/problem+json"), (status = 429, body = ApiError, content_type = "application/problem+json")))]
async fn create(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<CreateBody>,
) -> ApiResult<(
    StatusCode,
    [(header::HeaderName, String); 1],
    Json<Instance>,
)> {
    let caller = caller(&state, &headers)?;
    let p = &state.provisioner;
    let request = CreateRequest {
        owner: caller.owner_for(body.owner.as_deref())?,
        workload: Workload::parse(&body.workload)?,
        artifacts: p.artifacts(&body.artifacts.url, &body.artifacts.sha256)?,
        ttl: p.ttl_policy().resolve(body.ttl.as_deref())?,
        writes: body.writes,
        access: body.access,
        credentials: body.credentials,
        idle_after: body
            .idle_after
            .as_deref()
            .map(crate::instance::parse_idle_after)
            .transpose()?,
    };
    let created = p.create(request).await?;
    let status = if created.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let location = format!("/api/v1/instances/{}", created.instance.id);
    Ok((
        status,
        [(header::LOCATION, location)],
        Json(created.instance),
    ))
}

/// List instances (a token's caller sees only its own).
#[utoipa::path(get, path = "/api/v1/instances", params(ListQuery), responses((status = 200, body = InstanceList), (status = 400, body = ApiError, content_type = "application/problem+json"), (status = 401, body = ApiError, content_type = "application/problem+json")))]
async fn list(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    QueryParams(q): QueryParams<ListQuery>,
) -> ApiResult<Json<InstanceList>> {
    let caller = caller(&state, &headers)?;
    let filter = ListFilter {
        workload: q.workload,
        owner: q.owner,
    };
    let all = state.provisioner.list(&caller, filter).await?;
    // parsed here, so that anything but 1..=1000 (`limit=`, `-1`) is a 400 problem
    let limit = match q.limit.as_deref() {
        None => None,
        Some(raw) => Some(raw.parse::<usize>().map_err(|_| {
            ApiFailure::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                "limit: between 1 and 1000",
            )
        })?),
    };
    Ok(Json(page(all, limit, q.after.as_deref())?))
}

/// One instance.
#[utoipa::path(get, path = "/api/v1/instances/{id}", params(("id" = String, Path, description = "instance id"),
        ("If-None-Match" = Option<String>, Header, description = "an ETag of an earlier answer: 304 when nothing changed")),
    responses((status = 200, body = Instance, headers(("ETag" = String, description = "changes when anything but access_url changes"))),
        (status = 304, description = "unchanged since the ETag given (no body: keep the earlier answer, whose access_url may have expired)"),
        (status = 401, body = ApiError, content_type = "application/problem+json"), (status = 403, body = ApiError, content_type = "application/problem+json"), (status = 404, body = ApiError, content_type = "application/problem+json")))]
async fn get_one(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let caller = caller(&state, &headers)?;
    let instance = state.provisioner.get(&caller, &parse_id(&id)?).await?;
    let tag = etag(&instance);
    let unchanged = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == tag || t.trim() == "*");
    let status = if unchanged {
        StatusCode::NOT_MODIFIED
    } else {
        StatusCode::OK
    };
    let mut response = if unchanged {
        status.into_response()
    } else {
        Json(instance).into_response()
    };
    if let Ok(v) = header::HeaderValue::from_str(&tag) {
        response.headers_mut().insert(header::ETAG, v);
    }
    Ok(response)
}

/// A weak validator over everything the instance says but its access link,
/// which is minted anew on every read.
fn etag(instance: &Instance) -> String {
    let mut stable = instance.clone();
    stable.access_url = None;
    let bytes = serde_json::to_vec(&stable).expect("instances serialise");
    format!("W/\"{}\"", &hex::encode(Sha256::digest(&bytes))[..20])
}

/// Launch progress as server-sent events, until ready or failed; a heartbeat every 15 s.
#[utoipa::path(get, path = "/api/v1/instances/{id}/events", params(("id" = String, Path, description = "instance id")),
    responses((status = 200, description = "text/event-stream of Event", content_type = "text/event-stream", body = SseFrame), (status = 401, body = ApiError, content_type = "application/problem+json"), (status = 403, body = ApiError, content_type = "application/problem+json"), (status = 404, body = ApiError, content_type = "application/problem+json")))]
async fn events(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Sse<impl Stream<Item = std::result::Result<axum::response::sse::Event, Infallible>>>>
{
    let caller = caller(&state, &headers)?;
    let id = parse_id(&id)?;
    let stream = state.provisioner.events(&caller, &id).await?;
    let sse = stream.map(|e| {
        Ok(axum::response::sse::Event::default()
            .event(e.step.clone())
            .json_data(&e)
            .expect("events serialise"))
    });
    Ok(Sse::new(sse).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// Push the expiry further.
#[utoipa::path(post, path = "/api/v1/instances/{id}/extend", params(("id" = String, Path, description = "instance id")), request_body = ExtendBody,
    responses((status = 200, body = Instance), (status = 400, body = ApiError, content_type = "application/problem+json"), (status = 401, body = ApiError, content_type = "application/problem+json"), (status = 403, body = ApiError, content_type = "application/problem+json"), (status = 404, body = ApiError, content_type = "application/problem+json")))]
async fn extend(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ExtendBody>,
) -> ApiResult<Json<Instance>> {
    let caller = caller(&state, &headers)?;
    let id = parse_id(&id)?;
    let p = &state.provisioner;
    match (body.ttl, body.expires_at) {
        (None, Some(at)) => Ok(Json(p.extend_to(&caller, &id, at).await?)),
        (Some(raw), None) => {
            let ttl = parse_ttl(&raw)?;
            if let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
                // the key is the caller's: another caller's key never matches
                if !state.applied.first(format!("{caller:?}\n{id}\n{key}")) {
                    return Ok(Json(p.get(&caller, &id).await?));
                }
            }
            Ok(Json(p.extend(&caller, &id, ttl).await?))
        }
        _ => Err(Error::invalid("ttl", "give exactly one of ttl and expires_at").into()),
    }
}

/// A `ttl` field (`90s`, `12h`), or why it is not one.
fn parse_ttl(raw: &str) -> Result<Duration> {
    humantime::parse_duration(raw).map_err(|e| Error::invalid("ttl", format!("{raw:?}: {e}")))
}

/// Mint another access link to a `link` instance (to share it).
#[utoipa::path(post, path = "/api/v1/instances/{id}/links", params(("id" = String, Path, description = "instance id")), request_body = LinkBody,
    responses((status = 201, body = AccessLink), (status = 400, body = ApiError, content_type = "application/problem+json"), (status = 401, body = ApiError, content_type = "application/problem+json"), (status = 403, body = ApiError, content_type = "application/problem+json"), (status = 404, body = ApiError, content_type = "application/problem+json")))]
async fn links(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<LinkBody>,
) -> ApiResult<(StatusCode, Json<AccessLink>)> {
    let caller = caller(&state, &headers)?;
    let id = parse_id(&id)?;
    let ttl = match body.ttl.as_deref() {
        None => crate::access::Links::DEFAULT_TTL,
        Some(raw) => parse_ttl(raw)?,
    };
    let access_url = state.provisioner.link(&caller, &id, ttl).await?;
    Ok((StatusCode::CREATED, Json(AccessLink { access_url })))
}

/// Delete an instance.
#[utoipa::path(delete, path = "/api/v1/instances/{id}", params(("id" = String, Path, description = "instance id")),
    responses((status = 204, description = "deleted"), (status = 401, body = ApiError, content_type = "application/problem+json"), (status = 403, body = ApiError, content_type = "application/problem+json"), (status = 404, body = ApiError, content_type = "application/problem+json")))]
async fn delete(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let caller = caller(&state, &headers)?;
    let id = parse_id(&id)?;
    state.provisioner.delete(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Refuses to serve an open API (no tokens) on anything but loopback.
pub fn check_listen(listen: std::net::SocketAddr, tokens: bool) -> Result<()> {
    if !tokens && !listen.ip().is_loopback() {
        return Err(Error::invalid(
            "listen",
            format!(
                "{listen} is not loopback: give --tokens FILE to serve the API beyond this machine"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str, created: &str) -> Instance {
        serde_json::from_value(serde_json::json!({
            "id": id, "workload": "w", "owner": "o",
            "artifacts": {"url": "https://x.test/a.tgz", "sha256": "0".repeat(64)},
            "created_at": created, "expires_at": "2030-01-01T00:00:00Z",
            "url": format!("https://h/{id}/"), "phase": "Ready",
        }))
        .unwrap()
    }

    #[test]
    fn pages_walk_every_instance_once_in_order() {
        let all: Vec<Instance> = (0..7)
            .map(|i| {
                instance(
                    &format!("a{i:06}"),
                    &format!("2026-12-0{}T00:00:00Z", 1 + i % 3),
                )
            })
            .collect();
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let p = page(all.clone(), Some(3), after.as_deref()).unwrap();
            assert!(p.items.len() <= 3);
            seen.extend(p.items.iter().map(|i| (i.created_at, i.id.to_string())));
            match p.next {
                Some(t) => after = Some(t),
                None => break,
            }
        }
        let mut want: Vec<_> = all
            .iter()
            .map(|i| (i.created_at, i.id.to_string()))
            .collect();
        want.sort();
        assert_eq!(seen, want);
        // a limit that fits everything: one page, no token
        let one = page(all.clone(), Some(7), None).unwrap();
        assert!(one.items.len() == 7 && one.next.is_none());
        assert!(page(all.clone(), None, None).unwrap().next.is_none());
        // bad input is a 400, not a panic or an empty page
        for (limit, token) in [
            (Some(0), None),
            (Some(1001), None),
            (Some(3), Some("zz")),
            (Some(3), Some("00")),
        ] {
            let e = page(all.clone(), limit, token).expect_err("refused");
            assert_eq!(e.0, StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn an_idempotency_key_is_applied_once_however_long() {
        let keys = AppliedKeys::default();
        let long = "k".repeat(60_000);
        assert!(keys.first(long.clone()));
        assert!(!keys.first(long));
        assert!(keys.first("other".into()));
    }

    #[test]
    fn errors_are_problem_documents() {
        let r = ApiFailure::new(StatusCode::TOO_MANY_REQUESTS, "quota", "too many").into_response();
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let e = ApiFailure::new(StatusCode::TOO_MANY_REQUESTS, "quota", "too many").1;
        let v = serde_json::to_value(e).unwrap();
        assert_eq!(v["type"], "urn:flowgate:error:quota");
        assert_eq!(v["title"], "Too Many Requests");
        assert_eq!(v["status"], 429);
        assert_eq!(v["detail"], "too many");
        assert_eq!(v["error"], "quota");
    }
}
