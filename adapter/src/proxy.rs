//! The request path: own endpoints, prefix matching, forwarding to the
//! upstream, and shaping the response (headers, body rewriting, compression).

use crate::body::ProxyBody;
use crate::coding::{BodyCoding, Coding, body_coding, negotiate};
use crate::config::ProxyConfig;
use crate::error::{ProxyError, Result};
use crate::headers::{
    ForwardContext, forward_request_headers, is_upgrade_request, restore_response_headers,
    strip_hop_by_hop,
};
use crate::metrics::{Metrics, RewriteKind};
use crate::prefix::PathMatch;
use crate::rewrite::StreamRewriter;
use crate::rewrite::css::CssRewriter;
use crate::rewrite::html::HtmlRewriter;
use crate::rewrite::literal::{LiteralRewriter, LiteralSet};
use crate::route::RouteClass;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A digest of the original body, wrong once the body changes.
const CONTENT_MD5: header::HeaderName = header::HeaderName::from_static("content-md5");
/// Largest read buffer per upstream connection.
const UPSTREAM_READ_BUFFER: usize = 64 * 1024;
/// Bodies smaller than this are not worth compressing.
const MIN_COMPRESS_BYTES: u64 = 1024;
/// How long /readyz waits for the upstream.
const READY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a browser should wait before retrying when the upstream is down.
const RETRY_AFTER_SECONDS: &str = "5";

/// The proxy: configuration, upstream connection pool and metrics, shared by
/// every connection.
pub struct Proxy {
    config: ProxyConfig,
    client: Client<HttpConnector, Incoming>,
    probe: Client<HttpConnector, Empty<Bytes>>,
    metrics: Metrics,
    hash_routes: Arc<LiteralSet>,
}

impl crate::server::Handler for Proxy {
    fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response<ProxyBody>> + Send {
        Proxy::handle(self, req, peer)
    }
}

/// The transformation a response body gets.
enum BodyRewrite {
    Html,
    Css,
    Script,
}

