//! The `flowgate` command line: flags, subcommands, and running them against a
//! backend. `main.rs` only parses and calls [`run`].

use crate::access::Links;
use crate::backend::{Backend, ListFilter};
use crate::hosts::PublicHosts;
use crate::instance::add;
use crate::instance::{
    ANONYMOUS, Access, CreateRequest, Instance, InstanceId, Workload, validate_owner,
};
use crate::kube::KubeBackend;
use crate::kube::ledger::LeaseLedger;
use crate::kube::objects::{InstanceSpec, preview};
use crate::kube::sleep::{Manager, SleepSettings};
use crate::kube::watch::Watch;
use crate::operator::OperatorConfig;
use crate::operator::backend::OperatorBackend;
use crate::operator::leader::LeaseSettings;
use crate::operator::metrics::Metrics;
use crate::operator::policy::CrdPolicy;
use crate::output::{self, Format};
use crate::serve::{ActivatorListen, ServeOpts, start_sleep};
use crate::service::{Caller, Policy, Provisioner, Quotas};
pub use crate::settings::BackendKind;
use crate::settings::{KubeArgs, KubeSettings};
use crate::settings::{RouteApis, RouteKind};
use crate::{Error, Result};
use clap::{CommandFactory, Parser, Subcommand};
use jiff::Timestamp;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// `flowgate --version`: the release and the git commit it was built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("FLOWGATE_GIT_COMMIT"),
    ")"
);

/// Creates, lists, extends and deletes MLflow instances for job results.
#[derive(Parser, Debug)]
#[command(name = "flowgate", version = VERSION)]
pub struct Cli {
    /// Where instances run
    #[arg(
        long,
        env = "FLOWGATE_BACKEND",
        value_enum,
        default_value = "kubernetes",
        global = true
    )]
    pub backend: BackendKind,
    /// Output format
    #[arg(long, short = 'o', value_enum, default_value = "table", global = true)]
    pub output: Format,
    /// Kubernetes backend settings.
    #[command(flatten)]
    pub kube: KubeArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Flags of `flowgate operator`.
