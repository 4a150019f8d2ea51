//! Tokens for code running in a notebook: `GET /api/v1/tokens` and
//! `POST /api/v1/tokens/refresh`, authenticated with the server's own
//! `JUPYTERHUB_API_TOKEN` (see [`crate::auth::caller`]).

use std::collections::HashMap;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use super::no_store;
use crate::auth::caller;
use crate::errors::ApiError;
use crate::state::AppState;
use crate::time::now;
use crate::tokens::narrow::{self, NarrowError, NarrowRequest};
use crate::tokens::refresh::{Fresh, RefreshError, Want};
use crate::tokens::{fabric, sharing};
use crate::vault::crypto::{constant_time_eq, digest_hex};
use crate::vault::narrow::NarrowToken;

/// How long a refresh token rotated away still gets the current set back.
pub const ROTATION_GRACE_SECS: i64 = 120;

/// The JSON answer of the notebook API, serialized straight from the
/// lineage it borrows (this is the hot path: no intermediate JSON tree).
#[derive(Serialize)]
struct TokensAnswer<'a> {
    refreshed: bool,
    min_valid_capped_to: Option<i64>,
    user: &'a str,
    issuer: &'a str,
    subject: &'a str,
    token_type: &'static str,
    access_token: &'a str,
    id_token: &'a str,
    refresh_token: Option<&'a str>,
    expires_at: Option<i64>,
    expires_in: Option<i64>,
    scope: &'a str,
    version: i64,
    refreshed_at: Option<i64>,
    reauth_url: &'a str,
}

fn tokens_json(app: &AppState, fresh: &Fresh) -> Response {
    let lineage = &fresh.lineage;
    let t = &lineage.tokens;
    let answer = TokensAnswer {
        refreshed: fresh.refreshed,
        min_valid_capped_to: fresh.capped_min_valid,
        user: &lineage.username,
        issuer: &lineage.issuer,
        subject: &lineage.subject,
        token_type: "Bearer",
        access_token: t.access_token.expose_secret(),
        id_token: t.id_token.expose_secret(),
        refresh_token: t.refresh_token.as_ref().filter(|_| !app.custody()).map(|r| r.expose_secret()),
        expires_at: t.access_expires_at,
        expires_in: t.access_expires_at.map(|e| (e - now()).max(0)),
        scope: &t.scope,
        version: lineage.version,
        refreshed_at: lineage.refreshed_at,
        reauth_url: &app.reauth_url,
    };
    let mut response = Response::new(axum::body::Body::from(answer.to_json()));
    // Room for every header the answer leaves with (the security headers,
    // the request id, no-store, the length): the map does not grow on the way.
    let headers = response.headers_mut();
    headers.reserve(12);
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

impl TokensAnswer<'_> {
    /// The same bytes as `serde_json::to_vec(self)` (a property test holds
    /// them equal), written without serde_json's byte-by-byte escaping of
    /// the tokens, which need none: it was the hot path's largest cost.
    fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            256 + self.access_token.len() + self.id_token.len() + self.refresh_token.map_or(0, str::len) + self.reauth_url.len(),
        );
        // Numbers by itoa and keys as bytes: `write!`'s formatting
        // machinery cost more than the rest of the answer.
        let int = |out: &mut Vec<u8>, v: Option<i64>| match v {
            Some(v) => out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes()),
            None => out.extend_from_slice(b"null"),
        };
        out.extend_from_slice(if self.refreshed { b"{\"refreshed\":true" } else { b"{\"refreshed\":false" });
        out.extend_from_slice(b",\"min_valid_capped_to\":");
        int(&mut out, self.min_valid_capped_to);
        for (key, value) in [
            ("user", self.user),
            ("issuer", self.issuer),
            ("subject", self.subject),
            ("token_type", self.token_type),
            ("access_token", self.access_token),
            ("id_token", self.id_token),
        ] {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b"\":");
            json_str(&mut out, value);
        }
        out.extend_from_slice(b",\"refresh_token\":");
        match self.refresh_token {
            Some(token) => json_str(&mut out, token),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"expires_at\":");
        int(&mut out, self.expires_at);
        out.extend_from_slice(b",\"expires_in\":");
        int(&mut out, self.expires_in);
        out.extend_from_slice(b",\"scope\":");
        json_str(&mut out, self.scope);
        out.extend_from_slice(b",\"version\":");
        int(&mut out, Some(self.version));
        out.extend_from_slice(b",\"refreshed_at\":");
        int(&mut out, self.refreshed_at);
        out.extend_from_slice(b",\"reauth_url\":");
        json_str(&mut out, self.reauth_url);
        out.push(b'}');
        out
    }
}

/// A JSON string as serde_json writes it: as is between quotes when nothing
/// in it needs escaping (checked without an early exit, so the compiler can
/// check many bytes at once), else by serde_json itself.
fn json_str(out: &mut Vec<u8>, value: &str) {
    let escape = value.bytes().fold(false, |escape, b| escape | (b < 0x20) | (b == b'"') | (b == b'\\'));
    if escape {
        serde_json::to_writer(&mut *out, value).expect("a string serializes");
    } else {
        out.push(b'"');
        out.extend_from_slice(value.as_bytes());
        out.push(b'"');
    }
}

