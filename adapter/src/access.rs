//! Who may open a `link` instance. The provisioner mints a short-lived access
//! link, `https://<host>/<id>/?flowgate_access=<token>`; the adapter (and the
//! local backend's router) exchanges a valid token for a cookie scoped to
//! `/<id>/` and redirects to the same URL without the token, so the token
//! leaves the address bar and the history. A request with neither gets 401
//! and never reaches MLflow.
//!
//! Tokens are HMAC-SHA256 over what they grant, with one signing secret per
//! installation (a file of one key per line: the first signs, every line
//! verifies, so a rotated key keeps old cookies valid while it stays listed):
//! - link: `<link expiry>.<session expiry>.<mac>` over `link`, the id, both
//!   expiries; the session expiry is when the instance expires;
//! - cookie: `<session expiry>.<mac>` over `session`, the id, the expiry.
//!
//! Expiries are Unix seconds; MACs are compared in constant time (ring).

use http::header::{self, HeaderMap, HeaderValue};
use ring::hmac;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The query parameter that carries a link's token.
pub const LINK_PARAM: &str = "flowgate_access";
/// The cookie that carries a session.
pub const COOKIE: &str = "flowgate_access";
/// Shortest key accepted, in bytes.
const MIN_KEY_LEN: usize = 32;
/// Longest a token may be (anything longer is refused unread).
const MAX_TOKEN_LEN: usize = 128;

/// Why keys cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file cannot be read.
    #[error("access keys {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds no usable key.
    #[error(
        "access keys {0}: no key (one per line, {MIN_KEY_LEN} characters or more; the first signs)"
    )]
    Empty(String),
    /// A key is too short to be a secret.
    #[error("access keys {path}: line {line} is shorter than {MIN_KEY_LEN} characters")]
    Short {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
    },
}

/// The installation's signing keys: the first signs, all verify.
#[derive(Clone)]
pub struct Keys(Vec<hmac::Key>);

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys({} key(s))", self.0.len())
    }
}

impl Keys {
    /// Reads a key file: one key per line, blank lines and `#` comments skipped.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: name.clone(),
            source,
        })?;
        Self::parse(&text, &name)
    }

    /// Parses the text of a key file (`what` names it in errors).
    pub fn parse(text: &str, what: &str) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.len() < MIN_KEY_LEN {
                return Err(KeyError::Short {
                    path: what.into(),
                    line: i + 1,
                });
            }
            keys.push(hmac::Key::new(hmac::HMAC_SHA256, line.as_bytes()));
        }
        if keys.is_empty() {
            return Err(KeyError::Empty(what.into()));
        }
        Ok(Self(keys))
    }

    fn sign(&self, message: &str) -> String {
        hex::encode(hmac::sign(&self.0[0], message.as_bytes()).as_ref())
    }

    fn verifies(&self, message: &str, mac_hex: &str) -> bool {
        let Ok(mac) = hex::decode(mac_hex) else {
            return false;
        };
        self.0
            .iter()
            .any(|k| hmac::verify(k, message.as_bytes(), &mac).is_ok())
    }

    /// A link token for instance `id`: valid until `link_until`, opening a
    /// session that lasts until `session_until` (the instance's expiry).
    pub fn link_token(
        &self,
        id: &str,
        link_until: SystemTime,
        session_until: SystemTime,
    ) -> String {
        let (l, s) = (unix(link_until), unix(session_until));
        format!("{l}.{s}.{}", self.sign(&format!("link\n{id}\n{l}\n{s}")))
    }

    /// A session (cookie) token for instance `id`, valid until `until`.
    pub fn session_token(&self, id: &str, until: SystemTime) -> String {
        let u = unix(until);
        format!("{u}.{}", self.sign(&format!("session\n{id}\n{u}")))
    }

    /// The session a link token opens, if it is genuine, for `id`, and not expired.
    pub fn open_link(&self, id: &str, token: &str, now: SystemTime) -> Result<SystemTime, Denied> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(Denied::Invalid);
        }
        let mut parts = token.splitn(3, '.');
        let (Some(l), Some(s), Some(mac)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(Denied::Invalid);
        };
        let (Ok(link_until), Ok(session_until)) = (l.parse::<u64>(), s.parse::<u64>()) else {
            return Err(Denied::Invalid);
        };
        if !self.verifies(&format!("link\n{id}\n{link_until}\n{session_until}"), mac) {
            return Err(Denied::Invalid);
        }
        let now = unix(now);
        if now >= link_until || now >= session_until {
            return Err(Denied::Expired);
        }
        Ok(UNIX_EPOCH + Duration::from_secs(session_until))
    }

    /// Whether a session token is genuine, for `id`, and not expired.
    pub fn session_valid(&self, id: &str, token: &str, now: SystemTime) -> bool {
        if token.len() > MAX_TOKEN_LEN {
            return false;
        }
        let Some((u, mac)) = token.split_once('.') else {
            return false;
        };
        let Ok(until) = u.parse::<u64>() else {
            return false;
        };
        unix(now) < until && self.verifies(&format!("session\n{id}\n{until}"), mac)
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Why a link does not open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// Not a token of ours, or for another instance.
    Invalid,
    /// Genuine, but past its time.
    Expired,
}

