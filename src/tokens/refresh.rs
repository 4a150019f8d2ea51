//! One refresher per lineage (what it keeps in memory is
//! [`super::refresher`]). Every refresh of a user's tokens goes through
//! [`Refresher::fresh`]:
//!
//! - callers whose tokens are fresh enough never wait (the hot path);
//! - in one process, callers that need a refresh queue on the lineage's lock;
//!   the first refreshes, the others see the new version and share it (or
//!   share its failure, rather than asking the IdP again);
//! - across replicas, a lease in the database lets one replica refresh while
//!   the others wait for the new version; the lease is short and renewed
//!   while the refresh runs (a heartbeat), so a replica that dies lets go of
//!   its lineages within seconds;
//! - `invalid_grant` from the IdP marks the lineage dead; timeouts and 5xx
//!   leave it alone (retried with backoff, then reported as unavailable).
//!
//! The invariant that keeps a lineage alive: once the IdP's token endpoint
//! has answered 2xx, the refresh token it replaced is never sent again, and
//! the answer is stored before anything else can fail. So a refresh is
//! retried only while no 2xx came back; the new tokens go into the database
//! (or, if the database fails, are held here and stored by the next caller)
//! before the new ID token is checked; an ID token that cannot be checked
//! yet (key set unreachable) waits beside the last verified one and is
//! checked again by later callers, and one that is invalid is dropped while
//! the new refresh token stays. Whether a lineage another caller or replica
//! refreshed is taken or refreshed here, its pending ID token is treated the
//! same way ([`Refresher::adopt`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::metrics::RefreshOutcome;
use crate::oauth::credmgr::CmAsk;
use crate::oauth::upstream::{TokenReply, UpstreamError};
use crate::state::AppState;
use crate::time::now;
use crate::tokens::refresher::{Refresher, Slot, Unsaved};
use crate::vault::{Lineage, TokenSet, VaultError};

/// How long a replica's refresh lease lasts unless renewed: short, so that
/// the lineages of a replica that died are taken over within seconds.
const LEASE_SECS: i64 = 4;
/// How often a replica renews its lease while its refresh runs.
const LEASE_RENEW: Duration = Duration::from_secs(1);
/// How long a caller waits for another replica's refresh: longer than one
/// refresh with all its attempts (three HTTP timeouts and the backoff).
const LEASE_WAIT: Duration = Duration::from_secs(50);
/// Attempts at the IdP for one refresh, with backoff between them; only
/// attempts that got no 2xx are repeated.
const ATTEMPTS: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// The longest `Retry-After` a refresh waits out before its next attempt;
/// a longer one ends the attempts, and callers are told when to come back.
const INLINE_RETRY_AFTER: Duration = Duration::from_secs(2);
/// The most of an IdP's error description kept as a dead lineage's reason.
const REASON_CHARS: usize = 300;

/// What a refresh grant asks the IdP for.
#[derive(Debug, Clone, Copy)]
pub(super) enum Ask<'a> {
    /// The lineage's own tokens.
    Lineage,
    /// The lineage's own tokens through the FABRIC Credential Manager, for
    /// this project and scope.
    Fabric(&'a CmAsk),
    /// A narrower token: these scopes, and an audience sent as the named parameter.
    Narrow { scopes: &'a [String], audience: Option<(&'static str, &'a str)> },
}

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

/// Why fresh tokens cannot be had. Every kind but `NoLineage` and `Dead`
/// keeps the lineage and may pass ([`RefreshError::is_temporary`]).
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// tokenhub has no tokens for the user.
    #[error("tokenhub holds no tokens for this user")]
    NoLineage,
    /// The upstream grant is dead: the user must sign in again.
    #[error("the identity provider no longer accepts this login: {0}")]
    Dead(String),
    /// The IdP's token endpoint could not be reached or answered with a
    /// server error: an outage.
    #[error("the identity provider is unavailable: {0}")]
    Unavailable(String),
    /// The IdP answered, but not with tokens tokenhub can use (another
    /// OAuth error, a broken answer, a 2xx whose body was lost).
    #[error("the identity provider's answer could not be used: {0}")]
    Failed(String),
    /// The tokens were refreshed and stored, but the new ID token cannot be
    /// verified yet and the last verified one has expired.
    #[error("the new ID token cannot be verified yet: {0}")]
    Unverified(String),
    /// Another replica holds the refresh lease and did not finish in time.
    #[error("another replica is refreshing: {0}")]
    Busy(String),
    /// The IdP refused tokenhub's own client (`invalid_client`,
    /// `unauthorized_client`): the operators must fix the registration.
    #[error("the identity provider refused tokenhub's client: {0}")]
    Misconfigured(String),
    /// The IdP refused a narrower token's scopes or audience (the lineage
    /// is kept): its error and description.
    #[error("the identity provider refused the narrower token: {0}")]
    NarrowRefused(String),
    /// The vault failed.
    #[error(transparent)]
    Vault(#[from] VaultError),
}

impl RefreshError {
    /// Whether the lineage is kept and a later try may succeed (callers get
    /// 503 with `Retry-After`).
    pub fn is_temporary(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Failed(_) | Self::Unverified(_) | Self::Busy(_) | Self::Misconfigured(_))
    }
}

