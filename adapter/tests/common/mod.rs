//! Test fixtures: an upstream app server on `127.0.0.1:0` with the routes the
//! proxy tests need, and the adapter started in-process in front of it.
#![allow(dead_code, missing_docs)]

use adapter::server::{ConnectionLimits, Drain, serve};
use adapter::{Proxy, ProxyConfig, ServeArgs};
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub const PREFIX: &str = "/k3x9q2a";
pub const BIG_BYTES: usize = 64 << 20;

pub const PAGE_HTML: &str = r#"<!doctype html><html><head><link rel="stylesheet" href="/static-files/main.css"><style>body{background:url(/bg.png)}</style></head><body><a href="/#/experiments/1">exp</a><a href="//cdn.example.org/x">cdn</a><img src="relative.png"></body></html>"#;
pub const PAGE_HTML_REWRITTEN: &str = r#"<!doctype html><html><head><link rel="stylesheet" href="/k3x9q2a/static-files/main.css"><style>body{background:url(/k3x9q2a/bg.png)}</style></head><body><a href="/k3x9q2a/#/experiments/1">exp</a><a href="//cdn.example.org/x">cdn</a><img src="relative.png"></body></html>"#;
pub const ARTIFACT_HTML: &str =
    r#"<html><body><a href="/x">a user's report</a><script>location="/#/y"</script></body></html>"#;
pub const APP_JS: &str =
    r#"function go(e){window.open(`/#${e}`)};var n="/#notebook/";var keep="a/#b";"#;
pub const APP_JS_REWRITTEN: &str =
    r#"function go(e){window.open(`/k3x9q2a/#${e}`)};var n="/k3x9q2a/#notebook/";var keep="a/#b";"#;

type UpBody = BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> UpBody {
    Full::new(b.into()).boxed()
}

