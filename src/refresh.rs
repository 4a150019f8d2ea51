//! One refresher per lineage. Every refresh of a user's tokens goes through
//! [`Refresher::fresh`]:
//!
//! - callers whose tokens are fresh enough never wait (the hot path);
//! - in one process, callers that need a refresh queue on the lineage's lock;
//!   the first refreshes, the others see the new version and share it;
//! - across replicas, a lease in the database lets one replica refresh while
//!   the others wait for the new version;
//! - the rotated refresh token is stored (with a version check) before any
//!   caller gets an answer, and then written to the user's running servers;
//! - `invalid_grant` from the IdP marks the lineage dead; timeouts and 5xx
//!   leave it alone (retried with backoff, then reported as unavailable).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use crate::crypto::random_token;
use crate::state::AppState;
use crate::time::now;
use crate::upstream::UpstreamError;
use crate::vault::{Lineage, VaultError};

/// How long a replica may hold the refresh lease.
const LEASE_SECS: i64 = 30;
/// Attempts at the IdP for one refresh, with backoff between them.
const ATTEMPTS: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// What a caller asks of the tokens.
#[derive(Debug, Clone, Copy, Default)]
pub struct Want {
    /// Seconds the access token must stay valid.
    pub min_valid: Option<i64>,
    /// Refresh even if the tokens are fresh enough, unless a refresh
    /// completed since the caller's request began.
    pub force: bool,
}

/// The outcome: the lineage and whether this call refreshed it.
#[derive(Debug)]
pub struct Fresh {
    /// The current lineage.
    pub lineage: Arc<Lineage>,
    /// Whether an upstream refresh happened for (or while) this call.
    pub refreshed: bool,
    /// The lifetime that was honoured, when `min_valid` asked for more than
    /// the IdP issues.
    pub capped_min_valid: Option<i64>,
}

/// Why fresh tokens cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// tokenhub has no tokens for the user.
    #[error("tokenhub holds no tokens for this user")]
    NoLineage,
    /// The upstream grant is dead: the user must sign in again.
    #[error("the identity provider no longer accepts this login: {0}")]
    Dead(String),
    /// The IdP is unreachable or failing; the lineage is kept.
    #[error("the identity provider is unavailable: {0}")]
    Unavailable(String),
    /// The vault failed.
    #[error(transparent)]
    Vault(#[from] VaultError),
}

impl From<crate::store::StoreError> for RefreshError {
    fn from(e: crate::store::StoreError) -> Self {
        RefreshError::Vault(e.into())
    }
}

/// The per-lineage locks of this process and its lease-holder name.
///
/// The lock map holds weak references: a lineage's lock lives exactly as
/// long as some caller holds or waits for it, so two callers can never get
/// different locks for one lineage while one is held (a time- or size-evicted
/// cache could drop a held lock and hand out a second), and entries whose
/// lock nobody holds are pruned, so the map stays as small as the number of
/// lineages being refreshed at once.
#[derive(Debug)]
pub struct Refresher {
    locks: std::sync::Mutex<HashMap<String, std::sync::Weak<Mutex<()>>>>,
    holder: String,
}

impl Default for Refresher {
    fn default() -> Self {
        Self { locks: Default::default(), holder: format!("replica-{}", &random_token()[..12]) }
    }
}

/// The lifetime the IdP gives access tokens, as seen on this lineage.
fn issued_lifetime(lineage: &Lineage) -> Option<i64> {
    let issued = lineage.refreshed_at.unwrap_or(lineage.updated_at);
    lineage.tokens.access_expires_at.map(|exp| exp - issued).filter(|l| *l > 0)
}

/// The `min_valid` that can be honoured: at most 90% of the lifetime the IdP
/// issues, so that a caller asking for more does not refresh on every call.
fn effective_min_valid(lineage: &Lineage, min_valid: i64) -> i64 {
    match issued_lifetime(lineage) {
        Some(lifetime) => min_valid.min(lifetime - (lifetime / 10).max(1)),
        None => min_valid,
    }
}

fn needs_refresh(lineage: &Lineage, want: Want) -> bool {
    if want.force {
        return true;
    }
    let remaining = lineage.tokens.access_expires_at.map(|exp| exp - now());
    match (remaining, want.min_valid) {
        (Some(remaining), Some(min)) => remaining < effective_min_valid(lineage, min),
        (Some(remaining), None) => remaining <= 0,
        (None, _) => false, // the IdP gave no expiry: nothing to go by
    }
}

