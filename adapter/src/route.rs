//! Route classes of the app behind the adapter (the MLflow profile): what a
//! path is decides whether its responses may be rewritten, and labels metrics.
//!
//! The app routes on the percent-decoded path (werkzeug behind gunicorn or
//! uvicorn decodes before matching, `%2F` included), so the adapter does too:
//! [`canonical_path`] decodes, merges slashes and removes dot segments, and the
//! adapter matches its prefix, classifies and forwards that canonical path, so
//! what is classified is exactly what the app will route.

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use std::borrow::Cow;

/// Bytes re-encoded when a canonical path is written out: everything a path
/// may not hold literally, and `%` itself, so the app decodes back to exactly
/// the canonical path.
const PATH_ESCAPE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// Why a request path cannot be forwarded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidPath {
    /// The decoded path is not UTF-8.
    #[error("the decoded path is not UTF-8")]
    NotUtf8,
    /// The decoded path holds a control character (NUL, CR, LF, ...).
    #[error("the decoded path holds a control character")]
    Control,
    /// The path does not start with `/`.
    #[error("the path does not start with '/'")]
    NotAbsolute,
}

/// The path as the app will route it, written so that the app decodes it back
/// to the same: percent-decoded, `//` merged into `/`, `.` and `..` segments
/// removed (never above the root), then re-encoded where a path needs it.
///
/// Paths that need none of this come back borrowed.
pub fn canonical_path(raw: &str) -> Result<Cow<'_, str>, InvalidPath> {
    if !raw.starts_with('/') {
        return Err(InvalidPath::NotAbsolute);
    }
    let plain = raw
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/-._~!$&'()*+,;=:@".contains(&b));
    if plain && !raw.contains("//") && !raw.contains("/.") {
        return Ok(Cow::Borrowed(raw));
    }
    let decoded: Cow<'_, [u8]> = percent_decode_str(raw).into();
    let decoded = std::str::from_utf8(&decoded).map_err(|_| InvalidPath::NotUtf8)?;
    if decoded.chars().any(char::is_control) {
        return Err(InvalidPath::Control);
    }
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split('/').skip(1) {
        trailing_slash = true;
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => {
                segments.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(raw.len());
    for segment in &segments {
        out.push('/');
        out.extend(utf8_percent_encode(segment, PATH_ESCAPE));
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// What kind of thing a request (path after the prefix) asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RouteClass {
    /// UI pages (`/`, `/#...` is client-side).
    Ui,
    /// JSON APIs (`/api/`, `/ajax-api/`, `/graphql`).
    Api,
    /// The app's own static bundles (`/static-files/`).
    Static,
    /// A user's artefact bytes: never modified, whatever their type.
    Artifact,
    /// The adapter's own endpoints (`/healthz`, `/readyz`, `/metrics`).
    Own,
    /// Outside the prefix: answered 404 by the adapter.
    Outside,
}

impl RouteClass {
    /// Every class, in label order.
    pub const ALL: [RouteClass; 6] = [
        RouteClass::Ui,
        RouteClass::Api,
        RouteClass::Static,
        RouteClass::Artifact,
        RouteClass::Own,
        RouteClass::Outside,
    ];

    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            RouteClass::Ui => "ui",
            RouteClass::Api => "api",
            RouteClass::Static => "static",
            RouteClass::Artifact => "artifact",
            RouteClass::Own => "own",
            RouteClass::Outside => "outside",
        }
    }

    /// Index into per-class arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Classifies a path as the upstream sees it (prefix already stripped).
    pub fn of_upstream_path(path: &str) -> Self {
        if path.starts_with("/static-files/") {
            return RouteClass::Static;
        }
        if path.starts_with("/get-artifact") || path.starts_with("/model-versions/get-artifact") {
            return RouteClass::Artifact;
        }
        let api = path.starts_with("/api/") || path.starts_with("/ajax-api/");
        if api && path.contains("artifact") {
            // get-artifact, mlflow-artifacts/*, logged-model and trace artefact
            // downloads: a user's bytes, served as they were logged.
            return RouteClass::Artifact;
        }
        if api || path.starts_with("/graphql") {
            return RouteClass::Api;
        }
        RouteClass::Ui
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_paths_are_what_the_app_routes() {
        let table = [
            ("/", "/"),
            ("/k3x9q2a/", "/k3x9q2a/"),
            (
                "/k3x9q2a/ajax-api/2.0/mlflow/runs/search",
                "/k3x9q2a/ajax-api/2.0/mlflow/runs/search",
            ),
            ("/k3x9q2a/%67et-artifact", "/k3x9q2a/get-artifact"),
            (
                "/k3x9q2a/api/2.0/mlflow-%61rtifacts/%61rtifacts/x.css",
                "/k3x9q2a/api/2.0/mlflow-artifacts/artifacts/x.css",
            ),
            ("/k3x9q2a//get-artifact", "/k3x9q2a/get-artifact"),
            ("/k3x9q2a/%2Fget-artifact", "/k3x9q2a/get-artifact"),
            ("/k3x9q2a/x/../get-artifact", "/k3x9q2a/get-artifact"),
            ("/k3x9q2a/x/%2e%2E/get-artifact", "/k3x9q2a/get-artifact"),
            ("/k3x9q2a/./a/.", "/k3x9q2a/a/"),
            ("/k3x9q2a/..", "/"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/k3x9q2a/a%20b", "/k3x9q2a/a%20b"),
            ("/k3x9q2a/a%3Fb%23c", "/k3x9q2a/a%3Fb%23c"),
            ("/k3x9q2a/100%25", "/k3x9q2a/100%25"),
            ("/k3x9q2a/%zz", "/k3x9q2a/%25zz"),
            ("/k3x9q2a/%252e%252e/x", "/k3x9q2a/%252e%252e/x"),
            ("/k3x9q2a/caf%C3%A9", "/k3x9q2a/caf%C3%A9"),
            ("/k3x9q2a/a\\..\\b", "/k3x9q2a/a%5C..%5Cb"),
            ("/k3x9q2a/.well-known/x", "/k3x9q2a/.well-known/x"),
        ];
        for (raw, want) in table {
            assert_eq!(canonical_path(raw).unwrap(), want, "{raw}");
            // The app decodes the canonical path once and routes that; our
            // canonical form of it is the same: nothing changes on a second pass.
            assert_eq!(canonical_path(want).unwrap(), want, "{want} is stable");
        }
        assert_eq!(canonical_path("/k3x9q2a/%FF"), Err(InvalidPath::NotUtf8));
        assert_eq!(canonical_path("/k3x9q2a/a%00b"), Err(InvalidPath::Control));
        assert_eq!(
            canonical_path("/k3x9q2a/a%0d%0aX: y"),
            Err(InvalidPath::Control)
        );
        assert_eq!(canonical_path("*"), Err(InvalidPath::NotAbsolute));
    }

    #[test]
    fn classifies_mlflow_paths() {
        let table = [
            ("/", RouteClass::Ui),
            ("/static-files/static/js/main.js", RouteClass::Static),
            ("/get-artifact", RouteClass::Artifact),
            ("/model-versions/get-artifact", RouteClass::Artifact),
            (
                "/ajax-api/2.0/mlflow/get-trace-artifact",
                RouteClass::Artifact,
            ),
            (
                "/ajax-api/3.0/mlflow/get-trace-artifact",
                RouteClass::Artifact,
            ),
            (
                "/ajax-api/2.0/mlflow/logged-models/m-1/artifacts/files",
                RouteClass::Artifact,
            ),
            (
                "/ajax-api/2.0/mlflow-artifacts/artifacts/1/x/report.html",
                RouteClass::Artifact,
            ),
            ("/api/2.0/mlflow-artifacts/artifacts", RouteClass::Artifact),
            ("/ajax-api/2.0/mlflow/artifacts/list", RouteClass::Artifact),
            ("/ajax-api/2.0/mlflow/runs/search", RouteClass::Api),
            ("/api/2.0/mlflow/experiments/list", RouteClass::Api),
            ("/graphql", RouteClass::Api),
            ("/health", RouteClass::Ui),
        ];
        for (path, want) in table {
            assert_eq!(RouteClass::of_upstream_path(path), want, "{path}");
        }
    }
}
