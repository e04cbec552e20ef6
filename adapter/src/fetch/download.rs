//! Streaming download (http, https, file) into a temporary file beside DEST,
//! hashing as the bytes arrive, with retries and exponential backoff for
//! failures that may pass.
//!
//! Bounded in time three ways ([`Timeouts`]): connecting (`--connect-timeout`),
//! waiting for the next byte, response headers included (`--stall-timeout`),
//! and the whole download with its retries (`--deadline`). Each failure names
//! the bound that fired. A stall is not retried: it already cost its timeout.

use super::{Credentials, FetchError, FetchOptions};
use http::HeaderMap;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::{Mutex, Once};
use std::time::Duration;
use tempfile::NamedTempFile;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A downloaded archive, not yet trusted beyond its digest.
pub struct Archive {
    /// The bytes, in a file removed on drop.
    pub file: NamedTempFile,
    /// Hex sha256 of the bytes.
    pub sha256: String,
    /// Size.
    pub bytes: u64,
}

/// Time bounds of a download.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Connecting to the server (each attempt).
    pub connect: Duration,
    /// No byte (response headers included) for this long.
    pub stall: Duration,
    /// The whole download, retries and their waits included.
    pub deadline: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(15),
            stall: Duration::from_secs(60),
            deadline: Duration::from_secs(30 * 60),
        }
    }
}

fn human(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
}

enum Attempt {
    Done(Archive),
    Retry(FetchError),
    Fail(FetchError),
}

/// Called with the bytes received so far and the archive's size, when known.
pub type Progress<'a> = &'a (dyn Fn(u64, Option<u64>) + Send + Sync);

pub async fn download(
    options: &FetchOptions,
    dir: &Path,
    progress: Progress<'_>,
) -> Result<Archive, FetchError> {
    let last = Mutex::new(None::<String>);
    let deadline = options.timeouts.deadline;
    match tokio::time::timeout(deadline, download_within(options, dir, &last, progress)).await {
        Ok(r) => r,
        Err(_) => {
            let last = last.lock().ok().and_then(|mut l| l.take());
            Err(FetchError::Transfer {
                url: options.url.clone(),
                reason: format!(
                    "deadline: not finished within {} (--deadline){}",
                    human(deadline),
                    last.map(|l| format!("; the last attempt: {l}"))
                        .unwrap_or_default()
                ),
            })
        }
    }
}

async fn download_within(
    options: &FetchOptions,
    dir: &Path,
    last: &Mutex<Option<String>>,
    progress: Progress<'_>,
) -> Result<Archive, FetchError> {
    let url = reqwest::Url::parse(&options.url).map_err(|e| FetchError::InvalidUrl {
        url: options.url.clone(),
        reason: e.to_string(),
    })?;
    if url.scheme() == "file" {
        let path = url.to_file_path().map_err(|()| FetchError::InvalidUrl {
            url: options.url.clone(),
            reason: "not a local path".into(),
        })?;
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(FetchError::io(format!("opening {}", path.display())))?;
        let size = file.metadata().await.ok().map(|m| m.len());
        return copy_hashing(file, options, dir, &options.url, size, progress).await;
    }
    if !matches!(url.scheme(), "http" | "https") {
        return Err(FetchError::InvalidUrl {
            url: options.url.clone(),
            reason: "only http, https and file URLs".into(),
        });
    }
    let credentials = if options.credentials.sent_to(&url) {
        options.credentials.clone()
    } else {
        if options.credentials.identifies() {
            tracing::warn!(
                origin = %url.origin().ascii_serialization(),
                "the archive is not at an origin its credentials are for (their `origins`): fetching without them"
            );
        }
        options.credentials.anonymous()
    };
    if url.scheme() == "http" && credentials.identifies() {
        tracing::warn!(
            "credentials go to an http:// URL: anyone on the path can read them; use https"
        );
    }
    let mut wait = options.backoff;
    let mut attempt = 0;
    loop {
        // Credential files are read again at each attempt: a rotated token
        // or proxy is used by the next retry.
        let outcome = match Clients::new(&options.timeouts, &credentials) {
            Ok(clients) => try_http(&clients, &url, options, dir, progress).await,
            Err(e) => Attempt::Fail(e),
        };
        match outcome {
            Attempt::Done(archive) => return Ok(archive),
            Attempt::Fail(e) => return Err(e),
            Attempt::Retry(e) if attempt >= options.retries => return Err(e),
            Attempt::Retry(e) => {
                attempt += 1;
                if let Ok(mut l) = last.lock() {
                    *l = Some(e.to_string());
                }
                tracing::warn!(error = %e, attempt, retries = options.retries, wait = ?wait, "download failed; retrying");
                tokio::time::sleep(wait).await;
                wait = wait.saturating_mul(2).min(Duration::from_secs(60));
            }
        }
    }
}

