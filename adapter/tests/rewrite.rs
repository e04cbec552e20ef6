//! What a visitor notices of the rewriters, through the real adapter in front
//! of a real HTTP upstream on loopback.
//!
//! Redirects, cookies, charsets and caps are checked case by case. Then a
//! differential test: seeded random
//! HTML and CSS documents, full of the spellings a browser reads in its own
//! way (character references, CSS escapes, backslashes, dot segments, `data:`
//! URLs with commas, comments and strings), are served by an upstream in
//! random chunkings and codings and fetched through the adapter. A reference
//! parser (html5ever through scraper, cssparser for CSS, the WHATWG URL parser)
//! reads every URL of the input and of the output, and checks what a visitor
//! would notice: every URL the app meant as its own path resolves to the same
//! path under the prefix, nothing else changes, and the chunking does not
//! matter.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, Response, header};
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use tokio::net::TcpListener;
use url::Url;

const DOCUMENTS: u64 = 600;
const STYLESHEETS: u64 = 200;

// ---------------------------------------------------------------- generator

const PIECES: &[&str] = &[
    "/", "/", "/", "\\", "..", ".", "%2e", "%2E%2e", "k3x9q2a", "x", "img.png", "?q=/../a",
    "#f/..", "é", "a,b", "%2f",
];

fn url_value(rng: &mut fastrand::Rng) -> String {
    match rng.u8(..10) {
        0 => "https://other.example/x/../y".into(),
        1 => ["//cdn.example/x", "/\\evil.example/x", "\\/evil.example"][rng.usize(..3)].into(),
        2 => "data:image/png;base64,/9j/4AA=,/x".into(),
        3 => ["rel/x", "x?y=/z", "#top", "?q=1"][rng.usize(..4)].into(),
        _ => {
            let mut s = String::from(["/", "\\"][usize::from(rng.u8(..8) == 0)]);
            for _ in 0..rng.usize(0..6) {
                s.push_str(PIECES[rng.usize(..PIECES.len())]);
            }
            if rng.u8(..10) == 0 {
                s.insert(rng.usize(..=1), '\t');
            }
            s
        }
    }
}

/// `value` as an HTML attribute, with random character references and quoting.
fn attribute(rng: &mut fastrand::Rng, value: &str) -> String {
    let mut raw = String::new();
    for c in value.chars() {
        match (c, rng.u8(..6)) {
            ('&', _) => raw.push_str("&amp;"),
            ('"', _) => raw.push_str("&quot;"),
            ('/', 0) => raw.push_str("&sol;"),
            (_, 1) => raw.push_str(&format!("&#{};", c as u32)),
            (_, 2) => raw.push_str(&format!("&#x{:X};", c as u32)),
            _ => raw.push(c),
        }
    }
    let bare = !raw.is_empty()
        && !raw
            .chars()
            .any(|c| c.is_ascii_whitespace() || "\"'=<>`".contains(c));
    match rng.u8(..3) {
        0 if bare => raw,
        1 if !raw.contains('\'') => format!("'{raw}'"),
        _ => format!("\"{raw}\""),
    }
}

/// `url` as a CSS `url()` (or `@import` string), with random escapes.
fn css_url(rng: &mut fastrand::Rng, url: &str, import: bool) -> String {
    let quote = if import {
        ['"', '\''][rng.usize(..2)]
    } else {
        ['"', '\'', ' '][rng.usize(..3)]
    };
    let mut body = String::new();
    for c in url.chars() {
        let must = c == '\\' || c == quote || (quote == ' ' && "\"'() \t".contains(c));
        if must || rng.u8(..8) == 0 {
            body.push_str(&format!("\\{:x} ", c as u32));
        } else {
            body.push(c);
        }
    }
    let name = ["url", "URL", "\\75 rl", "u\\72l"][rng.usize(..4)];
    match (import, quote) {
        (true, q) => format!("@import/**/{q}{body}{q};"),
        (false, ' ') => format!("{name}({body})"),
        (false, q) => format!("{name}( {q}{body}{q} )"),
    }
}

fn stylesheet(rng: &mut fastrand::Rng) -> String {
    let mut css = String::new();
    for i in 0..rng.usize(1..8) {
        let url = url_value(rng);
        match rng.u8(..5) {
            0 => {
                let c = css_url(rng, &url, false);
                css.push_str(&format!("/* {c} */"));
            }
            1 => css.push_str(&format!(
                ".s{i}{{content:\"url({})\"}}",
                url.replace(['"', '\\', '\n'], "")
            )),
            2 => {
                let c = css_url(rng, &url, true);
                css.push_str(&c);
            }
            _ => css.push_str(&format!(
                ".c{i}{{background:{}}}",
                css_url(rng, &url, false)
            )),
        }
        css.push('\n');
    }
    css
}

