//! The broker: FABlib's Credential Manager calls, answered on the broker's
//! host (`/credmgr/…`, on tokenhub's port behind the chart's Ingress or on
//! its own TLS listener).
//!
//! `POST /credmgr/tokens/refresh` carries nothing but a refresh token, so
//! the token is the credential: it is looked up by its digest among the
//! lineages' current refresh tokens and those they replaced recently.
//! Found, the caller gets the lineage's Credential Manager answer, from the
//! vault while its FABRIC JWT has `TOKENHUB_FABRIC_MIN_VALID` left, else
//! after one refresh through the CM shared by every caller (the refresher's
//! single flight, across replicas). A replaced token gets the current
//! answer too: FABlib's retries and kernels holding an older copy converge
//! instead of burning the lineage. One replaced longer ago than that
//! (past the grace period or out of the newest few) is refused, never
//! passed on: it is spent, and an identity provider that sees a spent
//! refresh token may end the whole login. A token tokenhub does not hold is
//! passed to the CM unchanged, or refused (`TOKENHUB_FABRIC_UNKNOWN_TOKENS`).
//!
//! Every other CM call is passed on unchanged; a revoke of a refresh token
//! tokenhub holds also ends its lineage.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::UnknownTokens;
use crate::oauth::credmgr::CmAsk;
use crate::state::AppState;
use crate::time::now;
use crate::tokens::refresh::{RefreshError, Want};
use crate::vault::crypto::digest_hex;
use crate::vault::fabric::RefreshOwner;

/// The broker's routes (mounted at the root: FABlib asks `https://<host>/credmgr/…`).
pub fn routes() -> Router<AppState> {
    Router::new().route("/credmgr/tokens/refresh", post(refresh)).route("/credmgr/{*path}", any(pass_on))
}

/// The broker alone, for its own TLS listener.
pub fn app(state: AppState) -> Router {
    routes()
        .route("/healthz", axum::routing::get(|| async { axum::Json(json!({ "status": "ok" })) }))
        .fallback(|| async { cm_error(StatusCode::NOT_FOUND, "Not Found", "no such Credential Manager call", None) })
        .layer(DefaultBodyLimit::max(crate::MAX_BODY_BYTES))
        .layer(crate::request_frame::RequestFrameLayer)
        .with_state(state)
}

