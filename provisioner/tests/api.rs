//! The REST API over both backends: the same contract against the local
//! backend (real MLflow processes) and the Kubernetes backend (real control
//! plane); auth, quotas, validation, idempotency, launch events, restart
//! recovery and expiry.

mod support;

use provisioner::access::Links;
use provisioner::api::auth::Tokens;
use provisioner::api::{ApiState, router};
use provisioner::backend::Backend;
use provisioner::instance::TtlPolicy;
use provisioner::kube::ledger::LeaseLedger;
use provisioner::ledger::{Ledger, MemoryLedger};
use provisioner::local::router::LocalRouter;
use provisioner::local::{LocalBackend, LocalSettings};
use provisioner::service::{Policy, Provisioner, Quotas};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The MLflow the local backend runs (made by testenv/deps or ./quickstart).
fn mlflow() -> PathBuf {
    let path = std::env::var_os("FLOWGATE_TEST_MLFLOW")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".cache/venvs/current/bin/mlflow"));
    assert!(
        path.is_file(),
        "no MLflow at {}: run testenv/deps (./test does) or set FLOWGATE_TEST_MLFLOW",
        path.display()
    );
    path
}

/// A real job store (populate.py), moved after writing and packed as a .tgz.
fn store_archive() -> &'static (PathBuf, String) {
    static ARCHIVE: OnceLock<(PathBuf, String)> = OnceLock::new();
    ARCHIVE.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("flowgate-store-")
            .tempdir()
            .unwrap()
            .keep();
        let python = mlflow().with_file_name("python");
        let ok = std::process::Command::new(python)
            .arg(repo().join("testenv/mlflow/populate.py"))
            .arg("--store")
            .arg(dir.join("job/mlruns"))
            .env("MLFLOW_ALLOW_FILE_STORE", "true")
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success(), "populate.py failed");
        let archive = dir.join("store.tgz");
        let ok = std::process::Command::new("tar")
            .arg("-czf")
            .arg(&archive)
            .arg("-C")
            .arg(dir.join("job"))
            .arg("mlruns")
            .status()
            .unwrap();
        assert!(ok.success());
        std::fs::remove_dir_all(dir.join("job")).unwrap();
        let sha = sha256_file(&archive);
        (archive, sha)
    })
}

