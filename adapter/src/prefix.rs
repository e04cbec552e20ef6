//! The instance path prefix (`/k3x9q2a`): matching incoming paths at a segment
//! boundary, stripping it on the way in and putting it back on URLs on the way out.

use std::fmt;

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

    /// True when a root-relative path is already under this prefix.
    fn covers(&self, path: &str) -> bool {
        !matches!(self.match_path(path_only(path)), PathMatch::Outside)
    }

    /// Returns `url` with the prefix put back, or `None` when it stays as it is.
    ///
    /// Root-relative URLs (`/x`) and absolute URLs to the upstream's own origin
    /// (`http://127.0.0.1:5000/x`) get the prefix; protocol-relative (`//host/x`),
    /// other hosts, relative URLs, fragments and already prefixed paths do not.
    pub fn restore(&self, url: &str, upstream_origin: Option<&str>) -> Option<String> {
        if url.starts_with('/') {
            if url.starts_with("//") || url.starts_with("/\\") || self.covers(url) {
                return None;
            }
            let mut out = String::with_capacity(self.path.len() + url.len());
            out.push_str(&self.path);
            out.push_str(url);
            return Some(out);
        }
        let origin = upstream_origin?;
        let rest = strip_prefix_ignore_ascii_case(url, origin)?;
        match rest.as_bytes().first() {
            None => Some(format!("{}/", self.path)),
            Some(b'/') if rest.starts_with("//") => None,
            Some(b'/') => Some(self.restore(rest, None).unwrap_or_else(|| rest.to_owned())),
            Some(b'?' | b'#') => Some(format!("{}/{rest}", self.path)),
            _ => None,
        }
    }
}

fn path_only(url: &str) -> &str {
    let end = url.find(['?', '#']).unwrap_or(url.len());
    &url[..end]
}

fn strip_prefix_ignore_ascii_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
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
    fn restores_urls() {
        let p = p();
        let up = Some("http://127.0.0.1:5000");
        let table: &[(&str, Option<&str>)] = &[
            ("/", Some("/k3x9q2a/")),
            ("/static-files/app.js", Some("/k3x9q2a/static-files/app.js")),
            ("/#/experiments/1", Some("/k3x9q2a/#/experiments/1")),
            ("/x?y=/z", Some("/k3x9q2a/x?y=/z")),
            ("/k3x9q2a/already", None),
            ("/k3x9q2a", None),
            ("/k3x9q2a?q", None),
            ("/k3x9q2ab", Some("/k3x9q2a/k3x9q2ab")),
            ("//cdn.example.org/x.js", None),
            ("/\\evil.example", None),
            ("https://other.example/x", None),
            ("relative/path", None),
            ("#frag", None),
            ("?q=1", None),
            ("http://127.0.0.1:5000/x", Some("/k3x9q2a/x")),
            ("HTTP://127.0.0.1:5000/x", Some("/k3x9q2a/x")),
            ("http://127.0.0.1:5000", Some("/k3x9q2a/")),
            ("http://127.0.0.1:5000?a", Some("/k3x9q2a/?a")),
            ("http://127.0.0.1:50001/x", None),
            ("http://127.0.0.1:5000//x", None),
            ("http://127.0.0.1:5000/k3x9q2a/x", Some("/k3x9q2a/x")),
        ];
        for (input, want) in table {
            assert_eq!(p.restore(input, up).as_deref(), *want, "input {input:?}");
        }
    }
}
