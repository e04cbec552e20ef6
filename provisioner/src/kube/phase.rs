//! Where an instance is, from what the cluster shows: one pure function,
//! [`observe`], from its Deployment and Pods to the phase, a reason, a
//! message for people and the launch progress. The Kubernetes backend (get,
//! list, events) and the operator's controller (status, conditions, Events)
//! both read instances through it, so the two cannot drift.
//!
//! ## Launch progress
//!
//! The `fetch` init container reports what it does in its own Pod's status,
//! where a watch sees it:
//! - while it downloads, the Pod condition [`FETCH_CONDITION`]
//!   (`flowgate.io/fetch`) with reason `Downloading` and the message
//!   `<bytes>/<total> bytes` (`<bytes> bytes` when the server sent no
//!   length), at most once a second (`flowgate-adapter fetch
//!   --report-progress`);
//! - when it ends, its termination message: the reason callers may read
//!   (no checksums, no answers of other servers), and the container's exit
//!   code, 0 once the checksum matched.
//!
//! ## Sleep
//!
//! A sleeping instance ([`ANN_SLEEP`] `sleeping`) is `Sleeping` whatever its
//! pods do while they stop; a waking one (`waking`) is `Pending` until its
//! route is handed back, even with a ready pod, and `Failed` like a launch
//! when its store cannot be fetched again ([`super::sleep`]).

use crate::instance::Phase;
use crate::labels::{ANN_SLEEP, ANN_STATE};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ContainerState, Pod};

/// The Pod condition the `fetch` init container keeps while it downloads.
pub const FETCH_CONDITION: &str = "flowgate.io/fetch";

/// Container waiting reasons that will not fix themselves.
const FATAL_WAITING: [&str; 7] = [
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// Why a pod cannot start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFailure {
    /// The container (`fetch`, `mlflow`, `adapter`).
    pub container: String,
    /// What happened.
    pub message: String,
}

/// Why `pod` will not start by itself, if it will not: a container waiting
/// for a reason that does not fix itself, or one that keeps exiting non-zero
/// (the `fetch` init container: once is enough, its reason is in its
/// termination message).
pub fn pod_failure(pod: &Pod) -> Option<PodFailure> {
    let status = pod.status.as_ref()?;
    let statuses = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    for cs in statuses {
        let state = cs.state.clone().unwrap_or_default();
        if let Some(w) = state.waiting {
            let reason = w.reason.unwrap_or_default();
            if FATAL_WAITING.contains(&reason.as_str()) {
                return Some(PodFailure {
                    container: cs.name.clone(),
                    message: format!(
                        "container {}: {reason}: {}",
                        cs.name,
                        w.message.unwrap_or_default()
                    ),
                });
            }
        }
        let last = state.terminated.or_else(|| {
            cs.last_state
                .as_ref()
                .and_then(|s| s.terminated.clone())
                .filter(|_| cs.name == "fetch")
        });
        if let Some(t) = last
            && t.exit_code != 0
            && (cs.restart_count >= 2 || cs.name == "fetch")
        {
            let said = t.message.unwrap_or_default();
            let message = if cs.name == "fetch" && !said.trim().is_empty() {
                said.trim().to_owned()
            } else {
                format!(
                    "container {} exits with code {} ({}): {}",
                    cs.name,
                    t.exit_code,
                    t.reason.unwrap_or_default(),
                    said.trim()
                )
            };
            return Some(PodFailure {
                container: cs.name.clone(),
                message,
            });
        }
    }
    None
}

/// How far the artefacts are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fetch {
    /// Not started (no Pod yet, or scheduling, or pulling the image).
    Waiting,
    /// Downloading: bytes so far, and the total when the server said.
    Downloading {
        /// Bytes received.
        bytes: u64,
        /// Archive size.
        total: Option<u64>,
    },
    /// Downloaded, checksum matched, unpacked.
    Verified,
    /// Failed, with the reason callers may read.
    Failed(String),
}

/// What [`observe`] makes of an instance's objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// Pending, Ready or Failed (Expired is the caller's, from the expiry).
    pub phase: Phase,
    /// A CamelCase reason (the operator's Ready condition): `MinimumReplicasAvailable`,
    /// `Starting`, `FetchFailed`, `ContainerFailing`, `ProgressDeadlineExceeded`.
    pub reason: &'static str,
    /// Why it failed, for people.
    pub message: Option<String>,
    /// The artefacts' progress.
    pub fetch: Fetch,
}

/// The fetch progress one Pod shows.
fn fetch_of(pod: &Pod) -> Fetch {
    let Some(status) = pod.status.as_ref() else {
        return Fetch::Waiting;
    };
    let fetch = status
        .init_container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == "fetch");
    let state: ContainerState = fetch.and_then(|c| c.state.clone()).unwrap_or_default();
    if let Some(t) = &state.terminated {
        return if t.exit_code == 0 {
            Fetch::Verified
        } else {
            Fetch::Failed(t.message.clone().unwrap_or_default().trim().to_owned())
        };
    }
    if state.running.is_some() {
        let progress = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == FETCH_CONDITION)
            .and_then(|c| c.message.as_deref())
            .and_then(parse_progress);
        let (bytes, total) = progress.unwrap_or((0, None));
        return Fetch::Downloading { bytes, total };
    }
    Fetch::Waiting
}

/// `<bytes>/<total> bytes` or `<bytes> bytes`.
pub fn parse_progress(message: &str) -> Option<(u64, Option<u64>)> {
    let numbers = message.trim().strip_suffix(" bytes")?;
    match numbers.split_once('/') {
        Some((b, t)) => Some((b.parse().ok()?, Some(t.parse().ok()?))),
        None => Some((numbers.parse().ok()?, None)),
    }
}

