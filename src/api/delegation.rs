//! `GET /api/v1/users/{name}/tokens`: a hub service fetches a named user's
//! narrower token by delegation ([`crate::tokens::delegation`] says who may).

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use super::no_store;
use super::notebook::{min_valid, narrow_error, narrow_json, narrow_request, query_params, refresh_error};
use crate::auth::service_caller;
use crate::errors::ApiError;
use crate::state::AppState;
use crate::tokens::delegation;
use crate::tokens::narrow::NarrowError;
use crate::tokens::refresh::RefreshError;

/// The user's narrower token for the calling service, as the notebook API
/// gives it; `scope` and/or `audience` are required (a service never gets
/// the lineage's own tokens).
pub async fn user_tokens(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(user): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let params = query_params(query.as_deref());
    let min_valid = min_valid(&params)?;
    let request = narrow_request(&params)?
        .ok_or_else(|| ApiError::invalid_request("a delegated fetch asks for a scope or an audience (a narrower token)"))?;
    let service = service_caller(&app, &headers).await?;
    match delegation::token(&app, &service, &user, &request, min_valid).await {
        Ok(token) => Ok(no_store(narrow_json(&app, &token))),
        // Said about the user, not about the calling service's own token.
        Err(NarrowError::Refresh(RefreshError::NoLineage)) => {
            Err(ApiError::new(StatusCode::NOT_FOUND, "unknown_user", format!("tokenhub holds no tokens for {user:?}")))
        }
        Err(NarrowError::Refresh(RefreshError::Dead(reason))) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_grant",
            format!("the login of {user:?} is dead ({reason}); they must renew it at {}", app.reauth_url),
        )),
        Err(NarrowError::Refresh(e)) => Err(refresh_error(&app, e)),
        Err(e) => Err(narrow_error(&app, e)),
    }
}
