//! HTML rewriting with lol_html: root-relative URLs in the attributes that hold
//! URLs, `<meta http-equiv=refresh>`, `<style>` blocks and inline styles get the
//! prefix back while the document streams.

use super::StreamRewriter;
use super::css::rewrite_css_str;
use crate::prefix::Prefix;
use aho_corasick::AhoCorasick;
use bytes::Bytes;
use lol_html::html_content::ContentType;
use lol_html::send::{HtmlRewriter as LolRewriter, Settings};
use lol_html::{ElementContentHandlers, Selector};
use std::borrow::Cow;
use std::io;
use std::sync::{Arc, LazyLock, Mutex};

/// Attributes whose whole value is one URL.
const URL_ATTRIBUTES: &[&str] = &[
    "href",
    "src",
    "action",
    "formaction",
    "poster",
    "data",
    "background",
];

/// Selectors parsed once for the life of the process.
static SELECTORS: LazyLock<Selectors> = LazyLock::new(|| Selectors {
    url_attributes: URL_ATTRIBUTES
        .iter()
        .map(|a| (*a, format!("[{a}]").parse().expect("valid selector")))
        .collect(),
    srcset: "[srcset]".parse().expect("valid selector"),
    style_attribute: "[style]".parse().expect("valid selector"),
    meta_refresh: "meta[http-equiv]".parse().expect("valid selector"),
    style_element: "style".parse().expect("valid selector"),
});

struct Selectors {
    url_attributes: Vec<(&'static str, Selector)>,
    srcset: Selector,
    style_attribute: Selector,
    meta_refresh: Selector,
    style_element: Selector,
}

type Sink = Box<dyn FnMut(&[u8]) + Send>;

/// Most pages an app serves have nothing to rewrite (MLflow's index.html uses
/// relative URLs only). Up to this much of a body is held back while a cheap
/// scan looks for anything the rewriter would change; if nothing turns up, the
/// body goes out as it came and lol_html is never started.
const SNIFF_LIMIT: usize = 64 * 1024;

/// Words after which a rewrite may follow (ASCII case-insensitive).
static TRIGGERS: LazyLock<AhoCorasick> = LazyLock::new(|| {
    AhoCorasick::builder()
        .ascii_case_insensitive(true)
        .build(["url(", "@import", "srcset", "refresh"])
        .expect("valid patterns")
});

/// True when `doc[from..]` (with `doc[..from]` as context) holds something
/// the rewriter might change: a `/` that starts an attribute value, or one of
/// [`TRIGGERS`]. False positives only cost the full rewrite.
fn may_need_rewriting(doc: &[u8], from: usize) -> bool {
    let start = from.saturating_sub(8);
    if TRIGGERS.is_match(&doc[start..]) {
        return true;
    }
    // The last byte of the previous call is looked at again: what follows it
    // (`/>` ends a tag, it starts no URL) may only have arrived now.
    let from = from.saturating_sub(1);
    memchr::memchr_iter(b'/', &doc[from..]).any(|i| {
        let at = from + i;
        let Some(&next) = doc.get(at + 1) else {
            return false;
        };
        let before = doc[..at]
            .iter()
            .rev()
            .take(64)
            .find(|b| !b.is_ascii_whitespace());
        next != b'>' && matches!(before, Some(b'"' | b'\'' | b'='))
    })
}

enum State {
    /// Nothing rewritable seen yet; the body so far.
    Sniffing(Vec<u8>),
    /// lol_html at work.
    Rewriting {
        inner: LolRewriter<'static, Sink>,
        output: Arc<Mutex<Vec<u8>>>,
    },
    /// Ended.
    Done,
}

/// Streams one HTML document through lol_html.
pub struct HtmlRewriter {
    prefix: Prefix,
    state: State,
}

impl HtmlRewriter {
    /// A rewriter for one document.
    pub fn new(prefix: Prefix) -> Self {
        Self {
            prefix,
            state: State::Sniffing(Vec::new()),
        }
    }

