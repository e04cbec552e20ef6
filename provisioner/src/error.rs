//! The provisioner's errors: one enum for the library, each variant with its
//! own exit code for the CLI and status for the REST API.

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No instance with that id.
    #[error("instance {0} not found")]
    NotFound(String),
    /// The input is unusable (bad URL, checksum, TTL, workload, id).
    #[error("invalid {field}: {message}")]
    Invalid {
        /// Which input.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// A quota would be passed.
    #[error("quota exceeded: {0}")]
    Quota(String),
    /// The cluster refused (RBAC) or the caller may not do this.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The instance failed to start.
    #[error("instance {id} failed: {reason}")]
    Failed {
        /// The instance.
        id: String,
        /// Why (image pull error, crash loop, ...).
        reason: String,
    },
    /// A wait ran out.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The disk is full: nothing was changed (HTTP 507).
    #[error("insufficient storage: {0}")]
    Storage(String),
    /// The store cannot be written right now: nothing was changed (HTTP 503).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The Kubernetes API failed.
    #[error("kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

/// Result alias for the provisioner.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Builds an [`Error::Invalid`].
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Error::Invalid {
            field,
            message: message.into(),
        }
    }

    /// The process exit code for the CLI: distinct per kind of failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Invalid { .. } => 2,
            Error::NotFound(_) => 3,
            Error::Quota(_) | Error::Forbidden(_) => 4,
            Error::Failed { .. } => 5,
            Error::Timeout(_) => 6,
            Error::Storage(_) | Error::Unavailable(_) | Error::Kube(_) | Error::Internal(_) => 1,
        }
    }
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        match &e {
            kube::Error::Api(status) if status.code == 403 => {
                Error::Forbidden(status.message.clone())
            }
            _ => Error::Kube(e),
        }
    }
}
