//! Launch progress as a sequence of events, for `GET .../events` (server-sent
//! events) and `create --wait`. The local backend publishes each step as it
//! happens; for others, events are derived by polling the instance's phase.

use crate::backend::Backend;
use crate::instance::{Instance, InstanceId, Phase};
use futures_util::Stream;
use jiff::Timestamp;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
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
            at: Timestamp::now(),
        }
    }

    /// True for the events after which nothing more comes.
    pub fn is_final(&self) -> bool {
        matches!(
            self.step.as_str(),
            "ready" | "failed" | "expired" | "deleted" | "shutdown"
        )
    }

    fn from_instance(i: &Instance) -> Self {
        let step = match i.phase {
            Phase::Pending => "starting",
            Phase::Ready => "ready",
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

/// Derives events by polling the instance: `created` first, then one event
/// per phase change, until Ready, Failed, Expired or gone.
pub fn by_polling(
    backend: Arc<dyn Backend>,
    id: InstanceId,
    every: Duration,
) -> impl Stream<Item = Event> + Send + 'static {
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
                    Err(crate::Error::NotFound(_)) => {
                        return Some((
                            Event::new(
                                "deleted",
                                Phase::Expired,
                                Some("the instance is gone".into()),
                            ),
                            (backend, id, None, last, true),
                        ));
                    }
                    Err(e) => tracing::warn!(%id, error = %e, "polling for events"),
                }
                tokio::time::sleep(every).await;
            }
        },
    )
}
