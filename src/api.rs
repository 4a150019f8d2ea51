//! The JSON API: tokens for code running in a notebook (`/api/v1/tokens`,
//! authenticated with the server's own `JUPYTERHUB_API_TOKEN`) and the spawn
//! call of the hub's pre-spawn hook (`/api/v1/hub/spawn`, authenticated with
//! the hub's client credentials).

use std::collections::HashMap;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::{authenticate_hub_client, presented_token};
use crate::delivery;
use crate::errors::ApiError;
use crate::fabric;
use crate::hub::HubError;
use crate::state::AppState;
use crate::time::now;
use crate::vault::Lineage;

fn no_store(body: Value) -> Response {
    let mut response = Json(body).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

impl From<HubError> for ApiError {
    fn from(e: HubError) -> Self {
        tracing::warn!(error = %e, "hub API call failed");
        match e {
            HubError::NotConfigured => ApiError::unavailable("tokenhub is not connected to the hub's API"),
            _ => ApiError::unavailable("the hub could not confirm who is calling; try again"),
        }
    }
}

/// The spawn hook's request.
#[derive(Debug, Deserialize)]
pub struct SpawnRequest {
    /// The user whose server is spawning.
    user: String,
    /// The server's name (`""` for the default server).
    #[serde(default)]
    server: String,
}

/// `POST /api/v1/hub/spawn`: the environment for a spawning server; the
/// token file follows once the server is ready.
pub async fn spawn(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<SpawnRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    authenticate_hub_client(&app.config.hub, &headers, None, None)?;
    let Json(request) = body.map_err(|e| ApiError::new(e.status(), "invalid_request", e.body_text()))?;
    let lineage = app
        .vault
        .load(&request.user, app.upstream.issuer())
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "unknown_user", "tokenhub holds no tokens for this user: they must sign in through tokenhub"))?;
    delivery::write_when_ready(app.clone(), request.user.clone(), request.server.clone());
    tracing::info!(user = %request.user, server = %request.server, version = lineage.version, "environment handed to a spawning server");
    let mut env = serde_json::Map::new();
    if let Some(refresh) = &lineage.tokens.refresh_token {
        env.insert("CILOGON_REFRESH_TOKEN".into(), refresh.expose_secret().into());
    }
    env.insert("TOKENHUB_URL".into(), app.config.http.public_url.as_str().trim_end_matches('/').into());
    Ok(no_store(json!({
        "env": env,
        "token_file": app.hub.token_file(),
        "version": lineage.version,
        "active": lineage.active,
    })))
}

/// Identifies the caller of a notebook endpoint through the hub.
pub async fn caller(app: &AppState, headers: &HeaderMap) -> Result<String, ApiError> {
    let token = presented_token(headers)
        .ok_or_else(|| ApiError::invalid_token("send the server's JUPYTERHUB_API_TOKEN as `Authorization: token …`"))?;
    let identity = app
        .hub
        .identify(token)
        .await?
        .ok_or_else(|| ApiError::invalid_token("the hub does not know this token"))?;
    Ok(identity.username)
}

fn tokens_json(app: &AppState, lineage: &Lineage) -> Value {
    let t = &lineage.tokens;
    json!({
        "user": lineage.username,
        "issuer": lineage.issuer,
        "subject": lineage.subject,
        "token_type": "Bearer",
        "access_token": t.access_token.expose_secret(),
        "id_token": t.id_token.expose_secret(),
        "refresh_token": t.refresh_token.as_ref().map(|r| r.expose_secret()),
        "expires_at": t.access_expires_at,
        "expires_in": t.access_expires_at.map(|e| (e - now()).max(0)),
        "scope": t.scope,
        "version": lineage.version,
        "refreshed_at": lineage.refreshed_at,
        "reauth_url": app.url("/refresh").to_string(),
    })
}

/// `GET /api/v1/tokens`: the caller's current tokens (`format=fabric` for
/// the `~/.tokens.json` document).
pub async fn tokens(
    State(app): State<AppState>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let username = caller(&app, &headers).await?;
    let lineage = app
        .vault
        .load(&username, app.upstream.issuer())
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no_tokens", "tokenhub holds no tokens for you: sign in again"))?;
    match params.get("format").map(String::as_str) {
        None | Some("json") => Ok(no_store(tokens_json(&app, &lineage))),
        Some("fabric") => Ok(no_store(fabric::document(&lineage))),
        Some(other) => Err(ApiError::invalid_request(format!("unknown format {other:?} (use json or fabric)"))),
    }
}
