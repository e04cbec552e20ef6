//! The app's static files (`/static-files/`) as the adapter sends them —
//! rewritten and compressed, once per coding — kept in a small memory cache.
//! After the first request, the bundle a page load fetches costs neither an
//! encoder nor the app's time, and a burst of requests for it shares one
//! buffer instead of holding a stream's buffers per connection.
//!
//! It caches as a shared cache would (RFC 9111), narrowed to what is safe for
//! a sidecar that cannot know the app:
//! - **stored**: a `GET`'s `200` on the static route with a lifetime
//!   (`max-age`, `s-maxage`) or a validator (`ETag`, `Last-Modified`), without
//!   `no-store`, `private`, `Set-Cookie` or a `Vary` other than
//!   `Accept-Encoding` and `Origin` (requests with an `Origin` do not use the
//!   cache), and with a `Content-Length` within an entry's limit
//!   (half the cache). A body that, as sent, outgrows it (or takes longer
//!   than the upstream timeout) is sent on from where the fill stopped and
//!   not stored. Requests with a query, `Authorization`, `Range` or
//!   conditionals of their own go to the app as before; the app is asked for
//!   the key's coding only, and an answer in another coding is not stored;
//! - **fresh** entries are served without asking the app; **stale** ones (or
//!   any, for a request with `no-cache`, or older than its `max-age`, or
//!   fresh for less than its `min-fresh`) are revalidated with
//!   `If-None-Match` / `If-Modified-Since`; a `304` for the same version
//!   serves them with its `Cache-Control`, `Expires` and `Date`. A fill that
//!   fails puts the entry it was revalidating back;
//! - **one fill** per path and coding at a time: concurrent requests wait
//!   for it (as NGINX's `proxy_cache_lock`), up to [`WAIT`]; the fill reads
//!   the app's body at the app's pace, not the first client's;
//! - **bounded**: total bytes and paths remembered (least recently used go
//!   first), bytes per entry, and fills in flight (a fill that gave up
//!   storing counts until its client has the rest).

use crate::coding::Coding;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Longest a request waits for another request's fill of the same entry.
pub const WAIT: Duration = Duration::from_secs(10);
/// How long a path whose response could not be stored is not tried again.
const UNCACHEABLE_FOR: Duration = Duration::from_secs(10);
/// Fills in flight at once (each holds up to an entry's bytes, twice for a
/// moment when it ends).
const MAX_FILLS: usize = 2;
/// The largest body an entry may hold, whatever the cache's size: what a
/// fill buffers (MLflow's largest static file is its 4.4 MB bundle).
const MAX_ENTRY_BYTES: usize = 64 << 20;
/// The largest delta-seconds taken from a header (RFC 9111 §1.2.2).
const MAX_DELTA_SECONDS: u64 = 1 << 31;
/// Paths and codings remembered (stored, filling or uncacheable).
const MAX_SLOTS: usize = 1024;

/// What a stored response is known by: the path and query forwarded to the
/// app, and the coding the client prefers (`None`: identity).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    /// Path and query as forwarded.
    pub path_and_query: String,
    /// The coding asked for.
    pub coding: Option<Coding>,
}

/// A response as the adapter sent it, ready to be sent again.
#[derive(Debug)]
pub struct Stored {
    /// Its headers as shaped (prefix restored, `Content-Encoding`, `Vary`),
    /// without `Content-Length` (set from the body) or `Age`.
    pub headers: HeaderMap,
    /// Its body as sent.
    pub body: Bytes,
    /// The app's validators, to revalidate with.
    validators: Validators,
    /// How long it may be sent without asking the app, counted in its age
    /// (kept when a `304` gives none).
    lifetime: Duration,
    /// When the app last vouched for it, and the `Age` it gave then.
    checked_at: Instant,
    age_then: Duration,
}

impl Stored {
    /// The `Age` to send: the app's, plus the time since it vouched.
    pub fn age(&self, now: Instant) -> u64 {
        self.age_at(now).as_secs()
    }

    fn age_at(&self, now: Instant) -> Duration {
        self.age_then + now.saturating_duration_since(self.checked_at)
    }

    /// How much longer it is fresh (RFC 9111 §4.2: lifetime minus age).
    fn fresh_for(&self, now: Instant) -> Duration {
        self.lifetime.saturating_sub(self.age_at(now))
    }

