//! The machine half of tokenhub's OAuth 2.0 provider for its one client, the
//! hub: discovery, the token endpoint (authorization_code and refresh_token
//! grants; client_secret_basic or client_secret_post; PKCE) and userinfo.
//! Codes and tokens issued here are random and stored only as hashes.

use axum::Json;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::auth::presented_token;
use crate::errors::ApiError;
use crate::state::AppState;
use crate::time::now;
use crate::vault::crypto::{constant_time_eq, digest_hex, pkce_s256, random_token};
use crate::vault::store::{HubTokenKind, HubTokenRow};

/// Lifetime of refresh tokens issued to the hub.
const HUB_REFRESH_TTL_SECS: i64 = 30 * 24 * 3600;

/// `GET /.well-known/openid-configuration`.
pub async fn discovery(State(app): State<AppState>) -> Json<Value> {
    let url = |p: &str| app.url(p).to_string();
    Json(json!({
        "issuer": app.config.http.public_url.as_str().trim_end_matches('/'),
        "authorization_endpoint": url("/oauth2/authorize"),
        "token_endpoint": url("/oauth2/token"),
        "userinfo_endpoint": url("/oauth2/userinfo"),
        "response_types_supported": ["code"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "scopes_supported": ["openid", "profile", "email", "groups"],
        "subject_types_supported": ["public"],
        "claims_supported": ["sub", "name", "preferred_username", "username", "email", "email_verified", "groups"],
    }))
}

/// The token request's form fields.
#[derive(Debug, Deserialize)]
pub struct TokenForm {
    grant_type: Option<String>,
    code: Option<String>,
    redirect_uri: Option<String>,
    code_verifier: Option<String>,
    refresh_token: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
}

fn form_error(rejection: FormRejection) -> ApiError {
    let status = rejection.status();
    ApiError::new(status, "invalid_request", rejection.body_text())
}

/// `POST /oauth2/token`.
pub async fn token(
    State(app): State<AppState>,
    headers: HeaderMap,
    form: Result<Form<TokenForm>, FormRejection>,
) -> Result<Response, ApiError> {
    let result = async {
        let Form(form) = form.map_err(form_error)?;
        crate::auth::hub_client(&app, &headers, form.client_id.as_deref(), form.client_secret.as_deref())?;
        match form.grant_type.as_deref() {
            Some("authorization_code") => authorization_code_grant(&app, &form).await,
            Some("refresh_token") => refresh_token_grant(&app, &form).await,
            Some(other) => Err(ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                format!("grant_type {other:?} is not supported"),
            )),
            None => Err(ApiError::invalid_request("grant_type is missing")),
        }
    }
    .await;
    match &result {
        Ok(_) => {
            app.metrics.hub_tokens_issued.inc();
        }
        Err(e) => {
            app.metrics.hub_token_errors.inc();
            tracing::info!(error = e.error, description = %e.description, "token request refused");
            if e.error == "invalid_grant" {
                app.audit.record("invalid_grant", None, None, Some("token endpoint refused a code or refresh token"));
            }
        }
    }
    result
}

async fn authorization_code_grant(app: &AppState, form: &TokenForm) -> Result<Response, ApiError> {
    let code = form.code.as_deref().ok_or_else(|| ApiError::invalid_request("code is missing"))?;
    let redirect_uri = form.redirect_uri.as_deref().ok_or_else(|| ApiError::invalid_request("redirect_uri is missing"))?;
    // Taking the code deletes it: a replayed code finds nothing, and a
    // failed attempt (wrong verifier) burns it.
    let row = app
        .vault
        .store()
        .take_hub_code(&digest_hex(code))
        .await?
        .ok_or_else(|| ApiError::invalid_grant("the code is unknown or was already used"))?;
    if row.expires_at < now() {
        return Err(ApiError::invalid_grant("the code has expired"));
    }
    if row.client_id != app.config.hub.client_id {
        return Err(ApiError::invalid_grant("the code was issued to another client"));
    }
    if row.redirect_uri != redirect_uri {
        return Err(ApiError::invalid_grant("redirect_uri differs from the authorization request's"));
    }
    match (&row.code_challenge, &form.code_verifier) {
        (Some(challenge), Some(verifier)) => {
            if !constant_time_eq(&pkce_s256(verifier), challenge) {
                return Err(ApiError::invalid_grant("the PKCE code_verifier does not match the code_challenge"));
            }
        }
        (Some(_), None) => return Err(ApiError::invalid_grant("code_verifier is required (PKCE)")),
        (None, Some(_)) => {
            return Err(ApiError::invalid_grant("code_verifier sent, but the authorization request had no code_challenge"));
        }
        (None, None) => {}
    }
    let response = issue_tokens(app, &row.username, &row.issuer, &row.scope).await?;
    app.audit.record("hub_login", Some(&row.username), None, Some("tokens issued to the hub for a login"));
    Ok(response)
}