/// An error as the Credential Manager shapes it (FABlib shows its text),
/// naming tokenhub's `/refresh` when a new login is the way out.
fn cm_error(status: StatusCode, message: &str, details: &str, reauth_url: Option<&str>) -> Response {
    let details = match reauth_url {
        Some(url) => format!("{details} To sign in again without restarting anything, open {url}"),
        None => details.to_string(),
    };
    let mut body = json!({
        "errors": [{ "message": message, "details": details }],
        "size": 1,
        "status": status.as_u16(),
        "type": "error",
    });
    if let Some(url) = reauth_url {
        body["reauth_url"] = Value::String(url.to_string());
    }
    let mut response = (status, axum::Json(body)).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// FABlib's query of a refresh.
#[derive(Debug, Default, Deserialize)]
struct RefreshQuery {
    project_id: Option<String>,
    project_name: Option<String>,
    scope: Option<String>,
}

/// The body of a refresh (and of the older revoke call).
#[derive(Deserialize)]
struct RefreshBody {
    refresh_token: Option<String>,
}

/// `POST /credmgr/tokens/refresh`.
async fn refresh(State(app): State<AppState>, RawQuery(query): RawQuery, headers: HeaderMap, body: Bytes) -> Response {
    let Some(fabric) = app.config.fabric.as_ref() else {
        return cm_error(StatusCode::NOT_FOUND, "Not Found", "the FABRIC broker is not enabled", None);
    };
    let Ok(params) = serde_urlencoded::from_str::<RefreshQuery>(query.as_deref().unwrap_or("")) else {
        return cm_error(StatusCode::BAD_REQUEST, "Bad Request", "malformed query", None);
    };
    let presented = match serde_json::from_slice::<RefreshBody>(&body) {
        Ok(RefreshBody { refresh_token: Some(t) }) if !t.is_empty() => t,
        _ => {
            return cm_error(
                StatusCode::BAD_REQUEST,
                "Bad Request",
                "the body must be JSON like {\"refresh_token\": \"…\"}",
                None,
            );
        }
    };
    let owner = match app.vault.store().refresh_owner(&digest_hex(&presented), now() - fabric.grace).await {
        Ok(owner) => owner.filter(|o| o.issuer == app.upstream.issuer()),
        Err(e) => {
            tracing::error!(error = %e, "the broker could not look a refresh token up");
            return unavailable("the token vault is not answering; try again shortly");
        }
    };
    drop(presented);
    let Some(owner) = owner else {
        return unknown(&app, fabric.unknown_tokens, query.as_deref(), &headers, body).await;
    };
    if owner.retired {
        return retired(&app, &owner);
    }
    let ask = CmAsk {
        project_id: params.project_id,
        project_name: params.project_name,
        scope: params.scope.unwrap_or_else(|| "all".into()),
    };
    answer(&app, &owner, ask, fabric.min_valid).await
}

/// The lineage's Credential Manager answer for `ask`, refreshed through the
/// CM first if the held one does not do.
async fn answer(app: &AppState, owner: &RefreshOwner, ask: CmAsk, min_valid: i64) -> Response {
    let user = owner.username.as_str();
    let want = Want { min_valid: Some(min_valid), force: false };
    match app.refresher.fresh_for_cm(app, user, want, ask).await {
        Ok(fresh) => {
            let lineage = &fresh.lineage;
            let Some(held) = lineage.tokens.fabric.as_ref() else {
                return unavailable("no Credential Manager answer is held yet; try again shortly");
            };
            let event = if owner.replaced_at.is_some() { "fabric_grace" } else { "fabric_refresh" };
            app.metrics.fabric_refresh(match (owner.replaced_at.is_some(), fresh.refreshed) {
                (_, true) => "refreshed",
                (true, false) => "grace",
                (false, false) => "vault",
            });
            let detail = if fresh.refreshed { "refreshed through the Credential Manager" } else { "answered from the vault" };
            app.audit.record(event, Some(user), Some(lineage.version), Some(detail));
            let body = json!({
                "data": [Value::Object(held.object(lineage.tokens.refresh_token.as_ref()))],
                "size": 1,
                "status": 200,
                "type": "token",
            });
            crate::no_store(axum::Json(body).into_response())
        }
        Err(RefreshError::Dead(reason)) => {
            // A retry after the refusal: the reason the CM gave then.
            let reason = match app.vault.load_cached(user, &owner.issuer).await {
                Ok(Some(lineage)) => lineage.dead_reason.clone().unwrap_or(reason),
                _ => reason,
            };
            app.audit.record("fabric_refused", Some(user), None, Some(&reason));
            app.metrics.fabric_refresh("refused");
            let status = status_named_in(&reason).unwrap_or(StatusCode::UNAUTHORIZED);
            cm_error(status, "Refresh token is invalid or has expired", &format!("{reason}."), Some(&app.reauth_url))
        }
        Err(RefreshError::NoLineage) => {
            cm_error(StatusCode::UNAUTHORIZED, "Unauthorized", "tokenhub no longer holds this login.", Some(&app.reauth_url))
        }
        Err(e) if e.is_temporary() => {
            app.metrics.fabric_refresh("unavailable");
            tracing::warn!(user = %user, error = %e, "the broker could not refresh; the lineage is kept");
            unavailable(
                "the Credential Manager or the identity provider is not answering; your tokens are kept, try again shortly",
            )
        }
        Err(e) => {
            tracing::error!(user = %user, error = %e, "the broker could not answer");
            unavailable("tokenhub could not answer; your tokens are kept, try again shortly")
        }
    }
}

fn unavailable(details: &str) -> Response {
    let mut response = cm_error(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable", details, None);
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    response
}

/// The Credential Manager's status where a dead lineage's reason names it
/// ("… answered 500 Internal Server Error: …"), so FABlib sees what the CM said.
fn status_named_in(reason: &str) -> Option<StatusCode> {
    let (_, after) = reason.split_once("answered ")?;
    StatusCode::from_bytes(after.get(..3)?.as_bytes()).ok()
}

/// A refresh token the lineage replaced longer ago than the broker answers
/// for: refused, and never passed to the CM, where it would reach the
/// identity provider spent (some end the whole login for that).
fn retired(app: &AppState, owner: &RefreshOwner) -> Response {
    app.audit.record("fabric_retired_refused", Some(&owner.username), None, None);
    app.metrics.fabric_refresh("retired");
    cm_error(
        StatusCode::UNAUTHORIZED,
        "Refresh token is invalid or has expired",
        "this refresh token was replaced long ago (tokenhub answers for replaced tokens for a while only) and is spent; \
         load FABlib again to read the current token file, or sign in again.",
        Some(&app.reauth_url),
    )
}

/// A refresh token tokenhub does not hold: passed to the CM (nothing of it
/// kept), or refused.
async fn unknown(app: &AppState, policy: UnknownTokens, query: Option<&str>, headers: &HeaderMap, body: Bytes) -> Response {
    match policy {
        UnknownTokens::Refuse => {
            app.audit.record("fabric_unknown_refused", None, None, None);
            app.metrics.fabric_refresh("unknown_refused");
            cm_error(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "this refresh token is not one tokenhub holds (it was never issued through this hub, or was replaced long ago).",
                Some(&app.reauth_url),
            )
        }
        UnknownTokens::Pass => {
            app.audit.record("fabric_passed_on", None, None, Some("tokens/refresh"));
            app.metrics.fabric_refresh("passed_on");
            forwarded(app, Method::POST, "tokens/refresh", query, headers, body).await
        }
    }
}

/// Any other CM call: passed on unchanged. A revoke of a refresh token
/// tokenhub holds ends its lineage too, once the CM has done it.
async fn pass_on(State(app): State<AppState>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    if app.credmgr.is_none() {
        return cm_error(StatusCode::NOT_FOUND, "Not Found", "the FABRIC broker is not enabled", None);
    }
    let path = uri.path().trim_start_matches("/credmgr/").to_string();
    let revoked = (method == Method::POST && matches!(path.as_str(), "tokens/revokes" | "tokens/revoke"))
        .then(|| revoked_refresh_token(&body))
        .flatten();
    let response = forwarded(&app, method, &path, uri.query(), &headers, body).await;
    if let Some(token) = revoked
        && response.status().is_success()
    {
        end_revoked(&app, &token).await;
    }
    response
}

/// The refresh token a revoke names: `{"type": "refresh", "token": …}`
/// (FABlib) or `{"refresh_token": …}` (the older call).
fn revoked_refresh_token(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let token = match value.get("type").and_then(Value::as_str) {
        Some("refresh") => value.get("token"),
        Some(_) => None,
        None => value.get("refresh_token"),
    };
    token.and_then(Value::as_str).filter(|t| !t.is_empty()).map(str::to_string)
}

async fn end_revoked(app: &AppState, token: &str) {
    let grace = app.config.fabric.as_ref().map_or(0, |f| f.grace);
    let owner = match app.vault.store().refresh_owner(&digest_hex(token), now() - grace).await {
        // A retired token is spent: revoking it ends nothing that still works.
        Ok(Some(owner)) if owner.issuer == app.upstream.issuer() && !owner.retired => owner,
        Ok(_) => return,
        Err(e) => {
            tracing::error!(error = %e, "a revoke at the Credential Manager could not be matched to a lineage");
            return;
        }
    };
    let reason = "the refresh token was revoked at the Credential Manager";
    match app.vault.load(&owner.username, &owner.issuer).await {
        Ok(Some(lineage)) if lineage.active => {
            if let Err(e) = app.vault.mark_dead(&owner.username, &owner.issuer, lineage.version, reason).await {
                tracing::error!(user = %owner.username, error = %e, "a revoked lineage could not be ended");
                return;
            }
            tracing::info!(user = %owner.username, "lineage ended: its refresh token was revoked at the Credential Manager");
            app.audit.record("fabric_revoked", Some(&owner.username), Some(lineage.version), Some(reason));
        }
        _ => {}
    }
}

async fn forwarded(
    app: &AppState,
    method: Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let Some(cm) = app.credmgr.as_ref() else {
        return cm_error(StatusCode::NOT_FOUND, "Not Found", "the FABRIC broker is not enabled", None);
    };
    match cm.forward(method, path, query, headers, body).await {
        Ok((status, kept, body)) => {
            let status = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut response = (status, body).into_response();
            for (name, value) in kept.iter() {
                response.headers_mut().append(name, value.clone());
            }
            response
        }
        Err(e) => {
            tracing::warn!(error = %e, path, "a call passed on to the Credential Manager failed");
            let mut response = cm_error(
                StatusCode::BAD_GATEWAY,
                "Bad Gateway",
                "the Credential Manager is not answering; try again shortly",
                None,
            );
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revoke_names_its_refresh_token() {
        assert_eq!(revoked_refresh_token(br#"{"type":"refresh","token":"r1"}"#).as_deref(), Some("r1"));
        assert_eq!(revoked_refresh_token(br#"{"type":"identity","token":"hash"}"#), None);
        assert_eq!(revoked_refresh_token(br#"{"refresh_token":"r2"}"#).as_deref(), Some("r2"));
        assert_eq!(revoked_refresh_token(b"not json"), None);
    }

    #[test]
    fn the_cms_status_is_read_from_the_reason() {
        let reason = "the identity provider refused the refresh: the Credential Manager answered 500 Internal Server Error: x";
        assert_eq!(status_named_in(reason), Some(StatusCode::INTERNAL_SERVER_ERROR));
        assert_eq!(status_named_in("invalid_grant"), None);
    }
}
