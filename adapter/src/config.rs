//! Configuration: command-line flags (clap) with `FLOWGATE_*` environment
//! fallbacks (envy), resolved into one typed [`ProxyConfig`]. Resolution takes
//! the environment as an iterator, so tests never touch the process's own.

use crate::access::{Gate, KeyError, Keys};
use crate::host::{InvalidHost, PublicHosts};
use crate::prefix::{InvalidPrefix, Prefix};
use clap::{Args, ValueEnum};
use http::{HeaderValue, Uri};
use serde::Deserialize;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

/// Whether paths are stripped and responses rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RewriteMode {
    /// Strip the prefix on the way in, put it back on the way out.
    On,
    /// Forward paths untouched (the app was started with its own prefix).
    Off,
}

impl FromStr for RewriteMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        <Self as ValueEnum>::from_str(s, true)
    }
}

/// An on/off setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

impl FromStr for Switch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        <Self as ValueEnum>::from_str(s, true)
    }
}

/// The proxy's flags. Each falls back to `FLOWGATE_<NAME>` in the environment.
#[derive(Args, Debug, Default, Clone)]
pub struct ServeArgs {
    /// Where browsers (through the router) connect [env: FLOWGATE_LISTEN] [default: 0.0.0.0:8080]
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// The app in the same pod [env: FLOWGATE_UPSTREAM] [default: http://127.0.0.1:5000]
    #[arg(long)]
    pub upstream: Option<String>,
    /// The instance path, e.g. /k3x9q2a [env: FLOWGATE_PREFIX] (required)
    #[arg(long)]
    pub prefix: Option<String>,
    /// on: strip and rewrite; off: pass paths through untouched [env: FLOWGATE_REWRITE] [default: on]
    #[arg(long, value_enum)]
    pub rewrite: Option<RewriteMode>,
    /// Compress text responses for clients that accept it [env: FLOWGATE_COMPRESS] [default: on]
    #[arg(long, value_enum)]
    pub compress: Option<RewriteMode>,
    /// Worker threads [env: FLOWGATE_THREADS] [default: one per core]
    #[arg(long)]
    pub threads: Option<usize>,
    /// Longest wait for the upstream's response headers [env: FLOWGATE_UPSTREAM_TIMEOUT] [default: 60s]
    #[arg(long, value_parser = humantime::parse_duration)]
    pub upstream_timeout: Option<Duration>,
    /// Longest wait to connect to the upstream [env: FLOWGATE_CONNECT_TIMEOUT] [default: 5s]
    #[arg(long, value_parser = humantime::parse_duration)]
    pub connect_timeout: Option<Duration>,
    /// Longest wait for in-flight requests after SIGTERM [env: FLOWGATE_DRAIN_TIMEOUT] [default: 25s]
    #[arg(long, value_parser = humantime::parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// Upstream path that /readyz probes [env: FLOWGATE_READY_PATH] [default: /health]
    #[arg(long)]
    pub ready_path: Option<String>,
    /// Host names browsers use, comma-separated, port optional; other Hosts get 421 [env: FLOWGATE_PUBLIC_HOST] [default: any Host, with a warning]
    #[arg(long)]
    pub public_host: Option<String>,
    /// off: GET, HEAD and the UI's read-only POSTs only, anything else 403; on: every method [env: FLOWGATE_WRITES] [default: off]
    #[arg(long, value_enum)]
    pub writes: Option<Switch>,
    /// Longest wait for a new connection's first request head, and for any request head [env: FLOWGATE_HEADER_TIMEOUT] [default: 30s]
    #[arg(long, value_parser = humantime::parse_duration)]
    pub header_timeout: Option<Duration>,
    /// Longest a connection stays open with no request in flight [env: FLOWGATE_IDLE_TIMEOUT] [default: 30s]
    #[arg(long, value_parser = humantime::parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// Longest a client may leave response bytes unread (no write to it makes progress) before its connection is closed, as NGINX's send_timeout [env: FLOWGATE_SEND_TIMEOUT] [default: 60s]
    #[arg(long, value_parser = humantime::parse_duration)]
    pub send_timeout: Option<Duration>,
    /// Most client connections open at once; more are closed at accept [env: FLOWGATE_MAX_CONNECTIONS] [default: 1024]
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// A `link` instance: the installation's access keys (one per line, the first signs); only an access link or its cookie opens the instance [env: FLOWGATE_ACCESS_KEYS] [default: none, the URL alone opens it]
    #[arg(long)]
    pub access_keys: Option<std::path::PathBuf>,
    /// Responses compressed at once, of which an eighth with zstd or brotli; past those, gzip, then none [env: FLOWGATE_MAX_ENCODERS] [default: 16]
    #[arg(long)]
    pub max_encoders: Option<usize>,
    /// MiB of memory for the app's static files as sent (rewritten, compressed), 0 for none [env: FLOWGATE_STATIC_CACHE_MIB] [default: 16]
    #[arg(long)]
    pub static_cache_mib: Option<usize>,
}

