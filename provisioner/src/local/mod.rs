//! The local backend: the same lifecycle on one machine without Kubernetes.
//! Each instance is a folder under the data dir (its record, its fetched store,
//! MLflow's log) and an MLflow process on a free loopback port, reached through
//! one listener that routes `/<id>/` via the adapter crate.
//!
//! The records on disk are the store, written durably before any change is
//! acknowledged or applied in memory ([`record`]). A restarted `flowgate serve`
//! re-adopts the instances still valid (adopting their MLflow if it still runs
//! healthy, else starting it), keeps Failed ones Failed, and removes expired
//! ones. Each MLflow is supervised and restarted when it exits ([`supervisor`]).

pub mod guesses;
pub mod process;
pub mod record;
pub mod router;
pub mod supervisor;

use crate::backend::{Backend, ListFilter, NewInstance, Removed};
use crate::events::{Event, EventLog};
use crate::instance::{Instance, InstanceId, Phase, TtlPolicy, add};
use crate::{Error, Result};
use async_trait::async_trait;
use jiff::Timestamp;
use process::MlflowCommand;
use record::Stored;
use router::RouteTable;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use supervisor::{Running, StopSender, Supervision};
use tokio::sync::watch;

/// How long MLflow gets to stop before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// The same, for what an earlier server left and this one does not adopt.
const LEFTOVER_GRACE: Duration = Duration::from_secs(3);

/// Settings of the local backend.
#[derive(Clone, Debug)]
pub struct LocalSettings {
    /// Where instances live.
    pub data_dir: PathBuf,
    /// The `mlflow` executable.
    pub mlflow: PathBuf,
    /// The base URL users open (`http://127.0.0.1:8080`).
    pub public_url: String,
    /// TTL bounds.
    pub ttl: TtlPolicy,
    /// Restarts, timeouts, size bounds.
    pub supervision: Supervision,
    /// The access keys `link` instances are opened with [default:
    /// DATA_DIR/access-keys, made when absent].
    pub access_keys: Option<PathBuf>,
}

struct Entry {
    stored: Stored,
    events: watch::Sender<Vec<Event>>,
    /// Stops the instance's supervisor (and with it MLflow), with a grace.
    stop: Option<StopSender>,
    done: Option<tokio::task::JoinHandle<()>>,
}

struct Inner {
    settings: LocalSettings,
    mlflow: MlflowCommand,
    routes: Arc<RouteTable>,
    entries: Mutex<HashMap<InstanceId, Entry>>,
    /// Held while this server owns the data dir (until [`LocalBackend::stop_all`]):
    /// two servers never share one.
    lock: Mutex<Option<nix::fcntl::Flock<std::fs::File>>>,
}

/// Instances as local processes.
#[derive(Clone)]
pub struct LocalBackend {
    inner: Arc<Inner>,
}

impl LocalBackend {
    /// Opens the data dir, checks the MLflow executable, re-adopts the
    /// instances it finds and removes the expired ones.
    pub async fn open(settings: LocalSettings) -> Result<Self> {
        std::fs::create_dir_all(settings.data_dir.join("instances")).map_err(|e| {
            Error::Internal(format!("creating {}: {e}", settings.data_dir.display()))
        })?;
        let lock_path = settings.data_dir.join(".lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::Internal(format!("opening {}: {e}", lock_path.display())))?;
        let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| {
                Error::invalid(
                    "data-dir",
                    format!(
                        "{} is in use by another flowgate serve ({e})",
                        settings.data_dir.display()
                    ),
                )
            })?;
        let mlflow = MlflowCommand::prepare(&settings.mlflow, &settings.data_dir)?;
        let mut settings = settings;
        if settings.access_keys.is_none() {
            settings.access_keys = Some(crate::access::ensure_local_keys(&settings.data_dir)?);
        }
        let backend = Self {
            inner: Arc::new(Inner {
                settings,
                mlflow,
                routes: Arc::default(),
                entries: Mutex::default(),
                lock: Mutex::new(Some(lock)),
            }),
        };
        backend.recover().await;
        Ok(backend)
    }

    /// The key file `link` instances are opened with (links are minted with it).
    pub fn access_keys(&self) -> &std::path::Path {
        self.inner
            .settings
            .access_keys
            .as_deref()
            .expect("set by open")
    }

    /// The route table the local listener serves.
    pub fn routes(&self) -> Arc<RouteTable> {
        Arc::clone(&self.inner.routes)
    }

