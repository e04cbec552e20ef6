//! One MLflow server process per instance, started through the same entrypoint
//! the MLflow image uses (`images/mlflow/flowgate-mlflow`, embedded in the
//! binary), in its own process group so stopping it stops its workers too.

use crate::{Error, Result};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// The entrypoint script, the same file the MLflow image runs.
pub const ENTRYPOINT: &str = include_str!("../../../images/mlflow/flowgate-mlflow");

/// How to start MLflow on this machine.
#[derive(Clone, Debug)]
pub struct MlflowCommand {
    /// The `mlflow` executable (its directory holds the `python` to use).
    pub mlflow: PathBuf,
    /// Where the entrypoint script is written.
    pub entrypoint: PathBuf,
}

impl MlflowCommand {
    /// Checks the executable and writes the entrypoint into `data_dir`.
    pub fn prepare(mlflow: &Path, data_dir: &Path) -> Result<Self> {
        let mlflow = which(mlflow).ok_or_else(|| {
            Error::invalid(
                "mlflow",
                format!("no mlflow executable at {:?}: run ./quickstart (it creates the virtualenv) or pass --mlflow PATH", mlflow.display().to_string()),
            )
        })?;
        let entrypoint = data_dir.join("flowgate-mlflow");
        std::fs::write(&entrypoint, ENTRYPOINT)
            .map_err(|e| Error::Internal(format!("writing {}: {e}", entrypoint.display())))?;
        Ok(Self { mlflow, entrypoint })
    }

    fn python(&self) -> PathBuf {
        let beside = self.mlflow.with_file_name("python");
        if beside.exists() {
            beside
        } else {
            PathBuf::from("python3")
        }
    }

    /// Starts MLflow for `store` on `port`, logging to `log`.
    pub fn spawn(&self, store: &Path, port: u16, log: &Path) -> Result<Child> {
        let out = std::fs::File::create(log)
            .map_err(|e| Error::Internal(format!("creating {}: {e}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(|e| Error::Internal(e.to_string()))?;
        let mut path = std::env::var_os("PATH").unwrap_or_default();
        if let Some(bin) = self.mlflow.parent() {
            // The venv's bin first: gunicorn (MLflow 1.x) is looked up on PATH.
            let mut joined = bin.as_os_str().to_owned();
            joined.push(":");
            joined.push(&path);
            path = joined;
        }
        Command::new(self.python())
            .arg(&self.entrypoint)
            .args(["--store".as_ref(), store.as_os_str()])
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--workers",
                "1",
            ])
            .args(["--mlflow".as_ref(), self.mlflow.as_os_str()])
            .env("PATH", path)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::Internal(format!("starting MLflow: {e}")))
    }
}

fn which(p: &Path) -> Option<PathBuf> {
    if p.components().count() > 1 {
        return p.is_file().then(|| p.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(p))
            .find(|c| c.is_file())
    })
}

/// Stops a process group: SIGTERM, then SIGKILL after `grace`.
pub async fn stop(child: &mut Child, grace: Duration) {
    let Some(pid) = child.id() else { return };
    let group = Pid::from_raw(pid as i32);
    let _ = killpg(group, Signal::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = killpg(group, Signal::SIGKILL);
        let _ = child.wait().await;
    }
}

/// Kills what is left of a process group (workers of a server that crashed).
pub fn kill_group(pgid: Option<u32>) {
    if let Some(pid) = pgid {
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}

/// A free loopback port (bound, then released for the child to take).
pub fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::Internal(format!("finding a free port: {e}")))
}

/// Waits until something answers HTTP on `port` (MLflow is up), the child
/// exits (an error with the log's tail), or `timeout` passes.
pub async fn wait_answering(
    child: &mut Child,
    port: u16,
    log: &Path,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::Internal(format!(
                "MLflow exited ({status}) before serving: {}",
                tail(log)
            )));
        }
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let probe = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
            let mut buf = [0u8; 12];
            if s.write_all(probe).await.is_ok()
                && matches!(tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await, Ok(Ok(n)) if n > 0)
            {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout(format!(
                "MLflow did not answer within {}: {}",
                humantime::format_duration(timeout),
                tail(log)
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The last lines of a log, for error messages.
pub fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}
