//! Claims in flight: the small shared record that makes idempotent create and
//! quotas hold when several creates run at once, in one process or across
//! API replicas.
//!
//! A ledger holds, per owner, the creates that have passed the checks but whose
//! instance may not exist yet. It is read with a version and written only if
//! nobody wrote it since (compare-and-swap): of two creates that read the same
//! version, the store refuses the second write, and that create starts over and
//! sees the first one's claim. The [`crate::service::Provisioner`] owns the
//! rules; a ledger only stores. [`MemoryLedger`] serves one process (the local
//! backend); [`crate::kube::ledger::LeaseLedger`] keeps each owner's claims
//! in a Lease, whose `resourceVersion` the API server checks.

use crate::Result;
use async_trait::async_trait;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;

/// One create in flight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// What is being created: a digest of the workload and the artefacts' sha256.
    pub key: String,
    /// When the claim was made (a claim older than the service's limit is
    /// abandoned: its creator died).
    pub at: Timestamp,
    /// Who made it (random per create), so that it removes only its own.
    pub by: String,
}

/// A ledger's claims and the version they were read at.
#[derive(Clone, Debug, Default)]
pub struct Versioned {
    /// The claims.
    pub claims: Vec<Claim>,
    /// None when the ledger does not exist yet.
    pub version: Option<String>,
}

/// A store of claims with compare-and-swap writes.
#[async_trait]
pub trait Ledger: Send + Sync {
    /// The claims of ledger `name` (empty when it does not exist).
    async fn read(&self, name: &str) -> Result<Versioned>;
    /// Writes `claims` if the ledger is still at `version` (None: if it does
    /// not exist yet). False when somebody wrote it in between.
    async fn write(&self, name: &str, claims: &[Claim], version: Option<&str>) -> Result<bool>;
}

/// A ledger in this process's memory (one `flowgate serve` owns the instances).
#[derive(Default)]
pub struct MemoryLedger {
    ledgers: Mutex<HashMap<String, (u64, Vec<Claim>)>>,
}

#[async_trait]
impl Ledger for MemoryLedger {
    async fn read(&self, name: &str) -> Result<Versioned> {
        let ledgers = self.ledgers.lock().expect("ledger lock");
        Ok(match ledgers.get(name) {
            Some((v, claims)) => Versioned {
                claims: claims.clone(),
                version: Some(v.to_string()),
            },
            None => Versioned::default(),
        })
    }

    async fn write(&self, name: &str, claims: &[Claim], version: Option<&str>) -> Result<bool> {
        let mut ledgers = self.ledgers.lock().expect("ledger lock");
        let current = ledgers.get(name).map(|(v, _)| v.to_string());
        if current.as_deref() != version {
            return Ok(false);
        }
        let next = ledgers.get(name).map_or(1, |(v, _)| v + 1);
        ledgers.insert(name.to_owned(), (next, claims.to_vec()));
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_at_a_stale_version_are_refused() {
        let l = MemoryLedger::default();
        let empty = l.read("alice").await.unwrap();
        assert!(empty.claims.is_empty() && empty.version.is_none());
        let c = Claim {
            key: "k".into(),
            at: Timestamp::now(),
            by: "a".into(),
        };
        assert!(
            l.write("alice", std::slice::from_ref(&c), None)
                .await
                .unwrap()
        );
        assert!(!l.write("alice", &[], None).await.unwrap());
        let now = l.read("alice").await.unwrap();
        assert_eq!(now.claims, [c]);
        assert!(l.write("alice", &[], now.version.as_deref()).await.unwrap());
        assert!(!l.write("alice", &[], now.version.as_deref()).await.unwrap());
    }
}
