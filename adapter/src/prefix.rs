//! The instance path prefix (`/k3x9q2a`): matching incoming paths at a segment
//! boundary, stripping it on the way in and putting it back on URLs on the way out.

use std::fmt;
use std::sync::LazyLock;
use url::{Position, Url};

/// A validated path prefix such as `/k3x9q2a`: starts with `/`, has no trailing
/// slash, and only holds characters that need no percent-encoding in a path.
#[derive(Clone, PartialEq, Eq)]
pub struct Prefix {
    path: String,
}

/// Why a prefix was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid prefix {0:?}: it must look like /k3x9q2a (a leading '/', no trailing '/', only [A-Za-z0-9._~-] and '/' between segments)"
)]
pub struct InvalidPrefix(pub String);

/// Where an incoming path stands relative to the prefix.
#[derive(Debug, PartialEq, Eq)]
pub enum PathMatch<'a> {
    /// Exactly the prefix with no trailing slash: answer with a redirect to `prefix/`.
    Bare,
    /// Under the prefix; the remainder starts with `/`.
    Inside(&'a str),
    /// Not ours (includes `/k3x9q2ax/...`, which only shares the letters).
    Outside,
}

impl Prefix {
    /// Parses and validates a prefix.
    pub fn new(raw: &str) -> Result<Self, InvalidPrefix> {
        let ok = raw.len() > 1
            && raw.starts_with('/')
            && !raw.ends_with('/')
            && !raw.contains("//")
            && raw[1..]
                .split('/')
                .all(|segment| segment != "." && segment != "..")
            && raw.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'.' | b'_' | b'~')
            });
        if ok {
            Ok(Self {
                path: raw.to_owned(),
            })
        } else {
            Err(InvalidPrefix(raw.to_owned()))
        }
    }

    /// The prefix as written, e.g. `/k3x9q2a`.
    pub fn as_str(&self) -> &str {
        &self.path
    }

    /// Classifies a request path (without query).
    pub fn match_path<'a>(&self, path: &'a str) -> PathMatch<'a> {
        match path.strip_prefix(self.path.as_str()) {
            Some("") => PathMatch::Bare,
            Some(rest) if rest.starts_with('/') => PathMatch::Inside(rest),
            _ => PathMatch::Outside,
        }
    }

    /// True when `path` (a resolved, normalised path) is the prefix or under it.
    pub fn contains(&self, path: &str) -> bool {
        !matches!(self.match_path(path), PathMatch::Outside)
    }

    /// How a reference found in a document (an HTML attribute, CSS) must
    /// change so that the browser resolves it inside the prefix; `None` when
    /// it stays as it is.
    ///
    /// `reference` is the value as the browser sees it (entities and CSS
    /// escapes already decoded). Only path-absolute references (`/x`, `\x`,
    /// `/../x`, `/%2e%2e/x`) change; relative ones, absolute URLs,
    /// scheme-relative ones (`//host`, `/\host`: the app's choice of another
    /// host), fragments and queries stay. The decision is taken on the URL as
    /// a WHATWG parser resolves it, so backslashes, tabs and dot segments
    /// (percent-encoded or not) count as a browser counts them, and a path
    /// such as `/<id>/../x` does not count as already prefixed.
    pub fn fix_reference(&self, reference: &str) -> Option<Fix> {
        let r = url_trim(reference);
        if reference_kind(r) != Kind::PathAbsolute {
            return None;
        }
        let resolved = BASE.join(r).ok()?;
        if self.contains(resolved.path()) {
            return None;
        }
        let mut candidate = String::with_capacity(self.path.len() + r.len());
        candidate.push_str(&self.path);
        candidate.push_str(r);
        if BASE.join(&candidate).is_ok_and(|u| self.contains(u.path())) {
            return Some(Fix::Prepend);
        }
        // Dot segments would climb out of the prefix: use the resolved path,
        // which has none left.
        Some(Fix::Replace(format!(
            "{}{}",
            self.path,
            &resolved[Position::BeforePath..]
        )))
    }

    /// [`Prefix::fix_reference`] applied: the new reference (trimmed), or
    /// `None` when it stays as it is.
    pub fn restore(&self, reference: &str) -> Option<String> {
        let r = url_trim(reference);
        Some(match self.fix_reference(r)? {
            Fix::Prepend => format!("{}{r}", self.path),
            Fix::Replace(new) => new,
        })
    }

    /// The prefix put back on a URL-bearing response header (`Location`,
    /// `Content-Location`, the URL of `Refresh`); `None` when it stays.
    ///
    /// Whatever the app meant as its own origin comes out as a plain path
    /// under the prefix: path-absolute references, absolute URLs to the
    /// upstream's origin, and also scheme-relative ones (`//host/x`,
    /// `/\host/x`, `http://upstream/\host/x`), which a browser would take to
    /// another origin: they are neutralised into `/<prefix>/host/x`. An
    /// absolute URL to another origin, spelt with its scheme, is the app's
    /// own choice (a sign-in page) and stays; relative references stay too.
    pub fn restore_header(&self, value: &str, upstream_origin: &str) -> Option<String> {
        let v = url_trim(value);
        match reference_kind(v) {
            Kind::PathAbsolute | Kind::SchemeRelative => Some(self.plain_path(v)),
            Kind::Other => {
                let absolute = Url::parse(v).ok()?;
                let upstream = Url::parse(upstream_origin).ok()?;
                if absolute.origin() != upstream.origin() {
                    return None;
                }
                Some(self.plain_path(&absolute[Position::BeforePath..]))
            }
        }
    }

    /// A path-absolute or scheme-relative reference as a plain path under
    /// the prefix: resolved (no dot segments, no backslashes), then prefixed
    /// unless it is under the prefix already.
    fn plain_path(&self, reference: &str) -> String {
        let path = if reference_kind(reference) == Kind::SchemeRelative {
            let rest = reference.trim_start_matches(['/', '\\', '\t', '\n', '\r']);
            format!("/{rest}")
        } else {
            reference.to_owned()
        };
        let Ok(resolved) = BASE.join(&path) else {
            return format!("{}/", self.path);
        };
        let plain = &resolved[Position::BeforePath..];
        if self.contains(resolved.path()) {
            plain.to_owned()
        } else {
            format!("{}{plain}", self.path)
        }
    }
}

