//! HTML rewriting with lol_html: root-relative URLs in the attributes that hold
//! URLs, `srcset`, `<meta http-equiv=refresh>`, `iframe srcdoc`, `<style>`
//! blocks and inline styles get the prefix back while the document streams.
//!
//! Attribute values are decoded (character references) before deciding, as
//! the browser decodes them, and written back encoded. The document is read in
//! its declared charset (BOM, `Content-Type`, `<meta charset>`); without one,
//! as windows-1252, which maps every byte to a character and back, so bytes
//! the rewriter does not change come out as they went in. A charset that is
//! not ASCII-compatible (UTF-16) leaves the document untouched.
//!
//! Memory is bounded: lol_html gets [`MAX_PARSER_MEMORY`], each `<style>` block
//! streams through a [`CssRewriter`] with its own cap. Past a cap the rest of
//! the document passes through unrewritten and
//! [`StreamRewriter::overflowed`] says so.

use super::StreamRewriter;
use super::css::{CssRewriter, rewrite_css_str};
use crate::prefix::Prefix;
use aho_corasick::{AhoCorasick, MatchKind};
use bytes::Bytes;
use encoding_rs::{Encoding, UTF_8, WINDOWS_1252};
use lol_html::html_content::{BailOut, ContentType};
use lol_html::send::{HtmlRewriter as LolRewriter, Settings};
use lol_html::{AsciiCompatibleEncoding, ElementContentHandlers, MemorySettings, Selector};
use std::borrow::Cow;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

/// The most memory lol_html may use for one document (its buffer for a tag,
/// comment or doctype split across chunks, and the like).
pub const MAX_PARSER_MEMORY: usize = 1 << 20;

/// Attributes whose whole value is one URL.
const URL_ATTRIBUTES: &[&str] = &[
    "href",
    "src",
    "action",
    "formaction",
    "poster",
    "data",
    "background",
    "xlink:href",
];

/// What an attribute holds.
#[derive(Clone, Copy)]
enum AttributeKind {
    Url,
    Srcset,
    Style,
    Srcdoc,
}

fn attribute_kind(name: &str) -> Option<AttributeKind> {
    match name {
        "srcset" | "imagesrcset" => Some(AttributeKind::Srcset),
        "style" => Some(AttributeKind::Style),
        "srcdoc" => Some(AttributeKind::Srcdoc),
        _ if URL_ATTRIBUTES.contains(&name) => Some(AttributeKind::Url),
        _ => None,
    }
}

/// Selectors parsed once for the life of the process.
static SELECTORS: LazyLock<Selectors> = LazyLock::new(|| Selectors {
    any: "*".parse().expect("valid selector"),
    style_element: "style".parse().expect("valid selector"),
});

struct Selectors {
    any: Selector,
    style_element: Selector,
}

type Sink = Box<dyn FnMut(&[u8]) + Send>;

/// Most pages an app serves have nothing to rewrite (MLflow's index.html uses
/// relative URLs only). Up to this much of a body is held back while a cheap
/// scan looks for anything the rewriter would change; if nothing turns up, the
/// body goes out as it came and lol_html is never started.
const SNIFF_LIMIT: usize = 64 * 1024;

/// How much of the head a `<meta charset>` is looked for in (as browsers do).
const PRESCAN: usize = 1024;