    fn dir(&self, id: &InstanceId) -> PathBuf {
        self.inner
            .settings
            .data_dir
            .join("instances")
            .join(id.as_str())
    }

    fn url_for(&self, id: &InstanceId) -> String {
        format!(
            "{}/{}/",
            self.inner.settings.public_url.trim_end_matches('/'),
            id
        )
    }

    /// The stored record of an instance (as applied in memory).
    fn stored(&self, id: &InstanceId) -> Option<Stored> {
        let entries = self.inner.entries.lock().expect("entries lock");
        entries.get(id).map(|e| e.stored.clone())
    }

    /// A state change: written and fsynced first, then applied in memory. On a
    /// write error nothing changes and the caller gets a 507 or 503.
    fn update(&self, id: &InstanceId, change: impl FnOnce(&mut Stored)) -> Result<Stored> {
        let mut entries = self.inner.entries.lock().expect("entries lock");
        let entry = entries
            .get_mut(id)
            .ok_or_else(|| Error::NotFound(id.to_string()))?;
        let mut next = entry.stored.clone();
        change(&mut next);
        record::save(&self.dir(id), &next)?;
        entry.stored = next.clone();
        Ok(next)
    }

    /// Takes over what an earlier server left, one instance folder at a time
    /// but all at once (a hung MLflow delays only its own instance).
    async fn recover(&self) {
        let dirs = record::instance_dirs(&self.inner.settings.data_dir);
        futures_util::future::join_all(dirs.iter().map(|d| self.recover_one(d))).await;
    }

    async fn recover_one(&self, dir: &Path) {
        let now = Timestamp::now();
        let keep_failed = self.inner.settings.supervision.keep_failed;
        match record::load(dir) {
            Some(s) if s.instance.is_expired(now) => {
                tracing::info!(id = %s.instance.id, "removing instance that expired while the server was down");
                supervisor::adopt_or_stop(dir, false, LEFTOVER_GRACE).await;
                let _ = std::fs::remove_dir_all(dir);
            }
            Some(mut s) if s.instance.phase == Phase::Failed => {
                supervisor::adopt_or_stop(dir, false, LEFTOVER_GRACE).await;
                let failed_at = *s.failed_at.get_or_insert(now);
                if add(failed_at, keep_failed) <= now {
                    tracing::info!(id = %s.instance.id, "removing instance failed longer than --keep-failed");
                    let _ = std::fs::remove_dir_all(dir);
                    return;
                }
                tracing::info!(id = %s.instance.id, "keeping Failed instance (Failed stays Failed)");
                s.instance.url = self.url_for(&s.instance.id);
                let id = s.instance.id.clone();
                let failed = Event::new("failed", Phase::Failed, s.instance.message.clone());
                let (events, _) = watch::channel(vec![failed]);
                self.inner.routes.failed(id.as_str());
                self.inner.entries.lock().expect("entries lock").insert(
                    id,
                    Entry {
                        stored: s,
                        events,
                        stop: None,
                        done: None,
                    },
                );
            }
            Some(mut s) => {
                tracing::info!(id = %s.instance.id, "re-adopting instance");
                let adopted = supervisor::adopt_or_stop(dir, true, LEFTOVER_GRACE).await;
                // The listener may have moved since the record was written.
                s.instance.url = self.url_for(&s.instance.id);
                self.launch(s, adopted);
            }
            None => {
                supervisor::adopt_or_stop(dir, false, LEFTOVER_GRACE).await;
                tracing::warn!(path = %dir.display(), "ignoring a folder without a valid instance record (gc removes it)")
            }
        }
    }

    /// Publishes a step of an instance's launch (no state change).
    /// What a visitor waiting for a wake reads of `event`: the step, in
    /// words that hold no path or log line.
    fn note_step(&self, id: &InstanceId, event: &Event) {
        let step = match event.step.as_str() {
            "starting" => "starting the MLflow server",
            "restarting" => "MLflow stopped while starting; trying again",
            "ready" => "ready",
            "failed" => "it could not start again; the portal shows why",
            _ => return,
        };
        self.inner.routes.note(id.as_str(), step);
    }

    fn event(&self, id: &InstanceId, event: Event) {
        self.note_step(id, &event);
        let entries = self.inner.entries.lock().expect("entries lock");
        if let Some(entry) = entries.get(id) {
            entry.events.send_modify(|log| log.push(event));
        }
    }