impl Proxy {
    /// Builds the proxy and its upstream pool.
    pub fn new(config: ProxyConfig) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.enforce_http(true);
        // Idle upstream connections are dropped before an app server's usual
        // keep-alive (uvicorn: 5 s) so a request never races a closing socket.
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(4))
            .pool_max_idle_per_host(1024)
            // hyper lets a connection's read buffer grow to ~400 KiB; with
            // hundreds of streaming responses that is the whole memory budget.
            .http1_max_buf_size(UPSTREAM_READ_BUFFER)
            .build(connector.clone());
        let probe = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1)
            .build(connector);
        let hash_routes = Arc::new(LiteralSet::mlflow_hash_routes(config.prefix.as_str()));
        Arc::new(Self {
            config,
            client,
            probe,
            metrics: Metrics::new(),
            hash_routes,
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Answers one request; never fails (errors become 4xx/5xx responses).
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path();
        if let Some(response) = self.own_endpoint(&method, path).await {
            self.metrics
                .request(RouteClass::Own, response.status().as_u16(), start.elapsed());
            return response;
        }
        let prefix = &self.config.prefix;
        let upstream_pq = match prefix.match_path(path) {
            PathMatch::Inside(rest) if self.config.rewrite => with_query(rest, req.uri().query()),
            PathMatch::Inside(_) => req
                .uri()
                .path_and_query()
                .map_or_else(|| path.to_owned(), |pq| pq.as_str().to_owned()),
            PathMatch::Bare => {
                let location = with_query(&format!("{prefix}/"), req.uri().query());
                let response = redirect(&location);
                self.finish(&method, req.uri().path(), RouteClass::Ui, &response, start);
                return response;
            }
            PathMatch::Outside => {
                let response = plain(
                    StatusCode::NOT_FOUND,
                    format!("not found: this adapter serves {prefix}/\n"),
                );
                self.finish(
                    &method,
                    req.uri().path(),
                    RouteClass::Outside,
                    &response,
                    start,
                );
                return response;
            }
        };
        let class = RouteClass::of_upstream_path(upstream_pq.split('?').next().unwrap_or(""));
        // A cheap clone (shared bytes), kept for the log line.
        let logged_uri = req.uri().clone();
        let logged_path = logged_uri.path();
        self.metrics.touch();
        self.metrics.in_flight().inc();
        let response = match self.forward(req, upstream_pq, class, peer).await {
            Ok(response) => response,
            Err(e) => {
                if let Some(label) =
                    matches!(e, ProxyError::Upstream(_) | ProxyError::UpstreamTimeout(_))
                        .then(|| e.source_label())
                {
                    self.metrics.upstream_error(label);
                }
                tracing::warn!(error = %e, path = logged_path, "request failed");
                error_response(&e)
            }
        };
        self.metrics.in_flight().dec();
        self.finish(&method, logged_path, class, &response, start);
        response
    }

    fn finish(
        &self,
        method: &Method,
        path: &str,
        class: RouteClass,
        response: &Response<ProxyBody>,
        start: Instant,
    ) {
        let elapsed = start.elapsed();
        self.metrics
            .request(class, response.status().as_u16(), elapsed);
        tracing::info!(
            target: "flowgate::access",
            %method,
            path,
            status = response.status().as_u16(),
            route = class.label(),
            micros = elapsed.as_micros() as u64,
        );
    }

    /// `/healthz`, `/readyz` and `/metrics`, outside every prefix.
    async fn own_endpoint(&self, method: &Method, path: &str) -> Option<Response<ProxyBody>> {
        if !matches!(*method, Method::GET | Method::HEAD) {
            return None;
        }
        match path {
            "/healthz" => Some(plain(StatusCode::OK, "ok\n")),
            "/readyz" => Some(match self.probe_upstream().await {
                Ok(()) => plain(StatusCode::OK, "ready\n"),
                Err(reason) => plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("upstream not ready: {reason}\n"),
                ),
            }),
            "/metrics" => {
                let mut response = Response::new(ProxyBody::full(self.metrics.encode()));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                Some(response)
            }
            _ => None,
        }
    }

    /// The upstream answers at all (any status below 500) within the timeout.
    async fn probe_upstream(&self) -> std::result::Result<(), String> {
        let uri = self
            .upstream_uri(&self.config.ready_path)
            .map_err(|e| e.to_string())?;
        let mut req = Request::new(Empty::new());
        *req.uri_mut() = uri;
        req.headers_mut()
            .insert(header::HOST, self.config.upstream_authority.clone());
        match tokio::time::timeout(READY_TIMEOUT, self.probe.request(req)).await {
            Ok(Ok(resp)) if resp.status().as_u16() < 500 => Ok(()),
            Ok(Ok(resp)) => Err(format!("answered {}", resp.status())),
            Ok(Err(e)) => Err(format!("{e}")),
            Err(_) => Err(format!("no answer within {READY_TIMEOUT:?}")),
        }
    }

    fn upstream_uri(&self, path_and_query: &str) -> Result<Uri> {
        let mut parts = self.config.upstream.clone().into_parts();
        parts.scheme = Some(Scheme::HTTP);
        parts.path_and_query = Some(
            PathAndQuery::try_from(path_and_query)
                .map_err(|e| ProxyError::Downstream(format!("bad path: {e}")))?,
        );
        Uri::from_parts(parts).map_err(|e| ProxyError::Internal(format!("upstream URI: {e}")))
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        upstream_pq: String,
        class: RouteClass,
        peer: SocketAddr,
    ) -> Result<Response<ProxyBody>> {
        let upgrade = is_upgrade_request(req.headers()) && req.version() == Version::HTTP_11;
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let is_head = parts.method == Method::HEAD;
        let accept = negotiate(parts.headers.get(header::ACCEPT_ENCODING));
        // Shared-bytes clones, not copies: the headers are rewritten below.
        let host_header = parts.headers.get(header::HOST).cloned();
        let authority = parts.uri.authority().cloned();
        let public_host = host_header
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .or_else(|| authority.as_ref().map(|a| a.as_str()));
        let ctx = ForwardContext {
            public_host,
            client_ip: peer.ip(),
            upstream_authority: &self.config.upstream_authority,
            upstream_origin: &self.config.upstream_origin,
            stripped_prefix: self.config.rewrite.then_some(&self.config.prefix),
        };
        forward_request_headers(&mut parts.headers, &ctx, upgrade);
        parts.uri = self.upstream_uri(&upstream_pq)?;
        parts.version = Version::HTTP_11;
        let upstream_req = Request::from_parts(parts, body);

        let timeout = self.config.upstream_timeout;
        let mut response =
            match tokio::time::timeout(timeout, self.client.request(upstream_req)).await {
                Err(_) => return Err(ProxyError::UpstreamTimeout(timeout)),
                Ok(Err(e)) => return Err(ProxyError::Upstream(e)),
                Ok(Ok(response)) => response,
            };

        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                return Err(ProxyError::Internal(
                    "upstream switched protocols unasked".into(),
                ));
            };
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((client, upstream)) => {
                        let _ = tokio::io::copy_bidirectional(
                            &mut TokioIo::new(client),
                            &mut TokioIo::new(upstream),
                        )
                        .await;
                    }
                    Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                }
            });
            let (parts, _) = response.into_parts();
            return Ok(Response::from_parts(parts, ProxyBody::empty()));
        }
        Ok(self.shape_response(response, class, accept, is_head))
    }

    /// Puts the prefix back on headers, and chooses what the body goes through.
    fn shape_response(
        &self,
        response: Response<Incoming>,
        class: RouteClass,
        accept: Option<Coding>,
        is_head: bool,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = response.into_parts();
        let sent = self.metrics.response_bytes().clone();
        if self.config.rewrite {
            let n = restore_response_headers(
                &mut parts.headers,
                &self.config.prefix,
                &self.config.upstream_origin,
            );
            if n > 0 {
                self.metrics.rewrite(RewriteKind::Header, n);
            }
        } else {
            strip_hop_by_hop(&mut parts.headers, false);
        }

        let status = parts.status;
        let body_may_change = class != RouteClass::Artifact
            && !is_head
            && status.is_success()
            && status != StatusCode::NO_CONTENT
            && status != StatusCode::PARTIAL_CONTENT
            && !no_transform(&parts.headers);
        if !body_may_change {
            return Response::from_parts(parts, ProxyBody::passthrough(body, sent));
        }
        let media = MediaType::of(parts.headers.get(header::CONTENT_TYPE));
        let coding = body_coding(parts.headers.get(header::CONTENT_ENCODING));
        let rewrite = if self.config.rewrite {
            match media {
                MediaType::Html => Some(BodyRewrite::Html),
                MediaType::Css => Some(BodyRewrite::Css),
                MediaType::Script if class == RouteClass::Static => Some(BodyRewrite::Script),
                _ => None,
            }
        } else {
            None
        };
        let small = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .is_some_and(|n| n < MIN_COMPRESS_BYTES);
        let compress =
            self.config.compress && accept.is_some() && media.is_compressible() && !small;

        let (decode, encode) = match (coding, &rewrite) {
            // Stacked or unknown codings cannot be opened: pass through.
            (BodyCoding::Opaque, _) => {
                return Response::from_parts(parts, ProxyBody::passthrough(body, sent));
            }
            (BodyCoding::Known(c), Some(_)) => (Some(c), accept),
            (BodyCoding::Known(_), None) => {
                return Response::from_parts(parts, ProxyBody::passthrough(body, sent));
            }
            (BodyCoding::Identity, _) if rewrite.is_some() || compress => {
                (None, accept.filter(|_| compress))
            }
            (BodyCoding::Identity, _) => {
                return Response::from_parts(parts, ProxyBody::passthrough(body, sent));
            }
        };

        let rewriter: Option<Box<dyn StreamRewriter>> = rewrite.map(|r| {
            let (kind, rewriter): (RewriteKind, Box<dyn StreamRewriter>) = match r {
                BodyRewrite::Html => (
                    RewriteKind::Html,
                    Box::new(HtmlRewriter::new(
                        self.config.prefix.clone(),
                        parts
                            .headers
                            .get(header::CONTENT_TYPE)
                            .and_then(|v| v.to_str().ok()),
                    )),
                ),
                BodyRewrite::Css => (
                    RewriteKind::Css,
                    Box::new(CssRewriter::new(self.config.prefix.clone())),
                ),
                BodyRewrite::Script => (
                    RewriteKind::Script,
                    Box::new(LiteralRewriter::new(Arc::clone(&self.hash_routes))),
                ),
            };
            self.metrics.rewrite(kind, 1);
            rewriter
        });
        if encode.is_some() {
            self.metrics.rewrite(RewriteKind::Compress, 1);
        }
        let headers = &mut parts.headers;
        headers.remove(header::CONTENT_LENGTH);
        headers.remove(header::ACCEPT_RANGES);
        headers.remove(CONTENT_MD5);
        match encode {
            Some(c) => {
                headers.insert(header::CONTENT_ENCODING, c.header_value());
            }
            None => {
                headers.remove(header::CONTENT_ENCODING);
            }
        }
        if media.is_compressible() {
            headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
        }
        weaken_etag(headers);
        Response::from_parts(
            parts,
            ProxyBody::transformed(
                body,
                decode,
                rewriter,
                encode,
                sent,
                self.metrics.rewrite_capped().clone(),
            ),
        )
    }
}

