//! `POST /api/v1/admin/names/{name}`: an operator moves a hub name to
//! another upstream subject (the name's person changed accounts at the IdP,
//! or the first login was someone else's). The only way a name changes
//! hands: a login by another subject is refused (see [`crate::names`]).

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::api::operator;
use crate::errors::ApiError;
use crate::names;
use crate::state::AppState;

/// The move: the subject (at tokenhub's upstream issuer) the name goes to.
#[derive(Debug, Deserialize)]
pub struct MoveName {
    /// The new subject, as the refused login's page showed it to its person.
    subject: String,
}

/// Longest subject taken (OIDC Core §2: at most 255 ASCII characters).
const MAX_SUBJECT: usize = 255;

/// `POST /api/v1/admin/names/{name}` with `{"subject": …}`: the name
/// belongs to that subject from now on; the lineage of the subject it
/// leaves is dropped. Answers the subject it had before.
pub async fn move_name(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Result<Json<MoveName>, JsonRejection>,
) -> Result<Response, ApiError> {
    let admin = operator(&app, &headers).await?;
    let Json(request) = body.map_err(|e| ApiError::new(e.status(), "invalid_request", e.body_text()))?;
    let canonical = names::canonical(&name).map_err(|why| ApiError::invalid_request(format!("not a user name: {why}")))?;
    if canonical != name {
        return Err(ApiError::invalid_request(format!("user names are canonical: this one is {canonical:?}")));
    }
    let subject = request.subject.trim();
    if subject.is_empty() || subject.len() > MAX_SUBJECT || subject.chars().any(char::is_control) {
        return Err(ApiError::invalid_request("the subject must be 1 to 255 printable characters"));
    }
    let before = names::move_name(&app, &name, subject, &admin).await?;
    Ok((StatusCode::OK, Json(json!({ "user": name, "subject": subject, "previous_subject": before }))).into_response())
}
