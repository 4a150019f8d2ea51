//! tokenhub: logs JupyterHub users in through OpenID Connect, keeps the
//! tokens issued at login in an encrypted vault, and hands them to the
//! user's notebook servers. See README.md for the whole picture.

pub mod admin;
pub mod api;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod config;
pub mod errors;
pub mod fabric;
pub mod hub;
pub mod metrics;
pub mod names;
pub mod oauth;
pub mod request_frame;
pub mod security;
pub mod server;
pub mod state;
pub mod time;
pub mod tls;
pub mod tokens;
pub mod vault;
pub mod web;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::errors::ApiError;
pub use crate::state::{App, AppState};

/// Largest request body accepted (forms to the token endpoint are small).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The whole HTTP interface, mounted under the configured base path.
pub fn app(state: AppState) -> Router {
    use axum::routing::post;
    let base = state.config.http.base_path.clone();
    let at = |path: &str| format!("{base}{path}");
    let mut routes = Router::new()
        .route(&at("/"), get(web::pages::token_page))
        .route(&at("/login"), get(web::pages::login))
        .route(&at("/logout"), get(web::pages::logout))
        .route(&at("/refresh"), get(web::pages::refresh))
        .route(&at("/tokens.json"), get(web::pages::download))
        .route(&at("/revoke"), post(web::pages::revoke))
        .route(&at("/narrow/drop"), post(web::pages::drop_narrow))
        .route(&at("/admin"), get(admin::page::admin_page))
        .route(&at("/admin/revoke"), post(admin::page::revoke))
        .route(&at("/admin/names"), post(admin::names::move_name_form))
        .route(&at("/api/v1/admin/lineages"), get(admin::api::lineages))
        .route(&at("/api/v1/admin/names/{name}"), post(admin::names::move_name))
        .route(&at("/healthz"), get(healthz))
        .route(&at("/readyz"), get(readyz))
        .route(&at("/metrics"), get(metrics))
        .route(&at("/.well-known/openid-configuration"), get(oauth::provider::discovery))
        .route(&at("/oauth2/authorize"), get(oauth::login::authorize))
        .route(&at("/oauth2/token"), post(oauth::provider::token))
        .route(&at("/oauth2/userinfo"), get(oauth::provider::userinfo).post(oauth::provider::userinfo))
        .route(&at("/callback"), get(oauth::login::callback))
        .route(&at("/api/v1/tokens"), get(api::notebook::tokens))
        .route(&at("/api/v1/tokens/refresh"), post(api::notebook::force_refresh))
        .route(&at("/api/v1/users/{name}/tokens"), get(api::delegation::user_tokens))
        .route(&at("/api/v1/hub/spawn"), post(api::spawn::spawn))
        .route(&at("/api/v1/openapi.json"), get(api::openapi::serve));
    if state.credmgr.is_some() {
        // FABlib's Credential Manager calls, at the root of the broker's host.
        routes = routes.merge(fabric::broker::routes());
    }
    if !base.is_empty() {
        // The prefix itself, without the trailing slash, is the token page too.
        routes = routes.route(&base, get(web::pages::token_page));
    }
    routes
        .fallback(|| async { ApiError::not_found() })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // Request id, audit context, trace span, security headers.
        .layer(request_frame::RequestFrameLayer)
        .with_state(state)
}

/// Marks a response as not to be stored by any cache: every answer that
/// carries tokens or belongs to a login.
pub fn no_store(mut response: axum::response::Response) -> axum::response::Response {
    response.headers_mut().insert(header::CACHE_CONTROL, axum::http::HeaderValue::from_static("no-store"));
    response
}

/// `GET /healthz` (liveness): 200 while the process serves, saying whether
/// the database answers. A database outage must not get every replica
/// restarted: that is what readiness is for.
async fn healthz(State(app): State<AppState>) -> Json<serde_json::Value> {
    let database = match app.vault.store().ping().await {
        Ok(()) => "ok",
        Err(e) => {
            tracing::warn!(error = %e, "health check: the database does not answer");
            "unavailable"
        }
    };
    Json(json!({ "status": "ok", "database": database }))
}

/// `GET /readyz` (readiness): 200 when the database answers, else 503 with
/// `Retry-After`, so the Service stops sending requests this replica cannot
/// serve, without a restart.
async fn readyz(State(app): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    app.vault.store().ping().await?;
    Ok(Json(json!({ "status": "ok" })))
}

/// `GET /metrics`: Prometheus metrics (OpenMetrics text).
async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], app.metrics.render(app.vault.store()).await)
}
