//! Leader election on a `coordination.k8s.io/v1` Lease, so that two or more
//! replicas of the operator can run and exactly one reconciles.
//!
//! As client-go's leaderelection: a candidate takes the Lease when it does not
//! exist, when its holder released it (no holder), or when its record (holder
//! and renew time) has not changed for `lease_duration` *as measured on the
//! candidate's own clock* (no clock-skew assumptions). Every write is an
//! update carrying the `resourceVersion` read, so of two candidates racing,
//! one gets a 409 Conflict and stays a follower. The leader renews every
//! `retry_period`; if it cannot renew for `renew_deadline` it stops
//! reconciling (before anyone else may take over, since
//! `renew_deadline < lease_duration`). A leader shutting down releases the
//! Lease so a follower takes over at once.

use crate::{Error, Result};
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Timings and name of the Lease.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// Name of the Lease, in the operator's namespace.
    pub name: String,
    /// How long a Lease is good for without renewal.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it steps down.
    pub renew_deadline: Duration,
    /// How often candidates try and the leader renews.
    pub retry_period: Duration,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        Self {
            name: "flowgate-operator".into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

impl LeaseSettings {
    /// Checks `retry_period < renew_deadline < lease_duration`.
    pub fn check(&self) -> Result<()> {
        if self.retry_period.is_zero()
            || self.retry_period >= self.renew_deadline
            || self.renew_deadline >= self.lease_duration
        {
            return Err(Error::invalid(
                "lease",
                "need 0 < retry period < renew deadline < lease duration",
            ));
        }
        Ok(())
    }
}

/// Why [`LeaderElector::hold`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldEnd {
    /// Another candidate holds the Lease now, or renewing failed for too long.
    Lost,
    /// Shutdown was asked for (the Lease is still ours: release it).
    Shutdown,
}

/// A Lease's holder and renew time: what must change for the holder to count as alive.
type Record = (Option<String>, Option<MicroTime>);

/// One candidate.
pub struct LeaderElector {
    api: Api<Lease>,
    identity: String,
    settings: LeaseSettings,
    /// The holder and renew time last seen, and when they were first seen.
    observed: Option<(Record, Instant)>,
}

impl LeaderElector {
    /// A candidate named `identity` for the Lease in `namespace`.
    pub fn new(client: Client, namespace: &str, identity: &str, settings: LeaseSettings) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            identity: identity.to_owned(),
            settings,
            observed: None,
        }
    }

    /// This candidate's identity (the Lease's holderIdentity when it leads).
    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn observe(&mut self, lease: &Lease) {
        let spec = lease.spec.clone().unwrap_or_default();
        let record = (spec.holder_identity, spec.renew_time);
        match &self.observed {
            Some((seen, _)) if *seen == record => {}
            _ => self.observed = Some((record, Instant::now())),
        }
    }

    fn spec(&self, previous: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
        let mine = previous
            .and_then(|p| p.holder_identity.as_deref())
            .is_some_and(|h| h == self.identity);
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.settings.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX),
            ),
            acquire_time: if mine {
                previous.and_then(|p| p.acquire_time.clone())
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if mine || previous.is_none() {
                transitions
            } else {
                transitions + 1
            }),
            ..Default::default()
        }
    }

    /// One attempt to take or renew the Lease: true when this candidate holds
    /// it afterwards.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool> {
        let now = Timestamp::now();
        let name = self.settings.name.clone();
        let Some(current) = self.api.get_opt(&name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name),
                    ..Default::default()
                },
                spec: Some(self.spec(None, now)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created);
                    Ok(true)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        self.observe(&current);
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().unwrap_or("");
        if !holder.is_empty() && holder != self.identity {
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs)
                .unwrap_or(self.settings.lease_duration);
            let seen_since = self.observed.as_ref().map(|(_, at)| *at);
            if seen_since.is_some_and(|at| at.elapsed() < duration) {
                return Ok(false);
            }
            tracing::info!(%holder, "the lease was not renewed in time: taking it over");
        }
        let mut next = current.clone();
        next.spec = Some(self.spec(Some(&spec), now));
        // `replace` sends metadata.resourceVersion: a concurrent writer makes it 409.
        match self.api.replace(&name, &PostParams::default(), &next).await {
            Ok(updated) => {
                self.observe(&updated);
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Tries every retry period until this candidate leads (true) or
    /// `shutdown` is cancelled (false).
    pub async fn acquire(&mut self, shutdown: &CancellationToken) -> bool {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return true,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: cannot read or write the lease")
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return false,
                () = tokio::time::sleep(self.settings.retry_period) => {}
            }
        }
    }

    /// Renews every retry period while leading; returns when the lead is lost
    /// or `shutdown` is cancelled.
    pub async fn hold(&mut self, shutdown: &CancellationToken) -> HoldEnd {
        let mut renewed = Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return HoldEnd::Shutdown,
                () = tokio::time::sleep(self.settings.retry_period) => {}
            }
            let attempt = tokio::time::timeout(
                self.settings
                    .renew_deadline
                    .saturating_sub(renewed.elapsed()),
                self.try_acquire_or_renew(),
            )
            .await;
            match attempt {
                Ok(Ok(true)) => renewed = Instant::now(),
                Ok(Ok(false)) => {
                    tracing::warn!("leader election: another replica holds the lease now");
                    return HoldEnd::Lost;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "leader election: renewing failed"),
                Err(_) => {}
            }
            if renewed.elapsed() >= self.settings.renew_deadline {
                tracing::warn!("leader election: could not renew the lease in time");
                return HoldEnd::Lost;
            }
        }
    }

    /// Gives the Lease up (when held), so a follower takes over at once.
    pub async fn release(&mut self) {
        let name = self.settings.name.clone();
        let Ok(Some(mut lease)) = self.api.get_opt(&name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(&name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!("leader election: lease released"),
            Err(e) => tracing::warn!(error = %e, "leader election: could not release the lease"),
        }
    }
}
