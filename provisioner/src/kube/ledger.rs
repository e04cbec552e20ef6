//! The [`Ledger`] of the Kubernetes and operator backends: one Lease per
//! owner, `flowgate-claims-<digest of the owner>`, whose annotation
//! `flowgate.io/claims` holds the claims as JSON. Writes replace the Lease with
//! the `resourceVersion` that was read, so the API server refuses (409) a write
//! based on a stale read, whichever replica makes it; the first write creates
//! the Lease, and of two creates the API server refuses the second.

use crate::Result;
use crate::labels::{COMPONENT, MANAGED_BY, MANAGER};
use crate::ledger::{Claim, Ledger, Versioned};
use async_trait::async_trait;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// The annotation that holds the claims.
pub const ANN_CLAIMS: &str = "flowgate.io/claims";

/// Claims in Leases of one namespace.
pub struct LeaseLedger {
    leases: Api<Lease>,
}

impl LeaseLedger {
    /// The ledger in `namespace`.
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            leases: Api::namespaced(client, namespace),
        }
    }

    /// The Lease that holds ledger `name`.
    pub fn lease_name(name: &str) -> String {
        format!(
            "flowgate-claims-{}",
            &hex::encode(Sha256::digest(name.as_bytes()))[..20]
        )
    }
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

#[async_trait]
impl Ledger for LeaseLedger {
    async fn read(&self, name: &str) -> Result<Versioned> {
        let Some(lease) = self.leases.get_opt(&Self::lease_name(name)).await? else {
            return Ok(Versioned::default());
        };
        let claims = lease
            .annotations()
            .get(ANN_CLAIMS)
            .map(|raw| serde_json::from_str(raw))
            .transpose()
            .unwrap_or_else(|e| {
                // A hand-edited annotation: start afresh (the live instances
                // are counted from their objects anyway).
                tracing::warn!(lease = %lease.name_any(), error = %e, "unreadable claims");
                Some(Vec::new())
            })
            .unwrap_or_default();
        Ok(Versioned {
            claims,
            version: lease.metadata.resource_version.clone(),
        })
    }

    async fn write(&self, name: &str, claims: &[Claim], version: Option<&str>) -> Result<bool> {
        let lease_name = Self::lease_name(name);
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(lease_name.clone()),
                resource_version: version.map(str::to_owned),
                labels: Some(BTreeMap::from([
                    (MANAGED_BY.to_owned(), MANAGER.to_owned()),
                    (COMPONENT.to_owned(), "claims".to_owned()),
                ])),
                annotations: Some(BTreeMap::from([(
                    ANN_CLAIMS.to_owned(),
                    serde_json::to_string(claims).expect("claims serialise"),
                )])),
                ..Default::default()
            },
            spec: None,
        };
        let result = match version {
            None => self.leases.create(&PostParams::default(), &lease).await,
            Some(_) => {
                self.leases
                    .replace(&lease_name, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(_) => Ok(true),
            Err(e) if conflict(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}
