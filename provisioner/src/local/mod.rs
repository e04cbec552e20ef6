//! The local backend: the same lifecycle on one machine without Kubernetes.
//! Each instance is a folder under the data dir (its record, its fetched store,
//! MLflow's log) and an MLflow process on a free loopback port, reached through
//! one listener that routes `/<id>/` via the adapter crate.
//!
//! The records on disk are the store: a restarted `flowgate serve` re-adopts
//! the instances still valid (restarting their MLflow) and removes expired ones.

pub mod process;
pub mod router;

use crate::backend::{Backend, ListFilter, NewInstance, Removed};
use crate::events::{Event, EventLog};
use crate::instance::{Instance, InstanceId, Phase, TtlPolicy};
use crate::{Error, Result};
use adapter::fetch::{FetchOptions, Limits};
use adapter::{Proxy, ProxyConfig, ServeArgs};
use async_trait::async_trait;
use jiff::Timestamp;
use process::MlflowCommand;
use router::RouteTable;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// How long MLflow may take to answer after it is started.
const START_TIMEOUT: Duration = Duration::from_secs(180);
/// How long MLflow gets to stop before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

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
}

struct Entry {
    record: Instance,
    events: watch::Sender<Vec<Event>>,
    /// Stops the instance's supervisor (and with it MLflow).
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

struct Inner {
    settings: LocalSettings,
    mlflow: MlflowCommand,
    routes: Arc<RouteTable>,
    entries: Mutex<HashMap<InstanceId, Entry>>,
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
        let mlflow = MlflowCommand::prepare(&settings.mlflow, &settings.data_dir)?;
        let backend = Self {
            inner: Arc::new(Inner {
                settings,
                mlflow,
                routes: Arc::default(),
                entries: Mutex::default(),
            }),
        };
        backend.recover().await;
        Ok(backend)
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

    fn save(&self, record: &Instance) -> Result<()> {
        let dir = self.dir(&record.id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::Internal(format!("creating {}: {e}", dir.display())))?;
        let tmp = dir.join("instance.json.tmp");
        let body = serde_json::to_vec_pretty(record).map_err(|e| Error::Internal(e.to_string()))?;
        std::fs::write(&tmp, body)
            .and_then(|()| std::fs::rename(&tmp, dir.join("instance.json")))
            .map_err(|e| Error::Internal(format!("saving {}: {e}", record.id)))
    }

