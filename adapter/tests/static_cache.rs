//! The static cache seen from outside: what MLflow's static files cost the
//! app after the first request, that every coding still carries the same
//! rewritten bytes, that a changed file is seen once its lifetime ends, that
//! what may not be shared is never stored, and that a burst of first
//! requests reaches the app once.

mod common;

use bytes::Bytes;
use common::{adapter, client, decode, gzip, metric};
use futures_util::StreamExt;
use http::{Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

const PREFIX: &str = common::PREFIX;

/// What the test app serves at `/static-files/app.js` (with MLflow 3's
/// `Vary: Origin`), and what it saw.
struct Served {
    body: String,
    etag: String,
    cache_control: &'static str,
    set_cookie: bool,
    /// Requests for the file, and those answered 304.
    requests: usize,
    not_modified: usize,
    delay: Duration,
    /// Every request answered 500 (the app in trouble).
    failing: bool,
    /// The body sent in two halves this far apart (a slow app).
    stall: Option<Duration>,
    content_type: &'static str,
    gzip: AppGzip,
}

/// When the test app compresses its answer itself.
#[derive(Clone, Copy, PartialEq)]
enum AppGzip {
    Never,
    /// When the request's `Accept-Encoding` names gzip.
    WhenAsked,
    Always,
}

type Shared = Arc<Mutex<Served>>;

fn js(version: u32) -> String {
    // large enough to be compressed; the route literal is rewritten
    format!(
        "var v={version};var r=\"/#/experiments\";{}",
        "x=1;".repeat(5000)
    )
}

fn rewritten(version: u32) -> String {
    js(version).replace("\"/#/", &format!("\"{PREFIX}/#/"))
}

async fn app(shared: Shared) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let shared = Arc::clone(&shared);
                    async move {
                        let (delay, response) = {
                            let mut s = shared.lock().unwrap();
                            s.requests += 1;
                            let asked_gzip = req
                                .headers()
                                .get(header::ACCEPT_ENCODING)
                                .is_some_and(|v| v.to_str().unwrap().contains("gzip"));
                            let matches = req
                                .headers()
                                .get(header::IF_NONE_MATCH)
                                .is_some_and(|v| v.as_bytes() == s.etag.as_bytes());
                            let mut b = Response::builder()
                                .header(header::CONTENT_TYPE, s.content_type)
                                .header(header::CACHE_CONTROL, s.cache_control)
                                .header(header::ETAG, &s.etag)
                                .header(header::VARY, "Origin");
                            if s.set_cookie {
                                b = b.header(header::SET_COOKIE, "session=1");
                            }
                            let (b, bytes) = if s.failing {
                                (
                                    b.status(StatusCode::INTERNAL_SERVER_ERROR),
                                    Bytes::from("no"),
                                )
                            } else if matches {
                                s.not_modified += 1;
                                (b.status(StatusCode::NOT_MODIFIED), Bytes::new())
                            } else if s.gzip == AppGzip::Always
                                || (s.gzip == AppGzip::WhenAsked && asked_gzip)
                            {
                                let gz = Bytes::from(gzip(s.body.as_bytes()));
                                (b.header(header::CONTENT_ENCODING, "gzip"), gz)
                            } else {
                                (b, Bytes::from(s.body.clone()))
                            };
                            (s.delay, body(b, bytes, s.stall))
                        };
                        tokio::time::sleep(delay).await;
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

type AppBody = BoxBody<Bytes, Infallible>;

/// A response of the test app: `bytes` at once, or in two halves `stall`
/// apart (with its `Content-Length`, as a file server would).
fn body(b: http::response::Builder, bytes: Bytes, stall: Option<Duration>) -> Response<AppBody> {
    let Some(stall) = stall.filter(|_| !bytes.is_empty()) else {
        return b.body(Full::new(bytes).boxed()).unwrap();
    };
    let halves = [
        bytes.slice(..bytes.len() / 2),
        bytes.slice(bytes.len() / 2..),
    ];
    let frames = futures_util::stream::iter(halves.into_iter().enumerate()).then(
        move |(i, half)| async move {
            if i == 1 {
                tokio::time::sleep(stall).await;
            }
            Ok::<_, Infallible>(Frame::data(half))
        },
    );
    b.header(header::CONTENT_LENGTH, bytes.len())
        .body(BodyExt::boxed(StreamBody::new(frames)))
        .unwrap()
}

fn served(cache_control: &'static str) -> Shared {
    Arc::new(Mutex::new(Served {
        body: js(1),
        etag: "\"v1\"".into(),
        cache_control,
        set_cookie: false,
        requests: 0,
        not_modified: 0,
        delay: Duration::ZERO,
        failing: false,
        stall: None,
        content_type: "application/javascript",
        gzip: AppGzip::Never,
    }))
}

async fn get(url: &str, accept: &str) -> (StatusCode, http::HeaderMap, String) {
    let r = client()
        .get(url)
        .header(header::ACCEPT_ENCODING, accept)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let headers = r.headers().clone();
    let body = r.bytes().await.unwrap();
    let coding = headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap().to_owned());
    let plain = match coding {
        Some(c) => decode(&c, &body).await,
        None => body.to_vec(),
    };
    (status, headers, String::from_utf8(plain).unwrap())
}

#[tokio::test]
async fn a_fresh_static_file_is_sent_from_memory_in_every_coding() {
    let shared = served("public, max-age=600");
    let a = adapter(app(Arc::clone(&shared)).await).start().await;
    let url = a.url(&format!("{PREFIX}/static-files/app.js"));
    for accept in ["zstd", "br", "gzip", "identity"] {
        for round in 0..3 {
            let (status, headers, body) = get(&url, accept).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body, rewritten(1), "{accept} round {round}");
            let coding = headers
                .get(header::CONTENT_ENCODING)
                .map(|v| v.to_str().unwrap());
            assert_eq!(coding, (accept != "identity").then_some(accept));
            assert_eq!(
                headers[header::ETAG],
                "W/\"v1\"",
                "a rewritten body's weak ETag"
            );
            assert!(
                headers.contains_key(header::AGE),
                "a cached answer says its age"
            );
            assert!(headers.contains_key(header::CONTENT_LENGTH));
        }
    }
    assert_eq!(
        shared.lock().unwrap().requests,
        4,
        "the app is asked once per coding, not once per request"
    );
    let m = a.metrics().await;
    assert_eq!(
        metric(
            &m,
            "flowgate_adapter_static_cache_requests_total{result=\"hit\"}"
        ),
        8.0
    );
    assert_eq!(
        metric(
            &m,
            "flowgate_adapter_static_cache_requests_total{result=\"stored\"}"
        ),
        4.0
    );
    assert!(metric(&m, "flowgate_adapter_static_cache_bytes") > 0.0);
    a.stop().await;
}

