//! The instance model shared by every backend: ids, workloads, artefact
//! sources, expiry and phase, with the validation the CLI and API apply.

use crate::error::{Error, Result};
use jiff::Timestamp;
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::time::Duration;

/// Ids that would shadow the adapter's own endpoints (`/healthz`, ...).
const RESERVED_IDS: [&str; 3] = ["healthz", "readyz", "metrics"];
const ID_LEN: usize = 7;

/// A 7-character instance id, `[a-z][a-z0-9]{6}`.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(try_from = "String", into = "String")]
pub struct InstanceId(String);

impl InstanceId {
    /// A fresh id from the OS's CSPRNG (collision checks are the backend's).
    pub fn random() -> Self {
        const FIRST: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
        const REST: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let mut rng = rand::rng(); // ThreadRng: ChaCha, seeded from the OS; a CSPRNG
        loop {
            let mut id = String::with_capacity(ID_LEN);
            id.push(FIRST[rng.random_range(0..FIRST.len())] as char);
            for _ in 1..ID_LEN {
                id.push(REST[rng.random_range(0..REST.len())] as char);
            }
            if !RESERVED_IDS.contains(&id.as_str()) {
                return Self(id);
            }
        }
    }

    /// Validates an id given by a user.
    pub fn parse(raw: &str) -> Result<Self> {
        let b = raw.as_bytes();
        let ok = b.len() == ID_LEN
            && b[0].is_ascii_lowercase()
            && b[1..]
                .iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            && !RESERVED_IDS.contains(&raw);
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(Error::invalid(
                "id",
                format!("{raw:?} is not an instance id ([a-z][a-z0-9]{{6}})"),
            ))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name every Kubernetes object of the instance has.
    pub fn object_name(&self) -> String {
        format!("mlflow-{}", self.0)
    }

    /// The path prefix, `/<id>`.
    pub fn prefix(&self) -> String {
        format!("/{}", self.0)
    }
}

impl TryFrom<String> for InstanceId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::parse(&s)
    }
}

impl From<InstanceId> for String {
    fn from(id: InstanceId) -> String {
        id.0
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where the job's artefacts are, and their checksum.
#[derive(
    Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema, utoipa::ToSchema,
)]
pub struct Artifacts {
    /// `https://`, `http://` (or `file://` for the local backend) URL of the archive.
    #[schema(pattern = r"^(https?|file)://\S+$", max_length = 2048)]
    pub url: String,
    /// sha256 of the archive, 64 lower-case hex digits.
    #[schema(pattern = "^[0-9a-fA-F]{64}$")]
    pub sha256: String,
}

impl Artifacts {
    /// Validates the URL scheme against `allowed` and normalises the checksum.
    pub fn validated(url: &str, sha256: &str, allowed_schemes: &[&str]) -> Result<Self> {
        let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        match scheme {
            Some(s) if allowed_schemes.contains(&s.as_str()) => {}
            _ => {
                return Err(Error::invalid(
                    "artifacts.url",
                    format!(
                        "{url:?}: the URL must start with {}",
                        allowed_schemes
                            .iter()
                            .map(|s| format!("{s}://"))
                            .collect::<Vec<_>>()
                            .join(" or ")
                    ),
                ));
            }
        }
        if url.len() > 2048 || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Error::invalid(
                "artifacts.url",
                "too long, or holds spaces or control characters",
            ));
        }
        let sha256 = adapter::fetch::normalise_checksum(sha256)
            .map_err(|e| Error::invalid("artifacts.sha256", e.to_string()))?;
        Ok(Self {
            url: url.to_owned(),
            sha256,
        })
    }
}

/// The portal's job or task id, kept raw, with a form that fits a label value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    raw: String,
}

impl Workload {
    /// Validates a workload id: 1 to 253 printable characters.
    pub fn parse(raw: &str) -> Result<Self> {
        if raw.is_empty()
            || raw.len() > 253
            || raw.chars().any(|c| c.is_control())
            || raw.trim() != raw
        {
            return Err(Error::invalid(
                "workload",
                format!("{raw:?}: 1 to 253 printable characters, no surrounding spaces"),
            ));
        }
        Ok(Self {
            raw: raw.to_owned(),
        })
    }

