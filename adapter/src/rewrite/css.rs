//! CSS rewriting: root-relative `url(...)` and `@import "..."` references get
//! the prefix. Used for CSS files, `<style>` blocks and inline `style`
//! attributes.
//!
//! A streaming tokenizer in the manner of CSS Syntax Level 3 reads each byte
//! once: comments and strings that are no URL pass untouched, escapes count
//! as a browser counts them (`\75 rl(` is `url(`), and `@import` may be
//! followed by comments before its string. Only the construct being decided
//! (a name that may be `url`, an `@import` prelude, a root-relative URL) is
//! held back, and never more than [`MAX_HELD`] bytes: past that the rest of
//! the body passes through unrewritten and [`StreamRewriter::overflowed`]
//! says so.

use super::StreamRewriter;
use crate::prefix::{Fix, Prefix};
use bytes::Bytes;
use std::io;

/// The most a CSS rewriter holds back: the longest root-relative URL (or
/// `@import` prelude) it rewrites.
pub const MAX_HELD: usize = 16 * 1024;

/// The longest name that is still looked at (`\000075\000072\00006c` is `url`).
const MAX_NAME: usize = 64;

/// Rewrites a complete CSS text; `None` when nothing changes.
pub fn rewrite_css_str(css: &str, prefix: &Prefix) -> Option<String> {
    let mut rewriter = CssRewriter::new(prefix.clone());
    let mut out = Vec::with_capacity(css.len() + 64);
    rewriter.push_all(css.as_bytes(), &mut out);
    rewriter.end(&mut out);
    // Only ASCII is inserted, before ASCII bytes, so UTF-8 stays valid.
    let out = String::from_utf8(out).ok()?;
    (out != css).then_some(out)
}

/// Where a name escape stands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Esc {
    None,
    /// Right after `\`.
    Backslash,
    /// After `\` and this many hex digits.
    Hex(u8),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Normal,
    /// After `/`: `*` opens a comment.
    Slash,
    Comment {
        star: bool,
    },
    /// A string that is no URL.
    Str {
        quote: u8,
        escaped: bool,
    },
    /// After `\` outside a held name: the next byte belongs to a name.
    Escape,
    /// A name that may be `url` (or `import` after `@`), held back.
    Name {
        at: bool,
        esc: Esc,
    },
    /// A name that is neither, passed on until it ends.
    NameSkip {
        esc: Esc,
    },
    /// After `url(`: blanks, then the value.
    UrlOpen,
    /// After `@import`: blanks and comments, then a string or `url(`.
    Import,
    ImportSlash,
    ImportComment {
        star: bool,
    },
    /// A URL value held back until its end decides it.
    Value {
        quote: Option<u8>,
        escaped: bool,
    },
    /// A URL value that needs nothing, passed on until its end.
    ValueSkip {
        quote: Option<u8>,
        escaped: bool,
    },
    /// A cap was hit: the rest passes through.
    Off,
}

/// Streams CSS through the rewriter.
pub struct CssRewriter {
    prefix: Prefix,
    state: State,
    /// Bytes held back: the construct being decided.
    held: Vec<u8>,
    /// Where the URL value starts in `held`.
    value_start: usize,
    /// The byte before, in the normal state, continues a name, so a `url(`
    /// that follows is the end of a longer name.
    prev_name: bool,
    /// A non-blank byte of the current URL value has been seen.
    value_seen: bool,
    overflowed: bool,
}

fn is_name(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b >= 0x80
}

fn is_newline(b: u8) -> bool {
    matches!(b, b'\n' | b'\r' | b'\x0c')
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t' || is_newline(b)
}

/// The escape state after `b` inside a name, or `None` when `b` ends it.
fn name_step(esc: Esc, b: u8) -> Option<Esc> {
    match esc {
        Esc::Backslash if is_newline(b) => None,
        Esc::Backslash if b.is_ascii_hexdigit() => Some(Esc::Hex(1)),
        Esc::Backslash => Some(Esc::None),
        Esc::Hex(n) if b.is_ascii_hexdigit() && n < 6 => Some(Esc::Hex(n + 1)),
        Esc::Hex(_) if is_blank(b) => Some(Esc::None),
        Esc::Hex(_) | Esc::None if b == b'\\' => Some(Esc::Backslash),
        Esc::Hex(_) | Esc::None if is_name(b) => Some(Esc::None),
        Esc::Hex(_) | Esc::None => None,
    }
}

