//! Header rewriting in both directions: what the upstream must see (its own
//! Host and Origin, `X-Forwarded-*`, no hop-by-hop headers) and what the
//! browser must see (`Location`, `Content-Location`, `Refresh` and cookie paths
//! with the prefix back).

use crate::prefix::Prefix;
use crate::rewrite::html::refresh_url;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use std::net::IpAddr;

/// The headers that belong to one connection, never forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");

/// Removes hop-by-hop headers, including those the `Connection` header names.
/// `Upgrade` (with `Connection: upgrade`) is kept when `keep_upgrade` is set.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    if let Some(connection) = headers
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
    {
        let named: Vec<HeaderName> = connection
            .split(',')
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| !(keep_upgrade && *n == header::UPGRADE))
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// True when a request asks to switch protocols (WebSocket and friends).
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// What the upstream request needs to know about the incoming one.
pub struct ForwardContext<'a> {
    /// The host the browser used (`Host`, or the HTTP/2 authority); with
    /// `--public-host`, already checked to be one of them.
    pub public_host: Option<&'a str>,
    /// The peer's address.
    pub client_ip: IpAddr,
    /// The upstream's authority (`127.0.0.1:5000`), sent as its `Host`.
    pub upstream_authority: &'a HeaderValue,
    /// The upstream's origin (`http://127.0.0.1:5000`).
    pub upstream_origin: &'a HeaderValue,
    /// The `X-Forwarded-Prefix` value, when the prefix is stripped (rewrite on).
    pub forwarded_prefix: Option<&'a HeaderValue>,
    /// The prefix, when it is stripped (rewrite on).
    pub stripped_prefix: Option<&'a Prefix>,
}

/// Prepares request headers for the upstream.
pub fn forward_request_headers(headers: &mut HeaderMap, ctx: &ForwardContext<'_>, upgrade: bool) {
    strip_hop_by_hop(headers, upgrade);

    // X-Forwarded-For: the chain as sent (every line of it), then this hop's peer.
    let mut xff = String::new();
    for prior in headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
    {
        xff.push_str(prior);
        xff.push_str(", ");
    }
    xff.push_str(&ctx.client_ip.to_string());
    match HeaderValue::from_str(&xff) {
        Ok(v) => headers.insert(X_FORWARDED_FOR, v),
        Err(_) => headers.insert(
            X_FORWARDED_FOR,
            ctx.client_ip
                .to_string()
                .parse()
                .expect("an IP address is a valid header value"),
        ),
    };
    // -Proto, -Host and -Prefix are the adapter's word, never the client's
    // (nor `Forwarded`, which says the same): the app builds URLs from them.
    headers.remove(FORWARDED);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    match ctx.public_host.and_then(|h| HeaderValue::from_str(h).ok()) {
        Some(host) => headers.insert(X_FORWARDED_HOST, host),
        None => headers.remove(X_FORWARDED_HOST),
    };
    match ctx.forwarded_prefix {
        Some(prefix) => headers.insert(X_FORWARDED_PREFIX, prefix.clone()),
        None => headers.remove(X_FORWARDED_PREFIX),
    };

    // The app rejects Host headers it does not know (MLflow 3.5+: DNS-rebinding
    // guard), so it gets its own.
    headers.insert(header::HOST, ctx.upstream_authority.clone());

    // MLflow 3.5+ refuses writes whose Origin is not localhost. The browser's
    // own origin (exactly `http(s)://<the public host>`) becomes the
    // upstream's; any other goes through as it is, so the app still blocks it.
    let Some(host) = ctx.public_host else {
        return;
    };
    let own_origin = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .and_then(|origin| after_own_origin(origin, host))
        .is_some_and(str::is_empty);
    if own_origin {
        headers.insert(header::ORIGIN, ctx.upstream_origin.clone());
    }
    let referer = headers.get(header::REFERER).and_then(|v| v.to_str().ok());
    if let Some(new) = referer.and_then(|r| upstream_referer(r, host, ctx))
        && let Ok(v) = HeaderValue::from_str(&new)
    {
        headers.insert(header::REFERER, v);
    }
}

const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// When `url` is on the origin `http(s)://<host>`, what follows the origin:
/// empty, or a path, query or fragment.
fn after_own_origin<'a>(url: &'a str, host: &str) -> Option<&'a str> {
    let rest = ["http://", "https://"].iter().find_map(|scheme| {
        url.get(..scheme.len())
            .filter(|s| s.eq_ignore_ascii_case(scheme))
            .map(|_| &url[scheme.len()..])
    })?;
    let after = rest
        .get(..host.len())
        .filter(|a| a.eq_ignore_ascii_case(host))
        .map(|_| &rest[host.len()..])?;
    matches!(after.bytes().next(), None | Some(b'/' | b'?' | b'#')).then_some(after)
}