    /// As the portal gave it.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// A label value: the id itself when it fits, else `h-` and a hash.
    pub fn label_value(&self) -> String {
        label_safe(&self.raw)
    }
}

/// `value` when it is a valid label value, else `h-<hash>` (the raw value then
/// lives in an annotation).
pub fn label_safe(value: &str) -> String {
    let b = value.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if ok {
        value.to_owned()
    } else {
        format!("h-{}", &hex::encode(Sha256::digest(value.as_bytes()))[..40])
    }
}

/// Where an instance is in its life.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
    utoipa::ToSchema,
)]
pub enum Phase {
    /// Created, not serving yet (fetching artefacts, MLflow starting).
    Pending,
    /// Serving.
    Ready,
    /// Idle: its MLflow is stopped (the local process, or the pod scaled to
    /// zero); the id, the URL and the store stay, and the next visit wakes it.
    Sleeping,
    /// Cannot start (bad image, crash loop, artefacts refused).
    Failed,
    /// Past its expiry, waiting for gc.
    Expired,
}

impl Phase {
    /// Still the owner's: counted in quotas and found by dedupe.
    pub fn is_live(self) -> bool {
        matches!(self, Phase::Pending | Phase::Ready | Phase::Sleeping)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Who may open an instance.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
    utoipa::ToSchema,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Only a signed, short-lived access link (`access_url`, minted by the
    /// API) opens it; the adapter trades the link for a cookie scoped to
    /// `/<id>/`. The default.
    #[default]
    Link,
    /// The URL alone opens it.
    Public,
}

impl Access {
    /// What an instance recorded before access modes existed was made as.
    pub fn unrecorded() -> Self {
        Access::Public
    }

    /// As written in flags, annotations and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Link => "link",
            Access::Public => "public",
        }
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One MLflow instance as the portal sees it.
#[derive(
    Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema, utoipa::ToSchema,
)]
pub struct Instance {
    /// The 7-character id.
    #[schema(value_type = String, example = "k3x9q2a")]
    pub id: InstanceId,
    /// The portal's job or task id.
    pub workload: String,
    /// Who asked for it.
    pub owner: String,
    /// The artefacts it serves.
    pub artifacts: Artifacts,
    /// When it was created.
    #[schemars(with = "String")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: Timestamp,
    /// When it will be removed.
    #[schemars(with = "String")]
    #[schema(value_type = String, format = DateTime)]
    pub expires_at: Timestamp,
    /// Where a browser opens it.
    pub url: String,
    /// Where it is in its life.
    pub phase: Phase,
    /// Why it failed, when it did, or why visitors cannot reach it yet
    /// (a Gateway that refuses its HTTPRoute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Whether visitors may write (create experiments, delete runs, ...): off,
    /// the default, makes the instance a read-only viewer.
    #[serde(default)]
    pub writes: bool,
    /// Who may open it: `link` (only through `access_url`) or `public`.
    #[serde(default = "Access::unrecorded")]
    pub access: Access,
    /// A `link` instance's access link, fresh on every read: valid for a few
    /// minutes, it signs the browser in until the instance expires. Send the
    /// user here, never to `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_url: Option<String>,
    /// The credentials set its artefacts are fetched with (a name the
    /// installation grants; the secret itself is never shown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<String>,
    /// How long it may go unvisited before it sleeps, when asked for at
    /// create (`0`: never); absent: the server's `--idle-after`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_after: Option<String>,
}

impl Instance {
    /// True once past its expiry.
    pub fn is_expired(&self, now: Timestamp) -> bool {
        self.expires_at <= now
    }
}

