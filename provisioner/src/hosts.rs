//! The host names `flowgate serve` answers (`--public-host`), against DNS
//! rebinding: a page on another site that makes its own name resolve to
//! 127.0.0.1 reaches the REST API and the local instances with its own name in
//! `Host`. Both listeners answer 421 Misdirected Request to any `Host` not in
//! the list; the probe paths (`/healthz`, `/readyz`, `/metrics`) answer to any.
//!
//! An entry is `name` (any port) or `name:port`; IPv6 literals in brackets;
//! names compare case-insensitively, without a trailing dot.

use crate::{Error, Result};
use http::uri::Authority;
use std::net::SocketAddr;

/// Paths a probe or scraper may ask under any host name.
pub const PROBE_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// One allowed host, with or without a port.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Allowed {
    name: String,
    port: Option<u16>,
}

/// The `Host` values a listener answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicHosts(Vec<Allowed>);

/// `(name, port)` of an authority (`Host` value), normalised; None if it is
/// not one (userinfo, garbage, empty).
fn split(raw: &str) -> Option<(String, Option<u16>)> {
    let raw = raw.trim();
    if raw.is_empty() || raw.contains('@') {
        return None;
    }
    let authority: Authority = raw.parse().ok()?;
    // a port must be digits (Authority takes `host:garbage` as a host)
    if let Some((_, port)) = raw.rsplit_once(':')
        && !raw.ends_with(']')
        && (port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()))
        && !raw.starts_with('[')
    {
        return None;
    }
    if authority.port().is_some() && authority.port_u16().is_none() {
        return None;
    }
    let name = authority.host().trim_end_matches('.').to_ascii_lowercase();
    if name.is_empty() {
        return None;
    }
    Some((name, authority.port_u16()))
}

impl PublicHosts {
    /// Parses a comma-separated list (`--public-host`).
    pub fn parse(list: &str) -> Result<Self> {
        let mut out = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (name, port) = split(entry).ok_or_else(|| {
                Error::invalid(
                    "public-host",
                    format!("{entry:?}: not a host name, host:port or [v6]:port"),
                )
            })?;
            out.push(Allowed { name, port });
        }
        if out.is_empty() {
            return Err(Error::invalid("public-host", "no host names given"));
        }
        Ok(Self(out))
    }

    /// The default: each listen address and `localhost` on its port, and the
    /// `extra` names (a public URL's authority, the instances' shared host).
    pub fn defaults(listen: &[SocketAddr], extra: &[String]) -> Self {
        let mut out = Vec::new();
        for addr in listen {
            let ip = match addr {
                SocketAddr::V4(a) => a.ip().to_string(),
                SocketAddr::V6(a) => format!("[{}]", a.ip()),
            };
            out.push(Allowed {
                name: ip,
                port: Some(addr.port()),
            });
            out.push(Allowed {
                name: "localhost".into(),
                port: Some(addr.port()),
            });
        }
        for e in extra {
            if let Some((name, port)) = split(e) {
                out.push(Allowed { name, port });
            }
        }
        out.dedup();
        Self(out)
    }

    /// True when `host` (a `Host` header or `:authority`) is one of them.
    pub fn allows(&self, host: &str) -> bool {
        let Some((name, port)) = split(host) else {
            return false;
        };
        self.0
            .iter()
            .any(|a| a.name == name && (a.port.is_none() || a.port == port))
    }

    /// True when the request may go on: a probe path, or an allowed host.
    pub fn admits<B>(&self, req: &http::Request<B>) -> bool {
        if PROBE_PATHS.contains(&req.uri().path()) {
            return true;
        }
        let host = req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(Authority::as_str));
        host.is_some_and(|h| self.allows(h))
    }

    /// The list, for logs and errors.
    pub fn describe(&self) -> String {
        self.0
            .iter()
            .map(|a| match a.port {
                Some(p) => format!("{}:{p}", a.name),
                None => a.name.clone(),
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_ports_and_case() {
        let h = PublicHosts::parse("ML.example.org, localhost:8080,[::1]:7000").unwrap();
        assert!(h.allows("ml.example.org"));
        assert!(h.allows("ml.example.org:443"));
        assert!(h.allows("ML.EXAMPLE.ORG."));
        assert!(h.allows("localhost:8080"));
        assert!(!h.allows("localhost:8081"));
        assert!(!h.allows("localhost"));
        assert!(h.allows("[::1]:7000"));
        for bad in [
            "evil.example",
            "ml.example.org.evil.example",
            "user@ml.example.org",
            "",
            " ",
            "ml.example.org:notaport",
        ] {
            assert!(!h.allows(bad), "{bad:?}");
        }
        assert!(PublicHosts::parse("").is_err());
        assert!(PublicHosts::parse("a b").is_err());
    }

    #[test]
    fn defaults_are_the_listeners_and_localhost() {
        let h = PublicHosts::defaults(
            &[
                "127.0.0.1:7000".parse().unwrap(),
                "[::1]:8080".parse().unwrap(),
            ],
            &["flowgate.example.org".into()],
        );
        assert!(h.allows("127.0.0.1:7000"));
        assert!(h.allows("localhost:7000"));
        assert!(h.allows("[::1]:8080"));
        assert!(h.allows("localhost:8080"));
        assert!(h.allows("flowgate.example.org"));
        assert!(!h.allows("127.0.0.1:9999"));
        assert!(!h.allows("rebound.evil.example:7000"));
    }

    #[test]
    fn probes_answer_any_host() {
        let h = PublicHosts::parse("ok.example").unwrap();
        let req = |path: &str, host: &str| {
            http::Request::builder()
                .uri(path)
                .header("host", host)
                .body(())
                .unwrap()
        };
        assert!(h.admits(&req("/healthz", "10.0.0.7:7000")));
        assert!(h.admits(&req("/metrics", "x")));
        assert!(!h.admits(&req("/api/v1/instances", "x")));
        assert!(!h.admits(&req("/healthz/x", "x")));
        assert!(h.admits(&req("/api/v1/instances", "ok.example:7000")));
        let no_host = http::Request::builder().uri("/x").body(()).unwrap();
        assert!(!h.admits(&no_host));
        let h2 = http::Request::builder()
            .uri("http://ok.example/x")
            .body(())
            .unwrap();
        assert!(h.admits(&h2));
    }
}
