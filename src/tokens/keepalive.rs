//! Keep-alive: while a user has a running server, tokenhub refreshes the
//! user's lineage before the refresh token would die unused (IdPs end idle
//! refresh tokens: Keycloak after the SSO session's idle timeout, CILogon
//! after 24 hours), so a job that fetches a token hours later still gets one.
//!
//! One background task per replica runs rounds: it pages through the active
//! lineages in the database and, for each one whose refresh token nears its
//! end (from the IdP's `refresh_expires_in`, else from the operator's idle
//! timeout) — or, when asked, whose access token nears its end — asks the hub
//! whether the user runs a server, reads the lineage again from the
//! database, and refreshes through [`super::refresher::Refresher`], which rewrites
//! the token files and keeps single flight and the database lease.
//!
//! - Replicas agree on when a lineage is due (the same spread from its user
//!   name), decide on the database's current row, and pass the version they
//!   decided on to the refresher: a lineage another replica refreshed
//!   meanwhile is not refreshed again.
//! - Work is spread: each lineage is due at its own point of the margin
//!   before its deadline, rounds are jittered, and a round works through
//!   due lineages one at a time, the one closest to its end first.
//! - A lineage's outcome is what happened to its refresh token: stored is
//!   done, whatever the new ID token's state (it is checked in the
//!   background, as for any caller). One lineage's failure does not end the
//!   round; only an IdP whose token endpoint cannot be reached does, and the
//!   next round still comes one interval later: it tries the lineage closest
//!   to its end first, so the first refresh after an outage comes within one
//!   interval of the IdP's return. The refresher never marks a lineage dead
//!   for an outage; only the IdP's `invalid_grant` does.
//! - What each round did is in `/metrics` and on the operator's page
//!   ([`crate::metrics::KeepaliveFigures`]).

use std::collections::HashMap;
use std::time::Duration;

use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::KeepaliveConfig;
use crate::metrics::KeepaliveFailure;
use crate::state::AppState;
use crate::time::now;
use crate::tokens::refresh::{RefreshError, Want};
use crate::vault::store::LineageTimes;

/// Lineages read from the database at a time.
const PAGE: i64 = 500;
/// The longest wait between rounds after the vault failed, in intervals
/// (an IdP outage does not lengthen the wait: see the module's doc).
const MAX_BACKOFF_INTERVALS: u32 = 4;
/// How long shutdown waits for a refresh in progress.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a lineage is refreshed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The refresh token would die unused.
    RefreshToken,
    /// The access token expires (always-fresh files were asked for).
    AccessToken,
}

impl Why {
    fn as_str(self) -> &'static str {
        match self {
            Why::RefreshToken => "refresh token nears its idle end",
            Why::AccessToken => "access token nears expiry",
        }
    }
}

/// A number from the user name, the same on every replica: where in the
/// spread window the lineage is due.
fn spread_of(username: &str) -> u64 {
    let hex = crate::vault::crypto::digest_hex(&format!("tokenhub keep-alive\0{username}"));
    u64::from_str_radix(&hex[..16], 16).unwrap_or(0)
}

/// A lineage keep-alive is to refresh now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    /// Why.
    pub why: Why,
    /// When the token it is kept for ends (unix seconds).
    pub end: i64,
}

/// Whether the lineage is due for a keep-alive refresh at `now`, and why.
pub fn plan(config: &KeepaliveConfig, times: &LineageTimes, now: i64) -> Option<Why> {
    due(config, times, now).map(|d| d.why)
}

/// [`plan`], with the end the refresh is made for.
pub fn due(config: &KeepaliveConfig, times: &LineageTimes, now: i64) -> Option<Due> {
    if !times.has_refresh_token {
        return None; // nothing to keep alive (and nothing to refresh with)
    }
    let last = times.refreshed_at.unwrap_or(times.created_at);
    let spread = spread_of(&times.username);
    // Due `margin` before the end, earlier by up to half the margin: at most
    // half the token's lifetime, so a short-lived token is not refreshed
    // constantly and the due point never falls before its issue.
    let due_at = |end: i64| {
        let margin = config.margin.min((end - last).max(0) / 2);
        let early = (spread % (margin as u64 / 2 + 1)) as i64;
        end - margin - early
    };
    let refresh_end = times.refresh_expires_at.or(config.idle_timeout.map(|idle| last + idle));
    // Past its end the refresh token is most likely dead already: keep-alive
    // does not try (the next real use finds out and asks for a new login).
    if let Some(end) = refresh_end
        && now < end
        && now >= due_at(end)
    {
        return Some(Due { why: Why::RefreshToken, end });
    }
    if config.fresh_access
        && let Some(expires) = times.access_expires_at
        && now >= due_at(expires)
    {
        return Some(Due { why: Why::AccessToken, end: refresh_end.unwrap_or(i64::MAX) });
    }
    None
}

