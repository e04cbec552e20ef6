//! Accepting connections: HTTP/1.1 and h2c on one listener, upgrades allowed,
//! bounded request heads, bounded silence, a bounded number of connections,
//! and a graceful drain when told to stop.
//!
//! hyper-util's auto server reads the first bytes to tell HTTP/1 from the
//! HTTP/2 preface before any of hyper's own timers start, so a connection that
//! says nothing, or half a preface, would live for ever. Each connection
//! therefore has a watchdog: while no request is in flight it allows
//! `header_read_timeout` for the first request and `idle_timeout` between
//! requests, then shuts the connection down (the auto server cancels a
//! version read that is still waiting). HTTP/2 peers also get keep-alive
//! pings, so a vanished peer with a stream open is noticed. A peer that
//! stops reading is cut once a write has waited `send_timeout`
//! (`SendTimeout`): hyper has no write timeout of its own.

use crate::config::ProxyConfig;
use crate::metrics::ConnectionMetrics;
use crate::request_body::RequestBody;
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use pin_project_lite::pin_project;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

/// How long a connection shut down for silence may take to close by itself.
const SILENCE_GRACE: Duration = Duration::from_secs(1);
/// HTTP/2 keep-alive ping interval, and how long a ping may go unanswered.
const H2_PING: Duration = Duration::from_secs(20);

/// Something that answers requests: one instance's proxy, a router that
/// picks a proxy by path (the provisioner's local backend), or the
/// provisioner's REST API.
pub trait Handler: Send + Sync + 'static {
    /// The response body.
    type Body: Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static;

    /// Answers one request; errors are responses too.
    fn handle(
        self: Arc<Self>,
        req: Request<RequestBody>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response<Self::Body>> + Send;

    /// Where the accept loop counts connections, if anywhere.
    fn connection_metrics(&self) -> Option<&ConnectionMetrics> {
        None
    }
}

/// Per-connection bounds.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// Longest wait for a new connection's first request head, and for any
    /// HTTP/1 request head once it has started.
    pub header_read_timeout: Duration,
    /// Longest a connection stays open with no request in flight.
    pub idle_timeout: Duration,
    /// Longest a write to the client may make no progress (the client reads
    /// nothing) before the connection is closed: a stalled reader would
    /// otherwise hold its connection, its upstream request and the
    /// instance's activity for ever.
    pub send_timeout: Duration,
    /// Largest request head.
    pub max_header_bytes: usize,
    /// Longest drain after shutdown.
    pub drain_timeout: Duration,
    /// Most connections open at once; more are closed at accept.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            send_timeout: Duration::from_secs(60),
            max_header_bytes: 64 * 1024,
            drain_timeout: Duration::from_secs(25),
            max_connections: 1024,
        }
    }
}

impl From<&ProxyConfig> for ConnectionLimits {
    fn from(c: &ProxyConfig) -> Self {
        Self {
            header_read_timeout: c.header_read_timeout,
            idle_timeout: c.idle_timeout,
            send_timeout: c.send_timeout,
            max_header_bytes: c.max_header_bytes,
            drain_timeout: c.drain_timeout,
            max_connections: c.max_connections,
        }
    }
}

/// How a drain ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Drain {
    /// Every in-flight request finished.
    Complete,
    /// The drain timeout passed with requests still open; they were cut.
    TimedOut,
}

/// Serves `handler` on `listener` until `shutdown` resolves, then stops
/// accepting and waits (up to the drain timeout) for in-flight requests.
pub async fn serve<H: Handler>(
    handler: Arc<H>,
    limits: &ConnectionLimits,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Drain {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(H2_PING)
        .keep_alive_timeout(H2_PING);
    let builder = Arc::new(builder);
    let max_connections = u32::try_from(limits.max_connections.max(1)).unwrap_or(u32::MAX);
    let slots = Arc::new(Semaphore::new(max_connections as usize));
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics = handler.connection_metrics().cloned().unwrap_or_default();
    tokio::pin!(shutdown);

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            metrics.refused.inc();
            tracing::warn!(%peer, max_connections, "connection refused: too many open");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            handler: Arc::clone(&handler),
            builder: Arc::clone(&builder),
            limits: limits.clone(),
            metrics: metrics.clone(),
            stop: stop_rx.clone(),
            peer,
        };
        tokio::spawn(async move {
            let _slot = slot;
            connection.run(stream).await;
        });
    }

    drop(listener);
    tracing::info!("stopped accepting; draining in-flight requests");
    let _ = stop_tx.send(true);
    // Every connection holds a slot until it ends: all slots back means drained.
    match tokio::time::timeout(limits.drain_timeout, slots.acquire_many(max_connections)).await {
        Ok(_) => Drain::Complete,
        Err(_) => Drain::TimedOut,
    }
}