#[tokio::test]
async fn a_stale_file_is_revalidated_and_a_changed_one_replaces_it() {
    // no lifetime: every request asks the app, which answers 304 while unchanged
    let shared = served("no-cache");
    let a = adapter(app(Arc::clone(&shared)).await).start().await;
    let url = a.url(&format!("{PREFIX}/static-files/app.js"));
    for _ in 0..3 {
        let (status, _, body) = get(&url, "gzip").await;
        assert_eq!((status, body), (StatusCode::OK, rewritten(1)));
    }
    {
        let s = shared.lock().unwrap();
        assert_eq!(
            (s.requests, s.not_modified),
            (3, 2),
            "asked each time, 304 after the first"
        );
    }
    {
        let mut s = shared.lock().unwrap();
        s.body = js(2);
        s.etag = "\"v2\"".into();
    }
    for _ in 0..2 {
        let (_, headers, body) = get(&url, "gzip").await;
        assert_eq!(body, rewritten(2), "the changed file, at once");
        assert_eq!(headers[header::ETAG], "W/\"v2\"");
    }
    assert_eq!(
        shared.lock().unwrap().not_modified,
        3,
        "and the new one revalidates"
    );
    a.stop().await;
}

#[tokio::test]
async fn a_hard_reload_asks_the_app() {
    let shared = served("public, max-age=600");
    let a = adapter(app(Arc::clone(&shared)).await).start().await;
    let url = a.url(&format!("{PREFIX}/static-files/app.js"));
    get(&url, "gzip").await;
    get(&url, "gzip").await;
    assert_eq!(shared.lock().unwrap().requests, 1);
    let r = client()
        .get(&url)
        .header(header::ACCEPT_ENCODING, "gzip")
        .header(header::CACHE_CONTROL, "no-cache")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let seen = {
        let s = shared.lock().unwrap();
        (s.requests, s.not_modified)
    };
    assert_eq!(seen, (2, 1), "revalidated, not refetched");
    a.stop().await;
}

#[tokio::test]
async fn what_may_not_be_shared_is_never_stored() {
    for (cache_control, set_cookie) in [
        ("private, max-age=600", false),
        ("no-store", false),
        ("public, max-age=600", true),
    ] {
        let shared = served(cache_control);
        shared.lock().unwrap().set_cookie = set_cookie;
        let a = adapter(app(Arc::clone(&shared)).await).start().await;
        let url = a.url(&format!("{PREFIX}/static-files/app.js"));
        for _ in 0..3 {
            let (status, headers, body) = get(&url, "gzip").await;
            assert_eq!((status, body), (StatusCode::OK, rewritten(1)));
            assert!(!headers.contains_key(header::AGE), "{cache_control}");
            assert_eq!(headers.contains_key(header::SET_COOKIE), set_cookie);
        }
        assert_eq!(
            shared.lock().unwrap().requests,
            3,
            "{cache_control}, cookie {set_cookie}"
        );
        a.stop().await;
    }
}