impl Refresher {
    /// The lock of lineage `key` (the same `Arc` for every caller while any
    /// caller holds one).
    pub fn lock_for(&self, key: &str) -> Arc<Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lock) = locks.get(key).and_then(std::sync::Weak::upgrade) {
            return lock;
        }
        // Amortized pruning: at most every time the map doubles past 64.
        if locks.len() >= 64 && locks.len().is_power_of_two() {
            locks.retain(|_, weak| weak.strong_count() > 0);
        }
        let lock = Arc::new(Mutex::new(()));
        locks.insert(key.to_string(), Arc::downgrade(&lock));
        lock
    }

    /// Drops the entries of locks nobody holds.
    pub fn sweep(&self) {
        self.locks.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, weak| weak.strong_count() > 0);
    }

    /// How many lineage locks the map holds (held or not yet pruned).
    pub fn lock_count(&self) -> usize {
        self.locks.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The user's lineage, refreshed first if `want` asks for it.
    pub async fn fresh(&self, app: &AppState, username: &str, want: Want) -> Result<Fresh, RefreshError> {
        let issuer = app.upstream.issuer();
        let lineage = app.vault.load_cached(username, issuer).await?.ok_or(RefreshError::NoLineage)?;
        let capped = |l: &Lineage| want.min_valid.filter(|m| effective_min_valid(l, *m) < *m).map(|m| effective_min_valid(l, m));
        if !lineage.active {
            return Err(RefreshError::Dead("the lineage was marked dead".into()));
        }
        if !needs_refresh(&lineage, want) {
            let capped_min_valid = capped(&lineage);
            return Ok(Fresh { lineage, refreshed: false, capped_min_valid });
        }
        let seen_version = lineage.version;

        let lock = self.lock_for(&format!("{username}\0{issuer}"));
        let _guard = lock.lock().await;
        // Whoever held the lock before us may have refreshed already (or our
        // cached copy was behind another replica's write).
        let lineage = app.vault.load(username, issuer).await?.ok_or(RefreshError::NoLineage)?;
        if lineage.version != seen_version && (want.force || !lineage.active || !needs_refresh(&lineage, want)) {
            return self.settled(lineage, capped);
        }

        let lineage = match self.take_lease(app, &lineage).await? {
            Lease::Ours => lineage,
            Lease::RefreshedElsewhere(newer) => return self.settled(newer, capped),
        };
        match self.refresh_upstream(app, &lineage).await {
            Ok(tokens) => {
                let stored = match app.vault.save_refresh(&lineage, &tokens).await? {
                    Some(stored) => stored,
                    // The version moved under us (our lease ran out): take what is there.
                    None => app.vault.load(username, issuer).await?.ok_or(RefreshError::NoLineage)?,
                };
                tracing::info!(user = %username, version = stored.version, "tokens refreshed");
                app.audit.record("refresh", Some(username), Some(stored.version), None);
                let (app2, user) = (app.clone(), username.to_string());
                tokio::spawn(async move {
                    crate::delivery::write_all(&app2, &user).await;
                });
                let capped_min_valid = capped(&stored);
                Ok(Fresh { lineage: Arc::new(stored), refreshed: true, capped_min_valid })
            }
            Err(UpstreamError::InvalidGrant(reason)) => {
                app.vault.mark_dead(username, issuer, lineage.version).await?;
                tracing::warn!(user = %username, "refresh refused with invalid_grant: lineage marked dead");
                app.audit.record("invalid_grant", Some(username), Some(lineage.version), Some("the IdP refused the refresh"));
                Err(RefreshError::Dead(reason))
            }
            Err(e) => {
                app.vault.store().release_lease(username, issuer, &self.holder).await?;
                tracing::warn!(user = %username, error = %e, "refresh failed; the lineage is kept");
                app.audit.record("refresh_failed", Some(username), Some(lineage.version), Some("the IdP is unavailable"));
                Err(RefreshError::Unavailable(e.to_string()))
            }
        }
    }

    /// A lineage someone else just refreshed (or killed).
    fn settled(&self, lineage: Lineage, capped: impl Fn(&Lineage) -> Option<i64>) -> Result<Fresh, RefreshError> {
        if !lineage.active {
            return Err(RefreshError::Dead("the identity provider refused the last refresh".into()));
        }
        let capped_min_valid = capped(&lineage);
        Ok(Fresh { lineage: Arc::new(lineage), refreshed: true, capped_min_valid })
    }

    /// Takes the database lease, or waits for the replica holding it to
    /// store its result.
    async fn take_lease(&self, app: &AppState, lineage: &Lineage) -> Result<Lease, RefreshError> {
        let store = app.vault.store();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(LEASE_SECS as u64 + 5);
        loop {
            let now = now();
            if store.try_lease(&lineage.username, &lineage.issuer, &self.holder, now, now + LEASE_SECS).await? {
                return Ok(Lease::Ours);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let current = app
                .vault
                .load(&lineage.username, &lineage.issuer)
                .await?
                .ok_or(RefreshError::NoLineage)?;
            if current.version != lineage.version {
                return Ok(Lease::RefreshedElsewhere(current));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(RefreshError::Unavailable("another replica holds the refresh lease".into()));
            }
        }
    }

    async fn refresh_upstream(&self, app: &AppState, lineage: &Lineage) -> Result<crate::vault::TokenSet, UpstreamError> {
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            match app.upstream.refresh(&lineage.tokens, &lineage.subject).await {
                Err(UpstreamError::Unreachable(e)) | Err(UpstreamError::BadResponse(e)) | Err(UpstreamError::Refused(e))
                    if attempt < ATTEMPTS =>
                {
                    tracing::info!(attempt, error = %e, "refresh attempt failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

enum Lease {
    Ours,
    RefreshedElsewhere(Lineage),
}