    fn cost(&self) -> usize {
        self.body.len() + 512
    }
}

/// The validators of a stored response, as the app sent them.
#[derive(Clone, Debug, Default)]
struct Validators {
    etag: Option<HeaderValue>,
    last_modified: Option<HeaderValue>,
}

/// What a response says about its caching: read off the app's headers
/// before anything about them changes.
#[derive(Clone, Debug)]
pub struct Storable {
    validators: Validators,
    lifetime: Duration,
    age: Duration,
}

/// The request may be answered from the cache (the route class is checked
/// by the caller): a plain `GET` with no credentials, range or conditionals,
/// and no `Origin` (a page's scripts, styles and fonts on its own origin are
/// fetched without one; a cross-origin request may get other headers).
pub fn request_may_use(method: &Method, headers: &HeaderMap) -> bool {
    *method == Method::GET
        && !has_directive(headers.get_all(header::CACHE_CONTROL), "no-store")
        && [
            header::ORIGIN,
            header::AUTHORIZATION,
            header::RANGE,
            header::IF_NONE_MATCH,
            header::IF_MODIFIED_SINCE,
            header::IF_MATCH,
            header::IF_UNMODIFIED_SINCE,
            header::IF_RANGE,
        ]
        .iter()
        .all(|h| !headers.contains_key(h))
}

/// What a request's `Cache-Control` (and `Pragma`) asks of a cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestDirectives {
    /// The app's word, even on a fresh entry (`no-cache`: a hard reload).
    no_cache: bool,
    /// No entry older than this (`max-age`).
    max_age: Option<Duration>,
    /// No entry fresh for less than this (`min-fresh`).
    min_fresh: Option<Duration>,
}

impl RequestDirectives {
    /// Reads them off a request's headers.
    pub fn of(headers: &HeaderMap) -> Self {
        let cc = || headers.get_all(header::CACHE_CONTROL);
        Self {
            no_cache: has_directive(cc(), "no-cache")
                || has_directive(headers.get_all(header::PRAGMA), "no-cache"),
            max_age: directive_seconds(cc(), "max-age").map(Duration::from_secs),
            min_fresh: directive_seconds(cc(), "min-fresh").map(Duration::from_secs),
        }
    }

    /// Whether `stored` may answer the request without asking the app.
    fn accept(&self, stored: &Stored, now: Instant) -> bool {
        let left = stored.fresh_for(now);
        !self.no_cache
            && !left.is_zero()
            && self.max_age.is_none_or(|max| stored.age_at(now) <= max)
            && self.min_fresh.is_none_or(|min| left >= min)
    }
}

/// Whether a response of the app may be stored, with its lifetime; `None`
/// when it may not, or when its body is larger than `max_bytes`.
pub fn storable(status: StatusCode, headers: &HeaderMap, max_bytes: usize) -> Option<Storable> {
    if status != StatusCode::OK || headers.contains_key(header::SET_COOKIE) {
        return None;
    }
    let length: usize = headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    if length > max_bytes {
        return None;
    }
    // Accept-Encoding is in the key; Origin matches because only requests
    // without one use the cache (RFC 9111 §4.1: absent matches absent).
    // MLflow 3 sends `Vary: Origin` on every response.
    let vary_ok = headers.get_all(header::VARY).iter().all(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').map(str::trim).all(|f| {
                f.is_empty()
                    || f.eq_ignore_ascii_case("accept-encoding")
                    || f.eq_ignore_ascii_case("origin")
            })
        })
    });
    let cc = || headers.get_all(header::CACHE_CONTROL);
    if !vary_ok || has_directive(cc(), "no-store") || has_directive(cc(), "private") {
        return None;
    }
    let lifetime = lifetime_of(headers).unwrap_or(Duration::ZERO);
    let validators = Validators {
        etag: headers.get(header::ETAG).cloned(),
        last_modified: headers.get(header::LAST_MODIFIED).cloned(),
    };
    if lifetime.is_zero() && validators.etag.is_none() && validators.last_modified.is_none() {
        // neither served fresh nor revalidated: nothing to gain
        return None;
    }
    Some(Storable {
        validators,
        lifetime,
        age: age_of(headers),
    })
}

