//! Rebuilds when a migration is added: `sqlx::migrate!` embeds the
//! migrations folders at compile time, and cargo does not watch them by
//! itself (the build script sqlx's documentation recommends).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
