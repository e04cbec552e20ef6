//! One error type for the proxy path that says where a failure came from; the
//! source decides the status the client gets.

use http::StatusCode;
use std::time::Duration;

/// A failure while proxying one request.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The upstream could not be reached or broke the exchange.
    #[error("upstream unavailable: {0}")]
    Upstream(#[source] hyper_util::client::legacy::Error),
    /// The upstream's body broke off (or outgrew a bound) while the adapter
    /// read it whole.
    #[error("upstream body: {0}")]
    UpstreamBody(String),
    /// The upstream answered something that cannot be used.
    #[error("upstream answer: {0}")]
    UpstreamAnswer(&'static str),
    /// The upstream did not answer in time.
    #[error("upstream did not answer within {0:?}")]
    UpstreamTimeout(Duration),
    /// The client sent something we cannot forward.
    #[error("bad request: {0}")]
    Downstream(String),
    /// A fault of the adapter itself.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ProxyError {
    /// The status the client gets: 502, 504, 400 or 500.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Upstream(_)
            | ProxyError::UpstreamBody(_)
            | ProxyError::UpstreamAnswer(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Downstream(_) => StatusCode::BAD_REQUEST,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The metrics label of the failure's source.
    pub fn source_label(&self) -> &'static str {
        match self {
            ProxyError::Upstream(e) if e.is_connect() => "connect",
            ProxyError::Upstream(_)
            | ProxyError::UpstreamBody(_)
            | ProxyError::UpstreamAnswer(_) => "upstream",
            ProxyError::UpstreamTimeout(_) => "timeout",
            ProxyError::Downstream(_) => "downstream",
            ProxyError::Internal(_) => "internal",
        }
    }
}

/// Result alias for the proxy path.
pub type Result<T, E = ProxyError> = std::result::Result<T, E>;
