//! Route classes of the app behind the adapter (the MLflow profile): what a
//! path is decides whether its responses may be rewritten, and labels metrics.

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
    fn classifies_mlflow_paths() {
        let table = [
            ("/", RouteClass::Ui),
            ("/static-files/static/js/main.js", RouteClass::Static),
            ("/get-artifact", RouteClass::Artifact),
            ("/model-versions/get-artifact", RouteClass::Artifact),
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