    /// Starts lol_html and feeds it `held`; returns its output so far.
    fn start_rewriting(&mut self, held: &[u8]) -> io::Result<Bytes> {
        let output = Arc::new(Mutex::new(Vec::new()));
        let sink_output = Arc::clone(&output);
        let sink: Sink = Box::new(move |bytes: &[u8]| {
            sink_output
                .lock()
                .expect("sink lock")
                .extend_from_slice(bytes);
        });
        let mut inner = LolRewriter::new(settings(self.prefix.clone()), sink);
        inner.write(held).map_err(io::Error::other)?;
        let out = take(&output);
        self.state = State::Rewriting { inner, output };
        Ok(out)
    }
}

fn take(output: &Mutex<Vec<u8>>) -> Bytes {
    std::mem::take(&mut *output.lock().expect("sink lock")).into()
}

fn settings(prefix: Prefix) -> Settings<'static, 'static> {
    let s = &*SELECTORS;
    let mut handlers: Vec<(Cow<'static, Selector>, ElementContentHandlers<'static, _>)> =
        Vec::new();
    for (attribute, selector) in &s.url_attributes {
        let prefix = prefix.clone();
        handlers.push((
            Cow::Borrowed(selector),
            ElementContentHandlers::default().element(
                move |el: &mut lol_html::send::Element<'_, '_>| {
                    if let Some(value) = el.get_attribute(attribute)
                        && let Some(new) = prefix.restore(value.trim(), None)
                    {
                        el.set_attribute(attribute, &new)?;
                    }
                    Ok(())
                },
            ),
        ));
    }
    let p = prefix.clone();
    handlers.push((
        Cow::Borrowed(&s.srcset),
        ElementContentHandlers::default().element(
            move |el: &mut lol_html::send::Element<'_, '_>| {
                if let Some(value) = el.get_attribute("srcset")
                    && let Some(new) = rewrite_srcset(&value, &p)
                {
                    el.set_attribute("srcset", &new)?;
                }
                Ok(())
            },
        ),
    ));
    let p = prefix.clone();
    handlers.push((
        Cow::Borrowed(&s.style_attribute),
        ElementContentHandlers::default().element(
            move |el: &mut lol_html::send::Element<'_, '_>| {
                if let Some(value) = el.get_attribute("style")
                    && let Some(new) = rewrite_css_str(&value, &p)
                {
                    el.set_attribute("style", &new)?;
                }
                Ok(())
            },
        ),
    ));
    let p = prefix.clone();
    handlers.push((
        Cow::Borrowed(&s.meta_refresh),
        ElementContentHandlers::default().element(
            move |el: &mut lol_html::send::Element<'_, '_>| {
                let is_refresh = el
                    .get_attribute("http-equiv")
                    .is_some_and(|v| v.trim().eq_ignore_ascii_case("refresh"));
                if is_refresh
                    && let Some(new) = el
                        .get_attribute("content")
                        .and_then(|c| rewrite_refresh(&c, &p, None))
                {
                    el.set_attribute("content", &new)?;
                }
                Ok(())
            },
        ),
    ));
    // `<style>` text arrives in pieces; hold them until the block ends (blocks
    // are small), then rewrite it whole.
    let p = prefix;
    let mut style_text = String::new();
    handlers.push((
        Cow::Borrowed(&s.style_element),
        ElementContentHandlers::default().text(
            move |chunk: &mut lol_html::html_content::TextChunk<'_>| {
                style_text.push_str(chunk.as_str());
                if chunk.last_in_text_node() {
                    let css = std::mem::take(&mut style_text);
                    let new = rewrite_css_str(&css, &p).unwrap_or(css);
                    chunk.replace(&new, ContentType::Html);
                } else {
                    chunk.remove();
                }
                Ok(())
            },
        ),
    ));
    handlers
        .into_iter()
        .fold(Settings::new_send(), |settings, (selector, handler)| {
            settings.append_element_content_handler((selector, handler))
        })
}