/// A Referer on the browser's own origin, as the upstream would have produced it.
fn upstream_referer(referer: &str, public_host: &str, ctx: &ForwardContext<'_>) -> Option<String> {
    let path = after_own_origin(referer, public_host)?;
    let path = match ctx.stripped_prefix {
        Some(prefix) => {
            match prefix.match_path(&path[..path.find(['?', '#']).unwrap_or(path.len())]) {
                crate::prefix::PathMatch::Inside(_) => &path[prefix.as_str().len()..],
                crate::prefix::PathMatch::Bare => "/",
                crate::prefix::PathMatch::Outside => path,
            }
        }
        None => path,
    };
    Some(format!("{}{}", ctx.upstream_origin.to_str().ok()?, path))
}

/// Puts the prefix back on URL-bearing response headers. Returns how many
/// headers changed (for metrics).
///
/// `Location`, `Content-Location` and `Refresh` never come out pointing at
/// another origin unless the app spelt out that origin with its scheme (see
/// [`Prefix::restore_header`]); a value that cannot be read is dropped rather
/// than passed on.
pub fn restore_response_headers(
    headers: &mut HeaderMap,
    prefix: &Prefix,
    upstream_origin: &str,
) -> u64 {
    strip_hop_by_hop(headers, false);
    let refresh = HeaderName::from_static("refresh");
    let mut changed = 0;
    for name in [header::LOCATION, header::CONTENT_LOCATION, refresh] {
        if !headers.contains_key(&name) {
            continue;
        }
        let values: Vec<HeaderValue> = headers.get_all(&name).iter().cloned().collect();
        headers.remove(&name);
        for value in values {
            // Browsers read header bytes as UTF-8; so does the decision here.
            let text = String::from_utf8_lossy(value.as_bytes());
            let new = if name == header::LOCATION || name == header::CONTENT_LOCATION {
                prefix.restore_header(&text, upstream_origin)
            } else {
                refresh_url(&text).and_then(|range| {
                    let url = prefix.restore_header(&text[range.clone()], upstream_origin)?;
                    Some(format!(
                        "{}{url}{}",
                        &text[..range.start],
                        &text[range.end..]
                    ))
                })
            };
            match new {
                Some(new) => {
                    if let Ok(v) = HeaderValue::from_str(&new) {
                        headers.append(&name, v);
                    }
                    changed += 1;
                }
                None => {
                    headers.append(&name, value);
                }
            }
        }
    }
    if headers.contains_key(header::SET_COOKIE) {
        let cookies: Vec<HeaderValue> = headers
            .get_all(header::SET_COOKIE)
            .iter()
            .cloned()
            .collect();
        headers.remove(header::SET_COOKIE);
        for cookie in cookies {
            match restore_cookie(cookie.as_bytes(), prefix) {
                Some(new) => {
                    if let Ok(v) = HeaderValue::from_bytes(&new) {
                        headers.append(header::SET_COOKIE, v);
                    }
                    changed += 1;
                }
                None => {
                    headers.append(header::SET_COOKIE, cookie);
                }
            }
        }
    }
    changed
}

