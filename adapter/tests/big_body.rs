//! A 64 MiB binary artefact passes through byte-identical while the process's
//! memory stays far below the body's size (it is streamed, never buffered).
//! Alone in its own test binary so the peak RSS belongs to this case only.

mod common;

use common::*;
use sha2::{Digest, Sha256};

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_64_mib_artefact_streams_byte_identical_in_bounded_memory() {
    let expected = {
        let mut h = Sha256::new();
        let mut chunk = vec![0u8; 65536];
        for c in 0..BIG_BYTES / 65536 {
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = big_byte(c * 65536 + j);
            }
            h.update(&chunk);
        }
        h.finalize()
    };
    let a = adapter(start_upstream().await).start().await;
    let before = peak_rss_kib();
    let mut r = client()
        .get(a.url("/k3x9q2a/big"))
        .header("accept-encoding", "gzip, br, zstd")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("content-encoding").is_none());
    assert_eq!(
        r.headers()["content-length"],
        BIG_BYTES.to_string().as_str()
    );
    let mut h = Sha256::new();
    let mut total = 0;
    while let Some(chunk) = r.chunk().await.unwrap() {
        total += chunk.len();
        h.update(&chunk);
    }
    assert_eq!(total, BIG_BYTES);
    assert_eq!(h.finalize(), expected);
    let grown_mib = (peak_rss_kib() - before) / 1024;
    // Upstream, adapter and client share this process; buffering the body
    // anywhere would add 64 MiB.
    assert!(
        grown_mib < 24,
        "peak RSS grew by {grown_mib} MiB while streaming 64 MiB"
    );
}
