//! `GET /api/v1/admin/lineages`: every user's lineage as JSON, for a hub
//! token of an admin (or one holding `custom:tokenhub:admin`).

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::Listing;
use crate::errors::ApiError;
use crate::hub::ADMIN_SCOPE;
use crate::state::AppState;

/// The operator calling the admin API: a token that may call tokenhub at
/// all (checked, limited and audited by [`crate::auth::caller`]), then the
/// hub's word that it is an admin's or holds [`ADMIN_SCOPE`]. Returns the
/// operator's user name.
pub async fn operator(app: &AppState, headers: &HeaderMap) -> Result<String, ApiError> {
    let caller = crate::auth::caller(app, headers).await?;
    let username = caller.username;
    if caller.admin {
        return Ok(username);
    }
    app.audit.record("refused", Some(&username), None, Some("admin API called by a non-admin"));
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "insufficient_scope",
        format!("only hub admins, or tokens with the scope {ADMIN_SCOPE}, may use the admin API"),
    ))
}

/// `GET /api/v1/admin/lineages?state=&user=&sort=&order=&limit=&offset=`.
pub async fn lineages(
    State(app): State<AppState>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let admin = operator(&app, &headers).await?;
    let listing = Listing::parse(&params).map_err(ApiError::invalid_request)?;
    let page = super::list(&app, &listing).await?;
    tracing::debug!(admin = %admin, rows = page.lineages.len(), "admin listing");
    Ok(crate::no_store(Json(page).into_response()))
}