/// Words after which a rewrite may follow (ASCII case-insensitive). Pattern
/// ids: below [`ESCAPES`], a rewrite may follow; from [`ESCAPES`], a CSS
/// escape (`\75 rl(`); [`STYLE`], a place where CSS is; [`STYLESHEET`],
/// none (it only keeps `stylesheet` from counting as `style`).
static TRIGGERS: LazyLock<AhoCorasick> = LazyLock::new(|| {
    let mut patterns: Vec<String> = ["url(", "@import", "srcset", "refresh", "srcdoc"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    patterns.extend("0123456789abcdef".chars().map(|c| format!("\\{c}")));
    patterns.push("style".into());
    patterns.push("stylesheet".into());
    AhoCorasick::builder()
        .ascii_case_insensitive(true)
        .match_kind(MatchKind::LeftmostLongest)
        .build(patterns)
        .expect("valid patterns")
});
const ESCAPES: usize = 5;
const STYLE: usize = ESCAPES + 16;
const STYLESHEET: usize = STYLE + 1;
/// The longest trigger, less one: how far back each scan starts.
const TRIGGER_OVERLAP: usize = 9;

/// What the sniffing scan has seen so far.
#[derive(Default)]
struct Sniff {
    escape: bool,
    style: bool,
}

impl Sniff {
    /// True when `doc[from..]` (with `doc[..from]` as context) holds something
    /// the rewriter might change: a `/`, `\` or `&` that starts an attribute
    /// value, a trigger word, or a CSS escape where CSS may be. False
    /// positives only cost the full rewrite.
    fn may_need_rewriting(&mut self, doc: &[u8], from: usize) -> bool {
        let start = from.saturating_sub(TRIGGER_OVERLAP);
        for m in TRIGGERS.find_iter(&doc[start..]) {
            match m.pattern().as_usize() {
                p if p < ESCAPES => return true,
                STYLE => self.style = true,
                STYLESHEET => {}
                _ => self.escape = true,
            }
        }
        if self.escape && self.style {
            return true;
        }
        // The last byte of the previous call is looked at again: what follows it
        // (`/>` ends a tag, it starts no URL) may only have arrived now.
        let from = from.saturating_sub(1);
        memchr::memchr3_iter(b'/', b'\\', b'&', &doc[from..]).any(|i| {
            let at = from + i;
            let Some(&next) = doc.get(at + 1) else {
                return false;
            };
            let before = doc[..at]
                .iter()
                .rev()
                .take(64)
                .find(|b| !b.is_ascii_whitespace());
            !(doc[at] == b'/' && next == b'>') && matches!(before, Some(b'"' | b'\'' | b'='))
        })
    }
}

/// The encoding to read a document in, or `None` to leave it untouched: the
/// byte order mark, else the `Content-Type` charset, else a `<meta>` charset
/// in the first 1024 bytes, else windows-1252.
fn document_encoding(content_type: Option<&str>, head: &[u8]) -> Option<AsciiCompatibleEncoding> {
    if let Some((encoding, _)) = Encoding::for_bom(head) {
        return AsciiCompatibleEncoding::new(encoding);
    }
    if let Some(encoding) = content_type
        .and_then(charset_parameter)
        .and_then(|label| Encoding::for_label(label.as_bytes()))
    {
        return AsciiCompatibleEncoding::new(encoding);
    }
    let encoding = match meta_charset(&head[..head.len().min(PRESCAN)]) {
        // The HTML standard reads a UTF-16 <meta> as UTF-8 (the bytes were
        // ASCII to be found at all), x-user-defined as windows-1252.
        Some(e) if e == encoding_rs::UTF_16BE || e == encoding_rs::UTF_16LE => UTF_8,
        Some(e) if e == encoding_rs::X_USER_DEFINED => WINDOWS_1252,
        Some(e) => e,
        None => WINDOWS_1252,
    };
    AsciiCompatibleEncoding::new(encoding)
}

/// `text/html; charset="x"` → `x`.
fn charset_parameter(content_type: &str) -> Option<&str> {
    content_type.split(';').skip(1).find_map(|param| {
        let (name, value) = param.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("charset")
            .then(|| value.trim().trim_matches(['"', '\'']))
    })
}

/// The charset of a `<meta charset=x>` or `<meta content="...; charset=x">`.
fn meta_charset(head: &[u8]) -> Option<&'static Encoding> {
    let lower = head.to_ascii_lowercase();
    let mut from = 0;
    while let Some(at) = memchr::memmem::find(&lower[from..], b"<meta") {
        let tag_start = from + at;
        let tag_end =
            memchr::memchr(b'>', &lower[tag_start..]).map_or(lower.len(), |e| tag_start + e);
        let tag = &lower[tag_start..tag_end];
        if let Some(c) = memchr::memmem::find(tag, b"charset") {
            let rest = &tag[c + 7..];
            let rest = rest.trim_ascii_start();
            if let Some(rest) = rest.strip_prefix(b"=") {
                let rest = rest.trim_ascii_start();
                let rest = rest
                    .strip_prefix(b"\"")
                    .or_else(|| rest.strip_prefix(b"'"))
                    .unwrap_or(rest);
                let end = rest
                    .iter()
                    .position(|b| {
                        matches!(b, b'"' | b'\'' | b';' | b'/') || b.is_ascii_whitespace()
                    })
                    .unwrap_or(rest.len());
                if let Some(e) = Encoding::for_label(&rest[..end]) {
                    return Some(e);
                }
            }
        }
        from = tag_end.max(tag_start + 1);
    }
    None
}

