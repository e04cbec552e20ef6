//! The service layer: [`Provisioner`] sits between the front ends (the CLI,
//! the REST API, the operator's backend) and the backends, and owns the rules
//! of an instance, once:
//! - **owner**: who the caller is and what it may see and change ([`Caller`]);
//! - **input**: which URL schemes a caller may use (`file://` only for an open
//!   API on loopback), the TTL bounds and the extension cap;
//! - **dedupe and quotas**: a create for a workload and artefacts the owner
//!   already has live returns that instance; an owner holds at most
//!   [`Quotas::per_owner`] live instances. Both hold under concurrency, across
//!   replicas, through a [`Ledger`] of claims written by compare-and-swap;
//! - **events**: the launch progress a caller can follow;
//! - **access links**: a `link` instance is shown with a fresh, signed
//!   `access_url` on every read ([`Links`]); creating one needs the
//!   installation's access keys;
//! - **credentials**: the credentials set an instance's fetch uses is one the
//!   installation grants its owner ([`CredentialRules`]).
//!
//! Backends ([`Backend`]) only make, read and remove their objects or
//! processes.

use crate::access::Links;
use crate::backend::{Backend, ListFilter, NewInstance, Removed};
use crate::credentials::CredentialRules;
use crate::events::{self, Event, EventSource};
use crate::instance::{
    Access, Artifacts, CreateRequest, Instance, InstanceId, Phase, TtlPolicy, add,
};
use crate::ledger::{Claim, Ledger};
use crate::{Error, Result};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use jiff::Timestamp;
use rand::Rng;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A claim older than this was abandoned (its creator died): creates of the
/// same artefacts stop waiting for it and it no longer counts for quotas.
const CLAIM_STALE: Duration = Duration::from_secs(60);
/// The longest a create keeps retrying its claim against other writers.
const CLAIM_DEADLINE: Duration = Duration::from_secs(90);

/// Quotas on live (Pending or Ready) instances.
#[derive(Clone, Copy, Debug)]
pub struct Quotas {
    /// Per owner (held under concurrency).
    pub per_owner: usize,
    /// For everyone together (checked from the live count: a burst from
    /// several owners at once can pass it by the number of creates in flight).
    pub total: usize,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            per_owner: 20,
            total: 200,
        }
    }
}

impl Quotas {
    /// No limits (the CLI: whoever runs it has the cluster's credentials).
    pub fn unlimited() -> Self {
        Self {
            per_owner: usize::MAX,
            total: usize::MAX,
        }
    }
}

/// The rules a [`Provisioner`] applies.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// TTL bounds (and the cap on extensions, counted from now).
    pub ttl: TtlPolicy,
    /// Quotas.
    pub quotas: Quotas,
    /// Whether callers may name `file://` URLs (only an API without tokens
    /// on loopback: everyone who can call it can read the machine's files
    /// anyway).
    pub allow_file: bool,
    /// Event streams one caller may hold open at once.
    pub streams_per_caller: usize,
}

/// Who is asking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// Whoever runs the CLI, or any caller of an API without tokens: may
    /// act for any owner.
    Anyone,
    /// A caller authenticated as this owner: sees and changes only its own.
    Owner(String),
}

impl Caller {
    /// The owner a create is made for: the token's, or the one asked for
    /// (anonymous when none), refusing a token that asks for someone else.
    pub fn owner_for(&self, asked: Option<&str>) -> Result<String> {
        match (self, asked) {
            (Caller::Owner(mine), Some(asked)) if mine != asked => Err(Error::Forbidden(
                "a token may only create instances for its own owner".into(),
            )),
            (Caller::Owner(mine), _) => Ok(mine.clone()),
            (Caller::Anyone, Some(asked)) => crate::instance::validate_owner(asked),
            (Caller::Anyone, None) => Ok(crate::instance::ANONYMOUS.to_owned()),
        }
    }

    fn may_touch(&self, instance: &Instance) -> Result<()> {
        match self {
            Caller::Owner(o) if *o != instance.owner => Err(Error::Forbidden(format!(
                "instance {} belongs to another owner",
                instance.id
            ))),
            _ => Ok(()),
        }
    }
}

/// The result of a create.
#[derive(Debug, Clone)]
pub struct Created {
    /// The instance (new, or the owner's live one for the same workload and artefacts).
    pub instance: Instance,
    /// False when an existing instance was returned.
    pub created: bool,
}

