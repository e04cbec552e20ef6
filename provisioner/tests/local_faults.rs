//! The local backend through faults, on real processes: the real
//! `flowgate serve --backend local` binary, real MLflow, signals, a full disk
//! (a small tmpfs) and an archive server that accepts and never answers.
//! Each test asserts what an operator or a user would notice: how many MLflow
//! processes serve an instance, whether its URL works, what the API answers
//! and how long the server takes to exit.

use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn mlflow() -> PathBuf {
    let path = std::env::var_os("FLOWGATE_TEST_MLFLOW")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".cache/venvs/current/bin/mlflow"));
    assert!(
        path.is_file(),
        "no MLflow at {}: run testenv/deps (./test does) or set FLOWGATE_TEST_MLFLOW",
        path.display()
    );
    path
}

/// A real job store (populate.py) packed as a .tgz, and its sha256.
fn store_archive() -> &'static (PathBuf, String) {
    static ARCHIVE: OnceLock<(PathBuf, String)> = OnceLock::new();
    ARCHIVE.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("flowgate-faults-store-")
            .tempdir()
            .unwrap()
            .keep();
        let ok = Command::new(mlflow().with_file_name("python"))
            .arg(repo().join("testenv/mlflow/populate.py"))
            .arg("--store")
            .arg(dir.join("job/mlruns"))
            .env("MLFLOW_ALLOW_FILE_STORE", "true")
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success(), "populate.py failed");
        let archive = dir.join("store.tgz");
        let ok = Command::new("tar")
            .arg("-czf")
            .arg(&archive)
            .arg("-C")
            .arg(dir.join("job"))
            .arg("mlruns")
            .status()
            .unwrap();
        assert!(ok.success());
        std::fs::remove_dir_all(dir.join("job")).unwrap();
        let out = Command::new("sha256sum").arg(&archive).output().unwrap();
        let sha = String::from_utf8(out.stdout).unwrap()[..64].to_owned();
        (archive, sha)
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A running `flowgate serve --backend local`.
struct Server {
    child: Child,
    api: String,
    instances: String,
    api_port: u16,
    instances_port: u16,
    data: PathBuf,
}

impl Server {
    async fn start(data: &Path, extra: &[&str]) -> Self {
        Self::start_on(data, free_port(), free_port(), extra).await
    }

