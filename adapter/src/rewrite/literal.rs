//! Literal rewriting for an app's own JavaScript bundles: a fixed set of byte
//! strings that leave the prefix (MLflow's ``window.open(`/#${route}`)``,
//! `"/#notebook/"`) get it inserted. Search runs at memory speed (aho-corasick)
//! and a match split across chunks is still found.

use super::StreamRewriter;
use aho_corasick::{AhoCorasick, MatchKind};
use bytes::{BufMut, Bytes, BytesMut};
use std::io;
use std::sync::Arc;

/// A compiled set of literals and what each becomes. Build once, share across
/// requests.
#[derive(Debug)]
pub struct LiteralSet {
    matcher: AhoCorasick,
    replacements: Vec<Vec<u8>>,
    longest: usize,
}

impl LiteralSet {
    /// Builds a set of `(find, replace)` pairs; leftmost-longest wins on overlaps.
    pub fn new(pairs: &[(Vec<u8>, Vec<u8>)]) -> Self {
        let matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(pairs.iter().map(|(find, _)| find))
            .expect("literal patterns are valid");
        Self {
            matcher,
            replacements: pairs.iter().map(|(_, r)| r.clone()).collect(),
            longest: pairs.iter().map(|(f, _)| f.len()).max().unwrap_or(1),
        }
    }

    /// Literals that send MLflow's client-side routes (`/#...`) to the site
    /// root: an opening quote or backtick followed by `/#`, which becomes the
    /// same quote followed by `<prefix>/#`.
    pub fn mlflow_hash_routes(prefix: &str) -> Self {
        let pairs: Vec<_> = ["\"", "'", "`"]
            .iter()
            .map(|q| {
                (
                    format!("{q}/#").into_bytes(),
                    format!("{q}{prefix}/#").into_bytes(),
                )
            })
            .collect();
        Self::new(&pairs)
    }
}

/// Streams a body through a [`LiteralSet`].
pub struct LiteralRewriter {
    set: Arc<LiteralSet>,
    /// Bytes held back from the previous chunk: a possible start of a match.
    carry: Vec<u8>,
}

impl LiteralRewriter {
    /// A rewriter for one body.
    pub fn new(set: Arc<LiteralSet>) -> Self {
        Self {
            set,
            carry: Vec::new(),
        }
    }

    /// Rewrites `input` fully into `out`, except a tail that could start a
    /// match continued by the next chunk; returns where that tail starts.
    fn rewrite_into(&self, input: &[u8], out: &mut BytesMut, hold_back: bool) -> usize {
        let mut copied = 0;
        for m in self.set.matcher.find_iter(input) {
            out.put_slice(&input[copied..m.start()]);
            out.put_slice(&self.set.replacements[m.pattern().as_usize()]);
            copied = m.end();
        }
        let keep_from = if hold_back {
            input.len().saturating_sub(self.set.longest - 1).max(copied)
        } else {
            input.len()
        };
        out.put_slice(&input[copied..keep_from]);
        keep_from
    }
}

impl StreamRewriter for LiteralRewriter {
    fn feed(&mut self, chunk: &[u8]) -> io::Result<Bytes> {
        let mut out = BytesMut::with_capacity(chunk.len() + self.carry.len() + 64);
        let reach = self.set.longest - 1;
        if !self.carry.is_empty() && chunk.len() < reach {
            // A tiny chunk: join it to the carry, which stays short.
            let mut joined = std::mem::take(&mut self.carry);
            joined.extend_from_slice(chunk);
            let kept = self.rewrite_into(&joined, &mut out, true);
            self.carry.extend_from_slice(&joined[kept..]);
            return Ok(out.freeze());
        }
        let mut start = 0;
        if !self.carry.is_empty() {
            // Only the junction is joined (carry + `reach` bytes), never the
            // whole chunk: it holds every match that starts in the carry.
            let carry = std::mem::take(&mut self.carry);
            let mut junction = Vec::with_capacity(carry.len() + reach);
            junction.extend_from_slice(&carry);
            junction.extend_from_slice(&chunk[..reach]);
            let mut copied = 0;
            for m in self.set.matcher.find_iter(&junction) {
                if m.start() >= carry.len() {
                    break;
                }
                out.put_slice(&junction[copied..m.start()]);
                out.put_slice(&self.set.replacements[m.pattern().as_usize()]);
                copied = m.end();
            }
            if copied <= carry.len() {
                out.put_slice(&carry[copied..]);
            } else {
                start = copied - carry.len();
            }
            self.carry = carry;
            self.carry.clear();
        }
        let kept = start + self.rewrite_into(&chunk[start..], &mut out, true);
        self.carry.extend_from_slice(&chunk[kept..]);
        Ok(out.freeze())
    }

    fn finish(&mut self) -> io::Result<Bytes> {
        let carry = std::mem::take(&mut self.carry);
        let mut out = BytesMut::with_capacity(carry.len());
        self.rewrite_into(&carry, &mut out, false);
        Ok(out.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::testing::assert_chunking_invariant;

    fn make() -> Box<dyn StreamRewriter> {
        Box::new(LiteralRewriter::new(Arc::new(
            LiteralSet::mlflow_hash_routes("/k3x9q2a"),
        )))
    }

    #[test]
    fn rewrites_hash_route_literals() {
        let js =
            br#"a=window.open(`/#${e}`);b="/#notebook/"+x;c='/#/metric';d="/#";e="a/#b";f=`x/#`;"#;
        let out = assert_chunking_invariant(&make, js);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"a=window.open(`/k3x9q2a/#${e}`);b="/k3x9q2a/#notebook/"+x;c='/k3x9q2a/#/metric';d="/k3x9q2a/#";e="a/#b";f=`x/#`;"#
        );
    }

    #[test]
    fn leaves_other_bytes_alone() {
        let js: Vec<u8> = (0..20_000u32)
            .map(|i| b"ab\"/c#`'/"[i as usize % 9])
            .collect();
        let out = assert_chunking_invariant(&make, &js);
        assert_eq!(out, js);
    }
}