/// The service over one backend.
pub struct Provisioner {
    backend: Arc<dyn Backend>,
    ledger: Arc<dyn Ledger>,
    policy: Policy,
    source: Option<Arc<dyn EventSource>>,
    /// Open event streams per caller.
    streams: Arc<Mutex<HashMap<String, usize>>>,
    /// Mints access links; `None`: `link` instances cannot be made.
    links: Option<Links>,
    /// Which credentials sets an owner's fetch may use.
    credentials: CredentialRules,
}

/// Counts an open stream of a caller while it lives.
struct StreamSlot {
    streams: Arc<Mutex<HashMap<String, usize>>>,
    key: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut streams = self.streams.lock().expect("streams lock");
        if let Some(n) = streams.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                streams.remove(&self.key);
            }
        }
    }
}

/// The ledger an owner's claims are in.
fn ledger_name(owner: &str) -> String {
    format!("owner/{owner}")
}

/// What a create is for: the same workload and artefacts give the same key.
fn claim_key(workload: &str, sha256: &str, writes: bool, access: Access) -> String {
    let mut h = Sha256::new();
    h.update(workload.as_bytes());
    h.update([0]);
    h.update(sha256.as_bytes());
    h.update([u8::from(writes)]);
    h.update(access.as_str().as_bytes());
    hex::encode(h.finalize())[..32].to_owned()
}

fn live(i: &Instance) -> bool {
    i.phase.is_live()
}

impl Provisioner {
    /// The service over `backend`, with claims kept in `ledger`.
    pub fn new(backend: Arc<dyn Backend>, ledger: Arc<dyn Ledger>, policy: Policy) -> Self {
        Self {
            backend,
            ledger,
            policy,
            source: None,
            streams: Arc::default(),
            links: None,
            credentials: CredentialRules::default(),
        }
    }

    /// Lets owners' fetches use the credentials sets `rules` grant them.
    pub fn with_credentials(mut self, rules: CredentialRules) -> Self {
        self.credentials = rules;
        self
    }

    /// Mints access links to `link` instances with these keys.
    pub fn with_links(mut self, links: Links) -> Self {
        self.links = Some(links);
        self
    }

    /// Takes launch events from `source` (one shared watch) instead of
    /// polling per stream.
    pub fn with_events(mut self, source: Arc<dyn EventSource>) -> Self {
        self.source = Some(source);
        self
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// TTL bounds.
    pub fn ttl_policy(&self) -> TtlPolicy {
        self.policy.ttl
    }

    /// The URL schemes callers may name.
    pub fn schemes(&self) -> Vec<&'static str> {
        self.backend
            .schemes()
            .iter()
            .copied()
            .filter(|s| *s != "file" || self.policy.allow_file)
            .collect()
    }

    /// Validates raw artefact input against the schemes callers may use.
    pub fn artifacts(&self, url: &str, sha256: &str) -> Result<Artifacts> {
        Artifacts::validated(url, sha256, &self.schemes())
    }

    /// Creates an instance, or returns the owner's live one for the same
    /// workload and artefacts; refuses past the owner's quota.
    pub async fn create(&self, request: CreateRequest) -> Result<Created> {
        let mut request = request;
        let artifacts = self.artifacts(&request.artifacts.url, &request.artifacts.sha256)?;
        request.artifacts = artifacts.clone();
        let ttl = self.policy.ttl.check(request.ttl)?;
        let owner = request.owner.clone();
        let credentials = self
            .credentials
            .resolve(&owner, request.credentials.as_deref())?;
        if request.idle_after.is_some() && !self.backend.sleeps() {
            return Err(Error::Invalid {
                field: "idle_after",
                message:
                    "this backend does not put instances to sleep yet (the local backend does)"
                        .into(),
            });
        }
        if request.access == Access::Link && self.links.is_none() {
            return Err(Error::Invalid {
                field: "access",
                message: "this server has no access keys (--access-keys), so it cannot make \
                          `link` instances; ask for access `public`, or configure the keys"
                    .into(),
            });
        }
        let key = claim_key(
            request.workload.as_str(),
            &artifacts.sha256,
            request.writes,
            request.access,
        );
        let mine = match self.claim(&owner, &key, &request).await? {
            Ok(by) => by,
            Err(existing) => {
                return Ok(Created {
                    instance: self.present(existing),
                    created: false,
                });
            }
        };
        let now = Timestamp::now();
        let made = self
            .backend
            .create(NewInstance {
                workload: request.workload,
                owner: owner.clone(),
                artifacts,
                created_at: now,
                expires_at: add(now, ttl),
                writes: request.writes,
                access: request.access,
                credentials,
                idle_after: request.idle_after,
            })
            .await;
        // Made (or not): the objects now speak for themselves.
        if let Err(e) = self.release(&owner, &mine).await {
            tracing::warn!(%owner, error = %e, "could not release a claim (it lapses by itself)");
        }
        Ok(Created {
            instance: self.present(made?),
            created: true,
        })
    }

