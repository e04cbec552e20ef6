//! `flowgate-adapter`: the proxy (default) or `fetch` (the init container).

use adapter::fetch::{Credentials, FetchOptions, Limits, Outcome, Timeouts};
use adapter::server::{ConnectionLimits, Drain, serve, shutdown_signal};
use adapter::{Proxy, ProxyConfig, ServeArgs};
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

/// Serves an app under an instance path prefix, or fetches its artefacts.
#[derive(Parser)]
#[command(
    name = "flowgate-adapter",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Download, verify and unpack artefacts (the pod's init container).
    Fetch(FetchArgs),
}

#[derive(clap::Args)]
struct FetchArgs {
    /// Archive URL: http, https or file
    #[arg(long, env = "FLOWGATE_FETCH_URL")]
    url: String,
    /// Expected sha256 of the archive (64 hex digits)
    #[arg(long, env = "FLOWGATE_FETCH_SHA256")]
    sha256: String,
    /// Directory to fill; replaced atomically, must not be a mount point
    #[arg(long, env = "FLOWGATE_FETCH_DEST")]
    dest: PathBuf,
    /// Largest archive accepted, in bytes
    #[arg(long, default_value_t = Limits::default().max_download_bytes)]
    max_download_bytes: u64,
    /// Largest unpacked total, in bytes
    #[arg(long, default_value_t = Limits::default().max_unpacked_bytes)]
    max_unpacked_bytes: u64,
    /// Most archive entries
    #[arg(long, default_value_t = Limits::default().max_entries)]
    max_entries: u64,
    /// Retries for transient download failures
    #[arg(long, default_value_t = 5)]
    retries: u32,
    /// First wait between retries (doubles each time)
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    backoff: Duration,
    /// Give up connecting after this long (each attempt)
    #[arg(long, env = "FLOWGATE_FETCH_CONNECT_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// Give up when no byte (response headers included) arrives for this long
    #[arg(long, env = "FLOWGATE_FETCH_STALL_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    stall_timeout: Duration,
    /// The whole download, retries included, within this
    #[arg(long, env = "FLOWGATE_FETCH_DEADLINE", default_value = "30m", value_parser = humantime::parse_duration)]
    deadline: Duration,
    /// Report the download's progress in this Pod's status (in a cluster; see fetch::report)
    #[arg(long, env = "FLOWGATE_FETCH_REPORT_PROGRESS")]
    report_progress: bool,
    /// Write the outcome, as anyone may read it, to this file (Kubernetes: /dev/termination-log)
    #[arg(long, env = "FLOWGATE_FETCH_TERMINATION_LOG")]
    termination_log: Option<PathBuf>,
    #[command(flatten)]
    credentials: CredentialArgs,
}

/// Credentials for a private archive; sent only to the URL's own origin.
#[derive(clap::Args)]
#[command(
    next_help_heading = "Credentials (sent only to the archive URL's origin; files re-read at each retry)"
)]
struct CredentialArgs {
    /// Send `Authorization: Bearer <the file's content>` (a WLCG or BigPanDA token)
    #[arg(long, env = "FLOWGATE_FETCH_BEARER_TOKEN_FILE", value_name = "FILE")]
    bearer_token_file: Option<PathBuf>,
    /// Send these `Name: value` lines as headers
    #[arg(long, env = "FLOWGATE_FETCH_HEADER_FILE", value_name = "FILE")]
    header_file: Option<PathBuf>,
    /// Present this PEM client certificate; with its key in it (a grid proxy) or in --client-key
    #[arg(long, env = "FLOWGATE_FETCH_CLIENT_CERT", value_name = "FILE")]
    client_cert: Option<PathBuf>,
    /// The client certificate's PEM private key
    #[arg(
        long,
        env = "FLOWGATE_FETCH_CLIENT_KEY",
        value_name = "FILE",
        requires = "client_cert"
    )]
    client_key: Option<PathBuf>,
    /// Also trust the PEM CA certificates in FILE, or in the files of DIR (/etc/grid-security/certificates)
    #[arg(
        long,
        env = "FLOWGATE_FETCH_CA_FILE",
        value_name = "FILE|DIR",
        value_delimiter = ','
    )]
    ca_file: Vec<PathBuf>,
    /// Trust only --ca-file, not the system's CAs
    #[arg(long, env = "FLOWGATE_FETCH_NO_SYSTEM_CAS")]
    no_system_cas: bool,
    /// Send the token, headers and client certificate only to these origins
    /// (`https://host[:port]`; default: the --url's); an archive elsewhere is
    /// fetched without them
    #[arg(long, env = "FLOWGATE_FETCH_CREDENTIALS_ORIGIN", value_name = "ORIGIN", value_delimiter = ',', value_parser = origin)]
    credentials_origin: Vec<String>,
    /// Take what is not given above from DIR's files: token, headers, tls.crt + tls.key or proxy.pem, ca.crt, and origins (required: where they may be sent) (a mounted Secret)
    #[arg(long, env = "FLOWGATE_FETCH_CREDENTIALS_DIR", value_name = "DIR")]
    credentials_dir: Option<PathBuf>,
}

