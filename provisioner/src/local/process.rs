//! One MLflow server process per instance, started through the same entrypoint
//! the MLflow image uses (`images/mlflow/flowgate-mlflow`, embedded in the
//! binary), in its own process group so stopping it stops its workers too.
//!
//! MLflow gets a cleared environment plus an allow-list ([`ALLOWED_ENV`]): none
//! of the server's tokens, cloud credentials or kubeconfig reach it. Its home
//! and temporary folder are inside the instance's folder.

use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// The entrypoint script, the same file the MLflow image runs.
pub const ENTRYPOINT: &str = include_str!("../../../images/mlflow/flowgate-mlflow");

/// MLflow's log file, in the instance's folder.
pub const LOG: &str = "mlflow.log";

/// The only variables of the server's environment MLflow inherits (locale and
/// time zone); `PATH`, `HOME` and `TMPDIR` are set, everything else is dropped.
pub const ALLOWED_ENV: &[&str] = &["LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ"];

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
        // Rewritten only when it differs: a full disk must not cost the copy in place.
        if std::fs::read(&entrypoint).ok().as_deref() != Some(ENTRYPOINT.as_bytes()) {
            super::record::write_durably(
                data_dir,
                "flowgate-mlflow",
                ENTRYPOINT.as_bytes(),
                "writing the MLflow entrypoint",
            )?;
        }
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

    /// Starts MLflow for `store` on `port` in its own process group, with
    /// `home` as its home (and `home/tmp` as its temporary folder), appending
    /// to `log`.
    pub fn spawn(&self, store: &Path, home: &Path, port: u16, log: &Path) -> Result<Child> {
        let io = |what: &str, p: &Path, e: std::io::Error| super::record::io_error(what, p, &e);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| io("opening MLflow's log", log, e))?;
        let err = out
            .try_clone()
            .map_err(|e| io("opening MLflow's log", log, e))?;
        let tmp = home.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(|e| io("creating MLflow's tmp", &tmp, e))?;
        let mut path = std::ffi::OsString::new();
        if let Some(bin) = self.mlflow.parent() {
            // The venv's bin first: gunicorn (MLflow 1.x) is looked up on PATH.
            path.push(bin.as_os_str());
            path.push(":");
        }
        path.push("/usr/local/bin:/usr/bin:/bin");
        let mut command = Command::new(self.python());
        command
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
            .env_clear()
            .env("PATH", path)
            .env("HOME", home)
            .env("TMPDIR", &tmp)
            .env("PYTHONUNBUFFERED", "1")
            .envs(
                ALLOWED_ENV
                    .iter()
                    .filter_map(|k| Some((k, std::env::var_os(k)?))),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        command
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

/// The last lines of a log (read from its last 64 KiB), for error messages.
pub fn tail(log: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut bytes = Vec::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
        let _ = f.take(64 * 1024).read_to_end(&mut bytes);
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut out = lines[lines.len().saturating_sub(3)..].join(" | ");
    if out.len() > 1500 {
        let cut = (0..=out.len() - 1500)
            .find(|&i| out.is_char_boundary(i))
            .unwrap_or(0);
        out = format!("…{}", &out[cut..]);
    }
    out
}
