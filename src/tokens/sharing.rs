//! Shared servers get no tokens. With JupyterHub 5's sharing, the people a
//! server is shared with run code in it: the token file there, and the
//! server's own token (which reads the owner's tokens from tokenhub), would
//! be theirs. So a server that has shares or share codes out gets a note
//! instead of the token file, and its token gets 403 from the notebook API,
//! unless the owner is in one of `TOKENHUB_SHARED_SERVER_GROUPS` (IdP
//! groups). A share added to a running server is seen by [`watch`], which
//! replaces the file with the note; when the last share is gone, the file
//! comes back. The environment set at spawn cannot be taken back: a server
//! shared at its start gets no `CILOGON_REFRESH_TOKEN`; one shared later
//! keeps the one it started with, which the next rotation makes useless.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::Value;

use crate::auth::Caller;
use crate::errors::ApiError;
use crate::hub::HubError;
use crate::state::AppState;

/// Whether tokenhub withholds the user's tokens from one of their servers:
/// it is shared (shares or share codes) and its owner is in none of the
/// groups allowed to share tokens.
pub async fn withheld(app: &AppState, username: &str, server: &str) -> Result<bool, HubError> {
    if !app.hub.shared_servers(username).await?.contains(server) {
        return Ok(false);
    }
    let allowed = &app.config.hub.shared_server_groups;
    if allowed.is_empty() {
        return Ok(true);
    }
    let lineage = app.vault.load_cached(username, app.upstream.issuer()).await.ok().flatten();
    let groups = lineage.as_ref().and_then(|l| l.claims.get(&app.config.upstream.groups_claim).cloned());
    let member = match groups {
        Some(Value::Array(groups)) => groups.iter().filter_map(Value::as_str).any(|g| allowed.iter().any(|a| a == g)),
        Some(Value::String(groups)) => groups.split([',', ' ']).any(|g| allowed.iter().any(|a| a == g)),
        _ => false,
    };
    Ok(!member)
}

/// The note a shared server gets in place of the token file.
pub fn note(username: &str, app: &AppState) -> String {
    let note = serde_json::json!({
        "state": "Withheld",
        "comment": format!(
            "tokenhub withholds {username}'s tokens from this server because it is shared with other people \
             (JupyterHub sharing). The tokens come back here when the last share and share code are removed. \
             {username} finds them on tokenhub's page: {}",
            app.url("/")
        ),
        "created_from": "tokenhub",
    });
    serde_json::to_string_pretty(&note).expect("JSON serializes")
}

/// Refuses a notebook call made with the own token of a server whose tokens
/// are withheld: 403 `access_denied`, saying why.
pub async fn refuse_shared_server(app: &AppState, caller: &Caller) -> Result<(), ApiError> {
    let (username, digest) = (caller.username.as_str(), &caller.token_digest);
    let server = match app.deliveries.server_of_token(digest) {
        Some(server) => server,
        None => {
            let server = app.vault.store().server_of_token(username, digest).await?;
            app.deliveries.remember_server_of_token(digest.clone(), server.clone());
            server
        }
    };
    let Some(server) = server else { return Ok(()) };
    if withheld(app, username, &server).await? {
        app.audit.record("refused", Some(username), None, Some("a shared server's token asked for tokens"));
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "access_denied",
            "this server is shared with other people (JupyterHub sharing), so tokenhub gives it no tokens; \
             remove its shares and share codes, or use an unshared server",
        ));
    }
    Ok(())
}

/// Every `interval`, rewrites (or withholds) the token files of the users
/// this process has written files for, so shares added to or removed from
/// running servers take effect. A rewrite of a file that is current costs
/// no write. Stops with the app.
pub fn watch(app: &AppState, interval: Duration) {
    let app = std::sync::Arc::downgrade(app);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(app) = app.upgrade() else { return };
            for username in app.deliveries.users().await {
                crate::tokens::delivery::write_all(&app, &username).await;
            }
        }
    });
}