/// Response media types the adapter treats differently.
#[derive(Clone, Copy, PartialEq, Eq)]
enum MediaType {
    Html,
    Css,
    Script,
    /// Other text worth compressing (JSON, SVG, plain text, ...).
    OtherText,
    /// Server-sent events: never buffered, never compressed.
    EventStream,
    Other,
}

impl MediaType {
    fn of(content_type: Option<&HeaderValue>) -> Self {
        let Some(value) = content_type.and_then(|v| v.to_str().ok()) else {
            return MediaType::Other;
        };
        let essence = value.split(';').next().unwrap_or("").trim();
        let is = |t: &str| essence.eq_ignore_ascii_case(t);
        if is("text/html") || is("application/xhtml+xml") {
            MediaType::Html
        } else if is("text/css") {
            MediaType::Css
        } else if is("application/javascript")
            || is("text/javascript")
            || is("application/x-javascript")
        {
            MediaType::Script
        } else if is("text/event-stream") {
            MediaType::EventStream
        } else if starts_with_ignore_case(essence, "text/")
            || is("application/json")
            || is("application/xml")
            || is("image/svg+xml")
            || is("application/manifest+json")
            || ends_with_ignore_case(essence, "+json")
            || ends_with_ignore_case(essence, "+xml")
        {
            MediaType::OtherText
        } else {
            MediaType::Other
        }
    }

