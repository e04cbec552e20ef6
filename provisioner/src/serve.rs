//! `flowgate serve`: the REST API over the chosen backend (kubernetes,
//! operator: MlflowInstance resources, or local); with the local
//! backend also the instances' own listener and the expiry reaper. Stops
//! cleanly on SIGTERM or Ctrl-C.

use crate::api::{ApiState, auth::Tokens, check_listen, router};
use crate::backend::Backend;
use crate::kube::KubeBackend;
use crate::kube::ledger::LeaseLedger;
use crate::kube::watch::Watch;
use crate::ledger::{Ledger, MemoryLedger};
use crate::local::router::LocalRouter;
use crate::local::{LocalBackend, LocalSettings, default_data_dir};
use crate::operator::backend::OperatorBackend;
use crate::service::{Policy, Provisioner, Quotas};
use crate::settings::{BackendKind, KubeArgs, KubeSettings};
use crate::{Error, Result};
use adapter::server::{ConnectionLimits, serve as serve_http, shutdown_signal};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Flags of `flowgate serve`.
#[derive(clap::Args, Debug)]
pub struct ServeOpts {
    /// Where the REST API listens
    #[arg(long, env = "FLOWGATE_API_LISTEN", default_value = "127.0.0.1:7000")]
    pub listen: std::net::SocketAddr,
    /// Bearer tokens, one `TOKEN OWNER` per line (required beyond loopback)
    #[arg(long, env = "FLOWGATE_TOKENS")]
    pub tokens: Option<std::path::PathBuf>,
    /// Live instances allowed per owner
    #[arg(long, env = "FLOWGATE_QUOTA_PER_OWNER", default_value_t = 20)]
    pub quota_per_owner: usize,
    /// Live instances allowed in all
    #[arg(long, env = "FLOWGATE_QUOTA_TOTAL", default_value_t = 200)]
    pub quota_total: usize,
    /// Event streams (GET .../events) one caller may hold open at once
    #[arg(long, env = "FLOWGATE_STREAMS_PER_CALLER", default_value_t = 20)]
    pub streams_per_caller: usize,
    /// Local backend: where instances are reachable as http://ADDR/<id>/
    #[arg(long, env = "FLOWGATE_LOCAL_LISTEN", default_value = "127.0.0.1:8080")]
    pub local_listen: std::net::SocketAddr,
    /// Local backend: the base URL given to users [default: http://<local-listen>]
    #[arg(long, env = "FLOWGATE_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Local backend: where instances keep their data
    #[arg(long, env = "FLOWGATE_DATA_DIR")]
    pub data_dir: Option<std::path::PathBuf>,
    /// Local backend: the mlflow executable
    #[arg(long, env = "FLOWGATE_MLFLOW", default_value = "mlflow")]
    pub mlflow: std::path::PathBuf,
}

async fn bind(addr: std::net::SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(Error::io(format!("{what}: cannot listen on {addr}")))
}

/// Runs until SIGTERM/SIGINT.
pub async fn serve(kind: BackendKind, kube: &KubeArgs, opts: &ServeOpts) -> Result<()> {
    let tokens = match &opts.tokens {
        Some(path) => Some(Tokens::parse(
            &std::fs::read_to_string(path)
                .map_err(Error::io(format!("reading {}", path.display())))?,
        )?),
        None => None,
    };
    check_listen(opts.listen, tokens.is_some())?;
    let api_listener = bind(opts.listen, "REST API").await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let mut local = None;
    let ttl = KubeSettings::from_args(kube, "default")?.ttl;
    let mut watch = None;
    let (backend, ledger): (Arc<dyn Backend>, Arc<dyn Ledger>) = match kind {
        BackendKind::Kubernetes | BackendKind::Operator => {
            let client = kube::Client::try_default()
                .await
                .map_err(|e| Error::Internal(format!("no Kubernetes configuration: {e}")))?;
            let settings = KubeSettings::from_args(kube, client.default_namespace())?;
            let ledger = Arc::new(LeaseLedger::new(client.clone(), &settings.namespace));
            watch = Some(Watch::start(client.clone(), &settings.namespace));
            let backend: Arc<dyn Backend> = if kind == BackendKind::Operator {
                Arc::new(OperatorBackend::new(client, settings))
            } else {
                Arc::new(KubeBackend::new(client, settings).await?)
            };
            (backend, ledger)
        }
        BackendKind::Local => {
            let instances_listener = bind(opts.local_listen, "instances").await?;
            let public_url = opts
                .public_url
                .clone()
                .unwrap_or_else(|| format!("http://{}", opts.local_listen));
            let settings = LocalSettings {
                data_dir: opts.data_dir.clone().unwrap_or_else(default_data_dir),
                mlflow: opts.mlflow.clone(),
                public_url,
                ttl,
            };
            let backend = LocalBackend::open(settings).await?;
            let routes = Arc::new(LocalRouter::new(backend.routes()));
            let limits = ConnectionLimits {
                header_read_timeout: Duration::from_secs(30),
                max_header_bytes: 64 * 1024,
                drain_timeout: Duration::from_secs(10),
            };
            let until = stopped();
            tokio::spawn(
                async move { serve_http(routes, &limits, instances_listener, until).await },
            );
            backend.spawn_reaper(Duration::from_secs(30));
            tracing::info!(instances = %opts.local_listen, "local backend ready");
            local = Some(backend.clone());
            (Arc::new(backend), Arc::new(MemoryLedger::default()))
        }
    };

    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    // `file://` reads this machine's files: only for an API that nobody
    // but this machine's users can call (no tokens, hence loopback only).
    let policy = Policy {
        ttl,
        quotas: Quotas {
            per_owner: opts.quota_per_owner,
            total: opts.quota_total,
        },
        allow_file: tokens.is_none() && opts.listen.ip().is_loopback(),
        streams_per_caller: opts.streams_per_caller,
    };
    let mut provisioner = Provisioner::new(backend, ledger, policy);
    if let Some(watch) = watch {
        provisioner = provisioner.with_events(watch);
    }
    let provisioner = Arc::new(provisioner);
    let state = ApiState::new(provisioner, tokens);
    tracing::info!(api = %opts.listen, backend = ?kind, "flowgate serve ready");
    axum::serve(api_listener, router(state))
        .with_graceful_shutdown(stopped())
        .await
        .map_err(Error::io("REST API"))?;
    if let Some(local) = local {
        tracing::info!("stopping local MLflow processes (their data stays for the next start)");
        local.stop_all().await;
    }
    Ok(())
}