#[derive(clap::Args, Debug)]
pub struct OperatorOpts {
    /// Where /metrics and /healthz listen
    #[arg(long, env = "FLOWGATE_METRICS_LISTEN", default_value = "0.0.0.0:8081")]
    pub metrics_listen: std::net::SocketAddr,
    /// Elect a leader on a Lease, so that only one replica reconciles
    #[arg(long, env = "FLOWGATE_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Name of the Lease (in --namespace)
    #[arg(long, env = "FLOWGATE_LEASE_NAME", default_value = "flowgate-operator")]
    pub lease_name: String,
    /// How long the Lease is good for without renewal
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// How long the leader tries to renew before it steps down
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub renew_deadline: Duration,
    /// How often candidates try and the leader renews
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub retry_period: Duration,
    /// This replica's name [default: $POD_NAME or the host name, and a random suffix]
    #[arg(long, env = "FLOWGATE_IDENTITY")]
    pub identity: Option<String>,
    /// Reconciles at once
    #[arg(long, env = "FLOWGATE_CONCURRENCY", default_value_t = 16)]
    pub concurrency: u16,
    /// MLflow images a resource may pick besides --mlflow-image (comma-separated)
    #[arg(long, env = "FLOWGATE_ALLOWED_MLFLOW_IMAGES", value_delimiter = ',')]
    pub allowed_mlflow_images: Vec<String>,
    /// Adapter images a resource may pick besides --adapter-image (comma-separated)
    #[arg(long, env = "FLOWGATE_ALLOWED_ADAPTER_IMAGES", value_delimiter = ',')]
    pub allowed_adapter_images: Vec<String>,
    /// The most CPU a resource may give a container
    #[arg(long, env = "FLOWGATE_MAX_CPU", default_value = "2")]
    pub max_cpu: String,
    /// The most memory a resource may give a container
    #[arg(long, env = "FLOWGATE_MAX_MEMORY", default_value = "4Gi")]
    pub max_memory: String,
    /// The largest artefact volume a resource may ask for
    #[arg(long, env = "FLOWGATE_MAX_STORE_SIZE", default_value = "20Gi")]
    pub max_store_size: String,
    /// Access modes a resource may ask for (comma-separated); `public` lets
    /// anyone with an instance's URL open it
    #[arg(
        long,
        env = "FLOWGATE_ALLOWED_ACCESS",
        value_delimiter = ',',
        default_value = "link"
    )]
    pub allowed_access: Vec<Access>,
    /// Where the activator of sleeping instances listens: a sleeping
    /// instance's Service sends its visitors to this port of the operator's
    /// pods (declare it as the container port named `activator`; the pods
    /// carry the labels of --activator-selector). Without it nothing sleeps
    #[arg(long, env = "FLOWGATE_ACTIVATOR_LISTEN")]
    pub activator_listen: Option<std::net::SocketAddr>,
    /// The labels of the operator's pods (the activator), `key=value,...`
    #[arg(
        long,
        env = "FLOWGATE_ACTIVATOR_SELECTOR",
        default_value = "app.kubernetes.io/name=flowgate,app.kubernetes.io/component=operator"
    )]
    pub activator_selector: String,
    /// With --activator-listen, an instance nobody visited for this long
    /// sleeps: scaled to zero, woken by its next visit (same id and URL). A
    /// resource's idleAfter overrides it; 0: only those that ask
    #[arg(long, env = "FLOWGATE_IDLE_AFTER", default_value = "30m", value_parser = humantime::parse_duration)]
    pub idle_after: Duration,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the REST API for the portal (and, with --backend local, the instances)
    Serve(ServeOpts),
    /// Run the controller of MlflowInstance resources (until SIGTERM)
    Operator(OperatorOpts),
    /// Print the MlflowInstance CustomResourceDefinition (YAML)
    Crd,
    /// Print a shell completion script (e.g. `flowgate completion bash > /etc/bash_completion.d/flowgate`)
    Completion {
        /// bash, zsh, fish, elvish or powershell
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Create an instance for a job's artefacts (or return the live one)
    Create {
        /// The portal's job or task id
        #[arg(long)]
        workload: String,
        /// URL of the artefact archive (.tar.gz, .tgz, .tar or .zip)
        #[arg(long)]
        artifacts: String,
        /// sha256 of the archive
        #[arg(long)]
        sha256: String,
        /// Time to live [default: --default-ttl]
        #[arg(long)]
        ttl: Option<String>,
        /// Who asks
        #[arg(long, default_value = ANONYMOUS)]
        owner: String,
        /// Let visitors write (create experiments, delete runs); default: read-only
        #[arg(long)]
        writes: bool,
        /// Who may open it: link (only through its access link, shown as
        /// access_url) or public (the URL alone)
        #[arg(long, value_enum, default_value_t = Access::Link)]
        access: Access,
        /// Fetch the archive with this credentials set (a Secret granted by
        /// --allow-credentials) [default: --default-credentials]
        #[arg(long, value_name = "NAME")]
        credentials: Option<String>,
        /// Sleep after this long without a visit (`0`: never) [default: the
        /// server's --idle-after; backends that sleep only]
        #[arg(long, value_name = "DURATION")]
        idle_after: Option<String>,
        /// Wait until the instance serves (or fails)
        #[arg(long)]
        wait: bool,
        /// Print the objects it would apply (`-o yaml`, the default here, or
        /// `-o json`) and apply nothing; needs no cluster
        #[arg(long, conflicts_with = "wait")]
        dry_run: bool,
        /// Longest wait
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        wait_timeout: Duration,
    },
    /// Show one instance
    Get {
        /// Instance id
        id: String,
    },
    /// List instances
    List {
        /// Only this workload
        #[arg(long)]
        workload: Option<String>,
        /// Only this owner
        #[arg(long)]
        owner: Option<String>,
    },
    /// Delete an instance and everything it owns
    Delete {
        /// Instance id
        id: String,
    },
    /// Push an instance's expiry further
    Extend {
        /// Instance id
        id: String,
        /// How much longer (from the current expiry, or now if past)
        #[arg(long)]
        ttl: String,
    },
    /// Delete expired instances and leftovers (run hourly)
    Gc {
        /// Only print what would be removed
        #[arg(long)]
        dry_run: bool,
    },
    /// Roll every instance to new images, one at a time
    Upgrade {
        /// New MLflow image
        #[arg(long)]
        mlflow_image: Option<String>,
        /// New adapter image
        #[arg(long)]
        adapter_image: Option<String>,
        /// Instances rolled at once
        #[arg(long, default_value_t = 1)]
        max_parallel: usize,
        /// Do not wait for each rollout
        #[arg(long)]
        no_wait: bool,
        /// Longest wait per rollout
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        rollout_timeout: Duration,
    },
}

