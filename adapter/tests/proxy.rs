//! The adapter in-process in front of a real HTTP upstream on loopback: every
//! proxy behaviour a browser or the kubelet would notice.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn setup() -> Adapter {
    adapter(start_upstream().await).start().await
}

async fn echo(a: &Adapter, req: reqwest::RequestBuilder) -> serde_json::Value {
    let _ = a;
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
}

#[tokio::test]
async fn strips_the_prefix_and_keeps_the_query() {
    let a = setup().await;
    let v = echo(&a, client().get(a.url("/k3x9q2a/echo?a=1&b=%2F"))).await;
    assert_eq!(v["uri"], "/echo?a=1&b=%2F");
}

#[tokio::test]
async fn bare_prefix_redirects_into_it() {
    let a = setup().await;
    let resp = client().get(a.url("/k3x9q2a?x=1")).send().await.unwrap();
    assert_eq!(resp.status(), 308);
    assert_eq!(resp.headers()["location"], "/k3x9q2a/?x=1");
}

#[tokio::test]
async fn outside_the_prefix_is_404_and_never_forwarded() {
    let a = setup().await;
    for path in [
        "/",
        "/echo",
        "/k3x9q2ax/echo",
        "/k3x9q2",
        "/other/k3x9q2a/echo",
    ] {
        let resp = client().get(a.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 404, "{path}");
        assert!(
            resp.text()
                .await
                .unwrap()
                .contains("this adapter serves /k3x9q2a/"),
            "{path}"
        );
    }
}

#[tokio::test]
async fn upstream_sees_its_own_host_and_forwarded_headers() {
    let a = adapter(start_upstream().await).writes_on().start().await;
    let public = format!("mlflow.example.test:{}", a.addr.port());
    let v = echo(
        &a,
        client()
            .post(a.url("/k3x9q2a/echo"))
            .header("host", &public)
            .header("origin", format!("http://{public}"))
            .header(
                "referer",
                format!("http://{public}/k3x9q2a/#/experiments/1"),
            )
            .body("{\"a\":1}"),
    )
    .await;
    let h = &v["headers"];
    let upstream_host = h["host"].as_str().unwrap();
    assert!(upstream_host.starts_with("127.0.0.1:"), "{v}");
    assert_eq!(h["origin"], format!("http://{upstream_host}"));
    assert_eq!(
        h["referer"],
        format!("http://{upstream_host}/#/experiments/1")
    );
    assert_eq!(h["x-forwarded-host"], public);
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-prefix"], "/k3x9q2a");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(v["body"], "{\"a\":1}");
    assert_eq!(v["method"], "POST");
}

#[tokio::test]
async fn cross_site_origin_is_not_laundered() {
    let a = adapter(start_upstream().await).writes_on().start().await;
    let v = echo(
        &a,
        client()
            .post(a.url("/k3x9q2a/echo"))
            .header("host", "mlflow.example.test")
            .header("origin", "https://evil.example"),
    )
    .await;
    assert_eq!(v["headers"]["origin"], "https://evil.example");
}

#[tokio::test]
async fn redirects_and_cookies_get_the_prefix_back() {
    let a = setup().await;
    let r = client()
        .get(a.url("/k3x9q2a/redirect"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], "/k3x9q2a/target?x=1");
    let r = client()
        .get(a.url("/k3x9q2a/redirect-abs"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["location"], "/k3x9q2a/abs");
    let r = client().get(a.url("/k3x9q2a/cookie")).send().await.unwrap();
    let cookies: Vec<_> = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        cookies,
        [
            "sid=1; Path=/k3x9q2a/; HttpOnly",
            "pref=2; Path=/k3x9q2a/ajax-api"
        ]
    );
}