/// How a reference changes, from [`Prefix::fix_reference`].
#[derive(Debug, PartialEq, Eq)]
pub enum Fix {
    /// Put the prefix in front of the reference as written.
    Prepend,
    /// Replace the reference with this path under the prefix (ASCII,
    /// percent-encoded, no dot segments): written as it was, it would climb
    /// out of the prefix.
    Replace(String),
}

/// Resolves path-absolute references to see where a browser takes them; only
/// the path of the result is looked at.
static BASE: LazyLock<Url> =
    LazyLock::new(|| Url::parse("http://flowgate.invalid/").expect("valid base URL"));

/// What the URL parser trims at both ends: C0 controls and space.
fn url_trim(s: &str) -> &str {
    s.trim_matches(|c: char| c <= ' ')
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    /// `/x` or `\x`: a path on the document's origin.
    PathAbsolute,
    /// `//host` or `/\host`: another origin, same scheme.
    SchemeRelative,
    /// Anything else: relative, absolute, fragment, query, empty.
    Other,
}

/// The kind of a (trimmed) reference, as the URL parser sees it: it drops
/// ASCII tabs and newlines anywhere and treats `\` as `/` in http(s) URLs.
fn reference_kind(r: &str) -> Kind {
    let mut significant = r.chars().filter(|c| !matches!(c, '\t' | '\n' | '\r'));
    let slash = |c: Option<char>| matches!(c, Some('/' | '\\'));
    if !slash(significant.next()) {
        Kind::Other
    } else if slash(significant.next()) {
        Kind::SchemeRelative
    } else {
        Kind::PathAbsolute
    }
}