/// `flowgate create --dry-run`: the objects of a new instance, from the
/// flags alone (no cluster: `--route-kind auto` shows an HTTPRoute when a
/// Gateway is configured, else an Ingress; see [`RouteApis::assumed`]).
fn dry_run_create(cli: &Cli) -> Result<String> {
    let Command::Create {
        workload,
        artifacts,
        sha256,
        ttl,
        owner,
        writes,
        access,
        credentials,
        ..
    } = &cli.command
    else {
        unreachable!("called for create only")
    };
    let settings = KubeSettings::from_args(&cli.kube, "default")?;
    let route_kind = settings.route_kind_for(RouteApis::assumed(settings.route_kind))?;
    if settings.route_kind == RouteKind::Auto {
        eprintln!(
            "--route-kind auto asks the cluster (an OpenShift Route where it serves them); \
             without one this shows {}",
            match route_kind {
                RouteKind::Gateway => "an HTTPRoute (a Gateway is configured)",
                _ => "an Ingress",
            }
        );
    }
    let now = Timestamp::now();
    let spec = InstanceSpec {
        id: InstanceId::random(),
        workload: Workload::parse(workload)?.as_str().to_owned(),
        owner: validate_owner(owner)?,
        artifacts: crate::instance::Artifacts::validated(artifacts, sha256, &["https", "http"])?,
        created_at: now,
        expires_at: add(now, settings.ttl.resolve(ttl.as_deref())?),
        writes: *writes,
        access: *access,
        credentials: cli
            .kube
            .credential_rules()
            .resolve(owner, credentials.as_deref())?,
        idle_after: None,
        controller: None,
    };
    let objects = preview(&spec, &settings, route_kind)?;
    Ok(match cli.output {
        Format::Json => {
            output::json(&serde_json::json!({"apiVersion": "v1", "kind": "List", "items": objects}))
        }
        _ => objects
            .iter()
            .map(|o| format!("---\n{}", output::yaml(o)))
            .collect(),
    })
}