/// The progress message for `bytes` of `total`.
pub fn progress_message(bytes: u64, total: Option<u64>) -> String {
    match total {
        Some(t) => format!("{bytes}/{t} bytes"),
        None => format!("{bytes} bytes"),
    }
}

/// Where the instance of `deployment` is, given its `pods`.
pub fn observe(deployment: &Deployment, pods: &[Pod]) -> Observed {
    let status = deployment.status.clone().unwrap_or_default();
    let annotation = |key| {
        deployment
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(String::as_str)
    };
    let complete = annotation(ANN_STATE).is_none_or(|s| s == "complete");
    let sleep = annotation(ANN_SLEEP);
    if sleep == Some("sleeping") {
        return Observed {
            phase: Phase::Sleeping,
            reason: "Sleeping",
            message: None,
            fetch: Fetch::Waiting,
        };
    }
    if status.available_replicas.unwrap_or(0) >= 1 && complete && sleep.is_none() {
        return Observed {
            phase: Phase::Ready,
            reason: "MinimumReplicasAvailable",
            message: None,
            fetch: Fetch::Verified,
        };
    }
    // The most advanced Pod (a rollout can have two).
    let fetch = pods
        .iter()
        .map(fetch_of)
        .max_by_key(|f| match f {
            Fetch::Waiting => 0,
            Fetch::Downloading { .. } => 1,
            Fetch::Failed(_) => 2,
            Fetch::Verified => 3,
        })
        .unwrap_or(Fetch::Waiting);
    if let Some(f) = pods.iter().find_map(pod_failure) {
        let (reason, fetch) = if f.container == "fetch" {
            ("FetchFailed", Fetch::Failed(f.message.clone()))
        } else {
            ("ContainerFailing", fetch)
        };
        return Observed {
            phase: Phase::Failed,
            reason,
            message: Some(f.message),
            fetch,
        };
    }
    let deadline = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Progressing" && c.status == "False")
        .map(|c| {
            c.message
                .clone()
                .unwrap_or_else(|| c.reason.clone().unwrap_or_default())
        });
    if let Some(message) = deadline {
        return Observed {
            phase: Phase::Failed,
            reason: "ProgressDeadlineExceeded",
            message: Some(message),
            fetch,
        };
    }
    Observed {
        phase: Phase::Pending,
        reason: "Starting",
        message: None,
        fetch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p"}, "status": status})).unwrap()
    }

    fn deployment(available: i32) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "d", "annotations": {"flowgate.io/state": "complete"}},
            "status": {"availableReplicas": available},
        }))
        .unwrap()
    }

    #[test]
    fn progress_messages_round_trip() {
        assert_eq!(
            parse_progress(&progress_message(5, Some(10))),
            Some((5, Some(10)))
        );
        assert_eq!(parse_progress(&progress_message(5, None)), Some((5, None)));
        assert_eq!(parse_progress("soon"), None);
    }

    #[test]
    fn the_launch_as_the_pod_shows_it() {
        let d = deployment(0);
        assert_eq!(observe(&d, &[]).fetch, Fetch::Waiting);
        let downloading = pod(json!({
            "conditions": [{"type": FETCH_CONDITION, "status": "False", "reason": "Downloading", "message": "1024/4096 bytes"}],
            "initContainerStatuses": [{"name": "fetch", "image": "a", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"running": {}}}],
        }));
        let o = observe(&d, &[downloading]);
        assert_eq!(o.phase, Phase::Pending);
        assert_eq!(
            o.fetch,
            Fetch::Downloading {
                bytes: 1024,
                total: Some(4096)
            }
        );
        let verified = pod(json!({
            "initContainerStatuses": [{"name": "fetch", "image": "a", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 0, "message": "verified"}}}],
        }));
        let o = observe(&d, &[verified]);
        assert_eq!((o.phase, o.fetch), (Phase::Pending, Fetch::Verified));
        let failed = pod(json!({
            "initContainerStatuses": [{"name": "fetch", "image": "a", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 1, "message": "checksum mismatch\n"}}}],
        }));
        let o = observe(&d, &[failed]);
        assert_eq!(o.phase, Phase::Failed);
        assert_eq!(o.reason, "FetchFailed");
        assert_eq!(o.message.as_deref(), Some("checksum mismatch"));
        assert_eq!(observe(&deployment(1), &[]).phase, Phase::Ready);
    }

    #[test]
    fn asleep_and_waking() {
        let with_sleep = |available, sleep: &str| {
            let mut d = deployment(available);
            d.metadata
                .annotations
                .get_or_insert_default()
                .insert(ANN_SLEEP.into(), sleep.into());
            d
        };
        // sleeping, even while its last pod still runs
        assert_eq!(
            observe(&with_sleep(1, "sleeping"), &[]).phase,
            Phase::Sleeping
        );
        assert_eq!(
            observe(&with_sleep(0, "sleeping"), &[]).phase,
            Phase::Sleeping
        );
        // waking: not Ready before the route is handed back
        assert_eq!(observe(&with_sleep(1, "waking"), &[]).phase, Phase::Pending);
        // a store that cannot be fetched again fails the wake
        let refetch_failed = pod(json!({
            "initContainerStatuses": [{"name": "fetch", "image": "a", "imageID": "", "ready": false, "restartCount": 1,
                "state": {"terminated": {"exitCode": 1, "message": "the archive's sha256 is not the one given\n"}}}],
        }));
        let o = observe(&with_sleep(0, "waking"), &[refetch_failed]);
        assert_eq!((o.phase, o.reason), (Phase::Failed, "FetchFailed"));
    }
}