/// One accepted connection and what it needs.
struct Connection<H> {
    handler: Arc<H>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: ConnectionLimits,
    metrics: ConnectionMetrics,
    stop: watch::Receiver<bool>,
    peer: SocketAddr,
}

impl<H: Handler> Connection<H> {
    async fn run(mut self, stream: tokio::net::TcpStream) {
        let peer = self.peer;
        let _open = GaugeGuard::inc(self.metrics.open.clone());
        // Requests in flight on this connection, counted by the service and
        // by the response bodies it hands out.
        let (active_tx, mut active) = watch::channel(0usize);
        let active_tx = Arc::new(active_tx);
        let handler = Arc::clone(&self.handler);
        let service = service_fn(move |req| {
            let handler = Arc::clone(&handler);
            let guard = Active::begin(Arc::clone(&active_tx));
            async move {
                let (req, unread) = RequestBody::wrap(req);
                let response = unread.settle(handler.handle(req, peer).await).await;
                Ok::<_, Infallible>(response.map(|body| Tracked {
                    inner: body,
                    _guard: guard,
                }))
            }
        });
        let conn = self.builder.serve_connection_with_upgrades(
            TokioIo::new(SendTimeout::new(stream, self.limits.send_timeout)),
            service,
        );
        tokio::pin!(conn);

        // Until the first request: the header timeout; between requests: idle.
        let mut silent_until = Some(Instant::now() + self.limits.header_read_timeout);
        let mut closing_by: Option<Instant> = None;
        let mut service_gone = false;
        let mut draining = *self.stop.borrow();
        if draining {
            conn.as_mut().graceful_shutdown();
        }
        let far = || Instant::now() + Duration::from_secs(86_400);
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, %peer, "connection ended with an error");
                    }
                    return;
                }
                changed = active.changed(), if !service_gone => {
                    if changed.is_err() {
                        // The service is gone, so is the connection: keep polling it.
                        service_gone = true;
                        continue;
                    }
                    let n = *active.borrow_and_update();
                    silent_until = (n == 0).then(|| Instant::now() + self.limits.idle_timeout);
                }
                () = tokio::time::sleep_until(silent_until.unwrap_or_else(far)), if silent_until.is_some() && closing_by.is_none() => {
                    self.metrics.idle_closed.inc();
                    tracing::debug!(%peer, "closing a silent connection");
                    conn.as_mut().graceful_shutdown();
                    closing_by = Some(Instant::now() + SILENCE_GRACE);
                }
                () = tokio::time::sleep_until(closing_by.unwrap_or_else(far)), if closing_by.is_some() => {
                    return;
                }
                changed = self.stop.changed(), if !draining => {
                    draining = true;
                    if changed.is_ok() {
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    }
}

/// Holds a gauge up by one while it lives.
struct GaugeGuard(prometheus_client::metrics::gauge::Gauge);

impl GaugeGuard {
    fn inc(gauge: prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One request in flight on a connection, from its head to its body's end.
struct Active(Arc<watch::Sender<usize>>);

impl Active {
    fn begin(count: Arc<watch::Sender<usize>>) -> Self {
        count.send_modify(|n| *n += 1);
        Self(count)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A body's error, as hyper takes it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project! {
    /// A response body that keeps its request counted as in flight until it
    /// has been sent (or dropped).
    struct Tracked<B> {
        #[pin]
        inner: B,
        _guard: Active,
    }
}

impl<B: Body<Data = Bytes>> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

/// A stream whose writes fail with `TimedOut` once one has waited `limit`
/// without making progress. Only a write that has bytes to send waits: a
/// quiet event stream or an idle keep-alive is never cut here. The clock is
/// boxed so the stream stays `Unpin`, as upgrades need; it is allocated at
/// the connection's first stalled write and reset (not re-allocated) at the
/// next ones, as a large download stalls on every full socket buffer.
struct SendTimeout<S> {
    inner: S,
    limit: Duration,
    clock: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether a write is waiting now (the clock runs).
    stalled: bool,
}

impl<S> SendTimeout<S> {
    fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            clock: None,
            stalled: false,
        }
    }

    /// Passes `result` through; a Pending one starts (or keeps) the clock,
    /// which any progress stops.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if result.is_ready() {
            self.stalled = false;
            return result;
        }
        if !self.stalled {
            let deadline = Instant::now() + self.limit;
            match &mut self.clock {
                Some(clock) => clock.as_mut().reset(deadline),
                None => self.clock = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.stalled = true;
        }
        let clock = self.clock.as_mut().expect("set when a write first stalls");
        match clock.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client read nothing for the send timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, result)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