fn srcset(rng: &mut fastrand::Rng) -> String {
    (0..rng.usize(1..4))
        .map(|i| {
            let url = url_value(rng).replace([' ', '\t'], "");
            let url = url.trim_end_matches(',').to_owned();
            let url = if url.is_empty() { "/x".to_owned() } else { url };
            format!("{url} {}x", i + 1)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn document(seed: u64) -> String {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut doc = String::from("<!doctype html><html><head><meta charset=\"utf-8\">");
    if rng.bool() {
        doc.push_str(&format!("<style>{}</style>", stylesheet(&mut rng)));
    }
    doc.push_str("</head><body>");
    for i in 0..rng.usize(1..12) {
        let url = url_value(&mut rng);
        let el = match rng.u8(..8) {
            0 => format!("<img src={} srcset={}>", attribute(&mut rng, &url), {
                let s = srcset(&mut rng);
                attribute(&mut rng, &s)
            }),
            1 => format!("<form action={}></form>", attribute(&mut rng, &url)),
            2 => format!(
                "<svg><use xlink:href={} /></svg>",
                attribute(&mut rng, &url)
            ),
            3 => {
                let css = format!("background:{}", css_url(&mut rng, &url, false));
                format!("<p style={}>styled</p>", attribute(&mut rng, &css))
            }
            4 => format!("<style>{}</style>", stylesheet(&mut rng)),
            _ => format!("<a href={} >link {i}</a>", attribute(&mut rng, &url)),
        };
        doc.push_str(&el);
        doc.push_str(" text é\n");
    }
    doc.push_str("</body></html>");
    doc
}

// ---------------------------------------------------------------- upstream

type UpBody = BoxBody<Bytes, Infallible>;

/// `/<kind>/<seed>/<chunking>[/gzip]`: the document `seed` of `kind` (`html`
/// or `css`), sent in random pieces chosen by `chunking`.
async fn route(req: Request<Incoming>) -> Response<UpBody> {
    let path = req.uri().path();
    let full = |b: Vec<u8>| BodyExt::boxed(http_body_util::Full::new(Bytes::from(b)));
    if let Some(n) = path.strip_prefix("/redirect/") {
        let host = req.headers()[header::HOST].to_str().unwrap();
        let location = LOCATIONS[n.parse::<usize>().unwrap()]
            .0
            .replace("{up}", host);
        return Response::builder()
            .status(302)
            .header(header::LOCATION, location.as_str())
            .header(header::CONTENT_LOCATION, location.as_str())
            .header("refresh", format!("0; url={location}"))
            .body(full(Vec::new()))
            .unwrap();
    }
    match path {
        "/cookie" => {
            return Response::builder()
                .header(header::SET_COOKIE, "a=1; Path =/")
                .header(
                    header::SET_COOKIE,
                    "b=2;PATH=/x; Domain=example.org; HttpOnly",
                )
                .header(header::SET_COOKIE, "c=3; Path=/k3x9q2a; path=/")
                .body(full(Vec::new()))
                .unwrap();
        }
        "/latin1.html" => {
            return Response::builder()
                .header(header::CONTENT_TYPE, "text/html")
                .body(full(LATIN1.to_vec()))
                .unwrap();
        }
        "/huge.html" => {
            return Response::builder()
                .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
                .body(full(huge_page().into_bytes()))
                .unwrap();
        }
        _ => {}
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let seed: u64 = parts[1].parse().unwrap();
    let chunking: u64 = parts[2].parse().unwrap();
    let gzipped = parts.get(3) == Some(&"gzip");
    let (body, content_type) = match parts[0] {
        "html" => (document(seed), "text/html; charset=utf-8"),
        _ => (stylesheet(&mut fastrand::Rng::with_seed(seed)), "text/css"),
    };
    let mut body = body.into_bytes();
    if gzipped {
        body = gzip(&body);
    }
    let mut rng = fastrand::Rng::with_seed(chunking);
    let mut frames = Vec::new();
    let mut rest = &body[..];
    while !rest.is_empty() {
        let max = if rng.bool() { 9 } else { 700 };
        let n = rng.usize(1..=rest.len().min(max));
        frames.push(Ok::<_, Infallible>(Frame::data(Bytes::copy_from_slice(
            &rest[..n],
        ))));
        rest = &rest[n..];
    }
    let mut response = Response::builder().header(header::CONTENT_TYPE, content_type);
    if gzipped {
        response = response.header(header::CONTENT_ENCODING, "gzip");
    }
    response
        .body(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
            frames,
        ))))
        .unwrap()
}

async fn start_document_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service =
                    service_fn(|req| async move { Ok::<_, Infallible>(route(req).await) });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

// ---------------------------------------------------------------- reference

/// Where the upstream serves the document, and where the browser sees it.
const UPSTREAM_PAGE: &str = "http://upstream.invalid/doc/page";
const PUBLIC_PAGE: &str = "http://public.invalid/k3x9q2a/doc/page";

fn is_path_absolute(r: &str) -> bool {
    let mut c = r
        .trim_matches(|c: char| c <= ' ')
        .chars()
        .filter(|c| !matches!(c, '\t' | '\n' | '\r'));
    let slash = |c: Option<char>| matches!(c, Some('/' | '\\'));
    slash(c.next()) && !slash(c.next())
}

/// Checks one URL: `input` as the app wrote it (decoded), `output` as the
/// browser gets it.
fn check_url(input: &str, output: &str, what: &str) {
    let upstream = Url::parse(UPSTREAM_PAGE).unwrap();
    let public = Url::parse(PUBLIC_PAGE).unwrap();
    if !is_path_absolute(input) {
        assert_eq!(output, input, "{what}: {input:?} must stay as it is");
        return;
    }
    let meant = upstream.join(input).unwrap();
    let got = public
        .join(output)
        .unwrap_or_else(|e| panic!("{what}: {output:?} does not parse: {e}"));
    assert_eq!(
        got.origin(),
        public.origin(),
        "{what}: {input:?} -> {output:?} leaves the origin"
    );
    // A path the app wrote under the prefix already counts as prefixed (the
    // adapter cannot tell the two apart); anything else gets the prefix.
    let under = meant.path() == "/k3x9q2a" || meant.path().starts_with("/k3x9q2a/");
    let want = if under {
        meant.path().to_owned()
    } else {
        format!("/k3x9q2a{}", meant.path())
    };
    assert_eq!(got.path(), want, "{what}: {input:?} -> {output:?}");
    assert_eq!(
        got.query(),
        meant.query(),
        "{what}: {input:?} -> {output:?}"
    );
    assert_eq!(
        got.fragment(),
        meant.fragment(),
        "{what}: {input:?} -> {output:?}"
    );
}

/// The URLs of a style sheet, as cssparser tokenizes it.
fn css_urls(css: &str) -> Vec<String> {
    use cssparser::{ParseError, Parser, ParserInput, Token};
    fn walk(parser: &mut Parser<'_, '_>, out: &mut Vec<String>) {
        let mut after_import = false;
        loop {
            let token = match parser.next_including_whitespace_and_comments() {
                Ok(t) => t.clone(),
                Err(_) => return,
            };
            match &token {
                Token::UnquotedUrl(u) => out.push(u.to_string()),
                Token::QuotedString(s) if after_import => out.push(s.to_string()),
                Token::Function(_)
                | Token::ParenthesisBlock
                | Token::CurlyBracketBlock
                | Token::SquareBracketBlock => {
                    let is_url =
                        matches!(&token, Token::Function(name) if name.eq_ignore_ascii_case("url"));
                    let _ = parser.parse_nested_block(|p| -> Result<(), ParseError<'_, ()>> {
                        if is_url {
                            if let Ok(Token::QuotedString(s)) = p.next() {
                                out.push(s.to_string());
                            }
                        } else {
                            walk(p, out);
                        }
                        Ok(())
                    });
                }
                _ => {}
            }
            after_import = match &token {
                Token::AtKeyword(k) => k.eq_ignore_ascii_case("import"),
                Token::WhiteSpace(_) | Token::Comment(_) => after_import,
                _ => false,
            };
        }
    }
    let mut input = ParserInput::new(css);
    let mut parser = Parser::new(&mut input);
    let mut out = Vec::new();
    walk(&mut parser, &mut out);
    out
}

