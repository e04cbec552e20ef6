//! Supervision of each instance's MLflow, like a kubelet with
//! `restartPolicy: Always`, and with no orphans.
//!
//! - Each MLflow runs in its own process group (the entrypoint leads it), and
//!   the group is recorded in the instance's folder (`mlflow.json`: pid, pgid,
//!   port, start time) before the instance is routed to it.
//! - A server that starts finds what an earlier one left: a recorded group whose
//!   leader is the same process (pid and start time) and which answers on its
//!   port is adopted; anything else of that instance (the recorded group, or
//!   any process whose command line names the instance's store) is stopped.
//!   So one MLflow serves a store, never two.
//! - MLflow that exits after it has served is restarted with exponential
//!   backoff; while it restarts its URL answers 503 with `Retry-After`. After
//!   [`Supervision::max_restarts`] exits within [`Supervision::restart_window`]
//!   the instance becomes Failed, with the reason (signal, exit code, the end
//!   of its log). Failed is written to the record and survives restarts.
//! - Process inspection reads `/proc`; signals go through `nix`'s safe
//!   wrappers (the workspace forbids `unsafe`).

use super::LocalBackend;
use super::process;
use super::record::{self, ProcessRecord};
use crate::events::Event;
use crate::instance::{Access, InstanceId, Phase};
use crate::{Error, Result};
use adapter::fetch::{Credentials, FetchOptions, Timeouts};
use adapter::{Proxy, ProxyConfig, ServeArgs};
use jiff::Timestamp;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::Child;
use tokio::sync::{Notify, oneshot};

/// How long MLflow may take to answer after it is started.
const START_TIMEOUT: Duration = Duration::from_secs(180);
/// First wait before a restart; doubles per exit in the window.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// Longest wait before a restart.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often a write that failed (disk full) is tried again.
const PERSIST_RETRY: Duration = Duration::from_secs(2);
/// How often an adopted process (not our child) is checked.
const ADOPTED_POLL: Duration = Duration::from_millis(500);
/// MLflow's log is cut when it grows past this.
pub const LOG_CAP: u64 = 16 << 20;

/// How instances are supervised.
#[derive(Clone, Debug)]
pub struct Supervision {
    /// Exits within `restart_window` after which the instance is Failed.
    pub max_restarts: u32,
    /// The window exits are counted in.
    pub restart_window: Duration,
    /// How long a Failed instance is kept (its record and reason) before removal.
    pub keep_failed: Duration,
    /// Download timeouts.
    pub fetch: Timeouts,
    /// Size bound of each instance's folder (archive, unpacked store), in bytes.
    pub store_bytes: u64,
    /// Where credentials sets live, one directory each (the files of
    /// `flowgate-adapter fetch --credentials-dir`); none: no set can be used.
    pub credentials_root: Option<PathBuf>,
    /// An instance nobody visited for this long sleeps: its MLflow stops
    /// until the next visit. None: never.
    pub idle_after: Option<Duration>,
}

impl Default for Supervision {
    fn default() -> Self {
        Self {
            max_restarts: 5,
            restart_window: Duration::from_secs(600),
            keep_failed: Duration::from_secs(3600),
            fetch: Timeouts::default(),
            store_bytes: 10 << 30,
            credentials_root: None,
            idle_after: None,
        }
    }
}

/// Asks a supervisor to stop its MLflow, giving it this long before SIGKILL.
pub type StopSender = oneshot::Sender<Duration>;

// ---------------------------------------------------------------- /proc

/// What `/proc/<pid>/stat` says about a process.
#[derive(Clone, Copy, Debug)]
struct Stat {
    pgrp: i32,
    start_ticks: u64,
    zombie: bool,
}

