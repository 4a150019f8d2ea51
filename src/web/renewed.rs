//! The page after a renewal, shown both by `/refresh` (a refresh that
//! worked) and by the login callback (a renewal that needed a new login).
//! Kept apart from the other pages so the login does not import them: the
//! pages start logins, and the login ends on this page.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};

use crate::errors::PageError;
use crate::state::AppState;
use crate::time::now;
use crate::tokens::delivery;
use crate::tokens::fabric::timestamp;
use crate::web::views::{self, RenewedPage, relative};

/// The page after a renewal: writes the token files, then says what was
/// renewed, until when, and which servers got it.
pub async fn renewed(app: &AppState, username: &str) -> Result<Response, PageError> {
    let written = delivery::write_all(app, username).await;
    let lineage = app.vault.load(username, app.upstream.issuer()).await?.ok_or_else(|| {
        PageError::new(StatusCode::CONFLICT, "Tokens gone", "Your tokens were removed while renewing. Please sign in again.")
    })?;
    let view = RenewedPage {
        username,
        refreshed: lineage.refreshed_at.is_some_and(|t| now() - t < 60),
        access_expires: lineage.tokens.access_expires_at.map(|t| format!("{} ({})", timestamp(t), relative(t))),
        servers: written.into_iter().map(|s| if s.is_empty() { "default server".to_string() } else { s }).collect(),
        id_token_pending: lineage.pending_id_token.is_some(),
        token_page_url: app.url("/").to_string(),
        hub_url: app.hub_home(),
    };
    Ok(crate::no_store(Html(views::render(&view)).into_response()))
}
