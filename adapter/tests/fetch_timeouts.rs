//! `fetch` against archive servers that hang, on real loopback sockets: one
//! that accepts and never answers, one that stops mid-body, one that trickles,
//! one whose accept queue is full. Each failure comes in bounded time and says
//! which bound fired; DEST is untouched.

use adapter::fetch::{FetchError, FetchOptions, Limits, Timeouts, fetch};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn options(url: String, dest: &Path, timeouts: Timeouts) -> FetchOptions {
    FetchOptions {
        url,
        sha256: "c".repeat(64),
        dest: dest.to_path_buf(),
        limits: Limits::default(),
        retries: 3,
        backoff: Duration::from_millis(20),
        timeouts,
        credentials: Default::default(),
    }
}

fn short(connect: u64, stall: u64, deadline: u64) -> Timeouts {
    Timeouts {
        connect: Duration::from_millis(connect),
        stall: Duration::from_millis(stall),
        deadline: Duration::from_millis(deadline),
    }
}

/// Accepts connections, then writes `head` and keeps each open, sending one
/// byte every `trickle` if given.
async fn server(head: &'static [u8], trickle: Option<Duration>) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                // The request first (a client drops a response sent before it).
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(head).await;
                loop {
                    match trickle {
                        Some(every) => {
                            tokio::time::sleep(every).await;
                            if s.write_all(b"x").await.is_err() {
                                return;
                            }
                        }
                        None => tokio::time::sleep(Duration::from_secs(3600)).await,
                    }
                }
            });
        }
    });
    format!("http://{addr}/job.tgz")
}

async fn fails(options: &FetchOptions, within: Duration) -> String {
    let t = Instant::now();
    let e = fetch(options).await.expect_err("must fail");
    assert!(t.elapsed() < within, "took {:?}: {e}", t.elapsed());
    assert!(matches!(e, FetchError::Transfer { .. }), "{e:?}");
    assert!(!options.dest.exists());
    // What an API caller is told names the bound that fired, not the address.
    let public = e.public_reason();
    assert!(public.contains("(--"), "{public}");
    assert!(!public.contains("127.0.0.1"), "{public}");
    e.to_string()
}

#[tokio::test]
async fn a_server_that_accepts_and_never_answers_stalls_once() {
    let tmp = tempfile::tempdir().unwrap();
    let url = server(b"", None).await;
    // Not retried: one stall timeout, not four.
    let e = fails(
        &options(url, &tmp.path().join("d"), short(1000, 800, 60_000)),
        Duration::from_millis(2500),
    )
    .await;
    assert!(
        e.contains("stalled: no response within 800ms (--stall-timeout)"),
        "{e}"
    );
}

#[tokio::test]
async fn a_body_that_stops_stalls_with_the_bytes_received() {
    let tmp = tempfile::tempdir().unwrap();
    let url = server(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789",
        None,
    )
    .await;
    let e = fails(
        &options(url, &tmp.path().join("d"), short(1000, 800, 60_000)),
        Duration::from_millis(2500),
    )
    .await;
    assert!(
        e.contains("stalled: no byte for 800ms after 10 bytes (--stall-timeout)"),
        "{e}"
    );
}

#[tokio::test]
async fn a_trickle_meets_the_deadline() {
    let tmp = tempfile::tempdir().unwrap();
    let url = server(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n",
        Some(Duration::from_millis(100)),
    )
    .await;
    let e = fails(
        &options(url, &tmp.path().join("d"), short(1000, 5000, 1500)),
        Duration::from_millis(3000),
    )
    .await;
    assert!(
        e.contains("deadline: not finished within 1s 500ms (--deadline)"),
        "{e}"
    );
}

#[tokio::test]
async fn a_full_accept_queue_is_a_connect_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = socket.listen(0).unwrap();
    let addr = l.local_addr().unwrap();
    // Fill the queue (never accepted): further SYNs are dropped.
    let mut held = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            held.push(s);
        }
    }
    let mut o = options(
        format!("http://{addr}/job.tgz"),
        &tmp.path().join("d"),
        short(500, 5000, 60_000),
    );
    o.retries = 1;
    let e = fails(&o, Duration::from_millis(3000)).await;
    assert!(
        e.contains("connect timeout: no connection within 500ms (--connect-timeout)"),
        "{e}"
    );
    drop(l);
}

#[tokio::test]
async fn the_cli_takes_the_same_bounds() {
    let tmp = tempfile::tempdir().unwrap();
    let url = server(b"", None).await;
    let t = Instant::now();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_flowgate-adapter"))
        .args(["fetch", "--url", &url, "--sha256", &"c".repeat(64)])
        .arg("--dest")
        .arg(tmp.path().join("d"))
        .args([
            "--stall-timeout",
            "700ms",
            "--connect-timeout",
            "1s",
            "--deadline",
            "1m",
        ])
        .output()
        .await
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("(--stall-timeout)"), "{err}");
}
