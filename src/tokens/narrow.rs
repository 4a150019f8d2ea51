//! Narrower tokens: an access token for fewer scopes and/or another
//! audience, had from the user's lineage (`GET /api/v1/tokens?scope=…&audience=…`).
//!
//! The operator's rules ([`super::rules`]) are checked first, then the
//! lineage's own scopes (never wider), and only then the vault's cache
//! ([`crate::vault::narrow`]), which answers only the lineage a token was
//! obtained from. A token is obtained through the lineage's single flight:
//! by a refresh grant under the lineage's lock and lease (the rotated
//! refresh token is stored before anyone is answered, as on every refresh),
//! or by an RFC 8693 exchange of the lineage's fresh access token under a
//! lock of the request's own. Concurrent callers asking for the same
//! request cause one grant.

use std::sync::Arc;

use crate::config::{AudienceParam, NarrowMechanism};
use crate::oauth::upstream::UpstreamError;
use crate::state::AppState;
use crate::time::now;
use crate::tokens::refresh::{Ask, Lease, RefreshError, Want, lineage_key, shared_failure};
use crate::vault::narrow::NarrowToken;
use crate::vault::{Lineage, TokenSet};

/// The longest scope list or audience a caller may ask for.
const MAX_REQUEST_CHARS: usize = 1024;

/// Seconds the lineage's access token must have left to be exchanged.
const SUBJECT_MIN_VALID: i64 = 30;

/// What a caller asks for: sorted, distinct scopes and an audience.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarrowRequest {
    /// Scopes, sorted and distinct (empty: the IdP's default for the audience).
    pub scopes: Vec<String>,
    /// Audience or resource, if any.
    pub audience: Option<String>,
}

impl NarrowRequest {
    /// The request from the query's `scope` (space-separated) and
    /// `audience`; `None` when neither is given (the lineage's own tokens).
    pub fn parse(scope: Option<&str>, audience: Option<&str>) -> Result<Option<Self>, String> {
        let scope = scope.map(str::trim).filter(|s| !s.is_empty());
        let audience = audience.map(str::trim).filter(|s| !s.is_empty());
        if scope.is_none() && audience.is_none() {
            return Ok(None);
        }
        if scope.map_or(0, str::len) > MAX_REQUEST_CHARS || audience.map_or(0, str::len) > MAX_REQUEST_CHARS {
            return Err(format!("scope and audience are at most {MAX_REQUEST_CHARS} characters"));
        }
        let printable = |s: &str| s.chars().all(|c| c.is_ascii_graphic());
        let mut scopes: Vec<String> = scope.unwrap_or("").split(' ').filter(|s| !s.is_empty()).map(str::to_string).collect();
        if !scopes.iter().all(|s| printable(s)) || !audience.is_none_or(printable) {
            return Err("scopes and the audience are printable ASCII without spaces (scopes separated by one space)".into());
        }
        scopes.sort();
        scopes.dedup();
        Ok(Some(Self { scopes, audience: audience.map(str::to_string) }))
    }

    /// The request's key in the cache: sorted scopes, then the audience.
    pub fn key(&self) -> String {
        format!("{}|{}", self.scopes.join(" "), self.audience.as_deref().unwrap_or(""))
    }
}

/// Why a narrower token cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum NarrowError {
    /// The operator's rules do not allow the request (names the rule).
    #[error("{0}")]
    NotAllowed(String),
    /// A scope the lineage does not hold.
    #[error("{0}")]
    WiderThanLogin(String),
    /// The hub could not say the user's groups.
    #[error(transparent)]
    Hub(#[from] crate::hub::HubError),
    /// The lineage or the IdP failed (as for the lineage's own tokens).
    #[error(transparent)]
    Refresh(#[from] RefreshError),
}

impl From<crate::vault::VaultError> for NarrowError {
    fn from(e: crate::vault::VaultError) -> Self {
        Self::Refresh(e.into())
    }
}

/// The mechanism in use: the setting, else the exchange when the provider
/// lists it, else a refresh grant.
async fn mechanism(app: &AppState) -> Result<NarrowMechanism, RefreshError> {
    if let Some(m) = app.config.narrow.mechanism {
        return Ok(m);
    }
    match app.upstream.offers_token_exchange().await {
        Ok(true) => Ok(NarrowMechanism::Exchange),
        Ok(false) => Ok(NarrowMechanism::Refresh),
        Err(e) => Err(RefreshError::Unavailable(e.to_string())),
    }
}

/// The audience as a token-request parameter for `mechanism`.
fn audience_param<'a>(app: &AppState, mechanism: NarrowMechanism, request: &'a NarrowRequest) -> Option<(&'static str, &'a str)> {
    let param = app.config.narrow.audience_param.unwrap_or(match mechanism {
        NarrowMechanism::Refresh => AudienceParam::Resource,
        NarrowMechanism::Exchange => AudienceParam::Audience,
    });
    request.audience.as_deref().map(|a| (param.name(), a))
}