/// What the portal asks for.
#[derive(Clone, Debug)]
pub struct CreateRequest {
    /// The job or task id.
    pub workload: Workload,
    /// Who asks.
    pub owner: String,
    /// The artefacts.
    pub artifacts: Artifacts,
    /// How long the instance lives.
    pub ttl: Duration,
    /// Let visitors write through the adapter (default: read-only).
    pub writes: bool,
    /// Who may open it.
    pub access: Access,
    /// The credentials set asked for by name (none: the installation's default).
    pub credentials: Option<String>,
    /// Sleep after this long without a visit (zero: never); none: the server's.
    pub idle_after: Option<Duration>,
}

/// The shortest `idle_after` a caller may ask for: an instance that sleeps
/// sooner would spend its life starting.
pub const MIN_IDLE_AFTER: Duration = Duration::from_secs(60);

/// Parses a caller's `idle_after`: `0` (never), or a duration such as `30m`
/// or `2h`, at least [`MIN_IDLE_AFTER`].
pub fn parse_idle_after(raw: &str) -> Result<Duration> {
    let d = humantime::parse_duration(raw.trim())
        .or_else(|e| {
            if raw.trim() == "0" {
                Ok(Duration::ZERO)
            } else {
                Err(e)
            }
        })
        .map_err(|e| Error::invalid("idle_after", format!("{raw:?}: {e}")))?;
    if !d.is_zero() && d < MIN_IDLE_AFTER {
        return Err(Error::invalid(
            "idle_after",
            format!(
                "{raw:?}: 0 (never) or at least {}",
                humantime::format_duration(MIN_IDLE_AFTER)
            ),
        ));
    }
    Ok(d)
}

/// An `idle_after` as recorded and shown: `0` for never.
pub fn show_idle_after(d: Duration) -> String {
    if d.is_zero() {
        "0".into()
    } else {
        humantime::format_duration(d).to_string()
    }
}

/// Bounds on time-to-live.
#[derive(Clone, Copy, Debug)]
pub struct TtlPolicy {
    /// Used when the request names none.
    pub default: Duration,
    /// Shortest allowed.
    pub min: Duration,
    /// Longest allowed (also the cap on extensions, counted from now).
    pub max: Duration,
}

