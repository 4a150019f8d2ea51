//! Build-time facts compiled into the binary:
//! - rebuilds when a migration is added: `sqlx::migrate!` embeds the
//!   migrations folders at compile time, and cargo does not watch them by
//!   itself (the build script sqlx's documentation recommends);
//! - `TOKENHUB_COMMIT`, the source's commit for `tokenhub --version`: the
//!   variable of that name when the build sets it (the Dockerfile does,
//!   from its build argument COMMIT: its context has no `.git`), else
//!   `git rev-parse`, else "unknown".
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-env-changed=TOKENHUB_COMMIT");
    let commit =
        std::env::var("TOKENHUB_COMMIT").ok().filter(|c| !c.is_empty()).or_else(git_commit).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=TOKENHUB_COMMIT={commit}");
}

/// HEAD's short commit; asks cargo to run this again when HEAD moves.
fn git_commit() -> Option<String> {
    let git = |args: &[&str]| {
        let out = Command::new("git").args(args).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let dir = git(&["rev-parse", "--git-dir"])?;
    println!("cargo:rerun-if-changed={dir}/HEAD");
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        println!("cargo:rerun-if-changed={dir}/{branch}");
    }
    println!("cargo:rerun-if-changed={dir}/packed-refs");
    git(&["rev-parse", "--short=12", "HEAD"])
}