/// The byte at `i` of the 64 MiB artefact: a pattern with no short period.
pub fn big_byte(i: usize) -> u8 {
    (i.wrapping_mul(2654435761) >> 13) as u8
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub async fn brotli(data: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    async_compression::tokio::bufread::BrotliEncoder::new(data)
        .read_to_end(&mut out)
        .await
        .unwrap();
    out
}

pub async fn decode(coding: &str, data: &[u8]) -> Vec<u8> {
    use async_compression::tokio::bufread::*;
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    match coding {
        "gzip" => GzipDecoder::new(data).read_to_end(&mut out).await.unwrap(),
        "br" => BrotliDecoder::new(data)
            .read_to_end(&mut out)
            .await
            .unwrap(),
        "zstd" => ZstdDecoder::new(data).read_to_end(&mut out).await.unwrap(),
        "deflate" => ZlibDecoder::new(data).read_to_end(&mut out).await.unwrap(),
        other => panic!("unexpected coding {other}"),
    };
    out
}

/// Requests the test upstream has received (in this test binary).
pub static UPSTREAM_REQUESTS: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

async fn upstream_route(req: Request<Incoming>) -> Response<UpBody> {
    UPSTREAM_REQUESTS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let path = req.uri().path().to_owned();
    let html = |body: UpBody| {
        Response::builder()
            .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
            .body(body)
            .unwrap()
    };
    match path.as_str() {
        "/echo" | "/ajax-api/2.0/mlflow/runs/search" | "/ajax-api/2.0/mlflow/runs/delete" => {
            let headers: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").into()))
                .collect();
            let method = req.method().to_string();
            let uri = req.uri().to_string();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let json = serde_json::json!({"method": method, "uri": uri, "headers": headers, "body": String::from_utf8_lossy(&body)});
            Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(full(json.to_string()))
                .unwrap()
        }
        "/" | "/page.html" => html(full(PAGE_HTML)),
        "/gzip.html" => {
            let mut r = html(full(gzip(PAGE_HTML.as_bytes())));
            r.headers_mut()
                .insert(header::CONTENT_ENCODING, "gzip".parse().unwrap());
            r.headers_mut()
                .insert(header::ETAG, "\"abc\"".parse().unwrap());
            r
        }
        "/br.html" => {
            let mut r = html(full(brotli(PAGE_HTML.as_bytes()).await));
            r.headers_mut()
                .insert(header::CONTENT_ENCODING, "br".parse().unwrap());
            r
        }
        "/main.css" => Response::builder()
            .header(header::CONTENT_TYPE, "text/css")
            .body(full(
                "a{background:url(/img/a.png)} b{background:url(//cdn/x.png)}",
            ))
            .unwrap(),
        "/static-files/app.js" => Response::builder()
            .header(header::CONTENT_TYPE, "application/javascript")
            .body(full(APP_JS))
            .unwrap(),
        "/get-artifact" | "/ajax-api/2.0/mlflow-artifacts/artifacts/0/r/artifacts/report.html" => {
            html(full(ARTIFACT_HTML))
        }
        "/json" => {
            let body = format!(
                "{{\"runs\":[{}]}}",
                (0..200)
                    .map(|i| format!("{{\"id\":\"{i:032}\"}}"))
                    .collect::<Vec<_>>()
                    .join(",")
            );
            Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(full(body))
                .unwrap()
        }
        "/two-dates" => Response::builder()
            .header(header::DATE, "Tue, 01 Dec 2026 07:00:00 GMT")
            .header(header::DATE, "Tue, 01 Dec 2026 07:00:01 GMT")
            .body(full("two dates"))
            .unwrap(),
        "/tiny.json" => Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(full("{}"))
            .unwrap(),
        "/redirect" => Response::builder()
            .status(StatusCode::FOUND)
            .header(header::LOCATION, "/target?x=1")
            .body(full(""))
            .unwrap(),
        "/redirect-abs" => {
            let host = req
                .headers()
                .get(header::HOST)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            Response::builder()
                .status(StatusCode::FOUND)
                .header(header::LOCATION, format!("http://{host}/abs"))
                .body(full(""))
                .unwrap()
        }
        "/cookie" => Response::builder()
            .header(header::SET_COOKIE, "sid=1; Path=/; HttpOnly")
            .header(header::SET_COOKIE, "pref=2; Path=/ajax-api")
            .body(full("ok"))
            .unwrap(),
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Response::new(full("late"))
        }
        "/drain" => {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            Response::new(full("finished after SIGTERM"))
        }
        "/big" => {
            let chunks = (0..BIG_BYTES / 65536).map(|c| {
                let chunk: Vec<u8> = (c * 65536..(c + 1) * 65536).map(big_byte).collect();
                Ok::<_, Infallible>(Frame::data(Bytes::from(chunk)))
            });
            Response::builder()
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header(header::CONTENT_LENGTH, BIG_BYTES)
                .body(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
                    chunks,
                ))))
                .unwrap()
        }
        "/big.html" => {
            // A 4 MiB HTML body with a link per line, streamed in 16 KiB pieces.
            let line = "<p><a href=\"/run/x\">run</a></p>\n";
            let doc = line.repeat((4 << 20) / line.len());
            let chunks: Vec<_> = doc
                .as_bytes()
                .chunks(16384)
                .map(|c| Ok::<_, Infallible>(Frame::data(Bytes::copy_from_slice(c))))
                .collect();
            Response::builder()
                .header(header::CONTENT_TYPE, "text/html")
                .body(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
                    chunks,
                ))))
                .unwrap()
        }
        "/trickle.json" => {
            // compressible JSON that takes 3 s to arrive: its encoder stays busy
            let stream = futures_util::stream::unfold(0u32, |i| async move {
                if i == 30 {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                let part = format!("{{\"step\": {i}, \"pad\": \"{}\"}}\n", "x".repeat(2000));
                Some((Ok::<_, Infallible>(Frame::data(Bytes::from(part))), i + 1))
            });
            Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .unwrap()
        }
        "/sse" => {
            let stream = futures_util::stream::unfold(0u32, |i| async move {
                if i == 3 {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(1000)).await;
                }
                Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from(format!("data: event {i}\n\n")))),
                    i + 1,
                ))
            });
            Response::builder()
                .header(header::CONTENT_TYPE, "text/event-stream")
                .header(header::CACHE_CONTROL, "no-cache")
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .unwrap()
        }
        "/ws" => {
            let mut req = req;
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await {
                    let mut io = TokioIo::new(upgraded);
                    let (mut r, mut w) = tokio::io::split(&mut io);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header(header::CONNECTION, "upgrade")
                .header(header::UPGRADE, "echo")
                .body(full(""))
                .unwrap()
        }
        _ => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(full("upstream 404"))
            .unwrap(),
    }
}