    /// Claims `key` for `owner`: Ok(claim id) when this create may go ahead,
    /// Err(instance) when the owner already has it live.
    async fn claim(
        &self,
        owner: &str,
        key: &str,
        request: &CreateRequest,
    ) -> Result<std::result::Result<String, Instance>> {
        let name = ledger_name(owner);
        let deadline = Instant::now() + CLAIM_DEADLINE;
        let by = InstanceId::random().to_string();
        loop {
            if Instant::now() >= deadline {
                return Err(Error::Timeout(
                    "too many creates at once for this owner; try again".into(),
                ));
            }
            let ledger = self.ledger.read(&name).await?;
            let mine: Vec<Instance> = self
                .backend
                .list(&ListFilter {
                    workload: None,
                    owner: Some(owner.to_owned()),
                })
                .await?
                .into_iter()
                .filter(live)
                .collect();
            if let Some(existing) = mine.iter().find(|i| {
                i.workload == request.workload.as_str()
                    && i.artifacts.sha256 == request.artifacts.sha256
                    && i.writes == request.writes
                    && i.access == request.access
            }) {
                return Ok(Err(existing.clone()));
            }
            let now = Timestamp::now();
            let fresh: Vec<Claim> = ledger
                .claims
                .into_iter()
                .filter(|c| add(c.at, CLAIM_STALE) > now)
                .collect();
            if fresh.iter().any(|c| c.key == key) {
                // Another create (here or on another replica) is making it:
                // wait for its instance.
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            let live_keys: Vec<String> = mine
                .iter()
                .map(|i| claim_key(&i.workload, &i.artifacts.sha256, i.writes, i.access))
                .collect();
            let in_flight = fresh.iter().filter(|c| !live_keys.contains(&c.key)).count();
            let count = mine.len() + in_flight;
            if count >= self.policy.quotas.per_owner {
                return Err(Error::Quota(format!(
                    "{owner} already has {count} live instances (limit {})",
                    self.policy.quotas.per_owner
                )));
            }
            if self.policy.quotas.total != usize::MAX {
                let total = self.backend.count_live(None).await?;
                if total >= self.policy.quotas.total {
                    return Err(Error::Quota(format!(
                        "{total} instances are live (limit {})",
                        self.policy.quotas.total
                    )));
                }
            }
            let mut claims = fresh;
            claims.push(Claim {
                key: key.to_owned(),
                at: now,
                by: by.clone(),
            });
            if self
                .ledger
                .write(&name, &claims, ledger.version.as_deref())
                .await?
            {
                return Ok(Ok(by));
            }
            // Somebody wrote in between: read again, after a little jitter.
            let ms = rand::rng().random_range(5..50);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }

    /// Removes this create's claim.
    async fn release(&self, owner: &str, by: &str) -> Result<()> {
        let name = ledger_name(owner);
        for _ in 0..50 {
            let ledger = self.ledger.read(&name).await?;
            let now = Timestamp::now();
            let claims: Vec<Claim> = ledger
                .claims
                .iter()
                .filter(|c| c.by != by && add(c.at, CLAIM_STALE) > now)
                .cloned()
                .collect();
            if claims.len() == ledger.claims.len() {
                return Ok(());
            }
            if self
                .ledger
                .write(&name, &claims, ledger.version.as_deref())
                .await?
            {
                return Ok(());
            }
            let ms = rand::rng().random_range(5..50);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Err(Error::Timeout("releasing a claim".into()))
    }

    /// One instance the caller may see.
    pub async fn get(&self, caller: &Caller, id: &InstanceId) -> Result<Instance> {
        let instance = self.backend.get(id).await?;
        caller.may_touch(&instance)?;
        Ok(self.present(instance))
    }

    /// Instances matching `filter` (a caller with a token sees only its own).
    pub async fn list(&self, caller: &Caller, filter: ListFilter) -> Result<Vec<Instance>> {
        let filter = match caller {
            Caller::Owner(o) => ListFilter {
                owner: Some(o.clone()),
                ..filter
            },
            Caller::Anyone => filter,
        };
        let all = self.backend.list(&filter).await?;
        Ok(all.into_iter().map(|i| self.present(i)).collect())
    }

    /// A new access link to a `link` instance the caller may see, valid for
    /// `ttl` (at most [`Links::MAX_TTL`], and never past the instance's expiry).
    pub async fn link(&self, caller: &Caller, id: &InstanceId, ttl: Duration) -> Result<String> {
        let instance = self.get(caller, id).await?;
        if instance.access != Access::Link {
            return Err(Error::Invalid {
                field: "access",
                message: format!("{id} is public: its url opens it, no link is needed"),
            });
        }
        let links = self.links.as_ref().ok_or_else(|| {
            Error::Unavailable("this server has no access keys (--access-keys)".into())
        })?;
        if ttl.is_zero() || ttl > Links::MAX_TTL {
            return Err(Error::Invalid {
                field: "ttl",
                message: format!(
                    "an access link lives between 1s and {}",
                    humantime::format_duration(Links::MAX_TTL)
                ),
            });
        }
        Ok(links.url(&instance, ttl))
    }

    /// The instance as callers see it: with a fresh access link when it
    /// opens by link and is not over.
    fn present(&self, mut instance: Instance) -> Instance {
        instance.access_url = match (&self.links, instance.access, instance.phase) {
            (Some(links), Access::Link, Phase::Pending | Phase::Ready | Phase::Sleeping) => {
                Some(links.url(&instance, links.ttl))
            }
            _ => None,
        };
        instance
    }

    /// Deletes an instance the caller may change.
    pub async fn delete(&self, caller: &Caller, id: &InstanceId) -> Result<()> {
        self.get(caller, id).await?;
        self.backend.delete(id).await
    }

    /// Pushes the expiry `ttl` further, from the current expiry (or now if
    /// past), to at most the longest TTL from now.
    pub async fn extend(
        &self,
        caller: &Caller,
        id: &InstanceId,
        ttl: Duration,
    ) -> Result<Instance> {
        let current = self.get(caller, id).await?;
        let expires_at = self
            .policy
            .ttl
            .extended(current.expires_at, Timestamp::now(), ttl)?;
        Ok(self.present(self.backend.set_expiry(id, expires_at).await?))
    }

    /// Sets the expiry to `at` (at most the longest TTL from now); an expiry
    /// already at or past `at` is left as it is, so a retry changes nothing.
    pub async fn extend_to(
        &self,
        caller: &Caller,
        id: &InstanceId,
        at: Timestamp,
    ) -> Result<Instance> {
        let current = self.get(caller, id).await?;
        let now = Timestamp::now();
        if at <= now {
            return Err(Error::invalid("expires_at", "must be in the future"));
        }
        if at > add(now, self.policy.ttl.max) {
            return Err(Error::invalid(
                "expires_at",
                format!(
                    "at most {} from now",
                    humantime::format_duration(self.policy.ttl.max)
                ),
            ));
        }
        if at <= current.expires_at {
            return Ok(current);
        }
        Ok(self.present(self.backend.set_expiry(id, at).await?))
    }

    /// Removes expired instances and leftovers.
    pub async fn gc(&self, dry_run: bool) -> Result<Vec<Removed>> {
        self.backend.gc(dry_run).await
    }

    /// The launch progress of an instance the caller may see, until a final
    /// event.
    pub async fn events(
        &self,
        caller: &Caller,
        id: &InstanceId,
    ) -> Result<BoxStream<'static, Event>> {
        self.get(caller, id).await?;
        let slot = self.stream_slot(caller)?;
        let stream = match (self.backend.event_log(id), &self.source) {
            (Some(log), _) => events::from_log(log).boxed(),
            (None, Some(source)) => Arc::clone(source).subscribe(id),
            (None, None) => by_polling(
                Arc::clone(&self.backend),
                id.clone(),
                Duration::from_secs(1),
            )
            .boxed(),
        };
        Ok(stream
            .map(move |e| {
                let _held = &slot;
                e
            })
            .boxed())
    }

    /// A slot for one more stream of `caller`, or a quota error past the cap.
    fn stream_slot(&self, caller: &Caller) -> Result<StreamSlot> {
        let key = match caller {
            Caller::Owner(o) => o.clone(),
            Caller::Anyone => String::new(),
        };
        let mut streams = self.streams.lock().expect("streams lock");
        let n = streams.entry(key.clone()).or_insert(0);
        if *n >= self.policy.streams_per_caller {
            return Err(Error::Quota(format!(
                "{} event streams are open for this caller (limit {})",
                *n, self.policy.streams_per_caller
            )));
        }
        *n += 1;
        Ok(StreamSlot {
            streams: Arc::clone(&self.streams),
            key,
        })
    }

    /// Waits until the instance is Ready (or Failed, or the timeout passes),
    /// calling `progress` whenever the phase or message changes.
    pub async fn wait_ready(
        &self,
        id: &InstanceId,
        timeout: Duration,
        progress: &(dyn for<'i> Fn(&'i Instance) + Send + Sync),
    ) -> Result<Instance> {
        let deadline = Instant::now() + timeout;
        let mut last: Option<(Phase, Option<String>)> = None;
        loop {
            let instance = self.backend.get(id).await?;
            let now = (instance.phase, instance.message.clone());
            if last.as_ref() != Some(&now) {
                progress(&instance);
                last = Some(now);
            }
            match instance.phase {
                Phase::Ready => return Ok(self.present(instance)),
                Phase::Failed | Phase::Expired => {
                    return Err(Error::Failed {
                        id: id.to_string(),
                        reason: instance
                            .message
                            .unwrap_or_else(|| instance.phase.to_string()),
                    });
                }
                // a sleeping instance wakes on its first visit
                Phase::Sleeping => return Ok(self.present(instance)),
                Phase::Pending => {}
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(format!(
                    "instance {id} not ready after {}",
                    humantime::format_duration(timeout)
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Derives events by polling the instance: `created` first, then one event
/// per phase change, until Ready, Failed, Expired or gone.
fn by_polling(
    backend: Arc<dyn Backend>,
    id: InstanceId,
    every: Duration,
) -> impl futures_util::Stream<Item = Event> + Send + 'static {
    let first = Event::new("created", Phase::Pending, None);
    futures_util::stream::unfold(
        (
            backend,
            id,
            Some(first),
            None::<(Phase, Option<String>)>,
            false,
        ),
        move |(backend, id, pending, mut last, done)| async move {
            if done {
                return None;
            }
            if let Some(first) = pending {
                return Some((first, (backend, id, None, last, false)));
            }
            loop {
                match backend.get(&id).await {
                    Ok(i) => {
                        let key = (i.phase, i.message.clone());
                        if last.as_ref() != Some(&key) {
                            last = Some(key);
                            let event = Event::from_instance(&i);
                            let done = event.is_final();
                            return Some((event, (backend, id, None, last, done)));
                        }
                    }
                    Err(Error::NotFound(_)) => {
                        return Some((Event::gone(), (backend, id, None, last, true)));
                    }
                    Err(e) => tracing::warn!(%id, error = %e, "polling for events"),
                }
                tokio::time::sleep(every).await;
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners() {
        let alice = Caller::Owner("alice".into());
        assert_eq!(alice.owner_for(None).unwrap(), "alice");
        assert_eq!(alice.owner_for(Some("alice")).unwrap(), "alice");
        assert!(matches!(
            alice.owner_for(Some("bob")),
            Err(Error::Forbidden(_))
        ));
        assert_eq!(Caller::Anyone.owner_for(None).unwrap(), "anonymous");
        assert!(Caller::Anyone.owner_for(Some("a b")).is_err());
    }

    #[test]
    fn keys_tell_workloads_and_artefacts_apart() {
        let key = |w, a, writes| claim_key(w, a, writes, Access::Link);
        assert_eq!(key("w", "a", false), key("w", "a", false));
        assert_ne!(key("w", "a", false), key("w", "b", false));
        assert_ne!(key("wa", "", false), key("w", "a", false));
        assert_ne!(key("w", "a", false), key("w", "a", true));
        assert_ne!(
            claim_key("w", "a", false, Access::Link),
            claim_key("w", "a", false, Access::Public)
        );
    }
}
