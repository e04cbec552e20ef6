//! `flowgate-adapter fetch`: the pod's init container. Downloads a job's
//! artefacts, verifies their sha256 before anything becomes visible, unpacks the
//! archive into a staging directory beside DEST and renames it into place.
//!
//! A marker file in DEST records the checksum, so a rerun with the same one does
//! nothing and a different one replaces the content. A failure of any kind
//! leaves DEST as it was.

mod credentials;
mod download;
pub mod report;
mod unpack;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use credentials::{Credentials, dir as credentials_dir};
pub use download::Timeouts;
pub use unpack::Limits;

/// The file inside DEST that records which checksum its content came from.
pub const MARKER: &str = ".flowgate-sha256";

/// What to fetch and where.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// `http://`, `https://` or `file://` URL of the archive.
    pub url: String,
    /// Expected sha256 of the archive, 64 hex digits.
    pub sha256: String,
    /// Directory to fill (created; must not be a mount point).
    pub dest: PathBuf,
    /// Bounds on the download and the unpacked tree.
    pub limits: Limits,
    /// Retries after the first attempt, for transient failures.
    pub retries: u32,
    /// Wait before the first retry; doubles each time.
    pub backoff: Duration,
    /// Connect, stall and overall time bounds of the download.
    pub timeouts: Timeouts,
    /// Token, headers, client certificate and CAs for a private archive.
    pub credentials: Credentials,
}

/// What a successful fetch did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// DEST already held this checksum's content.
    AlreadyPresent,
    /// DEST was filled (or replaced).
    Installed {
        /// Archive size in bytes.
        archive_bytes: u64,
        /// Entries unpacked.
        entries: u64,
        /// Bytes unpacked.
        unpacked_bytes: u64,
    },
}

/// Why a fetch failed. DEST is unchanged in every case.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The URL cannot be used.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The checksum argument is not 64 hex digits.
    #[error("invalid sha256 {0:?}: expected 64 hex digits")]
    InvalidChecksum(String),
    /// The server answered with an error status.
    #[error("download of {url} failed: HTTP {status}{}", access_hint(*status, *credentials))]
    HttpStatus {
        /// The URL.
        url: String,
        /// The status.
        status: u16,
        /// Whether credentials were sent with the request that got it.
        credentials: bool,
    },
    /// A redirect that is not followed.
    #[error("download of {url} failed: {reason}")]
    Redirect {
        /// The URL.
        url: String,
        /// Which redirect, and why not.
        reason: String,
    },
    /// A credential file is missing, unreadable or malformed (never quoted).
    #[error("credentials: {0}")]
    Credentials(String),
    /// The transfer failed (after retries, where retrying made sense).
    #[error("download of {url} failed: {reason}")]
    Transfer {
        /// The URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The bytes are not what the portal said.
    #[error("checksum mismatch: expected sha256 {expected}, got {actual}; nothing was unpacked")]
    ChecksumMismatch {
        /// Expected digest.
        expected: String,
        /// Actual digest.
        actual: String,
    },
    /// A size or count bound was passed.
    #[error("too large: {0}")]
    TooLarge(String),
    /// Not an archive we read, or a corrupt one.
    #[error("cannot unpack the archive: {0}")]
    Archive(String),
    /// An entry would write outside DEST or is a special file.
    #[error("refused archive entry {entry:?}: {reason}")]
    Unsafe {
        /// The entry's name as stored.
        entry: String,
        /// Why.
        reason: String,
    },
    /// A local file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

impl FetchError {
    fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> FetchError {
        let context = context.into();
        move |source| FetchError::Io { context, source }
    }
}

/// What a 401 or 403 says about the credentials.
fn access_hint(status: u16, credentials: bool) -> &'static str {
    match (status, credentials) {
        (401 | 403, false) => {
            " (the server wants credentials and none were sent: --bearer-token-file, --client-cert, --credentials-dir)"
        }
        (401 | 403, true) => " (the server refused the credentials sent)",
        _ => "",
    }
}

