//! `flowgate serve`: the REST API over the chosen backend (kubernetes,
//! operator: MlflowInstance resources, or local); with the local
//! backend also the instances' own listener and the expiry reaper.
//!
//! On SIGTERM or Ctrl-C: open event streams get a final `shutdown` event, both
//! listeners stop accepting and drain in-flight requests, then MLflow
//! processes are stopped. The process returns within `--drain-timeout`
//! whatever clients do: connections still open at the bound are cut.

use crate::access::Links;
use crate::api::server::{ApiLimits, serve_api};
use crate::api::{ApiState, auth::Tokens, check_listen, guard_hosts, router};
use crate::backend::Backend;
use crate::hosts::PublicHosts;
use crate::kube::KubeBackend;
use crate::kube::activator::Activator;
use crate::kube::ledger::LeaseLedger;
use crate::kube::sleep::{Manager, SleepSettings, Sleeper};
use crate::kube::watch::Watch;
use crate::ledger::{Ledger, MemoryLedger};
use crate::local::router::LocalRouter;
use crate::local::supervisor::{Supervision, parse_size};
use crate::local::{LocalBackend, LocalSettings, default_data_dir};
use crate::operator::backend::OperatorBackend;
use crate::service::{Policy, Provisioner, Quotas};
use crate::settings::{BackendKind, KubeArgs, KubeSettings};
use crate::{Error, Result};
use adapter::server::{ConnectionLimits, Drain, serve as serve_http, shutdown_signal};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

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
    /// REST API connections open at once; more are closed at accept
    #[arg(long, env = "FLOWGATE_API_MAX_CONNECTIONS", default_value_t = 1024)]
    pub api_max_connections: usize,
    /// REST API connections: closed when no request head arrives within this
    /// (new connections) or no request comes for this long (keep-alive)
    #[arg(long, env = "FLOWGATE_API_IDLE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub api_idle_timeout: Duration,
    /// A REST API request not answered within this gets 504 (an event
    /// stream counts as answered once it starts)
    #[arg(long, env = "FLOWGATE_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// Event streams (GET .../events) one caller may hold open at once
    #[arg(long, env = "FLOWGATE_STREAMS_PER_CALLER", default_value_t = 20)]
    pub streams_per_caller: usize,
    /// Local backend: where instances are reachable as http://ADDR/<id>/
    #[arg(long, env = "FLOWGATE_LOCAL_LISTEN", default_value = "127.0.0.1:8080")]
    pub local_listen: std::net::SocketAddr,
    /// Local backend: the base URL given to users [default: http://<local-listen>]
    #[arg(long, env = "FLOWGATE_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Local backend: unknown instance ids one client may ask for in a
    /// minute; past it, every instance path answers it 429 until the minute ends
    #[arg(long, env = "FLOWGATE_GUESS_LIMIT", default_value_t = 30)]
    pub guess_limit: u32,
    /// Local backend: where instances keep their data
    #[arg(long, env = "FLOWGATE_DATA_DIR")]
    pub data_dir: Option<std::path::PathBuf>,
    /// Local backend: the credentials sets, one directory per name (files
    /// token, headers, tls.crt + tls.key or proxy.pem, ca.crt) [default:
    /// DATA_DIR/credentials]
    #[arg(long, env = "FLOWGATE_CREDENTIALS_ROOT")]
    pub credentials_root: Option<std::path::PathBuf>,
    /// Local backend: the mlflow executable
    #[arg(long, env = "FLOWGATE_MLFLOW", default_value = "mlflow")]
    pub mlflow: std::path::PathBuf,
    /// Host names (host or host:port, comma-separated) the API and the local
    /// instances answer; any other Host gets a 421 [default: the listen addresses
    /// and localhost on their ports, the public URL's host, and --host with the
    /// kubernetes and operator backends]
    #[arg(long, env = "FLOWGATE_PUBLIC_HOST")]
    pub public_host: Option<String>,
    /// On SIGTERM: the bound on draining requests and stopping MLflow; the process exits within it
    #[arg(long, env = "FLOWGATE_DRAIN_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// An instance nobody visited for this long sleeps: the local backend
    /// stops its MLflow; the kubernetes backend (with --activator-listen)
    /// scales it to zero. The next visit wakes it, same id and URL; 0: never
    #[arg(long, env = "FLOWGATE_IDLE_AFTER", default_value = "30m", value_parser = humantime::parse_duration)]
    pub idle_after: Duration,
    /// Kubernetes backend: where the activator listens, the port a sleeping
    /// instance's Service sends visitors to (this server's pods must declare
    /// it as the container port named `activator` and carry the labels of
    /// --activator-selector). Without it nothing sleeps on Kubernetes
    #[arg(long, env = "FLOWGATE_ACTIVATOR_LISTEN")]
    pub activator_listen: Option<std::net::SocketAddr>,
    /// Kubernetes backend: the labels of the pods that run this server (the
    /// activator), `key=value,...`, in the instances' namespace
    #[arg(
        long,
        env = "FLOWGATE_ACTIVATOR_SELECTOR",
        default_value = "app.kubernetes.io/name=flowgate,app.kubernetes.io/component=api"
    )]
    pub activator_selector: String,
    /// Local backend: how long a Failed instance is kept (for its reason) before removal
    #[arg(long, env = "FLOWGATE_KEEP_FAILED", default_value = "1h", value_parser = humantime::parse_duration)]
    pub keep_failed: Duration,
    /// Local backend: MLflow exits within --restart-window after which the instance is Failed
    #[arg(long, env = "FLOWGATE_MAX_RESTARTS", default_value_t = 5)]
    pub max_restarts: u32,
    /// Local backend: the window MLflow exits are counted in
    #[arg(long, env = "FLOWGATE_RESTART_WINDOW", default_value = "10m", value_parser = humantime::parse_duration)]
    pub restart_window: Duration,
    /// Local backend downloads: give up connecting after this long
    #[arg(long, env = "FLOWGATE_FETCH_CONNECT_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// Local backend downloads: give up when no byte arrives for this long
    #[arg(long, env = "FLOWGATE_FETCH_STALL_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub stall_timeout: Duration,
    /// Local backend downloads: the whole download, retries included, within this
    #[arg(long, env = "FLOWGATE_FETCH_DEADLINE", default_value = "30m", value_parser = humantime::parse_duration)]
    pub deadline: Duration,
}

