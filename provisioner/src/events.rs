//! Launch progress as a sequence of events, for `GET .../events` (server-sent
//! events) and `create --wait`. The local backend publishes each step as it
//! happens; for others, events are derived from the instance's phase.

use crate::instance::{Instance, InstanceId, Phase};
use futures_util::Stream;
use futures_util::stream::BoxStream;
use jiff::Timestamp;
use serde::Serialize;
use std::sync::Arc;
use tokio::sync::watch;

/// One step of a launch.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Event {
    /// `created`, `downloading`, `verified`, `starting`, `ready`, `restarting`, `failed`,
    /// `expired`, `deleted`, `shutdown` (the server is stopping).
    pub step: String,
    /// The instance's phase after this step.
    pub phase: Phase,
    /// Detail for people.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The instance URL, on `ready`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// On `downloading`: bytes received so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// On `downloading`: the archive's size, when its server said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// When.
    #[schema(value_type = String)]
    pub at: Timestamp,
}

impl Event {
    /// A new event now.
    pub fn new(step: &str, phase: Phase, message: Option<String>) -> Self {
        Self {
            step: step.into(),
            phase,
            message,
            url: None,
            bytes: None,
            total: None,
            at: Timestamp::now(),
        }
    }

    /// True for the events after which nothing more comes.
    pub fn is_final(&self) -> bool {
        matches!(
            self.step.as_str(),
            "ready" | "sleeping" | "failed" | "expired" | "deleted" | "shutdown"
        )
    }

    /// The event that ends a stream whose instance is gone.
    pub fn gone() -> Self {
        Self::new(
            "deleted",
            Phase::Expired,
            Some("the instance is gone".into()),
        )
    }

    /// The event for an instance's current phase.
    pub fn from_instance(i: &Instance) -> Self {
        let step = match i.phase {
            Phase::Pending => "starting",
            Phase::Ready => "ready",
            Phase::Sleeping => "sleeping",
            Phase::Failed => "failed",
            Phase::Expired => "expired",
        };
        let mut e = Self::new(step, i.phase, i.message.clone());
        if i.phase == Phase::Ready {
            e.url = Some(i.url.clone());
        }
        e
    }
}

/// A published event log: every subscriber sees all events from the first.
pub type EventLog = watch::Receiver<Vec<Event>>;

/// Streams an [`EventLog`] from its start until a final event.
pub fn from_log(log: EventLog) -> impl Stream<Item = Event> + Send + 'static {
    futures_util::stream::unfold(
        (log, 0usize, false),
        |(mut log, mut sent, mut done)| async move {
            loop {
                if done {
                    return None;
                }
                let next = log.borrow_and_update().get(sent).cloned();
                if let Some(event) = next {
                    sent += 1;
                    done = event.is_final();
                    return Some((event, (log, sent, done)));
                }
                if log.changed().await.is_err() {
                    return None;
                }
            }
        },
    )
}

/// Where launch events of a backend's instances come from, shared by every
/// stream of the process (the Kubernetes backends' watch).
pub trait EventSource: Send + Sync {
    /// The events of instance `id` from `created` until a final one.
    fn subscribe(self: Arc<Self>, id: &InstanceId) -> BoxStream<'static, Event>;
}