    /// Starts a new event log for a restart: subscribers from now on see the
    /// restart, not the earlier `ready`.
    fn restart_log(&self, id: &InstanceId, event: Event) {
        self.note_step(id, &event);
        let mut entries = self.inner.entries.lock().expect("entries lock");
        if let Some(entry) = entries.get_mut(id) {
            entry.events = watch::channel(vec![event]).0;
        }
    }

    /// Registers an instance (its record already on disk) and starts its
    /// supervisor: fetch, start MLflow (or watch the adopted one), route,
    /// restart on exits.
    fn launch(&self, stored: Stored, adopted: Option<Running>) {
        let id = stored.instance.id.clone();
        let first = if adopted.is_some() {
            let mut e = Event::new(
                "ready",
                Phase::Ready,
                Some("adopted after a server restart".into()),
            );
            e.url = Some(stored.instance.url.clone());
            e
        } else {
            Event::new("created", Phase::Pending, None)
        };
        let (events, _) = watch::channel(vec![first]);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        self.inner.routes.starting(id.as_str());
        self.inner.entries.lock().expect("entries lock").insert(
            id.clone(),
            Entry {
                stored,
                events,
                stop: Some(stop_tx),
                done: None,
            },
        );
        let this = self.clone();
        let sid = id.clone();
        let task = tokio::spawn(async move { this.supervise(sid, stop_rx, adopted).await });
        if let Some(entry) = self
            .inner
            .entries
            .lock()
            .expect("entries lock")
            .get_mut(&id)
        {
            entry.done = Some(task);
        }
    }

    /// Stops an instance's process and forgets it; `remove_data` also deletes its folder.
    async fn shutdown(&self, id: &InstanceId, remove_data: bool, grace: Duration) {
        let entry = self.inner.entries.lock().expect("entries lock").remove(id);
        self.inner.routes.remove(id.as_str());
        if let Some(mut entry) = entry {
            if let Some(stop) = entry.stop.take() {
                let _ = stop.send(grace);
            }
            if let Some(done) = entry.done.take() {
                let _ = done.await;
            }
            let step = if remove_data { "deleted" } else { "stopped" };
            entry
                .events
                .send_modify(|log| log.push(Event::new(step, Phase::Expired, None)));
        }
        if remove_data {
            let _ = std::fs::remove_dir_all(self.dir(id));
        }
    }

    /// Ends every open event stream with a final `shutdown` event (the server
    /// is stopping; the instance resumes when it restarts).
    pub fn announce_shutdown(&self) {
        let entries = self.inner.entries.lock().expect("entries lock");
        for entry in entries.values() {
            let phase = entry.stored.instance.phase;
            entry.events.send_modify(|log| {
                if !log.last().is_some_and(Event::is_final) {
                    log.push(Event::new(
                        "shutdown",
                        phase,
                        Some(
                            "the server is stopping; the instance resumes when it restarts".into(),
                        ),
                    ));
                }
            });
        }
    }

    /// Stops every MLflow process (data kept, for re-adoption on restart), all
    /// at once, SIGKILLing what is left after `grace`.
    pub async fn stop_all(&self) {
        self.stop_all_within(STOP_GRACE).await;
    }

    /// [`Self::stop_all`] with the grace given.
    pub async fn stop_all_within(&self, grace: Duration) {
        let ids: Vec<_> = self
            .inner
            .entries
            .lock()
            .expect("entries lock")
            .keys()
            .cloned()
            .collect();
        let stops = ids.iter().map(|id| self.shutdown(id, false, grace));
        futures_util::future::join_all(stops).await;
        // The data dir is free for the next server.
        drop(self.inner.lock.lock().expect("lock").take());
    }

    fn snapshot(&self) -> Vec<Instance> {
        let now = Timestamp::now();
        let entries = self.inner.entries.lock().expect("entries lock");
        let mut out: Vec<Instance> = entries
            .values()
            .map(|e| {
                let mut r = e.stored.instance.clone();
                if r.is_expired(now) {
                    r.phase = Phase::Expired;
                }
                r
            })
            .collect();
        out.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        out
    }

    /// Removes expired instances every `every` until the backend is dropped.
    pub fn spawn_reaper(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = weak.upgrade() else { return };
                let backend = LocalBackend { inner };
                match backend.gc(false).await {
                    Ok(removed) => {
                        for r in removed {
                            tracing::info!(name = %r.name, reason = %r.reason, "gc removed");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "gc failed"),
                }
            }
        })
    }
}

