//! The operator's Prometheus metrics and its small HTTP listener
//! (`--metrics-listen`): `/metrics`, `/healthz` (the process lives) and
//! `/readyz` (the controller runs or waits for the lease).

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Reconcile counters and timings, and whether this replica leads.
pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    failures: Counter,
    duration: Histogram,
    leader: Gauge,
    healthy: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every series under `flowgate_operator_`.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("flowgate_operator");
        let reconciles = Counter::default();
        let failures = Counter::default();
        let duration = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ]);
        let leader = Gauge::default();
        registry.register(
            "reconciles",
            "Reconciles of MlflowInstance resources",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Reconciles that ended in an error (retried with exponential backoff)",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "How long reconciles take",
            duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the lease and runs the controller",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            failures,
            duration,
            leader,
            healthy: AtomicBool::new(true),
        }
    }

    /// Counts one reconcile that took `seconds`, failed or not.
    pub fn observe(&self, seconds: f64, failed: bool) {
        self.reconciles.inc();
        if failed {
            self.failures.inc();
        }
        self.duration.observe(seconds);
    }

    /// Reconciles so far.
    pub fn reconciles(&self) -> u64 {
        self.reconciles.get()
    }

    /// Failed reconciles so far.
    pub fn failures(&self) -> u64 {
        self.failures.get()
    }

    /// Marks this replica as leading (running the controller) or not.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// True while this replica runs the controller.
    pub fn is_leader(&self) -> bool {
        self.leader.get() == 1
    }

    /// Marks the operator as broken (`/healthz` then answers 503).
    pub fn set_unhealthy(&self) {
        self.healthy.store(false, Ordering::SeqCst);
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// `/metrics`, `/healthz` and `/readyz`.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(healthz))
        .with_state(metrics)
}

async fn metrics_text(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}

async fn healthz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.healthy.load(Ordering::SeqCst) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "the controller stopped\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_exposed() {
        let m = Metrics::new();
        m.observe(0.02, false);
        m.observe(0.2, true);
        m.set_leader(true);
        let text = m.encode();
        assert!(
            text.contains("flowgate_operator_reconciles_total 2"),
            "{text}"
        );
        assert!(text.contains("flowgate_operator_reconcile_failures_total 1"));
        assert!(text.contains("flowgate_operator_reconcile_duration_seconds_count 2"));
        assert!(text.contains("flowgate_operator_leader 1"));
        assert!(m.is_leader());
    }
}
