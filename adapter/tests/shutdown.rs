//! The real binary under SIGTERM: it stops accepting, lets in-flight requests
//! finish, and exits 0 — what the kubelet expects during a rollout.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn wait_healthy(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("adapter did not start listening on {port}");
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
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
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_healthy(port);

    // A request that takes 1.5 s upstream is in flight when SIGTERM arrives.
    let in_flight = tokio::spawn(async move {
        client()
            .get(format!("http://127.0.0.1:{port}/k3x9q2a/drain"))
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // New connections are refused while the old request drains.
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "still accepting after SIGTERM"
    );

    let response = in_flight
        .await
        .unwrap()
        .expect("in-flight request must complete");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "finished after SIGTERM");

    let exit = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let logs = String::from_utf8_lossy(&exit.stderr);
    assert!(
        exit.status.success(),
        "exit {:?}; logs:\n{logs}",
        exit.status
    );
    assert!(logs.contains("SIGTERM received"), "{logs}");
    assert!(logs.contains("drained"), "{logs}");
}

#[tokio::test]
async fn bad_configuration_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_flowgate-adapter"))
        .args(["--listen", "127.0.0.1:0"])
        .env_remove("FLOWGATE_PREFIX")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--prefix / FLOWGATE_PREFIX is required"),
        "{err}"
    );
}
