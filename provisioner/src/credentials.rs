//! Which credentials an instance's fetch may use, for archives behind a
//! token or a client certificate (BigPanDA, Rucio, a grid storage door).
//!
//! A credentials set is a name: a Secret in the instances' namespace on
//! Kubernetes, a directory under the credentials root on the local backend,
//! holding the files `flowgate-adapter fetch --credentials-dir` reads (token,
//! headers, tls.crt + tls.key or proxy.pem, ca.crt). Callers never pick a
//! Secret freely: the installation grants names (`--allow-credentials NAME`,
//! or `NAME=alice+bob` for those owners only) and may set one used when a
//! create names none (`--default-credentials`). The same rules serve the
//! REST API, the CLI and the operator.

use crate::error::{Error, Result};
use std::str::FromStr;

/// One credentials set callers may name, and who.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The set's name (a Secret name).
    pub name: String,
    /// Only these owners; `None`: every owner.
    pub owners: Option<Vec<String>>,
}

impl FromStr for Grant {
    type Err = String;

    /// `NAME` or `NAME=OWNER+OWNER`.
    fn from_str(raw: &str) -> std::result::Result<Self, String> {
        let (name, owners) = match raw.split_once('=') {
            Some((name, owners)) => {
                let owners: Vec<String> = owners
                    .split('+')
                    .map(|o| crate::instance::validate_owner(o).map_err(|e| e.to_string()))
                    .collect::<std::result::Result<_, _>>()?;
                (name, Some(owners))
            }
            None => (raw, None),
        };
        Ok(Self {
            name: validate_name(name).map_err(|e| e.to_string())?,
            owners,
        })
    }
}

/// The installation's rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CredentialRules {
    /// Used when a create names none (every owner gets it).
    pub default: Option<String>,
    /// What callers may name.
    pub grants: Vec<Grant>,
}

impl CredentialRules {
    /// The set an `owner`'s instance fetches with: the one asked for when
    /// granted to that owner, else the default. A name that is not granted
    /// is refused the same way whether or not such a Secret exists.
    pub fn resolve(&self, owner: &str, asked: Option<&str>) -> Result<Option<String>> {
        let Some(asked) = asked else {
            return Ok(self.default.clone());
        };
        let name = validate_name(asked)?;
        let granted = self.default.as_deref() == Some(name.as_str())
            || self.grants.iter().any(|g| {
                g.name == name
                    && g.owners
                        .as_ref()
                        .is_none_or(|owners| owners.iter().any(|o| o == owner))
            });
        if granted {
            Ok(Some(name))
        } else {
            Err(Error::Forbidden(format!(
                "credentials {name:?} are not granted to {owner} (the installation's \
                 --allow-credentials lists what callers may name)"
            )))
        }
    }
}

/// A credentials set's name: a DNS subdomain, as a Secret's name is (so it
/// is also a safe directory name: no `/`, never `..`).
pub fn validate_name(raw: &str) -> Result<String> {
    let ok = !raw.is_empty()
        && raw.len() <= 253
        && raw.split('.').all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        });
    if ok {
        Ok(raw.to_owned())
    } else {
        Err(Error::invalid(
            "credentials",
            format!(
                "{raw:?} is not a credentials name (a Secret name: lower-case letters, digits, '-' and '.')"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> CredentialRules {
        CredentialRules {
            default: Some("panda-default".into()),
            grants: vec![
                "shared".parse().unwrap(),
                "atlas-proxy=alice+bob".parse().unwrap(),
            ],
        }
    }

    #[test]
    fn names_are_granted_per_owner() {
        let r = rules();
        assert_eq!(
            r.resolve("carol", None).unwrap().as_deref(),
            Some("panda-default")
        );
        assert_eq!(
            r.resolve("carol", Some("shared")).unwrap().as_deref(),
            Some("shared")
        );
        assert_eq!(
            r.resolve("alice", Some("atlas-proxy")).unwrap().as_deref(),
            Some("atlas-proxy")
        );
        assert_eq!(
            r.resolve("carol", Some("panda-default"))
                .unwrap()
                .as_deref(),
            Some("panda-default")
        );
        // another team's set, and one that exists nowhere: the same refusal
        for other in ["atlas-proxy", "kube-system-token"] {
            assert!(matches!(
                r.resolve("carol", Some(other)),
                Err(Error::Forbidden(_))
            ));
        }
        assert_eq!(CredentialRules::default().resolve("a", None).unwrap(), None);
    }

    #[test]
    fn names_are_secret_names() {
        for bad in [
            "",
            "..",
            "a/b",
            "UPPER",
            "-a",
            "a-",
            "a..b",
            "a b",
            &"a".repeat(254),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
            assert!(bad.parse::<Grant>().is_err(), "{bad:?}");
        }
        assert!("x=".parse::<Grant>().is_err());
        assert!("x=a b".parse::<Grant>().is_err());
        assert_eq!(
            "a.b-c=system:serviceaccount:ns:x".parse::<Grant>().unwrap(),
            Grant {
                name: "a.b-c".into(),
                owners: Some(vec!["system:serviceaccount:ns:x".into()])
            }
        );
    }
}
