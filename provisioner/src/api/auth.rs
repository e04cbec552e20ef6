//! Bearer tokens from a file (`TOKEN OWNER` per line), compared in constant
//! time. Without a token file the API runs open, and only on loopback.

use crate::{Error, Result};
use subtle::ConstantTimeEq;

/// Tokens and the owners they stand for.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    entries: Vec<(Vec<u8>, String)>,
}

impl Tokens {
    /// Parses a token file: `TOKEN OWNER` per line; blank lines and `#`
    /// comments are skipped; tokens are at least 16 characters.
    pub fn parse(text: &str) -> Result<Self> {
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(token), Some(owner), None) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(Error::invalid(
                    "tokens",
                    format!("line {}: expected `TOKEN OWNER`", n + 1),
                ));
            };
            if token.len() < 16 {
                return Err(Error::invalid(
                    "tokens",
                    format!("line {}: tokens must have at least 16 characters", n + 1),
                ));
            }
            entries.push((
                token.as_bytes().to_vec(),
                crate::instance::validate_owner(owner)?,
            ));
        }
        if entries.is_empty() {
            return Err(Error::invalid("tokens", "the file holds no token"));
        }
        Ok(Self { entries })
    }

    /// The owner a presented token stands for. Every entry is compared, so the
    /// time taken does not depend on which (if any) matched.
    pub fn owner_of(&self, presented: &str) -> Option<&str> {
        let mut found = None;
        for (token, owner) in &self.entries {
            if bool::from(token.as_slice().ct_eq(presented.as_bytes())) {
                found = Some(owner.as_str());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_matches() {
        let t = Tokens::parse(
            "# portal\nabcdefghijklmnop0001 bigpanda\n\nzyxwvutsrqponmlk0002 alice\n",
        )
        .unwrap();
        assert_eq!(t.owner_of("abcdefghijklmnop0001"), Some("bigpanda"));
        assert_eq!(t.owner_of("zyxwvutsrqponmlk0002"), Some("alice"));
        assert_eq!(t.owner_of("abcdefghijklmnop000"), None);
        assert_eq!(t.owner_of(""), None);
        assert!(Tokens::parse("short alice").is_err());
        assert!(Tokens::parse("abcdefghijklmnop0001").is_err());
        assert!(Tokens::parse("abcdefghijklmnop0001 a b").is_err());
        assert!(Tokens::parse("# nothing\n").is_err());
    }
}