/// The same settings as read from `FLOWGATE_*` variables.
#[derive(Debug, Default, Deserialize)]
struct EnvArgs {
    listen: Option<String>,
    upstream: Option<String>,
    prefix: Option<String>,
    rewrite: Option<String>,
    compress: Option<String>,
    threads: Option<String>,
    upstream_timeout: Option<String>,
    connect_timeout: Option<String>,
    drain_timeout: Option<String>,
    ready_path: Option<String>,
    public_host: Option<String>,
    writes: Option<String>,
    header_timeout: Option<String>,
    idle_timeout: Option<String>,
    send_timeout: Option<String>,
    max_connections: Option<String>,
    access_keys: Option<std::path::PathBuf>,
    max_encoders: Option<String>,
    static_cache_mib: Option<String>,
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required setting is absent.
    #[error("{0} is required (flag or environment variable)")]
    Missing(&'static str),
    /// A setting does not parse.
    #[error("{name}: {message}")]
    Invalid {
        /// The setting.
        name: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The prefix is malformed.
    #[error(transparent)]
    Prefix(#[from] InvalidPrefix),
    /// A public host is malformed.
    #[error("public-host: {0}")]
    PublicHost(#[from] InvalidHost),
    /// The environment could not be read.
    #[error("environment: {0}")]
    Env(#[from] envy::Error),
    /// The access keys cannot be used.
    #[error(transparent)]
    Access(#[from] KeyError),
}

/// Everything the proxy needs, validated.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Listening address.
    pub listen: SocketAddr,
    /// Upstream base URI (scheme and authority).
    pub upstream: Uri,
    /// The upstream's authority, sent as its `Host`.
    pub upstream_authority: HeaderValue,
    /// The upstream's origin, `http://host:port`.
    pub upstream_origin: String,
    /// The same, as the `Origin` header sent upstream.
    pub upstream_origin_header: HeaderValue,
    /// The instance prefix.
    pub prefix: Prefix,
    /// The prefix as the `X-Forwarded-Prefix` header value.
    pub prefix_header: HeaderValue,
    /// The hosts browsers use; `None`: any (a standalone adapter).
    pub public_hosts: Option<PublicHosts>,
    /// Forward every method (on) or only reads (off).
    pub writes: bool,
    /// Strip and rewrite (on) or pass through (off).
    pub rewrite: bool,
    /// Compress text responses for clients that accept it.
    pub compress: bool,
    /// Runtime worker threads.
    pub threads: usize,
    /// Longest wait for response headers.
    pub upstream_timeout: Duration,
    /// Longest wait to connect.
    pub connect_timeout: Duration,
    /// Longest drain after SIGTERM.
    pub drain_timeout: Duration,
    /// Upstream path probed by /readyz.
    pub ready_path: String,
    /// Longest wait for a client's request headers (and a new connection's first).
    pub header_read_timeout: Duration,
    /// Longest a connection stays open with no request in flight.
    pub idle_timeout: Duration,
    /// Longest a write to a client may make no progress.
    pub send_timeout: Duration,
    /// Most client connections at once.
    pub max_connections: usize,
    /// Largest request head accepted (bytes).
    pub max_header_bytes: usize,
    /// `link` access: who may open the instance; `None`: anyone with the URL.
    pub access: Option<Gate>,
    /// Responses compressed at once (see [`crate::encoders`]).
    pub max_encoders: usize,
    /// Bytes of the static cache (see [`crate::static_cache`]); 0: none.
    pub static_cache_bytes: usize,
}

impl ProxyConfig {
    /// Resolves flags over `FLOWGATE_*` variables over defaults.
    pub fn resolve<I>(args: ServeArgs, env: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let env: EnvArgs = envy::prefixed("FLOWGATE_").from_iter(env)?;
        let listen = pick(args.listen, env.listen, "listen")?
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080)));
        let upstream = args
            .upstream
            .or(env.upstream)
            .unwrap_or_else(|| "http://127.0.0.1:5000".into());
        let (upstream, upstream_authority, upstream_origin) = parse_upstream(&upstream)?;
        let prefix = Prefix::new(
            &args
                .prefix
                .or(env.prefix)
                .ok_or(ConfigError::Missing("--prefix / FLOWGATE_PREFIX"))?,
        )?;
        let rewrite = pick(args.rewrite, env.rewrite, "rewrite")?.unwrap_or(RewriteMode::On)
            == RewriteMode::On;
        let compress = pick(args.compress, env.compress, "compress")?.unwrap_or(RewriteMode::On)
            == RewriteMode::On;
        let threads = pick(args.threads, env.threads, "threads")?
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if threads == 0 {
            return Err(ConfigError::Invalid {
                name: "threads",
                message: "must be at least 1".into(),
            });
        }
        let duration = |flag: Option<Duration>,
                        env: Option<String>,
                        name,
                        default|
         -> Result<Duration, ConfigError> {
            match (flag, env) {
                (Some(d), _) => Ok(d),
                (None, Some(s)) => {
                    humantime::parse_duration(&s).map_err(|e| ConfigError::Invalid {
                        name,
                        message: e.to_string(),
                    })
                }
                (None, None) => Ok(default),
            }
        };
        let ready_path = args
            .ready_path
            .or(env.ready_path)
            .unwrap_or_else(|| "/health".into());
        if !ready_path.starts_with('/') {
            return Err(ConfigError::Invalid {
                name: "ready-path",
                message: "must start with '/'".into(),
            });
        }
        let public_hosts = args
            .public_host
            .or(env.public_host)
            .map(|list| list.parse::<PublicHosts>())
            .transpose()?;
        let writes = pick(args.writes, env.writes, "writes")?.unwrap_or(Switch::Off) == Switch::On;
        let max_connections =
            pick(args.max_connections, env.max_connections, "max-connections")?.unwrap_or(1024);
        if max_connections == 0 || u32::try_from(max_connections).is_err() {
            return Err(ConfigError::Invalid {
                name: "max-connections",
                message: "must be between 1 and 4294967295".into(),
            });
        }
        let positive = |d: Duration, name| {
            if d.is_zero() {
                Err(ConfigError::Invalid {
                    name,
                    message: "must be longer than zero".into(),
                })
            } else {
                Ok(d)
            }
        };
        let access = match args.access_keys.or(env.access_keys) {
            Some(path) => Some(Gate::new(
                Keys::load(&path)?,
                prefix.as_str().trim_start_matches('/'),
            )),
            None => None,
        };
        let upstream_origin_header =
            HeaderValue::from_str(&upstream_origin).expect("checked as an authority");
        let prefix_header =
            HeaderValue::from_str(prefix.as_str()).expect("a prefix is a valid header value");
        Ok(Self {
            listen,
            upstream,
            upstream_authority,
            upstream_origin,
            upstream_origin_header,
            prefix,
            prefix_header,
            public_hosts,
            writes,
            rewrite,
            compress,
            threads,
            upstream_timeout: duration(
                args.upstream_timeout,
                env.upstream_timeout,
                "upstream-timeout",
                Duration::from_secs(60),
            )?,
            connect_timeout: duration(
                args.connect_timeout,
                env.connect_timeout,
                "connect-timeout",
                Duration::from_secs(5),
            )?,
            drain_timeout: duration(
                args.drain_timeout,
                env.drain_timeout,
                "drain-timeout",
                Duration::from_secs(25),
            )?,
            ready_path,
            header_read_timeout: positive(
                duration(
                    args.header_timeout,
                    env.header_timeout,
                    "header-timeout",
                    Duration::from_secs(30),
                )?,
                "header-timeout",
            )?,
            idle_timeout: positive(
                duration(
                    args.idle_timeout,
                    env.idle_timeout,
                    "idle-timeout",
                    Duration::from_secs(30),
                )?,
                "idle-timeout",
            )?,
            send_timeout: positive(
                duration(
                    args.send_timeout,
                    env.send_timeout,
                    "send-timeout",
                    Duration::from_secs(60),
                )?,
                "send-timeout",
            )?,
            max_connections,
            max_header_bytes: 64 * 1024,
            access,
            max_encoders: pick(args.max_encoders, env.max_encoders, "max-encoders")?
                .unwrap_or(16)
                .max(1),
            static_cache_bytes: pick(
                args.static_cache_mib,
                env.static_cache_mib,
                "static-cache-mib",
            )?
            .unwrap_or(16)
            .min(1 << 20)
                << 20,
        })
    }
}

/// Flag over environment; an environment value that does not parse is an error.
fn pick<T: FromStr>(
    flag: Option<T>,
    env: Option<String>,
    name: &'static str,
) -> Result<Option<T>, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match (flag, env) {
        (Some(v), _) => Ok(Some(v)),
        (None, Some(s)) => s
            .parse()
            .map(Some)
            .map_err(|e: T::Err| ConfigError::Invalid {
                name,
                message: format!("{s:?}: {e}"),
            }),
        (None, None) => Ok(None),
    }
}

fn parse_upstream(raw: &str) -> Result<(Uri, HeaderValue, String), ConfigError> {
    let invalid = |message: &str| ConfigError::Invalid {
        name: "upstream",
        message: format!("{raw:?}: {message}"),
    };
    let uri: Uri = raw.parse().map_err(|_| invalid("not a URI"))?;
    if uri.scheme_str() != Some("http") {
        return Err(invalid(
            "must be http://host:port (the app in the same pod)",
        ));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| invalid("has no host"))?
        .clone();
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(invalid("must not have a path or query"));
    }
    let header = HeaderValue::from_str(authority.as_str()).map_err(|_| invalid("bad authority"))?;
    Ok((uri, header, format!("http://{authority}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_with_only_a_prefix() {
        let c = ProxyConfig::resolve(
            ServeArgs::default(),
            env(&[("FLOWGATE_PREFIX", "/k3x9q2a")]),
        )
        .unwrap();
        assert_eq!(c.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.upstream_origin, "http://127.0.0.1:5000");
        assert_eq!(c.upstream_authority, "127.0.0.1:5000");
        assert_eq!(c.prefix.as_str(), "/k3x9q2a");
        assert!(c.rewrite && c.compress);
        assert_eq!(c.upstream_timeout, Duration::from_secs(60));
        assert_eq!(c.ready_path, "/health");
        assert!(c.threads >= 1);
        assert_eq!(c.public_hosts, None);
        assert!(!c.writes, "read-only unless told otherwise");
        assert_eq!(c.header_read_timeout, Duration::from_secs(30));
        assert_eq!(c.idle_timeout, Duration::from_secs(30));
        assert_eq!(c.send_timeout, Duration::from_secs(60));
        assert_eq!(c.max_connections, 1024);
        assert_eq!(c.prefix_header, "/k3x9q2a");
        assert_eq!(c.upstream_origin_header, "http://127.0.0.1:5000");
    }

    #[test]
    fn public_hosts_writes_and_connection_bounds() {
        let c = ProxyConfig::resolve(
            ServeArgs::default(),
            env(&[
                ("FLOWGATE_PREFIX", "/k3x9q2a"),
                ("FLOWGATE_PUBLIC_HOST", "mlflow.example.org, localhost:8080"),
                ("FLOWGATE_WRITES", "on"),
                ("FLOWGATE_HEADER_TIMEOUT", "5s"),
                ("FLOWGATE_IDLE_TIMEOUT", "2m"),
                ("FLOWGATE_SEND_TIMEOUT", "10s"),
                ("FLOWGATE_MAX_CONNECTIONS", "64"),
            ]),
        )
        .unwrap();
        let hosts = c.public_hosts.unwrap();
        assert!(hosts.allows("mlflow.example.org:443") && hosts.allows("localhost:8080"));
        assert!(!hosts.allows("localhost:8081"));
        assert!(c.writes);
        assert_eq!(c.header_read_timeout, Duration::from_secs(5));
        assert_eq!(c.send_timeout, Duration::from_secs(10));
        assert_eq!(c.idle_timeout, Duration::from_secs(120));
        assert_eq!(c.max_connections, 64);
        let args = ServeArgs {
            writes: Some(Switch::Off),
            public_host: Some("flagged.example".into()),
            ..Default::default()
        };
        let c = ProxyConfig::resolve(
            args,
            env(&[
                ("FLOWGATE_PREFIX", "/k3x9q2a"),
                ("FLOWGATE_WRITES", "on"),
                ("FLOWGATE_PUBLIC_HOST", "env.example"),
            ]),
        )
        .unwrap();
        assert!(!c.writes);
        assert!(c.public_hosts.unwrap().allows("flagged.example"));
    }

    #[test]
    fn environment_fills_what_flags_leave() {
        let c = ProxyConfig::resolve(
            ServeArgs::default(),
            env(&[
                ("FLOWGATE_LISTEN", "127.0.0.1:9000"),
                ("FLOWGATE_UPSTREAM", "http://localhost:5001"),
                ("FLOWGATE_PREFIX", "/abcdefg"),
                ("FLOWGATE_REWRITE", "off"),
                ("FLOWGATE_THREADS", "3"),
                ("FLOWGATE_UPSTREAM_TIMEOUT", "1m 30s"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(c.upstream_authority, "localhost:5001");
        assert!(!c.rewrite);
        assert_eq!(c.threads, 3);
        assert_eq!(c.upstream_timeout, Duration::from_secs(90));
    }

    #[test]
    fn flags_win_over_environment() {
        let args = ServeArgs {
            prefix: Some("/flagged".into()),
            threads: Some(2),
            ..Default::default()
        };
        let c = ProxyConfig::resolve(
            args,
            env(&[("FLOWGATE_PREFIX", "/fromenv"), ("FLOWGATE_THREADS", "8")]),
        )
        .unwrap();
        assert_eq!(c.prefix.as_str(), "/flagged");
        assert_eq!(c.threads, 2);
    }

    #[test]
    fn the_static_cache_size_is_checked_and_bounded() {
        let resolve = |v: &str| {
            ProxyConfig::resolve(
                ServeArgs::default(),
                env(&[("FLOWGATE_PREFIX", "/a"), ("FLOWGATE_STATIC_CACHE_MIB", v)]),
            )
        };
        for bad in ["lots", "-1", "1.5", ""] {
            let e = resolve(bad).unwrap_err().to_string();
            assert!(e.starts_with("static-cache-mib:"), "{bad:?}: {e}");
        }
        assert_eq!(resolve("0").unwrap().static_cache_bytes, 0, "off");
        assert_eq!(
            resolve(&u64::MAX.to_string()).unwrap().static_cache_bytes,
            1 << 40,
            "capped, no overflow"
        );
    }

    #[test]
    fn clear_errors() {
        let err = |pairs: &[(&str, &str)]| {
            ProxyConfig::resolve(ServeArgs::default(), env(pairs))
                .unwrap_err()
                .to_string()
        };
        assert!(err(&[]).contains("--prefix / FLOWGATE_PREFIX is required"));
        assert!(err(&[("FLOWGATE_PREFIX", "k3x9q2a")]).contains("invalid prefix"));
        assert!(
            err(&[
                ("FLOWGATE_PREFIX", "/a"),
                ("FLOWGATE_UPSTREAM", "https://x")
            ])
            .contains("must be http://")
        );
        assert!(
            err(&[
                ("FLOWGATE_PREFIX", "/a"),
                ("FLOWGATE_UPSTREAM", "http://x/sub")
            ])
            .contains("path")
        );
        assert!(
            err(&[("FLOWGATE_PREFIX", "/a"), ("FLOWGATE_THREADS", "many")]).starts_with("threads:")
        );
        assert!(
            err(&[("FLOWGATE_PREFIX", "/a"), ("FLOWGATE_THREADS", "0")]).contains("at least 1")
        );
        assert!(
            err(&[("FLOWGATE_PREFIX", "/a"), ("FLOWGATE_REWRITE", "maybe")])
                .starts_with("rewrite:")
        );
        assert!(
            err(&[
                ("FLOWGATE_PREFIX", "/a"),
                ("FLOWGATE_DRAIN_TIMEOUT", "soon")
            ])
            .starts_with("drain-timeout:")
        );
        assert!(
            err(&[("FLOWGATE_PREFIX", "/a"), ("FLOWGATE_LISTEN", "nowhere")])
                .starts_with("listen:")
        );
        assert!(
            err(&[("FLOWGATE_PREFIX", "/a"), ("FLOWGATE_WRITES", "sometimes")])
                .starts_with("writes:")
        );
        assert!(
            err(&[
                ("FLOWGATE_PREFIX", "/a"),
                ("FLOWGATE_PUBLIC_HOST", "https://mlflow.example.org")
            ])
            .starts_with("public-host:")
        );
        assert!(
            err(&[("FLOWGATE_PREFIX", "/a"), ("FLOWGATE_PUBLIC_HOST", " , ")])
                .starts_with("public-host:")
        );
        assert!(
            err(&[("FLOWGATE_PREFIX", "/a"), ("FLOWGATE_MAX_CONNECTIONS", "0")])
                .starts_with("max-connections:")
        );
        assert!(
            err(&[("FLOWGATE_PREFIX", "/a"), ("FLOWGATE_HEADER_TIMEOUT", "0s")])
                .starts_with("header-timeout:")
        );
        assert!(
            err(&[("FLOWGATE_PREFIX", "/a"), ("FLOWGATE_SEND_TIMEOUT", "0s")])
                .starts_with("send-timeout:")
        );
        assert!(
            err(&[("FLOWGATE_PREFIX", "/a"), ("FLOWGATE_SEND_TIMEOUT", "soon")])
                .starts_with("send-timeout:")
        );
    }
}