/// What to do with one request to a `link` instance.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// A valid session cookie: forward (with `Cookie` cleaned of ours).
    Allow,
    /// A valid link: set this cookie and redirect to `location`; or a stale
    /// link from a browser already signed in: only the redirect.
    Exchange {
        /// The same URL without the token.
        location: String,
        /// The `Set-Cookie` value (none when the session stays as it is).
        cookie: Option<String>,
    },
    /// Neither: 401.
    Deny(Option<Denied>),
}

/// The access check of one instance.
#[derive(Clone, Debug)]
pub struct Gate {
    keys: Keys,
    /// The instance id (the prefix without its slash).
    id: String,
}

impl Gate {
    /// The gate of instance `id`.
    pub fn new(keys: Keys, id: impl Into<String>) -> Self {
        Self {
            keys,
            id: id.into(),
        }
    }

    /// Decides on a request for `path` (the public, prefixed path) with this
    /// query and headers. `secure`: the browser came over https.
    pub fn decide(
        &self,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        secure: bool,
        now: SystemTime,
    ) -> Decision {
        let signed_in =
            || cookies(headers, COOKIE).any(|v| self.keys.session_valid(&self.id, v, now));
        if let Some(q) = query
            && let Some(token) = query_param(q, LINK_PARAM)
        {
            let rest = without_param(q, LINK_PARAM);
            let location = if rest.is_empty() {
                path.to_owned()
            } else {
                format!("{path}?{rest}")
            };
            return match self.keys.open_link(&self.id, &token, now) {
                Ok(session_until) => {
                    let max_age = session_until.duration_since(now).map_or(0, |d| d.as_secs());
                    let cookie = format!(
                        "{COOKIE}={}; Path=/{}/; Max-Age={max_age}; HttpOnly; SameSite=Lax{}",
                        self.keys.session_token(&self.id, session_until),
                        self.id,
                        if secure { "; Secure" } else { "" }
                    );
                    Decision::Exchange {
                        location,
                        cookie: Some(cookie),
                    }
                }
                // an old link (from the history, a bookmark) in a browser
                // that is signed in: just drop the token from the address
                Err(_) if signed_in() => Decision::Exchange {
                    location,
                    cookie: None,
                },
                Err(why) => Decision::Deny(Some(why)),
            };
        }
        if signed_in() {
            Decision::Allow
        } else {
            Decision::Deny(None)
        }
    }
}

