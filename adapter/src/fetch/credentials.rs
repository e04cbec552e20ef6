//! Credentials for a private archive: a bearer token (a WLCG token, a
//! BigPanDA token), other headers, a client certificate (a grid proxy) and the
//! certificate authorities to trust (the CERN or IGTF CAs).
//!
//! Files are read at each attempt, so a token or proxy rotated on disk (a
//! Kubernetes Secret volume is updated in place) is used by the next retry.
//! What they hold never appears in a log line or an error: errors name the
//! file and what is wrong with it, never a byte of its content. The download
//! sends them only to the archive URL's own origin (see `download`).

use super::FetchError;
use http::{HeaderMap, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The files of a credentials directory, as a mounted Secret holds them.
pub mod dir {
    /// A bearer token, sent as `Authorization: Bearer …`.
    pub const TOKEN: &str = "token";
    /// `Name: value` lines, one header each.
    pub const HEADERS: &str = "headers";
    /// A client certificate (chain), with [`TLS_KEY`] (a `kubernetes.io/tls` Secret).
    pub const TLS_CRT: &str = "tls.crt";
    /// The client certificate's private key.
    pub const TLS_KEY: &str = "tls.key";
    /// A grid proxy: certificate, key and chain in one PEM file.
    pub const PROXY: &str = "proxy.pem";
    /// CA certificates trusted in addition to the system's.
    pub const CA: &str = "ca.crt";
    /// The origins (`https://host[:port]`, one per line) the other files may
    /// be sent to. Required: without it a directory's credentials go nowhere.
    pub const ORIGINS: &str = "origins";
}

/// Largest token or header file read.
const MAX_SMALL_FILE: u64 = 64 * 1024;
/// Largest certificate or key file read.
const MAX_PEM_FILE: u64 = 1024 * 1024;
/// Most files read from a CA directory (an IGTF bundle holds a few hundred).
const MAX_CA_FILES: usize = 4096;
/// Most headers in a header file.
const MAX_HEADERS: usize = 64;

/// Where the credentials are; every part optional.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    /// A file holding a bearer token.
    pub bearer_token_file: Option<PathBuf>,
    /// A file of `Name: value` header lines (`#` comments and blank lines allowed).
    pub header_file: Option<PathBuf>,
    /// A PEM client certificate chain; it may hold the key too (a grid proxy).
    pub client_cert: Option<PathBuf>,
    /// The client certificate's PEM private key, when not in `client_cert`.
    pub client_key: Option<PathBuf>,
    /// PEM CA certificates to trust: files, or directories of them.
    pub ca: Vec<PathBuf>,
    /// Trust the system's CAs as well (false: only `ca`).
    pub system_cas: bool,
    /// The origins (scheme, host, port) the token, headers and client
    /// certificate may be sent to; None: the archive URL's, whatever it is
    /// (explicit flags: whoever runs fetch chose both). An archive URL
    /// elsewhere is fetched without them: whoever names the URL (an API
    /// caller) cannot send an installation's token to a host of theirs.
    pub origins: Option<Vec<String>>,
}

impl Default for Credentials {
    fn default() -> Self {
        Self {
            bearer_token_file: None,
            header_file: None,
            client_cert: None,
            client_key: None,
            ca: Vec::new(),
            system_cas: true,
            origins: None,
        }
    }
}

/// What a credentials set gives one attempt.
pub(crate) struct Loaded {
    /// Sent to the archive's origin only; marked sensitive.
    pub headers: HeaderMap,
    /// The client certificate and key, for the archive's origin only.
    pub identity: Option<reqwest::Identity>,
    /// Extra trusted CAs (for every origin: they are not secrets).
    pub roots: Vec<reqwest::Certificate>,
    /// Whether the system's CAs are trusted too.
    pub system_cas: bool,
}

impl Credentials {
    /// No credentials: anonymous, system CAs.
    pub fn none() -> Self {
        Self::default()
    }

    /// Whether anything would be sent that identifies the caller.
    pub fn identifies(&self) -> bool {
        self.bearer_token_file.is_some() || self.header_file.is_some() || self.client_cert.is_some()
    }