/// Runs a parsed command line; returns what to print.
pub async fn run(cli: Cli) -> Result<String> {
    if let Command::Serve(opts) = &cli.command {
        return crate::serve::serve(cli.backend, &cli.kube, opts)
            .await
            .map(|()| String::new());
    }
    if let Command::Crd = &cli.command {
        return Ok(crate::operator::crd::crd_yaml());
    }
    if let Command::Operator(opts) = &cli.command {
        return run_operator(&cli.kube, opts).await.map(|()| String::new());
    }
    if let Command::Completion { shell } = &cli.command {
        let mut out = Vec::new();
        clap_complete::generate(*shell, &mut Cli::command(), "flowgate", &mut out);
        return Ok(String::from_utf8_lossy(&out).into_owned());
    }
    if let Command::Create { dry_run: true, .. } = &cli.command {
        return dry_run_create(&cli);
    }
    if cli.backend == BackendKind::Local {
        return Err(Error::invalid(
            "backend",
            "local instances belong to a running `flowgate serve --backend local`: use its REST API (see README)",
        ));
    }
    let client = cli.kube.client().await?;
    let settings = KubeSettings::from_args(&cli.kube, client.default_namespace())?;
    let policy = Policy {
        ttl: settings.ttl,
        quotas: Quotas::unlimited(),
        allow_file: false,
        streams_per_caller: usize::MAX,
    };
    let ledger = Arc::new(LeaseLedger::new(client.clone(), &settings.namespace));
    let mut kube_backend = None;
    let backend: Arc<dyn Backend> = match cli.backend {
        BackendKind::Operator => Arc::new(OperatorBackend::new(client, settings)),
        _ => {
            let b = Arc::new(KubeBackend::new(client, settings).await?);
            kube_backend = Some(Arc::clone(&b));
            b
        }
    };
    let mut service =
        Provisioner::new(backend, ledger, policy).with_credentials(cli.kube.credential_rules());
    if let Some(path) = &cli.kube.access_keys {
        service = service.with_links(Links::load(path, Links::DEFAULT_TTL)?);
    }
    let caller = Caller::Anyone;
    let now = Timestamp::now;
    let show_one = |i: &Instance| output::instance(i, cli.output, now());
    match cli.command {
        Command::Create {
            workload,
            artifacts,
            sha256,
            ttl,
            owner,
            writes,
            access,
            credentials,
            idle_after,
            wait,
            wait_timeout,
            dry_run: _,
        } => {
            let request = CreateRequest {
                workload: Workload::parse(&workload)?,
                owner: validate_owner(&owner)?,
                artifacts: service.artifacts(&artifacts, &sha256)?,
                ttl: service.ttl_policy().resolve(ttl.as_deref())?,
                writes,
                access,
                credentials,
                idle_after: idle_after
                    .as_deref()
                    .map(crate::instance::parse_idle_after)
                    .transpose()?,
            };
            let created = service.create(request).await?;
            if !created.created {
                eprintln!("an instance for this workload and these artefacts is already live");
            }
            let instance = if wait {
                wait_with_spinner(&service, &created.instance.id, wait_timeout).await?
            } else {
                created.instance
            };
            Ok(show_one(&instance))
        }
        Command::Get { id } => Ok(show_one(
            &service.get(&caller, &InstanceId::parse(&id)?).await?,
        )),
        Command::List { workload, owner } => {
            let list = service
                .list(&caller, ListFilter { workload, owner })
                .await?;
            Ok(output::instances(&list, cli.output, now()))
        }
        Command::Delete { id } => {
            let id = InstanceId::parse(&id)?;
            service.delete(&caller, &id).await?;
            Ok(format!("deleted {id}\n"))
        }
        Command::Extend { id, ttl } => {
            let ttl = humantime::parse_duration(&ttl)
                .map_err(|e| Error::invalid("ttl", format!("{ttl:?}: {e}")))?;
            Ok(show_one(
                &service
                    .extend(&caller, &InstanceId::parse(&id)?, ttl)
                    .await?,
            ))
        }
        Command::Gc { dry_run } => {
            let removed = service.gc(dry_run).await?;
            Ok(match cli.output {
                Format::Json => output::json(&removed),
                Format::Yaml => output::yaml(&removed),
                Format::Name => removed.iter().map(|r| format!("{}\n", r.name)).collect(),
                Format::Table => {
                    let verb = if dry_run { "would remove" } else { "removed" };
                    let mut s: String = removed
                        .iter()
                        .map(|r| format!("{verb} {} {} ({})\n", r.kind, r.name, r.reason))
                        .collect();
                    s.push_str(&format!("gc: {} object(s) {verb}\n", removed.len()));
                    s
                }
            })
        }
        Command::Serve(_) | Command::Operator(_) | Command::Crd | Command::Completion { .. } => {
            unreachable!("serve, operator, crd and completion return above")
        }
        Command::Upgrade {
            mlflow_image,
            adapter_image,
            max_parallel,
            no_wait,
            rollout_timeout,
        } => {
            let Some(backend) = &kube_backend else {
                return Err(Error::invalid(
                    "backend",
                    "the operator re-applies every instance with its own --mlflow-image/--adapter-image: roll the operator's Deployment instead",
                ));
            };
            let wait = (!no_wait).then_some(rollout_timeout);
            let steps = backend
                .upgrade(
                    mlflow_image.as_deref(),
                    adapter_image.as_deref(),
                    max_parallel,
                    wait,
                    &|step| match &step.outcome {
                        Ok(()) => eprintln!("[{}/{}] {} rolled", step.index, step.total, step.id),
                        Err(e) => eprintln!("[{}/{}] {}: {e}", step.index, step.total, step.id),
                    },
                )
                .await?;
            let failed = steps.iter().filter(|s| s.outcome.is_err()).count();
            if failed > 0 {
                return Err(Error::Timeout(format!(
                    "{failed} of {} rollouts did not complete",
                    steps.len()
                )));
            }
            Ok(format!("upgrade: {} instance(s) rolled\n", steps.len()))
        }
    }
}