impl Default for TtlPolicy {
    fn default() -> Self {
        // The paper's 24 h by default; a week at most.
        Self {
            default: Duration::from_secs(24 * 3600),
            min: Duration::from_secs(60),
            max: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl TtlPolicy {
    /// Parses a TTL like `24h` or `90m`, or takes the default.
    pub fn resolve(&self, raw: Option<&str>) -> Result<Duration> {
        let ttl = match raw {
            None => self.default,
            Some(s) => humantime::parse_duration(s)
                .map_err(|e| Error::invalid("ttl", format!("{s:?}: {e}")))?,
        };
        self.check(ttl)
    }

    /// The expiry after extending one that is `current` by `ttl` at `now`:
    /// from the current expiry (or now, if past), at most the longest TTL
    /// from now.
    pub fn extended(&self, current: Timestamp, now: Timestamp, ttl: Duration) -> Result<Timestamp> {
        let ttl = self.check(ttl)?;
        Ok(add(current.max(now), ttl).min(add(now, self.max)))
    }

    /// `expires_at`, capped at the longest TTL from `created_at`.
    pub fn capped(&self, created_at: Timestamp, expires_at: Timestamp) -> Timestamp {
        expires_at.min(add(created_at, self.max))
    }

    /// Checks bounds.
    pub fn check(&self, ttl: Duration) -> Result<Duration> {
        if ttl < self.min || ttl > self.max {
            return Err(Error::invalid(
                "ttl",
                format!(
                    "{} is outside {} to {}",
                    humantime::format_duration(ttl),
                    humantime::format_duration(self.min),
                    humantime::format_duration(self.max)
                ),
            ));
        }
        Ok(ttl)
    }
}

/// Adds a std duration to a timestamp.
pub fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(jiff::SignedDuration::try_from(d).unwrap_or(jiff::SignedDuration::MAX))
        .unwrap_or(Timestamp::MAX)
}

/// The owner name used when none is given.
pub const ANONYMOUS: &str = "anonymous";

/// Validates an owner name (from a token file or a flag).
pub fn validate_owner(raw: &str) -> Result<String> {
    if raw.is_empty() || raw.len() > 128 || raw.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(Error::invalid(
            "owner",
            format!("{raw:?}: 1 to 128 characters, no spaces"),
        ));
    }
    Ok(raw.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_after_is_zero_or_at_least_a_minute() {
        assert_eq!(parse_idle_after("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_idle_after("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(show_idle_after(parse_idle_after("90m").unwrap()), "1h 30m");
        assert_eq!(show_idle_after(Duration::ZERO), "0");
        for bad in ["1s", "59s", "", "soon", "-1m"] {
            assert!(parse_idle_after(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn random_ids_are_valid_and_differ() {
        let ids: std::collections::HashSet<_> = (0..2000).map(|_| InstanceId::random()).collect();
        assert!(ids.len() > 1990);
        for id in ids {
            InstanceId::parse(id.as_str()).unwrap();
        }
    }

    #[test]
    fn id_parsing() {
        for bad in [
            "", "abc", "1abcdef", "Abcdefg", "abcdefgh", "abc-def", "healthz", "metrics",
        ] {
            assert!(InstanceId::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            InstanceId::parse("k3x9q2a").unwrap().object_name(),
            "mlflow-k3x9q2a"
        );
    }

    #[test]
    fn workload_labels() {
        assert_eq!(Workload::parse("6543210").unwrap().label_value(), "6543210");
        assert_eq!(
            Workload::parse("task.42_a-b").unwrap().label_value(),
            "task.42_a-b"
        );
        let odd = Workload::parse("user/job #7").unwrap();
        assert!(odd.label_value().starts_with("h-") && odd.label_value().len() == 42);
        assert_eq!(odd.as_str(), "user/job #7");
        assert!(Workload::parse(&"x".repeat(254)).is_err());
        assert!(Workload::parse(" padded").is_err());
        assert!(Workload::parse("").is_err());
    }

    #[test]
    fn artifact_validation() {
        let sha = "A".repeat(64);
        let a = Artifacts::validated("https://x.example/a.tgz", &sha, &["https", "http"]).unwrap();
        assert_eq!(a.sha256, "a".repeat(64));
        assert!(
            Artifacts::validated("file:///etc/passwd", &sha, &["https", "http"])
                .unwrap_err()
                .to_string()
                .contains("must start with")
        );
        assert!(Artifacts::validated("https://x/a", "zz", &["https"]).is_err());
        assert!(Artifacts::validated("https://x/a b", &sha, &["https"]).is_err());
    }

    #[test]
    fn ttl_bounds() {
        let p = TtlPolicy::default();
        assert_eq!(p.resolve(None).unwrap(), Duration::from_secs(86400));
        assert_eq!(p.resolve(Some("12h")).unwrap(), Duration::from_secs(43200));
        assert!(
            p.resolve(Some("30s"))
                .unwrap_err()
                .to_string()
                .contains("outside")
        );
        assert!(p.resolve(Some("30d")).is_err());
        assert!(p.resolve(Some("soon")).is_err());
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let hour = Duration::from_secs(3600);
        let in_a_day = add(now, 24 * hour);
        assert_eq!(
            p.extended(in_a_day, now, 12 * hour).unwrap(),
            add(now, 36 * hour)
        );
        let past: Timestamp = "2025-12-31T00:00:00Z".parse().unwrap();
        assert_eq!(p.extended(past, now, hour).unwrap(), add(now, hour));
        let near_max = add(now, 7 * 24 * hour - hour);
        assert_eq!(
            p.extended(near_max, now, 12 * hour).unwrap(),
            add(now, p.max)
        );
        assert!(p.extended(now, now, Duration::from_secs(1)).is_err());
        assert_eq!(p.capped(now, add(now, 10_000 * hour)), add(now, p.max));
        assert_eq!(p.capped(now, in_a_day), in_a_day);
    }
}