    /// Fills what is not set yet from the well-known files of `dir` (see
    /// [`dir`]) that exist now: explicit flags win over the directory.
    pub fn with_dir(mut self, root: &Path) -> Self {
        let present = |name: &str| Some(root.join(name)).filter(|p| p.exists());
        if self.bearer_token_file.is_none() {
            self.bearer_token_file = present(dir::TOKEN);
        }
        if self.header_file.is_none() {
            self.header_file = present(dir::HEADERS);
        }
        if self.client_cert.is_none() {
            if let (Some(crt), Some(key)) = (present(dir::TLS_CRT), present(dir::TLS_KEY)) {
                self.client_cert = Some(crt);
                self.client_key = Some(key);
            } else {
                self.client_cert = present(dir::PROXY);
            }
        }
        if let Some(ca) = present(dir::CA) {
            self.ca.push(ca);
        }
        if self.origins.is_none() && self.identifies() {
            // Required: a directory without it sends its credentials nowhere.
            self.origins = Some(
                match read_bounded(&root.join(dir::ORIGINS), MAX_SMALL_FILE) {
                    Ok(text) => String::from_utf8_lossy(&text)
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .filter_map(|l| url::Url::parse(l).ok())
                        .map(|u| u.origin().ascii_serialization())
                        .collect(),
                    Err(_) => Vec::new(),
                },
            );
        }
        self
    }

    /// Whether the token, headers and client certificate may go to `url`'s origin.
    pub fn sent_to(&self, url: &url::Url) -> bool {
        match &self.origins {
            None => true,
            Some(list) => {
                let origin = url.origin().ascii_serialization();
                list.contains(&origin)
            }
        }
    }

    /// The same trust (CAs), without anything that identifies the caller.
    pub fn anonymous(&self) -> Self {
        Self {
            ca: self.ca.clone(),
            system_cas: self.system_cas,
            ..Self::none()
        }
    }

    /// Reads every file named, for one attempt.
    pub(crate) fn load(&self) -> Result<Loaded, FetchError> {
        let mut headers = match &self.header_file {
            Some(path) => header_file(path)?,
            None => HeaderMap::new(),
        };
        if let Some(path) = &self.bearer_token_file {
            if headers.contains_key(http::header::AUTHORIZATION) {
                return Err(invalid(
                    path,
                    "both a bearer token and an Authorization line in the header file",
                ));
            }
            headers.insert(http::header::AUTHORIZATION, bearer(path)?);
        }
        let identity = match &self.client_cert {
            Some(cert) => Some(identity(cert, self.client_key.as_deref())?),
            None if self.client_key.is_some() => {
                return Err(FetchError::Credentials(
                    "a client key without a client certificate (--client-cert)".into(),
                ));
            }
            None => None,
        };
        let mut roots = Vec::new();
        for path in &self.ca {
            roots.extend(cas(path)?);
        }
        if !self.system_cas && roots.is_empty() {
            return Err(FetchError::Credentials(
                "the system CAs are off (--no-system-cas) and no CA file gives one (--ca-file)"
                    .into(),
            ));
        }
        Ok(Loaded {
            headers,
            identity,
            roots,
            system_cas: self.system_cas,
        })
    }
}

fn invalid(path: &Path, what: &str) -> FetchError {
    FetchError::Credentials(format!("{}: {what}", path.display()))
}

/// Reads a file of at most `max` bytes. The error says which file and why,
/// in the words of the system, which never quote the content.
fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, FetchError> {
    use std::io::Read;
    let file = std::fs::File::open(path)
        .map_err(|e| FetchError::Credentials(format!("{}: {e}", path.display())))?;
    let mut data = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut data)
        .map_err(|e| FetchError::Credentials(format!("{}: {e}", path.display())))?;
    if data.len() as u64 > max {
        return Err(invalid(path, &format!("larger than {max} bytes")));
    }
    Ok(data)
}

fn bearer(path: &Path) -> Result<HeaderValue, FetchError> {
    let data = read_bounded(path, MAX_SMALL_FILE)?;
    let token = data.trim_ascii();
    if token.is_empty() {
        return Err(invalid(path, "empty token"));
    }
    if !token.iter().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            path,
            "the token holds spaces, line breaks or non-ASCII bytes",
        ));
    }
    let mut value = HeaderValue::from_bytes(&[b"Bearer ", token].concat())
        .map_err(|_| invalid(path, "not usable in a header"))?;
    value.set_sensitive(true);
    Ok(value)
}

