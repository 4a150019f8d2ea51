//! Ending a lineage: its refresh token revoked at the IdP (RFC 7009, where
//! the IdP offers revocation), then the lineage deleted from the vault. The
//! user's own revoke and an operator's share it.
//!
//! It runs under the same per-lineage lock and database lease a refresh
//! takes, so no refresh is in flight on any replica: the token revoked is
//! the newest the IdP issued, and no refresh stores a new one afterwards (an
//! IdP that revokes only the one token, not the whole grant, would otherwise
//! leave the token from a racing refresh valid).

use secrecy::ExposeSecret;

use super::refresh::{Lease, RefreshError, lineage_key};
use super::refresher::Refresher;
use crate::state::AppState;

/// What the IdP did when a lineage was revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdpRevocation {
    /// It revoked the refresh token (RFC 7009).
    Revoked,
    /// It offers no revocation endpoint.
    NotOffered,
    /// It could not be reached, or refused: the token stays valid there.
    Unreachable,
    /// The lineage held no refresh token.
    NoRefreshToken,
}

/// A lineage that was revoked and deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revoked {
    /// What the IdP did.
    pub idp: IdpRevocation,
    /// The version deleted (for the audit line).
    pub version: i64,
}

impl Refresher {
    /// Revokes the user's lineage at the IdP and deletes it; `None` when
    /// tokenhub holds none. Waits for a refresh in flight to finish first
    /// (here or on another replica); `Unavailable` if another replica holds
    /// the refresh lease past its term.
    pub async fn revoke(&self, app: &AppState, username: &str) -> Result<Option<Revoked>, RefreshError> {
        let issuer = app.upstream.issuer();
        let slot = self.slot_for(&lineage_key(username, issuer));
        let mut slot = slot.lock().await;
        self.store_unsaved(app, username, &mut slot).await?;
        let Some(mut lineage) = app.vault.load(username, issuer).await? else {
            return Ok(None);
        };
        while let Lease::RefreshedElsewhere(newer) = self.take_lease(app, &lineage).await? {
            lineage = *newer;
        }
        let idp = match lineage.tokens.refresh_token.as_ref() {
            None => IdpRevocation::NoRefreshToken,
            Some(token) => match app.upstream.revoke(token.expose_secret()).await {
                Ok(true) => IdpRevocation::Revoked,
                Ok(false) => IdpRevocation::NotOffered,
                Err(e) => {
                    tracing::warn!(user = %username, error = %e, "revocation at the IdP failed");
                    IdpRevocation::Unreachable
                }
            },
        };
        // Deleting the row ends the lease with it.
        app.vault.delete(username, issuer).await?;
        Ok(Some(Revoked { idp, version: lineage.version }))
    }
}