#[tokio::test]
async fn a_burst_of_first_requests_reaches_the_app_once() {
    let shared = served("public, max-age=600");
    shared.lock().unwrap().delay = Duration::from_millis(300);
    let a = adapter(app(Arc::clone(&shared)).await).start().await;
    let url = a.url(&format!("{PREFIX}/static-files/app.js"));
    let burst: Vec<_> = (0..20)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&url, "zstd").await })
        })
        .collect();
    for r in burst {
        let (status, _, body) = r.await.unwrap();
        assert_eq!((status, body), (StatusCode::OK, rewritten(1)));
    }
    assert_eq!(
        shared.lock().unwrap().requests,
        1,
        "one fill; the rest waited for it"
    );
    a.stop().await;
}

#[tokio::test]
async fn without_the_cache_every_request_reaches_the_app() {
    let shared = served("public, max-age=600");
    let a = adapter(app(Arc::clone(&shared)).await)
        .static_cache_mib(0)
        .start()
        .await;
    let url = a.url(&format!("{PREFIX}/static-files/app.js"));
    for _ in 0..3 {
        let (_, headers, body) = get(&url, "zstd").await;
        assert_eq!(body, rewritten(1));
        assert!(!headers.contains_key(header::AGE));
    }
    assert_eq!(shared.lock().unwrap().requests, 3);
    a.stop().await;
}

#[tokio::test]
async fn a_body_that_outgrows_an_entry_as_sent_is_sent_whole_and_not_kept() {
    // 180 KB of route literals, which the rewrite makes 660 KB: past the
    // 512 KiB entry of a 1 MiB cache uncompressed, a few KiB compressed
    let shared = served("public, max-age=600");
    let dense = "\"/#".repeat(60_000);
    shared.lock().unwrap().body = dense.clone();
    let want = dense.replace("\"/#", &format!("\"{PREFIX}/#"));
    let a = adapter(app(Arc::clone(&shared)).await)
        .static_cache_mib(1)
        .start()
        .await;
    let url = a.url(&format!("{PREFIX}/static-files/app.js"));
    for round in 0..2 {
        let (status, headers, body) = get(&url, "identity").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body == want, "round {round}: the whole rewritten body");
        assert!(!headers.contains_key(header::AGE), "not from the cache");
    }
    assert_eq!(shared.lock().unwrap().requests, 2, "not kept: asked again");
    for _ in 0..2 {
        let (_, _, body) = get(&url, "zstd").await;
        assert!(body == want);
    }
    assert_eq!(
        shared.lock().unwrap().requests,
        3,
        "compressed, it fits and is kept"
    );
    let m = a.metrics().await;
    let passed = "flowgate_adapter_static_cache_requests_total{result=\"passed\"}";
    assert_eq!(
        metric(&m, passed),
        2.0,
        "the fill that gave up, the request after it"
    );
    assert!(metric(&m, "flowgate_adapter_static_cache_bytes") < (512 << 10) as f64);
    a.stop().await;
}

#[tokio::test]
async fn a_burst_on_a_file_that_must_be_revalidated_reaches_the_app_once_per_burst() {
    // no lifetime: each burst asks the app once, and every request in it
    // gets what that one answer vouched for
    let shared = served("no-cache");
    shared.lock().unwrap().delay = Duration::from_millis(300);
    let a = adapter(app(Arc::clone(&shared)).await).start().await;
    let url = a.url(&format!("{PREFIX}/static-files/app.js"));
    for burst in 1..=2 {
        let requests: Vec<_> = (0..20)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { get(&url, "gzip").await })
            })
            .collect();
        for r in requests {
            let (status, _, body) = r.await.unwrap();
            assert_eq!((status, body), (StatusCode::OK, rewritten(1)));
        }
        let s = shared.lock().unwrap();
        assert_eq!(
            (s.requests, s.not_modified),
            (burst, burst - 1),
            "burst {burst}: one request to the app, a 304 after the first"
        );
    }
    a.stop().await;
}