/// Headers a file must not set: they belong to the connection or the request
/// framing, not to the credentials.
fn framing(name: &HeaderName) -> bool {
    use http::header::*;
    [
        HOST,
        CONTENT_LENGTH,
        TRANSFER_ENCODING,
        CONNECTION,
        UPGRADE,
        TE,
        EXPECT,
        PROXY_AUTHORIZATION,
        RANGE,
        ACCEPT_ENCODING,
    ]
    .contains(name)
        || name.as_str() == "keep-alive"
}

fn header_file(path: &Path) -> Result<HeaderMap, FetchError> {
    let data = read_bounded(path, MAX_SMALL_FILE)?;
    let text = std::str::from_utf8(&data).map_err(|_| invalid(path, "not UTF-8"))?;
    let mut headers = HeaderMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // Only the line number in errors: the line is a secret.
        let at = |what: &str| invalid(path, &format!("line {}: {what}", n + 1));
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| at("not `Name: value`"))?;
        let name =
            HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| at("not a header name"))?;
        if framing(&name) {
            return Err(at(&format!("{name} cannot be set here")));
        }
        let mut value =
            HeaderValue::from_str(value.trim()).map_err(|_| at("not a header value"))?;
        value.set_sensitive(true);
        headers.append(name, value);
        if headers.len() > MAX_HEADERS {
            return Err(invalid(path, &format!("more than {MAX_HEADERS} headers")));
        }
    }
    Ok(headers)
}

fn identity(cert: &Path, key: Option<&Path>) -> Result<reqwest::Identity, FetchError> {
    let mut pem = read_bounded(cert, MAX_PEM_FILE)?;
    if let Some(key) = key {
        pem.push(b'\n');
        pem.extend(read_bounded(key, MAX_PEM_FILE)?);
    }
    // A proxy's PEM is certificate, key, then the chain: any order is read.
    reqwest::Identity::from_pem(&pem).map_err(|_| {
        FetchError::Credentials(format!(
            "{}{}: not a PEM certificate with its private key (PKCS#8, PKCS#1 or SEC1)",
            cert.display(),
            key.map(|k| format!(" + {}", k.display()))
                .unwrap_or_default()
        ))
    })
}