/// Rewrites each candidate URL of a `srcset` (`url [descriptor], ...`).
fn rewrite_srcset(srcset: &str, prefix: &Prefix) -> Option<String> {
    let mut changed = false;
    let candidates: Vec<String> = srcset
        .split(',')
        .map(|candidate| {
            let trimmed = candidate.trim_start();
            let lead = &candidate[..candidate.len() - trimmed.len()];
            let url_end = trimmed.find(char::is_whitespace).unwrap_or(trimmed.len());
            match prefix.restore(&trimmed[..url_end], None) {
                Some(url) => {
                    changed = true;
                    format!("{lead}{url}{}", &trimmed[url_end..])
                }
                None => candidate.to_owned(),
            }
        })
        .collect();
    changed.then(|| candidates.join(","))
}

/// Rewrites the URL in a refresh value (`5; url=/x`), in a header or a meta tag.
pub fn rewrite_refresh(
    value: &str,
    prefix: &Prefix,
    upstream_origin: Option<&str>,
) -> Option<String> {
    let lower = value.to_ascii_lowercase();
    let at = lower.find("url")?;
    let after_key = value[at + 3..].trim_start();
    let after_eq = after_key.strip_prefix('=')?.trim_start();
    let (quote, url) = match after_eq.chars().next() {
        Some(q @ ('"' | '\'')) => (Some(q), &after_eq[1..]),
        _ => (None, after_eq),
    };
    let url_end = quote
        .and_then(|q| url.find(q))
        .unwrap_or(url.trim_end().len());
    let new = prefix.restore(&url[..url_end], upstream_origin)?;
    let url_start = value.len() - url.len();
    Some(format!("{}{new}{}", &value[..url_start], &url[url_end..]))
}

impl StreamRewriter for HtmlRewriter {
    fn feed(&mut self, chunk: &[u8]) -> io::Result<Bytes> {
        match &mut self.state {
            State::Sniffing(held) => {
                let from = held.len();
                held.extend_from_slice(chunk);
                if held.len() <= SNIFF_LIMIT && !may_need_rewriting(held, from) {
                    return Ok(Bytes::new());
                }
                let held = std::mem::take(held);
                self.start_rewriting(&held)
            }
            State::Rewriting { inner, output } => {
                inner.write(chunk).map_err(io::Error::other)?;
                Ok(take(output))
            }
            State::Done => Ok(Bytes::new()),
        }
    }

