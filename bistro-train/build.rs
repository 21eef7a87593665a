//! Records the git commit the binaries are built from (`--version`, the build-info metric).
//! `BISTRO_GIT_HASH` in the environment wins (container builds without `.git`); without
//! either the commit reads `unknown`.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string()).filter(|s| !s.is_empty())
}

fn main() {
    println!("cargo:rerun-if-env-changed=BISTRO_GIT_HASH");
    let hash = std::env::var("BISTRO_GIT_HASH").ok().filter(|s| !s.is_empty()).or_else(|| {
        // Rebuild when HEAD moves: HEAD itself (checkout) and the branch it names (commit).
        // (Only files that exist: a missing one would rerun this script on every build.)
        if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
            let dir = std::path::PathBuf::from(dir);
            let mut watch = vec![dir.join("HEAD"), dir.join("packed-refs")];
            if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
                watch.push(dir.join(r));
            }
            for p in watch.iter().filter(|p| p.exists()) {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
        git(&["rev-parse", "--short=12", "HEAD"])
    });
    println!("cargo:rustc-env=BISTRO_GIT_HASH={}", hash.unwrap_or_else(|| "unknown".into()));
}