fn stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid pgrp ...`: comm may hold spaces and parentheses.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        zombie: matches!(*fields.first()?, "Z" | "X"),
        pgrp: fields.get(2)?.parse().ok()?,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

/// The start time of a live process, for its [`ProcessRecord`].
pub fn start_ticks(pid: i32) -> Option<u64> {
    stat(pid).map(|s| s.start_ticks)
}

fn pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Live (not zombie) members of a process group started no earlier than `since`.
fn members(pgid: i32, since: u64) -> Vec<i32> {
    pids()
        .into_iter()
        .filter(|&p| stat(p).is_some_and(|s| s.pgrp == pgid && !s.zombie && s.start_ticks >= since))
        .collect()
}

/// Process groups with a member whose command line has `needle` as an argument
/// (or inside one): what is left of an instance whose group was not recorded.
fn groups_naming(needle: &str) -> Vec<i32> {
    let own = nix::unistd::getpgrp().as_raw();
    let mut out: Vec<i32> = pids()
        .into_iter()
        .filter(|&p| {
            std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
                c.split(|&b| b == 0)
                    .any(|arg| String::from_utf8_lossy(arg).contains(needle))
            })
        })
        .filter_map(|p| stat(p).filter(|s| !s.zombie).map(|s| s.pgrp))
        .filter(|&g| g > 1 && g != own)
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Stops a process group: SIGTERM, then SIGKILL after `grace`; returns once no
/// member is left (or a second after the SIGKILL).
async fn stop_group(pgid: i32, since: u64, grace: Duration) {
    if pgid <= 1 || pgid == nix::unistd::getpgrp().as_raw() {
        return;
    }
    let group = Pid::from_raw(pgid);
    if members(pgid, since).is_empty() {
        return;
    }
    let _ = killpg(group, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if members(pgid, since).is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = killpg(group, Signal::SIGKILL);
    for _ in 0..20 {
        if members(pgid, since).is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Answers `GET /health` with a 200 on loopback `port`.
async fn healthy(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await.ok()?;
        Some(buf.starts_with(b"HTTP/1.") && &buf[9..12] == b"200")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), probe).await,
        Ok(Some(true))
    )
}

// ---------------------------------------------------------------- processes

/// A running MLflow group: started by this server, or adopted from an earlier one.
pub enum Running {
    /// Our child.
    Owned {
        /// The entrypoint.
        child: Child,
        /// Its group, as recorded.
        record: ProcessRecord,
    },
    /// Left by an earlier server: watched through `/proc`.
    Adopted {
        /// Its group, as recorded.
        record: ProcessRecord,
    },
}

impl Running {
    fn record(&self) -> ProcessRecord {
        match self {
            Running::Owned { record, .. } | Running::Adopted { record } => record.clone(),
        }
    }

    /// Waits until the group's leader exits; says how.
    async fn exited(&mut self) -> String {
        match self {
            Running::Owned { child, .. } => match child.wait().await {
                Ok(status) => describe_exit(status),
                Err(e) => format!("could not be waited for: {e}"),
            },
            Running::Adopted { record } => {
                loop {
                    let alive = stat(record.pid)
                        .is_some_and(|s| !s.zombie && s.start_ticks == record.start_ticks);
                    if !alive {
                        break;
                    }
                    tokio::time::sleep(ADOPTED_POLL).await;
                }
                "exited (it was started by an earlier server, so its status is unknown)".into()
            }
        }
    }

    /// Stops the whole group (SIGTERM, SIGKILL after `grace`) and reaps the leader.
    async fn stop(&mut self, grace: Duration) {
        let r = self.record();
        if let Running::Owned { child, .. } = self {
            let _ = killpg(Pid::from_raw(r.pgid), Signal::SIGTERM);
            if tokio::time::timeout(grace, child.wait()).await.is_err() {
                let _ = killpg(Pid::from_raw(r.pgid), Signal::SIGKILL);
                let _ = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
            }
        }
        stop_group(r.pgid, r.start_ticks, grace).await;
    }
}

/// An exit status in words: the signal's name, or the exit code and what it means.
pub fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(sig) = status.signal() {
        let name = Signal::try_from(sig).map_or_else(|_| sig.to_string(), |s| s.to_string());
        return format!("killed by signal {name}");
    }
    match status.code() {
        Some(0) => "exited with code 0 without being asked to stop (a worker may have died)".into(),
        Some(c) if c > 128 => {
            let sig =
                Signal::try_from(c - 128).map_or_else(|_| (c - 128).to_string(), |s| s.to_string());
            format!("exited with code {c}: the MLflow server process died of {sig}")
        }
        Some(c) => format!("exited with code {c}"),
        None => "exited".into(),
    }
}

/// At start-up: adopts the recorded group if it is the same process and
/// healthy; otherwise stops it. Either way, stops every other group that names
/// this instance's store. Returns the adopted group.
pub async fn adopt_or_stop(dir: &Path, adopt: bool, grace: Duration) -> Option<Running> {
    let mut adopted = None;
    if let Some(r) = record::load_process(dir).filter(|r| r.boot_id == record::boot_id()) {
        let same = stat(r.pid)
            .is_some_and(|s| !s.zombie && s.start_ticks == r.start_ticks && s.pgrp == r.pgid);
        if adopt && same && healthy(r.port).await {
            tracing::info!(dir = %dir.display(), pid = r.pid, port = r.port, "adopting the MLflow an earlier server started");
            adopted = Some(Running::Adopted { record: r });
        } else {
            tracing::info!(dir = %dir.display(), pgid = r.pgid, "stopping the MLflow group an earlier server left");
            stop_group(r.pgid, r.start_ticks, grace).await;
            record::clear_process(dir);
        }
    }
    let keep = adopted.as_ref().map(|r: &Running| r.record().pgid);
    let store = dir.join("store");
    for g in groups_naming(&store.to_string_lossy()) {
        if Some(g) != keep {
            tracing::warn!(dir = %dir.display(), pgid = g, "stopping an unrecorded MLflow group of this instance");
            stop_group(g, 0, grace).await;
        }
    }
    adopted
}

// ---------------------------------------------------------------- the loop

/// Resolves once `proxy` has been idle for `after` (never when `after` is
/// None): no request or response body open, and none ended for that long.
async fn idle(proxy: &Proxy, after: Option<Duration>) {
    let Some(after) = after else {
        return std::future::pending().await;
    };
    let tick = (after / 4).clamp(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        tokio::time::sleep(tick).await;
        if proxy.metrics().idle_for().is_some_and(|idle| idle >= after) {
            return;
        }
    }
}

enum Stopped {
    /// Asked to stop; the group has been stopped.
    Yes,
    /// Go on.
    No,
}

impl LocalBackend {
    /// Runs one instance until it is stopped or Failed: fetch (unless adopted),
    /// start, route, watch, restart.
    pub(super) async fn supervise(
        self,
        id: InstanceId,
        mut stop: oneshot::Receiver<Duration>,
        adopted: Option<Running>,
    ) {
        let dir = self.dir(&id);
        let settings = self.inner.settings.supervision.clone();
        let mut running = adopted;
        let mut served = self.stored(&id).is_some_and(|s| s.served);
        let asleep = self
            .stored(&id)
            .is_some_and(|s| s.instance.phase == Phase::Sleeping);
        if running.is_none() && asleep {
            // Asleep when the server stopped: asleep again, no fetch, no MLflow.
            let gate = match self.adapter_for(&id, 9) {
                Ok(gate) => gate,
                Err(e) => return self.fail(&id, e, &mut stop).await,
            };
            if let Stopped::Yes = self.sleep(&id, None, gate, &mut stop).await {
                return;
            }
        } else if running.is_none() {
            let Some(stored) = self.stored(&id) else {
                return;
            };
            if stored.instance.phase != Phase::Pending
                && !self.enter(&id, Phase::Pending, &mut stop).await
            {
                return;
            }
            let artifacts = stored.instance.artifacts;
            self.event(
                &id,
                Event::new("downloading", Phase::Pending, Some(artifacts.url.clone())),
            );
            let credentials = match fetch_credentials(
                settings.credentials_root.as_deref(),
                stored.instance.credentials.as_deref(),
            ) {
                Ok(c) => c,
                Err(reason) => return self.fail(&id, reason, &mut stop).await,
            };
            let options = FetchOptions {
                url: artifacts.url.clone(),
                sha256: artifacts.sha256.clone(),
                dest: dir.join("store"),
                limits: store_limits(settings.store_bytes),
                retries: 3,
                backoff: Duration::from_secs(1),
                timeouts: settings.fetch.clone(),
                credentials,
            };
            let fetched = tokio::select! {
                r = adapter::fetch::fetch(&options) => r,
                _ = &mut stop => return,
            };
            if let Err(e) = fetched {
                return self
                    .fail(&id, format!("artefacts: {}", e.public_reason()), &mut stop)
                    .await;
            }
            self.event(
                &id,
                Event::new(
                    "verified",
                    Phase::Pending,
                    Some(format!("sha256 {}", artifacts.sha256)),
                ),
            );
        }

        let mut exits: VecDeque<Instant> = VecDeque::new();
        loop {
            let mut r = match running.take() {
                Some(r) => r,
                None => match self.start(&id, &dir, &mut stop).await {
                    Ok(Some(r)) => r,
                    Ok(None) => return,
                    Err(reason) if !served => return self.fail(&id, reason, &mut stop).await,
                    Err(reason) => match self.crashed(&id, reason, &mut exits, &mut stop).await {
                        Stopped::Yes => return,
                        Stopped::No => continue,
                    },
                },
            };
            let proxy = match self.adapter_for(&id, r.record().port) {
                Ok(proxy) => proxy,
                Err(e) => {
                    r.stop(super::STOP_GRACE).await;
                    record::clear_process(&dir);
                    return self.fail(&id, e, &mut stop).await;
                }
            };
            // Idle time counts from when it serves.
            proxy.metrics().touch();
            self.inner.routes.insert(id.as_str(), Arc::clone(&proxy));
            let persisted = self
                .persist(&id, &mut stop, |s| {
                    s.instance.phase = Phase::Ready;
                    s.instance.message = None;
                    s.served = true;
                })
                .await;
            if !persisted {
                self.inner.routes.remove(id.as_str());
                r.stop(super::STOP_GRACE).await;
                record::clear_process(&dir);
                return;
            }
            served = true;
            let mut ready = Event::new("ready", Phase::Ready, None);
            ready.url = self.stored(&id).map(|s| s.instance.url);
            self.event(&id, ready);

            let log = dir.join(process::LOG);
            let rec = r.record();
            let first_gone = std::sync::Mutex::new(None::<String>);
            let reason = tokio::select! {
                // a stop (delete, expiry) wins over an idle timer due at once
                biased;
                grace = &mut stop => {
                    self.inner.routes.remove(id.as_str());
                    r.stop(grace.unwrap_or(super::STOP_GRACE)).await;
                    record::clear_process(&dir);
                    return;
                }
                why = r.exited() => why,
                () = idle(&proxy, self.idle_after_of(&id, settings.idle_after)) => {
                    match self.sleep(&id, Some(r), proxy, &mut stop).await {
                        Stopped::Yes => return,
                        Stopped::No => continue,
                    }
                }
                _ = futures_util::future::join(cap_log(&log), watch_group(&rec, &first_gone)) => {
                    unreachable!("the watchers never return")
                }
            };
            let reason = match first_gone.lock().ok().and_then(|mut g| g.take()) {
                Some(gone) => format!("{reason}, after its {gone} died"),
                None => reason,
            };
            // Workers that outlived the leader.
            stop_group(rec.pgid, rec.start_ticks, Duration::from_secs(2)).await;
            record::clear_process(&dir);
            let reason = format!("MLflow {reason}: {}", process::tail(&log));
            match self.crashed(&id, reason, &mut exits, &mut stop).await {
                Stopped::Yes => return,
                Stopped::No => {}
            }
        }
    }

    /// The instance's adapter in front of MLflow on `port`: its prefix, its
    /// access gate (`link`), read-only unless made with writes.
    fn adapter_for(&self, id: &InstanceId, port: u16) -> std::result::Result<Arc<Proxy>, String> {
        let (writes, link) = self.stored(id).map_or((false, true), |s| {
            (s.instance.writes, s.instance.access == Access::Link)
        });
        let args = ServeArgs {
            // A `link` instance opens only through its access link.
            access_keys: link.then(|| self.access_keys().to_path_buf()),
            prefix: Some(id.prefix()),
            upstream: Some(format!("http://127.0.0.1:{port}")),
            writes: Some(if writes {
                adapter::config::Switch::On
            } else {
                adapter::config::Switch::Off
            }),
            ..Default::default()
        };
        ProxyConfig::resolve(args, Vec::<(String, String)>::new())
            .map(Proxy::new)
            .map_err(|e| format!("adapter: {e}"))
    }

    /// The instance's own idle time (zero: never) or the server's.
    fn idle_after_of(&self, id: &InstanceId, server: Option<Duration>) -> Option<Duration> {
        match self.stored(id).and_then(|s| s.instance.idle_after) {
            Some(own) => crate::instance::parse_idle_after(&own)
                .ok()
                .filter(|d| !d.is_zero()),
            None => server,
        }
    }

    /// Idle: stops MLflow (if running), hands the route to the activator,
    /// whose `gate` decides who may wake it, and waits for a visit. The store
    /// stays on disk; after the visit the loop starts MLflow on it again,
    /// once its checksum marker still matches.
    async fn sleep(
        &self,
        id: &InstanceId,
        running: Option<Running>,
        gate: Arc<Proxy>,
        stop: &mut oneshot::Receiver<Duration>,
    ) -> Stopped {
        let dir = self.dir(id);
        let idle = gate.metrics().idle_for().unwrap_or_default();
        let wake = Arc::new(Notify::new());
        self.inner
            .routes
            .sleeping(id.as_str(), Arc::clone(&gate), Arc::clone(&wake));
        // Requests that found it serving just before finish first (bounded).
        let until = Instant::now() + Duration::from_secs(10);
        while gate.metrics().busy() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Some(mut r) = running {
            tracing::info!(%id, idle = %humantime::format_duration(idle), "idle: MLflow goes to sleep");
            r.stop(super::STOP_GRACE).await;
            record::clear_process(&dir);
        }
        if !self.enter(id, Phase::Sleeping, stop).await {
            self.inner.routes.remove(id.as_str());
            return Stopped::Yes;
        }
        // A new episode: a stream opened from now on ends at `sleeping`.
        self.restart_log(
            id,
            Event::new(
                "sleeping",
                Phase::Sleeping,
                Some("nobody visited for a while: MLflow stopped; the next visit wakes it".into()),
            ),
        );
        tokio::select! {
            () = wake.notified() => {}
            _ = &mut *stop => {
                self.inner.routes.remove(id.as_str());
                return Stopped::Yes;
            }
        }
        if !self.enter(id, Phase::Pending, stop).await {
            self.inner.routes.remove(id.as_str());
            return Stopped::Yes;
        }
        self.restart_log(
            id,
            Event::new("waking", Phase::Pending, Some("woken by a visit".into())),
        );
        self.inner.routes.note(id.as_str(), "woken by a visit");
        // The store is used as it was verified: a changed or missing one is
        // not served (the archive would have to be fetched again).
        let sha = self.stored(id).map(|s| s.instance.artifacts.sha256);
        let marker = std::fs::read_to_string(dir.join("store").join(adapter::fetch::MARKER));
        if sha.is_none() || marker.map(|m| m.trim().to_owned()).ok() != sha {
            let reason = "its store changed or went missing while it slept; ask the portal for a new instance";
            self.fail(id, format!("waking: {reason}"), stop).await;
            // last, so that the waking page leads with it
            self.inner.routes.note(id.as_str(), reason);
            return Stopped::Yes;
        }
        self.inner
            .routes
            .note(id.as_str(), "store found as it was fetched (sha256 marker)");
        Stopped::No
    }

    /// Starts MLflow, records its group and waits until it answers. `Ok(None)`: stopped.
    async fn start(
        &self,
        id: &InstanceId,
        dir: &Path,
        stop: &mut oneshot::Receiver<Duration>,
    ) -> std::result::Result<Option<Running>, String> {
        let port = process::free_port().map_err(|e| e.to_string())?;
        self.event(
            id,
            Event::new(
                "starting",
                Phase::Pending,
                Some("starting the MLflow server".into()),
            ),
        );
        let log = dir.join(process::LOG);
        let child = self
            .inner
            .mlflow
            .spawn(&dir.join("store"), dir, port, &log)
            .map_err(|e| e.to_string())?;
        let pid = child.id().map(|p| p as i32).unwrap_or_default();
        let ticks = start_ticks(pid).unwrap_or_default();
        let rec = ProcessRecord {
            pid,
            pgid: pid,
            port,
            start_ticks: ticks,
            boot_id: record::boot_id(),
        };
        let mut running = Running::Owned {
            child,
            record: rec.clone(),
        };
        // Recorded before it is routed: a server killed from here on finds it.
        if let Err(e) = record::save_process(dir, &rec) {
            running.stop(super::STOP_GRACE).await;
            return Err(e.to_string());
        }
        let Running::Owned { child, .. } = &mut running else {
            unreachable!()
        };
        let answered = tokio::select! {
            r = process::wait_answering(child, port, &log, START_TIMEOUT) => r,
            grace = &mut *stop => {
                running.stop(grace.unwrap_or(super::STOP_GRACE)).await;
                record::clear_process(dir);
                return Ok(None);
            }
        };
        if let Err(e) = answered {
            running.stop(super::STOP_GRACE).await;
            record::clear_process(dir);
            return Err(e.to_string());
        }
        Ok(Some(running))
    }

    /// After MLflow exited: Failed if it exited too often, else wait and go on.
    async fn crashed(
        &self,
        id: &InstanceId,
        reason: String,
        exits: &mut VecDeque<Instant>,
        stop: &mut oneshot::Receiver<Duration>,
    ) -> Stopped {
        let s = &self.inner.settings.supervision;
        let now = Instant::now();
        exits.push_back(now);
        while exits
            .front()
            .is_some_and(|t| now.duration_since(*t) > s.restart_window)
        {
            exits.pop_front();
        }
        let n = exits.len() as u32;
        tracing::warn!(%id, %reason, exits = n, "MLflow exited");
        if n >= s.max_restarts {
            let reason = format!(
                "{reason} (exited {n} times within {}; not restarted again)",
                humantime::format_duration(s.restart_window)
            );
            self.fail(id, reason, stop).await;
            return Stopped::Yes;
        }
        let wait = BACKOFF_FIRST
            .saturating_mul(1 << (n - 1).min(10))
            .min(BACKOFF_MAX);
        self.inner.routes.restarting(id.as_str());
        let message = format!(
            "restarting in {} (exit {n} of {} allowed within {}): {reason}",
            humantime::format_duration(wait),
            s.max_restarts,
            humantime::format_duration(s.restart_window)
        );
        let m = message.clone();
        if !self
            .persist(id, stop, |st| {
                st.instance.phase = Phase::Pending;
                st.instance.message = Some(m.clone());
            })
            .await
        {
            return Stopped::Yes;
        }
        self.restart_log(id, Event::new("restarting", Phase::Pending, Some(message)));
        tokio::select! {
            () = tokio::time::sleep(wait) => Stopped::No,
            _ = &mut *stop => Stopped::Yes,
        }
    }

    /// Makes the instance Failed (durably, retrying while the disk refuses).
    async fn fail(&self, id: &InstanceId, reason: String, stop: &mut oneshot::Receiver<Duration>) {
        tracing::warn!(%id, %reason, "instance failed");
        self.inner.routes.failed(id.as_str());
        record::clear_process(&self.dir(id));
        let r = reason.clone();
        if self
            .persist(id, stop, |s| {
                s.instance.phase = Phase::Failed;
                s.instance.message = Some(r.clone());
                s.failed_at = Some(Timestamp::now());
            })
            .await
        {
            self.event(id, Event::new("failed", Phase::Failed, Some(reason)));
        }
    }

    /// Moves to `phase` with no message (see [`Self::persist`]).
    async fn enter(
        &self,
        id: &InstanceId,
        phase: Phase,
        stop: &mut oneshot::Receiver<Duration>,
    ) -> bool {
        self.persist(id, stop, |s| {
            s.instance.phase = phase;
            s.instance.message = None;
        })
        .await
    }

    /// Applies a state change: written and fsynced first, then in memory. While
    /// the disk refuses, tries again every few seconds. False if stopped meanwhile.
    async fn persist(
        &self,
        id: &InstanceId,
        stop: &mut oneshot::Receiver<Duration>,
        change: impl Fn(&mut record::Stored),
    ) -> bool {
        loop {
            match self.update(id, &change) {
                Ok(_) => return true,
                Err(Error::NotFound(_)) => return false,
                Err(e) => {
                    tracing::warn!(%id, error = %e, "cannot record a state change; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(PERSIST_RETRY) => {}
                        _ = &mut *stop => return false,
                    }
                }
            }
        }
    }
}

/// The credentials of set `name`: the directory of that name under `root`.
/// The service granted the name; a set it names that is not there is a
/// failure with a reason, not an anonymous fetch.
fn fetch_credentials(root: Option<&Path>, name: Option<&str>) -> Result<Credentials, String> {
    let Some(name) = name else {
        return Ok(Credentials::none());
    };
    let dir = root
        .map(|r| r.join(name))
        .filter(|d| d.is_dir())
        .ok_or_else(|| {
            format!(
                "artefacts: credentials {name:?} are not on this server (no directory {name} \
                 under --credentials-root)"
            )
        })?;
    Ok(Credentials::none().with_dir(&dir))
}

/// Fetch limits that keep an instance's folder within `bytes`: the archive
/// (removed after unpacking) a quarter, the unpacked store the rest.
pub fn store_limits(bytes: u64) -> adapter::fetch::Limits {
    let d = adapter::fetch::Limits::default();
    adapter::fetch::Limits {
        max_download_bytes: d.max_download_bytes.min(bytes / 4),
        max_unpacked_bytes: d.max_unpacked_bytes.min(bytes - bytes / 4),
        ..d
    }
}

/// Watches the members of a group below its leader; records the first that
/// disappears while the leader lives (a worker that died: the real reason when
/// the server then exits with 0). Never returns.
async fn watch_group(r: &ProcessRecord, first_gone: &std::sync::Mutex<Option<String>>) {
    let name = |pid: i32| {
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let what = ["uvicorn", "gunicorn", "mlflow server", "huey"]
            .into_iter()
            .find(|w| cmd.contains(w))
            .unwrap_or("process");
        format!("{what} (pid {pid})")
    };
    // (pid, name, polls seen): a process seen once may be a passing helper.
    let mut known: Vec<(i32, String, u32)> = Vec::new();
    loop {
        let now: Vec<i32> = members(r.pgid, r.start_ticks)
            .into_iter()
            .filter(|&p| p != r.pid)
            .collect();
        let leader_alive = stat(r.pid).is_some_and(|s| !s.zombie);
        // Of those gone at once, the one started last (a worker, not its parent).
        if leader_alive
            && let Some((_, gone, _)) = known
                .iter()
                .rev()
                .find(|(p, _, seen)| *seen >= 2 && !now.contains(p))
            && let Ok(mut slot) = first_gone.lock()
            && slot.is_none()
        {
            *slot = Some(gone.clone());
        }
        known.retain(|(p, _, _)| now.contains(p));
        for k in &mut known {
            k.2 += 1;
        }
        for p in now {
            if !known.iter().any(|(k, _, _)| *k == p) {
                known.push((p, name(p), 1));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Keeps MLflow's log under [`LOG_CAP`] (it writes in append mode, so cutting
/// the file loses the old lines and nothing else). Never returns.
async fn cap_log(log: &Path) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        if std::fs::metadata(log).is_ok_and(|m| m.len() > LOG_CAP)
            && let Ok(f) = std::fs::OpenOptions::new().write(true).open(log)
        {
            let _ = f.set_len(0);
            let _ = std::fs::OpenOptions::new()
                .append(true)
                .open(log)
                .and_then(|mut f| {
                    std::io::Write::write_all(
                        &mut f,
                        format!("flowgate: log cut at {LOG_CAP} bytes\n").as_bytes(),
                    )
                });
        }
    }
}

/// Parses a size: bytes, or a Kubernetes quantity (`10Gi`, `500M`).
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| Error::invalid("store-size", format!("{s:?} is not a size such as 10Gi")))?;
    let mult: u64 = match unit {
        "" => 1,
        "k" | "K" => 1000,
        "M" => 1000_u64.pow(2),
        "G" => 1000_u64.pow(3),
        "T" => 1000_u64.pow(4),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => {
            return Err(Error::invalid(
                "store-size",
                format!("{s:?} is not a size such as 10Gi"),
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| Error::invalid("store-size", format!("{s:?} is too large")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10Gi").unwrap(), 10 << 30);
        assert_eq!(parse_size("500M").unwrap(), 500_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("1Pi").is_err());
    }

    #[test]
    fn exits_in_words() {
        use std::os::unix::process::ExitStatusExt;
        let killed = std::process::ExitStatus::from_raw(9);
        assert_eq!(describe_exit(killed), "killed by signal SIGKILL");
        let code = std::process::ExitStatus::from_raw(137 << 8);
        assert!(
            describe_exit(code).contains("SIGKILL"),
            "{}",
            describe_exit(code)
        );
        let zero = std::process::ExitStatus::from_raw(0);
        assert!(describe_exit(zero).contains("without being asked"));
    }

    #[test]
    fn proc_stat_of_this_process() {
        let me = std::process::id() as i32;
        let s = stat(me).unwrap();
        assert_eq!(s.pgrp, nix::unistd::getpgrp().as_raw());
        assert!(!s.zombie);
        assert_eq!(start_ticks(me), Some(s.start_ticks));
    }
}
