//! Request bodies as handlers receive them, and what happens to one a handler
//! answers without reading (a refused write, a sign-in redirect, a waking
//! page, a 404).
//!
//! hyper, left with an unread HTTP/1 body, reads what is already buffered and
//! otherwise closes the connection after the response, without saying so in
//! it. A proxy in front (Traefik, NGINX, an OpenShift router) that pools the
//! connection then sends its next request into a closed socket and answers
//! its own client 502: a POST is not retried. So a body dropped unread comes
//! back to the connection, and before the response goes out the rest of it is
//! read and discarded — at most [`DISCARD_LIMIT`] bytes within
//! [`DISCARD_WAIT`], as NGINX discards a request body it does not want. A body
//! longer or slower than that, or one the client has not sent yet because it
//! waits for `100 Continue`, gets `Connection: close` on the response instead:
//! the connection still ends, but the peer is told and does not reuse it.
//! HTTP/2 needs none of this: an unread stream is reset on its own.

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Version, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::oneshot;

/// The most of an unread body discarded to keep its connection.
pub const DISCARD_LIMIT: u64 = 256 << 10;
/// The longest wait for the rest of an unread body.
pub const DISCARD_WAIT: Duration = Duration::from_secs(2);

/// A request's body. It reads as the connection's own body; dropped before
/// its end, it goes back to the connection ([`Unread`]).
pub struct RequestBody {
    inner: Option<Incoming>,
    polled: bool,
    failed: bool,
    unread: Option<oneshot::Sender<Returned>>,
}

/// A body dropped before its end, and whether its reader ever asked for it.
struct Returned {
    body: Incoming,
    polled: bool,
}

impl RequestBody {
    /// Wraps an HTTP/1 request's body; the [`Unread`] receives it if the
    /// handler drops it unread. HTTP/2 bodies and empty ones (most requests:
    /// no channel is made for them) are wrapped without a way back.
    pub fn wrap(req: Request<Incoming>) -> (Request<RequestBody>, Unread) {
        let expects_continue = req
            .headers()
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let (tx, rx) = if req.version() < Version::HTTP_2 && !req.body().is_end_stream() {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let req = req.map(|inner| RequestBody {
            inner: Some(inner),
            polled: false,
            failed: false,
            unread: tx,
        });
        (
            req,
            Unread {
                returned: rx,
                expects_continue,
            },
        )
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        self.polled = true;
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = std::task::ready!(Pin::new(inner).poll_frame(cx));
        match &frame {
            None => self.inner = None,
            Some(Err(_)) => self.failed = true,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let (Some(body), Some(tx)) = (self.inner.take(), self.unread.take())
            && !self.failed
            && !body.is_end_stream()
        {
            let _ = tx.send(Returned {
                body,
                polled: self.polled,
            });
        }
    }
}

/// The way back for a body its handler drops unread.
pub struct Unread {
    returned: Option<oneshot::Receiver<Returned>>,
    expects_continue: bool,
}

impl Unread {
    /// Makes `response` safe to send on a connection that may still carry
    /// the rest of the request's body: discards the rest, or marks the
    /// response `Connection: close`. A body still being read (streaming to
    /// the app) is left alone.
    pub async fn settle<B>(self, mut response: Response<B>) -> Response<B> {
        let Some(Ok(Returned { body, polled })) = self.returned.map(|mut rx| rx.try_recv()) else {
            return response;
        };
        // A client waiting for `100 Continue` has sent nothing; asking for
        // the body now would only fetch what is then thrown away.
        let discarded = (polled || !self.expects_continue)
            && body.size_hint().lower() <= DISCARD_LIMIT
            && tokio::time::timeout(DISCARD_WAIT, discard(body))
                .await
                .unwrap_or(false);
        if !discarded {
            tracing::debug!("request body left unread: the connection closes after the response");
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// Reads `body` to its end, keeping nothing; false when it is longer than
/// [`DISCARD_LIMIT`] or fails.
async fn discard(mut body: Incoming) -> bool {
    let mut seen = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                seen += frame.data_ref().map_or(0, |d| d.len() as u64);
                if seen > DISCARD_LIMIT {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    true
}
