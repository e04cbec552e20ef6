//! The activator on Kubernetes: the listener of `flowgate serve
//! --activator-listen` (or `flowgate operator --activator-listen`) that a sleeping instance's Service sends its visitors
//! to ([`super::sleep`]). It answers `/<id>/...` from the watch's cache, as
//! the local listener answers for a sleeping local instance ([`crate::waking`]):
//! a page visit the instance's access gate admits wakes it (once, however
//! many visit) and gets the waking page, which follows
//! `/<id>/.flowgate/wake` (steps from the pod: fetching again, verified,
//! starting; or why it failed) and reloads the page when the route is back;
//! anything else gets 503 with `Retry-After`.
//!
//! Only the ingress controller reaches this port (NetworkPolicy), and the
//! Ingress routes only ids that exist, so unknown ids are a plain 404 here.

use super::phase::{Fetch, Observed};
use super::sleep::{SleepState, Sleeper, Wake, sleep_state};
use super::watch::Watch;
use crate::hosts::PublicHosts;
use crate::instance::{Access, Instance, InstanceId, Phase};
use crate::waking::{WAKE_STATUS_PATH, asleep, navigates, page, wake_status, waking_page};
use adapter::body::ProxyBody;
use adapter::request_body::RequestBody;
use adapter::server::Handler;
use adapter::{Proxy, ProxyConfig, ServeArgs};
use http::{Request, Response, StatusCode};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A gate is rebuilt after this (the access keys may have rotated).
const GATE_TTL: Duration = Duration::from_secs(60);
/// Gates kept at most; past it the cache starts over.
const MAX_GATES: usize = 4096;

/// The activator's request handler.
pub struct Activator {
    sleeper: Arc<Sleeper>,
    /// The access keys (`--access-keys`): `link` instances are gated with them.
    keys: Option<PathBuf>,
    hosts: Arc<PublicHosts>,
    gates: Mutex<HashMap<String, (Instant, Arc<Proxy>)>>,
}

impl Activator {
    /// An activator waking through `sleeper`, answering only `hosts`.
    pub fn new(sleeper: Arc<Sleeper>, keys: Option<PathBuf>, hosts: Arc<PublicHosts>) -> Self {
        Self {
            sleeper,
            keys,
            hosts,
            gates: Mutex::default(),
        }
    }

    fn watch(&self) -> &Arc<Watch> {
        self.sleeper.watch()
    }

    /// The instance's access gate: the adapter's own code, configured as the
    /// instance's adapter is (its prefix; the access keys when `link`). None
    /// when it cannot be made: then nobody gets through.
    fn gate(&self, instance: &Instance) -> Option<Arc<Proxy>> {
        let now = Instant::now();
        let key = format!("{}/{}", instance.id, instance.access.as_str());
        if let Some((made, gate)) = self.gates.lock().expect("gates lock").get(&key)
            && now.duration_since(*made) < GATE_TTL
        {
            return Some(Arc::clone(gate));
        }
        let keys = match instance.access {
            Access::Public => None,
            // never an open gate for a `link` instance
            Access::Link => Some(self.keys.clone()?),
        };
        let args = ServeArgs {
            access_keys: keys,
            prefix: Some(instance.id.prefix()),
            // never reached: the gate answers or the activator does
            upstream: Some("http://127.0.0.1:9".into()),
            ..Default::default()
        };
        let gate = ProxyConfig::resolve(args, Vec::<(String, String)>::new())
            .map(Proxy::new)
            .inspect_err(|e| {
                tracing::warn!(id = %instance.id, error = %e, "activator: cannot make the access gate");
            })
            .ok()?;
        let mut gates = self.gates.lock().expect("gates lock");
        if gates.len() >= MAX_GATES {
            gates.clear();
        }
        gates.insert(key, (now, Arc::clone(&gate)));
        Some(gate)
    }
}

fn cannot_check_access() -> Response<ProxyBody> {
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Unavailable",
        "This instance cannot be opened right now. Try again later.",
        false,
    )
}

fn not_found() -> Response<ProxyBody> {
    page(
        StatusCode::NOT_FOUND,
        "No such instance",
        "It may have expired or been deleted.",
        false,
    )
}

