//! What a visitor of a sleeping instance sees, on either backend's
//! activator (the local listener, or `flowgate serve --activator-listen` on
//! Kubernetes): a browser's page visit gets a page that follows the wake at
//! `/<id>/.flowgate/wake` ([`WAKE_STATUS_PATH`]) and reloads the page it asked
//! for when the instance is ready; anything else gets 503 with `Retry-After`
//! and wakes nothing.

use adapter::body::ProxyBody;
pub use adapter::proxy::WAKE_STATUS_PATH;
use http::{Request, Response, StatusCode, header};

/// Steps of a wake shown at most (a few words each).
pub const MAX_STEPS: usize = 16;

/// A small HTML page (`refresh`: the browser retries in 3 s).
pub fn page(status: StatusCode, title: &str, text: &str, refresh: bool) -> Response<ProxyBody> {
    let meta = if refresh {
        "<meta http-equiv=\"refresh\" content=\"3\">"
    } else {
        ""
    };
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title>{meta}</head>\
         <body style=\"font-family:sans-serif;margin:3em\"><h1>{title}</h1><p>{text}</p></body></html>\n"
    );
    let mut r = Response::new(ProxyBody::full(html));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if refresh {
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("3"));
    }
    r
}

/// A browser navigating to a page (not a script, an image or an API call):
/// only that wakes a sleeping instance.
pub fn navigates<B>(req: &Request<B>) -> bool {
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    req.method() == http::Method::GET
        && (header("sec-fetch-dest") == "document" || header("accept").contains("text/html"))
}

/// 503 to anything but a page: the instance sleeps until someone visits.
pub fn asleep() -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::full(
        "{\"error\":\"sleeping\",\"message\":\"this instance is asleep; opening it in a browser wakes it\"}\n",
    ));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    h.insert(header::RETRY_AFTER, header::HeaderValue::from_static("10"));
    r
}

/// The page a visitor of a sleeping (or waking) instance sees: the wake's
/// steps as they happen, then the page they asked for (`location.reload()`
/// keeps its path, query and fragment). Without script it refreshes.
pub fn waking_page(id: &str) -> Response<ProxyBody> {
    // `id` is [a-z][a-z0-9]{6} (the table's keys come from parsed ids).
    let html = format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>Waking up</title>
<noscript><meta http-equiv="refresh" content="5"></noscript></head>
<body style="font-family:sans-serif;margin:3em"><h1>Waking up</h1>
<p id="said">This MLflow instance was asleep after a while without visitors. It is starting again, with the same data; this page opens it when it is ready.</p>
<ol id="steps"></ol>
<script>
(function () {{
  var status = "/{id}{WAKE_STATUS_PATH}";
  function show(d) {{
    var ol = document.getElementById("steps");
    ol.textContent = "";
    (d.steps || []).forEach(function (t) {{
      var li = document.createElement("li");
      li.textContent = t;
      ol.appendChild(li);
    }});
  }}
  function tick() {{
    fetch(status, {{cache: "no-store", credentials: "same-origin"}})
      .then(function (r) {{ return r.json(); }})
      .then(function (d) {{
        show(d);
        if (d.state === "ready") {{ location.reload(); return; }}
        if (d.state === "failed") {{
          document.getElementById("said").textContent =
            "It could not start again. " + ((d.steps || []).slice(-1)[0] || "The portal shows why.");
          return;
        }}
        setTimeout(tick, 1000);
      }})
      .catch(function () {{ setTimeout(tick, 2000); }});
  }}
  tick();
}})();
</script></body></html>
"#
    );
    let mut r = Response::new(ProxyBody::full(html));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

/// The wake's state as the waking page reads it: `sleeping`, `waking`,
/// `ready`, `failed` (or the local backend's `starting`, `restarting`), with
/// the steps so far (a few words each: visitors read them, so no paths or logs).
pub fn wake_status(state: &str, steps: &[String]) -> Response<ProxyBody> {
    let steps = &steps[..steps.len().min(MAX_STEPS)];
    let mut r = Response::new(ProxyBody::full(
        serde_json::json!({"state": state, "steps": steps}).to_string(),
    ));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get("/k3x9q2a/");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn only_a_page_visit_wakes() {
        assert!(navigates(&get(&[("sec-fetch-dest", "document")])));
        assert!(navigates(&get(&[(
            "accept",
            "text/html,application/xhtml+xml"
        )])));
        assert!(!navigates(&get(&[("accept", "application/json")])));
        assert!(!navigates(&get(&[
            ("sec-fetch-dest", "script"),
            ("accept", "*/*")
        ])));
        let post = Request::post("/k3x9q2a/")
            .header("sec-fetch-dest", "document")
            .body(())
            .unwrap();
        assert!(!navigates(&post));
    }

    #[test]
    fn the_page_follows_the_instance_s_own_status_path() {
        let r = waking_page("k3x9q2a");
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::CACHE_CONTROL], "no-store");
        assert!(r.headers().contains_key(header::RETRY_AFTER));
        let r = asleep();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "10");
    }
}