/// The lifetime a response's `Cache-Control` gives (`no-cache`: none), or
/// `None` without the header.
fn lifetime_of(headers: &HeaderMap) -> Option<Duration> {
    let cc = || headers.get_all(header::CACHE_CONTROL);
    cc().iter().next()?;
    Some(if has_directive(cc(), "no-cache") {
        Duration::ZERO
    } else {
        directive_seconds(cc(), "s-maxage")
            .or_else(|| directive_seconds(cc(), "max-age"))
            .map_or(Duration::ZERO, delta_seconds)
    })
}

fn age_of(headers: &HeaderMap) -> Duration {
    headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok()?.trim().parse().ok())
        .map_or(Duration::ZERO, delta_seconds)
}

/// A header's seconds, at most [`MAX_DELTA_SECONDS`]: a hostile `max-age`
/// or `Age` cannot overflow the clock.
fn delta_seconds(seconds: u64) -> Duration {
    Duration::from_secs(seconds.min(MAX_DELTA_SECONDS))
}

/// Whether a comma-separated header holds `name` as a directive.
fn has_directive<'a>(values: impl IntoIterator<Item = &'a HeaderValue>, name: &str) -> bool {
    directives(values).any(|(n, _)| n.eq_ignore_ascii_case(name))
}

/// The seconds of a `name=N` directive (the first, if repeated).
fn directive_seconds<'a>(
    values: impl IntoIterator<Item = &'a HeaderValue>,
    name: &str,
) -> Option<u64> {
    directives(values)
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| v?.trim_matches('"').parse().ok())
        .map(|n: u64| n.min(MAX_DELTA_SECONDS))
}

fn directives<'a>(
    values: impl IntoIterator<Item = &'a HeaderValue>,
) -> impl Iterator<Item = (&'a str, Option<&'a str>)> {
    values
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| match d.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim())),
            None => (d.trim(), None),
        })
        .filter(|(n, _)| !n.is_empty())
}

/// What a request does about the cache.
pub enum Lookup<'a> {
    /// Send this; the app is not asked.
    Fresh(Arc<Stored>),
    /// This request fills the entry: forward it (with the conditional
    /// headers [`Fill::conditionals`] gives, when a stale entry is held),
    /// then [`Fill::store`] or [`Fill::revalidated`].
    Fill(Fill<'a>),
    /// Another request is filling it: wait for that (up to [`WAIT`]). What
    /// it stored or revalidated answers this request too (the app vouched for
    /// it after this request came); otherwise look again.
    Wait(watch::Receiver<Option<Arc<Stored>>>),
    /// Forward as if there were no cache.
    Bypass,
}

enum Slot {
    Stored {
        stored: Arc<Stored>,
        used: u64,
    },
    Filling {
        done: watch::Receiver<Option<Arc<Stored>>>,
    },
    Uncacheable {
        until: Instant,
    },
}

#[derive(Default)]
struct Inner {
    slots: HashMap<Key, Slot>,
    /// Bytes of stored responses.
    bytes: usize,
    fills: usize,
    clock: u64,
}

/// The cache: one per adapter.
pub struct StaticCache {
    inner: Mutex<Inner>,
    max_bytes: usize,
}

