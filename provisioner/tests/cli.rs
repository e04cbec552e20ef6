//! The command line's conventions that need no cluster: `--version` with the
//! commit, `completion`, and `create --dry-run` printing the objects it would
//! apply (YAML by default, a JSON List with `-o json`).

use std::process::Command;

fn flowgate(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flowgate"))
        .args(args)
        // no cluster anywhere: dry-run must not look for one
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("FLOWGATE_ACCESS_KEYS")
        // the route flags are the test's (testenv's node env sets these)
        .env_remove("FLOWGATE_ROUTE_KIND")
        .env_remove("FLOWGATE_GATEWAY")
        .env_remove("FLOWGATE_TLS_SECRET")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

#[test]
fn version_names_the_commit() {
    let (ok, out, _) = flowgate(&["--version"]);
    assert!(ok);
    let commit = out
        .trim()
        .strip_prefix(&format!("flowgate {} (", env!("CARGO_PKG_VERSION")))
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{out}"));
    let head = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    match head {
        // built from a checkout: that checkout's commit (or the one before a
        // commit made after the build)
        Some(_) => assert!(
            commit.len() == 12 && commit.chars().all(|c| c.is_ascii_hexdigit()),
            "{out}"
        ),
        None => assert_eq!(commit, "unknown"),
    }
}

#[test]
fn completion_scripts() {
    for (shell, marker) in [
        ("bash", "_flowgate()"),
        ("zsh", "#compdef flowgate"),
        ("fish", "complete -c flowgate"),
    ] {
        let (ok, out, err) = flowgate(&["completion", shell]);
        assert!(ok, "{err}");
        assert!(
            out.contains(marker),
            "{shell}: {}",
            &out[..out.len().min(300)]
        );
        assert!(out.contains("dry-run"), "{shell} completes create's flags");
    }
    let (ok, _, err) = flowgate(&["completion", "tcsh"]);
    assert!(!ok && err.contains("tcsh"), "{err}");
}

#[test]
fn create_dry_run_prints_the_objects_without_a_cluster() {
    let base = [
        "--namespace",
        "jobs",
        "--host",
        "ml.example.test",
        "create",
        "--workload",
        "panda 6543210",
        "--artifacts",
        "https://store.example.test/job.tgz",
        "--sha256",
        SHA,
        "--dry-run",
    ];
    let (ok, yaml, err) = flowgate(&base);
    assert!(ok, "{err}");
    assert!(
        err.contains("--route-kind auto"),
        "says what it assumed: {err}"
    );
    let kinds: Vec<&str> = yaml
        .lines()
        .filter_map(|l| l.strip_prefix("kind: "))
        .collect();
    assert_eq!(kinds, ["Deployment", "Service", "Ingress"], "{yaml}");
    assert_eq!(yaml.matches("---\n").count(), 3);
    assert!(yaml.contains("namespace: jobs"));
    assert!(
        !yaml.contains("ownerReferences"),
        "no uid without a cluster"
    );
    // access `link` by default: the adapter mounts the access keys
    assert!(yaml.contains("FLOWGATE_ACCESS_KEYS"), "{yaml}");

    let mut args = base.to_vec();
    args.extend(["--access", "public", "--route-kind", "route", "-o", "json"]);
    // global flags may come after the subcommand, as kubectl's do
    let (ok, json, err) = flowgate(&args);
    assert!(ok, "{err}");
    let list: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(list["kind"], "List");
    let items = list["items"].as_array().unwrap();
    let kinds: Vec<_> = items.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["Deployment", "Service", "Route"]);
    let id = items[0]["metadata"]["labels"]["flowgate.io/instance"]
        .as_str()
        .unwrap();
    assert_eq!(items[2]["spec"]["path"], format!("/{id}"));
    assert!(
        !json.contains("FLOWGATE_ACCESS_KEYS"),
        "public: no keys mounted"
    );

    // bad input is refused as on a real create
    let (ok, _, err) = flowgate(&[
        "create",
        "--workload",
        "w",
        "--artifacts",
        "ftp://x/y.tgz",
        "--sha256",
        SHA,
        "--dry-run",
    ]);
    assert!(!ok && err.contains("ftp"), "{err}");
}

/// `--route-kind gateway` previews an HTTPRoute attached to `--gateway`; the
/// settings it needs are checked before anything is made.
#[test]
fn create_dry_run_shows_an_http_route_for_a_gateway() {
    let base = [
        "--host",
        "ml.example.test",
        "create",
        "--workload",
        "w1",
        "--artifacts",
        "https://store.example.test/job.tgz",
        "--sha256",
        SHA,
        "--dry-run",
        "-o",
        "json",
    ];
    let with = |extra: &[&'static str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        flowgate(&args)
    };
    let (ok, json, err) = with(&["--route-kind", "gateway", "--gateway", "infra/shared"]);
    assert!(ok, "{err}");
    let list: serde_json::Value = serde_json::from_str(&json).unwrap();
    let items = list["items"].as_array().unwrap();
    let kinds: Vec<_> = items.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["Deployment", "Service", "HTTPRoute"]);
    let id = items[0]["metadata"]["labels"]["flowgate.io/instance"]
        .as_str()
        .unwrap();
    let route = &items[2];
    assert_eq!(route["apiVersion"], "gateway.networking.k8s.io/v1");
    assert_eq!(route["spec"]["parentRefs"][0]["namespace"], "infra");
    assert_eq!(route["spec"]["parentRefs"][0]["name"], "shared");
    assert_eq!(route["spec"]["hostnames"][0], "ml.example.test");
    assert_eq!(
        route["spec"]["rules"][0]["matches"][0]["path"]["value"],
        format!("/{id}")
    );
    assert_eq!(
        route["spec"]["rules"][0]["backendRefs"][0]["name"],
        items[1]["metadata"]["name"]
    );

    // auto with a Gateway configured shows what a cluster without OpenShift picks
    let (ok, json, err) = with(&["--gateway", "infra/shared"]);
    assert!(ok && json.contains("\"HTTPRoute\""), "{err}");
    assert!(err.contains("HTTPRoute"), "{err}");

    let (ok, _, err) = with(&["--route-kind", "gateway"]);
    assert!(!ok && err.contains("--gateway NAMESPACE/NAME"), "{err}");
    let (ok, _, err) = with(&["--route-kind", "gateway", "--gateway", "shared"]);
    assert!(!ok && err.contains("NAMESPACE/NAME"), "{err}");
    let (ok, _, err) = with(&[
        "--route-kind",
        "gateway",
        "--gateway",
        "infra/shared",
        "--tls-secret",
        "cert",
    ]);
    assert!(
        !ok && err.contains("tls-secret") && err.contains("infra/shared"),
        "{err}"
    );
}