/// Decodes CSS escapes (`\2f`, `\/`, a backslash before a newline).
pub(crate) fn css_unescape(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] != b'\\' {
            out.push(raw[i]);
            i += 1;
            continue;
        }
        let Some(&c) = raw.get(i + 1) else {
            break;
        };
        if is_newline(c) {
            i += if raw[i + 1..].starts_with(b"\r\n") {
                3
            } else {
                2
            };
        } else if c.is_ascii_hexdigit() {
            let digits = raw[i + 1..]
                .iter()
                .take(6)
                .take_while(|b| b.is_ascii_hexdigit())
                .count();
            let hex = std::str::from_utf8(&raw[i + 1..i + 1 + digits]).unwrap_or("0");
            let code = u32::from_str_radix(hex, 16).unwrap_or(0);
            let ch = char::from_u32(code)
                .filter(|&c| c != '\0')
                .unwrap_or('\u{fffd}');
            let mut buf = [0; 4];
            out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
            i += 1 + digits;
            if raw[i..].starts_with(b"\r\n") {
                i += 2;
            } else if raw.get(i).is_some_and(|&b| is_blank(b)) {
                i += 1;
            }
        } else {
            out.push(c);
            i += 2;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// True when `raw` has a blank that no escape covers (in an unquoted URL,
/// the browser then drops the whole URL).
fn has_unescaped_blank(raw: &[u8]) -> bool {
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'\\' => {
                let digits = raw[i + 1..]
                    .iter()
                    .take(6)
                    .take_while(|b| b.is_ascii_hexdigit())
                    .count();
                i += 1 + digits.max(1);
                if digits > 0 && raw.get(i).is_some_and(|&b| is_blank(b)) {
                    i += 1;
                }
            }
            b if is_blank(b) => return true,
            _ => i += 1,
        }
    }
    false
}

/// A replacement URL (ASCII) written so CSS reads it back as it is.
fn css_escape(url: &str, out: &mut Vec<u8>) {
    for b in url.bytes() {
        if matches!(b, b'\\' | b'(' | b')' | b'"' | b'\'') || b <= b' ' {
            out.push(b'\\');
        }
        out.push(b);
    }
}

impl CssRewriter {
    /// A rewriter for one CSS body.
    pub fn new(prefix: Prefix) -> Self {
        Self {
            prefix,
            state: State::Normal,
            held: Vec::new(),
            value_start: 0,
            prev_name: false,
            value_seen: false,
            overflowed: false,
        }
    }