async fn refresh_token_grant(app: &AppState, form: &TokenForm) -> Result<Response, ApiError> {
    let token = form.refresh_token.as_deref().ok_or_else(|| ApiError::invalid_request("refresh_token is missing"))?;
    let row = app
        .vault
        .store()
        .hub_token(&digest_hex(token), HubTokenKind::Refresh, true)
        .await?
        .ok_or_else(|| ApiError::invalid_grant("the refresh token is unknown or was already used"))?;
    if row.expires_at < now() {
        return Err(ApiError::invalid_grant("the refresh token has expired"));
    }
    if row.client_id != app.config.hub.client_id {
        return Err(ApiError::invalid_grant("the refresh token was issued to another client"));
    }
    let lineage = app.vault.store().lineage(&row.username, &row.issuer).await?;
    if lineage.is_none_or(|l| l.status != "active") {
        return Err(ApiError::invalid_grant("the user's upstream login is gone: sign in again"));
    }
    let response = issue_tokens(app, &row.username, &row.issuer, &row.scope).await?;
    app.audit.record("hub_token_refresh", Some(&row.username), None, None);
    Ok(response)
}

async fn issue_tokens(app: &AppState, username: &str, issuer: &str, scope: &str) -> Result<Response, ApiError> {
    let now = now();
    let ttl = app.config.hub.token_ttl as i64;
    let access = random_token();
    let refresh = random_token();
    let store = app.vault.store();
    for (token, kind, expires_at) in
        [(&access, HubTokenKind::Access, now + ttl), (&refresh, HubTokenKind::Refresh, now + HUB_REFRESH_TTL_SECS)]
    {
        store
            .insert_hub_token(&HubTokenRow {
                token_hash: digest_hex(token),
                kind,
                username: username.into(),
                issuer: issuer.into(),
                client_id: app.config.hub.client_id.clone(),
                scope: scope.into(),
                expires_at,
                created_at: now,
            })
            .await?;
    }
    let body = json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": ttl,
        "refresh_token": refresh,
        "scope": scope,
    });
    Ok(crate::no_store(Json(body).into_response()))
}

/// `GET|POST /oauth2/userinfo`: who the hub's access token belongs to.
pub async fn userinfo(State(app): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let token = presented_token(&headers).ok_or_else(|| ApiError::invalid_token("a Bearer access token is required"))?;
    let row = app
        .vault
        .store()
        .hub_token(&digest_hex(token), HubTokenKind::Access, false)
        .await?
        .ok_or_else(|| ApiError::invalid_token("the access token is unknown"))?;
    if row.expires_at < now() {
        return Err(ApiError::invalid_token("the access token has expired"));
    }
    let lineage =
        app.vault.load(&row.username, &row.issuer).await?.ok_or_else(|| ApiError::invalid_token("the user's login is gone"))?;
    Ok(Json(Value::Object(user_claims(&app, &row.username, &lineage.claims, &lineage.issuer, &lineage.subject))))
}

/// The claims the hub sees: the user name under the usual names, email and
/// groups from upstream, and where the identity came from.
fn user_claims(app: &AppState, username: &str, upstream: &Map<String, Value>, issuer: &str, subject: &str) -> Map<String, Value> {
    let mut out = Map::new();
    out.insert("sub".into(), username.into());
    out.insert("username".into(), username.into());
    out.insert("preferred_username".into(), username.into());
    out.insert("name".into(), upstream.get("name").cloned().unwrap_or_else(|| username.into()));
    for claim in ["email", "email_verified"] {
        if let Some(v) = upstream.get(claim) {
            out.insert(claim.into(), v.clone());
        }
    }
    let groups = match upstream.get(&app.config.upstream.groups_claim) {
        Some(Value::Array(a)) => Value::Array(a.iter().filter(|g| g.is_string()).cloned().collect()),
        Some(Value::String(s)) => Value::Array(s.split([',', ' ']).filter(|g| !g.is_empty()).map(Value::from).collect()),
        _ => Value::Array(vec![]),
    };
    out.insert("groups".into(), groups);
    out.insert("upstream_issuer".into(), issuer.into());
    out.insert("upstream_subject".into(), subject.into());
    out
}

/// Property tests of the token endpoint's form.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Any body: a form or an error, never a panic.
        #[test]
        fn form_parse_never_panics(body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = serde_urlencoded::from_bytes::<TokenForm>(&body);
        }

        /// Form-encoded values of any text (`&`, `=`, `+`, `%`, non-ASCII)
        /// come back unchanged.
        #[test]
        fn form_fields_round_trip(code in "\\PC{0,60}", verifier in "[a-zA-Z0-9&=+%~/ -]{0,60}", id in "\\PC{0,20}") {
            let body = serde_urlencoded::to_string([
                ("grant_type", "authorization_code"),
                ("code", code.as_str()),
                ("code_verifier", verifier.as_str()),
                ("client_id", id.as_str()),
            ]).unwrap();
            let form: TokenForm = serde_urlencoded::from_str(&body).unwrap();
            prop_assert_eq!(form.grant_type.as_deref(), Some("authorization_code"));
            prop_assert_eq!(form.code.as_deref(), Some(code.as_str()));
            prop_assert_eq!(form.code_verifier.as_deref(), Some(verifier.as_str()));
            prop_assert_eq!(form.client_id.as_deref(), Some(id.as_str()));
            prop_assert_eq!(form.refresh_token, None);
        }
    }
}