enum State {
    /// Nothing rewritable seen yet (or seen, with the head too short to know
    /// the charset); the body so far.
    Sniffing {
        held: Vec<u8>,
        triggered: bool,
        sniff: Sniff,
    },
    /// lol_html at work.
    Rewriting {
        inner: Box<LolRewriter<'static, Sink>>,
        output: Arc<Mutex<Vec<u8>>>,
    },
    /// The rest passes through as it is.
    Bypass,
    /// Ended.
    Done,
}

/// Streams one HTML document through lol_html.
pub struct HtmlRewriter {
    prefix: Prefix,
    content_type: Option<String>,
    state: State,
    overflowed: Arc<AtomicBool>,
}

impl HtmlRewriter {
    /// A rewriter for one document; `content_type` is the response's
    /// `Content-Type` (for its charset).
    pub fn new(prefix: Prefix, content_type: Option<&str>) -> Self {
        Self {
            prefix,
            content_type: content_type.map(str::to_owned),
            state: State::Sniffing {
                held: Vec::new(),
                triggered: false,
                sniff: Sniff::default(),
            },
            overflowed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Starts lol_html and feeds it `held`; returns its output so far.
    fn start_rewriting(&mut self, held: Vec<u8>) -> io::Result<Bytes> {
        let Some(encoding) = document_encoding(self.content_type.as_deref(), &held) else {
            self.state = State::Bypass;
            return Ok(held.into());
        };
        let output = Arc::new(Mutex::new(Vec::new()));
        let sink_output = Arc::clone(&output);
        let sink: Sink = Box::new(move |bytes: &[u8]| {
            sink_output
                .lock()
                .expect("sink lock")
                .extend_from_slice(bytes);
        });
        let settings = settings(self.prefix.clone(), encoding, Arc::clone(&self.overflowed));
        let inner = Box::new(LolRewriter::new(settings, sink));
        self.state = State::Rewriting { inner, output };
        self.write(&held)
    }

    /// Feeds lol_html; past its memory cap (or on any error of its own) it
    /// has flushed what it held as it was, and the rest bypasses it.
    fn write(&mut self, chunk: &[u8]) -> io::Result<Bytes> {
        let State::Rewriting { inner, output } = &mut self.state else {
            return Ok(Bytes::copy_from_slice(chunk));
        };
        let result = inner.write(chunk);
        let out = take(output);
        if let Err(e) = result {
            self.give_up(&e);
        }
        Ok(out)
    }

    fn give_up(&mut self, error: &lol_html::errors::RewritingError) {
        tracing::debug!(%error, "HTML rewriting stops; the rest passes through");
        self.overflowed.store(true, Ordering::Relaxed);
        self.state = State::Bypass;
    }
}

fn take(output: &Mutex<Vec<u8>>) -> Bytes {
    std::mem::take(&mut *output.lock().expect("sink lock")).into()
}

/// An attribute value as the browser reads it (character references decoded).
fn decode_attribute(raw: &str) -> Cow<'_, str> {
    if raw.contains('&') {
        htmlize::unescape_attribute(raw)
    } else {
        Cow::Borrowed(raw)
    }
}

/// A decoded value written back: `&` escaped (lol_html escapes `"`).
fn encode_attribute(value: &str) -> Cow<'_, str> {
    if value.contains('&') {
        Cow::Owned(value.replace('&', "&amp;"))
    } else {
        Cow::Borrowed(value)
    }
}

