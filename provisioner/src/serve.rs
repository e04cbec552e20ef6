//! `flowgate serve`: the REST API over the chosen backend (kubernetes,
//! operator: MlflowInstance resources, or local); with the local
//! backend also the instances' own listener and the expiry reaper.
//!
//! On SIGTERM or Ctrl-C: open event streams get a final `shutdown` event, both
//! listeners stop accepting and drain in-flight requests, then MLflow
//! processes are stopped. The process returns within `--drain-timeout`
//! whatever clients do: connections still open at the bound are cut.

use crate::api::{ApiState, Quotas, auth::Tokens, check_listen, guard_hosts, router};
use crate::backend::Backend;
use crate::cli::{BackendKind, ServeOpts};
use crate::hosts::PublicHosts;
use crate::kube::KubeBackend;
use crate::local::router::LocalRouter;
use crate::local::supervisor::{Supervision, parse_size};
use crate::local::{LocalBackend, LocalSettings, default_data_dir};
use crate::operator::backend::OperatorBackend;
use crate::settings::{KubeArgs, KubeSettings};
use crate::{Error, Result};
use adapter::server::{ConnectionLimits, serve as serve_http, shutdown_signal};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

async fn bind(addr: std::net::SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Internal(format!("{what}: cannot listen on {addr}: {e}")))
}

/// Runs until SIGTERM/SIGINT.
pub async fn serve(kind: BackendKind, kube: &KubeArgs, opts: &ServeOpts) -> Result<()> {
    let tokens = match &opts.tokens {
        Some(path) => Some(Tokens::parse(&std::fs::read_to_string(path).map_err(
            |e| Error::invalid("tokens", format!("{}: {e}", path.display())),
        )?)?),
        None => None,
    };
    check_listen(opts.listen, tokens.is_some())?;
    let hosts = Arc::new(match &opts.public_host {
        Some(list) => PublicHosts::parse(list)?,
        None => {
            let mut listen = vec![opts.listen];
            let mut extra = Vec::new();
            if kind == BackendKind::Local {
                listen.push(opts.local_listen);
                if let Some(url) = &opts.public_url
                    && let Ok(uri) = url.parse::<http::Uri>()
                    && let Some(authority) = uri.authority()
                {
                    extra.push(authority.to_string());
                }
            } else {
                extra.push(kube.host.clone());
            }
            PublicHosts::defaults(&listen, &extra)
        }
    });
    tracing::info!(public_hosts = %hosts.describe(), "answering these host names");
    let api_listener = bind(opts.listen, "REST API").await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    // Of --drain-timeout, MLflow gets this much to stop; requests the rest.
    let stop_budget = (opts.drain_timeout / 3).min(Duration::from_secs(5));
    let http_drain = opts.drain_timeout.saturating_sub(stop_budget);
    let mut local = None;
    let mut instances_served = None;
    let backend: Arc<dyn Backend> = match kind {
        BackendKind::Kubernetes => {
            let client = kube::Client::try_default()
                .await
                .map_err(|e| Error::Internal(format!("no Kubernetes configuration: {e}")))?;
            let settings = KubeSettings::from_args(kube, client.default_namespace())?;
            Arc::new(KubeBackend::new(client, settings).await?)
        }
        BackendKind::Operator => {
            let client = kube::Client::try_default()
                .await
                .map_err(|e| Error::Internal(format!("no Kubernetes configuration: {e}")))?;
            let settings = KubeSettings::from_args(kube, client.default_namespace())?;
            Arc::new(OperatorBackend::new(client, settings))
        }
        BackendKind::Local => {
            let instances_listener = bind(opts.local_listen, "instances").await?;
            let public_url = opts
                .public_url
                .clone()
                .unwrap_or_else(|| format!("http://{}", opts.local_listen));
            let ttl = KubeSettings::from_args(kube, "default")?.ttl;
            let settings = LocalSettings {
                data_dir: opts.data_dir.clone().unwrap_or_else(default_data_dir),
                mlflow: opts.mlflow.clone(),
                public_url,
                ttl,
                supervision: Supervision {
                    max_restarts: opts.max_restarts.max(1),
                    restart_window: opts.restart_window,
                    keep_failed: opts.keep_failed,
                    fetch: adapter::fetch::Timeouts {
                        connect: opts.connect_timeout,
                        stall: opts.stall_timeout,
                        deadline: opts.deadline,
                    },
                    store_bytes: parse_size(&kube.store_size)?,
                },
            };
            let backend = LocalBackend::open(settings).await?;
            let routes =
                Arc::new(LocalRouter::new(backend.routes()).with_public_hosts(Arc::clone(&hosts)));
            let limits = ConnectionLimits {
                header_read_timeout: Duration::from_secs(30),
                max_header_bytes: 64 * 1024,
                drain_timeout: http_drain,
                ..Default::default()
            };
            let until = stopped();
            instances_served = Some(tokio::spawn(async move {
                serve_http(routes, &limits, instances_listener, until).await
            }));
            backend.spawn_reaper(Duration::from_secs(30));
            tracing::info!(instances = %opts.local_listen, "local backend ready");
            local = Some(backend.clone());
            Arc::new(backend)
        }
    };

    let announce = local.clone();
    let (deadline_tx, mut deadline_rx) = watch::channel(None::<Instant>);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = deadline_tx.send(Some(Instant::now() + http_drain));
        if let Some(local) = announce {
            local.announce_shutdown();
        }
        let _ = stop_tx.send(true);
    });
    let state = ApiState::new(
        backend,
        tokens,
        Quotas {
            per_owner: opts.quota_per_owner,
            total: opts.quota_total,
        },
    );
    tracing::info!(api = %opts.listen, backend = ?kind, "flowgate serve ready");
    let api = axum::serve(api_listener, guard_hosts(router(state), hosts))
        .with_graceful_shutdown(stopped());
    // Draining ends at the bound, whatever clients do.
    let mut rx = deadline_rx.clone();
    let bound = async move {
        match rx.wait_for(Option::is_some).await.map(|at| *at) {
            Ok(Some(at)) => tokio::time::sleep_until(at).await,
            _ => std::future::pending().await,
        }
    };
    tokio::select! {
        r = api => r.map_err(|e| Error::Internal(format!("REST API: {e}")))?,
        () = bound => tracing::warn!("REST API drain timed out; open connections are cut"),
    }
    let at = (*deadline_rx.borrow_and_update()).unwrap_or_else(Instant::now);
    if let Some(served) = instances_served
        && tokio::time::timeout_at(at, served).await.is_err()
    {
        tracing::warn!("instances drain timed out; open connections are cut");
    }
    if let Some(local) = local {
        tracing::info!("stopping local MLflow processes (their data stays for the next start)");
        let grace = stop_budget.mul_f32(0.6);
        let bound = stop_budget.saturating_sub(Duration::from_millis(250));
        if tokio::time::timeout(bound, local.stop_all_within(grace))
            .await
            .is_err()
        {
            tracing::warn!("MLflow did not stop in time; the next start stops or adopts it");
        }
    }
    Ok(())
}