/// The hand-written JSON against serde_json's.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Any strings (quotes, backslashes, control characters, non-ASCII)
        /// and numbers give exactly serde_json's bytes.
        #[test]
        fn to_json_is_serde_json(
            strings in proptest::collection::vec("\\PC{0,40}|[\\x00-\\x7f]{0,40}|[A-Za-z0-9._~+/=-]{0,300}", 9),
            numbers in proptest::collection::vec(proptest::option::of(any::<i64>()), 4),
            version in any::<i64>(),
            flags in any::<(bool, bool)>(),
        ) {
            let answer = TokensAnswer {
                refreshed: flags.0,
                min_valid_capped_to: numbers[0],
                user: &strings[0],
                issuer: &strings[1],
                subject: &strings[2],
                token_type: "Bearer",
                access_token: &strings[3],
                id_token: &strings[4],
                refresh_token: flags.1.then_some(strings[5].as_str()),
                expires_at: numbers[1],
                expires_in: numbers[2],
                scope: &strings[6],
                version,
                refreshed_at: numbers[3],
                reauth_url: &strings[7],
            };
            prop_assert_eq!(String::from_utf8(answer.to_json()).unwrap(), serde_json::to_string(&answer).unwrap());
        }
    }
}

/// The API's answer when fresh tokens cannot be had.
pub(super) fn refresh_error(app: &AppState, e: RefreshError) -> ApiError {
    let reauth = app.reauth_url.clone();
    match e {
        RefreshError::NoLineage => {
            ApiError::new(StatusCode::UNAUTHORIZED, "invalid_grant", "tokenhub holds no tokens for you: sign in again")
                .with_reauth(reauth)
        }
        RefreshError::Dead(reason) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_grant",
            format!("the identity provider no longer accepts your login ({reason}); open reauth_url to renew it"),
        )
        .with_reauth(reauth),
        RefreshError::Unavailable(_) => {
            let error = ApiError::unavailable("the identity provider is not answering; your tokens are kept, try again shortly");
            // The IdP's own `Retry-After`, passed on.
            match app.upstream.wait_asked() {
                Some(wait) => error.with_retry_after(wait.as_secs_f64().ceil() as u64),
                None => error,
            }
        }
        RefreshError::Misconfigured(_) => ApiError::unavailable(
            "the identity provider refuses tokenhub's own registration there; your tokens are kept, and the operators \
             have to fix the registration",
        ),
        RefreshError::Failed(_) => {
            ApiError::unavailable("the identity provider's answer could not be used; your tokens are kept, try again shortly")
        }
        RefreshError::Unverified(_) => ApiError::unavailable(
            "your tokens were refreshed, but the identity provider's key set is not answering, so the new ID token \
             cannot be checked yet; try again shortly",
        ),
        RefreshError::Busy(_) => {
            ApiError::unavailable("another tokenhub replica is still refreshing your tokens; try again shortly")
        }
        RefreshError::NarrowRefused(reason) => {
            ApiError::invalid_scope(format!("the identity provider would not give this token: {reason}"))
        }
        RefreshError::Vault(e) => e.into(),
    }
}

/// The answer in the asked format (checked by the caller: `fabric` or JSON).
fn answer(app: &AppState, fresh: &Fresh, format: Option<&str>) -> Response {
    match format {
        Some("fabric") => no_store(fabric::document(&fresh.lineage, app.custody())),
        _ => crate::no_store(tokens_json(app, fresh)),
    }
}

/// `GET /api/v1/tokens`: the caller's current tokens; `min_valid=N` makes
/// the access token valid at least N more seconds (refreshing if needed);
/// `format=fabric` gives the `~/.tokens.json` document.
pub async fn tokens(State(app): State<AppState>, request: axum::extract::Request) -> Result<Response, ApiError> {
    // The request itself, not `HeaderMap` and `Query` extractors: those copy
    // the headers and build a map on every call of the hot path.
    let params = query_params(request.uri().query());
    let headers = request.headers();
    let min_valid = min_valid(&params)?;
    let format = params.get("format").map(String::as_str);
    if let Some(other) = format.filter(|f| !matches!(*f, "json" | "fabric")) {
        return Err(ApiError::invalid_request(format!("unknown format {other:?} (use json or fabric)")));
    }
    let narrow = narrow_request(&params)?;
    if narrow.is_some() && format.is_some_and(|f| f != "json") {
        return Err(ApiError::invalid_request("a narrower token (scope or audience) comes only as JSON"));
    }
    let caller = caller(&app, headers).await?;
    sharing::refuse_shared_server(&app, &caller).await?;
    let username = caller.username;
    if let Some(request) = narrow {
        let token = narrow::token(&app, &username, &request, narrow::Freshness::MinValid(min_valid))
            .await
            .map_err(|e| narrow_error(&app, e))?;
        app.audit.record_off_path("notebook_fetch_narrow", &username, None, Some(&request.key()));
        return Ok(no_store(narrow_json(&app, &token)));
    }
    let fresh =
        app.refresher.fresh(&app, &username, Want { min_valid, force: false }).await.map_err(|e| refresh_error(&app, e))?;
    app.audit.record_off_path("notebook_fetch", &username, Some(fresh.lineage.version), None);
    Ok(answer(&app, &fresh, format))
}