#[tokio::test]
async fn html_css_and_app_bundles_are_rewritten() {
    let a = setup().await;
    let c = client();
    let r = c.get(a.url("/k3x9q2a/page.html")).send().await.unwrap();
    assert!(r.headers().get("content-length").is_none());
    assert_eq!(r.text().await.unwrap(), PAGE_HTML_REWRITTEN);
    let css = c
        .get(a.url("/k3x9q2a/main.css"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        css,
        "a{background:url(/k3x9q2a/img/a.png)} b{background:url(//cdn/x.png)}"
    );
    let js = c
        .get(a.url("/k3x9q2a/static-files/app.js"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(js, APP_JS_REWRITTEN);
}

#[tokio::test]
async fn artifacts_pass_byte_identical_even_when_html() {
    let a = setup().await;
    for path in [
        "/k3x9q2a/get-artifact?path=report.html",
        "/k3x9q2a/ajax-api/2.0/mlflow-artifacts/artifacts/0/r/artifacts/report.html",
    ] {
        let r = client()
            .get(a.url(path))
            .header("accept-encoding", "gzip, br, zstd")
            .send()
            .await
            .unwrap();
        assert!(r.headers().get("content-encoding").is_none(), "{path}");
        assert_eq!(
            r.headers()["content-length"],
            ARTIFACT_HTML.len().to_string().as_str()
        );
        assert_eq!(r.text().await.unwrap(), ARTIFACT_HTML, "{path}");
    }
}

#[tokio::test]
async fn compressed_upstream_html_is_decoded_rewritten_and_reencoded() {
    let a = setup().await;
    for (path, accept, want_coding) in [
        ("/k3x9q2a/gzip.html", "gzip", Some("gzip")),
        ("/k3x9q2a/br.html", "br", Some("br")),
        (
            "/k3x9q2a/gzip.html",
            "gzip, deflate, br, zstd",
            Some("zstd"),
        ),
        ("/k3x9q2a/br.html", "br, deflate", Some("br")),
    ] {
        let r = client()
            .get(a.url(path))
            .header("accept-encoding", accept)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let coding = r
            .headers()
            .get("content-encoding")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(coding.as_deref(), want_coding, "{path} with {accept}");
        if path.ends_with("gzip.html") {
            assert_eq!(r.headers()["etag"], "W/\"abc\"");
        }
        assert!(
            r.headers()["vary"]
                .to_str()
                .unwrap()
                .contains("accept-encoding")
        );
        let body = r.bytes().await.unwrap();
        let text = decode(want_coding.unwrap(), &body).await;
        assert_eq!(
            String::from_utf8(text).unwrap(),
            PAGE_HTML_REWRITTEN,
            "{path} with {accept}"
        );
    }
}

#[tokio::test]
async fn plain_text_responses_are_compressed_for_clients_that_accept_it() {
    let a = setup().await;
    let plain = client().get(a.url("/k3x9q2a/json")).send().await.unwrap();
    assert!(plain.headers().get("content-encoding").is_none());
    let want = plain.bytes().await.unwrap();
    for coding in ["gzip", "br", "zstd", "deflate"] {
        let r = client()
            .get(a.url("/k3x9q2a/json"))
            .header("accept-encoding", coding)
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["content-encoding"], coding);
        let body = r.bytes().await.unwrap();
        assert!(
            body.len() < want.len() / 3,
            "{coding}: {} of {}",
            body.len(),
            want.len()
        );
        assert_eq!(decode(coding, &body).await, want, "{coding}");
    }
    // Not worth it for tiny bodies; never for HEAD.
    let tiny = client()
        .get(a.url("/k3x9q2a/tiny.json"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert!(tiny.headers().get("content-encoding").is_none());
    let head = client()
        .head(a.url("/k3x9q2a/json"))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert!(head.headers().get("content-encoding").is_none());
}

#[tokio::test]
async fn large_html_streams_through_the_rewriter() {
    let a = setup().await;
    let text = client()
        .get(a.url("/k3x9q2a/big.html"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let links = text.matches("href=\"/k3x9q2a/run/x\"").count();
    assert!(links > 100_000, "{links}");
    assert_eq!(text.matches("href=\"/run/x\"").count(), 0);
}

/// A burst of compressed responses: one zstd/brotli encoder per eighth of
/// `--max-encoders`, gzip for the rest of the slots, then identity; every
/// body still decodes to the same bytes, and the sheds are counted.
#[tokio::test]
async fn compression_degrades_under_a_burst_instead_of_growing() {
    let upstream = start_upstream().await;
    let a = adapter(upstream).max_encoders(8).start().await;
    let c = client();
    // responses whose bodies are not read yet keep their encoder busy
    let mut held = Vec::new();
    for _ in 0..10 {
        let r = c
            .get(a.url("/k3x9q2a/trickle.json"))
            .header("accept-encoding", "zstd, gzip")
            .send()
            .await
            .unwrap();
        held.push(r);
    }
    let codings: Vec<String> = held
        .iter()
        .map(|r| {
            r.headers()
                .get("content-encoding")
                .map_or("identity".into(), |v| v.to_str().unwrap().to_owned())
        })
        .collect();
    let mut want = vec!["zstd".to_owned()];
    want.extend(std::iter::repeat_n("gzip".to_owned(), 7));
    want.extend(std::iter::repeat_n("identity".to_owned(), 2));
    assert_eq!(codings, want);
    let mut bodies = Vec::new();
    for (r, coding) in held.into_iter().zip(&codings) {
        let raw = r.bytes().await.unwrap();
        bodies.push(if coding == "identity" {
            raw.to_vec()
        } else {
            decode(coding, &raw).await
        });
    }
    assert!(bodies.iter().all(|b| b == &bodies[0] && b.len() > 60_000));
    let metrics = a.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "flowgate_adapter_compression_shed_total{to=\"light\"}"
        ),
        7.0
    );
    assert_eq!(
        metric(
            &metrics,
            "flowgate_adapter_compression_shed_total{to=\"identity\"}"
        ),
        2.0
    );
    // once they are done, the slots are free again
    let r = c
        .get(a.url("/k3x9q2a/trickle.json"))
        .header("accept-encoding", "zstd, gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-encoding"], "zstd");
}

#[tokio::test]
async fn server_sent_events_arrive_as_produced() {
    let a = setup().await;
    let start = Instant::now();
    let mut r = client()
        .get(a.url("/k3x9q2a/sse"))
        .header("accept-encoding", "gzip, br, zstd")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("content-encoding").is_none());
    let first = r.chunk().await.unwrap().unwrap();
    let first_at = start.elapsed();
    assert_eq!(&first[..], b"data: event 0\n\n");
    // The upstream waits 400 ms between events; a buffering proxy would hold
    // the first until the end (800 ms).
    assert!(
        first_at < Duration::from_millis(350),
        "first event after {first_at:?}"
    );
    let mut rest = Vec::new();
    while let Some(c) = r.chunk().await.unwrap() {
        rest.extend_from_slice(&c);
    }
    assert_eq!(rest, b"data: event 1\n\ndata: event 2\n\n");
}

/// An event stream (or a long download) counts as activity while it is open
/// and when it ends, not only when it starts: idle culling must not put an
/// instance to sleep under a reader.
#[tokio::test]
async fn an_open_event_stream_is_activity_until_it_ends() {
    let a = setup().await;
    let metric = |text: &str, name: &str| -> i64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} in {text}"))
            .trim()
            .parse()
            .unwrap()
    };
    let scrape = || async { a.metrics().await };
    let mut r = client().get(a.url("/k3x9q2a/sse")).send().await.unwrap();
    r.chunk().await.unwrap().unwrap();
    let during = scrape().await;
    assert_eq!(metric(&during, "flowgate_adapter_open_response_bodies"), 1);
    assert_eq!(metric(&during, "flowgate_adapter_in_flight_requests"), 0);
    let started = metric(&during, "flowgate_adapter_last_activity_timestamp_seconds");
    while r.chunk().await.unwrap().is_some() {}
    // the stream lasts 2 s; its end is the last activity
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = scrape().await;
    assert_eq!(metric(&after, "flowgate_adapter_open_response_bodies"), 0);
    let ended = metric(&after, "flowgate_adapter_last_activity_timestamp_seconds");
    assert!(ended > started, "{started} -> {ended}");
}