/// The scopes the lineage holds: those the IdP granted, and those asked
/// for at login (an IdP reports an access token's scopes, which for a
/// resource's scopes may be fewer than its refresh token holds).
fn lineage_scopes<'a>(app: &'a AppState, lineage: &'a Lineage) -> impl Iterator<Item = &'a str> {
    lineage.tokens.scope.split_whitespace().chain(app.config.upstream.scopes.iter().map(String::as_str))
}

/// How much life a narrower token must have left to be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// At least this many seconds (none: unexpired), capped at 90% of the
    /// token's lifetime so a caller asking for more does not cause a grant
    /// on every call: the API's `min_valid`.
    MinValid(Option<i64>),
    /// At least this many seconds or half its lifetime, whichever is less:
    /// a file is renewed by its half-life at the latest.
    Renew(i64),
}

/// Whether a held token is fresh enough.
fn serves(token: &NarrowToken, freshness: Freshness) -> bool {
    let Some(expires_at) = token.expires_at else { return true };
    let lifetime = (expires_at - token.obtained_at).max(1);
    let wanted = match freshness {
        Freshness::MinValid(min_valid) => min_valid.unwrap_or(0).min(lifetime - (lifetime / 10).max(1)),
        Freshness::Renew(seconds) => seconds.min(lifetime / 2),
    };
    expires_at - now() > wanted
}

/// A narrower token for `username` (checked against the rules and the
/// lineage, answered from the vault when one held serves, else obtained).
pub async fn token(
    app: &AppState,
    username: &str,
    request: &NarrowRequest,
    freshness: Freshness,
) -> Result<NarrowToken, NarrowError> {
    let groups = app.hub.groups(username).await?;
    super::rules::check(&app.config.narrow.rules, &groups, &request.scopes, request.audience.as_deref())
        .map_err(NarrowError::NotAllowed)?;
    let issuer = app.upstream.issuer();
    let lineage = app.vault.load_cached(username, issuer).await?.ok_or(RefreshError::NoLineage)?;
    if !lineage.active {
        return Err(RefreshError::Dead("the lineage was marked dead".into()).into());
    }
    if let Some(scope) = request.scopes.iter().find(|s| !lineage_scopes(app, &lineage).any(|h| h == s.as_str())) {
        return Err(NarrowError::WiderThanLogin(format!("your login does not hold the scope {scope:?}")));
    }
    let key = request.key();
    if let Some(held) = app.vault.narrow_token(&lineage, &key).await?
        && serves(&held, freshness)
    {
        return Ok(held);
    }
    // The rest runs as a task of its own, as a refresh does: a caller that
    // goes away must not cancel a grant between its answer and its storing.
    let (app, user, request) = (app.clone(), username.to_string(), request.clone());
    tokio::spawn(async move {
        match mechanism(&app).await? {
            NarrowMechanism::Refresh => by_refresh(&app, &user, &request, freshness).await,
            NarrowMechanism::Exchange => by_exchange(&app, &user, &request, freshness).await,
        }
    })
    .await
    .unwrap_or_else(|e| Err(RefreshError::Failed(format!("the grant task ended: {e}")).into()))
}

/// A narrower token from the IdP's answer.
fn from_reply(reply: &crate::oauth::upstream::TokenReply, request: &NarrowRequest) -> NarrowToken {
    let now = now();
    NarrowToken {
        access_token: reply.access_token.clone(),
        scopes: reply.scope.clone().unwrap_or_else(|| request.scopes.join(" ")),
        audience: request.audience.clone(),
        expires_at: reply.expires_in.map(|d| now + d),
        obtained_at: now,
    }
}

/// A refresh grant asking for the narrower token, under the lineage's lock
/// and the database's lease: the lineage's new refresh token is stored
/// (its access token stays) before the narrower token, and before anyone
/// is answered.
async fn by_refresh(
    app: &AppState,
    username: &str,
    request: &NarrowRequest,
    freshness: Freshness,
) -> Result<NarrowToken, NarrowError> {
    let refresher = &app.refresher;
    let issuer = app.upstream.issuer();
    let key = request.key();
    let asked_at = std::time::Instant::now();
    let slot = refresher.slot_for(&lineage_key(username, issuer));
    let mut slot = slot.lock().await;
    refresher.store_unsaved(app, username, &mut slot).await?;
    loop {
        let lineage = app.vault.load(username, issuer).await?.ok_or(RefreshError::NoLineage)?;
        if !lineage.active {
            return Err(RefreshError::Dead("the lineage was marked dead".into()).into());
        }
        // Whoever held the lock before us may have obtained it, or failed
        // at the IdP: that failure is shared, not asked for again.
        if let Some(held) = app.vault.narrow_token(&lineage, &key).await?
            && serves(&held, freshness)
        {
            return Ok(held);
        }
        shared_failure(&slot, asked_at)?;
        let lineage = match refresher.take_lease(app, &lineage).await? {
            Lease::Ours => lineage,
            // Another replica refreshed: look again (it may have obtained ours).
            Lease::RefreshedElsewhere(_) => continue,
        };
        let audience = audience_param(app, NarrowMechanism::Refresh, request);
        let ask = Ask::Narrow { scopes: &request.scopes, audience };
        let reply = refresher.grant_under_lease(app, &lineage, &mut slot, ask).await?;
        let token = from_reply(&reply, request);
        let tokens = TokenSet {
            refresh_token: reply.refresh_token.or_else(|| lineage.tokens.refresh_token.clone()),
            ..lineage.tokens.clone()
        };
        let stored = refresher.store_answer(app, lineage, tokens, None, &mut slot).await?;
        tracing::info!(user = %username, version = stored.version, "narrower token obtained by a refresh grant");
        app.audit.record("narrow_token", Some(username), Some(stored.version), Some(&describe(request, "refresh grant")));
        // The refresh token in the servers' files was just spent.
        refresher.deliver(app, username);
        if let Err(e) = app.vault.save_narrow_token(&stored, &key, &token).await {
            tracing::warn!(user = %username, error = %e, "the narrower token was not kept; it is obtained again next time");
        }
        return Ok(token);
    }
}