#[tokio::test]
async fn an_answer_is_kept_only_in_the_coding_of_its_entry() {
    // the adapter compresses nothing (--compress off): one entry, identity;
    // the app gzips when asked, and is asked for the entry's coding only
    let shared = served("public, max-age=600");
    shared.lock().unwrap().gzip = AppGzip::WhenAsked;
    let a = adapter(app(Arc::clone(&shared)).await)
        .compress_off()
        .start()
        .await;
    let url = a.url(&format!("{PREFIX}/static-files/app.js"));
    let (_, _, body) = get(&url, "gzip").await;
    assert_eq!(body, rewritten(1));
    let (_, headers, body) = get(&url, "identity").await;
    assert_eq!(body, rewritten(1));
    assert!(headers.contains_key(header::AGE), "from memory");
    assert!(
        !headers.contains_key(header::CONTENT_ENCODING),
        "a client that takes no coding gets none"
    );
    assert_eq!(shared.lock().unwrap().requests, 1);
    a.stop().await;
}

#[tokio::test]
async fn an_app_answering_in_another_coding_is_not_kept() {
    // a PNG passes through as the app sent it: gzipped, whatever was asked
    let shared = served("public, max-age=600");
    {
        let mut s = shared.lock().unwrap();
        s.gzip = AppGzip::Always;
        s.content_type = "image/png";
    }
    let a = adapter(app(Arc::clone(&shared)).await).start().await;
    let url = a.url(&format!("{PREFIX}/static-files/logo.png"));
    for _ in 0..2 {
        let r = client()
            .get(&url)
            .header(header::ACCEPT_ENCODING, "zstd")
            .send()
            .await
            .unwrap();
        assert!(!r.headers().contains_key(header::AGE), "never from memory");
        assert_eq!(r.headers()[header::CONTENT_ENCODING], "gzip", "the app's");
    }
    assert_eq!(shared.lock().unwrap().requests, 2);
    a.stop().await;
}

#[tokio::test]
async fn a_request_with_a_query_is_not_kept() {
    let shared = served("public, max-age=600");
    let a = adapter(app(Arc::clone(&shared)).await).start().await;
    let url = a.url(&format!("{PREFIX}/static-files/app.js?v=1"));
    for _ in 0..2 {
        let (_, headers, body) = get(&url, "zstd").await;
        assert_eq!(body, rewritten(1));
        assert!(!headers.contains_key(header::AGE));
    }
    assert_eq!(shared.lock().unwrap().requests, 2);
    a.stop().await;
}

#[tokio::test]
async fn a_slow_app_is_still_heard_out() {
    // the fill cannot read the body within the upstream timeout: what it
    // read and the rest go to the client, nothing is kept
    let shared = served("public, max-age=600");
    shared.lock().unwrap().stall = Some(Duration::from_millis(1500));
    let a = adapter(app(Arc::clone(&shared)).await)
        .upstream_timeout(Duration::from_millis(500))
        .start()
        .await;
    let url = a.url(&format!("{PREFIX}/static-files/app.js"));
    for _ in 0..2 {
        let (status, headers, body) = get(&url, "zstd").await;
        assert_eq!((status, body), (StatusCode::OK, rewritten(1)));
        assert!(!headers.contains_key(header::AGE));
    }
    assert_eq!(shared.lock().unwrap().requests, 2);
    a.stop().await;
}

#[tokio::test]
async fn a_request_with_an_origin_goes_to_the_app() {
    // the app's answers vary by Origin: kept for requests without one only
    let shared = served("public, max-age=600");
    let a = adapter(app(Arc::clone(&shared)).await).start().await;
    let url = a.url(&format!("{PREFIX}/static-files/app.js"));
    get(&url, "zstd").await;
    for _ in 0..2 {
        let r = client()
            .get(&url)
            .header(header::ACCEPT_ENCODING, "zstd")
            .header(header::ORIGIN, "http://elsewhere.example")
            .send()
            .await
            .unwrap();
        assert!(!r.headers().contains_key(header::AGE));
    }
    let (_, headers, _) = get(&url, "zstd").await;
    assert!(headers.contains_key(header::AGE), "kept for the rest");
    assert_eq!(shared.lock().unwrap().requests, 3);
    a.stop().await;
}

#[tokio::test]
async fn an_app_error_on_revalidation_is_passed_on_and_the_entry_stays() {
    let shared = served("no-cache");
    let a = adapter(app(Arc::clone(&shared)).await).start().await;
    let url = a.url(&format!("{PREFIX}/static-files/app.js"));
    get(&url, "gzip").await;
    shared.lock().unwrap().failing = true;
    let (status, _, _) = get(&url, "gzip").await;
    assert_eq!(
        status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "the app's answer"
    );
    shared.lock().unwrap().failing = false;
    let (status, headers, body) = get(&url, "gzip").await;
    assert_eq!((status, body), (StatusCode::OK, rewritten(1)));
    assert!(headers.contains_key(header::AGE));
    assert_eq!(
        shared.lock().unwrap().not_modified,
        1,
        "revalidated with what was kept before the error"
    );
    a.stop().await;
}