/// When a pending ID token (one that came with a refresh and is not
/// verified yet) is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    /// Before answering: a caller is handed only tokens it may use.
    Now,
    /// In the background, after the refresh is stored (keep-alive): the
    /// refresh token is what keeps the lineage alive, and a key set that
    /// fails or hangs must not hold up the lineages behind it.
    Later,
}

impl From<crate::vault::store::StoreError> for RefreshError {
    fn from(e: crate::vault::store::StoreError) -> Self {
        RefreshError::Vault(e.into())
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

/// The `min_valid` honoured, when it is less than the one asked for.
fn capped_by(want: Want) -> impl Fn(&Lineage) -> Option<i64> {
    move |l| want.min_valid.filter(|m| effective_min_valid(l, *m) < *m).map(|m| effective_min_valid(l, m))
}

/// Whether the lineage holds a Credential Manager answer for `ask` (any
/// lineage does when nothing is asked of the CM).
fn answers(lineage: &Lineage, ask: Option<&CmAsk>) -> bool {
    match ask {
        None => true,
        Some(a) => lineage
            .tokens
            .fabric
            .as_ref()
            .is_some_and(|f| f.answers(a.project_id.as_deref(), a.project_name.as_deref(), &a.scope)),
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

/// Whether `lineage` may be handed out: its ID token is verified, or, while
/// a newer one waits to be verified, the last verified one is still valid.
fn servable(lineage: &Lineage) -> Result<(), RefreshError> {
    if lineage.pending_id_token.is_some() && crate::tokens::fabric::id_token_expiry(lineage).is_none_or(|exp| exp <= now()) {
        return Err(RefreshError::Unverified(
            "the new ID token cannot be verified yet (the identity provider's key set is not answering); your tokens are kept"
                .into(),
        ));
    }
    Ok(())
}

impl Refresher {
    /// The user's lineage, refreshed first if `want` asks for it.
    pub async fn fresh(&self, app: &AppState, username: &str, want: Want) -> Result<Fresh, RefreshError> {
        let (fresh, _) = self.fresh_inner(app, username, want, None, Settle::Now, None).await?;
        servable(&fresh.lineage)?;
        Ok(fresh)
    }

    /// [`Refresher::fresh`] for the FABRIC broker: the lineage must also
    /// hold the Credential Manager's answer for `ask` (else it is refreshed
    /// through the CM, one refresh for all callers as any other).
    pub async fn fresh_for_cm(&self, app: &AppState, username: &str, want: Want, ask: CmAsk) -> Result<Fresh, RefreshError> {
        let (fresh, _) = self.fresh_inner(app, username, want, None, Settle::Now, Some(ask)).await?;
        servable(&fresh.lineage)?;
        Ok(fresh)
    }

    /// [`Refresher::fresh`] for a caller that decided on the lineage at
    /// `seen_version` (keep-alive, reading the database): a forced refresh
    /// is skipped when the lineage moved past that version meanwhile (another
    /// replica refreshed it), so replicas never refresh it twice. Also says
    /// whether this call made the upstream refresh (rather than shared one).
    ///
    /// Success means the refresh token is renewed and stored: the new ID
    /// token is checked in the background, and the lineage returned may not
    /// be servable yet (a caller asking later settles it as usual).
    pub async fn fresh_since(
        &self,
        app: &AppState,
        username: &str,
        want: Want,
        seen_version: i64,
    ) -> Result<(Fresh, bool), RefreshError> {
        self.fresh_inner(app, username, want, Some(seen_version), Settle::Later, None).await
    }

    async fn fresh_inner(
        &self,
        app: &AppState,
        username: &str,
        want: Want,
        seen_version: Option<i64>,
        settle: Settle,
        cm_ask: Option<CmAsk>,
    ) -> Result<(Fresh, bool), RefreshError> {
        let issuer = app.upstream.issuer();
        // A forced refresh is skipped only for a refresh completed after the
        // request began: the version it starts from must be the database's,
        // not a cached copy that may be a moment behind.
        let lineage = if want.force {
            app.vault.load(username, issuer).await?.map(Arc::new)
        } else {
            app.vault.load_cached(username, issuer).await?
        };
        let lineage = lineage.ok_or(RefreshError::NoLineage)?;
        let capped = capped_by(want);
        if !lineage.active {
            return Err(RefreshError::Dead("the lineage was marked dead".into()));
        }
        let nothing_held = self.unsaved.load(Ordering::Acquire) == 0;
        if nothing_held
            && lineage.pending_id_token.is_none()
            && !needs_refresh(&lineage, want)
            && answers(&lineage, cm_ask.as_ref())
        {
            let capped_min_valid = capped(&lineage);
            return Ok((Fresh { lineage, refreshed: false, capped_min_valid }, false));
        }
        let seen_version = seen_version.unwrap_or(lineage.version);
        // The rest runs as a task of its own: a caller that goes away (its
        // connection closed) must not cancel a refresh between the IdP's
        // answer and its storing, which would lose the rotated token.
        let (app, user) = (app.clone(), username.to_string());
        tokio::spawn(async move {
            let mut made = false;
            let fresh = app.refresher.refresh_locked(&app, &user, want, seen_version, settle, cm_ask, &mut made).await?;
            Ok((fresh, made))
        })
        .await
        .unwrap_or_else(|e| Err(RefreshError::Failed(format!("the refresh task ended: {e}"))))
    }

    /// The slow path of [`Refresher::fresh`], under the lineage's lock:
    /// share a refresh made meanwhile, or make one.
    #[allow(clippy::too_many_arguments)] // each is one thing the caller decided
    async fn refresh_locked(
        &self,
        app: &AppState,
        username: &str,
        want: Want,
        seen_version: i64,
        settle: Settle,
        cm_ask: Option<CmAsk>,
        made: &mut bool,
    ) -> Result<Fresh, RefreshError> {
        let issuer = app.upstream.issuer();
        let capped = capped_by(want);
        let asked_at = Instant::now();

        let slot = self.slot_for(&lineage_key(username, issuer));
        let mut slot = slot.lock().await;
        self.store_unsaved(app, username, &mut slot).await?;
        // Whoever held the lock before us may have refreshed already (or our
        // cached copy was behind another replica's write).
        let lineage = app.vault.load(username, issuer).await?.ok_or(RefreshError::NoLineage)?;
        let enough = |l: &Lineage| !needs_refresh(l, want) && answers(l, cm_ask.as_ref());
        if lineage.version != seen_version && (want.force || !lineage.active || enough(&lineage)) {
            return self.adopt(app, lineage, settle, capped).await;
        }
        let lineage = self.settle(app, lineage, settle).await?;
        if !lineage.active {
            return Err(RefreshError::Dead("the lineage was marked dead".into()));
        }
        if !want.force && enough(&lineage) {
            return self.settled(lineage, false, capped);
        }
        shared_failure(&slot, asked_at)?;

        let lineage = match self.take_lease(app, &lineage).await? {
            Lease::Ours => lineage,
            Lease::RefreshedElsewhere(newer) => return self.adopt(app, *newer, settle, capped).await,
        };
        // A FABRIC deployment refreshes through the Credential Manager, for
        // what the caller asked or what the held answer was asked for.
        let cm_ask = app.credmgr.as_ref().map(|_| cm_ask.unwrap_or_else(|| CmAsk::of(lineage.tokens.fabric.as_ref())));
        let ask = cm_ask.as_ref().map_or(Ask::Lineage, Ask::Fabric);
        let reply = self.grant_under_lease(app, &lineage, &mut slot, ask).await?;

        // The IdP answered 2xx: the old refresh token may be spent. Store the
        // answer before anything else can fail; the ID token that came with
        // it waits beside the last verified one until it is checked. The
        // CM's FABRIC JWT comes from the CM over TLS and serves as both
        // access and ID token.
        let tokens = TokenSet {
            id_token: match &reply.fabric {
                Some(_) => reply.access_token.clone(),
                None => lineage.tokens.id_token.clone(),
            },
            access_token: reply.access_token,
            refresh_token: reply.refresh_token.or_else(|| lineage.tokens.refresh_token.clone()),
            access_expires_at: reply.expires_in.map(|d| now() + d),
            scope: reply.scope.unwrap_or_else(|| lineage.tokens.scope.clone()),
            fabric: reply.fabric,
        };
        let stored = self.store_answer(app, lineage, tokens, reply.id_token, &mut slot).await?;
        tracing::info!(user = %username, version = stored.version, "tokens refreshed");
        app.audit.record("refresh", Some(username), Some(stored.version), None);
        *made = true;
        app.vault.record_refresh_expiry(username, issuer, stored.version, reply.refresh_expires_in).await;
        let settled = self.settle(app, stored, settle).await;
        // Every refresh reaches the running servers (whatever the ID token's
        // fate): the refresh token in their files was just spent.
        self.deliver(app, username);
        self.settled(settled?, true, capped)
    }

    /// One refresh grant at the IdP under this replica's lease (renewed
    /// while it runs), for the lineage's own tokens or a narrower token. A
    /// refusal of the refresh token (`invalid_grant`; for the lineage's own
    /// tokens any OAuth error) marks the lineage dead; anything else keeps
    /// it, gives the lease back and is remembered in the slot, so callers
    /// queued behind share the failure.
    pub(super) async fn grant_under_lease(
        &self,
        app: &AppState,
        lineage: &Lineage,
        slot: &mut Slot,
        ask: Ask<'_>,
    ) -> Result<TokenReply, RefreshError> {
        let (username, issuer) = (&lineage.username, &lineage.issuer);
        let heartbeat = Heartbeat::start(app, lineage, &self.holder);
        let answer = self.refresh_upstream(app, lineage, ask).await;
        heartbeat.stop().await;
        match answer {
            Ok(reply) => Ok(reply),
            // A narrower request the IdP refuses (a scope or audience it will
            // not give) says nothing about the refresh token: it stays.
            Err(UpstreamError::Refused(reason)) if matches!(ask, Ask::Narrow { .. }) => {
                app.vault.store().release_lease(username, issuer, &self.holder).await?;
                Err(RefreshError::NarrowRefused(reason))
            }
            // A refusal of this refresh token, `invalid_grant` or another
            // OAuth error (some IdPs answer a spent or revoked one with
            // `invalid_request`): the lineage is dead, and the token is
            // never sent again.
            Err(e @ (UpstreamError::InvalidGrant(_) | UpstreamError::Refused(_))) => {
                let reason = dead_reason(&e, lineage);
                app.vault.mark_dead(username, issuer, lineage.version, &reason).await?;
                tracing::warn!(user = %username, reason = %reason, "the identity provider refused the refresh: lineage marked dead");
                app.audit.record("invalid_grant", Some(username), Some(lineage.version), Some(&reason));
                Err(RefreshError::Dead(reason))
            }
            // The CM spent the refresh token and failed after: its
            // replacement is stored (the rest of the lineage unchanged)
            // before anything else, and the callers come back for a JWT.
            Err(UpstreamError::RotatedOnly { refresh_token, why }) => {
                tracing::warn!(user = %username, reason = %why, "the Credential Manager refreshed but failed after; its new refresh token is kept");
                let tokens = TokenSet { refresh_token: Some(refresh_token), ..lineage.tokens.clone() };
                self.store_answer(app, lineage.clone(), tokens, None, slot).await?;
                slot.failed = Some((Instant::now(), false));
                app.audit.record("refresh_failed", Some(username), Some(lineage.version), Some("the CM refreshed, then failed"));
                self.deliver(app, username);
                Err(RefreshError::Failed(why))
            }
            // Anything else keeps the lineage: an outage, an unusable
            // answer, or tokenhub's own client refused (the operators'
            // matter, said as an error).
            Err(e) => {
                let outage = matches!(e, UpstreamError::Unreachable(_) | UpstreamError::KeysUnavailable(_));
                slot.failed = Some((Instant::now(), outage));
                let why = match &e {
                    UpstreamError::Misconfigured(reason) => {
                        tracing::error!(
                            user = %username, reason = %reason,
                            "the identity provider refused tokenhub's client at its token endpoint: check TOKENHUB_OIDC_CLIENT_ID, \
                             TOKENHUB_OIDC_CLIENT_SECRET, TOKENHUB_OIDC_CLIENT_AUTH_METHOD and the client's grant types at the IdP; \
                             the lineage is kept"
                        );
                        "the IdP refused tokenhub's client"
                    }
                    e => {
                        tracing::warn!(user = %username, error = %e, "refresh failed; the lineage is kept");
                        if outage { "the IdP is unavailable" } else { "the IdP's answer could not be used" }
                    }
                };
                app.audit.record("refresh_failed", Some(username), Some(lineage.version), Some(why));
                app.vault.store().release_lease(username, issuer, &self.holder).await?;
                Err(match e {
                    UpstreamError::Misconfigured(reason) => RefreshError::Misconfigured(reason),
                    e if outage => RefreshError::Unavailable(e.to_string()),
                    e => RefreshError::Failed(e.to_string()),
                })
            }
        }
    }

    /// Stores what a 2xx refresh answered (the refresh token it replaced
    /// may be spent): the new lineage, or, if the database does not take
    /// it, the answer held in the slot for the next caller to store.
    pub(super) async fn store_answer(
        &self,
        app: &AppState,
        lineage: Lineage,
        tokens: TokenSet,
        pending_id_token: Option<secrecy::SecretString>,
        slot: &mut Slot,
    ) -> Result<Lineage, RefreshError> {
        match app.vault.save_refresh(&lineage, &tokens, pending_id_token.as_ref()).await {
            Ok(Some(stored)) => Ok(stored),
            // The version moved under us (our lease ran out): take what is there.
            Ok(None) => app.vault.load(&lineage.username, &lineage.issuer).await?.ok_or(RefreshError::NoLineage),
            Err(e) => {
                tracing::error!(user = %lineage.username, error = %e, "the database did not take a refresh answer; it is held in memory");
                slot.unsaved = Some(Unsaved { base: lineage, tokens, pending_id_token });
                self.unsaved.fetch_add(1, Ordering::AcqRel);
                slot.failed = Some((Instant::now(), false));
                Err(e.into())
            }
        }
    }

    /// Takes a lineage another caller or replica refreshed meanwhile: its
    /// pending ID token is settled as on the path that refreshes.
    async fn adopt(
        &self,
        app: &AppState,
        lineage: Lineage,
        settle: Settle,
        capped: impl Fn(&Lineage) -> Option<i64>,
    ) -> Result<Fresh, RefreshError> {
        app.metrics.refresh_waits.inc();
        let lineage = self.settle(app, lineage, settle).await?;
        self.settled(lineage, true, capped)
    }

    /// Settles the lineage's pending ID token, if it has one, now or in
    /// the background.
    async fn settle(&self, app: &AppState, lineage: Lineage, settle: Settle) -> Result<Lineage, RefreshError> {
        if lineage.pending_id_token.is_none() {
            return Ok(lineage);
        }
        match settle {
            Settle::Now => self.settle_id_token(app, lineage).await,
            Settle::Later => {
                let (app, user, issuer) = (app.clone(), lineage.username.clone(), lineage.issuer.clone());
                tokio::spawn(async move {
                    // The check is bound to the version it read: a newer
                    // refresh meanwhile makes it a no-op.
                    if let Ok(Some(current)) = app.vault.load(&user, &issuer).await
                        && current.pending_id_token.is_some()
                    {
                        let _ = app.refresher.settle_id_token(&app, current).await;
                    }
                });
                Ok(lineage)
            }
        }
    }

    /// Checks a lineage's pending ID token: verified, it becomes the
    /// lineage's ID token; invalid, it is dropped (the rest of the refresh
    /// stays); not checkable yet, it waits.
    async fn settle_id_token(&self, app: &AppState, lineage: Lineage) -> Result<Lineage, RefreshError> {
        let Some(pending) = lineage.pending_id_token.as_ref() else {
            return Ok(lineage);
        };
        let check = app
            .upstream
            .check_refreshed_id_token(pending, &lineage.tokens.access_token, &lineage.subject, lineage.login_nonce.as_deref())
            .await;
        let verified = match check {
            Ok(()) => true,
            Err(e @ (UpstreamError::KeysUnavailable(_) | UpstreamError::Unreachable(_))) => {
                tracing::warn!(user = %lineage.username, error = %e, "refreshed ID token not verified yet; the last verified one is kept");
                return Ok(lineage);
            }
            Err(e) => {
                tracing::warn!(user = %lineage.username, error = %e, "refreshed ID token refused; the new access and refresh tokens are kept");
                false
            }
        };
        let username = lineage.username.clone();
        let settled = match app.vault.settle_pending_id_token(&lineage, verified).await? {
            Some(settled) => settled,
            None => app.vault.load(&lineage.username, &lineage.issuer).await?.ok_or(RefreshError::NoLineage)?,
        };
        if verified {
            self.deliver(app, &username);
        }
        Ok(settled)
    }

    /// Rewrites the token file in the user's running servers, in the background.
    pub(super) fn deliver(&self, app: &AppState, username: &str) {
        let (app, user) = (app.clone(), username.to_string());
        tokio::spawn(async move {
            crate::tokens::delivery::write_all(&app, &user).await;
        });
    }

    /// Stores the refresh answer the database did not take earlier, if the
    /// slot holds one: it comes before anything else done under the lock.
    pub(super) async fn store_unsaved(&self, app: &AppState, username: &str, slot: &mut Slot) -> Result<(), RefreshError> {
        if let Some(unsaved) = slot.unsaved.take() {
            // A lost race (`None`) means a newer lineage stands: nothing to keep.
            if let Err(e) = app.vault.save_refresh(&unsaved.base, &unsaved.tokens, unsaved.pending_id_token.as_ref()).await {
                slot.unsaved = Some(unsaved);
                return Err(e.into());
            }
            self.unsaved.fetch_sub(1, Ordering::AcqRel);
            tracing::info!(user = %username, "a refresh answer held in memory is stored");
            self.deliver(app, username);
        }
        Ok(())
    }

    /// The answer for a lineage this call (or another) settled.
    fn settled(
        &self,
        lineage: Lineage,
        refreshed: bool,
        capped: impl Fn(&Lineage) -> Option<i64>,
    ) -> Result<Fresh, RefreshError> {
        if !lineage.active {
            return Err(RefreshError::Dead("the identity provider refused the last refresh".into()));
        }
        let capped_min_valid = capped(&lineage);
        Ok(Fresh { lineage: Arc::new(lineage), refreshed, capped_min_valid })
    }

    /// Takes the database lease, or waits for the replica holding it to
    /// store its result.
    pub(super) async fn take_lease(&self, app: &AppState, lineage: &Lineage) -> Result<Lease, RefreshError> {
        let store = app.vault.store();
        let deadline = tokio::time::Instant::now() + LEASE_WAIT;
        loop {
            let now = now();
            if store.try_lease(&lineage.username, &lineage.issuer, lineage.version, &self.holder, now, now + LEASE_SECS).await? {
                return Ok(Lease::Ours);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let current = app.vault.load(&lineage.username, &lineage.issuer).await?.ok_or(RefreshError::NoLineage)?;
            if current.version != lineage.version {
                return Ok(Lease::RefreshedElsewhere(Box::new(current)));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(RefreshError::Busy("another replica holds the refresh lease".into()));
            }
        }
    }

    /// The refresh at the IdP, retried with backoff only while no attempt got
    /// a 2xx (a 2xx may have spent the refresh token).
    async fn refresh_upstream(&self, app: &AppState, lineage: &Lineage, ask: Ask<'_>) -> Result<TokenReply, UpstreamError> {
        let refresh_token = lineage
            .tokens
            .refresh_token
            .as_ref()
            .ok_or_else(|| UpstreamError::InvalidGrant("the lineage has no refresh token (the login brought none)".into()))?;
        let started = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1;
        let result = loop {
            let answer = match ask {
                Ask::Lineage => app.upstream.refresh_grant(refresh_token).await,
                Ask::Fabric(cm_ask) => match &app.credmgr {
                    Some(cm) => cm.refresh(refresh_token, cm_ask).await.map(TokenReply::from_cm),
                    None => Err(UpstreamError::BadResponse("no Credential Manager is set".into())),
                },
                Ask::Narrow { scopes, audience } => app.upstream.narrow_refresh_grant(refresh_token, scopes, audience).await,
            };
            match answer {
                // A `Retry-After` longer than a caller should wait ends the
                // attempts; a short one is waited out.
                Err(UpstreamError::Unreachable(e))
                    if attempt < ATTEMPTS && app.upstream.wait_asked().is_none_or(|w| w <= INLINE_RETRY_AFTER) =>
                {
                    let wait = app.upstream.wait_asked().map_or(backoff, |w| w.max(backoff));
                    tracing::info!(attempt, error = %e, wait_ms = wait.as_millis() as u64, "refresh attempt got no answer; retrying");
                    tokio::time::sleep(wait).await;
                    backoff *= 2;
                    attempt += 1;
                }
                other => break other,
            }
        };
        app.metrics.upstream_refresh(started.elapsed(), outcome(&result));
        result
    }
}

/// The failure of a refresh that ended after `asked_at` (while the caller
/// queued for the lineage's lock): shared rather than asked for again.
pub(super) fn shared_failure(slot: &Slot, asked_at: Instant) -> Result<(), RefreshError> {
    match slot.failed.filter(|(failed, _)| *failed > asked_at) {
        Some((_, outage)) => {
            let why = "a refresh failed moments ago".to_string();
            Err(if outage { RefreshError::Unavailable(why) } else { RefreshError::Failed(why) })
        }
        None => Ok(()),
    }
}

/// How an upstream refresh ended, for `/metrics`.
fn outcome(result: &Result<TokenReply, UpstreamError>) -> RefreshOutcome {
    match result {
        Ok(_) => RefreshOutcome::Ok,
        Err(UpstreamError::InvalidGrant(_)) => RefreshOutcome::InvalidGrant,
        Err(UpstreamError::Unreachable(_) | UpstreamError::KeysUnavailable(_)) => RefreshOutcome::Unavailable,
        Err(UpstreamError::AnswerLost(_)) => RefreshOutcome::AnswerLost,
        Err(UpstreamError::Refused(_)) => RefreshOutcome::Refused,
        Err(UpstreamError::Misconfigured(_)) => RefreshOutcome::Misconfigured,
        Err(UpstreamError::BadResponse(_) | UpstreamError::BadIdToken(_) | UpstreamError::RotatedOnly { .. }) => {
            RefreshOutcome::Error
        }
    }
}

/// Why the IdP refused the lineage's refresh, as stored and shown: its
/// error and description, shortened, with no token value in it (an IdP
/// could echo the token).
fn dead_reason(e: &UpstreamError, lineage: &Lineage) -> String {
    let (UpstreamError::InvalidGrant(d) | UpstreamError::Refused(d)) = e else {
        return e.to_string();
    };
    let mut reason: String = d.chars().take(REASON_CHARS).collect();
    for secret in [lineage.tokens.refresh_token.as_ref(), Some(&lineage.tokens.access_token)].into_iter().flatten() {
        let secret = secrecy::ExposeSecret::expose_secret(secret);
        if !secret.is_empty() {
            reason = reason.replace(secret, "[token]");
        }
    }
    format!("the identity provider refused the refresh: {reason}")
}

/// The outcome of asking for the database's refresh lease.
pub(super) enum Lease {
    /// This replica holds it, at the version asked for.
    Ours,
    /// Another replica refreshed meanwhile: the newer lineage.
    RefreshedElsewhere(Box<Lineage>),
}

/// Renews this replica's refresh lease every [`LEASE_RENEW`] while its
/// refresh runs, so the lease can be short; ends when stopped or dropped.
struct Heartbeat(tokio::task::JoinHandle<()>);

impl Heartbeat {
    fn start(app: &AppState, lineage: &Lineage, holder: &str) -> Heartbeat {
        let (app, holder) = (app.clone(), holder.to_string());
        let (user, issuer, version) = (lineage.username.clone(), lineage.issuer.clone(), lineage.version);
        Heartbeat(tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE_RENEW).await;
                let now = now();
                match app.vault.store().try_lease(&user, &issuer, version, &holder, now, now + LEASE_SECS).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(user = %user, "the refresh lease was lost while the refresh ran");
                        return;
                    }
                    // The next beat tries again; the lease lasts a few more.
                    Err(e) => tracing::warn!(user = %user, error = %e, "the refresh lease could not be renewed"),
                }
            }
        }))
    }

    /// Stops renewing, and waits until a renewal in flight is over (it
    /// would otherwise take the lease again after it is given back).
    async fn stop(mut self) {
        self.0.abort();
        let _ = (&mut self.0).await;
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The key of a lineage's slot in this process.
pub(super) fn lineage_key(username: &str, issuer: &str) -> String {
    format!("{username}\0{issuer}")
}
