//! Response bodies. Most pass through as the upstream's own frames, untouched
//! and unbuffered; bodies that need rewriting or compression run through a
//! stream pipeline: decode → rewrite → encode.

use crate::coding::{ByteStream, Coding, Effort};
use crate::encoders::Slot;
use crate::metrics::BodySent;
use crate::rewrite::StreamRewriter;
use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt, stream};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyDataStream;
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use prometheus_client::metrics::counter::Counter;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

/// The error type of a response body.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

pin_project! {
    /// A response body as the adapter sends it. `sent` counts the bytes that
    /// reach the client.
    #[project = ProxyBodyProj]
    #[allow(missing_docs)]
    pub enum ProxyBody {
        /// The upstream's body, frame for frame.
        Passthrough {
            #[pin]
            inner: Incoming,
            sent: BodySent,
        },
        /// A transformed body.
        Transformed {
            inner: ByteStream,
            sent: BodySent,
        },
        /// One buffer: a body the adapter wrote itself, or one kept by the
        /// static cache (counted as sent, with `sent`).
        Full {
            data: Option<Bytes>,
            sent: Option<BodySent>,
        },
    }
}

impl ProxyBody {
    /// A body made of one buffer (error pages, health answers).
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data: Bytes = data.into();
        ProxyBody::Full {
            data: (!data.is_empty()).then_some(data),
            sent: None,
        }
    }

    /// One buffer of a proxied response (the static cache's), counted in
    /// `sent` as it goes.
    pub fn counted(data: Bytes, sent: BodySent) -> Self {
        ProxyBody::Full {
            data: (!data.is_empty()).then_some(data),
            sent: Some(sent),
        }
    }

    /// The body as a stream of its bytes, and its counter: for the adapter
    /// to read itself (a static cache fill), then to send on with
    /// [`ProxyBody::resumed`] if it cannot keep it.
    pub fn into_stream(self) -> (ByteStream, Option<BodySent>) {
        match self {
            ProxyBody::Passthrough { inner, sent } => (
                Box::pin(BodyDataStream::new(inner).map_err(io::Error::other)),
                Some(sent),
            ),
            ProxyBody::Transformed { inner, sent } => (inner, Some(sent)),
            ProxyBody::Full { data, sent } => (Box::pin(stream::iter(data.map(Ok))), sent),
        }
    }

    /// A body that sends `read` (already taken from `rest`), then the rest
    /// of `rest`, holding `held` until it ends.
    pub fn resumed(
        read: Vec<Bytes>,
        rest: ByteStream,
        sent: BodySent,
        held: impl Send + 'static,
    ) -> Self {
        let body = stream::iter(read.into_iter().map(Ok)).chain(rest);
        ProxyBody::Transformed {
            inner: Box::pin(body.map(move |chunk| {
                let _held = &held;
                chunk
            })),
            sent,
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        ProxyBody::Full {
            data: None,
            sent: None,
        }
    }

    /// The upstream body unchanged.
    pub fn passthrough(inner: Incoming, sent: BodySent) -> Self {
        ProxyBody::Passthrough { inner, sent }
    }

    /// The upstream body decoded from `decode`, run through `rewriter`, and
    /// encoded as `encode` (holding its encoder slot until the body ends),
    /// each step optional. `capped` counts the bodies whose rewriter hit a
    /// buffer cap.
    pub fn transformed(
        inner: Incoming,
        decode: Option<Coding>,
        rewriter: Option<Box<dyn StreamRewriter>>,
        encode: Option<(Coding, Effort, Slot)>,
        sent: BodySent,
        capped: Counter,
    ) -> Self {
        let mut stream: ByteStream = Box::pin(BodyDataStream::new(inner).map_err(io::Error::other));
        if let Some(coding) = decode {
            stream = coding.decode(stream);
        }
        if let Some(rewriter) = rewriter {
            stream = Box::pin(RewriteStream {
                inner: stream,
                rewriter,
                pending: Bytes::new(),
                finished: false,
                capped,
                reported: false,
            });
        }
        if let Some((coding, effort, slot)) = encode {
            let encoded = coding.encode(stream, effort);
            stream = Box::pin(encoded.map(move |chunk| {
                let _held = &slot;
                chunk
            }));
        }
        ProxyBody::Transformed {
            inner: stream,
            sent,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.project() {
            ProxyBodyProj::Passthrough { inner, sent } => {
                let frame = ready!(inner.poll_frame(cx));
                if let Some(Ok(data)) = frame.as_ref().map(|f| f.as_ref().map(Frame::data_ref)) {
                    sent.add(data.map_or(0, |d| d.len() as u64));
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            ProxyBodyProj::Transformed { inner, sent } => loop {
                match ready!(inner.as_mut().poll_next(cx)) {
                    Some(Ok(data)) if data.is_empty() => continue,
                    Some(Ok(data)) => {
                        sent.add(data.len() as u64);
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                    None => return Poll::Ready(None),
                }
            },
            ProxyBodyProj::Full { data, sent } => Poll::Ready(data.take().map(|d| {
                if let Some(sent) = sent {
                    sent.add(d.len() as u64);
                }
                Ok(Frame::data(d))
            })),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Passthrough { inner, .. } => inner.is_end_stream(),
            ProxyBody::Transformed { .. } => false,
            ProxyBody::Full { data, .. } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Passthrough { inner, .. } => inner.size_hint(),
            ProxyBody::Transformed { .. } => SizeHint::default(),
            ProxyBody::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// The most input a rewriter gets in one poll: a large body is rewritten a
/// piece at a time, giving the runtime back between pieces.
const REWRITE_STEP: usize = 16 * 1024;

/// Runs a [`StreamRewriter`] over a byte stream.
struct RewriteStream {
    inner: ByteStream,
    rewriter: Box<dyn StreamRewriter>,
    /// Input taken from `inner` and not fed yet.
    pending: Bytes,
    finished: bool,
    capped: Counter,
    /// The cap was hit and said so (once per body).
    reported: bool,
}

impl RewriteStream {
    fn check_cap(&mut self) {
        if !self.reported && self.rewriter.overflowed() {
            self.reported = true;
            self.capped.inc();
            tracing::warn!(
                "a rewriting buffer cap was hit: the rest of this response passes through unrewritten"
            );
        }
    }
}

impl Stream for RewriteStream {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        if this.pending.is_empty() {
            match ready!(this.inner.as_mut().poll_next(cx)) {
                Some(Ok(chunk)) => this.pending = chunk,
                Some(Err(e)) => {
                    this.finished = true;
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    this.finished = true;
                    let out = this.rewriter.finish();
                    this.check_cap();
                    return match out {
                        Ok(out) if out.is_empty() => Poll::Ready(None),
                        other => Poll::Ready(Some(other)),
                    };
                }
            }
        }
        let piece = this.pending.split_to(this.pending.len().min(REWRITE_STEP));
        let out = this.rewriter.feed(&piece);
        this.check_cap();
        match out {
            Ok(out) if out.is_empty() => {
                // Nothing to send yet: yield, and take the next piece on the
                // next poll rather than looping here.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            other => Poll::Ready(Some(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prefix::Prefix;
    use crate::rewrite::css::CssRewriter;
    use std::task::Waker;

    #[test]
    fn a_large_body_is_rewritten_a_piece_per_poll() {
        let css = "a{b:url(/x)}".repeat(100_000);
        let chunk = Bytes::from(css.clone());
        let inner: ByteStream = Box::pin(futures_util::stream::iter([Ok(chunk)]));
        let mut stream = RewriteStream {
            inner,
            rewriter: Box::new(CssRewriter::new(Prefix::new("/p").unwrap())),
            pending: Bytes::new(),
            finished: false,
            capped: Counter::default(),
            reported: false,
        };
        let mut cx = Context::from_waker(Waker::noop());
        let mut out = Vec::new();
        let mut polls = 0;
        loop {
            polls += 1;
            match Pin::new(&mut stream).poll_next(&mut cx) {
                Poll::Ready(Some(Ok(piece))) => {
                    assert!(piece.len() <= 2 * REWRITE_STEP, "one piece per poll");
                    out.extend_from_slice(&piece);
                }
                Poll::Ready(None) => break,
                Poll::Ready(Some(Err(e))) => panic!("{e}"),
                Poll::Pending => {}
            }
        }
        assert!(polls > css.len() / REWRITE_STEP);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            css.replace("url(/x)", "url(/p/x)")
        );
    }
}
