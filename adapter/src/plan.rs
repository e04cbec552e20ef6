//! The body plan: what a response body goes through on its way to the client
//! (pass through, or decode → rewrite → encode, each step optional). A pure
//! function of the response's facts and the configuration, so every case is a
//! row in a table test; `proxy` then only carries the plan out.

use crate::coding::{BodyCoding, Coding, body_coding};
use crate::route::RouteClass;
use http::StatusCode;
use http::header::{self, HeaderMap, HeaderValue};

/// Bodies smaller than this are not worth compressing.
pub const MIN_COMPRESS_BYTES: u64 = 1024;

/// Response media types the adapter treats differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MediaType {
    /// `text/html`, `application/xhtml+xml`.
    Html,
    /// `text/css`.
    Css,
    /// JavaScript.
    Script,
    /// Other text worth compressing (JSON, SVG, plain text, ...).
    OtherText,
    /// Server-sent events: never buffered, never compressed.
    EventStream,
    /// Anything else (images, archives, ...).
    Other,
}

impl MediaType {
    /// The media type a `Content-Type` names.
    pub fn of(content_type: Option<&HeaderValue>) -> Self {
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

    /// Worth compressing for a client that accepts it.
    pub fn is_compressible(self) -> bool {
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

/// The rewriter a body runs through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyRewrite {
    /// HTML (lol_html).
    Html,
    /// CSS `url(...)`.
    Css,
    /// The app bundle's hash-route literals.
    Script,
}

/// What is known about a response before its body is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseFacts {
    /// The route the request went to.
    pub class: RouteClass,
    /// The request was a `HEAD` (no body follows).
    pub is_head: bool,
    /// The response status.
    pub status: StatusCode,
    /// From `Content-Type`.
    pub media: MediaType,
    /// From `Content-Encoding`.
    pub coding: BodyCoding,
    /// From `Content-Length`.
    pub length: Option<u64>,
    /// `Cache-Control: no-transform`.
    pub no_transform: bool,
}

impl ResponseFacts {
    /// Reads the facts off a response head.
    pub fn of(class: RouteClass, is_head: bool, status: StatusCode, headers: &HeaderMap) -> Self {
        Self {
            class,
            is_head,
            status,
            media: MediaType::of(headers.get(header::CONTENT_TYPE)),
            coding: body_coding(headers.get(header::CONTENT_ENCODING)),
            length: headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok()),
            no_transform: no_transform(headers),
        }
    }
}

/// What the adapter is configured to do to bodies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodySettings {
    /// Put the prefix back into HTML, CSS and bundles.
    pub rewrite: bool,
    /// Compress text for clients that accept it.
    pub compress: bool,
}

/// What a response body goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyPlan {
    /// The upstream's frames, untouched (headers untouched too).
    Passthrough,
    /// Decoded (when coded), rewritten, encoded; length and validators change.
    Transform {
        /// The upstream's coding to undo.
        decode: Option<Coding>,
        /// The rewriter to run.
        rewrite: Option<BodyRewrite>,
        /// The coding to apply for the client.
        encode: Option<Coding>,
    },
}

/// Chooses the plan. `accept` is the best coding the client accepts.
pub fn plan(facts: &ResponseFacts, accept: Option<Coding>, settings: BodySettings) -> BodyPlan {
    let status = facts.status;
    let may_change = facts.class != RouteClass::Artifact
        && !facts.is_head
        && status.is_success()
        && status != StatusCode::NO_CONTENT
        && status != StatusCode::PARTIAL_CONTENT
        && !facts.no_transform;
    if !may_change {
        return BodyPlan::Passthrough;
    }
    let rewrite = match facts.media {
        _ if !settings.rewrite => None,
        MediaType::Html => Some(BodyRewrite::Html),
        MediaType::Css => Some(BodyRewrite::Css),
        MediaType::Script if facts.class == RouteClass::Static => Some(BodyRewrite::Script),
        _ => None,
    };
    let small = facts.length.is_some_and(|n| n < MIN_COMPRESS_BYTES);
    let compress = settings.compress && accept.is_some() && facts.media.is_compressible() && !small;
    match (facts.coding, rewrite) {
        // Stacked or unknown codings cannot be opened.
        (BodyCoding::Opaque, _) => BodyPlan::Passthrough,
        // A coded body is opened only to rewrite it; it is then coded as the
        // client prefers (or sent plain when it accepts no coding).
        (BodyCoding::Known(c), Some(r)) => BodyPlan::Transform {
            decode: Some(c),
            rewrite: Some(r),
            encode: accept,
        },
        (BodyCoding::Known(_), None) => BodyPlan::Passthrough,
        (BodyCoding::Identity, rewrite) if rewrite.is_some() || compress => BodyPlan::Transform {
            decode: None,
            rewrite,
            encode: accept.filter(|_| compress),
        },
        (BodyCoding::Identity, _) => BodyPlan::Passthrough,
    }
}