/// The wake's state and steps, for the waking page, from what the cluster
/// shows (a few words each: visitors read them).
pub fn wake_progress(
    state: SleepState,
    instance: &Instance,
    o: &Observed,
) -> (&'static str, Vec<String>) {
    if instance.phase == Phase::Failed {
        let why = instance
            .message
            .clone()
            .unwrap_or_else(|| "it could not start".into());
        return ("failed", vec!["woken by a visit".into(), why]);
    }
    match state {
        SleepState::Sleeping => ("sleeping", Vec::new()),
        // handed back: the route leads to the instance again
        SleepState::Awake => ("ready", Vec::new()),
        SleepState::Waking => {
            let mut steps = vec!["woken by a visit: fetching its store again".to_owned()];
            match &o.fetch {
                Fetch::Waiting => {}
                Fetch::Downloading { bytes, total } => steps.push(match total {
                    Some(t) => format!("downloading: {} of {} MB", bytes >> 20, t >> 20),
                    None => format!("downloading: {} MB", bytes >> 20),
                }),
                Fetch::Verified => {
                    steps.push("store fetched, its checksum verified".into());
                    steps.push("MLflow starting".into());
                }
                Fetch::Failed(_) => {}
            }
            ("waking", steps)
        }
    }
}

impl Handler for Activator {
    type Body = ProxyBody;

    async fn handle(
        self: Arc<Self>,
        req: Request<RequestBody>,
        _peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let path = req.uri().path();
        if path == "/healthz" {
            return Response::new(ProxyBody::full("ok\n"));
        }
        if !self.hosts.admits(&req) {
            return page(
                StatusCode::MISDIRECTED_REQUEST,
                "Misdirected request",
                "This host name is not served here.",
                false,
            );
        }
        let rest = path.strip_prefix('/').unwrap_or(path);
        let (segment, under) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let Ok(id) = InstanceId::parse(segment) else {
            return not_found();
        };
        let watch = self.watch();
        let Some(d) = watch.deployment(&id).filter(|d| self.sleeper.manages(d)) else {
            return not_found();
        };
        let Some((instance, observed)) = watch.look(&id) else {
            return not_found();
        };
        if instance.phase == Phase::Expired {
            return not_found();
        }
        // Only a visitor the instance would serve may wake it or read its
        // wake (a `link` instance: signed in); the gate answers the others.
        let Some(gate) = self.gate(&instance) else {
            return cannot_check_access();
        };
        if let Some(answer) = gate.gate_answer(&req) {
            return answer;
        }
        let state = sleep_state(&d);
        if under == WAKE_STATUS_PATH {
            let (state, steps) = wake_progress(state, &instance, &observed);
            return wake_status(state, &steps);
        }
        if instance.phase == Phase::Failed {
            return page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Failed",
                "This MLflow instance could not start again and will not come back by itself. The portal shows why.",
                false,
            );
        }
        if !navigates(&req) {
            return asleep();
        }
        if state == SleepState::Sleeping {
            match self.sleeper.wake(&id).await {
                Ok(Wake::Woken) => {
                    tokio::spawn(Arc::clone(&self.sleeper).follow_wake(id.clone()));
                }
                Ok(Wake::AlreadyWaking | Wake::NotAsleep) => {}
                Err(e) => {
                    tracing::warn!(%id, error = %e, "could not wake");
                    return page(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Asleep",
                        "This MLflow instance is asleep and could not be woken just now. This page retries by itself.",
                        true,
                    );
                }
            }
        }
        // waking, or awake with its route on the way back: the page follows
        waking_page(id.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(phase: Phase, message: Option<&str>) -> Instance {
        serde_json::from_value(serde_json::json!({
            "id": "k3x9q2a", "workload": "w", "owner": "o",
            "artifacts": {"url": "https://s.example/a.tgz", "sha256": "ab".repeat(32)},
            "created_at": "2026-12-01T00:00:00Z", "expires_at": "2026-12-09T00:00:00Z",
            "url": "https://ml.example/k3x9q2a/", "phase": phase, "message": message,
        }))
        .unwrap()
    }

    fn observed(fetch: Fetch) -> Observed {
        Observed {
            phase: Phase::Pending,
            reason: "Starting",
            message: None,
            fetch,
        }
    }

    #[test]
    fn what_the_waking_page_is_told() {
        let pending = instance(Phase::Pending, None);
        let (state, steps) = wake_progress(
            SleepState::Waking,
            &pending,
            &observed(Fetch::Downloading {
                bytes: 5 << 20,
                total: Some(20 << 20),
            }),
        );
        assert_eq!(state, "waking");
        assert_eq!(steps.last().unwrap(), "downloading: 5 of 20 MB");
        let (_, steps) = wake_progress(SleepState::Waking, &pending, &observed(Fetch::Verified));
        assert_eq!(steps.last().unwrap(), "MLflow starting");
        let (state, _) = wake_progress(SleepState::Awake, &pending, &observed(Fetch::Verified));
        assert_eq!(state, "ready");
        let failed = instance(
            Phase::Failed,
            Some("the archive's sha256 is not the one given"),
        );
        let (state, steps) = wake_progress(SleepState::Waking, &failed, &observed(Fetch::Waiting));
        assert_eq!(state, "failed");
        assert_eq!(
            steps.last().unwrap(),
            "the archive's sha256 is not the one given"
        );
    }
}
