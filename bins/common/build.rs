//! Build script of every rd binary: records the git commit for `--version` as `RD_COMMIT`.
//!
//! `RD_COMMIT` from the environment wins (for builds from a source tarball); without it and
//! without git (or outside a checkout) the commit reads `unknown` rather than failing the build.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

fn main() {
    println!("cargo:rerun-if-env-changed=RD_COMMIT");
    let commit = std::env::var("RD_COMMIT").ok().filter(|c| !c.is_empty());
    let commit = commit.or_else(|| {
        // Rebuild when HEAD moves: HEAD itself (a checkout) and the branch it points at (a commit).
        for path in ["HEAD", "packed-refs"] {
            if let Some(p) = git(&["rev-parse", "--git-path", path]) {
                println!("cargo:rerun-if-changed={p}");
            }
        }
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            if let Some(p) = git(&["rev-parse", "--git-path", &branch]) {
                println!("cargo:rerun-if-changed={p}");
            }
        }
        // No "-dirty" mark: the build script does not rerun on every source edit, so the
        // mark would go stale.
        git(&["rev-parse", "--short=12", "HEAD"])
    });
    println!(
        "cargo:rustc-env=RD_COMMIT={}",
        commit.as_deref().unwrap_or("unknown")
    );
}