/// `Cache-Control: no-transform` forbids changing the body.
fn no_transform(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
        })
}

#[cfg(test)]
mod tests {
    use super::BodyPlan::{Passthrough, Transform};
    use super::MediaType::{Css, EventStream, Html, Other, OtherText, Script};
    use super::*;
    use crate::coding::Coding::{Brotli, Gzip, Zstd};
    use crate::route::RouteClass::{Api, Artifact, Static, Ui};

    fn facts(class: RouteClass, media: MediaType, coding: BodyCoding) -> ResponseFacts {
        ResponseFacts {
            class,
            is_head: false,
            status: StatusCode::OK,
            media,
            coding,
            length: None,
            no_transform: false,
        }
    }

    const ON: BodySettings = BodySettings {
        rewrite: true,
        compress: true,
    };

    fn transform(
        decode: Option<Coding>,
        rewrite: Option<BodyRewrite>,
        encode: Option<Coding>,
    ) -> BodyPlan {
        Transform {
            decode,
            rewrite,
            encode,
        }
    }

    #[test]
    fn plans_table() {
        use BodyCoding::{Identity, Known, Opaque};
        let html = Some(BodyRewrite::Html);
        let table: Vec<(&str, ResponseFacts, Option<Coding>, BodySettings, BodyPlan)> = vec![
            (
                "plain HTML, no coding accepted",
                facts(Ui, Html, Identity),
                None,
                ON,
                transform(None, html, None),
            ),
            (
                "plain HTML, zstd accepted",
                facts(Ui, Html, Identity),
                Some(Zstd),
                ON,
                transform(None, html, Some(Zstd)),
            ),
            (
                "gzip HTML re-encoded as the client prefers",
                facts(Ui, Html, Known(Gzip)),
                Some(Brotli),
                ON,
                transform(Some(Gzip), html, Some(Brotli)),
            ),
            (
                "gzip HTML sent plain to a client without codings",
                facts(Ui, Html, Known(Gzip)),
                None,
                ON,
                transform(Some(Gzip), html, None),
            ),
            (
                "CSS",
                facts(Static, Css, Identity),
                None,
                ON,
                transform(None, Some(BodyRewrite::Css), None),
            ),
            (
                "the app's bundle",
                facts(Static, Script, Identity),
                None,
                ON,
                transform(None, Some(BodyRewrite::Script), None),
            ),
            (
                "a script outside the bundles is only compressed",
                facts(Ui, Script, Identity),
                Some(Gzip),
                ON,
                transform(None, None, Some(Gzip)),
            ),
            (
                "JSON compressed",
                facts(Api, OtherText, Identity),
                Some(Gzip),
                ON,
                transform(None, None, Some(Gzip)),
            ),
            (
                "JSON, no coding accepted",
                facts(Api, OtherText, Identity),
                None,
                ON,
                Passthrough,
            ),
            (
                "coded JSON needs no rewrite",
                facts(Api, OtherText, Known(Gzip)),
                Some(Zstd),
                ON,
                Passthrough,
            ),
            (
                "stacked codings cannot be opened",
                facts(Ui, Html, Opaque),
                Some(Gzip),
                ON,
                Passthrough,
            ),
            (
                "events are never buffered",
                facts(Api, EventStream, Identity),
                Some(Gzip),
                ON,
                Passthrough,
            ),
            (
                "images pass",
                facts(Ui, Other, Identity),
                Some(Gzip),
                ON,
                Passthrough,
            ),
            (
                "an HTML artefact is a user's bytes",
                facts(Artifact, Html, Identity),
                Some(Gzip),
                ON,
                Passthrough,
            ),
            (
                "a gzip HTML artefact too",
                facts(Artifact, Html, Known(Gzip)),
                Some(Gzip),
                ON,
                Passthrough,
            ),
            (
                "rewrite off: HTML is only compressed",
                facts(Ui, Html, Identity),
                Some(Gzip),
                BodySettings {
                    rewrite: false,
                    compress: true,
                },
                transform(None, None, Some(Gzip)),
            ),
            (
                "rewrite and compress off",
                facts(Ui, Html, Identity),
                Some(Gzip),
                BodySettings {
                    rewrite: false,
                    compress: false,
                },
                Passthrough,
            ),
            (
                "compress off: rewrite only",
                facts(Ui, Html, Identity),
                Some(Gzip),
                BodySettings {
                    rewrite: true,
                    compress: false,
                },
                transform(None, html, None),
            ),
            (
                "HEAD",
                ResponseFacts {
                    is_head: true,
                    ..facts(Ui, Html, Identity)
                },
                Some(Gzip),
                ON,
                Passthrough,
            ),
            (
                "404 page",
                ResponseFacts {
                    status: StatusCode::NOT_FOUND,
                    ..facts(Ui, Html, Identity)
                },
                Some(Gzip),
                ON,
                Passthrough,
            ),
            (
                "206 range",
                ResponseFacts {
                    status: StatusCode::PARTIAL_CONTENT,
                    ..facts(Ui, Html, Identity)
                },
                None,
                ON,
                Passthrough,
            ),
            (
                "204",
                ResponseFacts {
                    status: StatusCode::NO_CONTENT,
                    ..facts(Ui, Html, Identity)
                },
                None,
                ON,
                Passthrough,
            ),
            (
                "no-transform",
                ResponseFacts {
                    no_transform: true,
                    ..facts(Ui, Html, Identity)
                },
                Some(Gzip),
                ON,
                Passthrough,
            ),
            (
                "tiny JSON not worth compressing",
                ResponseFacts {
                    length: Some(2),
                    ..facts(Api, OtherText, Identity)
                },
                Some(Gzip),
                ON,
                Passthrough,
            ),
            (
                "tiny HTML still rewritten, not compressed",
                ResponseFacts {
                    length: Some(20),
                    ..facts(Ui, Html, Identity)
                },
                Some(Gzip),
                ON,
                transform(None, html, None),
            ),
        ];
        for (name, facts, accept, settings, want) in table {
            assert_eq!(plan(&facts, accept, settings), want, "{name}");
        }
    }

    #[test]
    fn facts_from_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("Text/HTML; charset=utf-8"),
        );
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("1234"));
        h.append(header::CACHE_CONTROL, HeaderValue::from_static("max-age=0"));
        h.append(
            header::CACHE_CONTROL,
            HeaderValue::from_static("private, No-Transform"),
        );
        let f = ResponseFacts::of(Ui, false, StatusCode::OK, &h);
        assert_eq!(f.media, Html);
        assert_eq!(f.coding, BodyCoding::Known(Gzip));
        assert_eq!(f.length, Some(1234));
        assert!(f.no_transform);
        for (ct, want) in [
            ("application/vnd.api+json", OtherText),
            ("image/svg+xml", OtherText),
            ("text/event-stream", EventStream),
            ("application/x-javascript", Script),
            ("image/png", Other),
        ] {
            assert_eq!(
                MediaType::of(Some(&HeaderValue::from_static(ct))),
                want,
                "{ct}"
            );
        }
        assert_eq!(MediaType::of(None), Other);
    }
}