/// Redirects followed before giving up.
const MAX_REDIRECTS: usize = 10;

/// The HTTP clients of one attempt. Only requests to the archive URL's own
/// origin (scheme, host and port) carry the credentials: `origin` presents
/// the client certificate and gets the headers; `elsewhere`, used from the
/// first redirect to another origin on, has neither. Both trust the same CAs
/// (a storage door a redirect leads to is often under the same grid CA).
struct Clients {
    origin: reqwest::Client,
    elsewhere: reqwest::Client,
    headers: HeaderMap,
    identifies: bool,
}

impl Clients {
    fn new(timeouts: &Timeouts, credentials: &Credentials) -> Result<Self, FetchError> {
        static PROVIDER: Once = Once::new();
        PROVIDER.call_once(|| {
            // Another part of the process may have installed one already; either is fine.
            let _ = rustls::crypto::ring::default_provider().install_default();
        });
        let loaded = credentials.load()?;
        let builder = || {
            let b = reqwest::Client::builder()
                .connect_timeout(timeouts.connect)
                .user_agent(concat!("flowgate-adapter/", env!("CARGO_PKG_VERSION")))
                .redirect(reqwest::redirect::Policy::none());
            if loaded.system_cas {
                b.tls_certs_merge(loaded.roots.clone())
            } else {
                b.tls_certs_only(loaded.roots.clone())
            }
        };
        let built = |b: reqwest::ClientBuilder| {
            b.build().map_err(|e| {
                // Names what is wrong (a bad CA, a key the TLS stack refuses),
                // never the bytes.
                FetchError::Credentials(format!("HTTP client: {}", error_chain(&e)))
            })
        };
        let origin = match loaded.identity.clone() {
            Some(identity) => built(builder().identity(identity))?,
            None => built(builder())?,
        };
        Ok(Self {
            elsewhere: if loaded.identity.is_some() {
                built(builder())?
            } else {
                origin.clone()
            },
            origin,
            identifies: !loaded.headers.is_empty() || loaded.identity.is_some(),
            headers: loaded.headers,
        })
    }
}

/// The URL as logs and errors show it: without a password or a query (a
/// pre-signed URL's signature, a macaroon).
fn shown(url: &reqwest::Url) -> String {
    let mut url = url.clone();
    if url.password().is_some() {
        let _ = url.set_password(Some("redacted"));
    }
    if url.query().is_some() {
        url.set_query(Some("…"));
    }
    url.to_string()
}

/// Sends the GET, following redirects by the rules of [`Clients`]: never
/// from https to http, never to another scheme. Returns the final response
/// and whether it answered a request that carried credentials.
async fn send(
    clients: &Clients,
    url: &reqwest::Url,
    options: &FetchOptions,
) -> Result<(reqwest::Response, bool), Attempt> {
    let transfer = |reason: String| FetchError::Transfer {
        url: shown(url),
        reason,
    };
    let refused = |reason: String| {
        Attempt::Fail(FetchError::Redirect {
            url: shown(url),
            reason,
        })
    };
    let stall = options.timeouts.stall;
    let mut at = url.clone();
    let mut own_origin = true;
    for _ in 0..=MAX_REDIRECTS {
        let request = if own_origin {
            clients
                .origin
                .get(at.clone())
                .headers(clients.headers.clone())
        } else {
            clients.elsewhere.get(at.clone())
        };
        let response = match tokio::time::timeout(stall, request.send()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) if e.is_connect() && e.is_timeout() => {
                return Err(Attempt::Retry(transfer(format!(
                    "connect timeout: no connection within {} (--connect-timeout)",
                    human(options.timeouts.connect)
                ))));
            }
            // without the URL: a redirect target may carry a signature
            Ok(Err(e)) => return Err(Attempt::Retry(transfer(error_chain(&e.without_url())))),
            Err(_) => {
                return Err(Attempt::Fail(transfer(format!(
                    "stalled: no response within {} (--stall-timeout)",
                    human(stall)
                ))));
            }
        };
        let redirect = matches!(response.status().as_u16(), 301 | 302 | 303 | 307 | 308);
        let location = response.headers().get(http::header::LOCATION);
        let Some(location) = location.filter(|_| redirect) else {
            return Ok((response, own_origin && clients.identifies));
        };
        let next = location
            .to_str()
            .ok()
            .and_then(|l| at.join(l).ok())
            .ok_or_else(|| refused("a redirect to an unreadable Location".into()))?;
        if !matches!(next.scheme(), "http" | "https") {
            return Err(refused(format!(
                "refused a redirect to a {} URL",
                next.scheme()
            )));
        }
        if at.scheme() == "https" && next.scheme() == "http" {
            return Err(refused(format!(
                "refused a redirect from https to http ({})",
                next.origin().ascii_serialization()
            )));
        }
        if own_origin && next.origin() != url.origin() {
            own_origin = false;
            if clients.identifies {
                tracing::info!(
                    to = %next.origin().ascii_serialization(),
                    "redirected to another origin: no credentials are sent there"
                );
            }
        }
        at = next;
    }
    Err(refused(format!("more than {MAX_REDIRECTS} redirects")))
}

