//! Serving the REST API: the adapter's accept loop ([`adapter::server`]:
//! a bounded number of connections, silent and half-preface connections
//! closed, idle keep-alive bounded, HTTP/2 pings, a bounded drain), and a
//! bound on the time to answer one request (a client trickling its body, a
//! backend call that hangs). The bound is on the response head only: an
//! event stream, once answered, runs as long as the launch does.

use super::{ApiFailure, ApiState};
use adapter::metrics::ConnectionMetrics;
use adapter::request_body::RequestBody;
use adapter::server::{ConnectionLimits, Drain, Handler};
use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tower::ServiceExt;

/// How the API's connections and requests are bounded.
#[derive(Clone, Debug)]
pub struct ApiLimits {
    /// Connections, silence, request heads, drain.
    pub connections: ConnectionLimits,
    /// Longest time from a request's head to its response's head.
    pub request_timeout: Duration,
}

/// `router` answering 504 `timeout` when a request is not answered within
/// `limit`.
pub fn with_request_timeout(router: Router, limit: Duration) -> Router {
    router.layer(middleware::from_fn(move |req: Request, next: Next| async move {
        match tokio::time::timeout(limit, next.run(req)).await {
            Ok(response) => response,
            Err(_) => {
                tracing::warn!(limit = ?limit, "request not answered in time");
                ApiFailure::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    format!(
                        "the request was not answered within {} (see flowgate serve --request-timeout)",
                        humantime::format_duration(limit)
                    ),
                )
                .into_response()
            }
        }
    }))
}

/// The API as an [`adapter::server::Handler`].
struct ApiHandler {
    router: Router,
    connections: ConnectionMetrics,
}

impl Handler for ApiHandler {
    type Body = axum::body::Body;

    async fn handle(
        self: Arc<Self>,
        req: hyper::Request<RequestBody>,
        _peer: SocketAddr,
    ) -> axum::response::Response {
        let req = req.map(axum::body::Body::new);
        match self.router.clone().oneshot(req).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }

    fn connection_metrics(&self) -> Option<&ConnectionMetrics> {
        Some(&self.connections)
    }
}

/// Serves `app` (the [`super::router`], with its layers) on `listener` until
/// `shutdown`, then drains within `limits.connections.drain_timeout`.
pub async fn serve_api(
    app: Router,
    state: &ApiState,
    limits: &ApiLimits,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Drain {
    let handler = Arc::new(ApiHandler {
        router: with_request_timeout(app, limits.request_timeout),
        connections: state.connections.clone(),
    });
    adapter::server::serve(handler, &limits.connections, listener, shutdown).await
}
