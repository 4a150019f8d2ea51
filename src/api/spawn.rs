//! The spawn call of the hub's pre-spawn hook (`POST /api/v1/hub/spawn`,
//! authenticated with the hub's client credentials): the environment for a
//! spawning server, and the token file once it is ready.

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::json;

use super::no_store;
use crate::auth::hub_client;
use crate::errors::ApiError;
use crate::state::AppState;
use crate::tokens::{delivery, sharing};

/// The spawn hook's request.
#[derive(Debug, Deserialize)]
pub struct SpawnRequest {
    /// The user whose server is spawning.
    user: String,
    /// The server's name (`""` for the default server).
    #[serde(default)]
    server: String,
    /// The server's own hub API token (its `JUPYTERHUB_API_TOKEN`): the
    /// one credential tokenhub presents to that server, to write its token
    /// file. Without it the server gets no token file.
    #[serde(default)]
    server_token: Option<SecretString>,
}

/// `POST /api/v1/hub/spawn`: the environment for a spawning server; the
/// token file follows once the server is ready.
pub async fn spawn(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<SpawnRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    hub_client(&app, &headers, None, None)?;
    let Json(request) = body.map_err(|e| ApiError::new(e.status(), "invalid_request", e.body_text()))?;
    let lineage = app.vault.load(&request.user, app.upstream.issuer()).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_user",
            "tokenhub holds no tokens for this user: they must sign in through tokenhub",
        )
    })?;
    match &request.server_token {
        Some(token) => {
            app.vault.save_server_credential(&request.user, &request.server, token).await?;
            delivery::write_when_ready(app.clone(), request.user.clone(), request.server.clone());
        }
        None => tracing::warn!(
            user = %request.user, server = %request.server,
            "the spawn hook sent no server token: this server gets no token file (update the hub's tokenhub block)"
        ),
    }
    crate::tokens::fabric::prefetch(&app, &lineage);
    tracing::info!(user = %request.user, server = %request.server, version = lineage.version, "environment handed to a spawning server");
    app.audit.record("spawn", Some(&request.user), Some(lineage.version), Some("tokens handed to a spawning server"));
    // A server shared from its start (shares outlive a stop) gets no tokens.
    let withheld = sharing::withheld(&app, &request.user, &request.server).await?;
    let mut env = serde_json::Map::new();
    // In FABRIC custody mode no refresh token reaches a server.
    if let Some(refresh) = lineage.tokens.refresh_token.as_ref().filter(|_| !withheld && !app.custody()) {
        env.insert("CILOGON_REFRESH_TOKEN".into(), refresh.expose_secret().into());
    }
    crate::tokens::fabric::add_env(&app, &mut env);
    env.insert("TOKENHUB_URL".into(), app.config.http.public_url.as_str().trim_end_matches('/').into());
    // The narrower-token files the server will get: the hook makes them
    // private where it can and names those with `env` in the environment.
    let groups = if app.config.narrow.files.is_empty() || withheld { vec![] } else { app.hub.groups(&request.user).await? };
    let files: Vec<serde_json::Value> = crate::tokens::files::files_for(&app, &groups)
        .into_iter()
        .filter(|_| !withheld)
        .map(|(spec, _)| json!({ "path": crate::tokens::files::path_in(spec, &request.server), "env": spec.env }))
        .collect();
    Ok(no_store(json!({
        "env": env,
        "token_file": app.hub.token_file(),
        "files": files,
        "version": lineage.version,
        "active": lineage.active,
        "withheld": withheld,
    })))
}
