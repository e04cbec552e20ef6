//! Prometheus metrics. Every series is created at start-up and held by handle,
//! so the request path only touches atomics (no map lookups, no locks), except
//! the latency histogram's own short lock.

use crate::route::RouteClass;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const REWRITE_KINDS: [&str; 5] = ["header", "html", "css", "script", "compress"];
const UPSTREAM_ERRORS: [&str; 3] = ["connect", "upstream", "timeout"];
const REFUSALS: [&str; 4] = ["read_only", "host", "path", "access"];
const CACHE_RESULTS: [&str; 4] = ["hit", "revalidated", "stored", "passed"];

/// What the static cache did for a request it could serve.
#[derive(Clone, Copy, Debug)]
pub enum CacheResult {
    /// Sent from memory, the app not asked.
    Hit = 0,
    /// The app said 304; sent from memory.
    Revalidated = 1,
    /// Filled from the app's answer, then sent.
    Stored = 2,
    /// Forwarded as if there were no cache (not storable, or over a bound).
    Passed = 3,
}

/// Why a request was answered by the adapter instead of being forwarded.
#[derive(Clone, Copy, Debug)]
pub enum Refusal {
    /// A write to a read-only instance (403).
    ReadOnly = 0,
    /// A `Host` that is not a public host (421).
    Host = 1,
    /// A path that does not decode (400).
    Path = 2,
    /// No valid access link or session on a `link` instance (401).
    Access = 3,
}

/// Connection-level series, shared with the accept loop.
#[derive(Clone, Debug, Default)]
pub struct ConnectionMetrics {
    /// Connections open now.
    pub open: Gauge,
    /// Connections closed at accept because `--max-connections` were open.
    pub refused: Counter,
    /// Connections closed for silence: no request head in time, or idle.
    pub idle_closed: Counter,
}

impl ConnectionMetrics {
    /// Adds the series to `registry` (the adapter's, or the REST API's).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "open_connections",
            "Client connections open now",
            self.open.clone(),
        );
        registry.register(
            "refused_connections",
            "Client connections closed at accept: --max-connections were open",
            self.refused.clone(),
        );
        registry.register(
            "idle_closed_connections",
            "Client connections closed for sending no request in time",
            self.idle_closed.clone(),
        );
    }
}

fn touch(last_activity: &Gauge) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    last_activity.set(i64::try_from(now).unwrap_or(i64::MAX));
}

/// A proxied response body on its way (see [`Metrics::body_opened`]):
/// counts the bytes that reach the client, and the body as open until it is
/// dropped.
#[derive(Debug)]
pub struct BodySent {
    bytes: Counter,
    open: Gauge,
    last_activity: Gauge,
}

impl BodySent {
    /// Counts `n` more bytes sent.
    pub fn add(&self, n: u64) {
        self.bytes.inc_by(n);
    }
}

impl Drop for BodySent {
    fn drop(&mut self) {
        self.open.dec();
        touch(&self.last_activity);
    }
}

/// The adapter's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Vec<[Counter; 5]>,
    latency: Vec<Histogram>,
    response_bytes: Counter,
    rewrites: [Counter; 5],
    rewrite_capped: Counter,
    compression_shed: [Counter; 2],
    upstream_errors: [Counter; 3],
    in_flight: Gauge,
    last_activity: Gauge,
    open_bodies: Gauge,
    refused: [Counter; 4],
    abandoned: Counter,
    connections: ConnectionMetrics,
    static_cache: [Counter; 4],
    static_cache_bytes: Gauge,
}