#[async_trait]
impl Backend for LocalBackend {
    fn schemes(&self) -> &'static [&'static str] {
        &["https", "http", "file"]
    }

    fn sleeps(&self) -> bool {
        true
    }

    fn event_log(&self, id: &InstanceId) -> Option<EventLog> {
        self.inner
            .entries
            .lock()
            .expect("entries lock")
            .get(id)
            .map(|e| e.events.subscribe())
    }

    async fn create(&self, request: NewInstance) -> Result<Instance> {
        let id = loop {
            let id = InstanceId::random();
            if !self
                .inner
                .entries
                .lock()
                .expect("entries lock")
                .contains_key(&id)
                && !self.dir(&id).exists()
            {
                break id;
            }
        };
        let record = Instance {
            url: self.url_for(&id),
            id,
            workload: request.workload.as_str().to_owned(),
            owner: request.owner,
            artifacts: request.artifacts,
            created_at: request.created_at,
            expires_at: request.expires_at,
            phase: Phase::Pending,
            message: None,
            writes: request.writes,
            access: request.access,
            access_url: None,
            credentials: request.credentials,
            idle_after: request.idle_after.map(crate::instance::show_idle_after),
        };
        let stored = Stored {
            instance: record.clone(),
            failed_at: None,
            served: false,
        };
        // Durable first: no record on disk, no instance.
        let dir = self.dir(&record.id);
        if let Err(e) = record::save(&dir, &stored) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        self.launch(stored, None);
        Ok(record)
    }

    async fn get(&self, id: &InstanceId) -> Result<Instance> {
        self.snapshot()
            .into_iter()
            .find(|i| &i.id == id)
            .ok_or_else(|| Error::NotFound(id.to_string()))
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Instance>> {
        Ok(filter.apply(self.snapshot()))
    }

    async fn delete(&self, id: &InstanceId) -> Result<()> {
        self.get(id).await?;
        self.shutdown(id, true, STOP_GRACE).await;
        Ok(())
    }

    async fn set_expiry(&self, id: &InstanceId, expires_at: Timestamp) -> Result<Instance> {
        // Durable first: written and fsynced, then applied in memory.
        let stored = self.update(id, |s| s.instance.expires_at = expires_at)?;
        Ok(stored.instance)
    }

    async fn gc(&self, dry_run: bool) -> Result<Vec<Removed>> {
        let now = Timestamp::now();
        let mut removed = Vec::new();
        for i in self.snapshot().into_iter().filter(|i| i.is_expired(now)) {
            if !dry_run {
                self.shutdown(&i.id, true, STOP_GRACE).await;
            }
            removed.push(Removed {
                kind: "instance".into(),
                name: i.id.to_string(),
                reason: "expired".into(),
            });
        }
        // Failed instances are kept --keep-failed (for their reason), then removed.
        let keep = self.inner.settings.supervision.keep_failed;
        let failed: Vec<InstanceId> = {
            let entries = self.inner.entries.lock().expect("entries lock");
            entries
                .values()
                .filter(|e| e.stored.instance.phase == Phase::Failed)
                .filter(|e| e.stored.failed_at.is_some_and(|t| add(t, keep) <= now))
                .map(|e| e.stored.instance.id.clone())
                .collect()
        };
        for id in failed {
            if removed.iter().any(|r| r.name == id.as_str()) {
                continue;
            }
            if !dry_run {
                self.shutdown(&id, true, STOP_GRACE).await;
            }
            removed.push(Removed {
                kind: "instance".into(),
                name: id.to_string(),
                reason: "failed longer than --keep-failed".into(),
            });
        }
        // Folders no live instance owns (a crash between create and record).
        let known: Vec<String> = self
            .snapshot()
            .into_iter()
            .map(|i| i.id.to_string())
            .collect();
        if let Ok(dirs) = std::fs::read_dir(self.inner.settings.data_dir.join("instances")) {
            for dir in dirs.flatten() {
                let name = dir.file_name().to_string_lossy().into_owned();
                if !known.contains(&name) && !removed.iter().any(|r| r.name == name) {
                    if !dry_run {
                        let _ = std::fs::remove_dir_all(dir.path());
                    }
                    removed.push(Removed {
                        kind: "folder".into(),
                        name,
                        reason: "no live instance".into(),
                    });
                }
            }
        }
        Ok(removed)
    }
}

/// The default data dir: `$XDG_DATA_HOME/flowgate` or `~/.local/share/flowgate`.
pub fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("flowgate")
}
