//! One listener for every local instance: `/<id>/...` goes to that instance's
//! adapter [`Proxy`] (the sidecar's code, used as a library), so each MLflow sees
//! what it would see in a pod. Clients guessing ids are slowed down
//! ([`super::guesses`]).

use super::guesses::Guesses;
use crate::hosts::PublicHosts;
use adapter::Proxy;
use adapter::body::ProxyBody;
use adapter::server::Handler;
use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Instance id → its proxy; instances not serving, and why.
#[derive(Default)]
pub struct RouteTable {
    routes: RwLock<HashMap<String, Arc<Proxy>>>,
    starting: RwLock<HashMap<String, Waiting>>,
}

/// Why an instance is not served right now.
#[derive(Clone)]
enum Waiting {
    Starting,
    Restarting,
    Failed,
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

fn page(status: StatusCode, title: &str, text: &str, refresh: bool) -> Response<ProxyBody> {
    let meta = if refresh {
        "<meta http-equiv=\"refresh\" content=\"3\">"
    } else {
        ""
    };
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title>{meta}</head>\
         <body style=\"font-family:sans-serif;margin:3em\"><h1>{title}</h1><p>{text}</p></body></html>\n"
    );
    let mut r = Response::new(ProxyBody::full(html));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if refresh {
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("3"));
    }
    r
}

impl Handler for LocalRouter {
    type Body = ProxyBody;

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
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
            Lookup::Unknown => page(
                StatusCode::NOT_FOUND,
                "No such instance",
                "It may have expired or been deleted.",
                false,
            ),
        }
    }
}