/// The new decoded value of an attribute, or `None` when it stays.
fn rewrite_attribute(kind: AttributeKind, value: &str, prefix: &Prefix) -> Option<String> {
    match kind {
        AttributeKind::Url => prefix.restore(value),
        AttributeKind::Srcset => rewrite_srcset(value, prefix),
        AttributeKind::Style => rewrite_css_str(value, prefix),
        AttributeKind::Srcdoc => {
            let mut inner = HtmlRewriter::new(prefix.clone(), Some("text/html; charset=utf-8"));
            let out = super::rewrite_all(&mut inner, value.as_bytes()).ok()?;
            let out = String::from_utf8(out).ok()?;
            (out != value).then_some(out)
        }
    }
}

/// The per-`<style>` CSS rewriter, shared with the bail-out handler.
type StyleCss = Arc<Mutex<Option<CssRewriter>>>;

fn settings(
    prefix: Prefix,
    encoding: AsciiCompatibleEncoding,
    overflowed: Arc<AtomicBool>,
) -> Settings<'static, 'static> {
    let s = &*SELECTORS;
    let p = prefix.clone();
    let attributes = ElementContentHandlers::default().element(
        move |el: &mut lol_html::send::Element<'_, '_>| {
            let mut changes: Vec<(String, String)> = Vec::new();
            for attribute in el.attributes() {
                let name = attribute.name();
                let Some(kind) = attribute_kind(&name) else {
                    continue;
                };
                let raw = attribute.value();
                if let Some(new) = rewrite_attribute(kind, &decode_attribute(&raw), &p) {
                    changes.push((name, encode_attribute(&new).into_owned()));
                }
            }
            if el.tag_name() == "meta"
                && el
                    .get_attribute("http-equiv")
                    .is_some_and(|v| decode_attribute(&v).trim().eq_ignore_ascii_case("refresh"))
                && let Some(content) = el.get_attribute("content")
            {
                let content = decode_attribute(&content);
                if let Some(range) = refresh_url(&content)
                    && let Some(url) = p.restore(&content[range.clone()])
                {
                    let new = format!("{}{url}{}", &content[..range.start], &content[range.end..]);
                    changes.push(("content".into(), encode_attribute(&new).into_owned()));
                }
            }
            for (name, value) in changes {
                el.set_attribute(&name, &value)?;
            }
            Ok(())
        },
    );
    // `<style>` text streams through a CSS rewriter, one per block.
    let style: StyleCss = Arc::new(Mutex::new(None));
    let text_style = Arc::clone(&style);
    let text_overflowed = Arc::clone(&overflowed);
    let styles = ElementContentHandlers::default().text(
        move |chunk: &mut lol_html::html_content::TextChunk<'_>| {
            let mut guard = text_style.lock().expect("style lock");
            let css = guard.get_or_insert_with(|| CssRewriter::new(prefix.clone()));
            let text = chunk.as_str();
            let mut out = Vec::with_capacity(text.len() + 16);
            css.push_all(text.as_bytes(), &mut out);
            if chunk.last_in_text_node() {
                css.end(&mut out);
                if StreamRewriter::overflowed(css) {
                    text_overflowed.store(true, Ordering::Relaxed);
                }
                *guard = None;
            }
            if out != text.as_bytes() {
                chunk.replace(&String::from_utf8_lossy(&out), ContentType::Html);
            }
            Ok(())
        },
    );
    Settings::new_send()
        .with_encoding(encoding)
        .with_memory_settings(
            MemorySettings::new()
                .with_max_allowed_memory_usage(MAX_PARSER_MEMORY)
                .with_graceful_bail_out_on_memory_limit_exceeded(true),
        )
        .with_graceful_bail_out_on_content_handler_error(true)
        .append_element_content_handler((Cow::Borrowed(&s.any), attributes))
        .append_element_content_handler((Cow::Borrowed(&s.style_element), styles))
        .append_bail_out_handler(
            move |_: &lol_html::errors::RewritingError, bail: &mut BailOut<'_>| {
                // CSS held back inside a `<style>` goes out before the rest.
                if let Some(mut css) = style.lock().expect("style lock").take() {
                    let held = css.abandon();
                    bail.append(&String::from_utf8_lossy(&held), ContentType::Html);
                }
            },
        )
}

