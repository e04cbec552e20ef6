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
