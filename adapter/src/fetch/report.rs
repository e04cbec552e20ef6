//! `fetch --report-progress`: the download's progress, in the init
//! container's own Pod status, where the provisioner's watch sees it (an
//! annotation through the downward API is read-only, and the termination
//! message only exists once the container ends).
//!
//! At most once a second, and only when the count moved, the reporter sets the
//! Pod condition `flowgate.io/fetch` (status False, reason `Downloading`,
//! message `<bytes>/<total> bytes` or `<bytes> bytes`) through the
//! `pods/status` subresource. It authenticates with the token of the Pod's
//! ServiceAccount mounted into this container only; the API server binds
//! that token to the Pod, and the admission policy in `k8s/base` lets it
//! change nothing but this condition of this Pod. A report that fails is
//! logged and skipped: progress is a courtesy, the download goes on.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The Pod condition type.
pub const CONDITION: &str = "flowgate.io/fetch";
/// Where the token and the cluster CA are mounted.
pub const TOKEN_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const UNKNOWN: u64 = u64::MAX;

/// The progress message for `bytes` of `total`.
pub fn message(bytes: u64, total: Option<u64>) -> String {
    match total {
        Some(t) => format!("{bytes}/{t} bytes"),
        None => format!("{bytes} bytes"),
    }
}

/// The latest counts, shared between the download and the reporting task.
#[derive(Default)]
pub struct Counts {
    bytes: AtomicU64,
    total: AtomicU64,
}

impl Counts {
    /// Records progress (cheap: called for every chunk).
    pub fn set(&self, bytes: u64, total: Option<u64>) {
        self.total
            .store(total.unwrap_or(UNKNOWN), Ordering::Relaxed);
        self.bytes.store(bytes, Ordering::Relaxed);
    }

    fn get(&self) -> (u64, Option<u64>) {
        let total = self.total.load(Ordering::Relaxed);
        (
            self.bytes.load(Ordering::Relaxed),
            (total != UNKNOWN).then_some(total),
        )
    }
}

/// Reports to the API server of the cluster the Pod runs in.
pub struct Reporter {
    client: reqwest::Client,
    url: String,
    token: String,
}

impl Reporter {
    /// From the in-cluster environment: `KUBERNETES_SERVICE_HOST` and
    /// `_PORT`, `POD_NAMESPACE` and `POD_NAME` (downward API), the token and
    /// CA in `token_dir`.
    pub fn from_env(token_dir: &Path) -> Result<Self, String> {
        let var = |k: &str| std::env::var(k).map_err(|_| format!("{k} is not set"));
        let host = var("KUBERNETES_SERVICE_HOST")?;
        let port = var("KUBERNETES_SERVICE_PORT")?;
        let ns = var("POD_NAMESPACE")?;
        let pod = var("POD_NAME")?;
        let read = |f: &str| {
            std::fs::read(token_dir.join(f))
                .map_err(|e| format!("{}: {e}", token_dir.join(f).display()))
        };
        let token = String::from_utf8_lossy(&read("token")?).trim().to_owned();
        let ca = reqwest::Certificate::from_pem(&read("ca.crt")?).map_err(|e| e.to_string())?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .tls_certs_only([ca])
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| e.to_string())?;
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        Ok(Self {
            client,
            url: format!("https://{host}:{port}/api/v1/namespaces/{ns}/pods/{pod}/status"),
            token,
        })
    }

    async fn send(&self, bytes: u64, total: Option<u64>) -> Result<(), String> {
        // Digits, a slash and a word: nothing to escape.
        let body = format!(
            r#"{{"status":{{"conditions":[{{"type":"{CONDITION}","status":"False","reason":"Downloading","message":"{}"}}]}}}}"#,
            message(bytes, total)
        );
        let r = self
            .client
            .patch(&self.url)
            .bearer_auth(&self.token)
            .header("content-type", "application/strategic-merge-patch+json")
            .body(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {}", r.status()))
        }
    }

    /// Reports `counts` every `every` while it changes, until dropped (run it
    /// in a task beside the download).
    pub async fn run(self, counts: Arc<Counts>, every: Duration) {
        let mut last = None;
        loop {
            tokio::time::sleep(every).await;
            let now = counts.get();
            if last == Some(now) {
                continue;
            }
            match self.send(now.0, now.1).await {
                Ok(()) => last = Some(now),
                Err(e) => tracing::warn!(error = %e, "could not report the download's progress"),
            }
        }
    }
}