fn cas(path: &Path) -> Result<Vec<reqwest::Certificate>, FetchError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| FetchError::Credentials(format!("{}: {e}", path.display())))?;
    if !meta.is_dir() {
        let certs = reqwest::Certificate::from_pem_bundle(&read_bounded(path, MAX_PEM_FILE)?)
            .map_err(|_| invalid(path, "not PEM certificates"))?;
        if certs.is_empty() {
            return Err(invalid(path, "no certificate in it"));
        }
        return Ok(certs);
    }
    // A CA directory (/etc/grid-security/certificates) also holds signing
    // policies, CRL URLs and hash links: read what holds certificates.
    let mut names: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| FetchError::Credentials(format!("{}: {e}", path.display())))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|x| x == "pem" || x == "crt" || x == "0")
        })
        .take(MAX_CA_FILES + 1)
        .collect();
    if names.len() > MAX_CA_FILES {
        return Err(invalid(path, &format!("more than {MAX_CA_FILES} CA files")));
    }
    names.sort();
    let mut seen = std::collections::HashSet::new();
    let mut certs = Vec::new();
    for name in names {
        let Ok(pem) = read_bounded(&name, MAX_PEM_FILE) else {
            continue;
        };
        if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
            continue;
        }
        let Ok(found) = reqwest::Certificate::from_pem_bundle(&pem) else {
            continue;
        };
        // `1234abcd.0` links to `Some-CA.pem`: keep one copy.
        if seen.insert(Sha256::digest(&pem)) {
            certs.extend(found);
        }
    }
    if certs.is_empty() {
        return Err(invalid(path, "no CA certificate in this directory"));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, data: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn token_is_trimmed_sensitive_and_never_quoted() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Credentials {
            bearer_token_file: Some(write(tmp.path(), "t", "  eyJ.secret-token.x \n")),
            ..Credentials::none()
        };
        let loaded = c.load().unwrap();
        let v = &loaded.headers[http::header::AUTHORIZATION];
        assert_eq!(v.as_bytes(), b"Bearer eyJ.secret-token.x");
        assert!(v.is_sensitive());
        assert!(!format!("{:?}", loaded.headers).contains("secret"));

        for bad in ["", "two words-secret", "caf\u{e9}-secret"] {
            let c = Credentials {
                bearer_token_file: Some(write(tmp.path(), "t", bad)),
                ..Credentials::none()
            };
            let e = c.load().err().unwrap().to_string();
            assert!(!e.contains("secret"), "{e}");
            assert!(e.contains("/t:"), "{e}");
        }
    }

    #[test]
    fn header_file_lines_are_checked_without_quoting_them() {
        let tmp = tempfile::tempdir().unwrap();
        let ok = write(
            tmp.path(),
            "h",
            "# Rucio\nX-Rucio-Auth-Token: s3cret\n\nX-Other: a:b\n",
        );
        let c = Credentials {
            header_file: Some(ok),
            ..Credentials::none()
        };
        let h = c.load().unwrap().headers;
        assert_eq!(h["x-rucio-auth-token"], "s3cret");
        assert_eq!(h["x-other"], "a:b");
        assert!(h.values().all(HeaderValue::is_sensitive));

        for (bad, why) in [
            ("just-s3cret\n", "line 1: not `Name: value`"),
            ("Host: s3cret\n", "line 1: host cannot be set here"),
            ("X: ok\nBad Name: s3cret\n", "line 2: not a header name"),
        ] {
            let c = Credentials {
                header_file: Some(write(tmp.path(), "h", bad)),
                ..Credentials::none()
            };
            let e = c.load().err().unwrap().to_string();
            assert!(e.contains(why), "{e}");
            assert!(!e.contains("s3cret"), "{e}");
        }
    }

    #[test]
    fn token_and_authorization_header_conflict() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Credentials {
            bearer_token_file: Some(write(tmp.path(), "t", "tok")),
            header_file: Some(write(tmp.path(), "h", "Authorization: Basic x\n")),
            ..Credentials::none()
        };
        assert!(c.load().is_err());
    }

    #[test]
    fn a_directory_fills_what_flags_left_open() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), dir::TOKEN, "tok");
        write(tmp.path(), dir::PROXY, "x");
        let explicit = tmp.path().join("elsewhere");
        let c = Credentials {
            bearer_token_file: Some(explicit.clone()),
            ..Credentials::none()
        }
        .with_dir(tmp.path());
        assert_eq!(c.bearer_token_file, Some(explicit));
        assert_eq!(c.client_cert, Some(tmp.path().join(dir::PROXY)));
        assert_eq!(c.client_key, None);
        assert!(c.ca.is_empty());
        assert!(c.identifies());

        write(tmp.path(), dir::TLS_CRT, "x");
        write(tmp.path(), dir::TLS_KEY, "x");
        let c = Credentials::none().with_dir(tmp.path());
        assert_eq!(c.client_cert, Some(tmp.path().join(dir::TLS_CRT)));
        assert_eq!(c.client_key, Some(tmp.path().join(dir::TLS_KEY)));
        assert!(
            !Credentials::none()
                .with_dir(&tmp.path().join("absent"))
                .identifies()
        );
    }

    #[test]
    fn no_roots_at_all_is_refused() {
        let c = Credentials {
            system_cas: false,
            ..Credentials::none()
        };
        assert!(c.load().err().unwrap().to_string().contains("--ca-file"));
    }

    #[test]
    fn a_key_file_is_not_echoed_when_it_is_no_key() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Credentials {
            client_cert: Some(write(tmp.path(), "c", "s3cret-not-pem")),
            client_key: Some(write(tmp.path(), "k", "s3cret-not-pem")),
            ..Credentials::none()
        };
        let e = c.load().err().unwrap().to_string();
        assert!(e.contains("not a PEM certificate"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
    }
}
