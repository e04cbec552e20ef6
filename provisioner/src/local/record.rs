//! What the local backend keeps on disk, written durably: the instance record
//! (`instance.json`) and the MLflow process group that serves it (`mlflow.json`).
//!
//! Every write goes to a temporary file that is fsynced, renamed over the old
//! one, and the folder fsynced, so after any crash a record is either the old
//! or the new one, never half of each. A failed write removes its temporary
//! file and leaves the old record in place; the caller gets
//! [`Error::Storage`] (disk full: 507) or [`Error::Unavailable`] (any other
//! I/O error: 503), and must not change its in-memory state.

use crate::instance::Instance;
use crate::{Error, Result};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The instance record's file name.
pub const INSTANCE: &str = "instance.json";
/// The process record's file name.
pub const PROCESS: &str = "mlflow.json";

/// The instance record: the API's [`Instance`] and what only this backend needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stored {
    /// What the API shows.
    #[serde(flatten)]
    pub instance: Instance,
    /// When it became Failed (it is removed `--keep-failed` later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_at: Option<Timestamp>,
    /// True once MLflow has served it: later exits are restarted.
    #[serde(default)]
    pub served: bool,
}

/// The MLflow process group serving an instance, as an earlier server left it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    /// The group leader (the entrypoint).
    pub pid: i32,
    /// Its process group (equal to `pid`: it leads its own group).
    pub pgid: i32,
    /// The loopback port MLflow listens on.
    pub port: u16,
    /// The leader's start time in clock ticks after boot (`/proc/<pid>/stat`,
    /// field 22), so that a reused pid is not mistaken for it.
    pub start_ticks: u64,
    /// The kernel's boot id: after a reboot nothing recorded can be alive.
    #[serde(default)]
    pub boot_id: String,
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Maps an I/O error to the error the API gives: 507 when the disk is full.
pub fn io_error(what: &str, path: &Path, e: &std::io::Error) -> Error {
    let full = matches!(
        e.raw_os_error(),
        Some(code) if code == nix::errno::Errno::ENOSPC as i32 || code == nix::errno::Errno::EDQUOT as i32
    );
    if full {
        Error::Storage(format!(
            "{what}: no space left on the data volume ({}); nothing was changed",
            path.display()
        ))
    } else {
        Error::Unavailable(format!(
            "{what}: {e} ({}); nothing was changed",
            path.display()
        ))
    }
}

/// Writes `body` to `dir/name` durably (temporary file, fsync, rename, fsync of the folder).
pub fn write_durably(dir: &Path, name: &str, body: &[u8], what: &str) -> Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let target = dir.join(name);
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, &target)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_error(what, &target, &e)
    })
}

/// Saves an instance record into `dir` (created if needed).
pub fn save(dir: &Path, stored: &Stored) -> Result<()> {
    let what = format!("saving instance {}", stored.instance.id);
    std::fs::create_dir_all(dir).map_err(|e| io_error(&what, dir, &e))?;
    let body = serde_json::to_vec_pretty(stored).map_err(|e| Error::Internal(e.to_string()))?;
    write_durably(dir, INSTANCE, &body, &what)
}

/// Reads an instance record; `None` if absent or unreadable.
pub fn load(dir: &Path) -> Option<Stored> {
    let bytes = std::fs::read(dir.join(INSTANCE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Saves the process record of an instance.
pub fn save_process(dir: &Path, process: &ProcessRecord) -> Result<()> {
    let body = serde_json::to_vec(process).map_err(|e| Error::Internal(e.to_string()))?;
    write_durably(dir, PROCESS, &body, "recording the MLflow process")
}

/// Reads the process record an earlier server left, if any.
pub fn load_process(dir: &Path) -> Option<ProcessRecord> {
    let bytes = std::fs::read(dir.join(PROCESS)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Forgets the process record (the group is gone).
pub fn clear_process(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(PROCESS));
}

/// The folders under `instances/`.
pub fn instance_dirs(data_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(data_dir.join("instances"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_is_507_and_other_errors_503() {
        let full = std::io::Error::from_raw_os_error(nix::errno::Errno::ENOSPC as i32);
        assert!(matches!(
            io_error("x", Path::new("/d"), &full),
            Error::Storage(_)
        ));
        let eio = std::io::Error::from_raw_os_error(nix::errno::Errno::EIO as i32);
        assert!(matches!(
            io_error("x", Path::new("/d"), &eio),
            Error::Unavailable(_)
        ));
    }

    #[test]
    fn a_failed_write_keeps_the_old_record_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        write_durably(dir.path(), "r.json", b"old", "w").unwrap();
        // A folder where the temporary file would go makes the write fail.
        std::fs::create_dir(dir.path().join("r.json.tmp")).unwrap();
        assert!(write_durably(dir.path(), "r.json", b"new", "w").is_err());
        assert_eq!(std::fs::read(dir.path().join("r.json")).unwrap(), b"old");
    }
}