async fn bind(addr: std::net::SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(Error::io(format!("{what}: cannot listen on {addr}")))
}

/// The limits of a listener that visitors reach (the local instances', the
/// activator's), draining within `drain_timeout`.
fn visitor_limits(drain_timeout: Duration) -> ConnectionLimits {
    ConnectionLimits {
        header_read_timeout: Duration::from_secs(30),
        max_header_bytes: 64 * 1024,
        drain_timeout,
        ..Default::default()
    }
}

/// Where and for whom the activator of sleeping instances listens.
pub(crate) struct ActivatorListen {
    /// `--activator-listen`.
    pub addr: std::net::SocketAddr,
    /// The access keys `link` instances are gated with.
    pub keys: Option<std::path::PathBuf>,
    /// The host names visitors use.
    pub hosts: Arc<PublicHosts>,
    /// The bound on draining visitors at shutdown.
    pub drain: Duration,
}

/// Sleep and wake on Kubernetes, for the kubernetes backend and the
/// operator: binds the activator, serves it until `until`, and starts the
/// sleeper's ticks over `watch`.
pub(crate) async fn start_sleep(
    client: kube::Client,
    namespace: &str,
    watch: Arc<Watch>,
    settings: SleepSettings,
    listen: ActivatorListen,
    until: impl Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::JoinHandle<Drain>> {
    let idle_after = settings.idle_after;
    let sleeper = Arc::new(Sleeper::new(client, namespace, watch, settings)?);
    let listener = bind(listen.addr, "activator").await?;
    let activator = Arc::new(Activator::new(
        Arc::clone(&sleeper),
        listen.keys,
        listen.hosts,
    ));
    let limits = visitor_limits(listen.drain);
    let served = tokio::spawn(async move { serve_http(activator, &limits, listener, until).await });
    sleeper.spawn();
    tracing::info!(activator = %listen.addr, ?idle_after, "sleeping instances wake through the activator");
    Ok(served)
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
    if opts.activator_listen.is_some() && kind != BackendKind::Kubernetes {
        return Err(Error::invalid(
            "activator-listen",
            "only the kubernetes backend puts instances to sleep through an activator",
        ));
    }
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
    let mut activator_served = None;
    let ttl = KubeSettings::from_args(kube, "default")?.ttl;
    let mut watch = None;
    let mut keys = kube.access_keys.clone();
    let (backend, ledger): (Arc<dyn Backend>, Arc<dyn Ledger>) = match kind {
        BackendKind::Kubernetes | BackendKind::Operator => {
            let client = kube.client().await?;
            let settings = KubeSettings::from_args(kube, client.default_namespace())?;
            let ledger = Arc::new(LeaseLedger::new(client.clone(), &settings.namespace));
            let shared = Watch::start(client.clone(), &settings.namespace);
            watch = Some(Arc::clone(&shared));
            let backend: Arc<dyn Backend> = if kind == BackendKind::Operator {
                Arc::new(OperatorBackend::new(client, settings))
            } else if let Some(addr) = opts.activator_listen {
                let idle_after = (!opts.idle_after.is_zero()).then_some(opts.idle_after);
                let sleep = SleepSettings::new(
                    Manager::Provisioner,
                    idle_after,
                    SleepSettings::parse_selector(&opts.activator_selector)?,
                );
                let listen = ActivatorListen {
                    addr,
                    keys: kube.access_keys.clone(),
                    hosts: Arc::clone(&hosts),
                    drain: http_drain,
                };
                activator_served = Some(
                    start_sleep(
                        client.clone(),
                        &settings.namespace,
                        shared,
                        sleep,
                        listen,
                        stopped(),
                    )
                    .await?,
                );
                Arc::new(KubeBackend::new(client, settings).await?.with_sleep())
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
            let data_dir = opts.data_dir.clone().unwrap_or_else(default_data_dir);
            let settings = LocalSettings {
                data_dir: data_dir.clone(),
                mlflow: opts.mlflow.clone(),
                public_url,
                ttl,
                supervision: Supervision {
                    max_restarts: opts.max_restarts.max(1),
                    restart_window: opts.restart_window,
                    keep_failed: opts.keep_failed,
                    idle_after: (!opts.idle_after.is_zero()).then_some(opts.idle_after),
                    fetch: adapter::fetch::Timeouts {
                        connect: opts.connect_timeout,
                        stall: opts.stall_timeout,
                        deadline: opts.deadline,
                    },
                    store_bytes: parse_size(&kube.store_size)?,
                    credentials_root: Some(
                        opts.credentials_root
                            .clone()
                            .unwrap_or_else(|| data_dir.join("credentials")),
                    ),
                },
                access_keys: kube.access_keys.clone(),
            };
            let backend = LocalBackend::open(settings).await?;
            keys = Some(backend.access_keys().to_path_buf());
            let routes = Arc::new(
                LocalRouter::new(backend.routes())
                    .with_public_hosts(Arc::clone(&hosts))
                    .with_guess_limit(opts.guess_limit),
            );
            let limits = visitor_limits(http_drain);
            let until = stopped();
            instances_served = Some(tokio::spawn(async move {
                serve_http(routes, &limits, instances_listener, until).await
            }));
            backend.spawn_reaper(Duration::from_secs(30));
            tracing::info!(instances = %opts.local_listen, "local backend ready");
            local = Some(backend.clone());
            (Arc::new(backend), Arc::new(MemoryLedger::default()))
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
    let mut provisioner =
        Provisioner::new(backend, ledger, policy).with_credentials(kube.credential_rules());
    if let Some(watch) = watch {
        provisioner = provisioner.with_events(watch);
    }
    match &keys {
        Some(path) => provisioner = provisioner.with_links(Links::load(path, Links::DEFAULT_TTL)?),
        None => {
            tracing::warn!("no access keys (--access-keys): only `public` instances can be made")
        }
    }
    let provisioner = Arc::new(provisioner);
    let state = ApiState::new(provisioner, tokens);
    tracing::info!(api = %opts.listen, backend = ?kind, "flowgate serve ready");
    let limits = ApiLimits {
        connections: ConnectionLimits {
            header_read_timeout: opts.api_idle_timeout,
            idle_timeout: opts.api_idle_timeout,
            // a caller that stops reading (an events stream) is as gone as a silent one
            send_timeout: opts.api_idle_timeout,
            max_header_bytes: 64 * 1024,
            drain_timeout: http_drain,
            max_connections: opts.api_max_connections,
        },
        request_timeout: opts.request_timeout,
    };
    let app = guard_hosts(router(Arc::clone(&state)), hosts);
    let api = serve_api(app, &state, &limits, api_listener, stopped());
    // Draining ends at the bound, whatever clients do.
    let mut rx = deadline_rx.clone();
    let bound = async move {
        match rx.wait_for(Option::is_some).await.map(|at| *at) {
            Ok(Some(at)) => tokio::time::sleep_until(at).await,
            _ => std::future::pending().await,
        }
    };
    tokio::select! {
        drain = api => if drain == Drain::TimedOut {
            tracing::warn!("REST API drain timed out; open connections are cut");
        },
        () = bound => tracing::warn!("REST API drain timed out; open connections are cut"),
    }
    let at = (*deadline_rx.borrow_and_update()).unwrap_or_else(Instant::now);
    for served in [instances_served, activator_served].into_iter().flatten() {
        if tokio::time::timeout_at(at, served).await.is_err() {
            tracing::warn!("instances drain timed out; open connections are cut");
        }
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
