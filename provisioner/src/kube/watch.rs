//! Launch events on Kubernetes from one shared watch per process: two
//! kube-runtime reflectors (the instances' Deployments and Pods of the
//! namespace, label `app.kubernetes.io/name=mlflow`) keep a local cache, and
//! every change wakes the streams of that instance only, which read the cache.
//! A thousand `/events` streams cost two watches on the API server, not a
//! thousand polls.
//!
//! The steps follow [`super::phase::observe`]: `created`, `downloading` (with
//! bytes so far and the total, as the `fetch` init container reports them),
//! `verified`, `starting`, then `ready` or `failed` with the reason
//! (or `expired`, or `deleted` when the objects are gone).

use super::objects::instance_from;
use super::phase::{Fetch, Observed, observe, progress_message};
use crate::events::{Event, EventSource};
use crate::instance::{Instance, InstanceId, Phase};
use crate::labels::{INSTANCE, NAME};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// Even without a change, a stream looks again this often (expiry).
const RECHECK: Duration = Duration::from_secs(30);

/// The shared watch of one namespace.
pub struct Watch {
    namespace: String,
    deployments: Store<Deployment>,
    pods: Store<Pod>,
    changed: broadcast::Sender<String>,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn instance_label<K: ResourceExt>(o: &K) -> Option<String> {
    o.labels().get(INSTANCE).cloned()
}

impl Watch {
    /// Starts the reflectors (they run until the watch is dropped).
    pub fn start(client: Client, namespace: &str) -> Arc<Self> {
        let (changed, _) = broadcast::channel(4096);
        let config = watcher::Config::default().labels(&format!("{NAME}=mlflow"));
        let (deployments, d_writer) = reflector::store();
        let (pods, p_writer) = reflector::store();
        let d_api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
        let p_api: Api<Pod> = Api::namespaced(client, namespace);
        let tx = changed.clone();
        let d_task = tokio::spawn(
            reflector::reflector(d_writer, watcher(d_api, config.clone()))
                .default_backoff()
                .touched_objects()
                .for_each(move |r| {
                    let tx = tx.clone();
                    async move {
                        match r {
                            Ok(d) => {
                                if let Some(id) = instance_label(&d) {
                                    let _ = tx.send(id);
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "watching Deployments"),
                        }
                    }
                }),
        );
        let tx = changed.clone();
        let p_task = tokio::spawn(
            reflector::reflector(p_writer, watcher(p_api, config))
                .default_backoff()
                .touched_objects()
                .for_each(move |r| {
                    let tx = tx.clone();
                    async move {
                        match r {
                            Ok(p) => {
                                if let Some(id) = instance_label(&p) {
                                    let _ = tx.send(id);
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "watching Pods"),
                        }
                    }
                }),
        );
        Arc::new(Self {
            namespace: namespace.to_owned(),
            deployments,
            pods,
            changed,
            tasks: vec![d_task.abort_handle(), p_task.abort_handle()],
        })
    }

    /// The instance and what its objects show, from the cache; None when
    /// its Deployment is gone.
    pub fn look(&self, id: &InstanceId) -> Option<(Instance, Observed)> {
        let d = self.deployment(id)?;
        let pods = self.pods_of(id);
        let instance = instance_from(&d, &pods, Timestamp::now()).ok()?;
        Some((instance, observe(&d, &pods)))
    }

    /// An instance's Deployment, from the cache.
    pub fn deployment(&self, id: &InstanceId) -> Option<Arc<Deployment>> {
        let key = ObjectRef::new(&id.object_name()).within(&self.namespace);
        self.deployments.get(&key)
    }

    /// Every instance Deployment of the namespace, from the cache.
    pub fn deployments(&self) -> Vec<Arc<Deployment>> {
        self.deployments.state()
    }

    /// An instance's Pods, from the cache.
    pub fn pods_of(&self, id: &InstanceId) -> Vec<Pod> {
        self.pods
            .state()
            .iter()
            .filter(|p| p.labels().get(INSTANCE).map(String::as_str) == Some(id.as_str()))
            .map(|p| (**p).clone())
            .collect()
    }

    /// The ids of instances whose Deployment or Pods change, as they change.
    pub fn changes(&self) -> broadcast::Receiver<String> {
        self.changed.subscribe()
    }

    /// Waits until both caches have been filled once.
    pub async fn ready(&self) {
        let _ = self.deployments.wait_until_ready().await;
        let _ = self.pods.wait_until_ready().await;
    }
}

/// How far a stream got.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// 0 created, 1 downloading, 2 verified, 3 starting, 4 final.
    rank: u8,
    /// The bytes of the last `downloading` event.
    bytes: Option<u64>,
}

fn downloading(bytes: u64, total: Option<u64>) -> Event {
    let mut e = Event::new(
        "downloading",
        Phase::Pending,
        Some(progress_message(bytes, total)),
    );
    e.bytes = Some(bytes);
    e.total = total;
    e
}

/// The steps up to `rank` not sent yet (`verified`, `starting`).
fn reach(next: &mut Progress, rank: u8, out: &mut Vec<Event>) {
    if next.rank < 2 && rank >= 2 {
        out.push(Event::new("verified", Phase::Pending, None));
    }
    if next.rank < 3 && rank >= 3 {
        out.push(Event::new("starting", Phase::Pending, None));
    }
    next.rank = next.rank.max(rank);
}

/// The events that take a stream from `last` to what `instance` and
/// `observed` show (pure: the steps, in order, none twice).
pub fn next_events(
    last: &Progress,
    instance: Option<&Instance>,
    observed: Option<&Observed>,
) -> (Vec<Event>, Progress) {
    let mut out = Vec::new();
    let mut next = last.clone();
    let (Some(instance), Some(observed)) = (instance, observed) else {
        next.rank = 4;
        return (vec![Event::gone()], next);
    };
    match instance.phase {
        Phase::Expired | Phase::Failed | Phase::Sleeping => {
            out.push(Event::from_instance(instance));
            next.rank = 4;
        }
        Phase::Ready => {
            reach(&mut next, 3, &mut out);
            out.push(Event::from_instance(instance));
            next.rank = 4;
        }
        Phase::Pending => match &observed.fetch {
            Fetch::Downloading { bytes, total } if next.rank <= 1 => {
                if next.bytes != Some(*bytes) {
                    out.push(downloading(*bytes, *total));
                    next.bytes = Some(*bytes);
                }
                next.rank = 1;
            }
            Fetch::Verified => reach(&mut next, 3, &mut out),
            _ => {}
        },
    }
    (out, next)
}

impl EventSource for Watch {
    fn subscribe(self: Arc<Self>, id: &InstanceId) -> BoxStream<'static, Event> {
        let rx = self.changed.subscribe();
        let first = Event::new("created", Phase::Pending, None);
        let state = (self, id.clone(), rx, Progress::default(), vec![first]);
        futures_util::stream::unfold(
            state,
            |(watch, id, mut rx, mut progress, mut queue)| async move {
                loop {
                    if !queue.is_empty() {
                        let e = queue.remove(0);
                        return Some((e, (watch, id, rx, progress, queue)));
                    }
                    if progress.rank >= 4 {
                        return None;
                    }
                    watch.ready().await;
                    let seen = watch.look(&id);
                    let (events, next) = next_events(
                        &progress,
                        seen.as_ref().map(|s| &s.0),
                        seen.as_ref().map(|s| &s.1),
                    );
                    progress = next;
                    if !events.is_empty() {
                        queue = events;
                        continue;
                    }
                    // Wait for a change of this instance (or a recheck).
                    let woken = tokio::time::timeout(RECHECK, async {
                        loop {
                            match rx.recv().await {
                                Ok(changed) if changed == id.as_str() => return true,
                                Ok(_) => {}
                                Err(broadcast::error::RecvError::Lagged(_)) => return true,
                                Err(broadcast::error::RecvError::Closed) => return false,
                            }
                        }
                    })
                    .await;
                    if woken == Ok(false) {
                        return None;
                    }
                }
            },
        )
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(phase: Phase) -> Instance {
        serde_json::from_value(serde_json::json!({
            "id": "k3x9q2a", "workload": "w", "owner": "o",
            "artifacts": {"url": "https://x/a.tgz", "sha256": "ab".repeat(32)},
            "created_at": "2026-01-01T00:00:00Z", "expires_at": "2026-01-02T00:00:00Z",
            "url": "https://h/k3x9q2a/", "phase": phase,
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
    fn steps_come_in_order_and_once() {
        let pending = instance(Phase::Pending);
        let p0 = Progress::default();
        let (e, p1) = next_events(&p0, Some(&pending), Some(&observed(Fetch::Waiting)));
        assert!(e.is_empty());
        let dl = observed(Fetch::Downloading {
            bytes: 10,
            total: Some(40),
        });
        let (e, p2) = next_events(&p1, Some(&pending), Some(&dl));
        assert_eq!(e.len(), 1);
        assert_eq!(
            (e[0].step.as_str(), e[0].bytes, e[0].total),
            ("downloading", Some(10), Some(40))
        );
        assert!(next_events(&p2, Some(&pending), Some(&dl)).0.is_empty());
        let (e, p3) = next_events(&p2, Some(&pending), Some(&observed(Fetch::Verified)));
        let steps: Vec<_> = e.iter().map(|e| e.step.as_str()).collect();
        assert_eq!(steps, ["verified", "starting"]);
        let ready = instance(Phase::Ready);
        let (e, p4) = next_events(&p3, Some(&ready), Some(&observed(Fetch::Verified)));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].step, "ready");
        assert_eq!(e[0].url.as_deref(), Some("https://h/k3x9q2a/"));
        assert_eq!(p4.rank, 4);
        // Straight to ready (the watch saw nothing in between).
        let (e, _) = next_events(&p0, Some(&ready), Some(&observed(Fetch::Verified)));
        let steps: Vec<_> = e.iter().map(|e| e.step.as_str()).collect();
        assert_eq!(steps, ["verified", "starting", "ready"]);
        let (e, _) = next_events(&p2, None, None);
        assert_eq!(e[0].step, "deleted");
    }
}
