//! Counters exposed at `/metrics` in the Prometheus text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Process-wide counters (one per `App`, so tests stay independent).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Completed upstream logins.
    pub logins: AtomicU64,
    /// Logins that failed at the callback.
    pub login_failures: AtomicU64,
    /// Token responses sent to the hub.
    pub hub_tokens_issued: AtomicU64,
    /// Token-endpoint requests refused.
    pub hub_token_errors: AtomicU64,
    /// Upstream refreshes keep-alive made.
    pub keepalive_refreshes: AtomicU64,
    /// Keep-alive refreshes that failed (IdP unavailable or refusing).
    pub keepalive_failures: AtomicU64,
}

impl Metrics {
    /// Adds one to a counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, help, value) in [
            ("tokenhub_logins_total", "Completed upstream logins.", &self.logins),
            ("tokenhub_login_failures_total", "Logins that failed at the callback.", &self.login_failures),
            ("tokenhub_hub_tokens_issued_total", "Token responses sent to JupyterHub.", &self.hub_tokens_issued),
            ("tokenhub_hub_token_errors_total", "Token requests from JupyterHub refused.", &self.hub_token_errors),
            ("tokenhub_keepalive_refreshes_total", "Refreshes made by keep-alive for users with running servers.", &self.keepalive_refreshes),
            ("tokenhub_keepalive_failures_total", "Keep-alive refreshes that failed (the lineage is kept unless the IdP said invalid_grant).", &self.keepalive_failures),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", value.load(Ordering::Relaxed));
        }
        out
    }
}
