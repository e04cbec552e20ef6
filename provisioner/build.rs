//! The git commit `flowgate --version` names: `FLOWGATE_GIT_COMMIT` when the
//! build sets it (an image build without `.git`), else `git rev-parse`, else
//! `unknown`.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=FLOWGATE_GIT_COMMIT");
    let commit = std::env::var("FLOWGATE_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            let out = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            let c = String::from_utf8(out.stdout).ok()?.trim().to_owned();
            (out.status.success() && !c.is_empty()).then_some(c)
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=FLOWGATE_GIT_COMMIT={commit}");
    // A new commit moves HEAD or the branch it points at.
    let git = Path::new("../.git");
    if git.join("HEAD").exists() {
        println!("cargo:rerun-if-changed=../.git/HEAD");
        if let Ok(head) = std::fs::read_to_string(git.join("HEAD"))
            && let Some(branch) = head.trim().strip_prefix("ref: ")
            && git.join(branch).exists()
        {
            println!("cargo:rerun-if-changed=../.git/{branch}");
        }
    }
}