/// Keeps a `Set-Cookie` inside the prefix, reading its attributes as a
/// browser does (RFC 6265 5.2: attribute names in any case, blanks around
/// names and values, the last `Path` wins): every `Path` that starts with `/`
/// and is not under the prefix gets it, and `Domain` is dropped so the cookie
/// stays host-only. A missing or relative `Path` needs nothing: the browser's
/// default is the directory of a request path, which is under the prefix.
/// `None` when unchanged.
fn restore_cookie(cookie: &[u8], prefix: &Prefix) -> Option<Vec<u8>> {
    let wsp = |b: &u8| matches!(b, b' ' | b'\t');
    let trim = |s: &[u8]| -> std::ops::Range<usize> {
        let start = s.iter().position(|b| !wsp(b)).unwrap_or(s.len());
        let end = s.iter().rposition(|b| !wsp(b)).map_or(start, |e| e + 1);
        start..end.max(start)
    };
    let first = cookie.iter().position(|&b| b == b';')?;
    let mut out = cookie[..first].to_vec();
    let mut changed = false;
    for attr in cookie[first + 1..].split(|&b| b == b';') {
        let eq = attr.iter().position(|&b| b == b'=');
        let name = &attr[..eq.unwrap_or(attr.len())];
        let name = &name[trim(name)];
        if name.eq_ignore_ascii_case(b"domain") {
            changed = true;
            continue;
        }
        if name.eq_ignore_ascii_case(b"path")
            && let Some(eq) = eq
        {
            let value = &attr[eq + 1..];
            let value = &value[trim(value)];
            let outside = value.first() == Some(&b'/')
                && std::str::from_utf8(value).map_or(true, |v| !prefix.contains(v));
            if outside {
                out.extend_from_slice(b"; Path=");
                out.extend_from_slice(prefix.as_str().as_bytes());
                out.extend_from_slice(value);
                changed = true;
                continue;
            }
        }
        out.push(b';');
        out.extend_from_slice(attr);
    }
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix() -> Prefix {
        Prefix::new("/k3x9q2a").unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn response_headers_table() {
        let up = "http://127.0.0.1:5000";
        let table: &[(&str, &str, &str)] = &[
            ("location", "/", "/k3x9q2a/"),
            ("location", "/#/experiments/0", "/k3x9q2a/#/experiments/0"),
            (
                "location",
                "http://127.0.0.1:5000/login?next=/x",
                "/k3x9q2a/login?next=/x",
            ),
            (
                "location",
                "https://sso.example.org/auth",
                "https://sso.example.org/auth",
            ),
            ("location", "relative", "relative"),
            ("location", "/k3x9q2a/x", "/k3x9q2a/x"),
            ("content-location", "/data.json", "/k3x9q2a/data.json"),
            ("refresh", "0; url=/next", "0; url=/k3x9q2a/next"),
            (
                "set-cookie",
                "sid=1; Path=/; HttpOnly",
                "sid=1; Path=/k3x9q2a/; HttpOnly",
            ),
            ("set-cookie", "sid=1; path=/api", "sid=1; Path=/k3x9q2a/api"),
            ("set-cookie", "sid=1; HttpOnly", "sid=1; HttpOnly"),
            ("set-cookie", "path=/x; Secure", "path=/x; Secure"),
            (
                "set-cookie",
                "a=b; Domain=example.org; Path=//x",
                "a=b; Path=/k3x9q2a//x",
            ),
            // Attribute names and blanks as RFC 6265 reads them.
            ("set-cookie", "a=b; Path =/", "a=b; Path=/k3x9q2a/"),
            (
                "set-cookie",
                "a=b;PATH= /x ;Secure",
                "a=b; Path=/k3x9q2a/x;Secure",
            ),
            ("set-cookie", "a=b; \tpAtH\t=\t/", "a=b; Path=/k3x9q2a/"),
            // The last Path wins: every one is kept inside.
            (
                "set-cookie",
                "a=b; Path=/k3x9q2a; Path=/",
                "a=b; Path=/k3x9q2a; Path=/k3x9q2a/",
            ),
            (
                "set-cookie",
                "a=b; Path=/k3x9q2ab",
                "a=b; Path=/k3x9q2a/k3x9q2ab",
            ),
            ("set-cookie", "a=b; domain=.example.org", "a=b"),
            ("set-cookie", "a=b; Path=relative", "a=b; Path=relative"),
            // Open redirects and dot segments.
            (
                "location",
                "http://127.0.0.1:5000/\\evil.example/x",
                "/k3x9q2a/evil.example/x",
            ),
            ("location", "//evil.example/x", "/k3x9q2a/evil.example/x"),
            ("location", "/../x", "/k3x9q2a/x"),
            ("location", "/%2e%2e/x", "/k3x9q2a/x"),
            ("location", "/k3x9q2a/../x", "/k3x9q2a/x"),
            (
                "content-location",
                "/\\evil.example/x",
                "/k3x9q2a/evil.example/x",
            ),
            (
                "refresh",
                "0; url=http://127.0.0.1:5000/\\evil.example",
                "0; url=/k3x9q2a/evil.example",
            ),
            ("refresh", "0;/\\evil.example", "0;/k3x9q2a/evil.example"),
            ("refresh", "1, 'http://127.0.0.1:5000/x'", "1, '/k3x9q2a/x'"),
            ("refresh", "5", "5"),
        ];
        for (name, input, want) in table {
            let mut h = headers(&[(name, input)]);
            restore_response_headers(&mut h, &prefix(), up);
            assert_eq!(
                h.get(*name).unwrap().to_str().unwrap(),
                *want,
                "{name}: {input}"
            );
        }
    }

    #[test]
    fn every_set_cookie_is_kept() {
        let mut h = headers(&[
            ("set-cookie", "a=1; Path=/"),
            ("set-cookie", "b=2"),
            ("set-cookie", "c=3; Path=/c"),
        ]);
        assert_eq!(restore_response_headers(&mut h, &prefix(), "http://u"), 2);
        let got: Vec<_> = h
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        assert_eq!(got, ["a=1; Path=/k3x9q2a/", "b=2", "c=3; Path=/k3x9q2a/c"]);
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("content-type", "text/html"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type"]);
    }

    fn forward(pairs: &[(&str, &str)]) -> HeaderMap {
        let prefix = prefix();
        let authority = HeaderValue::from_static("127.0.0.1:5000");
        let origin = HeaderValue::from_static("http://127.0.0.1:5000");
        let prefix_header = HeaderValue::from_static("/k3x9q2a");
        let mut h = headers(pairs);
        let public_host = h.get("host").map(|v| v.to_str().unwrap().to_owned());
        let ctx = ForwardContext {
            public_host: public_host.as_deref(),
            client_ip: "10.1.2.3".parse().unwrap(),
            upstream_authority: &authority,
            upstream_origin: &origin,
            forwarded_prefix: Some(&prefix_header),
            stripped_prefix: Some(&prefix),
        };
        forward_request_headers(&mut h, &ctx, false);
        h
    }

    #[test]
    fn upstream_sees_its_own_host_and_origin() {
        let h = forward(&[
            ("host", "mlflow.example.test:8443"),
            ("origin", "https://mlflow.example.test:8443"),
            (
                "referer",
                "https://mlflow.example.test:8443/k3x9q2a/#/experiments/1",
            ),
            ("x-forwarded-for", "192.0.2.1"),
            ("x-forwarded-proto", "https"),
        ]);
        assert_eq!(h["host"], "127.0.0.1:5000");
        assert_eq!(h["origin"], "http://127.0.0.1:5000");
        assert_eq!(h["referer"], "http://127.0.0.1:5000/#/experiments/1");
        assert_eq!(h["x-forwarded-for"], "192.0.2.1, 10.1.2.3");
        assert_eq!(h["x-forwarded-host"], "mlflow.example.test:8443");
        assert_eq!(h["x-forwarded-prefix"], "/k3x9q2a");
    }

    #[test]
    fn forwarded_headers_are_the_adapters_word() {
        let h = forward(&[
            ("host", "mlflow.example.test"),
            ("x-forwarded-for", "192.0.2.1"),
            ("x-forwarded-for", "192.0.2.2, 192.0.2.3"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-host", "evil2.example"),
            ("x-forwarded-prefix", "/elsewhere"),
            ("forwarded", "for=192.0.2.9;host=evil.example;proto=https"),
        ]);
        let all = |name: &str| -> Vec<&str> {
            h.get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect()
        };
        assert_eq!(
            all("x-forwarded-for"),
            ["192.0.2.1, 192.0.2.2, 192.0.2.3, 10.1.2.3"]
        );
        assert_eq!(all("x-forwarded-proto"), ["http"]);
        assert_eq!(all("x-forwarded-host"), ["mlflow.example.test"]);
        assert_eq!(all("x-forwarded-prefix"), ["/k3x9q2a"]);
        assert!(all("forwarded").is_empty());
    }

    #[test]
    fn only_the_exact_own_origin_is_translated() {
        let table = [
            ("http://mlflow.example.test", "http://127.0.0.1:5000"),
            ("HTTPS://MLflow.Example.Test", "http://127.0.0.1:5000"),
            (
                "http://mlflow.example.test:8080",
                "http://mlflow.example.test:8080",
            ),
            (
                "http://mlflow.example.test.evil.example",
                "http://mlflow.example.test.evil.example",
            ),
            (
                "http://mlflow.example.test@evil.example",
                "http://mlflow.example.test@evil.example",
            ),
            ("http://mlflow.example.test/", "http://mlflow.example.test/"),
            ("ftp://mlflow.example.test", "ftp://mlflow.example.test"),
            ("null", "null"),
        ];
        for (origin, want) in table {
            let h = forward(&[("host", "mlflow.example.test"), ("origin", origin)]);
            assert_eq!(h["origin"], want, "{origin}");
        }
        let referers = [
            (
                "http://mlflow.example.test/k3x9q2a/#/x",
                "http://127.0.0.1:5000/#/x",
            ),
            ("https://mlflow.example.test?q", "http://127.0.0.1:5000?q"),
            (
                "http://mlflow.example.test.evil.example/k3x9q2a/",
                "http://mlflow.example.test.evil.example/k3x9q2a/",
            ),
            (
                "http://mlflow.example.test:81/k3x9q2a/",
                "http://mlflow.example.test:81/k3x9q2a/",
            ),
        ];
        for (referer, want) in referers {
            let h = forward(&[("host", "mlflow.example.test"), ("referer", referer)]);
            assert_eq!(h["referer"], want, "{referer}");
        }
    }

    #[test]
    fn cross_site_origin_is_passed_on_for_the_app_to_refuse() {
        let h = forward(&[
            ("host", "mlflow.example.test"),
            ("origin", "https://evil.example"),
            ("referer", "https://evil.example/k3x9q2a/"),
        ]);
        assert_eq!(h["origin"], "https://evil.example");
        assert_eq!(h["referer"], "https://evil.example/k3x9q2a/");
        assert_eq!(h["x-forwarded-proto"], "http");
    }
}