impl FetchError {
    /// The reason as anyone may read it (the pod's termination message, the
    /// provisioner's API): the kind of failure, without the archive's actual
    /// checksum or what answered (or not) at the URL, so that fetching cannot
    /// be used to probe which servers or ports answer. The full error is
    /// for the log.
    pub fn public_reason(&self) -> String {
        // Which time bound fired is the caller's to know (it says what to
        // retry with); the address that failed to answer is not.
        if let FetchError::Transfer { reason, .. } = self {
            for (flag, what) in [
                (
                    "(--connect-timeout)",
                    "no connection within the connect timeout",
                ),
                (
                    "(--stall-timeout)",
                    "the server sent nothing for longer than the stall timeout",
                ),
                ("(--deadline)", "not finished within the deadline"),
            ] {
                if reason.contains(flag) {
                    return format!("download failed: {what} {flag}");
                }
            }
        }
        match self {
            FetchError::ChecksumMismatch { .. } => {
                "checksum mismatch: the archive's sha256 is not the one given; nothing was unpacked"
                    .into()
            }
            // Only where credentials were sent (an origin they are for): any
            // other 401 reads like any failure, so that fetching cannot tell
            // which servers want credentials.
            FetchError::HttpStatus {
                status: 401 | 403,
                credentials: true,
                ..
            } => "download failed: the archive's server refused access with the credentials given".into(),
            FetchError::Credentials(_) => {
                "download failed: the credentials for this archive are unreadable or malformed (the fetch log says which file)".into()
            }
            FetchError::Redirect { .. } => {
                "download failed: the archive could not be downloaded from its URL".into()
            }
            FetchError::InvalidUrl { .. }
            | FetchError::HttpStatus { .. }
            | FetchError::Transfer { .. } => {
                "download failed: the archive could not be downloaded from its URL".into()
            }
            FetchError::InvalidChecksum(_) => "invalid sha256: expected 64 hex digits".into(),
            FetchError::TooLarge(what) => format!("too large: {what}"),
            FetchError::Archive(_) => {
                "cannot unpack the archive: not a .tar.gz, .tgz, .tar or .zip, or corrupt".into()
            }
            FetchError::Unsafe { entry, reason } => {
                format!("refused archive entry {entry:?}: {reason}")
            }
            FetchError::Io { .. } => "fetching failed on this side (see its log)".into(),
        }
    }
}

/// Fetches, verifies and unpacks as described in the module docs.
pub async fn fetch(options: &FetchOptions) -> Result<Outcome, FetchError> {
    fetch_reporting(options, &|_, _| {}).await
}

/// [`fetch`], calling `progress` with the bytes downloaded so far and the
/// archive's size (when known) as they arrive.
pub async fn fetch_reporting(
    options: &FetchOptions,
    progress: &(dyn Fn(u64, Option<u64>) + Send + Sync),
) -> Result<Outcome, FetchError> {
    let expected = normalise_checksum(&options.sha256)?;
    let dest = &options.dest;
    if marker_matches(dest, &expected).await {
        tracing::info!(dest = %dest.display(), "content for this checksum is already in place");
        return Ok(Outcome::AlreadyPresent);
    }
    let parent = parent_of(dest);
    tokio::fs::create_dir_all(&parent)
        .await
        .map_err(FetchError::io(format!("creating {}", parent.display())))?;

    let archive = download::download(options, &parent, progress).await?;
    if archive.sha256 != expected {
        return Err(FetchError::ChecksumMismatch {
            expected,
            actual: archive.sha256,
        });
    }
    tracing::info!(bytes = archive.bytes, "checksum verified; unpacking");

    let limits = options.limits.clone();
    let staging_parent = parent.clone();
    let file = archive.file;
    let (staging, stats) = tokio::task::spawn_blocking(move || -> Result<_, FetchError> {
        let staging = tempfile::Builder::new()
            .prefix(".flowgate-staging-")
            .tempdir_in(&staging_parent)
            .map_err(FetchError::io("creating the staging directory"))?;
        let stats = unpack::unpack(file.path(), staging.path(), &limits)?;
        Ok((staging, stats))
    })
    .await
    .map_err(|e| FetchError::Io {
        context: "unpacking".into(),
        source: std::io::Error::other(e),
    })??;

    std::fs::write(staging.path().join(MARKER), format!("{expected}\n"))
        .map_err(FetchError::io("writing the marker"))?;
    install(staging.keep(), dest)?;
    Ok(Outcome::Installed {
        archive_bytes: archive.bytes,
        entries: stats.entries,
        unpacked_bytes: stats.bytes,
    })
}

/// Moves the staged tree to DEST, replacing what was there.
fn install(staged: PathBuf, dest: &Path) -> Result<(), FetchError> {
    let old = if dest.exists() {
        let old = tempfile::Builder::new()
            .prefix(".flowgate-old-")
            .tempdir_in(parent_of(dest))
            .map_err(FetchError::io("preparing the replacement"))?
            .keep();
        std::fs::remove_dir(&old).map_err(FetchError::io("preparing the replacement"))?;
        std::fs::rename(dest, &old).map_err(FetchError::io(format!(
            "moving the old {} aside",
            dest.display()
        )))?;
        Some(old)
    } else {
        None
    };
    if let Err(e) = std::fs::rename(&staged, dest) {
        if let Some(old) = &old {
            let _ = std::fs::rename(old, dest);
        }
        let _ = std::fs::remove_dir_all(&staged);
        return Err(FetchError::Io {
            context: format!("renaming into {}", dest.display()),
            source: e,
        });
    }
    if let Some(old) = old {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(())
}

async fn marker_matches(dest: &Path, expected: &str) -> bool {
    tokio::fs::read_to_string(dest.join(MARKER))
        .await
        .is_ok_and(|s| s.trim() == expected)
}

fn parent_of(dest: &Path) -> PathBuf {
    match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Lower-cases and validates a hex sha256.
pub fn normalise_checksum(raw: &str) -> Result<String, FetchError> {
    let s = raw.trim().to_ascii_lowercase();
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s)
    } else {
        Err(FetchError::InvalidChecksum(raw.to_owned()))
    }
}