impl StaticCache {
    /// A cache of at most `max_bytes`; an entry may take half of it, up to
    /// 64 MiB (MLflow's main bundle, 4.4 MB uncompressed, fits the default
    /// 16 MiB cache).
    pub fn new(max_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            max_bytes,
        }
    }

    /// The largest body an entry may hold.
    pub fn max_entry_bytes(&self) -> usize {
        (self.max_bytes / 2).min(MAX_ENTRY_BYTES)
    }

    /// Bytes stored now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // a panic while holding the lock leaves consistent maps: keep going
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the request for `key`, with `request`'s directives, does.
    pub fn lookup(&self, key: &Key, request: RequestDirectives, now: Instant) -> Lookup<'_> {
        let mut inner = self.lock();
        inner.clock += 1;
        let clock = inner.clock;
        let held = match inner.slots.get_mut(key) {
            Some(Slot::Stored { stored, used }) => {
                *used = clock;
                if request.accept(stored, now) {
                    return Lookup::Fresh(Arc::clone(stored));
                }
                Some(Arc::clone(stored))
            }
            Some(Slot::Filling { done, .. }) => return Lookup::Wait(done.clone()),
            Some(Slot::Uncacheable { until }) if now < *until => return Lookup::Bypass,
            Some(Slot::Uncacheable { .. }) | None => None,
        };
        if inner.fills >= MAX_FILLS {
            // the app is asked as if there were no cache; a held entry stays
            return Lookup::Bypass;
        }
        if !inner.slots.contains_key(key) && inner.slots.len() >= MAX_SLOTS {
            inner
                .slots
                .retain(|_, s| !matches!(s, Slot::Uncacheable { until } if *until <= now));
            if inner.slots.len() >= MAX_SLOTS && !evict_one(&mut inner) {
                return Lookup::Bypass;
            }
        }
        let (tx, rx) = watch::channel(None);
        if let Some(Slot::Stored { stored, .. }) =
            inner.slots.insert(key.clone(), Slot::Filling { done: rx })
        {
            // back in settle(), unless the app says it changed
            inner.bytes -= stored.cost();
        }
        inner.fills += 1;
        Lookup::Fill(Fill {
            cache: self,
            key: key.clone(),
            held,
            done: tx,
            settled: false,
        })
    }

    /// Counts as a fill until dropped: a fill that gave up storing (its
    /// body outgrew an entry, or its time ran out) still runs an encoder
    /// outside `--max-encoders` until its client has the rest.
    pub fn fill_permit(self: &Arc<Self>) -> FillPermit {
        self.lock().fills += 1;
        FillPermit(Arc::clone(self))
    }

    fn settle(&self, key: &Key, slot: Option<Slot>) {
        let mut inner = self.lock();
        inner.fills -= 1;
        match slot {
            Some(Slot::Stored { stored, .. }) => {
                inner.clock += 1;
                let used = inner.clock;
                inner.bytes += stored.cost();
                inner
                    .slots
                    .insert(key.clone(), Slot::Stored { stored, used });
                while inner.bytes > self.max_bytes && evict_one(&mut inner) {}
            }
            Some(other) => {
                inner.slots.insert(key.clone(), other);
            }
            None => {
                inner.slots.remove(key);
            }
        }
    }
}

/// Drops the least recently used stored entry; `false` when there is none.
fn evict_one(inner: &mut Inner) -> bool {
    let oldest = inner
        .slots
        .iter()
        .filter_map(|(k, s)| match s {
            Slot::Stored { used, .. } => Some((*used, k)),
            _ => None,
        })
        .min_by_key(|(used, _)| *used)
        .map(|(_, k)| k.clone());
    let Some(key) = oldest else { return false };
    if let Some(Slot::Stored { stored, .. }) = inner.slots.remove(&key) {
        inner.bytes -= stored.cost();
    }
    true
}

/// See [`StaticCache::fill_permit`].
pub struct FillPermit(Arc<StaticCache>);

impl Drop for FillPermit {
    fn drop(&mut self) {
        self.0.lock().fills -= 1;
    }
}

/// One request's fill of an entry. Dropped without an outcome (the client
/// left, the app failed), the entry it held goes back (or, with none, the
/// next request tries); either way the requests waiting for it go on.
pub struct Fill<'a> {
    cache: &'a StaticCache,
    key: Key,
    /// The entry being revalidated, if any.
    held: Option<Arc<Stored>>,
    /// What the fill kept, for the requests waiting on it; they wake when it
    /// is sent or the fill is dropped.
    done: watch::Sender<Option<Arc<Stored>>>,
    settled: bool,
}

