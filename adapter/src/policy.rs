//! What a read-only instance forwards (`--writes off`, the default): `GET` and
//! `HEAD`, and the `POST`s with which MLflow's own UI reads. Anything else
//! would change a finished job's store, or make MLflow fetch a URL of the
//! visitor's choosing (`experiments/create` with an `http://` artifact
//! location), so it is refused before it reaches the app.
//!
//! The list comes from the real UIs (every `POST` the Chromium walks of MLflow
//! 3.17 and 1.9.1 make, `testenv/browser/walk.test.mjs`) and from the servers'
//! route tables (`mlflow.server.app.url_map`): of the `POST` routes of either
//! version, these are the ones whose handlers only read. `/graphql` is a read
//! too: its only mutations are `mlflowSearchRuns` and `mlflowSearchDatasets`.

use http::Method;

/// `POST` endpoints that only read, below the API roots `/ajax-api/` (the UI)
/// and `/api/` (clients).
const READ_ONLY_POSTS: [&str; 13] = [
    // MLflow 1.x
    "2.0/preview/mlflow/runs/search",
    // MLflow 1.x to 3.x
    "2.0/mlflow/runs/search",
    // MLflow 2.x and 3.x
    "2.0/mlflow/experiments/search",
    "2.0/mlflow/experiments/search-datasets",
    "2.0/mlflow/logged-models/search",
    "2.0/mlflow/registered-models/get-latest-versions",
    "3.0/mlflow/traces/search",
    "3.0/mlflow/traces/batchGetInfos",
    "3.0/mlflow/traces/metrics",
    "3.0/mlflow/traces/calculate-filter-correlation",
    "3.0/mlflow/datasets/search",
    "3.0/mlflow/issues/search",
    "3.0/mlflow/prompt-optimization/jobs/search",
];

/// Whether a read-only instance forwards `method` on `path` (the canonical
/// path as the app routes it, instance prefix stripped).
pub fn read_only_allows(method: &Method, path: &str) -> bool {
    match *method {
        Method::GET | Method::HEAD => true,
        Method::POST => {
            path == "/graphql"
                || ["/ajax-api/", "/api/"]
                    .iter()
                    .filter_map(|root| path.strip_prefix(root))
                    .any(|rest| READ_ONLY_POSTS.contains(&rest))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pass_and_writes_do_not() {
        let table: &[(Method, &str, bool)] = &[
            (Method::GET, "/", true),
            (Method::HEAD, "/get-artifact", true),
            (Method::GET, "/ajax-api/2.0/mlflow/runs/delete", true),
            (Method::POST, "/ajax-api/2.0/mlflow/runs/search", true),
            (Method::POST, "/api/2.0/mlflow/runs/search", true),
            (
                Method::POST,
                "/ajax-api/2.0/preview/mlflow/runs/search",
                true,
            ),
            (
                Method::POST,
                "/ajax-api/2.0/mlflow/experiments/search",
                true,
            ),
            (Method::POST, "/ajax-api/3.0/mlflow/traces/search", true),
            (Method::POST, "/graphql", true),
            (
                Method::POST,
                "/ajax-api/2.0/mlflow/experiments/create",
                false,
            ),
            (Method::POST, "/ajax-api/2.0/mlflow/runs/delete", false),
            (Method::POST, "/ajax-api/2.0/mlflow/runs/log-batch", false),
            (Method::POST, "/ajax-api/2.0/mlflow/runs/search/", false),
            (Method::POST, "/ajax-api/2.0/mlflow/runs/searchx", false),
            (Method::POST, "/x/ajax-api/2.0/mlflow/runs/search", false),
            (Method::POST, "/graphql/x", false),
            (
                Method::POST,
                "/ajax-api/2.0/mlflow-artifacts/mpu/create/x",
                false,
            ),
            (
                Method::PUT,
                "/ajax-api/2.0/mlflow-artifacts/artifacts/x",
                false,
            ),
            (
                Method::PATCH,
                "/ajax-api/2.0/mlflow/registered-models/update",
                false,
            ),
            (
                Method::DELETE,
                "/ajax-api/2.0/mlflow/registered-models/delete",
                false,
            ),
            (Method::OPTIONS, "/ajax-api/2.0/mlflow/runs/search", false),
            (Method::TRACE, "/", false),
            (Method::CONNECT, "/", false),
        ];
        for (method, path, want) in table {
            assert_eq!(read_only_allows(method, path), *want, "{method} {path}");
        }
    }
}