#[tokio::test]
async fn upgrades_are_tunnelled() {
    let a = setup().await;
    let mut s = tokio::net::TcpStream::connect(a.addr).await.unwrap();
    s.write_all(
        b"GET /k3x9q2a/ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = vec![0u8; 1024];
    let n = s.read(&mut head).await.unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: echo"),
        "{head}"
    );
    s.write_all(b"ping through the tunnel").await.unwrap();
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"ping through the tunnel");
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let a = setup().await;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = c.get(a.url("/k3x9q2a/page.html")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.text().await.unwrap(), PAGE_HTML_REWRITTEN);
}

#[tokio::test]
async fn dead_upstream_is_a_502_page_with_retry_after() {
    let a = adapter(format!("127.0.0.1:{}", free_port()).parse().unwrap())
        .start()
        .await;
    let r = client().get(a.url("/k3x9q2a/")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["retry-after"], "5");
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(r.text().await.unwrap().contains("not answering yet"));
    let ready = client().get(a.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let health = client().get(a.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let metrics = a.metrics().await;
    assert!(
        metrics.contains(r#"flowgate_adapter_upstream_errors_total{kind="connect"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn slow_upstream_is_a_504() {
    let a = adapter(start_upstream().await)
        .upstream_timeout(Duration::from_millis(300))
        .start()
        .await;
    let r = client().get(a.url("/k3x9q2a/slow")).send().await.unwrap();
    assert_eq!(r.status(), 504);
}

#[tokio::test]
async fn garbage_from_the_client_is_a_400() {
    let a = setup().await;
    let mut s = tokio::net::TcpStream::connect(a.addr).await.unwrap();
    s.write_all(b"THIS IS NOT HTTP\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 400"), "{text:?}");
    // A head larger than the bound is refused too, and the adapter lives on.
    let mut s = tokio::net::TcpStream::connect(a.addr).await.unwrap();
    let huge = format!(
        "GET /k3x9q2a/echo HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    let _ = s.write_all(huge.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431") || text.starts_with("HTTP/1.1 400"),
        "{text:?}"
    );
    assert_eq!(
        client()
            .get(a.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn own_endpoints_live_outside_the_prefix() {
    let a = setup().await;
    let c = client();
    assert_eq!(
        c.get(a.url("/healthz"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "ok\n"
    );
    // The test upstream has no /health, but it answers (404): it is up.
    assert_eq!(c.get(a.url("/readyz")).send().await.unwrap().status(), 200);
    let _ = c
        .get(a.url("/k3x9q2a/page.html"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let m = a.metrics().await;
    assert!(
        m.contains(r#"flowgate_adapter_requests_total{route="ui",status="2xx"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"flowgate_adapter_rewrites_total{kind="html"} 1"#),
        "{m}"
    );
    assert!(m.contains("flowgate_adapter_last_activity_timestamp_seconds"));
    assert!(m.contains("flowgate_adapter_response_header_seconds_bucket"));
    // Inside the prefix they are the app's paths, forwarded.
    assert_eq!(
        c.get(a.url("/k3x9q2a/healthz"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "upstream 404"
    );
}

#[tokio::test]
async fn rewrite_off_passes_paths_and_bodies_untouched() {
    let a = adapter(start_upstream().await).rewrite_off().start().await;
    let c = client();
    // The app was started with its own prefix, so it sees the full path.
    let r = c.get(a.url("/k3x9q2a/echo")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "upstream 404");
    let a2 = adapter(start_upstream().await).rewrite_off().start().await;
    let r = c.get(a2.url("/k3x9q2a/page.html")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        c.get(a2.url("/outside")).send().await.unwrap().status(),
        404
    );
    a.stop().await;
}

const SANDBOXED: &str = "sandbox";

/// Every spelling of an artefact path that the app routes as one is one:
/// byte-identical, never rewritten, sandboxed.
#[tokio::test]
async fn artefacts_are_artefacts_however_they_are_spelled() {
    let a = setup().await;
    for target in [
        "/k3x9q2a/get-artifact?path=report.html",
        "/k3x9q2a/%67et-artifact?path=report.html",
        "/k3x9q2a/%67%65%74-artifact?path=report.html",
        "/k3x9q2a//get-artifact?path=report.html",
        "/k3x9q2a/%2Fget-artifact?path=report.html",
        "/k3x9q2a/static-files/../get-artifact?path=report.html",
        "/k3x9q2a/x/%2e%2E/get-artifact?path=report.html",
        "/k3x9q2a/./get-artifact?path=report.html",
        "/k3x9q2a/ajax-api/2.0/mlflow-%61rtifacts/%61rtifacts/0/r/artifacts/report.html",
        "/k3x9q2a/ajax-api/2.0/mlflow-artifacts/artifacts/0/r/artifacts/./report.html",
    ] {
        let r = raw_request(a.addr, "GET", target, &[("Accept-Encoding", "gzip, br")]).await;
        assert_eq!(r.status, 200, "{target}: {}", r.text());
        assert_eq!(r.text(), ARTIFACT_HTML, "{target}");
        assert_eq!(r.header("content-encoding"), None, "{target}");
        assert_eq!(r.all("content-security-policy"), [SANDBOXED], "{target}");
        assert_eq!(r.all("x-content-type-options"), ["nosniff"], "{target}");
    }
    // A UI page is rewritten and not sandboxed.
    let r = raw_request(a.addr, "GET", "/k3x9q2a/%70age.html", &[]).await;
    assert_eq!(r.text(), PAGE_HTML_REWRITTEN);
    assert!(r.header("content-security-policy").is_none());
}

#[tokio::test]
async fn paths_are_forwarded_as_the_app_will_route_them() {
    let a = setup().await;
    let uri = |r: &RawResponse| -> String {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        v["uri"].as_str().unwrap().to_owned()
    };
    for (target, want) in [
        ("/k3x9q2a/echo?a=%2F", "/echo?a=%2F"),
        ("/k3x9q2a/%65cho", "/echo"),
        ("/%6b3x9q2a/echo", "/echo"),
        ("/k3x9q2a/x/../echo", "/echo"),
        ("/k3x9q2a//echo", "/echo"),
    ] {
        let r = raw_request(a.addr, "GET", target, &[]).await;
        assert_eq!(r.status, 200, "{target}: {}", r.text());
        assert_eq!(uri(&r), want, "{target}");
    }
    // Dot segments never climb out of the prefix.
    for target in [
        "/k3x9q2a/../echo",
        "/k3x9q2a/%2e%2e/echo",
        "/k3x9q2a/..%2Fecho",
    ] {
        let r = raw_request(a.addr, "GET", target, &[]).await;
        assert_eq!(r.status, 404, "{target}: {}", r.text());
        assert!(
            r.text().contains("this adapter serves /k3x9q2a/"),
            "{target}"
        );
    }
    // Paths the app could not decode either are refused before it.
    for target in ["/k3x9q2a/%FF", "/k3x9q2a/a%00b", "/k3x9q2a/a%0D%0Ab"] {
        let r = raw_request(a.addr, "GET", target, &[]).await;
        assert_eq!(r.status, 400, "{target}: {}", r.text());
    }
}

#[tokio::test]
async fn read_only_by_default() {
    let a = setup().await;
    let c = client();
    for (method, path) in [
        ("POST", "/k3x9q2a/echo"),
        ("POST", "/k3x9q2a/ajax-api/2.0/mlflow/runs/delete"),
        ("POST", "/k3x9q2a/ajax-api/2.0/mlflow/experiments/create"),
        ("PUT", "/k3x9q2a/ajax-api/2.0/mlflow-artifacts/artifacts/x"),
        (
            "DELETE",
            "/k3x9q2a/ajax-api/2.0/mlflow/registered-models/delete",
        ),
        (
            "PATCH",
            "/k3x9q2a/ajax-api/2.0/mlflow/registered-models/update",
        ),
        ("OPTIONS", "/k3x9q2a/ajax-api/2.0/mlflow/runs/search"),
    ] {
        let r = c
            .request(method.parse().unwrap(), a.url(path))
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{method} {path}");
        assert_eq!(r.headers()["content-type"], "application/json");
        let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(v["error_code"], "PERMISSION_DENIED", "{method} {path}");
        assert!(v["message"].as_str().unwrap().contains("read-only"));
    }
    // Spelled differently, a write is still a write; a read still a read.
    for (target, want) in [
        ("/k3x9q2a/ajax-api/2.0/mlflow/runs/search/../delete", 403),
        ("/k3x9q2a/ajax-api/2.0/mlflow/runs/%64elete", 403),
        ("/k3x9q2a/ajax-api/2.0/mlflow/runs/delete/../search", 200),
        ("/k3x9q2a/ajax-api/2.0/mlflow/runs/%73earch", 200),
    ] {
        let r = raw_request(a.addr, "POST", target, &[]).await;
        assert_eq!(r.status, want, "{target}: {}", r.text());
    }
    // The UI's reads go through, and reach the app as POSTs.
    let r = c
        .post(a.url("/k3x9q2a/ajax-api/2.0/mlflow/runs/search"))
        .body("{\"experiment_ids\":[\"0\"]}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["method"], "POST");
    assert_eq!(v["uri"], "/ajax-api/2.0/mlflow/runs/search");
    let m = a.metrics().await;
    assert!(
        m.contains(r#"flowgate_adapter_refused_requests_total{reason="read_only"} 9"#),
        "{m}"
    );
    // --writes on forwards every method.
    let w = adapter(start_upstream().await).writes_on().start().await;
    let r = c
        .post(w.url("/k3x9q2a/ajax-api/2.0/mlflow/runs/delete"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["method"], "POST");
}

#[tokio::test]
async fn other_hosts_are_misdirected() {
    let a = adapter(start_upstream().await)
        .public_host("mlflow.example.test, other.example.test:8443")
        .start()
        .await;
    let port = a.addr.port().to_string();
    for (host, want) in [
        (format!("mlflow.example.test:{port}"), 200),
        ("MLflow.Example.Test".to_owned(), 200),
        ("other.example.test:8443".to_owned(), 200),
        ("other.example.test".to_owned(), 421),
        (format!("127.0.0.1:{port}"), 421),
        ("rebound.evil.example".to_owned(), 421),
        ("mlflow.example.test.evil.example".to_owned(), 421),
    ] {
        let r = raw_request(a.addr, "GET", "/k3x9q2a/echo", &[("Host", &host)]).await;
        assert_eq!(r.status, want, "Host: {host}: {}", r.text());
    }
    // Probes and scrapes come by IP.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = raw_request(a.addr, "GET", path, &[("Host", "10.0.0.7:8080")]).await;
        assert_eq!(r.status, 200, "{path}");
    }
    // No Host at all (HTTP/1.0) is not ours either.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(a.addr).await.unwrap();
    s.write_all(b"GET /k3x9q2a/echo HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    assert!(
        buf.starts_with(b"HTTP/1.0 421") || buf.starts_with(b"HTTP/1.1 421"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    let m = a.metrics().await;
    assert!(
        m.contains(r#"flowgate_adapter_refused_requests_total{reason="host"} 5"#),
        "{m}"
    );
}

#[tokio::test]
async fn origin_is_translated_only_for_the_public_origin() {
    let a = adapter(start_upstream().await)
        .public_host("mlflow.example.test")
        .writes_on()
        .start()
        .await;
    let port = a.addr.port();
    let public = format!("mlflow.example.test:{port}");
    for (origin, translated) in [
        (format!("http://{public}"), true),
        (format!("https://{public}"), true),
        (format!("http://{public}.evil.example"), false),
        ("http://mlflow.example.test:1".to_owned(), false),
        ("http://evil.example".to_owned(), false),
        ("null".to_owned(), false),
    ] {
        let r = raw_request(
            a.addr,
            "POST",
            "/k3x9q2a/echo",
            &[
                ("Host", &public),
                ("Origin", &origin),
                ("Referer", &format!("{origin}/k3x9q2a/#/x")),
            ],
        )
        .await;
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let upstream = v["headers"]["host"].as_str().unwrap();
        let (want_origin, want_referer) = if translated {
            (
                format!("http://{upstream}"),
                format!("http://{upstream}/#/x"),
            )
        } else {
            (origin.clone(), format!("{origin}/k3x9q2a/#/x"))
        };
        assert_eq!(v["headers"]["origin"], want_origin, "{origin}");
        assert_eq!(v["headers"]["referer"], want_referer, "{origin}");
    }
}

#[tokio::test]
async fn forwarded_headers_are_replaced_not_passed_on() {
    let a = adapter(start_upstream().await)
        .public_host("mlflow.example.test")
        .start()
        .await;
    let r = raw_request(
        a.addr,
        "GET",
        "/k3x9q2a/echo",
        &[
            ("Host", "mlflow.example.test"),
            ("X-Forwarded-Host", "evil.example"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Prefix", "/elsewhere"),
            ("X-Forwarded-For", "192.0.2.1"),
            ("X-Forwarded-For", "192.0.2.2"),
            ("Forwarded", "host=evil.example"),
        ],
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let h = &v["headers"];
    assert_eq!(h["x-forwarded-host"], "mlflow.example.test");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-prefix"], "/k3x9q2a");
    assert_eq!(h["x-forwarded-for"], "192.0.2.1, 192.0.2.2, 127.0.0.1");
    assert!(h.get("forwarded").is_none(), "{v}");
}

#[tokio::test]
async fn one_date_header() {
    let a = setup().await;
    for target in ["/k3x9q2a/two-dates", "/k3x9q2a/echo", "/k3x9q2a/page.html"] {
        let r = raw_request(a.addr, "GET", target, &[]).await;
        assert_eq!(r.all("date").len(), 1, "{target}: {:?}", r.headers);
    }
    let r = raw_request(a.addr, "GET", "/k3x9q2a/two-dates", &[]).await;
    assert_eq!(r.all("date"), ["Tue, 01 Dec 2026 07:00:00 GMT"]);
}

#[tokio::test]
async fn a_client_that_leaves_early_is_counted_and_logged_once() {
    use tokio::io::AsyncWriteExt;
    let a = setup().await;
    let mut s = tokio::net::TcpStream::connect(a.addr).await.unwrap();
    s.write_all(b"GET /k3x9q2a/slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = a.metrics().await;
    assert_eq!(metric(&during, "flowgate_adapter_in_flight_requests"), 1.0);
    drop(s);
    // The upstream answers /slow after 3 s; the gauge must not wait for it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = a.metrics().await;
    assert_eq!(
        metric(&after, "flowgate_adapter_in_flight_requests"),
        0.0,
        "{after}"
    );
    assert_eq!(
        metric(&after, "flowgate_adapter_abandoned_requests_total"),
        1.0
    );
    assert!(
        after.contains(r#"flowgate_adapter_requests_total{route="ui",status="4xx"} 1"#),
        "{after}"
    );
}