/// The values of cookie `name` in every `Cookie` header.
fn cookies<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(move |pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

/// `Cookie` headers without cookie `name` (so the app never sees our session);
/// `None` when there was nothing to take out.
pub fn strip_cookie(headers: &HeaderMap, name: &str) -> Option<Option<HeaderValue>> {
    let mut found = false;
    let mut kept = Vec::new();
    for v in headers.get_all(header::COOKIE) {
        let Ok(v) = v.to_str() else { return None };
        for pair in v.split(';') {
            let pair = pair.trim();
            if pair.split_once('=').is_some_and(|(k, _)| k == name) {
                found = true;
            } else if !pair.is_empty() {
                kept.push(pair);
            }
        }
    }
    if !found {
        return None;
    }
    Some(if kept.is_empty() {
        None
    } else {
        HeaderValue::from_str(&kept.join("; ")).ok()
    })
}

/// The (percent-decoded) value of `name` in a query string.
fn query_param(query: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The query string without `name`, other pairs kept as they were written.
fn without_param(query: &str, name: &str) -> String {
    query
        .split('&')
        .filter(|pair| {
            let key = pair.split('=').next().unwrap_or("");
            !key.is_empty() && key != name
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The 401 page: how to get in, never the app's content.
pub const DENIED_PAGE: &str = "<!doctype html><html><head><meta charset=\"utf-8\">\
<title>Access link needed</title></head><body style=\"font-family:sans-serif;margin:3em;max-width:40em\">\
<h1>This MLflow instance opens through its access link</h1>\
<p>Its address alone does not let you in. Open it again from the portal \
(the job's page), which gives you a fresh link; a link works for a few minutes, \
then the browser that opened it stays signed in until the instance expires.</p>\
</body></html>\n";

/// The 401 body for API calls and other non-HTML requests (MLflow's error shape).
pub fn denied_json(why: Option<Denied>) -> String {
    let message = match why {
        Some(Denied::Expired) => {
            "this access link has expired: open the instance again from the portal"
        }
        Some(Denied::Invalid) => "this access link is not valid for this instance",
        None => "this instance opens through its access link (from the portal)",
    };
    format!("{{\"error_code\":\"UNAUTHENTICATED\",\"message\":\"{message}\"}}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const KEY_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn cookie_header(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn key_files() {
        assert!(matches!(Keys::parse("", "f"), Err(KeyError::Empty(_))));
        assert!(matches!(
            Keys::parse("# only\n\n", "f"),
            Err(KeyError::Empty(_))
        ));
        assert!(matches!(
            Keys::parse(&format!("{KEY_A}\nshort\n"), "f"),
            Err(KeyError::Short { line: 2, .. })
        ));
        assert_eq!(
            Keys::parse(&format!("# c\n{KEY_A}\n\n{KEY_B}\n"), "f")
                .unwrap()
                .0
                .len(),
            2
        );
    }

    #[test]
    fn a_link_opens_its_instance_until_it_expires() {
        let keys = Keys::parse(KEY_A, "k").unwrap();
        let t = keys.link_token("abcdefg", at(1600), at(90_000));
        assert_eq!(keys.open_link("abcdefg", &t, at(1000)), Ok(at(90_000)));
        assert_eq!(
            keys.open_link("abcdefg", &t, at(1600)),
            Err(Denied::Expired)
        );
        // another instance, another key, a changed expiry or MAC
        assert_eq!(
            keys.open_link("bcdefgh", &t, at(1000)),
            Err(Denied::Invalid)
        );
        let other = Keys::parse(KEY_B, "k").unwrap();
        assert_eq!(
            other.open_link("abcdefg", &t, at(1000)),
            Err(Denied::Invalid)
        );
        let longer = t.replacen("1600", "9600", 1);
        assert_eq!(
            keys.open_link("abcdefg", &longer, at(1000)),
            Err(Denied::Invalid)
        );
        let mut flipped = t.clone();
        let last = flipped.pop().unwrap();
        flipped.push(if last == '0' { '1' } else { '0' });
        assert_eq!(
            keys.open_link("abcdefg", &flipped, at(1000)),
            Err(Denied::Invalid)
        );
        for junk in ["", "1.2", "x.y.z", "1.2.zz", &"9".repeat(200)] {
            assert_eq!(
                keys.open_link("abcdefg", junk, at(1000)),
                Err(Denied::Invalid),
                "{junk}"
            );
        }
        // a session token is not a link, nor the reverse
        let s = keys.session_token("abcdefg", at(90_000));
        assert_eq!(
            keys.open_link("abcdefg", &s, at(1000)),
            Err(Denied::Invalid)
        );
        assert!(!keys.session_valid("abcdefg", &t, at(1000)));
    }

    #[test]
    fn rotation_keeps_old_sessions_while_the_old_key_is_listed() {
        let old = Keys::parse(KEY_A, "k").unwrap();
        let s = old.session_token("abcdefg", at(5000));
        let rotated = Keys::parse(&format!("{KEY_B}\n{KEY_A}"), "k").unwrap();
        assert!(rotated.session_valid("abcdefg", &s, at(1000)));
        let dropped = Keys::parse(KEY_B, "k").unwrap();
        assert!(!dropped.session_valid("abcdefg", &s, at(1000)));
        // new tokens are signed with the first key
        let new = rotated.session_token("abcdefg", at(5000));
        assert!(dropped.session_valid("abcdefg", &new, at(1000)));
        assert!(!rotated.session_valid("abcdefg", &new, at(5000)));
    }

    #[test]
    fn the_gate_exchanges_a_link_for_a_cookie_scoped_to_the_instance() {
        let keys = Keys::parse(KEY_A, "k").unwrap();
        let gate = Gate::new(keys.clone(), "abcdefg");
        let token = keys.link_token("abcdefg", at(1600), at(4600));
        let q = format!("x=1&{LINK_PARAM}={token}&y=%2F");
        let Decision::Exchange {
            location,
            cookie: Some(cookie),
        } = gate.decide("/abcdefg/", Some(&q), &HeaderMap::new(), true, at(1000))
        else {
            panic!("a valid link is refused");
        };
        assert_eq!(location, "/abcdefg/?x=1&y=%2F");
        assert!(cookie.starts_with("flowgate_access="), "{cookie}");
        for attr in [
            "; Path=/abcdefg/;",
            "; Max-Age=3600;",
            "; HttpOnly",
            "; SameSite=Lax",
            "; Secure",
        ] {
            assert!(cookie.contains(attr), "{attr} not in {cookie}");
        }
        let value = cookie.split(';').next().unwrap();
        assert_eq!(
            gate.decide(
                "/abcdefg/x",
                None,
                &cookie_header(&format!("a=b; {value}")),
                true,
                at(2000)
            ),
            Decision::Allow
        );
        // over http: no Secure; alone: the path without a '?'
        let Decision::Exchange {
            location,
            cookie: Some(cookie),
        } = gate.decide(
            "/abcdefg/",
            Some(&format!("{LINK_PARAM}={token}")),
            &HeaderMap::new(),
            false,
            at(1000),
        )
        else {
            panic!()
        };
        assert_eq!(location, "/abcdefg/");
        assert!(!cookie.contains("Secure"));
        // the session ends with the instance
        assert_eq!(
            gate.decide("/abcdefg/", None, &cookie_header(value), true, at(4600)),
            Decision::Deny(None)
        );
        // another instance's cookie value does not open this one
        let other = Gate::new(keys.clone(), "bcdefgh");
        assert_eq!(
            other.decide("/bcdefgh/", None, &cookie_header(value), true, at(2000)),
            Decision::Deny(None)
        );
        assert_eq!(
            gate.decide(
                "/abcdefg/",
                Some(&format!("{LINK_PARAM}=1.2.3")),
                &HeaderMap::new(),
                true,
                at(1000)
            ),
            Decision::Deny(Some(Denied::Invalid))
        );
        // an expired link in a browser still signed in: only the token goes
        assert_eq!(
            gate.decide(
                "/abcdefg/x",
                Some(&format!("{LINK_PARAM}={token}&y=1")),
                &cookie_header(value),
                true,
                at(2000)
            ),
            Decision::Exchange {
                location: "/abcdefg/x?y=1".into(),
                cookie: None
            }
        );
    }

    #[test]
    fn our_cookie_never_reaches_the_app() {
        let h = cookie_header("a=1; flowgate_access=xyz; b=2");
        assert_eq!(
            strip_cookie(&h, COOKIE),
            Some(Some(HeaderValue::from_static("a=1; b=2")))
        );
        assert_eq!(
            strip_cookie(&cookie_header("flowgate_access=xyz"), COOKIE),
            Some(None)
        );
        assert_eq!(strip_cookie(&cookie_header("a=1"), COOKIE), None);
    }
}
