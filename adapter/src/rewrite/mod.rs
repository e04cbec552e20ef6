//! Streaming body rewriters that put the prefix back on URLs inside response
//! bodies. Each one takes the body chunk by chunk, as the upstream sends it, and
//! gives the same output however the body was split.

pub mod css;
pub mod html;
pub mod literal;

use bytes::Bytes;
use std::io;

/// A rewriter fed a body chunk by chunk.
///
/// `feed` returns the output that is final so far (possibly empty, when the
/// rewriter holds back a few bytes that may start a match); `finish` returns what
/// was held back once the body has ended.
pub trait StreamRewriter: Send {
    /// Takes the next chunk of the body.
    fn feed(&mut self, chunk: &[u8]) -> io::Result<Bytes>;
    /// Flushes whatever is left at the end of the body.
    fn finish(&mut self) -> io::Result<Bytes>;
    /// True once a buffer cap was hit: from there on the body passes through
    /// unrewritten.
    fn overflowed(&self) -> bool {
        false
    }
}

/// Runs a rewriter over a whole document at once (tests and small bodies).
pub fn rewrite_all(rewriter: &mut dyn StreamRewriter, input: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = rewriter.feed(input)?.to_vec();
    out.extend_from_slice(&rewriter.finish()?);
    Ok(out)
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// Feeds `input` in random chunk sizes (seeded, so a failure can be replayed)
    /// and returns the concatenated output.
    pub fn rewrite_in_random_chunks(
        make: &dyn Fn() -> Box<dyn StreamRewriter>,
        input: &[u8],
        seed: u64,
    ) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut rewriter = make();
        let mut out = Vec::new();
        let mut rest = input;
        while !rest.is_empty() {
            let max = if rng.bool() { 7 } else { 4096 };
            let n = rng.usize(1..=rest.len().min(max));
            let (head, tail) = rest.split_at(n);
            out.extend_from_slice(&rewriter.feed(head).unwrap());
            rest = tail;
        }
        out.extend_from_slice(&rewriter.finish().unwrap());
        out
    }

    /// Asserts that every chunking of `input` gives the one-shot output; returns it.
    pub fn assert_chunking_invariant(
        make: &dyn Fn() -> Box<dyn StreamRewriter>,
        input: &[u8],
    ) -> Vec<u8> {
        let whole = rewrite_all(make().as_mut(), input).unwrap();
        for seed in 0..200 {
            let chunked = rewrite_in_random_chunks(make, input, seed);
            assert!(
                chunked == whole,
                "seed {seed}: chunked output differs\nwhole:   {}\nchunked: {}",
                String::from_utf8_lossy(&whole),
                String::from_utf8_lossy(&chunked)
            );
        }
        // Byte by byte, the worst case for a carry-over bug.
        let mut r = make();
        let mut bytewise = Vec::new();
        for b in input {
            bytewise.extend_from_slice(&r.feed(std::slice::from_ref(b)).unwrap());
        }
        bytewise.extend_from_slice(&r.finish().unwrap());
        assert_eq!(
            String::from_utf8_lossy(&bytewise),
            String::from_utf8_lossy(&whole)
        );
        whole
    }
}
