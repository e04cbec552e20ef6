//! Two API replicas: two `flowgate serve --backend kubernetes` processes
//! against one control plane (as the manifests run them), with creates sent
//! to both at once. Idempotent create and the per-owner quota must hold
//! across them, and idempotency is per owner.

mod support;

use futures_util::future::join_all;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::*;

struct Replica {
    child: Child,
    base: String,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const ALICE: &str = "alice-token-000000001";
const BOB: &str = "bob-token-0000000002";

/// `flowgate serve --backend kubernetes` for `ns`, with tokens for alice and
/// bob and a quota of 3 per owner.
async fn replica(ns: &str, tokens: &std::path::Path) -> Replica {
    let port = free_port();
    std::fs::write(tokens.with_file_name("access-keys"), "r".repeat(48)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .env("KUBECONFIG", &cluster().kubeconfig)
        .env("FLOWGATE_LOG_FORMAT", "text")
        .args(["--backend", "kubernetes", "--namespace", ns])
        .args(["--host", "ml.example.test", "--route-kind", "ingress"])
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--quota-per-owner", "3", "--tokens"])
        .arg(tokens)
        // both replicas sign access links with the same keys (next to the tokens)
        .arg("--access-keys")
        .arg(tokens.with_file_name("access-keys"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = http();
    for _ in 0..150 {
        if http
            .get(format!("{base}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Replica { child, base };
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("flowgate serve did not come up");
}

fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

fn body(workload: &str, sha: &str) -> Value {
    json!({"workload": workload, "artifacts": {"url": "https://store.example.test/job.tgz", "sha256": sha}})
}

/// Sends `n` creates at once, alternating between the replicas; returns
/// (status, body) per create.
async fn burst(
    replicas: &[Replica],
    token: &str,
    n: usize,
    body_for: impl Fn(usize) -> Value,
) -> Vec<(u16, Value)> {
    let http = http();
    join_all((0..n).map(|i| {
        let req = http
            .post(format!("{}/api/v1/instances", replicas[i % 2].base))
            .bearer_auth(token)
            .json(&body_for(i));
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    }))
    .await
}

async fn deployments_of(client: &kube::Client, ns: &str, owner: &str) -> Vec<Deployment> {
    Api::<Deployment>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("flowgate.io/owner={owner}")))
        .await
        .unwrap()
        .items
}

#[tokio::test]
async fn quota_and_idempotency_hold_across_two_api_replicas() {
    let client = admin().await;
    let ns = namespace(&client).await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{ALICE} alice\n{BOB} bob\n")).unwrap();
    let replicas = [replica(&ns, &tokens).await, replica(&ns, &tokens).await];

    // Twenty different workloads at once, quota 3: exactly three are made.
    let results = burst(&replicas, ALICE, 20, |i| {
        body(&format!("job-{i}"), &format!("{i:064x}"))
    })
    .await;
    let made = results.iter().filter(|(s, _)| *s == 201).count();
    let refused = results.iter().filter(|(s, _)| *s == 429).count();
    assert_eq!((made, refused), (3, 17), "{results:?}");
    assert_eq!(deployments_of(&client, &ns, "alice").await.len(), 3);

    // Twenty creates of the same workload and artefacts at once: one instance,
    // and every caller gets it.
    let sha = "ab".repeat(32);
    let results = burst(&replicas, BOB, 20, |_| body("same-job", &sha)).await;
    assert!(
        results.iter().all(|(s, _)| *s == 200 || *s == 201),
        "{results:?}"
    );
    assert_eq!(
        results.iter().filter(|(s, _)| *s == 201).count(),
        1,
        "{results:?}"
    );
    let ids: std::collections::BTreeSet<_> = results
        .iter()
        .map(|(_, b)| b["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(deployments_of(&client, &ns, "bob").await.len(), 1);
}

#[tokio::test]
async fn idempotent_create_is_per_owner() {
    let client = admin().await;
    let ns = namespace(&client).await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{ALICE} alice\n{BOB} bob\n")).unwrap();
    let replicas = [replica(&ns, &tokens).await];
    let http = http();
    let create = |token: &'static str| {
        http.post(format!("{}/api/v1/instances", replicas[0].base))
            .bearer_auth(token)
            .json(&body("shared-job", &"cd".repeat(32)))
            .send()
    };
    let alice = create(ALICE).await.unwrap();
    assert_eq!(alice.status(), 201);
    let alice: Value = alice.json().await.unwrap();
    let again = create(ALICE).await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await.unwrap()["id"], alice["id"]);
    // Bob asks for the same workload and artefacts: his own instance, not alice's.
    let bob = create(BOB).await.unwrap();
    assert_eq!(bob.status(), 201, "bob must not get alice's instance");
    let bob: Value = bob.json().await.unwrap();
    assert_eq!(bob["owner"], "bob");
    assert_ne!(bob["id"], alice["id"]);
}