/// A query string's parameters (the last of a repeated one counts); none
/// costs nothing.
pub(super) fn query_params(query: Option<&str>) -> HashMap<String, String> {
    match query {
        Some(query) if !query.is_empty() => url::form_urlencoded::parse(query.as_bytes()).into_owned().collect(),
        _ => HashMap::new(),
    }
}

/// The query's `min_valid`, in seconds.
pub(super) fn min_valid(params: &HashMap<String, String>) -> Result<Option<i64>, ApiError> {
    params
        .get("min_valid")
        .map(|v| {
            v.parse::<u32>().map(i64::from).map_err(|_| ApiError::invalid_request("min_valid must be a whole number of seconds"))
        })
        .transpose()
}

/// The query's narrower-token request (`scope`, `audience`), if any.
pub(super) fn narrow_request(params: &HashMap<String, String>) -> Result<Option<NarrowRequest>, ApiError> {
    NarrowRequest::parse(params.get("scope").map(String::as_str), params.get("audience").map(String::as_str))
        .map_err(ApiError::invalid_request)
}

/// A narrower token as the API gives it (never a refresh token).
pub(super) fn narrow_json(app: &AppState, token: &NarrowToken) -> serde_json::Value {
    let now = now();
    serde_json::json!({
        "access_token": token.access_token.expose_secret(),
        "token_type": "Bearer",
        "expires_at": token.expires_at,
        "expires_in": token.expires_at.map(|e| (e - now).max(0)),
        "scope": token.scopes,
        "audience": token.audience,
        "issuer": app.upstream.issuer(),
    })
}

/// The API's answer when a narrower token cannot be had.
pub(super) fn narrow_error(app: &AppState, e: NarrowError) -> ApiError {
    match e {
        NarrowError::NotAllowed(why) => ApiError::access_denied(why),
        NarrowError::WiderThanLogin(why) => ApiError::invalid_scope(why),
        NarrowError::Hub(e) => e.into(),
        NarrowError::Refresh(e) => refresh_error(app, e),
    }
}

/// The body of a forced refresh (JSON or form; both optional).
#[derive(Debug, Default, Deserialize)]
pub struct RefreshRequest {
    /// The refresh token the caller holds, if any.
    refresh_token: Option<String>,
}

/// `POST /api/v1/tokens/refresh`: refresh now. A caller may send the refresh
/// token it holds: the current one refreshes; one rotated away moments ago
/// gets the current set back without an upstream call; anything else is
/// refused.
pub async fn force_refresh(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let request: RefreshRequest = if body.is_empty() {
        RefreshRequest::default()
    } else if headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"))
    {
        serde_urlencoded::from_bytes(&body).map_err(|_| ApiError::invalid_request("malformed form body"))?
    } else {
        serde_json::from_slice(&body)
            .map_err(|_| ApiError::invalid_request("the body must be JSON like {\"refresh_token\": \"…\"}"))?
    };
    let caller = caller(&app, &headers).await?;
    sharing::refuse_shared_server(&app, &caller).await?;
    let username = caller.username;
    if let Some(held) = &request.refresh_token {
        let lineage = app
            .vault
            .load(&username, app.upstream.issuer())
            .await?
            .ok_or_else(|| refresh_error(&app, RefreshError::NoLineage))?;
        let current = lineage.tokens.refresh_token.as_ref().map(|t| t.expose_secret().to_string());
        if current.as_deref() != Some(held.as_str()) {
            let rotated_recently = lineage.rotated_at.is_some_and(|at| now() - at <= ROTATION_GRACE_SECS)
                && lineage.previous_refresh_hash.as_deref().is_some_and(|h| constant_time_eq(h, &digest_hex(held)));
            if rotated_recently && lineage.active {
                // A retry or a late kernel: it gets what replaced its token.
                app.audit.record("rotation_grace", Some(&username), Some(lineage.version), None);
                let fresh = Fresh { lineage: std::sync::Arc::new(lineage), refreshed: true, capped_min_valid: None };
                return Ok(answer(&app, &fresh, None));
            }
            app.audit.record(
                "invalid_grant",
                Some(&username),
                Some(lineage.version),
                Some("presented refresh token is not the current one"),
            );
            return Err(ApiError::invalid_grant(
                "this refresh token is not the current one (it was rotated away or never issued); GET /api/v1/tokens gives the current set",
            )
            .with_reauth(app.url("/refresh").to_string()));
        }
    }
    let fresh =
        app.refresher.fresh(&app, &username, Want { min_valid: None, force: true }).await.map_err(|e| refresh_error(&app, e))?;
    app.audit.record("notebook_refresh", Some(&username), Some(fresh.lineage.version), None);
    Ok(answer(&app, &fresh, None))
}