/// The running keep-alive task of this replica.
pub struct KeepAlive {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl KeepAlive {
    /// Starts keep-alive, unless it is off or cannot know who runs a server.
    pub fn start(app: AppState) -> Option<KeepAlive> {
        let interval = app.config.keepalive.interval?;
        if !app.hub.configured() {
            tracing::warn!(
                "keep-alive is off: the hub API is not configured (JUPYTERHUB_API_URL, JUPYTERHUB_API_TOKEN), \
                 so tokenhub cannot tell who runs a server"
            );
            return None;
        }
        let config = &app.config.keepalive;
        tracing::info!(
            interval_secs = interval.as_secs(),
            idle_timeout = ?config.idle_timeout,
            margin = config.margin,
            grace = config.grace,
            fresh_access = config.fresh_access,
            "keep-alive started"
        );
        let (stop, stopped) = watch::channel(false);
        let runner = Runner { app, interval, stopped, last_seen: HashMap::new(), failures: 0 };
        Some(KeepAlive { stop, task: tokio::spawn(runner.run()) })
    }

    /// Stops after the refresh in progress, if any (never in the middle of
    /// one: its answer must be stored).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(STOP_TIMEOUT, self.task).await.is_err() {
            tracing::warn!("keep-alive did not stop in time");
        }
    }
}

/// Runs one keep-alive round now, apart from the background task (for
/// tests and tools); `Err` says why it ended early.
pub async fn round_once(app: &AppState) -> Result<(), String> {
    let (_stop, stopped) = watch::channel(false);
    let interval = app.config.keepalive.interval.unwrap_or(Duration::from_secs(60));
    let mut runner = Runner { app: app.clone(), interval, stopped, last_seen: HashMap::new(), failures: 0 };
    runner.round().await.map_err(|e| e.to_string())
}

/// A round's reason to stop early.
#[derive(Debug, thiserror::Error)]
enum Pause {
    #[error("the identity provider is unavailable: {0}")]
    IdpUnavailable(String),
    #[error("the vault failed: {0}")]
    Vault(String),
}

struct Runner {
    app: AppState,
    interval: Duration,
    stopped: watch::Receiver<bool>,
    /// When this replica last saw a server of each user (for the grace period).
    last_seen: HashMap<String, i64>,
    /// Rounds in a row that ended early.
    failures: u32,
}

impl Runner {
    async fn run(mut self) {
        // Replicas started together begin at different points of the interval.
        let mut wait = self.interval.mul_f64(rand::thread_rng().gen_range(0.1..1.0));
        loop {
            if self.sleep(wait).await {
                break;
            }
            let factor = match self.round().await {
                Ok(()) => {
                    self.failures = 0;
                    1
                }
                Err(e) => {
                    self.failures = self.failures.saturating_add(1);
                    tracing::warn!(error = %e, failures = self.failures, "keep-alive round ended early");
                    match e {
                        // Lineages die on the IdP's clock: the next round
                        // tries the most urgent one an interval from now.
                        Pause::IdpUnavailable(_) => 1,
                        Pause::Vault(_) => 2u32.saturating_pow(self.failures).min(MAX_BACKOFF_INTERVALS),
                    }
                }
            };
            // Jittered, but never later than `factor` intervals.
            wait = (self.interval * factor).mul_f64(rand::thread_rng().gen_range(0.75..1.0));
        }
        tracing::info!("keep-alive stopped");
    }

    fn stopping(&self) -> bool {
        *self.stopped.borrow()
    }

