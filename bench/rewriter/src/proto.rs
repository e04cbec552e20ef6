//! A prototype of the adapter's HTML rewriter with the changes suggested by the
//! profile (bench/README.md), to measure what they are worth before anyone
//! touches the adapter. Same rules as `adapter::rewrite::html::HtmlRewriter`
//! (the benchmark asserts the outputs are identical), two changes, each
//! switchable:
//!   - `Sink::ThreadLocal`: lol_html's output goes to a thread-local buffer that
//!     `feed` drains (the call is synchronous), instead of an `Arc<Mutex<Vec>>`
//!     locked once per token;
//!   - `Handlers::One`: one `*` element handler that looks the URL attributes up
//!     itself, instead of eleven `[attr]` selectors run by lol_html's selector VM.

use adapter::Prefix;
use adapter::rewrite::StreamRewriter;
use adapter::rewrite::css::rewrite_css_str;
use adapter::rewrite::html::refresh_url;
use bytes::Bytes;
use lol_html::html_content::ContentType;
use lol_html::send::{HtmlRewriter as LolRewriter, Settings};
use lol_html::{ElementContentHandlers, Selector};
use std::borrow::Cow;
use std::cell::RefCell;
use std::io;
use std::sync::{Arc, LazyLock, Mutex};

const URL_ATTRIBUTES: &[&str] = &[
    "href",
    "src",
    "action",
    "formaction",
    "poster",
    "data",
    "background",
];

/// Where lol_html's output goes.
#[derive(Clone, Copy, Debug)]
pub enum Sink {
    Mutex,
    ThreadLocal,
}

/// How elements are matched.
#[derive(Clone, Copy, Debug)]
pub enum Handlers {
    PerAttribute,
    One,
}