/// What kind of rewrite happened, for [`Metrics::rewrite`].
#[derive(Clone, Copy, Debug)]
pub enum RewriteKind {
    /// A URL-bearing response header.
    Header = 0,
    /// An HTML body.
    Html = 1,
    /// A CSS body.
    Css = 2,
    /// An app bundle's literals.
    Script = 3,
    /// A body compressed for the client.
    Compress = 4,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every series.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("flowgate_adapter");
        let requests_family = Family::<[(&'static str, &'static str); 2], Counter>::default();
        let latency_family =
            Family::<[(&'static str, &'static str); 1], Histogram>::new_with_constructor(|| {
                Histogram::new([
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0,
                ])
            });
        let rewrites_family = Family::<[(&'static str, &'static str); 1], Counter>::default();
        let errors_family = Family::<[(&'static str, &'static str); 1], Counter>::default();
        let requests = RouteClass::ALL
            .iter()
            .map(|class| {
                STATUS_CLASSES.map(|s| {
                    requests_family
                        .get_or_create(&[("route", class.label()), ("status", s)])
                        .clone()
                })
            })
            .collect();
        let latency = RouteClass::ALL
            .iter()
            .map(|class| {
                latency_family
                    .get_or_create(&[("route", class.label())])
                    .clone()
            })
            .collect();
        let rewrites = REWRITE_KINDS.map(|k| rewrites_family.get_or_create(&[("kind", k)]).clone());
        let upstream_errors =
            UPSTREAM_ERRORS.map(|k| errors_family.get_or_create(&[("kind", k)]).clone());
        let refused_family = Family::<[(&'static str, &'static str); 1], Counter>::default();
        let refused = REFUSALS.map(|k| refused_family.get_or_create(&[("reason", k)]).clone());
        let abandoned = Counter::default();
        let connections = ConnectionMetrics::default();
        registry.register(
            "refused_requests",
            "Requests answered by the adapter, not forwarded: read_only (403), host (421), path (400), access (401)",
            refused_family,
        );
        registry.register(
            "abandoned_requests",
            "Requests whose client left before the response was ready",
            abandoned.clone(),
        );
        connections.register(&mut registry);
        let response_bytes = Counter::default();
        let rewrite_capped = Counter::default();
        let shed_family = Family::<[(&'static str, &'static str); 1], Counter>::default();
        let compression_shed =
            ["light", "identity"].map(|k| shed_family.get_or_create(&[("to", k)]).clone());
        registry.register(
            "compression_shed",
            "Responses compressed with a lighter coding (light: gzip for zstd/brotli) or not at all (identity) because --max-encoders were busy",
            shed_family,
        );
        let in_flight = Gauge::default();
        let last_activity = Gauge::default();
        let open_bodies = Gauge::default();
        registry.register(
            "requests",
            "Requests answered, by route class and status class",
            requests_family,
        );
        registry.register(
            "response_header_seconds",
            "Time from request to response headers, by route class",
            latency_family,
        );
        registry.register(
            "response_bytes",
            "Body bytes sent to clients",
            response_bytes.clone(),
        );
        registry.register("rewrites", "Responses rewritten, by kind", rewrites_family);
        registry.register(
            "rewrite_capped",
            "Responses whose rewriting hit a buffer cap (their rest passed through unrewritten)",
            rewrite_capped.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream failures, by kind",
            errors_family,
        );
        registry.register(
            "in_flight_requests",
            "Requests being handled now",
            in_flight.clone(),
        );
        registry.register(
            "last_activity_timestamp_seconds",
            "Unix time of the last proxied request's start or end (for idle culling)",
            last_activity.clone(),
        );
        registry.register(
            "open_response_bodies",
            "Proxied response bodies still being sent (downloads, event streams)",
            open_bodies.clone(),
        );
        let cache_family = Family::<[(&'static str, &'static str); 1], Counter>::default();
        let static_cache =
            CACHE_RESULTS.map(|k| cache_family.get_or_create(&[("result", k)]).clone());
        registry.register(
            "static_cache_requests",
            "Requests for the app's static files the cache could answer: hit (the app not asked), revalidated (the app said 304), stored (filled, then sent), passed (forwarded as without a cache)",
            cache_family,
        );
        let static_cache_bytes = Gauge::default();
        registry.register(
            "static_cache_bytes",
            "Bytes of static responses kept in memory",
            static_cache_bytes.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            response_bytes,
            rewrites,
            rewrite_capped,
            compression_shed,
            upstream_errors,
            in_flight,
            last_activity,
            open_bodies,
            refused,
            abandoned,
            connections,
            static_cache,
            static_cache_bytes,
        }
    }

    /// Counts what the static cache did for a request, and its size now
    /// when that may have changed (not on a hit).
    pub fn static_cache(&self, result: CacheResult, bytes: Option<usize>) {
        self.static_cache[result as usize].inc();
        if let Some(bytes) = bytes {
            self.static_cache_bytes
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }

    /// Counts a request answered by the adapter itself.
    pub fn refused(&self, why: Refusal) {
        self.refused[why as usize].inc();
    }

    /// Counts a request whose client left before the response was ready.
    pub fn abandoned(&self) {
        self.abandoned.inc();
    }

    /// The connection-level series.
    pub fn connections(&self) -> &ConnectionMetrics {
        &self.connections
    }

    /// Records an answered request.
    pub fn request(&self, class: RouteClass, status: u16, elapsed: Duration) {
        let status_class = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests[class.index()][status_class].inc();
        self.latency[class.index()].observe(elapsed.as_secs_f64());
    }

    /// Marks proxied activity now (not for health checks or scrapes).
    pub fn touch(&self) {
        touch(&self.last_activity);
    }

    /// A proxied response body starts: counted open until the returned
    /// guard is dropped (sent in full, or the client left), which marks
    /// activity again: a long download or an event stream keeps the
    /// instance awake while it lasts, and its end counts as a visit.
    pub fn body_opened(&self) -> BodySent {
        self.open_bodies.inc();
        BodySent {
            bytes: self.response_bytes.clone(),
            open: self.open_bodies.clone(),
            last_activity: self.last_activity.clone(),
        }
    }

    /// Whether a request or a response body is open now.
    pub fn busy(&self) -> bool {
        self.in_flight.get() > 0 || self.open_bodies.get() > 0
    }

    /// How long nothing has been proxied: `None` while a request or a
    /// response body is open, or before any activity was marked.
    pub fn idle_for(&self) -> Option<Duration> {
        if self.busy() {
            return None;
        }
        let last = u64::try_from(self.last_activity.get())
            .ok()
            .filter(|s| *s > 0)?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
        Some(Duration::from_secs(now.saturating_sub(last)))
    }

    /// Counts a rewrite.
    pub fn rewrite(&self, kind: RewriteKind, n: u64) {
        self.rewrites[kind as usize].inc_by(n);
    }

    /// Counts an upstream failure by its label (`connect`, `upstream`, `timeout`).
    pub fn upstream_error(&self, label: &str) {
        if let Some(i) = UPSTREAM_ERRORS.iter().position(|l| *l == label) {
            self.upstream_errors[i].inc();
        }
    }

    /// The counter of body bytes sent, for response bodies to add to.
    pub fn response_bytes(&self) -> &Counter {
        &self.response_bytes
    }

    /// The counters of responses shed to a light coding, and to none.
    pub fn compression_shed(&self) -> (Counter, Counter) {
        (
            self.compression_shed[0].clone(),
            self.compression_shed[1].clone(),
        )
    }

    /// The counter of responses whose rewriting hit a buffer cap.
    pub fn rewrite_capped(&self) -> &Counter {
        &self.rewrite_capped
    }

    /// The gauge of requests in flight.
    pub fn in_flight(&self) -> &Gauge {
        &self.in_flight
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_series() {
        let m = Metrics::new();
        m.request(RouteClass::Api, 200, Duration::from_millis(3));
        m.request(RouteClass::Api, 502, Duration::from_millis(1));
        m.rewrite(RewriteKind::Html, 1);
        m.upstream_error("connect");
        m.refused(Refusal::ReadOnly);
        m.connections().refused.inc();
        m.touch();
        let text = m.encode();
        assert!(
            text.contains(r#"flowgate_adapter_requests_total{route="api",status="2xx"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"flowgate_adapter_requests_total{route="api",status="5xx"} 1"#));
        assert!(text.contains(r#"flowgate_adapter_rewrites_total{kind="html"} 1"#));
        assert!(text.contains(r#"flowgate_adapter_upstream_errors_total{kind="connect"} 1"#));
        assert!(text.contains("flowgate_adapter_rewrite_capped_total 0"));
        assert!(text.contains(r#"flowgate_adapter_refused_requests_total{reason="read_only"} 1"#));
        assert!(text.contains(r#"flowgate_adapter_refused_requests_total{reason="host"} 0"#));
        assert!(text.contains("flowgate_adapter_refused_connections_total 1"));
        assert!(text.contains("flowgate_adapter_open_connections 0"));
        assert!(text.contains("flowgate_adapter_response_header_seconds_bucket"));
        assert!(!text.contains("flowgate_adapter_last_activity_timestamp_seconds 0\n"));
    }
}
