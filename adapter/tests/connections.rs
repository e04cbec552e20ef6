//! The real binary against raw sockets: connections that say nothing, half an
//! HTTP/2 preface or half a request head are closed in bounded time; idle
//! keep-alive is bounded; past `--max-connections` new ones are closed at
//! accept and counted; a client that leaves early is logged once; a request
//! answered without reading its body leaves the connection usable, or says
//! `Connection: close`.

mod common;

use common::*;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Binary {
    child: Option<Child>,
    addr: SocketAddr,
}

impl Binary {
    async fn start(extra: &[&str]) -> Self {
        let upstream = start_upstream().await;
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_flowgate-adapter"))
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--upstream",
                &format!("http://{upstream}"),
                "--prefix",
                PREFIX,
                "--threads",
                "1",
            ])
            .args(extra)
            .env("RUST_LOG", "info")
            .env("FLOWGATE_LOG_FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "adapter did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            child: Some(child),
            addr,
        }
    }

    async fn metrics(&self) -> String {
        raw_request(self.addr, "GET", "/metrics", &[]).await.text()
    }

    /// Stops the adapter (SIGTERM) and returns its log.
    async fn stop(mut self) -> String {
        let child = self.child.take().unwrap();
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
            .await
            .unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends `bytes`, then waits for the server to close; returns how long it took.
async fn closed_after(addr: SocketAddr, bytes: &[u8], limit: Duration) -> Duration {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut sink = Vec::new();
    match tokio::time::timeout(limit, s.read_to_end(&mut sink)).await {
        Ok(_) => start.elapsed(),
        Err(_) => panic!(
            "{:?}: still open after {limit:?}",
            String::from_utf8_lossy(bytes)
        ),
    }
}

#[tokio::test]
async fn silent_and_half_spoken_connections_are_closed() {
    let b = Binary::start(&["--header-timeout", "1s", "--idle-timeout", "2s"]).await;
    let cases: [&[u8]; 4] = [
        b"",
        b"PRI * HTTP/2.0\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET /k3x9q2a/echo HTTP/1.1\r\nHost: x\r\n",
    ];
    let waits = futures_util::future::join_all(
        cases
            .iter()
            .map(|bytes| closed_after(b.addr, bytes, Duration::from_secs(5))),
    )
    .await;
    for (bytes, waited) in cases.iter().zip(waits) {
        assert!(
            waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
            "{:?}: closed after {waited:?}",
            String::from_utf8_lossy(bytes)
        );
    }
    let m = b.metrics().await;
    assert!(
        metric(&m, "flowgate_adapter_idle_closed_connections_total") >= 3.0,
        "{m}"
    );
}

#[tokio::test]
async fn idle_keep_alive_is_bounded_for_http1_and_http2() {
    let b = Binary::start(&["--header-timeout", "5s", "--idle-timeout", "1s"]).await;

    // HTTP/1.1 keep-alive: one request, then silence.
    let start = Instant::now();
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(4), s.read_to_end(&mut rest))
        .await
        .expect("idle HTTP/1.1 connection closed")
        .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );

    // HTTP/2 (h2c prior knowledge): one request, then an idle connection,
    // which hyper's own timers never close.
    let start = Instant::now();
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(b.addr).await.unwrap());
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/healthz", b.addr))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("idle HTTP/2 connection closed by the server")
        .unwrap()
        .ok();
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
}

#[tokio::test]
async fn connections_past_the_cap_are_refused_and_counted() {
    let b = Binary::start(&["--max-connections", "3", "--header-timeout", "2s"]).await;
    // Three silent connections take every slot (the probe in start() is gone).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(b.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The fourth is closed at once, without an answer.
    let start = Instant::now();
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    let _ = s
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut buf))
        .await
        .expect("refused connection closed at once");
    assert!(buf.is_empty(), "{:?}", String::from_utf8_lossy(&buf));
    assert!(start.elapsed() < Duration::from_millis(900));
    // Once the silent ones are closed (2 s), there is room again.
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = b.metrics().await;
    assert_eq!(
        metric(&m, "flowgate_adapter_refused_connections_total"),
        1.0,
        "{m}"
    );
    assert_eq!(metric(&m, "flowgate_adapter_open_connections"), 1.0, "{m}");
}

#[tokio::test]
async fn silence_is_bounded_by_default_at_30_seconds() {
    let b = Binary::start(&[]).await;
    let waited = closed_after(b.addr, b"PRI * HTTP/2.0\r\n", Duration::from_secs(40)).await;
    assert!(
        waited >= Duration::from_secs(29) && waited <= Duration::from_secs(32),
        "{waited:?}"
    );
}

