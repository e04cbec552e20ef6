//! CSS rewriting: root-relative `url(...)` and `@import "..."` references get
//! the prefix. Used for CSS files, `<style>` blocks and inline `style` attributes.

use super::StreamRewriter;
use crate::prefix::Prefix;
use bytes::Bytes;
use std::io;

/// Rewrites a complete CSS text; `None` when nothing changes.
pub fn rewrite_css_str(css: &str, prefix: &Prefix) -> Option<String> {
    if !css.contains("url(") && !css.contains("URL(") && !css.contains("@import") {
        return None;
    }
    let mut out = Vec::with_capacity(css.len() + 64);
    rewrite_into(css.as_bytes(), prefix, &mut out, true);
    // Only ASCII is inserted, at ASCII boundaries, so UTF-8 stays valid.
    let out = String::from_utf8(out).expect("prefix insertion keeps UTF-8 valid");
    (out != css).then_some(out)
}

/// Rewrites `input` into `out` and returns how many bytes were consumed. Unless
/// `at_end`, stops before a reference that cannot be decided without more input.
fn rewrite_into(input: &[u8], prefix: &Prefix, out: &mut Vec<u8>, at_end: bool) -> usize {
    let prefix = prefix.as_str().as_bytes();
    let mut copied = 0;
    let mut from = 0;
    while let Some(offset) = memchr::memchr3(b'u', b'U', b'@', &input[from..]) {
        let pos = from + offset;
        from = pos + 1;
        let rest = &input[pos..];
        let value_start = if starts_with_ignore_case(rest, b"url(") {
            skip_quote(input, skip_space(input, pos + 4))
        } else if starts_with_ignore_case(rest, b"@import") {
            let at = skip_space(input, pos + 7);
            match input.get(at) {
                Some(b'"' | b'\'') => at + 1,
                None if !at_end => {
                    out.extend_from_slice(&input[copied..pos]);
                    return pos;
                }
                _ => continue,
            }
        } else {
            if !at_end && rest.len() < 7 {
                // Could be the start of `url(` or `@import` split by the chunking.
                out.extend_from_slice(&input[copied..pos]);
                return pos;
            }
            continue;
        };
        // Deciding needs the value's first bytes: as many as the prefix, plus one.
        if !at_end && input.len() < value_start + prefix.len() + 1 {
            out.extend_from_slice(&input[copied..pos]);
            return pos;
        }
        if needs_prefix(&input[value_start..], prefix) {
            out.extend_from_slice(&input[copied..value_start]);
            out.extend_from_slice(prefix);
            copied = value_start;
        }
        from = value_start;
    }
    // No candidate left; hold back a short tail that could begin one.
    let keep_from = if at_end {
        input.len()
    } else {
        input.len().saturating_sub(6).max(copied)
    };
    let keep_from = keep_from.max(copied);
    out.extend_from_slice(&input[copied..keep_from]);
    keep_from
}

fn needs_prefix(value: &[u8], prefix: &[u8]) -> bool {
    if value.first() != Some(&b'/') || matches!(value.get(1), Some(b'/' | b'\\')) {
        return false;
    }
    let already = value.starts_with(prefix)
        && matches!(
            value.get(prefix.len()),
            None | Some(b'/' | b'?' | b'#' | b'"' | b'\'' | b')' | b' ' | b'\t' | b'\n')
        );
    !already
}

fn skip_space(input: &[u8], mut at: usize) -> usize {
    while matches!(input.get(at), Some(b' ' | b'\t' | b'\n' | b'\r' | b'\x0c')) {
        at += 1;
    }
    at
}

fn skip_quote(input: &[u8], at: usize) -> usize {
    match input.get(at) {
        Some(b'"' | b'\'') => at + 1,
        _ => at,
    }
}

fn starts_with_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.len() >= needle.len() && haystack[..needle.len()].eq_ignore_ascii_case(needle)
}

/// Streams a CSS file through the rewriter.
pub struct CssRewriter {
    prefix: Prefix,
    carry: Vec<u8>,
}

impl CssRewriter {
    /// A rewriter for one CSS body.
    pub fn new(prefix: Prefix) -> Self {
        Self {
            prefix,
            carry: Vec::new(),
        }
    }
}

impl StreamRewriter for CssRewriter {
    fn feed(&mut self, chunk: &[u8]) -> io::Result<Bytes> {
        let mut out = Vec::with_capacity(chunk.len() + self.carry.len() + 64);
        let consumed = if self.carry.is_empty() {
            let n = rewrite_into(chunk, &self.prefix, &mut out, false);
            self.carry.extend_from_slice(&chunk[n..]);
            return Ok(out.into());
        } else {
            let mut joined = std::mem::take(&mut self.carry);
            joined.extend_from_slice(chunk);
            let n = rewrite_into(&joined, &self.prefix, &mut out, false);
            joined.drain(..n);
            joined
        };
        self.carry = consumed;
        Ok(out.into())
    }

    fn finish(&mut self) -> io::Result<Bytes> {
        let carry = std::mem::take(&mut self.carry);
        let mut out = Vec::with_capacity(carry.len() + 16);
        rewrite_into(&carry, &self.prefix, &mut out, true);
        Ok(out.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::testing::assert_chunking_invariant;

    fn prefix() -> Prefix {
        Prefix::new("/k3x9q2a").unwrap()
    }

    #[test]
    fn rewrites_root_relative_urls_only() {
        let css = concat!(
            "@import \"/static-files/base.css\";\n",
            "@import url(/fonts.css) screen;\n",
            "a{background:url(/img/a.png)}\n",
            "b{background:URL( '/img/b.png' )}\n",
            "c{background:url(\"/k3x9q2a/img/c.png\")}\n",
            "d{background:url(//cdn.example/d.png)}\n",
            "e{background:url(https://other.example/e.png)}\n",
            "f{background:url(img/f.png)}\n",
            "g{background:url(data:image/png;base64,AAAA)}\n",
            "h{content:\"use /x here\"}\n",
            "ünïcode{background:url(/ü.png)}\n",
        );
        let make = || Box::new(CssRewriter::new(prefix())) as Box<dyn StreamRewriter>;
        let out = String::from_utf8(assert_chunking_invariant(&make, css.as_bytes())).unwrap();
        assert_eq!(
            out,
            concat!(
                "@import \"/k3x9q2a/static-files/base.css\";\n",
                "@import url(/k3x9q2a/fonts.css) screen;\n",
                "a{background:url(/k3x9q2a/img/a.png)}\n",
                "b{background:URL( '/k3x9q2a/img/b.png' )}\n",
                "c{background:url(\"/k3x9q2a/img/c.png\")}\n",
                "d{background:url(//cdn.example/d.png)}\n",
                "e{background:url(https://other.example/e.png)}\n",
                "f{background:url(img/f.png)}\n",
                "g{background:url(data:image/png;base64,AAAA)}\n",
                "h{content:\"use /x here\"}\n",
                "ünïcode{background:url(/k3x9q2a/ü.png)}\n",
            )
        );
        assert_eq!(
            rewrite_css_str(css, &prefix()).as_deref(),
            Some(out.as_str())
        );
    }

    #[test]
    fn untouched_css_is_none() {
        assert_eq!(rewrite_css_str("a{color:red}", &prefix()), None);
        assert_eq!(rewrite_css_str("a{background:url(x.png)}", &prefix()), None);
    }
}