impl fmt::Debug for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> Prefix {
        Prefix::new("/k3x9q2a").unwrap()
    }

    #[test]
    fn validates() {
        for bad in [
            "",
            "/",
            "k3x9q2a",
            "/k3x9q2a/",
            "/a//b",
            "/a/../b",
            "/a b",
            "/a%20",
            "/a?x",
        ] {
            assert!(Prefix::new(bad).is_err(), "{bad:?} should be refused");
        }
        for good in ["/k3x9q2a", "/apps/k3x9q2a", "/A.b-c_d~"] {
            assert!(Prefix::new(good).is_ok(), "{good:?} should be accepted");
        }
    }

    #[test]
    fn matches_at_segment_boundary_only() {
        let p = p();
        assert_eq!(p.match_path("/k3x9q2a"), PathMatch::Bare);
        assert_eq!(p.match_path("/k3x9q2a/"), PathMatch::Inside("/"));
        assert_eq!(
            p.match_path("/k3x9q2a/ajax-api/2.0/x"),
            PathMatch::Inside("/ajax-api/2.0/x")
        );
        assert_eq!(p.match_path("/k3x9q2ax/"), PathMatch::Outside);
        assert_eq!(p.match_path("/k3x9q2"), PathMatch::Outside);
        assert_eq!(p.match_path("/"), PathMatch::Outside);
        assert_eq!(p.match_path("/other/k3x9q2a/"), PathMatch::Outside);
    }

    #[test]
    fn restores_document_references() {
        let p = p();
        let table: &[(&str, Option<&str>)] = &[
            ("/", Some("/k3x9q2a/")),
            ("/static-files/app.js", Some("/k3x9q2a/static-files/app.js")),
            ("/#/experiments/1", Some("/k3x9q2a/#/experiments/1")),
            ("/x?y=/z", Some("/k3x9q2a/x?y=/z")),
            (" /x ", Some("/k3x9q2a/x")),
            ("\\x", Some("/k3x9q2a\\x")),
            ("/ü.png", Some("/k3x9q2a/ü.png")),
            ("/k3x9q2a/already", None),
            ("/k3x9q2a", None),
            ("/k3x9q2a?q", None),
            ("/k3x9q2a/a/../b", None),
            ("/k3x9q2ab", Some("/k3x9q2a/k3x9q2ab")),
            // Dot segments, plain or percent-encoded, never climb out.
            ("/../x", Some("/k3x9q2a/x")),
            ("/%2e%2e/x", Some("/k3x9q2a/x")),
            ("/.%2E/x?a=/../b", Some("/k3x9q2a/x?a=/../b")),
            ("/k3x9q2a/../x", Some("/k3x9q2a/k3x9q2a/../x")),
            (
                "/k3x9q2a/%2e%2e/other/x",
                Some("/k3x9q2a/k3x9q2a/%2e%2e/other/x"),
            ),
            ("/a/../../x", Some("/k3x9q2a/x")),
            ("//cdn.example.org/x.js", None),
            ("/\\evil.example", None),
            ("\\/evil.example", None),
            ("/\t/evil.example", None),
            ("https://other.example/x", None),
            ("http://127.0.0.1:5000/x", None),
            ("relative/path", None),
            ("../x", None),
            ("#frag", None),
            ("?q=1", None),
            ("", None),
        ];
        for (input, want) in table {
            assert_eq!(p.restore(input).as_deref(), *want, "input {input:?}");
        }
    }

    #[test]
    fn every_rewritten_reference_resolves_inside_the_prefix() {
        let p = p();
        let pieces = [
            "/", "\\", ".", "..", "%2e", "%2E", "k3x9q2a", "x", "?", "#", "\t", "%2f",
        ];
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..20_000 {
            let n = rng.usize(1..8);
            let r: String = (0..n).map(|_| pieces[rng.usize(..pieces.len())]).collect();
            match p.restore(&r) {
                Some(new) => {
                    let u = BASE.join(&new).unwrap();
                    assert!(p.contains(u.path()), "{r:?} became {new:?} -> {u}");
                }
                None => {
                    // Left alone: inside already, or not path-absolute.
                    if reference_kind(url_trim(&r)) == Kind::PathAbsolute
                        && let Ok(u) = BASE.join(&r)
                    {
                        assert!(p.contains(u.path()), "{r:?} left as is -> {u}");
                    }
                }
            }
            if let Some(new) = p.restore_header(&r, "http://127.0.0.1:5000") {
                let u = BASE.join(&new).unwrap();
                assert!(p.contains(u.path()), "header {r:?} became {new:?} -> {u}");
            }
        }
    }

    #[test]
    fn headers_never_leave_the_origin() {
        let p = p();
        let up = "http://127.0.0.1:5000";
        let table: &[(&str, Option<&str>)] = &[
            ("/target?x=1", Some("/k3x9q2a/target?x=1")),
            ("http://127.0.0.1:5000/x", Some("/k3x9q2a/x")),
            ("HTTP://127.0.0.1:5000/x", Some("/k3x9q2a/x")),
            ("http://127.0.0.1:5000", Some("/k3x9q2a/")),
            ("http://127.0.0.1:5000?a", Some("/k3x9q2a/?a")),
            ("http://127.0.0.1:5000/k3x9q2a/x", Some("/k3x9q2a/x")),
            ("http://127.0.0.1:5000/../x", Some("/k3x9q2a/x")),
            // Open redirects through the upstream's own origin or a
            // scheme-relative path come out as paths under the prefix.
            (
                "http://127.0.0.1:5000/\\evil.example/x",
                Some("/k3x9q2a/evil.example/x"),
            ),
            (
                "http://127.0.0.1:5000//evil.example/x",
                Some("/k3x9q2a/evil.example/x"),
            ),
            ("/\\evil.example/x", Some("/k3x9q2a/evil.example/x")),
            ("\\\\evil.example/x", Some("/k3x9q2a/evil.example/x")),
            ("//evil.example/x", Some("/k3x9q2a/evil.example/x")),
            ("/\t/evil.example", Some("/k3x9q2a/evil.example")),
            ("//../../x", Some("/k3x9q2a/x")),
            ("http://127.0.0.1:50001/x", None),
            ("http://127.0.0.1:5000@evil.example/", None),
            ("https://sso.example.org/auth", None),
            ("relative", None),
        ];
        for (input, want) in table {
            assert_eq!(
                p.restore_header(input, up).as_deref(),
                *want,
                "input {input:?}"
            );
        }
    }
}
