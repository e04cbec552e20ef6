//! One listener for every local instance: `/<id>/...` goes to that instance's
//! adapter [`Proxy`] (the sidecar's code, used as a library), so each MLflow sees
//! what it would see in a pod. Clients guessing ids are slowed down
//! ([`super::guesses`]). A sleeping instance is the activator's: a visitor its
//! access gate lets through gets a page that wakes it (once, however many
//! visit), follows `/<id>/.flowgate/wake` and reloads the page when it is
//! ready; other requests get 503 with `Retry-After`.

use super::guesses::Guesses;
use crate::hosts::PublicHosts;
use crate::waking::{
    MAX_STEPS, WAKE_STATUS_PATH, asleep, navigates, page, wake_status, waking_page,
};
use adapter::Proxy;
use adapter::body::ProxyBody;
use adapter::request_body::RequestBody;
use adapter::server::Handler;
use http::{Request, Response, StatusCode, header};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Instance id → its proxy; instances not serving, and why.
#[derive(Default)]
pub struct RouteTable {
    routes: RwLock<HashMap<String, Arc<Proxy>>>,
    starting: RwLock<HashMap<String, Waiting>>,
    /// What a wake has done so far, for the waking page.
    steps: RwLock<HashMap<String, Vec<String>>>,
}

/// Why an instance is not served right now.
#[derive(Clone)]
enum Waiting {
    Starting,
    Restarting,
    Failed,
    /// Asleep: `gate` (the instance's adapter, its MLflow stopped) decides
    /// who may wake it; `wake` tells the supervisor.
    Sleeping {
        gate: Arc<Proxy>,
        wake: Arc<Notify>,
    },
    /// Woken, starting again; `gate` as above.
    Waking {
        gate: Arc<Proxy>,
    },
}

impl Waiting {
    fn state(&self) -> &'static str {
        match self {
            Waiting::Starting => "starting",
            Waiting::Restarting => "restarting",
            Waiting::Failed => "failed",
            Waiting::Sleeping { .. } => "sleeping",
            Waiting::Waking { .. } => "waking",
        }
    }
}

impl RouteTable {
    /// Marks an instance as starting (answered with a page that retries).
    pub fn starting(&self, id: &str) {
        self.wait(id, Waiting::Starting);
    }

    /// Marks an instance whose MLflow exited and is restarting (503, `Retry-After`).
    pub fn restarting(&self, id: &str) {
        self.wait(id, Waiting::Restarting);
    }

    /// Marks a Failed instance (503, no retry; the reason is in the API, not
    /// shown to visitors, as it may hold paths and log lines).
    pub fn failed(&self, id: &str) {
        self.wait(id, Waiting::Failed);
    }

    fn wait(&self, id: &str, why: Waiting) {
        self.routes.write().expect("route lock").remove(id);
        self.starting
            .write()
            .expect("route lock")
            .insert(id.to_owned(), why);
    }

    /// Puts an instance to sleep: a visitor `gate` lets through wakes it by
    /// notifying `wake` (once).
    pub fn sleeping(&self, id: &str, gate: Arc<Proxy>, wake: Arc<Notify>) {
        self.steps.write().expect("route lock").remove(id);
        self.wait(id, Waiting::Sleeping { gate, wake });
    }

    /// Notes a step of a wake, shown on the waking page (a few words, no
    /// paths or logs: visitors read them).
    pub fn note(&self, id: &str, step: impl Into<String>) {
        if !matches!(
            self.starting.read().expect("route lock").get(id),
            Some(Waiting::Waking { .. } | Waiting::Failed)
        ) {
            return;
        }
        let mut steps = self.steps.write().expect("route lock");
        let list = steps.entry(id.to_owned()).or_default();
        if list.len() < MAX_STEPS {
            list.push(step.into());
        }
    }

    /// The first visit to a sleeping instance: the wake to notify, for that
    /// visit only (later ones find it waking).
    fn begin_wake(&self, id: &str) -> Option<Arc<Notify>> {
        let mut starting = self.starting.write().expect("route lock");
        let Some(Waiting::Sleeping { gate, wake }) = starting.get(id).cloned() else {
            return None;
        };
        starting.insert(id.to_owned(), Waiting::Waking { gate });
        Some(wake)
    }

    /// Routes `/<id>/` to `proxy`.
    pub fn insert(&self, id: &str, proxy: Arc<Proxy>) {
        self.routes
            .write()
            .expect("route lock")
            .insert(id.to_owned(), proxy);
        self.starting.write().expect("route lock").remove(id);
    }

    /// Forgets an instance.
    pub fn remove(&self, id: &str) {
        self.routes.write().expect("route lock").remove(id);
        self.starting.write().expect("route lock").remove(id);
        self.steps.write().expect("route lock").remove(id);
    }

    /// The access gate of an instance, serving or asleep.
    fn gate(&self, id: &str) -> Option<Arc<Proxy>> {
        match self.lookup(id) {
            Lookup::Ready(p) => Some(p),
            Lookup::Waiting(Waiting::Sleeping { gate, .. } | Waiting::Waking { gate }) => {
                Some(gate)
            }
            _ => None,
        }
    }