    /// Sleeps; true when keep-alive is to stop.
    async fn sleep(&mut self, duration: Duration) -> bool {
        if self.stopping() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(duration) => self.stopping(),
            // A change is the stop signal; an error means the handle is gone.
            _ = self.stopped.changed() => true,
        }
    }

    /// One pass over every due lineage, the one closest to its end first;
    /// its figures go to the metrics however it ends.
    async fn round(&mut self) -> Result<(), Pause> {
        let mut figures = RoundFigures::default();
        let result = self.round_with(&mut figures).await;
        let k = &self.app.metrics.keepalive;
        k.rounds.inc();
        k.last_round_at.set(now());
        k.last_round_due.set(figures.due);
        k.last_round_refreshed.set(figures.refreshed);
        k.last_round_closest.set(figures.closest.unwrap_or(-1));
        result
    }

    async fn round_with(&mut self, figures: &mut RoundFigures) -> Result<(), Pause> {
        let issuer = self.app.upstream.issuer().to_string();
        let store = self.app.vault.store().clone();
        let mut queue = Vec::new();
        let mut after = String::new();
        loop {
            let page = store.active_lineages(&issuer, &after, PAGE).await.map_err(|e| Pause::Vault(e.to_string()))?;
            let at = now();
            queue.extend(page.iter().filter_map(|t| due(&self.app.config.keepalive, t, at).map(|d| (d.end, t.username.clone()))));
            match page.last() {
                Some(last) if page.len() as i64 == PAGE => after = last.username.clone(),
                _ => break,
            }
        }
        queue.sort();
        figures.due = queue.len() as i64;
        for (end, username) in queue {
            if self.stopping() {
                return Ok(());
            }
            if !self.serving(&username).await {
                continue;
            }
            let left = end - now();
            figures.closest = Some(figures.closest.map_or(left, |c| c.min(left)));
            if self.keep(&issuer, &username).await? {
                figures.refreshed += 1;
            }
        }
        let (now, grace) = (now(), self.app.config.keepalive.grace);
        self.last_seen.retain(|_, seen| now - *seen <= grace);
        // The narrower-token files of running servers, renewed before they expire.
        crate::tokens::files::renew_all(&self.app).await.map_err(|e| Pause::Vault(e.to_string()))
    }

    /// Whether the user runs a server (or did within the grace period).
    async fn serving(&mut self, username: &str) -> bool {
        let now = now();
        match self.app.hub.servers(username).await {
            Ok(servers) if !servers.is_empty() => {
                self.last_seen.insert(username.to_string(), now);
                true
            }
            Ok(_) => self.last_seen.get(username).is_some_and(|seen| now - seen <= self.app.config.keepalive.grace),
            // One refresh too many costs little; a lineage let die costs the
            // user's job: while the hub does not answer, keep it alive.
            Err(e) => {
                tracing::warn!(user = %username, error = %e, "keep-alive cannot ask the hub for the user's servers; keeping the tokens alive");
                true
            }
        }
    }

    /// Decides again on the database's current row, then refreshes; true
    /// when this replica refreshed the lineage. Only an IdP that cannot be
    /// reached, or the vault, ends the round.
    async fn keep(&mut self, issuer: &str, username: &str) -> Result<bool, Pause> {
        let store = self.app.vault.store();
        let times = match store.active_lineage_times(username, issuer).await {
            Ok(Some(times)) => times,
            Ok(None) => return Ok(false),
            Err(e) => return Err(Pause::Vault(e.to_string())),
        };
        let Some(why) = plan(&self.app.config.keepalive, &times, now()) else {
            return Ok(false); // another replica (or a caller) refreshed it meanwhile
        };
        let want = Want { min_valid: None, force: true };
        let figures = &self.app.metrics.keepalive;
        let error = match self.app.refresher.fresh_since(&self.app, username, want, times.version).await {
            // `made`: this replica refreshed (not another one, meanwhile).
            Ok((fresh, made)) => {
                if made {
                    figures.refreshes.inc();
                    tracing::info!(user = %username, reason = why.as_str(), version = fresh.lineage.version, "keep-alive refreshed the user's tokens");
                    self.app.audit.record("keepalive_refresh", Some(username), Some(fresh.lineage.version), Some(why.as_str()));
                }
                return Ok(made);
            }
            Err(RefreshError::NoLineage) => return Ok(false),
            Err(e) => e,
        };
        let cause = match &error {
            RefreshError::Dead(_) => KeepaliveFailure::Refused,
            RefreshError::Unavailable(_) => KeepaliveFailure::IdpUnreachable,
            RefreshError::Busy(_) => KeepaliveFailure::Busy,
            RefreshError::Misconfigured(_) => KeepaliveFailure::Misconfigured,
            RefreshError::Vault(_) => KeepaliveFailure::Vault,
            _ => KeepaliveFailure::IdpError,
        };
        figures.failed(cause);
        match error {
            RefreshError::Dead(reason) => {
                tracing::warn!(user = %username, reason = %reason, "keep-alive: the identity provider refused the refresh; the user must sign in again");
                Ok(false)
            }
            RefreshError::Unavailable(e) => {
                tracing::warn!(user = %username, error = %e, "keep-alive refresh failed: the identity provider cannot be reached; the lineage is kept");
                Err(Pause::IdpUnavailable(e))
            }
            // Every other lineage would meet the same refusal.
            RefreshError::Misconfigured(e) => Err(Pause::IdpUnavailable(e)),
            RefreshError::Vault(e) => Err(Pause::Vault(e.to_string())),
            e => {
                tracing::warn!(user = %username, error = %e, "keep-alive refresh failed; the lineage is kept, the round goes on");
                Ok(false)
            }
        }
    }
}

