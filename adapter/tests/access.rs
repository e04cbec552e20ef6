//! `link` access in front of a real upstream that counts what reaches it:
//! without a valid link or cookie nothing is forwarded; a link becomes a
//! cookie for the instance's path and a redirect without the token; the
//! cookie itself is never forwarded; the own endpoints stay open; the wake
//! status a waking page follows is answered behind the gate.

mod common;

use adapter::access::Keys;
use common::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

fn forwarded() -> usize {
    UPSTREAM_REQUESTS.load(Ordering::SeqCst)
}

#[tokio::test]
async fn only_a_link_or_its_cookie_reaches_the_upstream() {
    let upstream = start_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("keys");
    std::fs::write(&key_file, format!("# test\n{}\n", "s".repeat(48))).unwrap();
    let keys = Keys::load(&key_file).unwrap();
    let proxy = adapter(upstream).access_keys(&key_file).start().await;
    let c = client();
    let id = PREFIX.trim_start_matches('/');
    let now = SystemTime::now();

    // Nothing valid: 401, HTML for a browser, JSON otherwise; not forwarded.
    let before = forwarded();
    let r = c
        .get(proxy.url(&format!("{PREFIX}/")))
        .header("accept", "text/html,application/xhtml+xml")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert!(r.text().await.unwrap().contains("access link"));
    let r = c
        .get(proxy.url(&format!("{PREFIX}/echo")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let other_session = keys.session_token("bcdefgh", now + Duration::from_secs(600));
    for cookie in [
        "flowgate_access=".to_owned(),
        "flowgate_access=123.abc".to_owned(),
        format!("flowgate_access={other_session}"),
        format!(
            "flowgate_access={}",
            keys.session_token(id, now - Duration::from_secs(1))
        ),
    ] {
        let r = c
            .get(proxy.url(&format!("{PREFIX}/echo")))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{cookie}");
    }
    let expired = keys.link_token(
        id,
        now - Duration::from_secs(1),
        now + Duration::from_secs(600),
    );
    let r = c
        .get(proxy.url(&format!("{PREFIX}/?flowgate_access={expired}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("expired"));
    // a write is refused as unauthenticated, not as read-only
    let r = c
        .post(proxy.url(&format!("{PREFIX}/ajax-api/2.0/mlflow/runs/delete")))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        forwarded(),
        before,
        "a refused request reached the upstream"
    );

    // The own endpoints stay open (probes, metrics).
    let metrics = proxy.metrics().await;
    assert!(
        metric(
            &metrics,
            "flowgate_adapter_refused_requests_total{reason=\"access\"}"
        ) >= 8.0
    );
    assert_eq!(
        c.get(proxy.url("/healthz")).send().await.unwrap().status(),
        200
    );

    // A link: the cookie, and the same URL without the token (other query kept).
    let link = keys.link_token(
        id,
        now + Duration::from_secs(60),
        now + Duration::from_secs(3600),
    );
    let r = c
        .get(proxy.url(&format!("{PREFIX}/echo?a=1&flowgate_access={link}&b=2")))
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], format!("{PREFIX}/echo?a=1&b=2"));
    assert_eq!(r.headers()["referrer-policy"], "no-referrer");
    let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(set.contains(&format!("Path={PREFIX}/")), "{set}");
    assert!(set.contains("; Secure"), "behind https: {set}");
    let max_age: u64 = set
        .split("Max-Age=")
        .nth(1)
        .and_then(|v| v.split(';').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (3590..=3600).contains(&max_age),
        "the session lasts until the instance expires: {max_age}"
    );
    assert_eq!(forwarded(), before, "the exchange itself is not forwarded");

    // With the cookie: forwarded, without our cookie (the app's own cookies kept).
    let session = set.split(';').next().unwrap();
    let r = c
        .get(proxy.url(&format!("{PREFIX}/echo")))
        .header("cookie", format!("mlflow=1; {session}; other=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let echoed: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(echoed["headers"]["cookie"], "mlflow=1; other=2");
    let r = c
        .get(proxy.url(&format!("{PREFIX}/echo")))
        .header("cookie", session)
        .send()
        .await
        .unwrap();
    let echoed: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert!(echoed["headers"].get("cookie").is_none(), "{echoed}");
    assert_eq!(forwarded(), before + 2);

    // The wake status a waking page follows: the gate's like everything under
    // the prefix, then answered `ready` by the adapter itself, not forwarded.
    let wake = proxy.url(&format!("{PREFIX}{}", adapter::proxy::WAKE_STATUS_PATH));
    assert_eq!(c.get(&wake).send().await.unwrap().status(), 401);
    let r = c.get(&wake).header("cookie", session).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let status: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(status["state"], "ready");
    assert_eq!(
        forwarded(),
        before + 2,
        "the wake status reached the upstream"
    );
    proxy.stop().await;
}