    fn finish(&mut self) -> io::Result<Bytes> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Sniffing(held) => Ok(held.into()),
            State::Rewriting { inner, output } => {
                inner.end().map_err(io::Error::other)?;
                Ok(take(&output))
            }
            State::Done => Ok(Bytes::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::testing::assert_chunking_invariant;

    fn prefix() -> Prefix {
        Prefix::new("/k3x9q2a").unwrap()
    }

    fn make() -> Box<dyn StreamRewriter> {
        Box::new(HtmlRewriter::new(prefix()))
    }

    #[test]
    fn rewrites_every_url_place() {
        let input = r##"<!doctype html><html><head>
<base href="/">
<meta http-equiv="refresh" content="5; url=/next">
<meta http-equiv="Content-Type" content="text/html; charset=utf-8">
<link rel="stylesheet" href="/static-files/main.css">
<script src="/static-files/app.js"></script>
<script>var keep = "/not-an-attribute";</script>
<style>body{background:url(/img/bg.png)} .x{background:url(//cdn.example/x.png)}</style>
</head><body style="background-image:url('/img/body.png')">
<a href="/#/experiments/1">exp</a>
<a href="//cdn.example.org/lib.js">cdn</a>
<a href="https://other.example/x">other</a>
<a href="relative/link">rel</a>
<a href="#top">frag</a>
<a href="/k3x9q2a/already">already</a>
<form action="/ajax-api/2.0/submit"><button formaction="/alt">go</button></form>
<video poster="/poster.png"><source src="/v.mp4"></video>
<img srcset="/a.png 1x, /b.png 2x, https://other.example/c.png 3x" src="/a.png">
</body></html>"##;
        let out = String::from_utf8(assert_chunking_invariant(&make, input.as_bytes())).unwrap();
        for want in [
            r#"<base href="/k3x9q2a/">"#,
            r#"content="5; url=/k3x9q2a/next""#,
            r#"content="text/html; charset=utf-8""#,
            r#"href="/k3x9q2a/static-files/main.css""#,
            r#"src="/k3x9q2a/static-files/app.js""#,
            r#"var keep = "/not-an-attribute";"#,
            "body{background:url(/k3x9q2a/img/bg.png)} .x{background:url(//cdn.example/x.png)}",
            r#"style="background-image:url('/k3x9q2a/img/body.png')""#,
            r#"href="/k3x9q2a/#/experiments/1""#,
            r#"href="//cdn.example.org/lib.js""#,
            r#"href="https://other.example/x""#,
            r#"href="relative/link""#,
            r##"href="#top""##,
            r#"href="/k3x9q2a/already""#,
            r#"action="/k3x9q2a/ajax-api/2.0/submit""#,
            r#"formaction="/k3x9q2a/alt""#,
            r#"poster="/k3x9q2a/poster.png""#,
            r#"src="/k3x9q2a/v.mp4""#,
            r#"srcset="/k3x9q2a/a.png 1x, /k3x9q2a/b.png 2x, https://other.example/c.png 3x""#,
        ] {
            assert!(out.contains(want), "missing {want:?} in\n{out}");
        }
    }

    #[test]
    fn pages_with_nothing_to_rewrite_pass_through_untouched() {
        // Like MLflow's index.html: relative URLs only.
        let page = r#"<!doctype html><html lang="en"><head><meta charset="utf-8"/><link rel="icon" href="static-files/favicon.ico"/><script>var x="a/b";i.p="static-files/"</script></head><body><div id="root"></div><script src="static-files/static/js/main.js"></script></body></html>"#;
        let out = assert_chunking_invariant(&make, page.as_bytes());
        assert_eq!(out, page.as_bytes());
        assert!(!may_need_rewriting(page.as_bytes(), 0));
        for trigger in [
            r#"<a href="/x">"#,
            "<a href='/x'>",
            "<a href=/x>",
            r#"<a href = " /x">"#,
            "<p style='background:URL(a.png)'>",
            r#"<img srcset="a.png 1x, /b.png 2x">"#,
            r#"<meta http-equiv="Refresh" content="0;url=x">"#,
        ] {
            assert!(may_need_rewriting(trigger.as_bytes(), 0), "{trigger}");
        }
    }

    #[test]
    fn refresh_values() {
        let p = prefix();
        assert_eq!(
            rewrite_refresh("0;url=/x", &p, None).as_deref(),
            Some("0;url=/k3x9q2a/x")
        );
        assert_eq!(
            rewrite_refresh("3; URL='/x?a=1'", &p, None).as_deref(),
            Some("3; URL='/k3x9q2a/x?a=1'")
        );
        assert_eq!(
            rewrite_refresh(
                "1; url=http://127.0.0.1:5000/y",
                &p,
                Some("http://127.0.0.1:5000")
            )
            .as_deref(),
            Some("1; url=/k3x9q2a/y")
        );
        assert_eq!(rewrite_refresh("5", &p, None), None);
        assert_eq!(
            rewrite_refresh("5; url=https://other.example/", &p, None),
            None
        );
    }

    #[test]
    fn large_document_streams() {
        let mut doc = String::from("<html><body>");
        for i in 0..5000 {
            doc.push_str(&format!(
                "<p><a href=\"/run/{i}\">run {i}</a> <img src=\"img/{i}.png\"></p>\n"
            ));
        }
        doc.push_str("</body></html>");
        let out = String::from_utf8(assert_chunking_invariant(&make, doc.as_bytes())).unwrap();
        assert_eq!(out.matches("href=\"/k3x9q2a/run/").count(), 5000);
        assert_eq!(out.matches("src=\"img/").count(), 5000);
    }
}