async fn try_http(
    clients: &Clients,
    url: &reqwest::Url,
    options: &FetchOptions,
    dir: &Path,
    progress: Progress<'_>,
) -> Attempt {
    let transfer = |reason: String| FetchError::Transfer {
        url: shown(url),
        reason,
    };
    let (response, credentials) = match send(clients, url, options).await {
        Ok(sent) => sent,
        Err(attempt) => return attempt,
    };
    let status = response.status();
    if !status.is_success() {
        let error = FetchError::HttpStatus {
            url: shown(url),
            status: status.as_u16(),
            credentials,
        };
        let transient =
            status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408;
        return if transient {
            Attempt::Retry(error)
        } else {
            Attempt::Fail(error)
        };
    }
    if let Some(len) = response.content_length()
        && len > options.limits.max_download_bytes
    {
        return Attempt::Fail(FetchError::TooLarge(format!(
            "the archive is {len} bytes, over the limit of {}",
            options.limits.max_download_bytes
        )));
    }
    let response_len = response.content_length();
    let stream =
        futures_util::TryStreamExt::map_err(response.bytes_stream(), std::io::Error::other);
    let reader = tokio_util::io::StreamReader::new(stream);
    match copy_hashing(reader, options, dir, &shown(url), response_len, progress).await {
        Ok(archive) => Attempt::Done(archive),
        Err(e @ FetchError::Transfer { .. }) if e.to_string().contains("(--stall-timeout)") => {
            Attempt::Fail(e)
        }
        Err(e @ FetchError::Transfer { .. }) => Attempt::Retry(e),
        Err(FetchError::Io { context, source }) if context == "reading" => {
            Attempt::Retry(transfer(source.to_string()))
        }
        Err(e) => Attempt::Fail(e),
    }
}

/// Copies `reader` into a temporary file in `dir`, hashing and bounding it
/// (in size, and in the time between bytes).
async fn copy_hashing<R: tokio::io::AsyncRead + Unpin>(
    mut reader: R,
    options: &FetchOptions,
    dir: &Path,
    url: &str,
    size: Option<u64>,
    progress: Progress<'_>,
) -> Result<Archive, FetchError> {
    let file = tempfile::Builder::new()
        .prefix(".flowgate-download-")
        .tempfile_in(dir)
        .map_err(FetchError::io(format!(
            "creating a temporary file in {}",
            dir.display()
        )))?;
    let mut out = tokio::fs::File::from_std(
        file.reopen()
            .map_err(FetchError::io("opening the temporary file"))?,
    );
    let mut hasher = Sha256::new();
    let mut total: u64 = 0;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let stall = options.timeouts.stall;
        let n = tokio::time::timeout(stall, reader.read(&mut buf))
            .await
            .map_err(|_| FetchError::Transfer {
                url: url.to_owned(),
                reason: format!(
                    "stalled: no byte for {} after {total} bytes (--stall-timeout)",
                    human(stall)
                ),
            })?
            .map_err(FetchError::io("reading"))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > options.limits.max_download_bytes {
            return Err(FetchError::TooLarge(format!(
                "the archive passed the download limit of {} bytes",
                options.limits.max_download_bytes
            )));
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .await
            .map_err(FetchError::io("writing the download"))?;
        progress(total, size);
    }
    out.flush()
        .await
        .map_err(FetchError::io("writing the download"))?;
    out.sync_all()
        .await
        .map_err(FetchError::io("writing the download"))?;
    Ok(Archive {
        file,
        sha256: hex::encode(hasher.finalize()),
        bytes: total,
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