    async fn start_on(data: &Path, api_port: u16, instances_port: u16, extra: &[&str]) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_of(data))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_flowgate"))
            .args(["--backend", "local", "serve"])
            .args(["--listen", &format!("127.0.0.1:{api_port}")])
            .args(["--local-listen", &format!("127.0.0.1:{instances_port}")])
            .arg("--data-dir")
            .arg(data)
            .arg("--mlflow")
            .arg(mlflow())
            .args(extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let s = Self {
            child,
            api: format!("http://127.0.0.1:{api_port}"),
            instances: format!("http://127.0.0.1:{instances_port}"),
            api_port,
            instances_port,
            data: data.to_path_buf(),
        };
        let c = http();
        for _ in 0..600 {
            if c.get(format!("{}/healthz", s.api)).send().await.is_ok() {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "flowgate serve did not come up; see {}",
            data.with_extension("server.log").display()
        );
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGKILL: the server gets no chance to clean up.
    fn kill9(mut self) {
        signal(self.pid(), "KILL");
        self.child.wait().unwrap();
    }

    /// SIGTERM; returns how long the process took to exit (panics after 60 s).
    fn term(mut self) -> Duration {
        let t = Instant::now();
        signal(self.pid(), "TERM");
        loop {
            if self.child.try_wait().unwrap().is_some() {
                return t.elapsed();
            }
            if t.elapsed() > Duration::from_secs(60) {
                let _ = self.child.kill();
                panic!("flowgate serve did not exit within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    async fn create(&self, workload: &str, url: &str, sha: &str) -> reqwest::Response {
        http()
            .post(format!("{}/api/v1/instances", self.api))
            // public: these tests open instances by their URL (access links have their own, in api.rs)
            .json(&json!({"workload": workload, "artifacts": {"url": url, "sha256": sha}, "access": "public"}))
            .send()
            .await
            .unwrap()
    }

    async fn create_ok(&self, workload: &str) -> String {
        let (archive, sha) = store_archive();
        let r = self
            .create(workload, &format!("file://{}", archive.display()), sha)
            .await;
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.unwrap();
        v["id"].as_str().unwrap().to_owned()
    }

    async fn get(&self, id: &str) -> (u16, Value) {
        let r = http()
            .get(format!("{}/api/v1/instances/{id}", self.api))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// Polls until the instance has `phase`; returns it.
    async fn wait_phase(&self, id: &str, phase: &str, within: Duration) -> Value {
        let t = Instant::now();
        loop {
            let (status, v) = self.get(id).await;
            if status == 200 && v["phase"] == phase {
                return v;
            }
            assert!(
                t.elapsed() < within,
                "{id} not {phase} after {within:?}: {status} {v}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn page(&self, id: &str) -> reqwest::Response {
        http()
            .get(format!("{}/{id}/", self.instances))
            .send()
            .await
            .unwrap()
    }

    fn store(&self, id: &str) -> String {
        self.data
            .join("instances")
            .join(id)
            .join("store")
            .to_string_lossy()
            .into_owned()
    }
}

/// The server's log: beside the test's folder (not on a tmpfs that fills up).
fn log_of(data: &Path) -> PathBuf {
    data.parent().unwrap().with_extension("server.log")
}

fn signal(pid: i32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), "--", &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "kill -{sig} {pid}");
}

/// Processes whose command line names `needle`: (pid, pgid, ppid, cmdline).
fn processes_naming(needle: &str) -> Vec<(i32, i32, i32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .collect();
        if rest[0] == "Z" || !cmd.contains(needle) {
            continue;
        }
        out.push((pid, rest[2].parse().unwrap(), rest[1].parse().unwrap(), cmd));
    }
    out
}

/// The MLflow process groups serving a store (one per running MLflow).
fn mlflow_groups(store: &str) -> BTreeSet<i32> {
    processes_naming(store).into_iter().map(|p| p.1).collect()
}

/// The `mlflow server` process (the entrypoint's child) of a store.
fn mlflow_server(store: &str) -> (i32, i32) {
    let procs = processes_naming(store);
    let server = procs
        .iter()
        .find(|p| !p.3.contains("flowgate-mlflow") && p.3.contains("server"))
        .unwrap_or_else(|| panic!("no mlflow server process for {store}: {procs:?}"));
    (server.0, server.1)
}

/// All processes in a group.
fn group_members(pgid: i32) -> Vec<(i32, i32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .collect();
        if rest[0] != "Z" && rest[2].parse::<i32>().ok() == Some(pgid) {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            out.push((
                pid,
                rest[1].parse().unwrap(),
                String::from_utf8_lossy(&cmd).replace('\0', " "),
            ));
        }
    }
    out
}

async fn wait_until(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < within, "{what}: not after {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_leaves_one_mlflow_per_instance_after_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data, &[]).await;
    let a = server.create_ok("adopt").await;
    let b = server.create_ok("stuck").await;
    for id in [&a, &b] {
        server
            .wait_phase(id, "Ready", Duration::from_secs(180))
            .await;
        assert_eq!(mlflow_groups(&server.store(id)).len(), 1);
    }
    let a_groups = mlflow_groups(&server.store(&a));
    let (api_port, instances_port) = (server.api_port, server.instances_port);
    let (store_a, store_b) = (server.store(&a), server.store(&b));
    server.kill9();

    // The MLflow of A keeps serving while no server runs; B's hangs (its
    // whole group stopped with SIGSTOP).
    assert_eq!(mlflow_groups(&store_a), a_groups);
    let (_, b_group) = mlflow_server(&store_b);
    signal(-b_group, "STOP");

    let server = Server::start_on(&data, api_port, instances_port, &[]).await;
    for id in [&a, &b] {
        server
            .wait_phase(id, "Ready", Duration::from_secs(180))
            .await;
        let groups = mlflow_groups(&server.store(id));
        assert_eq!(
            groups.len(),
            1,
            "{id}: {:?}",
            processes_naming(&server.store(id))
        );
        let page = server.page(id).await;
        assert_eq!(page.status(), 200, "{id}");
    }
    // A was adopted (the same process group), B replaced (the hung one is gone).
    assert_eq!(mlflow_groups(&store_a), a_groups);
    assert!(
        group_members(b_group).is_empty(),
        "the hung MLflow of {b} is still there"
    );

    // A clean stop leaves no MLflow behind.
    let took = server.term();
    assert!(took < Duration::from_secs(16), "{took:?}");
    wait_until(Duration::from_secs(5), "no MLflow left", || {
        mlflow_groups(&store_a).is_empty() && mlflow_groups(&store_b).is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_dir_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data, &[]).await;
    let out = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["--backend", "local", "serve"])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--local-listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--data-dir")
        .arg(&data)
        .arg("--mlflow")
        .arg(mlflow())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another flowgate serve"), "{err}");
    server.term();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mlflow_that_dies_comes_back_and_fails_after_too_many_exits() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data, &["--max-restarts", "3"]).await;
    let id = server.create_ok("crashy").await;
    server
        .wait_phase(&id, "Ready", Duration::from_secs(180))
        .await;
    let store = server.store(&id);

    // 1. The MLflow server process is killed.
    let (main, _) = mlflow_server(&store);
    signal(main, "KILL");
    let during = server
        .wait_phase(&id, "Pending", Duration::from_secs(10))
        .await;
    let message = during["message"].as_str().unwrap();
    assert!(message.contains("SIGKILL"), "{message}");
    let page = server.page(&id).await;
    if page.status() == 503 {
        assert!(page.headers().contains_key("retry-after"));
        assert!(page.text().await.unwrap().contains("Restarting"));
    }
    server
        .wait_phase(&id, "Ready", Duration::from_secs(180))
        .await;
    assert_eq!(server.page(&id).await.status(), 200);
    assert_eq!(mlflow_groups(&store).len(), 1);

    // 2. A worker (a process of the group below the MLflow server) is killed.
    let (main, pgid) = mlflow_server(&store);
    let members = group_members(pgid);
    let worker = members
        .iter()
        .find(|m| m.1 == main)
        .unwrap_or_else(|| panic!("no worker below {main}: {members:?}"))
        .0;
    signal(worker, "KILL");
    let t = Instant::now();
    let mut saw_503 = false;
    let mut reasons = Vec::new();
    loop {
        let page = server.page(&id).await;
        let (_, v) = server.get(&id).await;
        if v["phase"] == "Pending" {
            reasons.push(v["message"].as_str().unwrap_or("").to_owned());
        }
        if page.status() == 503 {
            saw_503 = true;
            assert_eq!(page.headers()["retry-after"], "3");
        }
        if saw_503 && page.status() == 200 && v["phase"] == "Ready" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no restart after a worker died: {} {v}",
            page.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(mlflow_groups(&store).len(), 1);
    // The server process exits 0 when its worker dies: the reason says more.
    assert!(
        reasons.iter().any(|r| r.contains("code 0")
            && (r.contains(") died") || r.contains("a worker may have died"))),
        "{reasons:?}"
    );

    // 3. A third exit within the window: Failed, with the reason.
    let (main, _) = mlflow_server(&store);
    signal(main, "TERM");
    let failed = server
        .wait_phase(&id, "Failed", Duration::from_secs(30))
        .await;
    let message = failed["message"].as_str().unwrap();
    assert!(message.contains("exited 3 times"), "{message}");
    let page = server.page(&id).await;
    assert_eq!(page.status(), 503);
    assert!(!page.headers().contains_key("retry-after"));
    wait_until(
        Duration::from_secs(10),
        "no MLflow for a Failed instance",
        || mlflow_groups(&store).is_empty(),
    )
    .await;

    // Failed stays Failed across a restart: no MLflow is started for it.
    let (api_port, instances_port) = (server.api_port, server.instances_port);
    server.term();
    let server = Server::start_on(&data, api_port, instances_port, &[]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, v) = server.get(&id).await;
    assert_eq!((status, v["phase"].as_str()), (200, Some("Failed")), "{v}");
    assert_eq!(v["message"].as_str(), Some(message));
    assert!(mlflow_groups(&store).is_empty());
    // Another create for the same workload and checksum is a new instance.
    let again = server.create_ok("crashy").await;
    assert_ne!(again, id);
    server.term();

    // Past --keep-failed, the Failed instance is removed.
    let server = Server::start_on(&data, api_port, instances_port, &["--keep-failed", "1s"]).await;
    assert_eq!(server.get(&id).await.0, 404);
    assert!(!data.join("instances").join(&id).exists());
    server.term();
}

/// A listener that accepts connections and never answers.
async fn silent_server() -> (String, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/job.tgz", l.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (url, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_an_open_event_stream_exits_within_the_drain_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (url, _silent) = silent_server().await;
    let server = Server::start(&data, &["--drain-timeout", "3s"]).await;
    let ready = server.create_ok("ready").await;
    server
        .wait_phase(&ready, "Ready", Duration::from_secs(180))
        .await;
    let r = server.create("stuck", &url, &"a".repeat(64)).await;
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // A client follows the downloading instance's events...
    let mut events = http()
        .get(format!("{}/api/v1/instances/{id}/events", server.api))
        .send()
        .await
        .unwrap();
    let mut seen = String::new();
    while !seen.contains("event: downloading") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), events.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    // ...another holds a request it never finishes, a third an idle instance connection.
    use tokio::io::AsyncWriteExt;
    let mut half = tokio::net::TcpStream::connect(("127.0.0.1", server.api_port))
        .await
        .unwrap();
    half.write_all(b"GET /api/v1/instances HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let _idle = tokio::net::TcpStream::connect(("127.0.0.1", server.instances_port))
        .await
        .unwrap();
    let store = server.store(&ready);
    let reader = tokio::spawn(async move {
        let mut rest = String::new();
        while let Ok(Some(chunk)) = events.chunk().await {
            rest.push_str(&String::from_utf8_lossy(&chunk));
        }
        rest
    });
    let took = tokio::task::spawn_blocking(move || server.term())
        .await
        .unwrap();
    assert!(took < Duration::from_millis(3800), "exit took {took:?}");
    let rest = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("the event stream ends")
        .unwrap();
    assert!(rest.contains("event: shutdown"), "{rest:?}");
    wait_until(Duration::from_secs(5), "MLflow stopped", || {
        mlflow_groups(&store).is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_server_that_never_answers_fails_the_instance_on_the_stall_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let (url, _silent) = silent_server().await;
    let server = Server::start(&data, &["--stall-timeout", "2s"]).await;
    let t = Instant::now();
    let r = server.create("silent", &url, &"b".repeat(64)).await;
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let v = server
        .wait_phase(&id, "Failed", Duration::from_secs(20))
        .await;
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    let message = v["message"].as_str().unwrap();
    assert!(message.contains("--stall-timeout"), "{message}");
    server.term();
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system of `dir` with one file; returns it.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![0u8; 1 << 20];
    while f.write_all(&block).is_ok() {}
    let small = [0u8; 512];
    while f.write_all(&small).is_ok() {}
    let _ = f.sync_all();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_gives_507_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(mount) = Tmpfs::mount(&tmp.path().join("fs"), "48m") else {
        eprintln!("SKIPPED: mounting a tmpfs needs root");
        return;
    };
    let data = mount.0.join("data");
    let server = Server::start(&data, &[]).await;
    let id = server.create_ok("full").await;
    let before = server
        .wait_phase(&id, "Ready", Duration::from_secs(180))
        .await;
    let filler = fill(&mount.0);

    let c = http();
    let r = c
        .post(format!("{}/api/v1/instances/{id}/extend", server.api))
        .json(&json!({"ttl": "2h"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 507);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "insufficient_storage");
    assert!(
        body["message"].as_str().unwrap().contains("no space left"),
        "{body}"
    );
    let (_, now) = server.get(&id).await;
    assert_eq!(now["expires_at"], before["expires_at"]);

    let (archive, sha) = store_archive();
    let r = server
        .create("another", &format!("file://{}", archive.display()), sha)
        .await;
    assert_eq!(r.status(), 507);
    let list: Value = c
        .get(format!("{}/api/v1/instances", server.api))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");

    // After a restart (space back), the records say exactly what the API said.
    let (api_port, instances_port) = (server.api_port, server.instances_port);
    server.term();
    std::fs::remove_file(filler).unwrap();
    let server = Server::start_on(&data, api_port, instances_port, &[]).await;
    let list: Value = c
        .get(format!("{}/api/v1/instances", server.api))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["items"][0]["expires_at"], before["expires_at"]);
    let r = c
        .post(format!("{}/api/v1/instances/{id}/extend", server.api))
        .json(&json!({"ttl": "2h"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    server.term();
    drop(mount);
}
