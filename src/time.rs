//! Wall-clock time as unix seconds, the unit every stored timestamp uses.

/// Seconds since the unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}