fn check_css(input: &str, output: &str, what: &str) {
    let (a, b) = (css_urls(input), css_urls(output));
    assert_eq!(a.len(), b.len(), "{what}: URL count\n{input}\n{output}");
    for (i, o) in a.iter().zip(&b) {
        check_url(i, o, what);
    }
}

/// Candidates of a srcset, as the HTML standard splits them.
fn srcset_urls(s: &str) -> Vec<String> {
    let mut urls = Vec::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_ascii_whitespace() || c == ',');
        if rest.is_empty() {
            return urls;
        }
        let end = rest
            .find(|c: char| c.is_ascii_whitespace())
            .unwrap_or(rest.len());
        let url = &rest[..end];
        rest = &rest[end..];
        if url.ends_with(',') {
            urls.push(url.trim_end_matches(',').to_owned());
        } else {
            urls.push(url.to_owned());
            let mut depth = false;
            let cut = rest
                .char_indices()
                .find(|&(_, c)| {
                    match c {
                        '(' => depth = true,
                        ')' => depth = false,
                        ',' if !depth => return true,
                        _ => {}
                    }
                    false
                })
                .map_or(rest.len(), |(i, _)| i + 1);
            rest = &rest[cut..];
        }
    }
}

fn check_html(input: &str, output: &str, what: &str) {
    let (a, b) = (
        scraper::Html::parse_document(input),
        scraper::Html::parse_document(output),
    );
    fn elements(d: &scraper::Html) -> Vec<scraper::ElementRef<'_>> {
        d.root_element()
            .descendants()
            .filter_map(scraper::ElementRef::wrap)
            .collect()
    }
    let (ea, eb) = (elements(&a), elements(&b));
    assert_eq!(ea.len(), eb.len(), "{what}: element count");
    for (x, y) in ea.iter().zip(&eb) {
        let (x, y) = (x.value(), y.value());
        assert_eq!(x.name(), y.name(), "{what}");
        let (xa, ya): (Vec<_>, Vec<_>) = (x.attrs().collect(), y.attrs().collect());
        assert_eq!(xa.len(), ya.len(), "{what}: attributes of {}", x.name());
        for ((name, value), (new_name, new)) in xa.into_iter().zip(ya) {
            assert_eq!(name, new_name, "{what}");
            match name {
                "href" | "src" | "action" => check_url(value, new, &format!("{what} {name}")),
                "srcset" => {
                    let (ua, ub) = (srcset_urls(value), srcset_urls(new));
                    assert_eq!(ua.len(), ub.len(), "{what}: srcset {value:?} -> {new:?}");
                    for (i, o) in ua.iter().zip(&ub) {
                        check_url(i, o, &format!("{what} srcset"));
                    }
                }
                "style" => check_css(value, new, &format!("{what} style")),
                _ => assert_eq!(value, new, "{what}: {name}"),
            }
        }
    }
    let styles = |d: &scraper::Html| -> Vec<String> {
        let sel = scraper::Selector::parse("style").unwrap();
        d.select(&sel).map(|s| s.text().collect()).collect()
    };
    for (x, y) in styles(&a).iter().zip(&styles(&b)) {
        check_css(x, y, &format!("{what} <style>"));
    }
}

