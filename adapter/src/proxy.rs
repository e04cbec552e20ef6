//! The request path: own endpoints, the checks that decide whether a request
//! is forwarded at all (public host, canonical path inside the prefix,
//! access link or session ([`crate::access`]), read-only policy), forwarding to the upstream, and shaping the response
//! (headers, then the body as [`crate::plan`] decides).

use crate::access::{self, Decision, Denied, strip_cookie};
use crate::body::ProxyBody;
use crate::coding::{Coding, Effort, negotiate};
use crate::config::ProxyConfig;
use crate::encoders::{Encoders, Slot};
use crate::error::{ProxyError, Result};
use crate::headers::{
    ForwardContext, forward_request_headers, is_upgrade_request, restore_response_headers,
    strip_hop_by_hop,
};
use crate::metrics::{CacheResult, ConnectionMetrics, Metrics, Refusal, RewriteKind};
use crate::plan::{BodyPlan, BodyRewrite, BodySettings, ResponseFacts, plan};
use crate::policy::read_only_allows;
use crate::prefix::PathMatch;
use crate::request_body::RequestBody;
use crate::rewrite::StreamRewriter;
use crate::rewrite::css::CssRewriter;
use crate::rewrite::html::HtmlRewriter;
use crate::rewrite::literal::{LiteralRewriter, LiteralSet};
use crate::route::{RouteClass, canonical_path};
use crate::static_cache::{self, Fill, Lookup, RequestDirectives, StaticCache, Stored};
use bytes::Bytes;
use futures_util::StreamExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// A digest of the original body, wrong once the body changes.
const CONTENT_MD5: header::HeaderName = header::HeaderName::from_static("content-md5");
/// Largest read buffer per upstream connection.
const UPSTREAM_READ_BUFFER: usize = 64 * 1024;
/// Under an instance's prefix: the state of its wake, which the waking page
/// of a sleeping instance follows (answered by the activator while it
/// sleeps, by the adapter once it serves again). MLflow has no such path.
pub const WAKE_STATUS_PATH: &str = "/.flowgate/wake";

/// How long /readyz waits for the upstream.
const READY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a browser should wait before retrying when the upstream is down.
const RETRY_AFTER_SECONDS: &str = "5";
/// The status logged for a request whose client left before the answer.
const CLIENT_GONE: u16 = 499;

/// The proxy: configuration, upstream connection pool and metrics, shared by
/// every connection.
pub struct Proxy {
    config: ProxyConfig,
    client: Client<HttpConnector, RequestBody>,
    probe: Client<HttpConnector, Empty<Bytes>>,
    metrics: Metrics,
    hash_routes: Arc<LiteralSet>,
    encoders: Encoders,
    static_cache: Option<Arc<StaticCache>>,
}

impl crate::server::Handler for Proxy {
    type Body = ProxyBody;

    fn handle(
        self: Arc<Self>,
        req: Request<RequestBody>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response<ProxyBody>> + Send {
        Proxy::handle(self, req, peer)
    }

    fn connection_metrics(&self) -> Option<&ConnectionMetrics> {
        Some(self.metrics.connections())
    }
}

/// One request's record: the access-log line and the metrics, written when it
/// is dropped — also when the client leaves before the upstream answers and
/// the request's future is dropped half-way.
struct Exchange<'a> {
    proxy: &'a Proxy,
    method: Method,
    uri: Uri,
    start: Instant,
    class: RouteClass,
    in_flight: bool,
    status: Option<StatusCode>,
}

impl<'a> Exchange<'a> {
    fn new(proxy: &'a Proxy, req: &Request<RequestBody>) -> Self {
        Self {
            proxy,
            method: req.method().clone(),
            // A cheap clone (shared bytes), kept for the log line.
            uri: req.uri().clone(),
            start: Instant::now(),
            class: RouteClass::Outside,
            in_flight: false,
            status: None,
        }
    }