    fn flush(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.held);
        self.held.clear();
    }

    /// Holds `b` back; past the cap, gives up on the rest of the body.
    fn hold(&mut self, b: u8, out: &mut Vec<u8>) {
        self.held.push(b);
        if self.held.len() > MAX_HELD {
            self.flush(out);
            self.state = State::Off;
            self.overflowed = true;
        }
    }

    pub(crate) fn push_all(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            self.push(b, out);
        }
    }

    fn push(&mut self, b: u8, out: &mut Vec<u8>) {
        loop {
            match self.state {
                State::Off => out.push(b),
                State::Normal => match b {
                    b'/' => {
                        out.push(b);
                        self.prev_name = false;
                        self.state = State::Slash;
                    }
                    b'"' | b'\'' => {
                        out.push(b);
                        self.prev_name = false;
                        self.state = State::Str {
                            quote: b,
                            escaped: false,
                        };
                    }
                    b'@' => {
                        self.held.push(b);
                        self.state = State::Name {
                            at: true,
                            esc: Esc::None,
                        };
                    }
                    b'u' | b'U' | b'\\' if !self.prev_name => {
                        self.held.push(b);
                        let esc = if b == b'\\' {
                            Esc::Backslash
                        } else {
                            Esc::None
                        };
                        self.state = State::Name { at: false, esc };
                    }
                    b'\\' => {
                        out.push(b);
                        self.state = State::Escape;
                    }
                    _ => {
                        out.push(b);
                        self.prev_name = is_name(b);
                    }
                },
                State::Escape => {
                    out.push(b);
                    self.prev_name = true;
                    self.state = State::Normal;
                }
                State::Slash => {
                    if b == b'*' {
                        out.push(b);
                        self.state = State::Comment { star: false };
                    } else {
                        self.state = State::Normal;
                        continue;
                    }
                }
                State::Comment { star } => {
                    out.push(b);
                    self.state = if star && b == b'/' {
                        State::Normal
                    } else {
                        State::Comment { star: b == b'*' }
                    };
                }
                State::Str { quote, escaped } => {
                    out.push(b);
                    self.state = if escaped {
                        State::Str {
                            quote,
                            escaped: false,
                        }
                    } else if b == b'\\' {
                        State::Str {
                            quote,
                            escaped: true,
                        }
                    } else if b == quote || is_newline(b) {
                        State::Normal
                    } else {
                        State::Str {
                            quote,
                            escaped: false,
                        }
                    };
                }
                State::Name { at, esc } => match name_step(esc, b) {
                    Some(esc) => {
                        self.held.push(b);
                        self.state = State::Name { at, esc };
                        if self.held.len() > MAX_NAME {
                            self.flush(out);
                            self.prev_name = true;
                            self.state = State::NameSkip { esc };
                        }
                    }
                    None => {
                        let name = css_unescape(&self.held[usize::from(at)..]);
                        if !at && b == b'(' && name.eq_ignore_ascii_case("url") {
                            self.held.push(b);
                            self.state = State::UrlOpen;
                        } else if at && name.eq_ignore_ascii_case("import") {
                            self.state = State::Import;
                            continue;
                        } else {
                            self.flush(out);
                            self.prev_name = !name.is_empty();
                            self.state = State::Normal;
                            continue;
                        }
                    }
                },
                State::NameSkip { esc } => match name_step(esc, b) {
                    Some(esc) => {
                        out.push(b);
                        self.state = State::NameSkip { esc };
                    }
                    None => {
                        self.state = State::Normal;
                        continue;
                    }
                },
                State::UrlOpen => {
                    if is_blank(b) {
                        self.hold(b, out);
                    } else if b == b'"' || b == b'\'' {
                        self.held.push(b);
                        self.value_start = self.held.len();
                        self.value_seen = false;
                        self.state = State::Value {
                            quote: Some(b),
                            escaped: false,
                        };
                    } else {
                        self.value_start = self.held.len();
                        self.value_seen = false;
                        self.state = State::Value {
                            quote: None,
                            escaped: false,
                        };
                        continue;
                    }
                }
                State::Import => {
                    if is_blank(b) {
                        self.hold(b, out);
                    } else if b == b'/' {
                        self.hold(b, out);
                        if self.state == State::Import {
                            self.state = State::ImportSlash;
                        }
                    } else if b == b'"' || b == b'\'' {
                        self.held.push(b);
                        self.value_start = self.held.len();
                        self.value_seen = false;
                        self.state = State::Value {
                            quote: Some(b),
                            escaped: false,
                        };
                    } else {
                        self.flush(out);
                        self.prev_name = false;
                        self.state = State::Normal;
                        continue;
                    }
                }
                State::ImportSlash => {
                    if b == b'*' {
                        self.hold(b, out);
                        if self.state == State::ImportSlash {
                            self.state = State::ImportComment { star: false };
                        }
                    } else {
                        self.flush(out);
                        self.prev_name = false;
                        self.state = State::Normal;
                        continue;
                    }
                }
                State::ImportComment { star } => {
                    self.hold(b, out);
                    if self.state != State::Off {
                        self.state = if star && b == b'/' {
                            State::Import
                        } else {
                            State::ImportComment { star: b == b'*' }
                        };
                    }
                }
                State::Value { quote, escaped } => {
                    let end = !escaped
                        && match quote {
                            Some(q) => b == q,
                            None => b == b')',
                        };
                    if end {
                        self.decide(out);
                        self.prev_name = false;
                        self.state = State::Normal;
                        if quote.is_some() {
                            out.push(b);
                        } else {
                            continue;
                        }
                    } else if !escaped
                        && match quote {
                            Some(_) => is_newline(b),
                            None => {
                                matches!(b, b'"' | b'\'' | b'(')
                                    || b.is_ascii_control() && !is_blank(b)
                            }
                        }
                    {
                        // A bad string or bad URL: the browser drops it.
                        self.flush(out);
                        self.state = match quote {
                            Some(_) => State::Normal,
                            None => State::ValueSkip {
                                quote: None,
                                escaped: false,
                            },
                        };
                        continue;
                    } else {
                        self.hold(b, out);
                        if let State::Value { .. } = self.state {
                            self.state = State::Value {
                                quote,
                                escaped: !escaped && b == b'\\',
                            };
                            if !self.value_seen && !is_blank(b) {
                                self.value_seen = true;
                                if !matches!(b, b'/' | b'\\') {
                                    // Neither a slash, a backslash nor a
                                    // blank first: not root-relative, so a
                                    // long `data:` URL streams.
                                    self.flush(out);
                                    self.state = State::ValueSkip {
                                        quote,
                                        escaped: false,
                                    };
                                }
                            }
                        }
                    }
                }
                State::ValueSkip { quote, escaped } => {
                    out.push(b);
                    let end = !escaped
                        && match quote {
                            Some(q) => b == q || is_newline(b),
                            None => b == b')',
                        };
                    self.state = if end {
                        self.prev_name = false;
                        State::Normal
                    } else {
                        State::ValueSkip {
                            quote,
                            escaped: !escaped && b == b'\\',
                        }
                    };
                }
            }
            return;
        }
    }

    /// The value held back has ended: writes it out, with the prefix if the
    /// browser would resolve it outside.
    fn decide(&mut self, out: &mut Vec<u8>) {
        let raw = &self.held[self.value_start..];
        let unquoted =
            self.value_start == 0 || !matches!(self.held[self.value_start - 1], b'"' | b'\'');
        let end = if unquoted {
            raw.iter().rposition(|&b| !is_blank(b)).map_or(0, |e| e + 1)
        } else {
            raw.len()
        };
        let value = css_unescape(&raw[..end]);
        let bad = unquoted && has_unescaped_blank(&raw[..end]);
        let fix = if bad {
            None
        } else {
            self.prefix.fix_reference(&value)
        };
        let at = self.value_start;
        match fix {
            None => out.extend_from_slice(&self.held),
            Some(Fix::Prepend) => {
                let lead = raw.iter().take_while(|&&b| is_blank(b)).count();
                out.extend_from_slice(&self.held[..at + lead]);
                out.extend_from_slice(self.prefix.as_str().as_bytes());
                out.extend_from_slice(&self.held[at + lead..]);
            }
            Some(Fix::Replace(new)) => {
                out.extend_from_slice(&self.held[..at]);
                css_escape(&new, out);
                out.extend_from_slice(&self.held[at + end..]);
            }
        }
        self.held.clear();
    }

    /// Gives back what is held, as it came, and passes the rest through (the
    /// caller writes the rest of the text unrewritten).
    pub(crate) fn abandon(&mut self) -> Vec<u8> {
        self.state = State::Off;
        std::mem::take(&mut self.held)
    }

    /// The body has ended: an unterminated URL or string still counts (CSS
    /// closes it at the end of input); anything else held goes out as it is.
    pub(crate) fn end(&mut self, out: &mut Vec<u8>) {
        if let State::Value { .. } = self.state {
            self.decide(out);
        } else {
            self.flush(out);
        }
        self.state = State::Normal;
        self.prev_name = false;
    }
}