fn origin(raw: &str) -> Result<String, String> {
    let url = url::Url::parse(raw).map_err(|e| format!("{raw:?}: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "{raw:?}: an http(s) origin such as https://bigpanda.cern.ch"
        ));
    }
    Ok(url.origin().ascii_serialization())
}

impl CredentialArgs {
    fn resolve(self) -> Credentials {
        let explicit = Credentials {
            bearer_token_file: self.bearer_token_file,
            header_file: self.header_file,
            client_cert: self.client_cert,
            client_key: self.client_key,
            ca: self.ca_file,
            system_cas: !self.no_system_cas,
            origins: (!self.credentials_origin.is_empty()).then_some(self.credentials_origin),
        };
        match &self.credentials_dir {
            Some(dir) => explicit.with_dir(dir),
            None => explicit,
        }
    }
}

fn main() -> anyhow::Result<()> {
    adapter::telemetry::init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Fetch(args)) => run_fetch(args),
        None => run_proxy(cli.serve),
    }
}

fn run_proxy(args: ServeArgs) -> anyhow::Result<()> {
    let config = ProxyConfig::resolve(args, std::env::vars())?;
    // One worker thread means one thread in all: accepting and serving on the
    // same thread avoids a cross-thread wake-up per connection.
    let runtime = if config.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.threads)
            .enable_all()
            .build()
    }
    .context("starting the runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        tracing::info!(
            listen = %listener.local_addr()?,
            upstream = %config.upstream,
            prefix = %config.prefix,
            rewrite = config.rewrite,
            writes = config.writes,
            public_host = config.public_hosts.as_ref().map(|h| h.to_string()),
            threads = config.threads,
            "flowgate-adapter ready"
        );
        if config.public_hosts.is_none() {
            tracing::warn!(
                "no --public-host (FLOWGATE_PUBLIC_HOST): answering for any Host, so a page \
                 on another name that resolves here (DNS rebinding) reaches the app; set it \
                 to the host names browsers use"
            );
        }
        let limits = ConnectionLimits::from(&config);
        // Spawned, so that the accept loop runs on a worker thread too.
        let serving = tokio::spawn(async move {
            serve(Proxy::new(config), &limits, listener, shutdown_signal()).await
        });
        match serving.await.context("serving")? {
            Drain::Complete => tracing::info!("drained; exiting"),
            Drain::TimedOut => tracing::warn!("drain timed out; exiting with requests cut"),
        }
        Ok(())
    })
}

fn run_fetch(args: FetchArgs) -> anyhow::Result<()> {
    let options = FetchOptions {
        url: args.url,
        sha256: args.sha256,
        dest: args.dest,
        limits: Limits {
            max_download_bytes: args.max_download_bytes,
            max_unpacked_bytes: args.max_unpacked_bytes,
            max_entries: args.max_entries,
        },
        retries: args.retries,
        backoff: args.backoff,
        timeouts: Timeouts {
            connect: args.connect_timeout,
            stall: args.stall_timeout,
            deadline: args.deadline,
        },
        credentials: args.credentials.resolve(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let counts = std::sync::Arc::new(adapter::fetch::report::Counts::default());
    if args.report_progress {
        let dir = std::path::Path::new(adapter::fetch::report::TOKEN_DIR);
        match adapter::fetch::report::Reporter::from_env(dir) {
            Ok(reporter) => {
                let counts = std::sync::Arc::clone(&counts);
                runtime.spawn(reporter.run(counts, Duration::from_secs(1)));
            }
            Err(e) => tracing::warn!(error = %e, "cannot report progress"),
        }
    }
    let progress = |bytes: u64, total: Option<u64>| counts.set(bytes, total);
    let outcome = runtime.block_on(adapter::fetch::fetch_reporting(&options, &progress));
    if let Some(path) = &args.termination_log {
        let said = match &outcome {
            Ok(_) => "verified: the archive's sha256 matched".to_owned(),
            Err(e) => e.public_reason(),
        };
        if let Err(e) = std::fs::write(path, said) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the termination message");
        }
    }
    match outcome? {
        Outcome::AlreadyPresent => println!("{}: already present", options.dest.display()),
        Outcome::Installed {
            archive_bytes,
            entries,
            unpacked_bytes,
        } => println!(
            "{}: installed {entries} entries ({unpacked_bytes} bytes) from a {archive_bytes}-byte archive",
            options.dest.display()
        ),
    }
    Ok(())
}