    fn enter_in_flight(&mut self) {
        self.proxy.metrics.touch();
        self.proxy.metrics.in_flight().inc();
        self.in_flight = true;
    }

    fn answer(&mut self, response: Response<ProxyBody>) -> Response<ProxyBody> {
        self.status = Some(response.status());
        response
    }
}

impl Drop for Exchange<'_> {
    fn drop(&mut self) {
        let metrics = &self.proxy.metrics;
        if self.in_flight {
            metrics.in_flight().dec();
        }
        let elapsed = self.start.elapsed();
        let status = match self.status {
            Some(s) => s.as_u16(),
            None => {
                metrics.abandoned();
                CLIENT_GONE
            }
        };
        metrics.request(self.class, status, elapsed);
        tracing::info!(
            target: "flowgate::access",
            method = %self.method,
            path = self.uri.path(),
            status,
            route = self.class.label(),
            micros = elapsed.as_micros() as u64,
            client_gone = self.status.is_none(),
        );
    }
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
        let metrics = Metrics::new();
        let (to_light, to_identity) = metrics.compression_shed();
        let encoders = Encoders::new(config.max_encoders, to_light, to_identity);
        let static_cache = (config.static_cache_bytes > 0)
            .then(|| Arc::new(StaticCache::new(config.static_cache_bytes)));
        Arc::new(Self {
            config,
            client,
            probe,
            metrics,
            hash_routes,
            encoders,
            static_cache,
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
        req: Request<RequestBody>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        if let Some(response) = self.own_endpoint(req.method(), req.uri().path()).await {
            self.metrics
                .request(RouteClass::Own, response.status().as_u16(), start.elapsed());
            return response;
        }
        let mut exchange = Exchange::new(&self, &req);
        let response = self.route(req, peer, &mut exchange).await;
        exchange.answer(response)
    }

    /// Everything but the own endpoints.
    async fn route(
        &self,
        mut req: Request<RequestBody>,
        peer: SocketAddr,
        exchange: &mut Exchange<'_>,
    ) -> Response<ProxyBody> {
        if let Some(hosts) = &self.config.public_hosts
            && !request_host(&req).is_some_and(|h| hosts.allows(h))
        {
            self.metrics.refused(Refusal::Host);
            return plain(
                StatusCode::MISDIRECTED_REQUEST,
                format!("misdirected request: this adapter answers for {hosts}\n"),
            );
        }
        let path = match canonical_path(req.uri().path()) {
            Ok(path) => path,
            Err(e) => {
                self.metrics.refused(Refusal::Path);
                return plain(StatusCode::BAD_REQUEST, format!("bad request: {e}\n"));
            }
        };
        let prefix = &self.config.prefix;
        let rest = match prefix.match_path(&path) {
            PathMatch::Inside(rest) => rest,
            PathMatch::Bare => {
                exchange.class = RouteClass::Ui;
                return redirect(&with_query(&format!("{prefix}/"), req.uri().query()));
            }
            PathMatch::Outside => {
                return plain(
                    StatusCode::NOT_FOUND,
                    format!("not found: this adapter serves {prefix}/\n"),
                );
            }
        };
        // Classified and checked on the path the app will route, which is
        // also the path forwarded.
        let class = RouteClass::of_upstream_path(rest);
        exchange.class = class;
        // our cookie is taken out of what is forwarded (below)
        let cookie_for_app = match self.gate(&req) {
            Ok(cookie) => cookie,
            Err(answer) => return answer,
        };
        // The waking page of a sleeping instance follows this path at the
        // activator; once the route is back here, the instance is serving.
        if rest == WAKE_STATUS_PATH {
            return wake_status_ready();
        }
        if !self.config.writes && !read_only_allows(req.method(), rest) {
            self.metrics.refused(Refusal::ReadOnly);
            return read_only(req.method(), rest);
        }
        let forwarded = if self.config.rewrite { rest } else { &*path };
        let upstream_pq = with_query(forwarded, req.uri().query());
        drop(path);
        if let Some(cleaned) = cookie_for_app {
            let headers = req.headers_mut();
            headers.remove(header::COOKIE);
            if let Some(v) = cleaned {
                headers.insert(header::COOKIE, v);
            }
        }
        exchange.enter_in_flight();
        match self.forward(req, upstream_pq, class, peer).await {
            Ok(response) => response,
            Err(e) => {
                if let Some(label) = matches!(
                    e,
                    ProxyError::Upstream(_)
                        | ProxyError::UpstreamBody(_)
                        | ProxyError::UpstreamAnswer(_)
                        | ProxyError::UpstreamTimeout(_)
                )
                .then(|| e.source_label())
                {
                    self.metrics.upstream_error(label);
                }
                tracing::warn!(error = %e, path = exchange.uri.path(), "request failed");
                error_response(&e)
            }
        }
    }

    /// The access gate of a `link` instance: `Ok` with the Cookie header to
    /// forward instead (ours taken out) when the request may pass, or the
    /// gate's own answer (a sign-in redirect, a 401).
    #[allow(clippy::type_complexity, clippy::result_large_err)]
    fn gate<B>(
        &self,
        req: &Request<B>,
    ) -> Result<Option<Option<HeaderValue>>, Response<ProxyBody>> {
        let Some(gate) = &self.config.access else {
            return Ok(None);
        };
        let secure = forwarded_https(req.headers());
        match gate.decide(
            req.uri().path(),
            req.uri().query(),
            req.headers(),
            secure,
            SystemTime::now(),
        ) {
            Decision::Allow => Ok(strip_cookie(req.headers(), access::COOKIE)),
            Decision::Exchange { location, cookie } => {
                Err(enter_with_cookie(&location, cookie.as_deref()))
            }
            Decision::Deny(why) => {
                self.metrics.refused(Refusal::Access);
                Err(access_denied(req.headers(), why))
            }
        }
    }

    /// What the access gate answers a visitor itself (a sign-in redirect, a
    /// 401), or `None` when it would let the request through: a sleeping
    /// instance wakes only for visitors it would serve.
    pub fn gate_answer<B>(&self, req: &Request<B>) -> Option<Response<ProxyBody>> {
        self.gate(req).err()
    }

    /// `/healthz`, `/readyz` and `/metrics`, outside every prefix, on any Host.
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
        mut req: Request<RequestBody>,
        upstream_pq: String,
        class: RouteClass,
        peer: SocketAddr,
    ) -> Result<Response<ProxyBody>> {
        let upgrade = is_upgrade_request(req.headers()) && req.version() == Version::HTTP_11;
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let is_head = parts.method == Method::HEAD;
        let accept_header = parts.headers.get(header::ACCEPT_ENCODING).cloned();
        let accept = negotiate(accept_header.as_ref());
        // The static cache answers, or this request fills it, or neither.
        // MLflow asks for its static files without a query: one with a query
        // is not worth a slot (nor a way to flush the cache).
        let mut fill = None;
        if let Some(cache) = &self.static_cache
            && class == RouteClass::Static
            && !upgrade
            && !upstream_pq.contains('?')
            && static_cache::request_may_use(&parts.method, &parts.headers)
        {
            let key = static_cache::Key {
                path_and_query: upstream_pq.clone(),
                coding: accept.filter(|_| self.config.compress),
            };
            let directives = RequestDirectives::of(&parts.headers);
            for attempt in 0..2 {
                match cache.lookup(&key, directives, Instant::now()) {
                    Lookup::Fresh(stored) => {
                        self.metrics.static_cache(CacheResult::Hit, None);
                        return Ok(self.send_stored(&stored));
                    }
                    Lookup::Fill(f) => {
                        fill = Some(f);
                        break;
                    }
                    Lookup::Wait(mut done) if attempt == 0 => {
                        // What the fill kept came from the app while this
                        // request was waiting (a revalidating fill may have
                        // had its answer a moment before): it answers this
                        // request too. Err: the fill ended (its sender is
                        // gone), as expected.
                        let _ = tokio::time::timeout(static_cache::WAIT, done.changed()).await;
                        let kept = done.borrow().clone();
                        if let Some(stored) = kept {
                            self.metrics.static_cache(CacheResult::Hit, None);
                            return Ok(self.send_stored(&stored));
                        }
                    }
                    Lookup::Wait(_) | Lookup::Bypass => {
                        self.metrics
                            .static_cache(CacheResult::Passed, Some(cache.bytes()));
                        break;
                    }
                }
            }
        }
        // Shared-bytes clones, not copies: the headers are rewritten below.
        let host_header = parts.headers.get(header::HOST).cloned();
        let authority = parts.uri.authority().cloned();
        let public_host = host_header
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .or_else(|| authority.as_ref().map(|a| a.as_str()));
        let config = &self.config;
        let ctx = ForwardContext {
            public_host,
            client_ip: peer.ip(),
            upstream_authority: &config.upstream_authority,
            upstream_origin: &config.upstream_origin_header,
            forwarded_prefix: config.rewrite.then_some(&config.prefix_header),
            stripped_prefix: config.rewrite.then_some(&config.prefix),
        };
        forward_request_headers(&mut parts.headers, &ctx, upgrade);
        if let Some(fill) = &fill {
            for (name, value) in fill.conditionals() {
                parts.headers.insert(name, value);
            }
            // the entry's coding or none: an app that compresses answers in
            // what the entry is for, never in another coding this client took
            parts.headers.insert(
                header::ACCEPT_ENCODING,
                fill.coding()
                    .map_or(HeaderValue::from_static("identity"), Coding::header_value),
            );
        }
        parts.uri = self.upstream_uri(&upstream_pq)?;
        parts.version = Version::HTTP_11;
        let upstream_req = Request::from_parts(parts, body);

        let timeout = config.upstream_timeout;
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
            let (mut parts, _) = response.into_parts();
            one_date(&mut parts.headers);
            return Ok(Response::from_parts(parts, ProxyBody::empty()));
        }
        if let Some(fill) = fill {
            return self
                .fill_static_cache(fill, response, class, accept, accept_header.as_ref())
                .await;
        }
        Ok(self.shape_response(
            response,
            class,
            accept,
            accept_header.as_ref(),
            is_head,
            false,
        ))
    }

    /// The app's answer to a request that fills the static cache: a `304`
    /// to the cache's conditionals, a response to store (read whole at the
    /// app's pace, shaped, then sent), or one to pass on as usual.
    async fn fill_static_cache(
        &self,
        fill: Fill<'_>,
        response: Response<Incoming>,
        class: RouteClass,
        accept: Option<Coding>,
        accept_header: Option<&HeaderValue>,
    ) -> Result<Response<ProxyBody>> {
        let Some(cache) = &self.static_cache else {
            unreachable!("a fill comes from the cache");
        };
        if response.status() == StatusCode::NOT_MODIFIED && !fill.conditionals().is_empty() {
            let stored = fill.revalidated(response.headers(), Instant::now()).ok_or(
                ProxyError::UpstreamAnswer("a 304 for another version than the one kept"),
            )?;
            self.metrics
                .static_cache(CacheResult::Revalidated, Some(cache.bytes()));
            return Ok(self.send_stored(&stored));
        }
        if response.status().is_server_error() {
            // the app's trouble, passed on; the entry it was asked about
            // stays (stale, so the next request asks again)
            drop(fill);
            return Ok(self.shape_response(response, class, accept, accept_header, false, false));
        }
        let Some(storable) = static_cache::storable(
            response.status(),
            response.headers(),
            cache.max_entry_bytes(),
        ) else {
            fill.uncacheable(Instant::now());
            self.metrics
                .static_cache(CacheResult::Passed, Some(cache.bytes()));
            return Ok(self.shape_response(response, class, accept, accept_header, false, false));
        };
        let (parts, body) = self
            .shape_response(response, class, accept, accept_header, false, true)
            .into_parts();
        let (mut rest, sent) = body.into_stream();
        let sent = sent.unwrap_or_else(|| self.metrics.body_opened());
        // Not kept after all: the rest streams on from where the fill
        // stopped, its encoder still counted as a fill until it ends.
        let give_up = |fill: Fill<'_>, parts, read: Vec<Bytes>, rest, sent| {
            let permit = cache.fill_permit();
            fill.uncacheable(Instant::now());
            self.metrics
                .static_cache(CacheResult::Passed, Some(cache.bytes()));
            Response::from_parts(parts, ProxyBody::resumed(read, rest, sent, permit))
        };
        let coding = parts.headers.get(header::CONTENT_ENCODING);
        if coding != fill.coding().map(Coding::header_value).as_ref() {
            // the app chose another coding than the entry's: not for this key
            return Ok(give_up(fill, parts, Vec::new(), rest, sent));
        }
        let limit = cache.max_entry_bytes();
        let deadline = tokio::time::Instant::now() + self.config.upstream_timeout;
        let (mut read, mut len) = (Vec::new(), 0);
        loop {
            let chunk = match tokio::time::timeout_at(deadline, rest.next()).await {
                Ok(Some(chunk)) => chunk.map_err(|e| ProxyError::UpstreamBody(e.to_string()))?,
                Ok(None) => break,
                // a slow app: what it sends is still sent, at its pace
                Err(_) => return Ok(give_up(fill, parts, read, rest, sent)),
            };
            len += chunk.len();
            read.push(chunk);
            if len > limit {
                // too large to keep as sent (a rewrite lengthened it, or it
                // does not compress)
                return Ok(give_up(fill, parts, read, rest, sent));
            }
        }
        let body = match read.len() {
            1 => read.pop().unwrap_or_default(),
            _ => Bytes::from(read.concat()),
        };
        let stored = fill.store(storable, parts.headers, body, Instant::now());
        self.metrics
            .static_cache(CacheResult::Stored, Some(cache.bytes()));
        Ok(stored_response(
            &stored,
            ProxyBody::counted(stored.body.clone(), sent),
        ))
    }

    /// A response from the static cache.
    fn send_stored(&self, stored: &Stored) -> Response<ProxyBody> {
        stored_response(
            stored,
            ProxyBody::counted(stored.body.clone(), self.metrics.body_opened()),
        )
    }

    /// Puts the prefix back on headers, marks artefacts, and runs the body plan.
    fn shape_response(
        &self,
        response: Response<Incoming>,
        class: RouteClass,
        accept: Option<Coding>,
        accept_header: Option<&HeaderValue>,
        is_head: bool,
        for_static_cache: bool,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = response.into_parts();
        let sent = self.metrics.body_opened();
        one_date(&mut parts.headers);
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
        if class == RouteClass::Artifact {
            sandbox(&mut parts.headers);
        }

        let facts = ResponseFacts::of(class, is_head, parts.status, &parts.headers);
        let settings = BodySettings {
            rewrite: self.config.rewrite,
            compress: self.config.compress,
        };
        let BodyPlan::Transform {
            decode,
            rewrite,
            encode,
        } = plan(&facts, accept, settings)
        else {
            return Response::from_parts(parts, ProxyBody::passthrough(body, sent));
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
        // an encoder slot, or a lighter coding, or none (memory stays bounded);
        // the static cache's fills are bounded by the cache and get the coding
        // asked for, at a higher level: they keep it for every later request
        let encode = if for_static_cache {
            encode.map(|c| (c, Effort::Kept, Slot::outside_the_bound()))
        } else {
            encode
                .and_then(|c| self.encoders.pick(c, accept_header))
                .map(|(c, slot)| (c, Effort::Streaming, slot))
        };
        if encode.is_some() {
            self.metrics.rewrite(RewriteKind::Compress, 1);
        }
        let headers = &mut parts.headers;
        headers.remove(header::CONTENT_LENGTH);
        headers.remove(header::ACCEPT_RANGES);
        headers.remove(CONTENT_MD5);
        match &encode {
            Some((c, _, _)) => {
                headers.insert(header::CONTENT_ENCODING, c.header_value());
            }
            None => {
                headers.remove(header::CONTENT_ENCODING);
            }
        }
        if facts.media.is_compressible() {
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

/// A stored response with its `Age`, and `body` (its bytes).
fn stored_response(stored: &Stored, body: ProxyBody) -> Response<ProxyBody> {
    let mut response = Response::new(body);
    *response.headers_mut() = stored.headers.clone();
    response
        .headers_mut()
        .insert(header::AGE, HeaderValue::from(stored.age(Instant::now())));
    response
}

/// The `Host` a request names: its `Host` header, or the HTTP/2 `:authority`.
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    match req.headers().get(header::HOST) {
        Some(host) => host.to_str().ok(),
        None => req.uri().authority().map(|a| a.as_str()),
    }
}

/// An artefact is a user's bytes, served on the instance's origin: it may run
/// no script there (an HTML or SVG report), and its type is not to be guessed.
fn sandbox(headers: &mut HeaderMap) {
    headers.append(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
}

/// HTTP allows one `Date`; an upstream that sends several keeps its first.
fn one_date(headers: &mut HeaderMap) {
    if let header::Entry::Occupied(mut dates) = headers.entry(header::DATE)
        && dates.iter().nth(1).is_some()
    {
        let first = dates.get().clone();
        dates.insert(first);
    }
}

/// Whether the browser came over https, as the router in front says.
fn forwarded_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

/// A valid access link: the session cookie (none when the browser is signed
/// in already), and the same URL without the token.
fn enter_with_cookie(location: &str, cookie: Option<&str>) -> Response<ProxyBody> {
    let mut response = plain(StatusCode::SEE_OTHER, "signed in\n");
    let headers = response.headers_mut();
    if let Ok(l) = HeaderValue::from_str(location) {
        headers.insert(header::LOCATION, l);
    }
    if let Some(Ok(c)) = cookie.map(HeaderValue::from_str) {
        headers.insert(header::SET_COOKIE, c);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // the token must not leak through the Referer of the next page
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    response
}

/// No valid link or session: 401, an HTML page for browsers, JSON otherwise;
/// never the app's content.
pub fn access_denied(request: &HeaderMap, why: Option<Denied>) -> Response<ProxyBody> {
    let html = request
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"));
    let (body, kind) = if html {
        (
            Bytes::from_static(access::DENIED_PAGE.as_bytes()),
            "text/html; charset=utf-8",
        )
    } else {
        (Bytes::from(access::denied_json(why)), "application/json")
    };
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = StatusCode::UNAUTHORIZED;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("FlowgateLink realm=\"flowgate\""),
    );
    response
}

/// A write to a read-only instance: 403 with an error MLflow's UI can show.
fn read_only(method: &Method, path: &str) -> Response<ProxyBody> {
    // The path is canonical (quotes, backslashes and controls are encoded or
    // refused) and a method is a token, so neither needs JSON escaping.
    let body = format!(
        "{{\"error_code\":\"PERMISSION_DENIED\",\"message\":\"This MLflow instance is read-only: {method} {path} is not forwarded.\"}}\n"
    );
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = StatusCode::FORBIDDEN;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
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

/// [`WAKE_STATUS_PATH`] at a serving instance: ready (the waking page reloads).
fn wake_status_ready() -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full("{\"state\":\"ready\",\"steps\":[]}\n"));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
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
