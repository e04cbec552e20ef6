//! The host names browsers use to reach an instance (`--public-host`). A
//! request for any other `Host` is answered 421 (a DNS-rebinding page on
//! another name cannot reach the app), and only a browser's own public origin
//! is translated into the upstream's on `Origin` and `Referer`.

use http::uri::Authority;
use std::fmt;
use std::str::FromStr;

/// One allowed host, with the port browsers use when it is given.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PublicHost {
    /// Lower case; IPv6 literals keep their brackets.
    host: String,
    port: Option<u16>,
}

/// The allowed hosts: `mlflow.example.org, localhost:8080, [::1]:8080`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicHosts(Vec<PublicHost>);

/// Why a `--public-host` list was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{0:?} is not a host name with an optional port (e.g. mlflow.example.org or localhost:8080)"
)]
pub struct InvalidHost(pub String);

impl FromStr for PublicHosts {
    type Err = InvalidHost;

    fn from_str(list: &str) -> Result<Self, InvalidHost> {
        let hosts = list
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| parse_host(h).ok_or_else(|| InvalidHost(h.to_owned())))
            .collect::<Result<Vec<_>, _>>()?;
        if hosts.is_empty() {
            return Err(InvalidHost(list.to_owned()));
        }
        Ok(Self(hosts))
    }
}

fn parse_host(raw: &str) -> Option<PublicHost> {
    let authority: Authority = raw.parse().ok()?;
    // `user@host` parses as an authority; a host name it is not.
    if authority.as_str().contains('@') {
        return None;
    }
    let host = authority.host();
    let name_ok = if host.starts_with('[') {
        host.ends_with(']')
            && host[1..host.len() - 1]
                .parse::<std::net::Ipv6Addr>()
                .is_ok()
    } else {
        !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'))
    };
    // Nothing but the host and a numeric port (`host:http` parses, too).
    let exact = match authority.port_u16() {
        Some(port) => authority.as_str() == format!("{host}:{port}"),
        None => authority.as_str() == host,
    };
    if !name_ok || !exact {
        return None;
    }
    Some(PublicHost {
        host: host.to_ascii_lowercase(),
        port: authority.port_u16(),
    })
}

impl PublicHosts {
    /// Whether a request's `Host` (or HTTP/2 `:authority`) is one of ours. A
    /// host listed without a port matches on any port.
    pub fn allows(&self, request_host: &str) -> bool {
        let Some(asked) = parse_host(request_host) else {
            return false;
        };
        self.0
            .iter()
            .any(|h| h.host == asked.host && (h.port.is_none() || h.port == asked.port))
    }
}

impl fmt::Display for PublicHosts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, h) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(&h.host)?;
            if let Some(port) = h.port {
                write!(f, ":{port}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_and_refuses_what_is_not_a_host() {
        let hosts: PublicHosts = " MLflow.Example.org, localhost:8080,[::1]:9000,127.0.0.1 "
            .parse()
            .unwrap();
        assert_eq!(
            hosts.to_string(),
            "mlflow.example.org,localhost:8080,[::1]:9000,127.0.0.1"
        );
        for bad in [
            "",
            ",",
            "http://mlflow.example.org",
            "mlflow.example.org/x",
            "user@mlflow.example.org",
            "mlflow.example.org:http",
            "mlflow.example.org:99999",
            "a b",
            "[zz]:80",
            "under_score.example",
        ] {
            assert!(bad.parse::<PublicHosts>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn matches_hosts_and_ports() {
        let hosts: PublicHosts = "mlflow.example.org,localhost:8080,[::1]:9000"
            .parse()
            .unwrap();
        let table = [
            ("mlflow.example.org", true),
            ("MLFLOW.example.ORG", true),
            ("mlflow.example.org:8443", true),
            ("localhost:8080", true),
            ("localhost", false),
            ("localhost:8081", false),
            ("[::1]:9000", true),
            ("[::1]", false),
            ("mlflow.example.org.", false),
            ("evil.example", false),
            ("mlflow.example.org.evil.example", false),
            ("user@mlflow.example.org", false),
            ("", false),
        ];
        for (asked, want) in table {
            assert_eq!(hosts.allows(asked), want, "{asked}");
        }
    }
}
