//! Access links to `link` instances: minted here with the installation's
//! keys, checked by the adapter ([`adapter::access`]) in the instance's pod or
//! by the local backend's router. The keys are one file (one key per line,
//! the first signs, all verify): a Kubernetes Secret mounted into the API,
//! the operator and every instance pod, or, with the local backend, a file
//! made in the data directory at the first start.

use crate::instance::Instance;
use crate::{Error, Result};
use adapter::access::{Keys, LINK_PARAM};
use std::path::Path;
use std::time::{Duration, SystemTime};

/// Mints access links.
#[derive(Clone, Debug)]
pub struct Links {
    keys: Keys,
    /// How long a link shown with an instance stays valid.
    pub ttl: Duration,
}

impl Links {
    /// How long links shown with an instance stay valid, by default.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(10 * 60);
    /// The longest link `POST .../links` mints.
    pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

    /// Links signed with `keys`, shown valid for `ttl`.
    pub fn new(keys: Keys, ttl: Duration) -> Self {
        Self { keys, ttl }
    }

    /// Reads the key file.
    pub fn load(path: &Path, ttl: Duration) -> Result<Self> {
        let keys = Keys::load(path).map_err(|e| Error::Invalid {
            field: "access-keys",
            message: e.to_string(),
        })?;
        Ok(Self::new(keys, ttl))
    }

    /// `<url>?flowgate_access=<token>`: opens `instance` for `ttl` (never past
    /// its expiry), signing the browser in until the instance expires.
    pub fn url(&self, instance: &Instance, ttl: Duration) -> String {
        let expires = SystemTime::from(instance.expires_at);
        let until = (SystemTime::now() + ttl).min(expires);
        let token = self.keys.link_token(instance.id.as_str(), until, expires);
        let sep = if instance.url.contains('?') { '&' } else { '?' };
        format!("{}{sep}{LINK_PARAM}={token}", instance.url)
    }
}

/// The key file of a local installation: made (32 random bytes, hex, mode
/// 0600) when absent. Returns its path.
pub fn ensure_local_keys(data_dir: &Path) -> Result<std::path::PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("access-keys");
    if path.exists() {
        return Ok(path);
    }
    let mut secret = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut secret[..]);
    let made = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| {
            writeln!(
                f,
                "# flowgate access keys: one per line, the first signs links, every line\n\
                 # is accepted (add a new key on top to rotate; drop the old one later)\n{}",
                hex::encode(secret)
            )
        });
    match made {
        Ok(()) => Ok(path),
        // another process made it first
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(path),
        Err(e) => Err(Error::io(format!("making {}", path.display()))(e)),
    }
}