/// Rewrites each candidate URL of a `srcset`, parsed as the HTML standard
/// parses it: a URL runs to the next blank (so `data:` URLs keep their
/// commas), trailing commas end a candidate, descriptors run to a comma
/// outside parentheses.
fn rewrite_srcset(srcset: &str, prefix: &Prefix) -> Option<String> {
    let b = srcset.as_bytes();
    let blank = |c: u8| matches!(c, b' ' | b'\t' | b'\n' | b'\x0c' | b'\r');
    let mut out = String::with_capacity(srcset.len() + 32);
    let mut copied = 0;
    let mut i = 0;
    loop {
        while i < b.len() && (blank(b[i]) || b[i] == b',') {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        let url_start = i;
        while i < b.len() && !blank(b[i]) {
            i += 1;
        }
        let mut url_end = i;
        if b[url_end - 1] == b',' {
            while url_end > url_start && b[url_end - 1] == b',' {
                url_end -= 1;
            }
        } else {
            let mut in_parens = false;
            while i < b.len() {
                match b[i] {
                    b'(' => in_parens = true,
                    b')' => in_parens = false,
                    b',' if !in_parens => {
                        i += 1;
                        break;
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        if let Some(url) = prefix.restore(&srcset[url_start..url_end]) {
            out.push_str(&srcset[copied..url_start]);
            out.push_str(&url);
            copied = url_end;
        }
    }
    if copied == 0 {
        return None;
    }
    out.push_str(&srcset[copied..]);
    Some(out)
}

/// Where the URL is in a refresh value (`5; url=/x`, `0;'/x'`), read as the
/// HTML standard's declarative refresh reads it; `None` when it has none.
pub fn refresh_url(value: &str) -> Option<Range<usize>> {
    let b = value.as_bytes();
    let blank = |c: u8| matches!(c, b' ' | b'\t' | b'\n' | b'\x0c' | b'\r');
    let skip_blanks = |mut i: usize| {
        while i < b.len() && blank(b[i]) {
            i += 1;
        }
        i
    };
    let mut i = skip_blanks(0);
    let digits = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 && b.get(i) != Some(&b'.') {
        return None;
    }
    i += b[i..]
        .iter()
        .take_while(|c| c.is_ascii_digit() || **c == b'.')
        .count();
    if i == b.len() || !(b[i] == b';' || b[i] == b',' || blank(b[i])) {
        return None;
    }
    i = skip_blanks(i);
    if i < b.len() && (b[i] == b';' || b[i] == b',') {
        i += 1;
    }
    i = skip_blanks(i);
    if i == b.len() {
        return None;
    }
    let whole = i..b.len();
    let mut j = i;
    if b[j].eq_ignore_ascii_case(&b'u') {
        j += 1;
        if !b.get(j).is_some_and(|c| c.eq_ignore_ascii_case(&b'r')) {
            return Some(whole);
        }
        j += 1;
        if !b.get(j).is_some_and(|c| c.eq_ignore_ascii_case(&b'l')) {
            return Some(whole);
        }
        j = skip_blanks(j + 1);
        if b.get(j) != Some(&b'=') {
            return Some(whole);
        }
        j = skip_blanks(j + 1);
    }
    match b.get(j) {
        Some(&q @ (b'"' | b'\'')) => {
            let start = j + 1;
            let end = memchr::memchr(q, &b[start..]).map_or(b.len(), |e| start + e);
            Some(start..end)
        }
        _ => Some(j..b.len()),
    }
}

impl StreamRewriter for HtmlRewriter {
    fn feed(&mut self, chunk: &[u8]) -> io::Result<Bytes> {
        match &mut self.state {
            State::Sniffing {
                held,
                triggered,
                sniff,
            } => {
                let from = held.len();
                held.extend_from_slice(chunk);
                if !*triggered {
                    *triggered = held.len() > SNIFF_LIMIT || sniff.may_need_rewriting(held, from);
                }
                if !*triggered || held.len() < PRESCAN {
                    return Ok(Bytes::new());
                }
                let held = std::mem::take(held);
                self.start_rewriting(held)
            }
            State::Rewriting { .. } => self.write(chunk),
            State::Bypass => Ok(Bytes::copy_from_slice(chunk)),
            State::Done => Ok(Bytes::new()),
        }
    }

    fn finish(&mut self) -> io::Result<Bytes> {
        let mut out = Vec::new();
        if let State::Sniffing {
            held, triggered, ..
        } = &mut self.state
        {
            let held = std::mem::take(held);
            if !*triggered {
                self.state = State::Done;
                return Ok(held.into());
            }
            out.extend_from_slice(&self.start_rewriting(held)?);
        }
        match std::mem::replace(&mut self.state, State::Done) {
            State::Rewriting { inner, output } => {
                let result = inner.end();
                out.extend_from_slice(&take(&output));
                if let Err(e) = result {
                    self.give_up(&e);
                    self.state = State::Done;
                }
            }
            State::Sniffing { .. } | State::Bypass | State::Done => {}
        }
        Ok(out.into())
    }

    fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Relaxed)
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
        Box::new(HtmlRewriter::new(
            prefix(),
            Some("text/html; charset=utf-8"),
        ))
    }

    fn rewrite(input: &str) -> String {
        String::from_utf8(assert_chunking_invariant(&make, input.as_bytes())).unwrap()
    }

    #[test]
    fn rewrites_every_url_place() {
        let input = r##"<!doctype html><html><head>
<base href="/">
<meta http-equiv="refresh" content="5; url=/next">
<meta http-equiv="Content-Type" content="text/html; charset=utf-8">
<link rel="stylesheet" href="/static-files/main.css">
<link rel="preload" as="image" imagesrcset="/p.png 1x, /q.png 2x">
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
<svg><use xlink:href="/sprite.svg#i"></use><image href="/i.svg"/></svg>
<iframe srcdoc="<a href=&quot;/in-frame&quot;>x</a>"></iframe>
</body></html>"##;
        let out = rewrite(input);
        for want in [
            r#"<base href="/k3x9q2a/">"#,
            r#"content="5; url=/k3x9q2a/next""#,
            r#"content="text/html; charset=utf-8""#,
            r#"href="/k3x9q2a/static-files/main.css""#,
            r#"imagesrcset="/k3x9q2a/p.png 1x, /k3x9q2a/q.png 2x""#,
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
            r#"xlink:href="/k3x9q2a/sprite.svg#i""#,
            r#"<image href="/k3x9q2a/i.svg" />"#,
            r#"srcdoc="<a href=&quot;/k3x9q2a/in-frame&quot;>x</a>""#,
        ] {
            assert!(out.contains(want), "missing {want:?} in\n{out}");
        }
    }

    #[test]
    fn attributes_are_read_as_the_browser_reads_them() {
        let table: &[(&str, &str)] = &[
            // Character references decoded before deciding.
            (r#"<a href="&#47;x">"#, r#"<a href="/k3x9q2a/x">"#),
            (r#"<a href="&sol;x">"#, r#"<a href="/k3x9q2a/x">"#),
            (
                r#"<a href="&#x2F;x?a=1&amp;b=2">"#,
                r#"<a href="/k3x9q2a/x?a=1&amp;b=2">"#,
            ),
            (
                r#"<p style="background:url(&quot;/i.png&quot;)">"#,
                r#"<p style="background:url(&quot;/k3x9q2a/i.png&quot;)">"#,
            ),
            (
                r#"<meta http-equiv="refresh" content="0;url=&#47;x">"#,
                r#"<meta http-equiv="refresh" content="0;url=/k3x9q2a/x">"#,
            ),
            (
                r#"<meta http-equiv="Refresh" content="0; '/x'">"#,
                r#"<meta http-equiv="Refresh" content="0; '/k3x9q2a/x'">"#,
            ),
            // Dot segments and backslashes as a URL parser counts them.
            (r#"<a href="/../x">"#, r#"<a href="/k3x9q2a/x">"#),
            (r#"<a href="/%2e%2e/x">"#, r#"<a href="/k3x9q2a/x">"#),
            (
                r#"<a href="/k3x9q2a/../x">"#,
                r#"<a href="/k3x9q2a/k3x9q2a/../x">"#,
            ),
            (r#"<a href="\x">"#, r#"<a href="/k3x9q2a\x">"#),
            (
                r#"<a href="/\evil.example/">"#,
                r#"<a href="/\evil.example/">"#,
            ),
            (
                r#"<a href="&#47;&#47;evil.example/">"#,
                r#"<a href="&#47;&#47;evil.example/">"#,
            ),
            // srcset as the standard parses it: data: URLs keep their commas.
            (
                r#"<img srcset="data:image/png;base64,/9j/4AA= 1x, /b.png 2x">"#,
                r#"<img srcset="data:image/png;base64,/9j/4AA= 1x, /k3x9q2a/b.png 2x">"#,
            ),
            (
                r#"<img srcset="/a.png,, /b.png (x, y), /c.png">"#,
                r#"<img srcset="/k3x9q2a/a.png,, /k3x9q2a/b.png (x, y), /k3x9q2a/c.png">"#,
            ),
            // A <style> cut off by the end of the document still counts.
            ("<style>a{b:url(/x", "<style>a{b:url(/k3x9q2a/x"),
            // CSS in <style>: comments and strings are not URLs, escapes are.
            (
                "<style>/* url(/x) */ a{content:'url(/y)'} b{c:\\75 rl(/z)} @import/**/\"/w\";</style>",
                "<style>/* url(/x) */ a{content:'url(/y)'} b{c:\\75 rl(/k3x9q2a/z)} @import/**/\"/k3x9q2a/w\";</style>",
            ),
        ];
        for (input, want) in table {
            assert_eq!(rewrite(input), *want, "input {input}");
        }
    }

    #[test]
    fn pages_with_nothing_to_rewrite_pass_through_untouched() {
        // Like MLflow's index.html: relative URLs only.
        let page = r#"<!doctype html><html lang="en"><head><meta charset="utf-8"/><link rel="icon" href="static-files/favicon.ico"/><link href="static-files/main.css" rel="stylesheet"><script>var x="a/b";i.p="static-files/";var r="s+"</script></head><body><div id="root"></div><script src="static-files/static/js/main.js"></script></body></html>"#;
        let out = rewrite(page);
        assert_eq!(out, page);
        assert!(!Sniff::default().may_need_rewriting(page.as_bytes(), 0));
        for trigger in [
            r#"<a href="/x">"#,
            "<a href='/x'>",
            "<a href=/x>",
            r#"<a href = " /x">"#,
            r#"<a href="\x">"#,
            r#"<a href="&#47;x">"#,
            "<p style='background:URL(a.png)'>",
            r#"<p style="b:\75 rl(a.png)">"#,
            r#"<img srcset="a.png 1x, /b.png 2x">"#,
            r#"<iframe srcdoc="x">"#,
            r#"<meta http-equiv="Refresh" content="0;url=x">"#,
        ] {
            assert!(
                Sniff::default().may_need_rewriting(trigger.as_bytes(), 0),
                "{trigger}"
            );
        }
    }

    #[test]
    fn non_utf8_pages_keep_their_bytes() {
        let mut page = b"<html><head><meta charset=\"windows-1252\"><style>p{background:url(/caf\xe9.png)} /* \xe9 */</style></head><body><p title=\"caf\xe9\">caf\xe9 \x81</p><a href=\"/caf\xe9?q=\xe9\">x</a>".to_vec();
        page.extend(std::iter::repeat_n(b'.', 2000));
        let expected = {
            let mut e = page.clone();
            let mut insert = |needle: &[u8]| {
                let at = memchr::memmem::find(&e, needle).unwrap() + needle.len() - 1;
                e.splice(at..at, b"/k3x9q2a".iter().copied());
            };
            insert(b"url(/");
            insert(b"href=\"/");
            e
        };
        let make_1252 = || -> Box<dyn StreamRewriter> {
            Box::new(HtmlRewriter::new(prefix(), Some("text/html")))
        };
        assert_eq!(assert_chunking_invariant(&make_1252, &page), expected);
        // Undeclared: read as windows-1252, every byte kept.
        let page2 = [
            &b"<p>\xff\xfe\x80</p><a href=\"/x\">"[..],
            &[b' '; 1100][..],
        ]
        .concat();
        let make_plain =
            || -> Box<dyn StreamRewriter> { Box::new(HtmlRewriter::new(prefix(), None)) };
        let out = assert_chunking_invariant(&make_plain, &page2);
        assert_eq!(
            out,
            [
                &b"<p>\xff\xfe\x80</p><a href=\"/k3x9q2a/x\">"[..],
                &[b' '; 1100][..]
            ]
            .concat()
        );
        // UTF-16 cannot be rewritten byte-safely: untouched.
        let utf16 = [
            &b"\xff\xfe"[..],
            &"<a href=\"/x\">"
                .encode_utf16()
                .flat_map(|u| u.to_le_bytes())
                .collect::<Vec<_>>(),
        ]
        .concat();
        let make_16 = || -> Box<dyn StreamRewriter> {
            Box::new(HtmlRewriter::new(prefix(), Some("text/html")))
        };
        assert_eq!(assert_chunking_invariant(&make_16, &utf16), utf16);
    }

    #[test]
    fn charsets_are_found_where_browsers_look() {
        let find = |ct: Option<&str>, head: &[u8]| {
            document_encoding(ct, head).map(|e| {
                let e: &'static Encoding = e.into();
                e.name()
            })
        };
        assert_eq!(find(Some("text/html; charset=UTF-8"), b""), Some("UTF-8"));
        assert_eq!(
            find(Some("text/html; charset=\"latin1\""), b""),
            Some("windows-1252")
        );
        assert_eq!(find(None, b"<meta charset='shift_jis'>"), Some("Shift_JIS"));
        assert_eq!(
            find(
                None,
                b"<META HTTP-EQUIV=Content-Type CONTENT=\"text/html; charset=koi8-r\">"
            ),
            Some("KOI8-R")
        );
        assert_eq!(find(None, b"<p>nothing declared</p>"), Some("windows-1252"));
        assert_eq!(
            find(Some("text/html; charset=utf-8"), b"\xef\xbb\xbf<p>"),
            Some("UTF-8")
        );
        assert_eq!(find(Some("text/html; charset=utf-16le"), b"<p>"), None);
        assert_eq!(find(None, b"\xfe\xff\x00<"), None);
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
        let out = rewrite(&doc);
        assert_eq!(out.matches("href=\"/k3x9q2a/run/").count(), 5000);
        assert_eq!(out.matches("src=\"img/").count(), 5000);
    }

    #[test]
    fn past_the_parser_cap_the_rest_passes_through() {
        let head = "<a href=\"/x\">a</a>";
        let giant = format!("<div title=\"{}\">", "A".repeat(MAX_PARSER_MEMORY * 2));
        let tail = "<a href=\"/y\">b</a>";
        let input = format!("{head}{giant}{tail}");
        let mut r = HtmlRewriter::new(prefix(), Some("text/html; charset=utf-8"));
        let mut out = Vec::new();
        for chunk in input.as_bytes().chunks(16 * 1024) {
            out.extend_from_slice(&r.feed(chunk).unwrap());
        }
        out.extend_from_slice(&r.finish().unwrap());
        assert!(r.overflowed());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("<a href=\"/k3x9q2a/x\">a</a>{giant}{tail}")
        );
    }

    #[test]
    fn a_style_block_past_the_css_cap_passes_through() {
        let long = format!(
            "<style>a{{b:url(/{})}} c{{d:url(/z)}}</style>",
            "x".repeat(crate::rewrite::css::MAX_HELD + 1)
        );
        let input = format!("{long}<a href=\"/y\">");
        let mut r = HtmlRewriter::new(prefix(), Some("text/html; charset=utf-8"));
        let out = crate::rewrite::rewrite_all(&mut r, input.as_bytes()).unwrap();
        assert!(r.overflowed());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("{long}<a href=\"/k3x9q2a/y\">")
        );
    }
}