thread_local! {
    static OUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

struct Selectors {
    url_attributes: Vec<(&'static str, Selector)>,
    any: Selector,
    srcset: Selector,
    style_attribute: Selector,
    meta_refresh: Selector,
    style_element: Selector,
}

static SELECTORS: LazyLock<Selectors> = LazyLock::new(|| Selectors {
    url_attributes: URL_ATTRIBUTES
        .iter()
        .map(|a| (*a, format!("[{a}]").parse().unwrap()))
        .collect(),
    any: "*".parse().unwrap(),
    srcset: "[srcset]".parse().unwrap(),
    style_attribute: "[style]".parse().unwrap(),
    meta_refresh: "meta[http-equiv]".parse().unwrap(),
    style_element: "style".parse().unwrap(),
});

type BoxSink = Box<dyn FnMut(&[u8]) + Send>;

pub struct ProtoRewriter {
    inner: Option<LolRewriter<'static, BoxSink>>,
    sink: Sink,
    output: Arc<Mutex<Vec<u8>>>,
}

impl ProtoRewriter {
    pub fn new(prefix: Prefix, sink: Sink, handlers: Handlers) -> Self {
        let output = Arc::new(Mutex::new(Vec::new()));
        let boxed: BoxSink = match sink {
            Sink::Mutex => {
                let o = Arc::clone(&output);
                Box::new(move |b: &[u8]| o.lock().unwrap().extend_from_slice(b))
            }
            Sink::ThreadLocal => Box::new(|b: &[u8]| OUT.with(|o| o.borrow_mut().extend_from_slice(b))),
        };
        Self {
            inner: Some(LolRewriter::new(settings(prefix, handlers), boxed)),
            sink,
            output,
        }
    }

    fn take(&self, hint: usize) -> Bytes {
        match self.sink {
            Sink::Mutex => std::mem::take(&mut *self.output.lock().unwrap()).into(),
            Sink::ThreadLocal => OUT.with(|o| {
                let mut o = o.borrow_mut();
                let fresh = Vec::with_capacity(hint + hint / 8 + 64);
                Bytes::from(std::mem::replace(&mut *o, fresh))
            }),
        }
    }
}

impl StreamRewriter for ProtoRewriter {
    fn feed(&mut self, chunk: &[u8]) -> io::Result<Bytes> {
        if let Some(inner) = self.inner.as_mut() {
            inner.write(chunk).map_err(io::Error::other)?;
        }
        Ok(self.take(chunk.len()))
    }

    fn finish(&mut self) -> io::Result<Bytes> {
        if let Some(inner) = self.inner.take() {
            inner.end().map_err(io::Error::other)?;
        }
        Ok(self.take(0))
    }
}

type El<'a, 'b> = lol_html::send::Element<'a, 'b>;

fn rewrite_url_attribute(el: &mut El<'_, '_>, attribute: &str, prefix: &Prefix) -> lol_html::HandlerResult {
    if let Some(value) = el.get_attribute(attribute) {
        if let Some(new) = prefix.restore(value.trim()) {
            el.set_attribute(attribute, &new)?;
        }
    }
    Ok(())
}

fn rewrite_srcset_attribute(el: &mut El<'_, '_>, prefix: &Prefix) -> lol_html::HandlerResult {
    if let Some(value) = el.get_attribute("srcset") {
        let mut changed = false;
        let parts: Vec<String> = value
            .split(',')
            .map(|candidate| {
                let trimmed = candidate.trim_start();
                let lead = &candidate[..candidate.len() - trimmed.len()];
                let end = trimmed.find(char::is_whitespace).unwrap_or(trimmed.len());
                match prefix.restore(&trimmed[..end]) {
                    Some(url) => {
                        changed = true;
                        format!("{lead}{url}{}", &trimmed[end..])
                    }
                    None => candidate.to_owned(),
                }
            })
            .collect();
        if changed {
            el.set_attribute("srcset", &parts.join(","))?;
        }
    }
    Ok(())
}

fn rewrite_style_attribute(el: &mut El<'_, '_>, prefix: &Prefix) -> lol_html::HandlerResult {
    if let Some(value) = el.get_attribute("style") {
        if let Some(new) = rewrite_css_str(&value, prefix) {
            el.set_attribute("style", &new)?;
        }
    }
    Ok(())
}

fn settings(prefix: Prefix, handlers: Handlers) -> Settings<'static, 'static> {
    let s = &*SELECTORS;
    let mut list: Vec<(Cow<'static, Selector>, ElementContentHandlers<'static, _>)> = Vec::new();
    match handlers {
        Handlers::PerAttribute => {
            for (attribute, selector) in &s.url_attributes {
                let p = prefix.clone();
                list.push((
                    Cow::Borrowed(selector),
                    ElementContentHandlers::default()
                        .element(move |el: &mut El<'_, '_>| rewrite_url_attribute(el, attribute, &p)),
                ));
            }
            let p = prefix.clone();
            list.push((
                Cow::Borrowed(&s.srcset),
                ElementContentHandlers::default().element(move |el: &mut El<'_, '_>| rewrite_srcset_attribute(el, &p)),
            ));
            let p = prefix.clone();
            list.push((
                Cow::Borrowed(&s.style_attribute),
                ElementContentHandlers::default().element(move |el: &mut El<'_, '_>| rewrite_style_attribute(el, &p)),
            ));
        }
        Handlers::One => {
            let p = prefix.clone();
            list.push((
                Cow::Borrowed(&s.any),
                ElementContentHandlers::default().element(move |el: &mut El<'_, '_>| {
                    // The same order as the per-attribute selectors fire in.
                    for attribute in URL_ATTRIBUTES {
                        if el.has_attribute(attribute) {
                            rewrite_url_attribute(el, attribute, &p)?;
                        }
                    }
                    if el.has_attribute("srcset") {
                        rewrite_srcset_attribute(el, &p)?;
                    }
                    if el.has_attribute("style") {
                        rewrite_style_attribute(el, &p)?;
                    }
                    Ok(())
                }),
            ));
        }
    }
    let p = prefix.clone();
    list.push((
        Cow::Borrowed(&s.meta_refresh),
        ElementContentHandlers::default().element(move |el: &mut El<'_, '_>| {
            let is_refresh = el
                .get_attribute("http-equiv")
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("refresh"));
            if is_refresh {
                if let Some(new) = el.get_attribute("content").and_then(|c| rewrite_refresh(&c, &p)) {
                    el.set_attribute("content", &new)?;
                }
            }
            Ok(())
        }),
    ));
    let p = prefix;
    let mut style_text = String::new();
    list.push((
        Cow::Borrowed(&s.style_element),
        ElementContentHandlers::default().text(move |chunk: &mut lol_html::html_content::TextChunk<'_>| {
            style_text.push_str(chunk.as_str());
            if chunk.last_in_text_node() {
                let css = std::mem::take(&mut style_text);
                let new = rewrite_css_str(&css, &p).unwrap_or(css);
                chunk.replace(&new, ContentType::Html);
            } else {
                chunk.remove();
            }
            Ok(())
        }),
    ));
    list.into_iter()
        .fold(Settings::new_send(), |settings, (selector, handler)| {
            settings.append_element_content_handler((selector, handler))
        })
}

/// The URL of a refresh value with the prefix put back, as the adapter does.
fn rewrite_refresh(value: &str, prefix: &Prefix) -> Option<String> {
    let range = refresh_url(value)?;
    let url = prefix.restore(&value[range.clone()])?;
    Some(format!("{}{url}{}", &value[..range.start], &value[range.end..]))
}
