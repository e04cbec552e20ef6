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
    /// A file or socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
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
            Error::Storage(_)
            | Error::Unavailable(_)
            | Error::Kube(_)
            | Error::Io { .. }
            | Error::Internal(_) => 1,
        }
    }

    /// An [`Error::Io`] maker for `map_err`.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    /// What a remote caller is told: the message itself for what the caller
    /// can act on, a generic one for failures of the server's side (their
    /// details, with addresses and paths, go to the log only).
    pub fn public_message(&self) -> String {
        match self {
            Error::Kube(_) => "the Kubernetes API failed; the server log has the details".into(),
            Error::Io { .. } | Error::Internal(_) => {
                "internal error; the server log has the details".into()
            }
            other => other.to_string(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_get_reasons_not_internals() {
        let io = Error::io("connecting to 127.0.0.1:6443")(std::io::Error::other("refused"));
        assert!(std::error::Error::source(&io).is_some());
        assert!(!io.public_message().contains("127.0.0.1"));
        assert!(
            io.to_string().contains("127.0.0.1:6443"),
            "the log keeps it"
        );
        let kube = Error::Kube(kube::Error::Service(
            "tcp connect error: 10.0.0.1:443".into(),
        ));
        assert!(!kube.public_message().contains("10.0.0.1"));
        let invalid = Error::invalid("ttl", "30d is outside 1m to 7d");
        assert_eq!(invalid.public_message(), invalid.to_string());
    }
}