/// Locations the upstream sends (`{up}`: its own authority) and what the
/// browser must get.
const LOCATIONS: &[(&str, &str)] = &[
    ("/x?a=1", "/k3x9q2a/x?a=1"),
    ("http://{up}/x", "/k3x9q2a/x"),
    ("http://{up}/\\evil.example/x", "/k3x9q2a/evil.example/x"),
    ("http://{up}//evil.example/x", "/k3x9q2a/evil.example/x"),
    ("/\\evil.example/x", "/k3x9q2a/evil.example/x"),
    ("//evil.example/x", "/k3x9q2a/evil.example/x"),
    ("/../x", "/k3x9q2a/x"),
    ("/%2e%2e/x", "/k3x9q2a/x"),
    ("/k3x9q2a/../other/x", "/k3x9q2a/other/x"),
    (
        "https://sso.example.org/login",
        "https://sso.example.org/login",
    ),
];

#[tokio::test]
async fn redirects_never_leave_the_origin_or_the_prefix() {
    let a = adapter(start_document_upstream().await).start().await;
    for (n, (sent, want)) in LOCATIONS.iter().enumerate() {
        let r = client()
            .get(a.url(&format!("/k3x9q2a/redirect/{n}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 302);
        assert_eq!(r.headers()["location"], *want, "Location {sent}");
        assert_eq!(
            r.headers()["content-location"],
            *want,
            "Content-Location {sent}"
        );
        assert_eq!(
            r.headers()["refresh"],
            format!("0; url={want}").as_str(),
            "Refresh {sent}"
        );
        // What the browser would do with it, from the page it asked for.
        let page = Url::parse(&a.url("/k3x9q2a/redirect/0")).unwrap();
        let next = page
            .join(r.headers()["location"].to_str().unwrap())
            .unwrap();
        if !want.starts_with("https://") {
            assert_eq!(next.origin(), page.origin(), "{sent}");
            assert!(next.path().starts_with("/k3x9q2a/"), "{sent} -> {next}");
        }
    }
}

#[tokio::test]
async fn cookies_stay_inside_the_prefix_however_they_are_spelt() {
    let a = adapter(start_document_upstream().await).start().await;
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
            "a=1; Path=/k3x9q2a/",
            "b=2; Path=/k3x9q2a/x; HttpOnly",
            "c=3; Path=/k3x9q2a; Path=/k3x9q2a/",
        ]
    );
}

const LATIN1: &[u8] = b"<!doctype html><html><head><title>Caf\xe9</title></head><body><p>Un caf\xe9 cr\xe8me \x80 10</p><a href=\"/menu?plat=cr\xe8pe\">menu</a><style>p{background:url(/caf\xe9.png)}</style></body></html>";

#[tokio::test]
async fn an_undeclared_windows_1252_page_keeps_its_bytes() {
    let a = adapter(start_document_upstream().await).start().await;
    let r = client()
        .get(a.url("/k3x9q2a/latin1.html"))
        .send()
        .await
        .unwrap();
    let body = r.bytes().await.unwrap();
    let want_bytes: Vec<u8> = {
        // The same edit on the bytes: only ASCII is inserted.
        let mut w = LATIN1.to_vec();
        for needle in [&b"href=\"/"[..], &b"url(/"[..]] {
            let at = w.windows(needle.len()).position(|x| x == needle).unwrap() + needle.len() - 1;
            w.splice(at..at, b"/k3x9q2a".iter().copied());
        }
        w
    };
    assert_eq!(
        &body[..],
        &want_bytes[..],
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(!body.windows(3).any(|w| w == "\u{fffd}".as_bytes()));
}

fn huge_page() -> String {
    format!(
        "<a href=\"/x\">a</a><div title=\"{}\">big</div><a href=\"/y\">b</a>",
        "A".repeat(3 << 20)
    )
}

#[tokio::test]
async fn past_a_cap_the_page_still_arrives_whole_and_the_metric_says_so() {
    let a = adapter(start_document_upstream().await).start().await;
    let body = fetch(&a, "/k3x9q2a/huge.html").await;
    let page = huge_page();
    assert_eq!(
        body,
        page.replacen("href=\"/x\"", "href=\"/k3x9q2a/x\"", 1),
        "rewritten up to the cap, then as it came"
    );
    let metrics = client()
        .get(a.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("flowgate_adapter_rewrite_capped_total 1"),
        "{metrics}"
    );
}

async fn fetch(a: &Adapter, path: &str) -> String {
    let r = client()
        .get(a.url(path))
        .header("accept-encoding", "identity")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.text().await.unwrap()
}

#[tokio::test]
async fn random_html_documents_resolve_as_the_app_meant_them() {
    let a = adapter(start_document_upstream().await).start().await;
    for seed in 0..DOCUMENTS {
        let input = document(seed);
        let output = fetch(&a, &format!("/k3x9q2a/html/{seed}/{seed}")).await;
        check_html(&input, &output, &format!("document {seed}"));
        if seed % 10 == 0 {
            let again = fetch(&a, &format!("/k3x9q2a/html/{seed}/{}/gzip", seed + 7)).await;
            assert_eq!(again, output, "document {seed}: another chunking, gzip");
        }
    }
}

#[tokio::test]
async fn random_stylesheets_resolve_as_the_app_meant_them() {
    let a = adapter(start_document_upstream().await).start().await;
    for seed in 0..STYLESHEETS {
        let input = stylesheet(&mut fastrand::Rng::with_seed(seed));
        let output = fetch(&a, &format!("/k3x9q2a/css/{seed}/{seed}")).await;
        check_css(&input, &output, &format!("stylesheet {seed}"));
        let again = fetch(&a, &format!("/k3x9q2a/css/{seed}/{}/gzip", seed + 1)).await;
        assert_eq!(again, output, "stylesheet {seed}: another chunking, gzip");
    }
}