fn sha256_file(p: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(p)
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// The REST API as `flowgate serve` runs it on loopback: `file://` URLs only
/// without tokens.
async fn spawn_api_with(
    backend: Arc<dyn Backend>,
    ledger: Arc<dyn Ledger>,
    ttl: TtlPolicy,
    tokens: Option<Tokens>,
    quotas: Quotas,
    links: Links,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let policy = Policy {
        ttl,
        quotas,
        allow_file: tokens.is_none(),
        streams_per_caller: 4,
    };
    let service = Arc::new(Provisioner::new(backend, ledger, policy).with_links(links));
    let app = router(ApiState::new(service, tokens));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

/// The API over the local backend (claims in memory, short TTLs allowed,
/// links signed with the data dir's keys, as `flowgate serve` does).
async fn spawn_api(local: &Local, tokens: Option<Tokens>, quotas: Quotas) -> String {
    let ledger = Arc::new(MemoryLedger::default());
    let links = Links::load(local.backend.access_keys(), Links::DEFAULT_TTL).unwrap();
    let backend = Arc::new(local.backend.clone());
    spawn_api_with(backend, ledger, short_ttls(), tokens, quotas, links).await
}

/// Creates an instance of the test archive for `workload` (more fields in
/// `extra`); the API's answer.
async fn create_job(c: &reqwest::Client, base: &str, workload: &str, extra: Value) -> Value {
    let (archive, sha) = store_archive();
    let mut body = json!({"workload": workload, "artifacts": {"url": format!("file://{}", archive.display()), "sha256": sha}});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    c.post(format!("{base}/api/v1/instances"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// GET `url`; its JSON body.
async fn get_json(c: &reqwest::Client, url: &str) -> Value {
    c.get(url).send().await.unwrap().json().await.unwrap()
}

/// Opens an access link as a browser does (without following the redirect):
/// the session cookie (`name=value`) and where it sends the browser.
async fn sign_in(access_url: &str) -> (String, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let c = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = c.get(access_url).send().await.unwrap();
    assert_eq!(r.status(), 303, "{access_url}");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    (cookie.split(';').next().unwrap().to_owned(), location)
}

/// Serves one file over HTTP on loopback; returns its URL.
async fn serve_file(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/store.tgz",
        axum::routing::get(move || {
            let bytes = bytes.clone();
            async move { bytes }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/store.tgz")
}

struct Local {
    backend: LocalBackend,
    instances: String,
    data: PathBuf,
}

async fn local_backend(data: &Path, ttl: TtlPolicy) -> Local {
    local_backend_with(data, ttl, Default::default()).await
}

async fn local_backend_with(
    data: &Path,
    ttl: TtlPolicy,
    supervision: provisioner::local::supervisor::Supervision,
) -> Local {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let settings = LocalSettings {
        data_dir: data.to_path_buf(),
        mlflow: mlflow(),
        public_url: format!("http://{addr}"),
        ttl,
        supervision,
        access_keys: None,
    };
    let backend = LocalBackend::open(settings).await.unwrap();
    let routes = Arc::new(LocalRouter::new(backend.routes()));
    let limits = adapter::server::ConnectionLimits {
        header_read_timeout: Duration::from_secs(30),
        max_header_bytes: 65536,
        drain_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    tokio::spawn(async move {
        adapter::server::serve(routes, &limits, listener, std::future::pending()).await
    });
    Local {
        backend,
        instances: format!("http://{addr}"),
        data: data.to_path_buf(),
    }
}

fn short_ttls() -> TtlPolicy {
    TtlPolicy {
        default: Duration::from_secs(3600),
        min: Duration::from_secs(1),
        max: Duration::from_secs(7 * 24 * 3600),
    }
}

/// Reads an SSE stream to its end; returns (event name, data) pairs.
async fn events(base: &str, id: &str, auth: Option<&str>) -> Vec<(String, Value)> {
    let mut req = http().get(format!("{base}/api/v1/instances/{id}/events"));
    if let Some(t) = auth {
        req = req.bearer_auth(t);
    }
    let resp = tokio::time::timeout(Duration::from_secs(240), req.send())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = tokio::time::timeout(Duration::from_secs(240), resp.text())
        .await
        .expect("the event stream must end")
        .unwrap();
    text.split("\n\n")
        .filter_map(|block| {
            let name = block.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((name.to_owned(), serde_json::from_str(data).unwrap()))
        })
        .collect()
}

/// The API contract, the same for every backend.
async fn contract(base: &str, url: &str, sha: &str) {
    let c = http();
    let body =
        json!({"workload": "panda-6543210", "artifacts": {"url": url, "sha256": sha}, "ttl": "2h"});
    let r = c
        .post(format!("{base}/api/v1/instances"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let created: Value = r.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/api/v1/instances/{id}"));
    assert!(
        created["url"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/{id}/"))
    );
    assert_eq!(created["owner"], "anonymous");
    let again: Value = {
        let r = c
            .post(format!("{base}/api/v1/instances"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            200,
            "same workload and checksum: the live instance"
        );
        r.json().await.unwrap()
    };
    assert_eq!(again["id"], id.as_str());
    let one = get_json(&c, &format!("{base}/api/v1/instances/{id}")).await;
    assert_eq!(one["workload"], "panda-6543210");
    let listed = get_json(
        &c,
        &format!("{base}/api/v1/instances?workload=panda-6543210"),
    )
    .await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    assert!(listed.get("continue").is_none(), "one page: {listed}");
    let none = get_json(&c, &format!("{base}/api/v1/instances?workload=other")).await;
    assert_eq!(none["items"].as_array().unwrap().len(), 0);
    // pages, as Kubernetes lists: the second create is the live one, so make
    // another instance and walk both with limit=1
    let other = c
        .post(format!("{base}/api/v1/instances"))
        .json(&json!({"workload": "panda-7654321", "artifacts": {"url": url, "sha256": sha}, "ttl": "2h"}))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 201);
    let other: Value = other.json().await.unwrap();
    let first = get_json(&c, &format!("{base}/api/v1/instances?limit=1")).await;
    assert_eq!(first["items"].as_array().unwrap().len(), 1);
    let token = first["continue"].as_str().expect("a next page").to_owned();
    let second = get_json(
        &c,
        &format!("{base}/api/v1/instances?limit=1&continue={token}"),
    )
    .await;
    let ids: Vec<&str> = [&first, &second]
        .iter()
        .map(|p| p["items"][0]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id.as_str(), other["id"].as_str().unwrap()]);
    assert!(second.get("continue").is_none(), "{second}");
    let bad = c
        .get(format!("{base}/api/v1/instances?limit=1&continue=not-ours"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(bad.headers()["content-type"], "application/problem+json");
    let problem: Value = bad.json().await.unwrap();
    assert_eq!(
        (problem["status"].as_u64(), problem["error"].as_str()),
        (Some(400), Some("invalid"))
    );
    c.delete(format!(
        "{base}/api/v1/instances/{}",
        other["id"].as_str().unwrap()
    ))
    .send()
    .await
    .unwrap();
    let extended: Value = c
        .post(format!("{base}/api/v1/instances/{id}/extend"))
        .json(&json!({"ttl": "1h"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(extended["expires_at"].as_str().unwrap() > created["expires_at"].as_str().unwrap());
    let expiry = |v: &Value| {
        v["expires_at"]
            .as_str()
            .unwrap()
            .parse::<jiff::Timestamp>()
            .unwrap()
    };
    // A retry of a relative extension (same Idempotency-Key) is not applied twice.
    let extend = |body: Value, key: Option<&'static str>| {
        let mut r = c
            .post(format!("{base}/api/v1/instances/{id}/extend"))
            .json(&body);
        if let Some(k) = key {
            r = r.header("idempotency-key", k);
        }
        r.send()
    };
    let once: Value = extend(json!({"ttl": "1h"}), Some("k-1"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let twice: Value = extend(json!({"ttl": "1h"}), Some("k-1"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(expiry(&once), expiry(&twice), "the retry extended again");
    assert!(expiry(&once) > expiry(&extended));
    // An absolute expiry: applied once; a retry or an earlier one changes nothing.
    let target = expiry(&once) + jiff::SignedDuration::from_mins(30);
    for _ in 0..2 {
        let v: Value = extend(json!({"expires_at": target.to_string()}), None)
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(expiry(&v), target);
    }
    let earlier = target - jiff::SignedDuration::from_hours(1);
    let v: Value = extend(json!({"expires_at": earlier.to_string()}), None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(expiry(&v), target, "extend never shortens");
    for body in [
        json!({"expires_at": "2999-01-01T00:00:00Z"}),
        json!({"ttl": "1h", "expires_at": target.to_string()}),
        json!({}),
    ] {
        let r = extend(body.clone(), None).await.unwrap();
        assert_eq!(r.status(), 400, "{body}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    // ETag: unchanged → 304; a change → a new tag.
    let r = c
        .get(format!("{base}/api/v1/instances/{id}"))
        .send()
        .await
        .unwrap();
    let tag = r.headers()["etag"].to_str().unwrap().to_owned();
    assert!(tag.starts_with("W/\""), "{tag}");
    let r = c
        .get(format!("{base}/api/v1/instances/{id}"))
        .header("if-none-match", &tag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    extend(json!({"ttl": "1m"}), None).await.unwrap();
    let r = c
        .get(format!("{base}/api/v1/instances/{id}"))
        .header("if-none-match", &tag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_ne!(r.headers()["etag"].to_str().unwrap(), tag);

    // Bad input: a JSON error with a 4xx, never a 500.
    let bad: Vec<(Value, &str)> = vec![
        (
            json!({"workload": "w", "artifacts": {"url": url, "sha256": "abc"}}),
            "sha256",
        ),
        (
            json!({"workload": "w", "artifacts": {"url": "ftp://x/y.tgz", "sha256": sha}}),
            "must start with",
        ),
        (
            json!({"workload": "w", "artifacts": {"url": url, "sha256": sha}, "ttl": "1ms"}),
            "outside",
        ),
        (
            json!({"workload": "w", "artifacts": {"url": url, "sha256": sha}, "ttl": "whenever"}),
            "ttl",
        ),
        (
            json!({"workload": "", "artifacts": {"url": url, "sha256": sha}}),
            "workload",
        ),
        (
            json!({"workload": "w\u{7}", "artifacts": {"url": url, "sha256": sha}}),
            "workload",
        ),
        (json!({"workload": "w"}), "artifacts"),
        (
            json!({"workload": "w", "artifacts": {"url": url, "sha256": sha}, "surprise": 1}),
            "surprise",
        ),
    ];
    for (body, want) in bad {
        let r = c
            .post(format!("{base}/api/v1/instances"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_client_error(), "{body}: {}", r.status());
        let e: Value = r.json().await.unwrap();
        assert!(e["message"].as_str().unwrap().contains(want), "{body}: {e}");
        assert!(e["error"].is_string());
    }
    let r = c
        .post(format!("{base}/api/v1/instances"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid");
    for path in ["zzzzzzz", "NOT-AN-ID", "healthz"] {
        let r = c
            .get(format!("{base}/api/v1/instances/{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(r.json::<Value>().await.unwrap()["error"], "not_found");
    }
    let r = c
        .post(format!("{base}/api/v1/instances/{id}/extend"))
        .json(&json!({"ttl": "9999d"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let r = c
        .delete(format!("{base}/api/v1/instances/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = c
        .get(format!("{base}/api/v1/instances/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let doc = get_json(&c, &format!("{base}/api/v1/openapi.json")).await;
    assert!(doc["paths"]["/api/v1/instances/{id}/events"]["get"].is_object());
    assert_eq!(
        c.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(
        c.get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .contains("flowgate_api_requests_total")
    );
}

#[tokio::test]
async fn contract_on_the_local_backend() {
    let (archive, sha) = store_archive();
    let data = tempfile::tempdir().unwrap();
    let local = local_backend(data.path(), short_ttls()).await;
    let base = spawn_api(&local, None, Quotas::default()).await;
    contract(&base, &format!("file://{}", archive.display()), sha).await;
    local.backend.stop_all().await;
}

#[tokio::test]
async fn contract_on_the_kubernetes_backend() {
    let client = support::admin().await;
    let ns = support::namespace(&client).await;
    let settings = support::settings(&ns);
    let ttl = settings.ttl;
    let ledger = Arc::new(LeaseLedger::new(client.clone(), &ns));
    let backend = support::backend(client, settings).await;
    let links = support::test_links();
    let base = spawn_api_with(
        Arc::new(backend),
        ledger,
        ttl,
        None,
        Quotas::default(),
        links,
    )
    .await;
    contract(
        &base,
        "https://store.example.test/job.tgz",
        &"ab".repeat(32),
    )
    .await;
}

#[tokio::test]
async fn local_launch_serves_the_job_and_reports_each_step() {
    let data = tempfile::tempdir().unwrap();
    let local = local_backend(data.path(), short_ttls()).await;
    let base = spawn_api(&local, None, Quotas::default()).await;
    let c = http();
    let created = create_job(&c, &base, "job-1", json!({"access": "public"})).await;
    let id = created["id"].as_str().unwrap().to_owned();
    // public: the URL alone opens it, no link is minted
    assert_eq!(created["access"], "public");
    assert!(created.get("access_url").is_none(), "{created}");
    let steps: Vec<String> = events(&base, &id, None)
        .await
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert_eq!(
        steps,
        ["created", "downloading", "verified", "starting", "ready"]
    );
    let url = created["url"].as_str().unwrap();
    assert!(url.starts_with(&local.instances));
    let page = c.get(url).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("static-files/"));
    // MLflow's own API through the instance path, with a browser's Origin.
    let search: Value = c
        .post(format!("{url}ajax-api/2.0/mlflow/experiments/search"))
        .header("origin", local.instances.as_str())
        .json(&json!({"max_results": 10}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<_> = search["experiments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(names.contains(&"flowgate-demo".to_owned()), "{names:?}");
    // The store was written elsewhere: its artifact paths were remapped to where it lies now.
    let location = search["experiments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "flowgate-demo")
        .unwrap()["artifact_location"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        location.contains(&local.data.display().to_string()),
        "{location}"
    );
    // Unknown ids get a 404 page from the router.
    assert_eq!(
        c.get(format!("{}/zzzzzzz/", local.instances))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    local.backend.stop_all().await;
}

/// `link` (the default): only the access link the API shows opens the
/// instance; the adapter trades it for a cookie scoped to the instance and
/// redirects to the URL without the token; nothing else reaches MLflow.
#[tokio::test]
async fn link_instances_open_only_through_their_access_link() {
    let data = tempfile::tempdir().unwrap();
    let local = local_backend(data.path(), short_ttls()).await;
    let base = spawn_api(&local, None, Quotas::default()).await;
    let c = http();
    let mut made = Vec::new();
    for w in ["job-a", "job-b"] {
        let v = create_job(&c, &base, w, json!({})).await;
        assert_eq!(v["access"], "link", "{v}");
        let id = v["id"].as_str().unwrap().to_owned();
        assert_eq!(events(&base, &id, None).await.last().unwrap().0, "ready");
        made.push(v);
    }
    let (a, b) = (&made[0], &made[1]);
    let (url_a, url_b) = (a["url"].as_str().unwrap(), b["url"].as_str().unwrap());
    let id_a = a["id"].as_str().unwrap();
    let link_a = a["access_url"].as_str().unwrap();
    assert!(
        link_a.starts_with(&format!("{url_a}?flowgate_access=")),
        "{link_a}"
    );

    // No link, no cookie: a page saying how to get in, or a JSON error; never MLflow.
    let page = c
        .get(url_a)
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 401);
    let text = page.text().await.unwrap();
    assert!(
        text.contains("access link") && !text.contains("static-files"),
        "{text}"
    );
    let api = c
        .get(format!(
            "{url_a}ajax-api/2.0/mlflow/experiments/search?max_results=5"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 401);
    assert_eq!(
        api.json::<Value>().await.unwrap()["error_code"],
        "UNAUTHENTICATED"
    );

    // The link: a cookie for /<id>/ only, and the URL without the token.
    let raw = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(link_a)
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 303);
    assert_eq!(raw.headers()["location"], format!("/{id_a}/"));
    let set = raw.headers()["set-cookie"].to_str().unwrap();
    for attr in [
        format!("Path=/{id_a}/"),
        "HttpOnly".into(),
        "SameSite=Lax".into(),
    ] {
        assert!(set.contains(&attr), "{attr} not in {set}");
    }
    assert!(!set.contains("Secure"), "plain http: {set}");
    let (session_a, _) = sign_in(link_a).await;
    let page = c
        .get(url_a)
        .header("cookie", &session_a)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("static-files/"));
    let search: Value = c
        .post(format!("{url_a}ajax-api/2.0/mlflow/experiments/search"))
        .header("cookie", &session_a)
        .header("origin", local.instances.as_str())
        .json(&json!({"max_results": 10}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        search["experiments"]
            .as_array()
            .is_some_and(|e| !e.is_empty()),
        "{search}"
    );

    // A's link and A's cookie do not open B.
    let b_with_a_link = link_a.replace(id_a, b["id"].as_str().unwrap());
    let r = c.get(&b_with_a_link).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .get(url_b)
        .header("cookie", &session_a)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A tampered token does not open A.
    let mut tampered = link_a.to_owned();
    let last = tampered.pop().unwrap();
    tampered.push(if last == '0' { '1' } else { '0' });
    assert_eq!(c.get(&tampered).send().await.unwrap().status(), 401);

    // Another link to share, short-lived; it expires.
    let r = c
        .post(format!("{base}/api/v1/instances/{id_a}/links"))
        .json(&json!({"ttl": "1s"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let short = r.json::<Value>().await.unwrap()["access_url"]
        .as_str()
        .unwrap()
        .to_owned();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = c.get(&short).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("expired"));
    let r = c
        .post(format!("{base}/api/v1/instances/{id_a}/links"))
        .json(&json!({"ttl": "30d"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // GET mints a fresh link each time.
    let again = get_json(&c, &format!("{base}/api/v1/instances/{id_a}")).await;
    let (session_again, _) = sign_in(again["access_url"].as_str().unwrap()).await;
    let page = c
        .get(url_a)
        .header("cookie", &session_again)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    local.backend.stop_all().await;
}

#[tokio::test]
async fn failing_launches_say_why() {
    let (archive, sha) = store_archive();
    let data = tempfile::tempdir().unwrap();
    let local = local_backend(data.path(), short_ttls()).await;
    let base = spawn_api(&local, None, Quotas::default()).await;
    let c = http();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cases = [
        (
            format!("file://{}", archive.display()),
            "0".repeat(64),
            "checksum mismatch",
        ),
        (
            format!("http://127.0.0.1:{port}/gone.tgz"),
            sha.clone(),
            "download",
        ),
    ];
    for (i, (url, sha, want)) in cases.iter().enumerate() {
        let created: Value = c
            .post(format!("{base}/api/v1/instances"))
            .json(
                &json!({"workload": format!("bad-{i}"), "artifacts": {"url": url, "sha256": sha}}),
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = created["id"].as_str().unwrap();
        let evs = events(&base, id, None).await;
        let (last, data) = evs.last().unwrap();
        assert_eq!(last, "failed", "{evs:?}");
        let message = data["message"].as_str().unwrap();
        assert!(message.contains(want), "{data}");
        // No internals: not the archive's actual checksum, not what answered
        // (or did not) at a loopback port.
        let real_sha = &store_archive().1;
        for secret in [real_sha.as_str(), &port.to_string(), "refused", "127.0.0.1"] {
            assert!(!message.contains(secret), "{message:?} reveals {secret:?}");
        }
        let now = get_json(&c, &format!("{base}/api/v1/instances/{id}")).await;
        assert_eq!(now["phase"], "Failed");
        assert!(now["message"].as_str().unwrap().contains(want));
    }
    local.backend.stop_all().await;
}

#[tokio::test]
async fn tokens_owners_and_quotas() {
    let (archive, sha) = store_archive();
    let data = tempfile::tempdir().unwrap();
    let local = local_backend(data.path(), short_ttls()).await;
    let tokens = Tokens::parse("alice-token-000000001 alice\nbob-token-0000000002 bob\n").unwrap();
    let base = spawn_api(
        &local,
        Some(tokens),
        Quotas {
            per_owner: 1,
            total: 10,
        },
    )
    .await;
    let c = http();
    // With tokens, callers may not read the server's files.
    let file_url = format!("file://{}", archive.display());
    let r = c
        .post(format!("{base}/api/v1/instances"))
        .bearer_auth("alice-token-000000001")
        .json(&json!({"workload": "f", "artifacts": {"url": file_url, "sha256": sha}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(
        r.json::<Value>().await.unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("must start with")
    );
    let url = serve_file(archive).await;
    let body = |w: &str| json!({"workload": w, "artifacts": {"url": url, "sha256": sha}});
    let post = |token: Option<&'static str>, b: Value| {
        let mut r = c.post(format!("{base}/api/v1/instances")).json(&b);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    assert_eq!(post(None, body("a")).await.unwrap().status(), 401);
    assert_eq!(
        post(Some("wrong-token-000000000"), body("a"))
            .await
            .unwrap()
            .status(),
        401
    );
    let r = post(Some("alice-token-000000001"), body("a"))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let alice: Value = r.json().await.unwrap();
    assert_eq!(alice["owner"], "alice");
    let id = alice["id"].as_str().unwrap();
    // Quota: alice has one live instance; a second is refused, the same one is returned.
    let r = post(Some("alice-token-000000001"), body("b"))
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "quota");
    assert_eq!(
        post(Some("alice-token-000000001"), body("a"))
            .await
            .unwrap()
            .status(),
        200
    );
    // The same workload and artefacts for bob: his own instance, not alice's.
    let r = post(Some("bob-token-0000000002"), body("a")).await.unwrap();
    assert_eq!(r.status(), 201);
    let bobs: Value = r.json().await.unwrap();
    assert_eq!(bobs["owner"], "bob");
    assert_ne!(bobs["id"], alice["id"]);
    // Bob cannot see or touch alice's instance, nor create in her name.
    let r = c
        .get(format!("{base}/api/v1/instances/{id}"))
        .bearer_auth("bob-token-0000000002")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = c
        .delete(format!("{base}/api/v1/instances/{id}"))
        .bearer_auth("bob-token-0000000002")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let listed: Value = c
        .get(format!("{base}/api/v1/instances"))
        .bearer_auth("bob-token-0000000002")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    assert_eq!(listed["items"][0]["owner"], "bob");
    let mut as_alice = body("c");
    as_alice["owner"] = json!("alice");
    assert_eq!(
        post(Some("bob-token-0000000002"), as_alice)
            .await
            .unwrap()
            .status(),
        403
    );
    let r = c
        .delete(format!("{base}/api/v1/instances/{id}"))
        .bearer_auth("alice-token-000000001")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    local.backend.stop_all().await;
}

#[tokio::test]
async fn restart_readopts_live_instances_and_drops_expired_ones() {
    let data = tempfile::tempdir().unwrap();
    let c = http();
    let (keep_id, gone_id, session) = {
        let local = local_backend(data.path(), short_ttls()).await;
        let base = spawn_api(&local, None, Quotas::default()).await;
        let mut ids = Vec::new();
        let mut sessions = Vec::new();
        for w in ["keep", "gone"] {
            let v = create_job(&c, &base, w, json!({})).await;
            let id = v["id"].as_str().unwrap().to_owned();
            assert_eq!(events(&base, &id, None).await.last().unwrap().0, "ready");
            sessions.push(sign_in(v["access_url"].as_str().unwrap()).await.0);
            ids.push(id);
        }
        local.backend.stop_all().await;
        (ids[0].clone(), ids[1].clone(), sessions[0].clone())
    };
    // The keys are rotated while the server is down: a new key signs, the old
    // one still verifies (the browser's session stays valid).
    let keys = data.path().join("access-keys");
    let old = std::fs::read_to_string(&keys).unwrap();
    std::fs::write(&keys, format!("{}\n{old}", "n".repeat(64))).unwrap();
    // While the server is down, one instance's time runs out.
    let record = data
        .path()
        .join("instances")
        .join(&gone_id)
        .join("instance.json");
    let mut r: Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    r["expires_at"] = json!("2020-01-01T00:00:00Z");
    std::fs::write(&record, serde_json::to_vec(&r).unwrap()).unwrap();

    let local = local_backend(data.path(), short_ttls()).await;
    let base = spawn_api(&local, None, Quotas::default()).await;
    assert_eq!(
        c.get(format!("{base}/api/v1/instances/{gone_id}"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert!(!data.path().join("instances").join(&gone_id).exists());
    assert_eq!(
        events(&base, &keep_id, None).await.last().unwrap().0,
        "ready"
    );
    // The same URL works again (new server, new MLflow port, same id), for
    // the browser signed in before.
    let page = c
        .get(format!("{}/{keep_id}/", local.instances))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    // A link minted now is signed with the new key, and opens it too.
    let got = get_json(&c, &format!("{base}/api/v1/instances/{keep_id}")).await;
    let (fresh, _) = sign_in(got["access_url"].as_str().unwrap()).await;
    assert_ne!(fresh, session);
    let page = c
        .get(format!("{}/{keep_id}/", local.instances))
        .header("cookie", &fresh)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    local.backend.stop_all().await;
}

#[tokio::test]
async fn expiry_and_crashes() {
    let (archive, sha) = store_archive();
    let data = tempfile::tempdir().unwrap();
    let local = local_backend(data.path(), short_ttls()).await;
    let base = spawn_api(&local, None, Quotas::default()).await;
    let c = http();
    let create = |w: &'static str, ttl: &'static str| {
        c.post(format!("{base}/api/v1/instances"))
            .json(&json!({"workload": w, "artifacts": {"url": format!("file://{}", archive.display()), "sha256": sha}, "ttl": ttl}))
            .send()
    };
    let short: Value = create("short", "3s").await.unwrap().json().await.unwrap();
    let crash: Value = create("crash", "1h").await.unwrap().json().await.unwrap();
    let short_id = short["id"].as_str().unwrap().to_owned();
    let crash_id = crash["id"].as_str().unwrap().to_owned();
    assert_eq!(
        events(&base, &short_id, None).await.last().unwrap().0,
        "ready"
    );
    let evs = events(&base, &crash_id, None).await;
    assert_eq!(evs.last().unwrap().0, "ready");

    // MLflow dies: the phase says so. (Events do not name its loopback port:
    // the server is found by its store's path.)
    let killed = std::process::Command::new("pkill")
        .args([
            "-KILL",
            "-f",
            &format!("mlflow.* server .*instances/{crash_id}/"),
        ])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut seen = Vec::new();
    for _ in 0..600 {
        let now = get_json(&c, &format!("{base}/api/v1/instances/{crash_id}")).await;
        if now["phase"] == "Pending" {
            assert!(
                now["message"].as_str().unwrap_or("").contains("MLflow")
                    || now["message"].is_null(),
                "{now}"
            );
        }
        seen.push(now["phase"].clone());
        if now["phase"] == "Ready" && seen.contains(&Value::from("Pending")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(seen.last().unwrap(), "Ready", "{seen:?}");

    // Time runs out: gc stops the process and deletes the data.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let removed = local.backend.gc(false).await.unwrap();
    assert!(
        removed
            .iter()
            .any(|r| r.name == short_id && r.reason == "expired"),
        "{removed:?}"
    );
    assert!(!data.path().join("instances").join(&short_id).exists());
    assert_eq!(
        c.get(format!("{}/{short_id}/", local.instances))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    local.backend.stop_all().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The status of a raw HTTP/1.1 request with this `Host` (None: no Host line).
async fn status_with_host(port: u16, method: &str, path: &str, host: Option<&str>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let host = host.map(|h| format!("Host: {h}\r\n")).unwrap_or_default();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\n{host}Content-Length: 0\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let head = String::from_utf8_lossy(&out);
    head.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{head}"))
}

struct Serve(std::process::Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `flowgate serve --backend local` (the real binary) on free ports.
async fn serve_binary(data: &Path, extra: &[&str]) -> (Serve, u16, u16) {
    let (api, instances) = (free_port(), free_port());
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(["serve", "--backend", "local"])
        .arg("--listen")
        .arg(format!("127.0.0.1:{api}"))
        .arg("--local-listen")
        .arg(format!("127.0.0.1:{instances}"))
        .arg("--data-dir")
        .arg(data)
        .arg("--mlflow")
        .arg(mlflow())
        .args(extra)
        .env_remove("FLOWGATE_PUBLIC_HOST")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let serve = Serve(child);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    // Only the instances' listener is probed: serve binds the API's first, and
    // a probe of the API would hold one of its connection slots until the
    // server notices it closed (a race with tests that fill the slots).
    while tokio::net::TcpStream::connect(("127.0.0.1", instances))
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "flowgate serve did not listen"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (serve, api, instances)
}

/// DNS rebinding: a page whose own name now resolves to 127.0.0.1 sends that
/// name as Host. The API and the instances' listener answer it 421; probes
/// answer any Host.
#[tokio::test]
async fn other_host_names_are_misdirected() {
    let data = tempfile::tempdir().unwrap();
    let (_serve, api, inst) = serve_binary(data.path(), &[]).await;
    let evil = |port: u16| format!("rebound.evil.example:{port}");
    for (port, path) in [(api, "/api/v1/instances"), (inst, "/abcdefg/")] {
        assert_eq!(
            status_with_host(port, "GET", path, Some(&evil(port))).await,
            421,
            "{path}"
        );
        let no_host = status_with_host(port, "GET", path, None).await;
        assert!(
            matches!(no_host, 400 | 421),
            "{path} without Host: {no_host}"
        );
        assert_eq!(
            status_with_host(port, "GET", "/healthz", Some(&evil(port))).await,
            200
        );
    }
    assert_eq!(
        status_with_host(api, "GET", "/metrics", Some("x")).await,
        200
    );
    assert_eq!(
        status_with_host(api, "POST", "/api/v1/instances", Some(&evil(api))).await,
        421
    );
    // the listen addresses and localhost are the defaults
    for host in [format!("127.0.0.1:{api}"), format!("localhost:{api}")] {
        assert_eq!(
            status_with_host(api, "GET", "/api/v1/instances", Some(&host)).await,
            200
        );
    }
    assert_eq!(
        status_with_host(inst, "GET", "/abcdefg/", Some(&format!("localhost:{inst}"))).await,
        404
    );
    // the port is part of it (both listeners share one list)
    assert_eq!(
        status_with_host(api, "GET", "/api/v1/instances", Some("localhost:1")).await,
        421
    );

    // --public-host replaces the defaults
    let data = tempfile::tempdir().unwrap();
    let (_serve, api, inst) =
        serve_binary(data.path(), &["--public-host", "flowgate.test,localhost"]).await;
    assert_eq!(
        status_with_host(api, "GET", "/api/v1/instances", Some("flowgate.test")).await,
        200
    );
    assert_eq!(
        status_with_host(inst, "GET", "/abcdefg/", Some("FLOWGATE.test:80")).await,
        404
    );
    assert_eq!(
        status_with_host(
            api,
            "GET",
            "/api/v1/instances",
            Some(&format!("127.0.0.1:{api}"))
        )
        .await,
        421
    );
}

/// `writes` is an instance field: off unless asked for, shown back, validated.
#[tokio::test]
async fn writes_are_off_unless_asked_for() {
    let data = tempfile::tempdir().unwrap();
    let local = local_backend(data.path(), short_ttls()).await;
    let base = spawn_api(&local, None, Quotas::default()).await;
    let c = http();
    let body = |workload: &str, writes: Option<Value>| {
        let mut b = json!({"workload": workload, "artifacts": {"url": "file:///nonexistent/job.tgz", "sha256": "0".repeat(64)}});
        if let Some(w) = writes {
            b["writes"] = w;
        }
        b
    };
    let r = c
        .post(format!("{base}/api/v1/instances"))
        .json(&body("w1", None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.json::<Value>().await.unwrap()["writes"], false);
    let r = c
        .post(format!("{base}/api/v1/instances"))
        .json(&body("w2", Some(json!(true))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    assert_eq!(created["writes"], true);
    let got: Value = c
        .get(format!(
            "{base}/api/v1/instances/{}",
            created["id"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["writes"], true);
    let r = c
        .post(format!("{base}/api/v1/instances"))
        .json(&body("w3", Some(json!("yes"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let doc = get_json(&c, &format!("{base}/api/v1/openapi.json")).await;
    assert_eq!(
        doc["components"]["schemas"]["CreateBody"]["properties"]["writes"]["type"],
        "boolean"
    );
}

/// Reads until the server closes the connection (EOF or reset); how long that took.
async fn closed_within(s: &mut tokio::net::TcpStream, limit: Duration) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let start = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return start.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

/// The REST API's connections are bounded like the adapter's: a client that
/// says nothing, or half an HTTP/2 preface, is closed; connections beyond the
/// cap are refused (and counted); a request whose body never finishes gets a
/// JSON 504 instead of holding its connection for ever.
#[tokio::test]
async fn api_connections_and_slow_requests_are_bounded() {
    use tokio::io::AsyncWriteExt;
    let data = tempfile::tempdir().unwrap();
    let (_serve, api, _) = serve_binary(
        data.path(),
        &[
            "--api-idle-timeout",
            "1s",
            "--request-timeout",
            "1s",
            "--api-max-connections",
            "3",
        ],
    )
    .await;
    let connect = || tokio::net::TcpStream::connect(("127.0.0.1", api));

    let mut silent = connect().await.unwrap();
    let mut half = connect().await.unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    // the third fills the cap: a fourth is closed at once
    let mut third = connect().await.unwrap();
    let mut fourth = connect().await.unwrap();
    let refused = closed_within(&mut fourth, Duration::from_secs(10)).await;
    assert!(
        refused.is_some_and(|t| t < Duration::from_millis(900)),
        "a connection beyond --api-max-connections stays open: {refused:?}"
    );
    for (what, s) in [
        ("silent", &mut silent),
        ("half preface", &mut half),
        ("third", &mut third),
    ] {
        let closed = closed_within(s, Duration::from_secs(10)).await;
        assert!(closed.is_some(), "a {what} connection stays open");
    }

    // a body announced and never sent
    let mut slow = connect().await.unwrap();
    slow.write_all(
        format!(
            "POST /api/v1/instances HTTP/1.1\r\nHost: 127.0.0.1:{api}\r\n\
             Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"owner\":"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let answered = tokio::time::timeout(Duration::from_secs(10), async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&out).contains("\"timeout\"") {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&out);
    assert!(
        answered.is_ok(),
        "a trickled body holds its request: {text}"
    );
    assert!(text.starts_with("HTTP/1.1 504"), "{text}");
    assert!(text.contains("\"error\":\"timeout\""), "{text}");

    let metrics = http()
        .get(format!("http://127.0.0.1:{api}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} not in {metrics}"))
    };
    assert!(value("flowgate_api_refused_connections_total") >= 1.0);
    assert!(value("flowgate_api_idle_closed_connections_total") >= 2.0);
}

/// Guessing ids on the local listener: past `--guess-limit` unknown ids in a
/// minute a client gets 429 (with Retry-After) for every instance path;
/// another client is not affected.
#[tokio::test]
async fn guessing_ids_is_slowed_down() {
    let data = tempfile::tempdir().unwrap();
    let (_serve, _api, inst) = serve_binary(data.path(), &["--guess-limit", "5"]).await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let from = |ip: &str| {
        reqwest::Client::builder()
            .local_address(ip.parse::<std::net::IpAddr>().unwrap())
            .build()
            .unwrap()
    };
    let guesser = from("127.0.0.1");
    let url = |id: &str| format!("http://127.0.0.1:{inst}/{id}/");
    for i in 0..5 {
        let r = guesser
            .get(url(&format!("zzzzzz{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "guess {i}");
    }
    let r = guesser.get(url("zzzzzz9")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    let r = guesser.get(url("yyyyyyy")).send().await.unwrap();
    assert_eq!(r.status(), 429, "every instance path, not only unknown ids");
    let probe = guesser
        .get(format!("http://127.0.0.1:{inst}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(probe.status(), 200);
    // another address still gets honest answers
    let other = from("127.0.0.2");
    let r = other.get(url("zzzzzz9")).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

/// Serves `path` over HTTP on loopback only to `Authorization: Bearer
/// <token>` (401 otherwise); returns its URL and the Authorization headers seen.
async fn serve_file_with_token(
    path: &Path,
    token: &'static str,
) -> (String, Arc<std::sync::Mutex<Vec<Option<String>>>>) {
    let bytes = std::fs::read(path).unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/private.tgz",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let bytes = bytes.clone();
            let auth = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            log.lock().unwrap().push(auth.clone());
            async move {
                if auth.as_deref() == Some(&*format!("Bearer {token}")) {
                    Ok(bytes)
                } else {
                    Err(axum::http::StatusCode::UNAUTHORIZED)
                }
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/private.tgz"), seen)
}

/// A private archive behind a token loads on the local backend with a
/// credentials set the server grants the owner; a set it does not grant is
/// a 403, and a token the archive's server refuses fails the instance with
/// that reason (and never the token).
#[tokio::test]
async fn private_archives_load_with_granted_credentials() {
    let (archive, sha) = store_archive();
    let (url, seen) = serve_file_with_token(archive, "panda-s3cret").await;
    let data = tempfile::tempdir().unwrap();
    let root = data.path().join("credentials");
    let origin = url.trim_end_matches("/private.tgz").to_owned();
    for (set, token) in [("panda-token", "panda-s3cret\n"), ("stale", "old-s3cret")] {
        std::fs::create_dir_all(root.join(set)).unwrap();
        std::fs::write(root.join(set).join("token"), token).unwrap();
        // where the token may go: the archive server's origin only
        std::fs::write(root.join(set).join("origins"), format!("{origin}\n")).unwrap();
    }
    let (_serve, api, instances) = serve_binary(
        data.path(),
        &[
            "--allow-credentials",
            "panda-token=alice,stale",
            "--guess-limit",
            "1000",
        ],
    )
    .await;
    let base = format!("http://127.0.0.1:{api}");
    let c = http();
    let create = |workload: &str, owner: &str, credentials: Option<&str>| {
        let mut body = json!({"workload": workload, "owner": owner, "access": "public",
            "artifacts": {"url": url, "sha256": sha}});
        if let Some(name) = credentials {
            body["credentials"] = json!(name);
        }
        c.post(format!("{base}/api/v1/instances"))
            .json(&body)
            .send()
    };

    // Not granted to bob, and a name granted to nobody: the same 403.
    for (owner, name) in [("bob", "panda-token"), ("alice", "kube-system-token")] {
        let r = create("job-p", owner, Some(name)).await.unwrap();
        assert_eq!(r.status(), 403, "{owner} {name}");
    }
    // Without credentials the archive's server says no, and the instance says why.
    let anonymous: Value = create("job-a", "alice", None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = anonymous["id"].as_str().unwrap();
    let (last, ev) = events(&base, id, None).await.pop().unwrap();
    assert_eq!(last, "failed");
    assert!(
        ev["message"]
            .as_str()
            .unwrap()
            // which servers want credentials is not told to callers
            .contains("could not be downloaded"),
        "{ev}"
    );

    let r = create("job-p", "alice", Some("panda-token")).await.unwrap();
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    assert_eq!(created["credentials"], "panda-token");
    let id = created["id"].as_str().unwrap();
    let (last, ev) = events(&base, id, None).await.pop().unwrap();
    assert_eq!(last, "ready", "{ev}");
    let page = c
        .get(format!("http://127.0.0.1:{instances}/{id}/ajax-api/2.0/mlflow/experiments/search?max_results=10"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("flowgate-demo"));

    let stale: Value = create("job-s", "carol", Some("stale"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = stale["id"].as_str().unwrap();
    let (last, ev) = events(&base, id, None).await.pop().unwrap();
    assert_eq!(last, "failed");
    let message = ev["message"].as_str().unwrap();
    assert!(
        message.contains("refused access with the credentials given"),
        "{message}"
    );
    let got = get_json(&c, &format!("{base}/api/v1/instances/{id}")).await;
    assert!(!got.to_string().contains("s3cret"), "{got}");

    let seen = seen.lock().unwrap().clone();
    assert!(seen.contains(&None));
    assert!(seen.contains(&Some("Bearer panda-s3cret".into())));
    assert!(seen.contains(&Some("Bearer old-s3cret".into())));
}

/// Whether an MLflow server of instance `id` runs (found by its store's path).
fn mlflow_runs(id: &str) -> bool {
    std::process::Command::new("pgrep")
        .args(["-f", &format!("mlflow.* server .*instances/{id}/")])
        .status()
        .unwrap()
        .success()
}

/// Waits until instance `id` is in `phase`.
async fn until_phase(c: &reqwest::Client, base: &str, id: &str, phase: &str) -> Value {
    for _ in 0..240 {
        let now = get_json(c, &format!("{base}/api/v1/instances/{id}")).await;
        if now["phase"] == phase {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("{id} never {phase}");
}

/// The waking page's view of a wake: `(state, steps)`.
async fn wake_status(c: &reqwest::Client, instances: &str, id: &str) -> (String, Vec<String>) {
    let v = get_json(c, &format!("{instances}/{id}/.flowgate/wake")).await;
    let steps = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    (v["state"].as_str().unwrap().to_owned(), steps)
}

/// Idle instances sleep (MLflow stopped, same id and URL); a page visit
/// wakes them once however many visit at once; other requests get 503 and
/// wake nothing; a `link` instance wakes only for a signed-in visitor; a
/// store that changed while asleep fails the wake with its reason shown.
#[tokio::test]
async fn idle_instances_sleep_and_a_visit_wakes_them() {
    let data = tempfile::tempdir().unwrap();
    let supervision = provisioner::local::supervisor::Supervision {
        idle_after: Some(Duration::from_secs(2)),
        ..Default::default()
    };
    let local = local_backend_with(data.path(), short_ttls(), supervision).await;
    let base = spawn_api(&local, None, Quotas::default()).await;
    let c = http();
    let created = create_job(&c, &base, "sleepy", json!({"access": "public"})).await;
    let id = created["id"].as_str().unwrap().to_owned();
    let url = created["url"].as_str().unwrap().to_owned();
    // One that never sleeps (its own idle_after), and one too eager.
    let awake = create_job(
        &c,
        &base,
        "awake",
        json!({"access": "public", "idle_after": "0"}),
    )
    .await;
    assert_eq!(awake["idle_after"], "0");
    let awake_id = awake["id"].as_str().unwrap().to_owned();
    let eager = c
        .post(format!("{base}/api/v1/instances"))
        .json(&json!({"workload": "eager", "idle_after": "1s",
            "artifacts": {"url": "file:///nonexistent.tgz", "sha256": "0".repeat(64)}}))
        .send()
        .await
        .unwrap();
    assert_eq!(eager.status(), 400);
    assert_eq!(events(&base, &id, None).await.last().unwrap().0, "ready");
    assert_eq!(
        events(&base, &awake_id, None).await.last().unwrap().0,
        "ready"
    );
    assert!(mlflow_runs(&id));

    // Nobody visits: it sleeps, and its MLflow is gone.
    let asleep = until_phase(&c, &base, &id, "Sleeping").await;
    assert_eq!(asleep["url"], url.as_str());
    assert!(!mlflow_runs(&id), "MLflow still runs while Sleeping");
    assert_eq!(
        get_json(&c, &format!("{base}/api/v1/instances/{awake_id}")).await["phase"],
        "Ready"
    );
    assert!(mlflow_runs(&awake_id));
    let (last, _) = events(&base, &id, None).await.pop().unwrap();
    assert_eq!(last, "sleeping");

    // An API call or a script does not wake it.
    let r = c
        .get(format!(
            "{url}ajax-api/2.0/mlflow/experiments/search?max_results=1"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        get_json(&c, &format!("{base}/api/v1/instances/{id}")).await["phase"],
        "Sleeping"
    );

    // Ten browsers at once: each gets the waking page, MLflow starts once.
    let visits = (0..10).map(|_| {
        c.get(format!("{url}#/experiments/1"))
            .header("accept", "text/html,application/xhtml+xml")
            .send()
    });
    for r in futures_util::future::join_all(visits).await {
        let r = r.unwrap();
        assert_eq!(r.status(), 503);
        assert!(r.text().await.unwrap().contains("Waking up"));
    }
    let mut state = String::new();
    let mut steps = Vec::new();
    for _ in 0..240 {
        (state, steps) = wake_status(&c, &local.instances, &id).await;
        if state == "ready" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(state, "ready", "{steps:?}");
    assert_eq!(
        steps.iter().filter(|s| *s == "woken by a visit").count(),
        1,
        "{steps:?}"
    );
    let woke: Vec<String> = events(&base, &id, None)
        .await
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(woke, ["waking", "starting", "ready"]);
    assert!(mlflow_runs(&id));
    let page = c
        .get(&url)
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("static-files/"));
    let again = get_json(&c, &format!("{base}/api/v1/instances/{id}")).await;
    assert_eq!(
        (again["id"].as_str(), again["url"].as_str()),
        (Some(id.as_str()), Some(url.as_str()))
    );

    // Asleep again; its store is gone meanwhile: the wake fails, and says why.
    until_phase(&c, &base, &id, "Sleeping").await;
    std::fs::remove_file(
        local
            .data
            .join("instances")
            .join(&id)
            .join("store")
            .join(adapter::fetch::MARKER),
    )
    .unwrap();
    c.get(&url)
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    let failed = until_phase(&c, &base, &id, "Failed").await;
    assert!(
        failed["message"]
            .as_str()
            .unwrap()
            .contains("changed or went missing"),
        "{failed}"
    );
    let (mut state, mut steps) = wake_status(&c, &local.instances, &id).await;
    for _ in 0..20 {
        if steps.last().is_some_and(|s| s.contains("changed")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        (state, steps) = wake_status(&c, &local.instances, &id).await;
    }
    assert_eq!(state, "failed");
    assert!(
        // the reason leads what the page says (its last step)
        steps.last().unwrap().contains("changed or went missing"),
        "{steps:?}"
    );
    assert!(!mlflow_runs(&id));

    // A `link` instance: a stranger's visit does not wake it.
    let link = create_job(&c, &base, "sleepy-link", json!({})).await;
    let link_id = link["id"].as_str().unwrap().to_owned();
    assert_eq!(
        events(&base, &link_id, None).await.last().unwrap().0,
        "ready"
    );
    until_phase(&c, &base, &link_id, "Sleeping").await;
    let stranger = c
        .get(link["url"].as_str().unwrap())
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(stranger.status(), 401);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        get_json(&c, &format!("{base}/api/v1/instances/{link_id}")).await["phase"],
        "Sleeping"
    );
    // nor may a stranger follow its wake
    let status = c
        .get(format!("{}/{link_id}/.flowgate/wake", local.instances))
        .send()
        .await
        .unwrap();
    assert_eq!(status.status(), 401);
    // Its access link signs the browser in; the visit with the cookie wakes it.
    let fresh = get_json(&c, &format!("{base}/api/v1/instances/{link_id}")).await;
    let (cookie, location) = sign_in(fresh["access_url"].as_str().unwrap()).await;
    let visit = c
        .get(format!("{}{location}", local.instances))
        .header("accept", "text/html")
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert!(visit.text().await.unwrap().contains("Waking up"));
    until_phase(&c, &base, &link_id, "Ready").await;
    local.backend.stop_all().await;
}

/// A server stopped while an instance sleeps finds it asleep at its next
/// start (no MLflow started for it), and a visit still wakes it.
#[tokio::test]
async fn a_sleeping_instance_stays_asleep_across_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let supervision = || provisioner::local::supervisor::Supervision {
        idle_after: Some(Duration::from_secs(2)),
        ..Default::default()
    };
    let local = local_backend_with(data.path(), short_ttls(), supervision()).await;
    let base = spawn_api(&local, None, Quotas::default()).await;
    let c = http();
    let created = create_job(&c, &base, "nap", json!({"access": "public"})).await;
    let id = created["id"].as_str().unwrap().to_owned();
    until_phase(&c, &base, &id, "Sleeping").await;
    local.backend.stop_all().await;
    // MLflow writes its log as it starts: the log stays as it was.
    let log = data.path().join("instances").join(&id).join("mlflow.log");
    let before = std::fs::read(&log).unwrap();

    let again = local_backend_with(data.path(), short_ttls(), supervision()).await;
    let base = spawn_api(&again, None, Quotas::default()).await;
    let asleep = until_phase(&c, &base, &id, "Sleeping").await;
    assert_eq!(
        asleep["url"].as_str().unwrap(),
        format!("{}/{id}/", again.instances)
    );
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !mlflow_runs(&id),
            "MLflow was started for a sleeping instance"
        );
    }
    assert_eq!(std::fs::read(&log).unwrap(), before, "MLflow ran again");
    let visit = c
        .get(format!("{}/{id}/", again.instances))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert!(visit.text().await.unwrap().contains("Waking up"));
    until_phase(&c, &base, &id, "Ready").await;
    assert!(mlflow_runs(&id));
    again.backend.stop_all().await;
}