    async fn recover(&self) {
        let now = Timestamp::now();
        let Ok(dirs) = std::fs::read_dir(self.inner.settings.data_dir.join("instances")) else {
            return;
        };
        for dir in dirs.flatten() {
            let record: Option<Instance> = std::fs::read(dir.path().join("instance.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            match record {
                Some(mut r) if !r.is_expired(now) => {
                    tracing::info!(id = %r.id, "re-adopting instance");
                    // The listener may have moved since the record was written.
                    r.url = self.url_for(&r.id);
                    self.launch(r);
                }
                Some(r) => {
                    tracing::info!(id = %r.id, "removing instance that expired while the server was down");
                    let _ = std::fs::remove_dir_all(dir.path());
                }
                None => {
                    tracing::warn!(path = %dir.path().display(), "ignoring a folder without a valid instance record (gc removes it)")
                }
            }
        }
    }

    /// Publishes an event and updates the record's phase.
    fn publish(&self, id: &InstanceId, event: Event) {
        let mut entries = self.inner.entries.lock().expect("entries lock");
        if let Some(entry) = entries.get_mut(id) {
            entry.record.phase = event.phase;
            entry.record.message = if event.phase == Phase::Failed {
                event.message.clone()
            } else {
                None
            };
            let _ = self.save(&entry.record);
            entry.events.send_modify(|log| log.push(event));
        }
    }

    /// Registers an instance and starts its supervisor: fetch, start MLflow,
    /// route, then watch the process until it exits or is stopped.
    fn launch(&self, mut record: Instance) {
        record.phase = Phase::Pending;
        record.message = None;
        let id = record.id.clone();
        let (events, _) = watch::channel(vec![Event::new("created", Phase::Pending, None)]);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let _ = self.save(&record);
        self.inner.routes.starting(id.as_str());
        self.inner.entries.lock().expect("entries lock").insert(
            id.clone(),
            Entry {
                record: record.clone(),
                events,
                stop: Some(stop_tx),
                done: None,
            },
        );
        let this = self.clone();
        let task = tokio::spawn(async move { this.supervise(record, stop_rx).await });
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

    async fn supervise(self, record: Instance, mut stop: tokio::sync::oneshot::Receiver<()>) {
        let id = record.id.clone();
        let dir = self.dir(&id);
        let failed = |this: &Self, message: String| {
            tracing::warn!(%id, %message, "instance failed");
            this.inner.routes.remove(id.as_str());
            this.publish(&id, Event::new("failed", Phase::Failed, Some(message)));
        };

        self.publish(
            &id,
            Event::new(
                "downloading",
                Phase::Pending,
                Some(record.artifacts.url.clone()),
            ),
        );
        let options = FetchOptions {
            url: record.artifacts.url.clone(),
            sha256: record.artifacts.sha256.clone(),
            dest: dir.join("store"),
            limits: Limits::default(),
            retries: 3,
            backoff: Duration::from_secs(1),
        };
        let fetched = tokio::select! {
            r = adapter::fetch::fetch(&options) => r,
            _ = &mut stop => return,
        };
        if let Err(e) = fetched {
            tracing::warn!(%id, error = %e, "fetching the artefacts failed");
            return failed(&self, format!("artefacts: {}", e.public_reason()));
        }
        self.publish(
            &id,
            Event::new(
                "verified",
                Phase::Pending,
                Some(format!("sha256 {}", record.artifacts.sha256)),
            ),
        );

        let port = match process::free_port() {
            Ok(p) => p,
            Err(e) => return failed(&self, e.to_string()),
        };
        let log = dir.join("mlflow.log");
        tracing::info!(%id, port, "starting MLflow on loopback");
        self.publish(
            &id,
            Event::new(
                "starting",
                Phase::Pending,
                Some("starting the MLflow server".into()),
            ),
        );
        let mut child = match self.inner.mlflow.spawn(&dir.join("store"), port, &log) {
            Ok(c) => c,
            Err(e) => return failed(&self, e.to_string()),
        };
        let pgid = child.id();
        let answered = tokio::select! {
            r = process::wait_answering(&mut child, port, &log, START_TIMEOUT) => r,
            _ = &mut stop => {
                process::stop(&mut child, STOP_GRACE).await;
                return;
            }
        };
        if let Err(e) = answered {
            process::stop(&mut child, STOP_GRACE).await;
            return failed(&self, e.to_string());
        }
        let args = ServeArgs {
            prefix: Some(id.prefix()),
            upstream: Some(format!("http://127.0.0.1:{port}")),
            ..Default::default()
        };
        match ProxyConfig::resolve(args, Vec::<(String, String)>::new()) {
            Ok(config) => self.inner.routes.insert(id.as_str(), Proxy::new(config)),
            Err(e) => {
                process::stop(&mut child, STOP_GRACE).await;
                return failed(&self, format!("adapter: {e}"));
            }
        }
        let mut ready = Event::new("ready", Phase::Ready, None);
        ready.url = Some(record.url.clone());
        self.publish(&id, ready);

        tokio::select! {
            status = child.wait() => {
                process::kill_group(pgid);
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                failed(&self, format!("MLflow exited ({status}): {}", process::tail(&log)));
            }
            _ = &mut stop => {
                self.inner.routes.remove(id.as_str());
                process::stop(&mut child, STOP_GRACE).await;
            }
        }
    }

    /// Stops an instance's process and forgets it; `remove_data` also deletes its folder.
    async fn shutdown(&self, id: &InstanceId, remove_data: bool) {
        let entry = self.inner.entries.lock().expect("entries lock").remove(id);
        self.inner.routes.remove(id.as_str());
        if let Some(mut entry) = entry {
            if let Some(stop) = entry.stop.take() {
                let _ = stop.send(());
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

    /// Stops every MLflow process (data kept, for re-adoption on restart).
    pub async fn stop_all(&self) {
        let ids: Vec<_> = self
            .inner
            .entries
            .lock()
            .expect("entries lock")
            .keys()
            .cloned()
            .collect();
        for id in ids {
            self.shutdown(&id, false).await;
        }
    }

    fn snapshot(&self) -> Vec<Instance> {
        let now = Timestamp::now();
        let entries = self.inner.entries.lock().expect("entries lock");
        let mut out: Vec<Instance> = entries
            .values()
            .map(|e| {
                let mut r = e.record.clone();
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
            url: format!(
                "{}/{}/",
                self.inner.settings.public_url.trim_end_matches('/'),
                id
            ),
            id,
            workload: request.workload.as_str().to_owned(),
            owner: request.owner,
            artifacts: request.artifacts,
            created_at: request.created_at,
            expires_at: request.expires_at,
            phase: Phase::Pending,
            message: None,
        };
        self.launch(record.clone());
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
        self.shutdown(id, true).await;
        Ok(())
    }

    async fn set_expiry(&self, id: &InstanceId, expires_at: Timestamp) -> Result<Instance> {
        let mut entries = self.inner.entries.lock().expect("entries lock");
        let entry = entries
            .get_mut(id)
            .ok_or_else(|| Error::NotFound(id.to_string()))?;
        entry.record.expires_at = expires_at;
        self.save(&entry.record)?;
        Ok(entry.record.clone())
    }

    async fn gc(&self, dry_run: bool) -> Result<Vec<Removed>> {
        let now = Timestamp::now();
        let mut removed = Vec::new();
        for i in self.snapshot().into_iter().filter(|i| i.is_expired(now)) {
            if !dry_run {
                self.shutdown(&i.id, true).await;
            }
            removed.push(Removed {
                kind: "instance".into(),
                name: i.id.to_string(),
                reason: "expired".into(),
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