/// The bound on draining the operator's activator at shutdown.
const ACTIVATOR_DRAIN: Duration = Duration::from_secs(10);

/// `flowgate operator`: the metrics listener, the controller and (with
/// --activator-listen) sleep and wake, until SIGTERM or Ctrl-C.
async fn run_operator(kube_args: &KubeArgs, opts: &OperatorOpts) -> Result<()> {
    let client = kube_args.client().await?;
    let settings = KubeSettings::from_args(kube_args, client.default_namespace())?;
    let mut config = OperatorConfig::new(settings);
    config.concurrency = opts.concurrency;
    config.policy = CrdPolicy {
        mlflow_images: opts.allowed_mlflow_images.clone(),
        adapter_images: opts.allowed_adapter_images.clone(),
        max_cpu: opts.max_cpu.clone(),
        max_memory: opts.max_memory.clone(),
        max_store_size: opts.max_store_size.clone(),
        access: opts.allowed_access.clone(),
        credentials: kube_args.credential_rules(),
    };
    for (flag, q) in [
        ("max-cpu", &opts.max_cpu),
        ("max-memory", &opts.max_memory),
        ("max-store-size", &opts.max_store_size),
    ] {
        if crate::operator::policy::quantity(q).is_none() {
            return Err(Error::invalid(flag, format!("{q:?} is not a quantity")));
        }
    }
    if let Some(identity) = &opts.identity {
        config.identity = identity.clone();
    }
    config.leader_election = opts.leader_elect.then(|| LeaseSettings {
        name: opts.lease_name.clone(),
        lease_duration: opts.lease_duration,
        renew_deadline: opts.renew_deadline,
        retry_period: opts.retry_period,
    });
    let listener = tokio::net::TcpListener::bind(opts.metrics_listen)
        .await
        .map_err(|e| {
            Error::Internal(format!(
                "metrics: cannot listen on {}: {e}",
                opts.metrics_listen
            ))
        })?;
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        adapter::server::shutdown_signal().await;
        tracing::info!("shutting down: letting running reconciles finish");
        stop.cancel();
    });
    let mut activator_served = None;
    if let Some(addr) = opts.activator_listen {
        let activator = SleepSettings::parse_selector(&opts.activator_selector)?;
        config.activator = Some(activator.clone());
        let idle_after = (!opts.idle_after.is_zero()).then_some(opts.idle_after);
        let namespace = config.settings.namespace.clone();
        let listen = ActivatorListen {
            addr,
            keys: kube_args.access_keys.clone(),
            hosts: Arc::new(PublicHosts::defaults(&[], &[config.settings.host.clone()])),
            drain: ACTIVATOR_DRAIN,
        };
        let until = shutdown.clone();
        activator_served = Some(
            start_sleep(
                client.clone(),
                &namespace,
                Watch::start(client.clone(), &namespace),
                SleepSettings::new(Manager::Operator, idle_after, activator),
                listen,
                async move { until.cancelled().await },
            )
            .await?,
        );
    }
    let app = crate::operator::metrics::router(Arc::clone(&metrics));
    let until = shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { until.cancelled().await })
            .await
    });
    tracing::info!(metrics = %opts.metrics_listen, "flowgate operator: /metrics and /healthz listening");
    let result = crate::operator::run(client, config, metrics, shutdown.clone()).await;
    shutdown.cancel();
    let _ = server.await;
    if let Some(served) = activator_served
        && tokio::time::timeout(ACTIVATOR_DRAIN, served).await.is_err()
    {
        tracing::warn!("activator drain timed out; open connections are cut");
    }
    result
}

async fn wait_with_spinner(
    service: &Provisioner,
    id: &InstanceId,
    timeout: Duration,
) -> Result<Instance> {
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.enable_steady_tick(Duration::from_millis(120));
    spinner.set_message(format!("{id}: waiting"));
    let result = service
        .wait_ready(id, timeout, &|i| {
            spinner.set_message(format!(
                "{}: {}{}",
                i.id,
                i.phase,
                i.message
                    .as_deref()
                    .map(|m| format!(" ({m})"))
                    .unwrap_or_default()
            ));
        })
        .await;
    spinner.finish_and_clear();
    result
}