impl Fill<'_> {
    /// The coding the entry is for (`None`: identity): what the app is
    /// asked for, and what an answer must be in to be stored.
    pub fn coding(&self) -> Option<Coding> {
        self.key.coding
    }

    /// The headers that make the app answer `304` if the held entry is
    /// still good (none when there is no entry to revalidate).
    pub fn conditionals(&self) -> Vec<(header::HeaderName, HeaderValue)> {
        let Some(held) = &self.held else {
            return Vec::new();
        };
        let v = &held.validators;
        match (&v.etag, &v.last_modified) {
            (Some(etag), _) => vec![(header::IF_NONE_MATCH, etag.clone())],
            (None, Some(lm)) => vec![(header::IF_MODIFIED_SINCE, lm.clone())],
            (None, None) => Vec::new(),
        }
    }

    /// The app answered `304` (`headers`) to [`Fill::conditionals`]: the
    /// held entry with the `304`'s `Cache-Control`, `Expires` and `Date`,
    /// good for the lifetime it gives (or the one it had). Kept again unless
    /// the `304` forbids it. `None` when nothing was held, or the `304` names
    /// another version than the one held (which is then dropped).
    pub fn revalidated(mut self, headers: &HeaderMap, now: Instant) -> Option<Arc<Stored>> {
        let held = self.held.take()?;
        if headers
            .get(header::ETAG)
            .is_some_and(|etag| held.validators.etag.as_ref() != Some(etag))
        {
            return None;
        }
        let mut kept_headers = held.headers.clone();
        for name in [header::CACHE_CONTROL, header::EXPIRES, header::DATE] {
            if headers.contains_key(&name) {
                kept_headers.remove(&name);
                for v in headers.get_all(&name) {
                    kept_headers.append(name.clone(), v.clone());
                }
            }
        }
        let lifetime = lifetime_of(headers).unwrap_or(held.lifetime);
        let age = age_of(headers);
        let fresh = Arc::new(Stored {
            headers: kept_headers,
            body: held.body.clone(),
            validators: held.validators.clone(),
            lifetime,
            checked_at: now,
            age_then: age,
        });
        let cc = || headers.get_all(header::CACHE_CONTROL);
        let keep = !headers.contains_key(header::SET_COOKIE)
            && !has_directive(cc(), "no-store")
            && !has_directive(cc(), "private");
        self.finish(keep.then(|| Slot::Stored {
            stored: Arc::clone(&fresh),
            used: 0,
        }));
        Some(fresh)
    }

    /// Stores a response as sent (when it fits; it is returned either way).
    pub fn store(
        mut self,
        storable: Storable,
        mut headers: HeaderMap,
        body: Bytes,
        now: Instant,
    ) -> Arc<Stored> {
        headers.remove(header::CONTENT_LENGTH);
        headers.remove(header::TRANSFER_ENCODING);
        headers.remove(header::AGE);
        let stored = Arc::new(Stored {
            headers,
            body,
            validators: storable.validators,
            lifetime: storable.lifetime,
            checked_at: now,
            age_then: storable.age,
        });
        self.held = None;
        let fits = stored.body.len() <= self.cache.max_entry_bytes();
        self.finish(Some(if fits {
            Slot::Stored {
                stored: Arc::clone(&stored),
                used: 0,
            }
        } else {
            Slot::Uncacheable {
                until: now + UNCACHEABLE_FOR,
            }
        }));
        stored
    }

    /// The app's answer may not be stored: the path is not tried again for a
    /// while, so requests for it do not wait on each other.
    pub fn uncacheable(mut self, now: Instant) {
        self.held = None;
        self.finish(Some(Slot::Uncacheable {
            until: now + UNCACHEABLE_FOR,
        }));
    }

    fn finish(&mut self, slot: Option<Slot>) {
        self.settled = true;
        if let Some(Slot::Stored { stored, .. }) = &slot {
            self.done.send_replace(Some(Arc::clone(stored)));
        }
        self.cache.settle(&self.key, slot);
    }
}