/// An RFC 8693 exchange of the lineage's fresh access token, under a lock
/// of the request's own (an exchange rotates nothing, so the lineage's
/// lock stays free). Any refresh token the exchange returns is not kept:
/// the next token is exchanged again from the lineage's.
async fn by_exchange(
    app: &AppState,
    username: &str,
    request: &NarrowRequest,
    freshness: Freshness,
) -> Result<NarrowToken, NarrowError> {
    let issuer = app.upstream.issuer();
    let key = request.key();
    let slot = app.refresher.slot_for(&format!("{}\0narrow\0{key}", lineage_key(username, issuer)));
    let _flight = slot.lock().await;
    loop {
        // The subject token must outlive the exchange by a margin.
        let want = Want { min_valid: Some(SUBJECT_MIN_VALID), force: false };
        let lineage: Arc<Lineage> = app.refresher.fresh(app, username, want).await?.lineage;
        if let Some(held) = app.vault.narrow_token(&lineage, &key).await?
            && serves(&held, freshness)
        {
            return Ok(held);
        }
        // Across replicas, the lineage's lease: another replica exchanging
        // for the same request meanwhile stored its token before it gave
        // the lease back, so holding it we see that token.
        if let Lease::RefreshedElsewhere(_) = app.refresher.take_lease(app, &lineage).await? {
            continue; // the lineage was refreshed meanwhile: start again from it
        }
        let obtained = exchange_under_lease(app, &lineage, request, freshness).await;
        // An exchange spends nothing: the lease goes back whatever the answer.
        if let Err(e) = app.vault.store().release_lease(username, issuer, &app.refresher.holder).await {
            tracing::warn!(user = %username, error = %e, "the lease was not given back; it runs out in seconds");
        }
        return obtained;
    }
}

/// The exchange itself, the lease held: the token held if another replica
/// obtained it meanwhile, else a new one, stored before the lease goes back.
async fn exchange_under_lease(
    app: &AppState,
    lineage: &Lineage,
    request: &NarrowRequest,
    freshness: Freshness,
) -> Result<NarrowToken, NarrowError> {
    let (username, key) = (&lineage.username, request.key());
    if let Some(held) = app.vault.narrow_token(lineage, &key).await?
        && serves(&held, freshness)
    {
        return Ok(held);
    }
    let audience = audience_param(app, NarrowMechanism::Exchange, request);
    let reply = app.upstream.exchange_grant(&lineage.tokens.access_token, &request.scopes, audience).await.map_err(|e| {
        tracing::warn!(user = %username, error = %e, "token exchange failed");
        RefreshError::from_exchange(e)
    })?;
    let token = from_reply(&reply, request);
    app.audit.record("narrow_token", Some(username), Some(lineage.version), Some(&describe(request, "token exchange")));
    if let Err(e) = app.vault.save_narrow_token(lineage, &key, &token).await {
        tracing::warn!(user = %username, error = %e, "the narrower token was not kept; it is obtained again next time");
    }
    Ok(token)
}

/// What was obtained, for the audit log (no value).
fn describe(request: &NarrowRequest, how: &str) -> String {
    format!("scope {:?} audience {:?} by {how}", request.scopes.join(" "), request.audience.as_deref().unwrap_or(""))
}

impl RefreshError {
    /// What a failed exchange means for the caller: the lineage is never
    /// touched by one.
    fn from_exchange(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Unreachable(d) | UpstreamError::KeysUnavailable(d) => RefreshError::Unavailable(d),
            UpstreamError::Refused(d) | UpstreamError::InvalidGrant(d) => RefreshError::NarrowRefused(d),
            UpstreamError::Misconfigured(d) => RefreshError::Misconfigured(d),
            e => RefreshError::Failed(e.to_string()),
        }
    }
}