#[tokio::test]
async fn a_client_that_leaves_before_the_upstream_answers_is_logged() {
    let b = Binary::start(&["--public-host", "mlflow.example.test"]).await;
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    s.write_all(b"GET /k3x9q2a/slow HTTP/1.1\r\nHost: mlflow.example.test\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m = b.metrics().await;
    assert_eq!(
        metric(&m, "flowgate_adapter_in_flight_requests"),
        0.0,
        "{m}"
    );
    assert_eq!(metric(&m, "flowgate_adapter_abandoned_requests_total"), 1.0);
    let log = b.stop().await;
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("flowgate::access") && l.contains("/k3x9q2a/slow"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("\"status\":499"), "{}", lines[0]);
    assert!(lines[0].contains("\"client_gone\":true"), "{}", lines[0]);
    assert!(!log.contains("no --public-host"), "{log}");
}

#[tokio::test]
async fn without_public_host_it_warns_once() {
    let b = Binary::start(&[]).await;
    for _ in 0..3 {
        let r = raw_request(
            b.addr,
            "GET",
            "/k3x9q2a/echo",
            &[("Host", "anything.example")],
        )
        .await;
        assert_eq!(r.status, 200);
    }
    let log = b.stop().await;
    assert_eq!(log.matches("no --public-host").count(), 1, "{log}");
}

/// A client that asks for a large body and stops reading holds its
/// connection, the upstream request and the instance's activity until
/// `--send-timeout` passes with no byte taken; a quiet event stream (little
/// to write, and taken by the socket buffers) is not cut.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_after_the_send_timeout() {
    let b = Binary::start(&["--send-timeout", "1s", "--idle-timeout", "30s"]).await;
    let mut sse = TcpStream::connect(b.addr).await.unwrap();
    sse.write_all(b"GET /k3x9q2a/sse HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut stalled = TcpStream::connect(b.addr).await.unwrap();
    stalled
        .write_all(b"GET /k3x9q2a/big HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // Neither is read for 3 s: the download's writes stall once the socket
    // buffers are full, and the send timeout (1 s) cuts it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got += n,
            Err(_) => panic!("the cut connection should end, not hang (read {got} bytes)"),
        }
    }
    assert!(got < BIG_BYTES / 2, "read {got} of {BIG_BYTES} bytes");
    // The event stream was not cut: all three events arrived, then its end.
    let mut events = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        while !String::from_utf8_lossy(&events).contains("data: event 2") {
            let n = sse.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "the event stream was cut: {:?}",
                String::from_utf8_lossy(&events)
            );
            events.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("all three events");
    let m = b.metrics().await;
    assert_eq!(
        metric(&m, "flowgate_adapter_open_response_bodies"),
        0.0,
        "{m}"
    );
}

/// Reads one response with a Content-Length body off `s`, leaving the
/// connection open.
async fn read_one(s: &mut TcpStream) -> RawResponse {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .expect("a response head within 10 s")
            .unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&buf));
        buf.push(byte[0]);
    }
    let head = parse_response(&buf);
    let len: usize = head.header("content-length").unwrap().parse().unwrap();
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    RawResponse { body, ..head }
}

/// What a proxy in front does: the head, then the body in a later packet.
async fn post_in_two_writes(s: &mut TcpStream, path: &str, extra: &str, body: &[u8], sent: usize) {
    let head = format!(
        "POST {PREFIX}{path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.write_all(&body[..sent]).await.unwrap();
}

#[tokio::test]
async fn a_request_answered_without_reading_its_body_leaves_a_usable_connection() {
    let b = Binary::start(&[]).await;
    // A refused write whose body comes after its head (Traefik's pooled
    // connection did this, then got a reset for its next request: a 502).
    let body = br#"{"run_id":"r1"}"#;
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    post_in_two_writes(
        &mut s,
        "/ajax-api/2.0/mlflow/runs/delete",
        "",
        body,
        body.len(),
    )
    .await;
    let refused = read_one(&mut s).await;
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert_eq!(refused.header("connection"), None);
    // the same connection carries the next request to the app
    s.write_all(
        format!("GET {PREFIX}/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert_eq!(parse_response(&rest).status, 200);

    // What cannot be discarded is announced: the peer must not reuse the
    // connection. A body never sent (the client waits for 100 Continue),
    // one too long to read, one that stops half-way.
    let big = vec![b' '; 4 << 20];
    for (what, extra, body, sent) in [
        (
            "waits for 100 Continue",
            "Expect: 100-continue\r\n",
            &body[..],
            0,
        ),
        ("4 MiB", "", &big[..], 0),
        ("stops half-way", "", &body[..], 5),
    ] {
        let start = Instant::now();
        let mut s = TcpStream::connect(b.addr).await.unwrap();
        post_in_two_writes(
            &mut s,
            "/ajax-api/2.0/mlflow/runs/delete",
            extra,
            body,
            sent,
        )
        .await;
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("{what}: still open after 5 s"))
            .unwrap();
        let answer = String::from_utf8_lossy(&answer).into_owned();
        assert!(answer.starts_with("HTTP/1.1 403 "), "{what}: {answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "{what}: {answer}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "{what}: {:?}",
            start.elapsed()
        );
    }
}