/// What one round did, for the metrics.
#[derive(Debug, Default)]
struct RoundFigures {
    due: i64,
    refreshed: i64,
    /// The least time a lineage it tried had left, in seconds.
    closest: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(idle: Option<i64>, margin: i64, fresh_access: bool) -> KeepaliveConfig {
        KeepaliveConfig { interval: Some(Duration::from_secs(60)), idle_timeout: idle, margin, grace: 0, fresh_access }
    }

    fn times(user: &str, refreshed_at: i64) -> LineageTimes {
        LineageTimes {
            username: user.into(),
            version: 1,
            has_refresh_token: true,
            created_at: refreshed_at - 100,
            refreshed_at: Some(refreshed_at),
            access_expires_at: Some(refreshed_at + 3600),
            refresh_expires_at: None,
        }
    }

    #[test]
    fn due_in_the_margin_before_the_idle_end_and_not_after_it() {
        let c = config(Some(1800), 600, false);
        let t = times("ada", 10_000);
        // Idle end 11_800; due from 11_200 minus up to 300 of spread.
        assert_eq!(plan(&c, &t, 10_000 + 800), None);
        assert_eq!(plan(&c, &t, 11_200), Some(Why::RefreshToken));
        assert_eq!(plan(&c, &t, 11_799), Some(Why::RefreshToken));
        assert_eq!(plan(&c, &t, 11_800), None, "past the end the token is dead: not tried");
    }

    #[test]
    fn the_idps_refresh_expiry_wins_over_the_setting() {
        let c = config(Some(1800), 600, false);
        let mut t = times("bob", 10_000);
        t.refresh_expires_at = Some(10_400);
        // Margin capped at half the lifetime (200), spread up to 100.
        assert_eq!(plan(&c, &t, 10_099), None);
        assert_eq!(plan(&c, &t, 10_200), Some(Why::RefreshToken));
        assert_eq!(plan(&c, &t, 10_400), None);
    }

    #[test]
    fn nothing_is_due_without_a_known_end_or_a_refresh_token() {
        let t = times("cy", 10_000);
        assert_eq!(plan(&config(None, 600, false), &t, 20_000), None);
        let mut t = times("cy", 10_000);
        t.has_refresh_token = false;
        assert_eq!(plan(&config(Some(1800), 600, true), &t, 11_700), None);
    }

    #[test]
    fn fresh_access_refreshes_before_the_access_token_expires() {
        let c = config(None, 600, true);
        let t = times("dee", 10_000);
        assert_eq!(plan(&c, &t, 12_000), None);
        assert_eq!(plan(&c, &t, 13_000), Some(Why::AccessToken));
    }

    #[test]
    fn lineages_of_one_moment_are_spread() {
        let c = config(Some(1800), 1200, false);
        let due: std::collections::HashSet<i64> = (0..200)
            .map(|i| {
                let t = times(&format!("user{i}"), 10_000);
                (10_000..11_800).find(|now| plan(&c, &t, *now).is_some()).unwrap()
            })
            .collect();
        // Due points spread over the window (margin 900 after capping: 450 s).
        assert!(due.len() > 100, "{} distinct due points", due.len());
        assert!(due.iter().all(|d| (10_000 + 450..=10_000 + 900).contains(d)), "{due:?}");
    }
}