impl StreamRewriter for CssRewriter {
    fn feed(&mut self, chunk: &[u8]) -> io::Result<Bytes> {
        let mut out = Vec::with_capacity(chunk.len() + 64);
        self.push_all(chunk, &mut out);
        Ok(out.into())
    }

    fn finish(&mut self) -> io::Result<Bytes> {
        let mut out = Vec::with_capacity(self.held.len() + 16);
        self.end(&mut out);
        Ok(out.into())
    }

    fn overflowed(&self) -> bool {
        self.overflowed
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
        Box::new(CssRewriter::new(prefix()))
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
    fn comments_strings_and_escapes_count_as_a_browser_counts_them() {
        let table: &[(&str, &str)] = &[
            // Not URLs: comments, strings, longer names.
            ("/* url(/x) */a{}", "/* url(/x) */a{}"),
            ("a{content:\"url(/x)\"}", "a{content:\"url(/x)\"}"),
            ("a{content:'@import \"/x\"'}", "a{content:'@import \"/x\"'}"),
            ("a{b:myurl(/x)}", "a{b:myurl(/x)}"),
            ("a{b:-url(/x)}", "a{b:-url(/x)}"),
            ("/* @import \"/x\"; */", "/* @import \"/x\"; */"),
            // URLs however they are spelt.
            ("@import/**/\"/x\";", "@import/**/\"/k3x9q2a/x\";"),
            ("@import /* a */ '/x';", "@import /* a */ '/k3x9q2a/x';"),
            ("@IMPORT \"/x\";", "@IMPORT \"/k3x9q2a/x\";"),
            ("@\\69mport \"/x\";", "@\\69mport \"/k3x9q2a/x\";"),
            ("a{b:\\75 rl(/x)}", "a{b:\\75 rl(/k3x9q2a/x)}"),
            ("a{b:u\\72l(/x)}", "a{b:u\\72l(/k3x9q2a/x)}"),
            ("a{b:\\55\\52\\4c(/x)}", "a{b:\\55\\52\\4c(/k3x9q2a/x)}"),
            ("a{b:url(\\2f x)}", "a{b:url(/k3x9q2a\\2f x)}"),
            ("a{b:url(\"\\/x\")}", "a{b:url(\"/k3x9q2a\\/x\")}"),
            ("a{b:url(\\\\x)}", "a{b:url(/k3x9q2a\\\\x)}"),
            ("a{b:url(/a\\)b)}", "a{b:url(/k3x9q2a/a\\)b)}"),
            // Escaped quotes in a string do not end it.
            ("a{b:\"\\\"url(/x)\"}", "a{b:\"\\\"url(/x)\"}"),
            // Dot segments never climb out of the prefix.
            ("a{b:url(/../x)}", "a{b:url(/k3x9q2a/x)}"),
            ("a{b:url('/%2e%2e/x')}", "a{b:url('/k3x9q2a/x')}"),
            ("a{b:url(/k3x9q2a/../x)}", "a{b:url(/k3x9q2a/k3x9q2a/../x)}"),
            // Scheme-relative and backslash-host stay (another host).
            ("a{b:url(/\\\\evil/x)}", "a{b:url(/\\\\evil/x)}"),
            // A bad URL is dropped by the browser; left alone.
            ("a{b:url(/x y)}", "a{b:url(/x y)}"),
            ("a{b:url(/x\"y)}", "a{b:url(/x\"y)}"),
            // Unterminated at the end of input: still a URL.
            ("a{b:url(/x", "a{b:url(/k3x9q2a/x"),
        ];
        for (input, want) in table {
            let out = assert_chunking_invariant(&make, input.as_bytes());
            assert_eq!(String::from_utf8_lossy(&out), *want, "input {input:?}");
        }
    }

    #[test]
    fn untouched_css_is_none() {
        assert_eq!(rewrite_css_str("a{color:red}", &prefix()), None);
        assert_eq!(rewrite_css_str("a{background:url(x.png)}", &prefix()), None);
    }

    #[test]
    fn long_data_urls_stream_and_long_rooted_urls_hit_the_cap() {
        let data = format!("a{{b:url(data:image/png;base64,{})}}", "A".repeat(1 << 20));
        let mut r = CssRewriter::new(prefix());
        let out = r.feed(data.as_bytes()).unwrap();
        assert_eq!(out.len(), data.len(), "a data: URL is not held back");
        assert!(!StreamRewriter::overflowed(&r));

        let long = format!("a{{b:url(/{})}} c{{d:url(/y)}}", "x".repeat(MAX_HELD + 10));
        let mut r = CssRewriter::new(prefix());
        let mut out = r.feed(long.as_bytes()).unwrap().to_vec();
        out.extend_from_slice(&r.finish().unwrap());
        assert!(StreamRewriter::overflowed(&r));
        assert_eq!(out, long.as_bytes(), "the rest passes through unrewritten");
    }

    #[test]
    fn a_long_unterminated_url_costs_linear_time() {
        // Formerly each chunk rescanned everything since `url(`.
        let mut css = String::from("a{b:url( ");
        css.push_str(&"y".repeat(8 << 20));
        let start = std::time::Instant::now();
        let mut r = CssRewriter::new(prefix());
        let mut total = 0;
        for chunk in css.as_bytes().chunks(1024) {
            total += r.feed(chunk).unwrap().len();
        }
        total += r.finish().unwrap().len();
        assert_eq!(total, css.len());
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
    }
}
