//! tokenhub: logs JupyterHub users in through OpenID Connect, keeps the
//! tokens issued at login in an encrypted vault, and hands them to the
//! user's notebook servers. See README.md for the whole picture.

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod delivery;
pub mod errors;
pub mod fabric;
pub mod hub;
pub mod login;
pub mod metrics;
pub mod provider;
pub mod refresh;
pub mod state;
pub mod store;
pub mod time;
pub mod upstream;
pub mod vault;
pub mod views;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{Request, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tower_http::trace::TraceLayer;

use crate::errors::ApiError;
pub use crate::state::{App, AppState};

/// Largest request body accepted (forms to the token endpoint are small).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The whole HTTP interface, mounted under the configured base path.
pub fn app(state: AppState) -> Router {
    let routes = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/.well-known/openid-configuration", get(provider::discovery))
        .route("/oauth2/authorize", get(login::authorize))
        .route("/oauth2/token", axum::routing::post(provider::token))
        .route("/oauth2/userinfo", get(provider::userinfo).post(provider::userinfo))
        .route("/callback", get(login::callback))
        .route("/api/v1/tokens", get(api::tokens))
        .route("/api/v1/tokens/refresh", axum::routing::post(api::force_refresh))
        .route("/api/v1/hub/spawn", axum::routing::post(api::spawn));
    let base = state.config.http.base_path.clone();
    let routes = if base.is_empty() { routes } else { Router::new().nest(&base, routes) };
    routes
        .fallback(|| async { ApiError::not_found() })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // Log method and path only: query strings carry codes and state.
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
            tracing::info_span!("http", method = %req.method(), path = %req.uri().path())
        }))
        .with_state(state)
}

/// `GET /healthz`: 200 when the database answers.
async fn healthz(State(app): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    app.vault.store().ping().await?;
    Ok(Json(json!({ "status": "ok" })))
}

/// `GET /metrics`: Prometheus counters.
async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render())
}