    /// The wake's state and steps, as the waking page reads them.
    fn wake_status(&self, id: &str) -> Option<Response<ProxyBody>> {
        let state = match self.lookup(id) {
            Lookup::Ready(_) => "ready",
            Lookup::Waiting(w) => w.state(),
            Lookup::Unknown => return None,
        };
        let steps = self
            .steps
            .read()
            .expect("route lock")
            .get(id)
            .cloned()
            .unwrap_or_default();
        Some(wake_status(state, &steps))
    }

    fn lookup(&self, id: &str) -> Lookup {
        if let Some(p) = self.routes.read().expect("route lock").get(id) {
            return Lookup::Ready(Arc::clone(p));
        }
        match self.starting.read().expect("route lock").get(id) {
            Some(w) => Lookup::Waiting(w.clone()),
            None => Lookup::Unknown,
        }
    }
}

enum Lookup {
    Ready(Arc<Proxy>),
    Waiting(Waiting),
    Unknown,
}

/// The local listener's request handler.
pub struct LocalRouter {
    table: Arc<RouteTable>,
    hosts: Option<Arc<PublicHosts>>,
    guesses: Option<Guesses>,
}

impl LocalRouter {
    /// A router over `table` that answers any `Host`.
    pub fn new(table: Arc<RouteTable>) -> Self {
        Self {
            table,
            hosts: None,
            guesses: None,
        }
    }

    /// Answers 429 to a client that asked for more than `limit` unknown ids
    /// in a minute, for every instance path, until its minute ends.
    pub fn with_guess_limit(mut self, limit: u32) -> Self {
        self.guesses = Some(Guesses::new(limit, Duration::from_secs(60)));
        self
    }

    /// Answers 421 to a `Host` not in `hosts` (`/healthz` excepted): a page on
    /// another site rebound to this address cannot read the instances.
    pub fn with_public_hosts(mut self, hosts: Arc<PublicHosts>) -> Self {
        self.hosts = Some(hosts);
        self
    }
}

/// 429 for a client guessing ids, with when to come back.
fn too_many_guesses(wait: Duration) -> Response<ProxyBody> {
    let mut r = page(
        StatusCode::TOO_MANY_REQUESTS,
        "Too many requests",
        "Too many requests for instances that do not exist. Try again in a minute.",
        false,
    );
    let secs = wait.as_secs().max(1).to_string();
    if let Ok(v) = header::HeaderValue::from_str(&secs) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

impl Handler for LocalRouter {
    type Body = ProxyBody;

    async fn handle(
        self: Arc<Self>,
        req: Request<RequestBody>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let path = req.uri().path();
        if path == "/healthz" {
            return Response::new(ProxyBody::full("ok\n"));
        }
        if let Some(hosts) = &self.hosts
            && !hosts.admits(&req)
        {
            return page(
                StatusCode::MISDIRECTED_REQUEST,
                "Misdirected request",
                "This host name is not served here.",
                false,
            );
        }
        let id = path
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or("")
            .to_owned();
        let now = Instant::now();
        if let Some(wait) = self
            .guesses
            .as_ref()
            .and_then(|g| g.blocked(peer.ip(), now))
        {
            return too_many_guesses(wait);
        }
        if path
            .strip_prefix('/')
            .and_then(|p| p.strip_prefix(id.as_str()))
            == Some(WAKE_STATUS_PATH)
            && let Some(status) = self.table.wake_status(&id)
        {
            // as much as the instance itself: a `link` instance tells only
            // signed-in visitors
            if let Some(answer) = self.table.gate(&id).and_then(|g| g.gate_answer(&req)) {
                return answer;
            }
            return status;
        }
        let lookup = self.table.lookup(&id);
        if matches!(lookup, Lookup::Unknown)
            && let Some(wait) = self.guesses.as_ref().and_then(|g| g.miss(peer.ip(), now))
        {
            tracing::warn!(client = %peer.ip(), "too many unknown instance ids: 429 until the minute ends");
            return too_many_guesses(wait);
        }
        match lookup {
            Lookup::Ready(proxy) => proxy.handle(req, peer).await,
            Lookup::Waiting(Waiting::Starting) => page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Starting",
                "This MLflow instance is loading its artefacts and starting. This page retries by itself.",
                true,
            ),
            Lookup::Waiting(Waiting::Restarting) => page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Restarting",
                "This MLflow instance stopped unexpectedly and is being restarted. This page retries by itself.",
                true,
            ),
            Lookup::Waiting(Waiting::Failed) => page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Failed",
                "This MLflow instance failed and will not come back by itself. The portal shows why.",
                false,
            ),
            Lookup::Waiting(Waiting::Sleeping { gate, .. } | Waiting::Waking { gate }) => {
                // Only a visitor the instance would serve may wake it (a
                // `link` instance: signed in); the gate answers the others.
                if let Some(answer) = gate.gate_answer(&req) {
                    return answer;
                }
                if !navigates(&req) {
                    return asleep();
                }
                if let Some(wake) = self.table.begin_wake(&id) {
                    tracing::info!(%id, "waking on a visit");
                    wake.notify_one();
                }
                waking_page(&id)
            }
            Lookup::Unknown => page(
                StatusCode::NOT_FOUND,
                "No such instance",
                "It may have expired or been deleted.",
                false,
            ),
        }
    }
}
