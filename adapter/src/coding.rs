//! Content codings: reading `Content-Encoding` and `Accept-Encoding`, and the
//! async-compression decoders and encoders that wrap a body stream.

use async_compression::Level;
use async_compression::tokio::bufread as codec;
use bytes::Bytes;
use futures_util::Stream;
use http::HeaderValue;
use std::io;
use std::pin::Pin;
use tokio_util::io::{ReaderStream, StreamReader};

/// A boxed stream of body bytes.
pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// Output chunk size of the codecs: large enough to keep per-chunk overhead low.
const CHUNK: usize = 32 * 1024;

/// The codings the adapter can decode and encode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Coding {
    /// zstd (preferred for clients that accept it: fastest at a good ratio).
    Zstd,
    /// brotli.
    Brotli,
    /// gzip.
    Gzip,
    /// zlib-wrapped deflate, as HTTP's `deflate` means.
    Deflate,
}

/// What a `Content-Encoding` header says about a body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyCoding {
    /// No coding.
    Identity,
    /// One coding we can decode.
    Known(Coding),
    /// Stacked or unknown codings: the body can only pass through.
    Opaque,
}

impl Coding {
    /// Preference order when the client's weights tie.
    const PREFERENCE: [Coding; 4] = [Coding::Zstd, Coding::Brotli, Coding::Gzip, Coding::Deflate];

    /// The token used in HTTP headers.
    pub fn token(self) -> &'static str {
        match self {
            Coding::Zstd => "zstd",
            Coding::Brotli => "br",
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
        }
    }

    fn from_token(token: &str) -> Option<Self> {
        Self::PREFERENCE
            .into_iter()
            .find(|c| c.token().eq_ignore_ascii_case(token))
            .or_else(|| token.eq_ignore_ascii_case("x-gzip").then_some(Coding::Gzip))
    }

    /// Whether its encoder keeps a large window (MiBs: zstd, brotli) rather
    /// than deflate's 32 KiB.
    pub fn is_heavy(self) -> bool {
        matches!(self, Coding::Zstd | Coding::Brotli)
    }

    /// The header value naming this coding.
    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(self.token())
    }

    /// Wraps `stream` in a decoder for this coding.
    pub fn decode(self, stream: ByteStream) -> ByteStream {
        let reader = StreamReader::new(stream);
        match self {
            Coding::Zstd => boxed(codec::ZstdDecoder::new(reader)),
            Coding::Brotli => boxed(codec::BrotliDecoder::new(reader)),
            Coding::Gzip => {
                let mut decoder = codec::GzipDecoder::new(reader);
                decoder.multiple_members(true);
                boxed(decoder)
            }
            Coding::Deflate => boxed(codec::ZlibDecoder::new(reader)),
        }
    }

    /// Wraps `stream` in an encoder for this coding, at a level for `effort`.
    pub fn encode(self, stream: ByteStream, effort: Effort) -> ByteStream {
        let reader = StreamReader::new(stream);
        let level = Level::Precise(self.level(effort));
        match self {
            Coding::Zstd => boxed(codec::ZstdEncoder::with_quality(reader, level)),
            Coding::Brotli => boxed(codec::BrotliEncoder::with_quality(reader, level)),
            Coding::Gzip => boxed(codec::GzipEncoder::with_quality(reader, level)),
            Coding::Deflate => boxed(codec::ZlibEncoder::with_quality(reader, level)),
        }
    }

    /// The encoder's level (each coding's own scale) for `effort`.
    fn level(self, effort: Effort) -> i32 {
        match (self, effort) {
            (Coding::Zstd, Effort::Streaming) => 3,
            (_, Effort::Streaming) => 4,
            (_, Effort::Kept) => 6,
        }
    }
}

/// How hard an encoder works.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effort {
    /// A response compressed as it streams, once per request: fast enough to
    /// keep up with the network, still a good ratio.
    Streaming,
    /// A response the static cache keeps and sends many times: compressed
    /// once, so a smaller result is worth more CPU (MLflow's main bundle: zstd
    /// 1,116 KB at level 6 against 1,225 KB at 3, 0.1 s more, ~2 MiB more
    /// memory while it runs).
    Kept,
}

fn boxed<R: tokio::io::AsyncRead + Send + 'static>(reader: R) -> ByteStream {
    Box::pin(ReaderStream::with_capacity(reader, CHUNK))
}

/// Reads a `Content-Encoding` header.
pub fn body_coding(header: Option<&HeaderValue>) -> BodyCoding {
    let Some(value) = header.and_then(|v| v.to_str().ok()) else {
        return match header {
            None => BodyCoding::Identity,
            Some(_) => BodyCoding::Opaque,
        };
    };
    let mut codings = value
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case("identity"));
    match (codings.next(), codings.next()) {
        (None, _) => BodyCoding::Identity,
        (Some(one), None) => Coding::from_token(one).map_or(BodyCoding::Opaque, BodyCoding::Known),
        _ => BodyCoding::Opaque,
    }
}

/// Picks the coding to send a client, from its `Accept-Encoding`: the highest
/// weight wins, ties go by [`Coding::PREFERENCE`], `q=0` refuses.
pub fn negotiate(accept_encoding: Option<&HeaderValue>) -> Option<Coding> {
    negotiate_among(accept_encoding, &Coding::PREFERENCE)
}