    fn is_compressible(self) -> bool {
        matches!(
            self,
            MediaType::Html | MediaType::Css | MediaType::Script | MediaType::OtherText
        )
    }
}

fn starts_with_ignore_case(s: &str, p: &str) -> bool {
    s.len() >= p.len() && s.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
}

fn ends_with_ignore_case(s: &str, p: &str) -> bool {
    s.len() >= p.len() && s.as_bytes()[s.len() - p.len()..].eq_ignore_ascii_case(p.as_bytes())
}

/// `Cache-Control: no-transform` forbids changing the body.
fn no_transform(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
        })
}

/// A changed body cannot keep a strong validator.
fn weaken_etag(headers: &mut http::HeaderMap) {
    if let Some(etag) = headers.get(header::ETAG).and_then(|v| v.to_str().ok())
        && !etag.starts_with("W/")
        && let Ok(v) = HeaderValue::from_str(&format!("W/{etag}"))
    {
        headers.insert(header::ETAG, v);
    }
}

fn with_query(path: &str, query: Option<&str>) -> String {
    match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    }
}

fn plain(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn redirect(location: &str) -> Response<ProxyBody> {
    let mut response = plain(StatusCode::PERMANENT_REDIRECT, format!("see {location}\n"));
    if let Ok(v) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    response
}

const UNAVAILABLE_PAGE: &str = "<!doctype html><html><head><meta charset=\"utf-8\"><title>Starting</title>\
<meta http-equiv=\"refresh\" content=\"5\"></head><body style=\"font-family:sans-serif;margin:3em\">\
<h1>This MLflow instance is not answering yet</h1>\
<p>It may still be starting, or loading its artefacts. This page retries by itself in a few seconds.</p>\
</body></html>\n";

fn error_response(error: &ProxyError) -> Response<ProxyBody> {
    let status = error.status();
    match error {
        ProxyError::Upstream(_) => {
            let mut response = Response::new(ProxyBody::full(UNAVAILABLE_PAGE));
            *response.status_mut() = status;
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        _ => plain(status, format!("{error}\n")),
    }
}