impl Drop for Fill<'_> {
    fn drop(&mut self) {
        if !self.settled {
            // a failed revalidation (a hard reload whose client left, the app
            // down) does not cost the entry it held
            let held = self
                .held
                .take()
                .map(|stored| Slot::Stored { stored, used: 0 });
            self.cache.settle(&self.key, held);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(p: &str) -> Key {
        Key {
            path_and_query: p.into(),
            coding: Some(Coding::Zstd),
        }
    }

    fn head(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn bundle_head() -> HeaderMap {
        head(&[
            ("content-length", "1000"),
            ("cache-control", "public, max-age=60"),
            ("etag", "\"v1\""),
        ])
    }

    #[test]
    fn what_may_be_stored() {
        let ok = StatusCode::OK;
        assert!(storable(ok, &bundle_head(), 1000).is_some());
        assert!(storable(ok, &bundle_head(), 999).is_none(), "too large");
        assert!(storable(StatusCode::NOT_FOUND, &bundle_head(), 1000).is_none());
        for (name, value) in [
            ("set-cookie", "s=1"),
            ("cache-control", "no-store"),
            ("cache-control", "Private"),
            ("vary", "Cookie"),
            ("vary", "accept-encoding, *"),
            ("vary", "Origin, Referer"),
        ] {
            let mut h = bundle_head();
            h.append(
                header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
            assert!(storable(ok, &h, 1000).is_none(), "{name}: {value}");
        }
        let no_length = head(&[("cache-control", "max-age=60")]);
        assert!(storable(ok, &no_length, 1000).is_none(), "unknown length");
        let nothing = head(&[("content-length", "10")]);
        assert!(
            storable(ok, &nothing, 1000).is_none(),
            "no lifetime, no validator"
        );
        let validator_only = head(&[("content-length", "10"), ("last-modified", "x")]);
        let s = storable(ok, &validator_only, 1000).unwrap();
        assert_eq!(s.lifetime, Duration::ZERO, "stored, revalidated each time");
        let shared = head(&[
            ("content-length", "10"),
            ("cache-control", "max-age=5, s-maxage=\"70\""),
            ("age", "20"),
            ("vary", "Origin"),
            ("vary", "Accept-Encoding"),
        ]);
        let s = storable(ok, &shared, 1000).unwrap();
        assert_eq!(
            (s.lifetime, s.age),
            (Duration::from_secs(70), Duration::from_secs(20))
        );
    }

    #[test]
    fn which_requests_may_use_it() {
        assert!(request_may_use(&Method::GET, &head(&[("accept", "*/*")])));
        assert!(!request_may_use(&Method::HEAD, &HeaderMap::new()));
        assert!(!request_may_use(&Method::POST, &HeaderMap::new()));
        for (name, value) in [
            ("authorization", "Basic eDp5"),
            ("range", "bytes=0-1"),
            ("if-none-match", "W/\"v1\""),
            ("if-modified-since", "Mon, 01 Jan 2024 00:00:00 GMT"),
            ("cache-control", "no-store"),
            ("origin", "https://mlflow.example.org"),
        ] {
            assert!(
                !request_may_use(&Method::GET, &head(&[(name, value)])),
                "{name}"
            );
        }
        assert_eq!(
            RequestDirectives::of(&head(&[("pragma", "no-cache")])),
            reload()
        );
        assert_eq!(
            RequestDirectives::of(&head(&[("cache-control", "max-age=0, no-cache")])),
            RequestDirectives {
                no_cache: true,
                max_age: Some(Duration::ZERO),
                min_fresh: None,
            }
        );
    }

    fn any() -> RequestDirectives {
        RequestDirectives::default()
    }

    fn reload() -> RequestDirectives {
        RequestDirectives::of(&head(&[("cache-control", "no-cache")]))
    }

    /// A cache holding `/static-files/main.js` (max-age=60, ETag "v1"),
    /// stored at the returned instant.
    fn holding(k: &Key) -> (StaticCache, Instant) {
        let cache = StaticCache::new(4 << 20);
        let now = Instant::now();
        let s = storable(StatusCode::OK, &bundle_head(), 1 << 20).unwrap();
        fill(&cache, k, now).store(s, HeaderMap::new(), Bytes::from("js"), now);
        (cache, now)
    }

    #[test]
    fn the_requests_own_limits_on_age() {
        let k = key("/static-files/main.js");
        let (cache, now) = holding(&k);
        let at = now + Duration::from_secs(10);
        let cc = |v: &str| RequestDirectives::of(&head(&[("cache-control", v)]));
        assert!(matches!(
            cache.lookup(&k, cc("max-age=10"), at),
            Lookup::Fresh(_)
        ));
        assert!(matches!(
            cache.lookup(&k, cc("min-fresh=50"), at),
            Lookup::Fresh(_)
        ));
        assert!(
            matches!(cache.lookup(&k, cc("max-age=9"), at), Lookup::Fill(_)),
            "older than the request takes: revalidated"
        );
        assert!(
            matches!(cache.lookup(&k, cc("min-fresh=51"), at), Lookup::Fill(_)),
            "fresh for too short a time: revalidated"
        );
    }

    #[test]
    fn a_failed_revalidation_keeps_the_entry() {
        let k = key("/static-files/main.js");
        let (cache, now) = holding(&k);
        let bytes = cache.bytes();
        let Lookup::Fill(f) = cache.lookup(&k, reload(), now) else {
            panic!("a hard reload asks the app");
        };
        drop(f); // its client left, or the app failed
        assert_eq!(cache.bytes(), bytes);
        assert!(matches!(cache.lookup(&k, any(), now), Lookup::Fresh(_)));
    }

    #[test]
    fn a_304_updates_the_entry_and_keeps_its_lifetime() {
        let k = key("/static-files/main.js");
        let (cache, now) = holding(&k);
        let later = now + Duration::from_secs(61);
        // a 304 with nothing about caching: the same 60 s again
        let again = fill(&cache, &k, later).revalidated(&HeaderMap::new(), later);
        assert!(again.is_some());
        let t = later + Duration::from_secs(59);
        assert!(matches!(cache.lookup(&k, any(), t), Lookup::Fresh(_)));
        // one with a new Cache-Control and Date: those, from then on
        let t = later + Duration::from_secs(61);
        let h = head(&[
            ("cache-control", "max-age=600"),
            ("date", "Tue, 01 Dec 2026 10:00:00 GMT"),
        ]);
        let again = fill(&cache, &k, t).revalidated(&h, t).unwrap();
        assert_eq!(again.headers[header::CACHE_CONTROL], "max-age=600");
        assert_eq!(again.headers[header::DATE], "Tue, 01 Dec 2026 10:00:00 GMT");
        let t2 = t + Duration::from_secs(599);
        assert!(matches!(cache.lookup(&k, any(), t2), Lookup::Fresh(_)));
    }

    #[test]
    fn a_304_for_another_version_or_forbidding_storage_is_not_kept() {
        let k = key("/static-files/main.js");
        let (cache, now) = holding(&k);
        let later = now + Duration::from_secs(61);
        let other = head(&[("etag", "\"v2\"")]);
        assert!(fill(&cache, &k, later).revalidated(&other, later).is_none());
        let Lookup::Fill(f) = cache.lookup(&k, any(), later) else {
            panic!("dropped");
        };
        assert!(f.conditionals().is_empty(), "nothing held any more");
        drop(f);
        let (cache, now) = holding(&k);
        let later = now + Duration::from_secs(61);
        let no_store = head(&[("etag", "\"v1\""), ("cache-control", "no-store")]);
        let once = fill(&cache, &k, later).revalidated(&no_store, later);
        assert!(once.is_some(), "it answers the request that asked");
        assert!(matches!(cache.lookup(&k, any(), later), Lookup::Fill(_)));
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn hostile_lifetimes_and_ages_do_not_overflow() {
        let huge = u64::MAX.to_string();
        let h = head(&[
            ("content-length", "2"),
            ("cache-control", &format!("max-age={huge}")),
            ("age", &huge),
        ]);
        let s = storable(StatusCode::OK, &h, 100).unwrap();
        let cache = StaticCache::new(1 << 20);
        let now = Instant::now();
        let k = key("/x");
        let kept = fill(&cache, &k, now).store(s, HeaderMap::new(), Bytes::from("js"), now);
        assert_eq!(kept.age(now), MAX_DELTA_SECONDS);
        let h = head(&[
            ("content-length", "2"),
            ("cache-control", &format!("max-age={huge}, s-maxage={huge}")),
        ]);
        let s = storable(StatusCode::OK, &h, 100).unwrap();
        let k = key("/y");
        fill(&cache, &k, now).store(s, HeaderMap::new(), Bytes::from("js"), now);
        assert!(matches!(cache.lookup(&k, any(), now), Lookup::Fresh(_)));
    }

    #[test]
    fn a_full_table_makes_room_for_new_paths() {
        let cache = StaticCache::new(4 << 20);
        let now = Instant::now();
        let s = || storable(StatusCode::OK, &bundle_head(), 1000).unwrap();
        for i in 0..MAX_SLOTS {
            fill(&cache, &key(&format!("/f{i}")), now).store(
                s(),
                HeaderMap::new(),
                Bytes::from("x"),
                now,
            );
        }
        assert!(
            matches!(cache.lookup(&key("/new"), any(), now), Lookup::Fill(_)),
            "the least recently used path goes, not the new one"
        );
        assert!(matches!(
            cache.lookup(&key("/f0"), any(), now),
            Lookup::Fill(_)
        ));
        assert!(matches!(
            cache.lookup(&key("/f1"), any(), now),
            Lookup::Fresh(_)
        ));
    }

    fn fill<'a>(cache: &'a StaticCache, k: &Key, now: Instant) -> Fill<'a> {
        match cache.lookup(k, any(), now) {
            Lookup::Fill(f) => f,
            _ => panic!("expected a fill"),
        }
    }

    #[test]
    fn one_fill_at_a_time_then_fresh_then_revalidated() {
        let cache = StaticCache::new(4 << 20);
        let now = Instant::now();
        let k = key("/static-files/main.js");
        let f = fill(&cache, &k, now);
        let Lookup::Wait(done) = cache.lookup(&k, any(), now) else {
            panic!("a second request waits for the fill");
        };
        assert!(f.conditionals().is_empty(), "nothing to revalidate yet");
        let s = storable(StatusCode::OK, &bundle_head(), 1 << 20).unwrap();
        f.store(
            s,
            head(&[("content-encoding", "zstd")]),
            Bytes::from("js"),
            now,
        );
        assert!(done.has_changed().is_err(), "the waiter is woken");
        let Lookup::Fresh(hit) = cache.lookup(&k, any(), now + Duration::from_secs(59)) else {
            panic!("fresh for max-age");
        };
        assert_eq!(&hit.body[..], b"js");
        assert_eq!(hit.age(now + Duration::from_secs(59)), 59);
        // stale: one request revalidates, with the app's validator
        let later = now + Duration::from_secs(61);
        let f = fill(&cache, &k, later);
        assert_eq!(
            f.conditionals(),
            vec![(header::IF_NONE_MATCH, HeaderValue::from_static("\"v1\""))]
        );
        assert!(matches!(cache.lookup(&k, any(), later), Lookup::Wait(_)));
        let again = f.revalidated(&HeaderMap::new(), later).unwrap();
        assert_eq!(&again.body[..], b"js");
        assert!(matches!(
            cache.lookup(&k, any(), later + Duration::from_secs(30)),
            Lookup::Fresh(_)
        ));
        // a hard reload asks the app even when fresh
        assert!(matches!(cache.lookup(&k, reload(), later), Lookup::Fill(_)));
    }

    #[test]
    fn a_fill_given_up_lets_the_next_request_try_and_uncacheable_paths_bypass() {
        let cache = StaticCache::new(4 << 20);
        let now = Instant::now();
        let k = key("/static-files/a.js");
        drop(fill(&cache, &k, now));
        fill(&cache, &k, now).uncacheable(now);
        assert!(matches!(cache.lookup(&k, any(), now), Lookup::Bypass));
        assert!(matches!(
            cache.lookup(&k, any(), now + UNCACHEABLE_FOR),
            Lookup::Fill(_)
        ));
    }

    #[test]
    fn an_entry_is_bounded_whatever_the_cache_size() {
        assert_eq!(StaticCache::new(16 << 20).max_entry_bytes(), 8 << 20);
        assert_eq!(StaticCache::new(1 << 40).max_entry_bytes(), MAX_ENTRY_BYTES);
    }

    #[test]
    fn bounded_fills_and_bytes() {
        let cache = StaticCache::new(4000);
        let now = Instant::now();
        let fills: Vec<_> = (0..MAX_FILLS)
            .map(|i| fill(&cache, &key(&format!("/f{i}")), now))
            .collect();
        assert!(matches!(
            cache.lookup(&key("/other"), any(), now),
            Lookup::Bypass
        ));
        drop(fills);
        let body = |n: usize| Bytes::from(vec![b'x'; n]);
        let s = || storable(StatusCode::OK, &bundle_head(), 1000).unwrap();
        fill(&cache, &key("/a"), now).store(s(), HeaderMap::new(), body(900), now);
        fill(&cache, &key("/b"), now).store(s(), HeaderMap::new(), body(900), now);
        assert!(matches!(
            cache.lookup(&key("/a"), any(), now),
            Lookup::Fresh(_)
        ));
        fill(&cache, &key("/c"), now).store(s(), HeaderMap::new(), body(900), now);
        assert!(cache.bytes() <= 4000);
        assert!(
            matches!(cache.lookup(&key("/b"), any(), now), Lookup::Fill(_)),
            "the least recently used went"
        );
        assert!(matches!(
            cache.lookup(&key("/a"), any(), now),
            Lookup::Fresh(_)
        ));
        let big = fill(&cache, &key("/big"), now).store(s(), HeaderMap::new(), body(2001), now);
        assert_eq!(big.body.len(), 2001, "sent, though too large to keep");
        assert!(matches!(
            cache.lookup(&key("/big"), any(), now),
            Lookup::Bypass
        ));
    }
}
