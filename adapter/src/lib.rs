//! `flowgate-adapter`: the sidecar reverse proxy that serves an app (MLflow) under
//! an instance path prefix it does not know about, and the artefact fetcher that
//! runs as the pod's init container.
//!
//! Reading order: [`config`] (what it is told) → [`server`] (connections, and [`request_body`]: bodies left unread) →
//! [`proxy`] (one request: [`host`], [`route`] and [`policy`] decide whether it
//! is forwarded) → [`headers`] and [`rewrite`] (what changes on the way out) →
//! [`plan`], [`body`] and [`coding`] (streaming bodies), [`static_cache`] (the app's static files kept as sent). [`fetch`] is the init container.

pub mod access;
pub mod body;
pub mod coding;
pub mod config;
pub mod encoders;
pub mod error;
pub mod fetch;
pub mod headers;
pub mod host;
pub mod metrics;
pub mod plan;
pub mod policy;
pub mod prefix;
pub mod proxy;
pub mod request_body;
pub mod rewrite;
pub mod route;
pub mod server;
pub mod static_cache;
pub mod telemetry;

pub use config::{ProxyConfig, ServeArgs};
pub use prefix::Prefix;
pub use proxy::Proxy;