/// As [`negotiate`], among `allowed` codings only (a lighter one when the
/// preferred one cannot be had).
pub fn negotiate_among(
    accept_encoding: Option<&HeaderValue>,
    allowed: &[Coding],
) -> Option<Coding> {
    let value = accept_encoding?.to_str().ok()?;
    let mut weights = [None::<u16>; 4];
    let mut wildcard = None;
    for item in value.split(',') {
        let mut parts = item.split(';');
        let token = parts.next().unwrap_or("").trim();
        let q = parts
            .filter_map(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .or_else(|| p.trim().strip_prefix("Q="))
            })
            .find_map(parse_qvalue)
            .unwrap_or(1000);
        if token == "*" {
            wildcard = Some(q);
        } else if let Some(c) = Coding::from_token(token) {
            let slot = &mut weights[Coding::PREFERENCE
                .iter()
                .position(|p| *p == c)
                .expect("listed")];
            *slot = Some(slot.map_or(q, |old| old.max(q)));
        }
    }
    Coding::PREFERENCE
        .iter()
        .zip(weights)
        .filter_map(|(c, w)| w.or(wildcard).map(|w| (*c, w)))
        .filter(|(c, w)| *w > 0 && allowed.contains(c))
        .fold(None, |best: Option<(Coding, u16)>, (c, w)| match best {
            Some((_, bw)) if bw >= w => best,
            _ => Some((c, w)),
        })
        .map(|(c, _)| c)
}

/// A qvalue in thousandths (`0.5` → 500).
fn parse_qvalue(s: &str) -> Option<u16> {
    let v: f32 = s.trim().parse().ok()?;
    (0.0..=1.0)
        .contains(&v)
        .then(|| (v * 1000.0).round() as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn negotiation() {
        let table: &[(&str, Option<Coding>)] = &[
            ("gzip, deflate, br, zstd", Some(Coding::Zstd)),
            ("gzip, deflate, br", Some(Coding::Brotli)),
            ("gzip", Some(Coding::Gzip)),
            ("x-gzip", Some(Coding::Gzip)),
            ("gzip;q=0.5, br;q=0.8", Some(Coding::Brotli)),
            ("br;q=0, gzip", Some(Coding::Gzip)),
            ("identity", None),
            ("*", Some(Coding::Zstd)),
            ("*;q=0", None),
            ("zstd;q=0, *", Some(Coding::Brotli)),
            ("", None),
            ("GZIP;Q=1.0", Some(Coding::Gzip)),
            ("gzip;q=bogus", Some(Coding::Gzip)),
        ];
        for (input, want) in table {
            assert_eq!(
                negotiate(Some(&hv(input))),
                *want,
                "Accept-Encoding: {input:?}"
            );
        }
        assert_eq!(negotiate(None), None);
    }

    #[test]
    fn content_encoding() {
        assert_eq!(body_coding(None), BodyCoding::Identity);
        assert_eq!(body_coding(Some(&hv("identity"))), BodyCoding::Identity);
        assert_eq!(
            body_coding(Some(&hv("gzip"))),
            BodyCoding::Known(Coding::Gzip)
        );
        assert_eq!(
            body_coding(Some(&hv("BR"))),
            BodyCoding::Known(Coding::Brotli)
        );
        assert_eq!(body_coding(Some(&hv("gzip, br"))), BodyCoding::Opaque);
        assert_eq!(body_coding(Some(&hv("compress"))), BodyCoding::Opaque);
    }

    fn stream_of(text: &Bytes) -> ByteStream {
        Box::pin(futures_util::stream::iter(
            text.chunks(1000)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect::<Vec<_>>(),
        ))
    }

    async fn collect(stream: ByteStream) -> Bytes {
        use futures_util::TryStreamExt;
        let out: Vec<Bytes> = stream.try_collect().await.unwrap();
        out.concat().into()
    }

    /// Script-like text that compresses as a bundle does: words from a small
    /// vocabulary in a seeded, varied order.
    fn script_like(len: usize) -> Bytes {
        let words = [
            "function",
            "return",
            "var",
            "const",
            "this.",
            "props",
            "=>",
            "(e)",
            "{",
            "}",
            "null",
            "value",
            "experiment",
            "run",
            "metric",
            ";",
            ",",
            "\"/#/",
            "0x1f",
        ];
        let (mut out, mut x) = (String::new(), 0x2545_f491_u32);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            out.push_str(words[x as usize % words.len()]);
            out.push_str(&(x % 97).to_string());
        }
        out.into()
    }

    #[tokio::test]
    async fn round_trips_each_coding_at_each_effort() {
        let text: Bytes = "hello, flowgate! ".repeat(10_000).into();
        for coding in Coding::PREFERENCE {
            for effort in [Effort::Streaming, Effort::Kept] {
                let round = coding.decode(coding.encode(stream_of(&text), effort));
                assert_eq!(collect(round).await, text, "{coding:?} {effort:?}");
            }
        }
    }

    #[tokio::test]
    async fn what_is_kept_is_smaller() {
        let text = script_like(300_000);
        for coding in Coding::PREFERENCE {
            let streaming = collect(coding.encode(stream_of(&text), Effort::Streaming)).await;
            let kept = collect(coding.encode(stream_of(&text), Effort::Kept)).await;
            assert!(
                kept.len() < streaming.len(),
                "{coding:?}: kept {} bytes, streaming {}",
                kept.len(),
                streaming.len()
            );
        }
    }
}
