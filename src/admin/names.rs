//! `POST /api/v1/admin/names/{name}` (and `POST /admin/names`, the
//! operator's page's form): an operator moves a hub name to
//! another upstream subject (the name's person changed accounts at the IdP,
//! or the first login was someone else's). The only way a name changes
//! hands: a login by another subject is refused (see [`crate::names`]).

use std::collections::HashMap;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum_extra::extract::CookieJar;
use serde::Deserialize;
use serde_json::json;

use super::api::operator;
use crate::errors::{ApiError, PageError};
use crate::names;
use crate::state::AppState;
use crate::web::views::{self, InfoPage};

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
    let subject = checked(&name, &request.subject).map_err(ApiError::invalid_request)?;
    let before = names::move_name(&app, &name, subject, &admin).await?;
    Ok((StatusCode::OK, Json(json!({ "user": name, "subject": subject, "previous_subject": before }))).into_response())
}

/// A move's name and subject checked: the name must be canonical, the
/// subject 1 to 255 printable characters. Returns the trimmed subject.
fn checked<'a>(name: &str, subject: &'a str) -> Result<&'a str, String> {
    let canonical = names::canonical(name).map_err(|why| format!("not a user name: {why}"))?;
    if canonical != name {
        return Err(format!("user names are canonical: this one is {canonical:?}"));
    }
    let subject = subject.trim();
    if subject.is_empty() || subject.len() > MAX_SUBJECT || subject.chars().any(char::is_control) {
        return Err("the subject must be 1 to 255 printable characters".into());
    }
    Ok(subject)
}

/// `POST /admin/names` (`user`, `subject`, `csrf`): the operator's page's
/// form for the same move, from tokenhub's own origin with the session's
/// CSRF value.
pub async fn move_name_form(
    State(app): State<AppState>,
    headers: HeaderMap,
    jar: CookieJar,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, PageError> {
    let session = super::page::operator_form(&app, &headers, &jar, &form, "admin name form from another origin").await?;
    let field = |key: &str| form.get(key).map(String::as_str).unwrap_or_default();
    let name = field("user");
    let subject =
        checked(name, field("subject")).map_err(|why| super::page::bad_request(format!("The name was not moved: {why}.")))?;
    let before = names::move_name(&app, name, subject, &session.username).await?;
    let message = format!(
        "The user name {name} now belongs to the subject {subject}{}. That account signs in as {name} from now on.",
        before.map(|b| format!(" (before: {b}; its tokens were deleted)")).unwrap_or_default()
    );
    let info = InfoPage {
        title: "Name moved",
        message: &message,
        links: vec![("Back to the operator's page", app.url("/admin").to_string())],
    };
    Ok(crate::no_store(Html(views::render(&info)).into_response()))
}