/// Starts the test upstream; returns its address.
pub async fn start_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service =
                    service_fn(|req| async move { Ok::<_, Infallible>(upstream_route(req).await) });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A running in-process adapter.
pub struct Adapter {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Drain>,
}

impl Adapter {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The adapter's Prometheus metrics, as text.
    pub async fn metrics(&self) -> String {
        let r = client().get(self.url("/metrics")).send().await.unwrap();
        r.text().await.unwrap()
    }

    pub async fn stop(mut self) -> Drain {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap()
    }
}

/// A fluent builder for the adapter under test.
pub struct AdapterBuilder {
    args: ServeArgs,
}

pub fn adapter(upstream: SocketAddr) -> AdapterBuilder {
    AdapterBuilder {
        args: ServeArgs {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            upstream: Some(format!("http://{upstream}")),
            prefix: Some(PREFIX.into()),
            ..Default::default()
        },
    }
}

impl AdapterBuilder {
    pub fn rewrite_off(mut self) -> Self {
        self.args.rewrite = Some(adapter::config::RewriteMode::Off);
        self
    }

    pub fn compress_off(mut self) -> Self {
        self.args.compress = Some(adapter::config::RewriteMode::Off);
        self
    }

    pub fn writes_on(mut self) -> Self {
        self.args.writes = Some(adapter::config::Switch::On);
        self
    }

    pub fn public_host(mut self, hosts: &str) -> Self {
        self.args.public_host = Some(hosts.into());
        self
    }

    pub fn upstream_timeout(mut self, d: Duration) -> Self {
        self.args.upstream_timeout = Some(d);
        self
    }

    pub fn max_encoders(mut self, n: usize) -> Self {
        self.args.max_encoders = Some(n);
        self
    }

    pub fn static_cache_mib(mut self, n: usize) -> Self {
        self.args.static_cache_mib = Some(n);
        self
    }

    pub fn access_keys(mut self, path: &std::path::Path) -> Self {
        self.args.access_keys = Some(path.to_path_buf());
        self
    }

    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.args.drain_timeout = Some(d);
        self
    }

    pub async fn start(self) -> Adapter {
        let config = ProxyConfig::resolve(self.args, Vec::<(String, String)>::new()).unwrap();
        let listener = TcpListener::bind(config.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let limits = ConnectionLimits::from(&config);
        let task = tokio::spawn(async move {
            serve(Proxy::new(config), &limits, listener, async move {
                let _ = rx.await;
            })
            .await
        });
        Adapter {
            addr,
            stop: Some(tx),
            task,
        }
    }
}

/// An HTTP client that does not follow redirects or decode bodies.
pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// A free port on loopback (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A response read off a raw socket.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// Every value of a header (name in lower case).
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.all(name).first().copied()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `method target` over a fresh connection exactly as written (no URL
/// normalisation, unlike an HTTP client) and reads the whole answer.
pub async fn raw_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> RawResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = format!("{method} {target} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("Connection: close\r\nContent-Length: 0\r\n\r\n");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("answer within 10 s")
        .unwrap();
    parse_response(&buf)
}

pub fn parse_response(buf: &[u8]) -> RawResponse {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(buf)));
    let head = std::str::from_utf8(&buf[..end]).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    let mut body = buf[end + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"))
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap().trim(), 16)
                    .unwrap();
            rest = &rest[line_end + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        body = out;
    }
    RawResponse {
        status,
        headers,
        body,
    }
}

/// The value of an unlabelled series in a Prometheus exposition.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}
