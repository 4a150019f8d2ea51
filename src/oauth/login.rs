//! The browser half of a hub login: `/oauth2/authorize` checks the hub's
//! request and sends the browser to the upstream IdP; `/callback` finishes
//! the upstream login, stores the tokens in the vault and sends the browser
//! back to the hub with a code of ours.
//!
//! Between the two, the pending login (PKCE verifier, nonce, the hub's
//! request) lives in an encrypted, HttpOnly, SameSite=Lax cookie named after
//! the `state`, so any replica can finish the login and two tabs do not clash.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum_extra::extract::CookieJar;
use axum_extra::extract::cookie::{Cookie, SameSite};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::errors::PageError;
use crate::names;
use crate::state::AppState;
use crate::time::now;
use crate::vault::crypto::{digest_hex, random_token};
use crate::vault::store::HubCodeRow;
use crate::web::session;

/// How long a started login may take at the IdP.
const LOGIN_TTL_SECS: i64 = 600;
/// Lifetime of a code issued to the hub.
pub const CODE_TTL_SECS: i64 = 60;
const COOKIE_PREFIX: &str = "tokenhub_login_";

/// The hub's authorization request, checked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HubRequest {
    /// The hub's client id.
    pub client_id: String,
    /// Where to send the code.
    pub redirect_uri: String,
    /// The hub's `state`, returned untouched.
    pub state: Option<String>,
    /// Requested scope.
    pub scope: String,
    /// PKCE S256 challenge, if the hub sent one.
    pub code_challenge: Option<String>,
}

/// Why the browser is signing in upstream, and so where it goes after.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Purpose {
    /// A hub login: back to the hub with a code.
    Hub(HubRequest),
    /// `/refresh`: renew the lineage, rewrite the token files, say so.
    Refresh,
    /// Signing in to tokenhub's own token page.
    Page,
}

/// What the login cookie holds (sealed).
#[derive(Serialize, Deserialize)]
struct PendingLogin {
    purpose: Purpose,
    /// Whether this login already asked the IdP for consent (`prompt=consent`).
    #[serde(default)]
    consent_asked: bool,
    nonce: String,
    pkce_verifier: String,
    expires_at: i64,
}

/// Errors at the callback that a retry with `prompt=consent` may cure: how
/// strict providers refuse `offline_access` asked for without it.
const CONSENT_ERRORS: [&str; 4] = ["invalid_request", "invalid_scope", "consent_required", "interaction_required"];

/// Whether this login may go back to the IdP once with `prompt=consent`
/// (OIDC Core §11: `offline_access` needs it): when `offline_access` is
/// asked for, on a sign-in the user is looking at (the silent renewal behind
/// `/refresh` stays silent), not twice, and not when the operator set
/// `prompt` themselves.
fn may_ask_consent(app: &AppState, pending: &PendingLogin) -> bool {
    let upstream = &app.config.upstream;
    upstream.scopes.iter().any(|s| s == "offline_access")
        && !pending.consent_asked
        && !matches!(pending.purpose, Purpose::Refresh)
        && !upstream.auth_params.iter().any(|(name, _)| name == "prompt")
}

/// The login cookie for `state`, with its name, path and `Secure` (value
/// and the other attributes added by the caller; a removal needs these).
/// Over https at the root of the host it is `__Host-tokenhub_login_<state>`
/// with `Path=/`, as `__Host-` requires (it is one cookie per login, so the
/// wider path clashes with nothing); else `<base>/callback` is its path and
/// over https its name starts `__Secure-` (see [`session::cookie_name`]).
fn login_cookie(app: &AppState, state: &str) -> Cookie<'static> {
    let name = session::cookie_name(app, &format!("{COOKIE_PREFIX}{state}"));
    let http = &app.config.http;
    let path =
        if http.secure_cookies && http.base_path.is_empty() { "/".to_string() } else { format!("{}/callback", http.base_path) };
    Cookie::build(name).path(path).secure(http.secure_cookies).build()
}

fn cookie_aad(state: &str) -> Vec<u8> {
    format!("tokenhub login\0{state}").into_bytes()
}

fn param<'a>(params: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    params.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

/// Sends an OAuth error back to the hub's (already checked) redirect URI.
fn redirect_error(redirect_uri: &str, state: Option<&str>, error: &str, description: &str) -> Response {
    let mut url = url::Url::parse(redirect_uri).expect("redirect URI was checked against the config");
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("error", error).append_pair("error_description", description);
        if let Some(state) = state {
            q.append_pair("state", state);
        }
    }
    Redirect::to(url.as_str()).into_response()
}

/// `GET /oauth2/authorize`: the hub sends the browser here to log in.
pub async fn authorize(
    State(app): State<AppState>,
    jar: CookieJar,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, PageError> {
    let hub = &app.config.hub;
    let bad = |msg: &str| {
        PageError::new(StatusCode::BAD_REQUEST, "Invalid sign-in request", msg.to_string())
            .with_action("Back to JupyterHub", app.hub_home())
    };
    let client_id = param(&params, "client_id").ok_or_else(|| bad("The request names no client (client_id is missing)."))?;
    if client_id != hub.client_id {
        return Err(bad("The request comes from a client tokenhub does not know."));
    }
    let redirect_uri = param(&params, "redirect_uri").unwrap_or(hub.redirect_uri.as_str());
    if redirect_uri != hub.redirect_uri.as_str() {
        return Err(bad("The request's redirect_uri is not the one registered for this client."));
    }
    let state = param(&params, "state");
    if param(&params, "response_type") != Some("code") {
        return Ok(redirect_error(redirect_uri, state, "unsupported_response_type", "only response_type=code is supported"));
    }
    let code_challenge = param(&params, "code_challenge");
    match (code_challenge, param(&params, "code_challenge_method")) {
        (None, None) | (Some(_), Some("S256")) => {}
        (None, Some(_)) => {
            return Ok(redirect_error(redirect_uri, state, "invalid_request", "code_challenge_method without code_challenge"));
        }
        (Some(_), _) => {
            return Ok(redirect_error(
                redirect_uri,
                state,
                "invalid_request",
                "only the S256 code challenge method is supported",
            ));
        }
    }
    if let Some(c) = code_challenge
        && !(43..=128).contains(&c.len())
    {
        return Ok(redirect_error(redirect_uri, state, "invalid_request", "code_challenge must be 43 to 128 characters"));
    }

    let hub_request = HubRequest {
        client_id: client_id.to_string(),
        redirect_uri: redirect_uri.to_string(),
        state: state.map(str::to_string),
        scope: param(&params, "scope").unwrap_or("openid").to_string(),
        code_challenge: code_challenge.map(str::to_string),
    };
    start_login(&app, jar, Purpose::Hub(hub_request)).await
}

/// Sends the browser to the upstream IdP, remembering why in the login cookie.
pub async fn start_login(app: &AppState, jar: CookieJar, purpose: Purpose) -> Result<Response, PageError> {
    start_upstream_login(app, jar, purpose, false).await
}

async fn start_upstream_login(
    app: &AppState,
    jar: CookieJar,
    purpose: Purpose,
    ask_consent: bool,
) -> Result<Response, PageError> {
    let upstream = app.upstream.authorization_request(ask_consent).await?;
    let pending = PendingLogin {
        purpose,
        consent_asked: ask_consent,
        nonce: upstream.nonce,
        pkce_verifier: upstream.pkce_verifier.expose_secret().to_string(),
        expires_at: now() + LOGIN_TTL_SECS,
    };
    let sealed =
        app.keys.seal_text(&serde_json::to_string(&pending).expect("pending login serializes"), &cookie_aad(&upstream.state));
    let mut cookie = login_cookie(app, &upstream.state);
    cookie.set_value(sealed);
    cookie.set_http_only(true);
    cookie.set_secure(app.config.http.secure_cookies);
    cookie.set_same_site(SameSite::Lax);
    cookie.set_max_age(time::Duration::seconds(LOGIN_TTL_SECS));
    Ok((jar.add(cookie), Redirect::to(upstream.url.as_str())).into_response())
}

/// `GET /callback`: the IdP sends the browser back here.
pub async fn callback(State(app): State<AppState>, jar: CookieJar, Query(params): Query<HashMap<String, String>>) -> Response {
    match finish(&app, &jar, &params).await {
        Ok(response) => {
            app.metrics.logins.inc();
            response
        }
        Err(page) => {
            app.metrics.login_failures.inc();
            // Drop this login's cookie whatever went wrong: it cannot be reused.
            let jar = match param(&params, "state") {
                Some(state) => jar.remove(login_cookie(&app, state)),
                None => jar,
            };
            (jar, page).into_response()
        }
    }
}

async fn finish(app: &AppState, jar: &CookieJar, params: &HashMap<String, String>) -> Result<Response, PageError> {
    let start_again = |status, title: &str, msg: &str| {
        PageError::new(status, title.to_string(), msg.to_string()).with_action("Sign in again", app.hub_home())
    };
    let expired = || {
        start_again(
            StatusCode::BAD_REQUEST,
            "Sign-in expired",
            "This sign-in was not started in this browser, was already completed, or took too long. Please sign in again.",
        )
    };
    let state = param(params, "state").ok_or_else(|| {
        start_again(
            StatusCode::BAD_REQUEST,
            "Invalid sign-in response",
            "The identity provider's response has no state parameter.",
        )
    })?;
    let cookie = jar.get(login_cookie(app, state).name()).ok_or_else(expired)?;
    let pending: PendingLogin = app
        .keys
        .open_text(cookie.value(), &cookie_aad(state))
        .ok()
        .and_then(|json| serde_json::from_str(&json).ok())
        .ok_or_else(expired)?;
    if pending.expires_at < now() {
        return Err(expired());
    }

    if let Some(error) = param(params, "error") {
        let description = param(params, "error_description").unwrap_or("no description given");
        // A strict provider refuses a request for offline_access without
        // prompt=consent outright (OIDC Core §11): ask once more with it.
        if CONSENT_ERRORS.contains(&error) && may_ask_consent(app, &pending) {
            tracing::info!(error, "the identity provider refused the sign-in request: asking again with prompt=consent");
            let jar = jar.clone().remove(login_cookie(app, state));
            return start_upstream_login(app, jar, pending.purpose, true).await;
        }
        let status = if error == "access_denied" { StatusCode::FORBIDDEN } else { StatusCode::BAD_REQUEST };
        tracing::warn!(error, "identity provider returned an error to the callback");
        return Err(start_again(
            status,
            "The identity provider did not sign you in",
            &format!("It answered “{error}”: {description}."),
        ));
    }
    if let Some(iss) = param(params, "iss")
        && iss.trim_end_matches('/') != app.upstream.issuer().trim_end_matches('/')
    {
        return Err(start_again(
            StatusCode::BAD_REQUEST,
            "Invalid sign-in response",
            "The response names another identity provider (iss).",
        ));
    }
    let code = param(params, "code").ok_or_else(|| {
        start_again(StatusCode::BAD_REQUEST, "Invalid sign-in response", "The identity provider's response has no code.")
    })?;

    let login = app
        .upstream
        .finish_login(code, &SecretString::from(pending.pkce_verifier.clone()), &pending.nonce)
        .await
        .map_err(|e| PageError::from(e).with_action("Sign in again", app.hub_home()))?;

    let upstream = &app.config.upstream;
    if login.tokens.refresh_token.is_none() && upstream.scopes.iter().any(|s| s == "offline_access") {
        // Strict providers grant offline_access only with prompt=consent.
        if may_ask_consent(app, &pending) {
            tracing::info!("the login brought no refresh token: asking the identity provider again with prompt=consent");
            let jar = jar.clone().remove(login_cookie(app, state));
            return start_upstream_login(app, jar, pending.purpose, true).await;
        }
        tracing::warn!(
            "the login brought no refresh token although offline_access was requested: tokens cannot be refreshed; \
             check the client's grant types at the identity provider, or set TOKENHUB_OIDC_AUTH_PARAMS (e.g. prompt=consent)"
        );
    }
    let claim = &upstream.username_claim;
    let name_claim = match login.claims.get(claim) {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => {
            return Err(start_again(
                StatusCode::FORBIDDEN,
                "Missing user name",
                &format!(
                    "Your identity provider did not release the claim “{claim}” that names your account here. Ask the operators which account to use."
                ),
            ));
        }
    };
    // The name the hub will make of the claim, and only if it is this
    // subject's: checked before anything of the login is stored.
    let username = names::canonical(&name_claim).map_err(|why| {
        start_again(
            StatusCode::FORBIDDEN,
            "This user name cannot be used",
            &format!("Your identity provider names your account “{name_claim}”, which cannot be a user name here: {why}. Ask the operators which account to use."),
        )
    })?;
    if let Err(_taken) = names::claim(app, &username, &login.issuer, &login.subject).await? {
        return Err(PageError::new(
            StatusCode::FORBIDDEN,
            "This user name belongs to someone else",
            format!(
                "The user name “{username}” belongs to another account at your identity provider, so you cannot sign in as it. \
                 If the name should now be yours, ask the operators to move it to your account: give them this name and your \
                 account's subject “{}” (the other account's subject is not shown).",
                login.subject
            ),
        )
        .with_action("Back to JupyterHub", app.hub_home()));
    }
    let version =
        app.vault.save_login(&username, &login.issuer, &login.subject, &login.tokens, &login.claims, &pending.nonce).await?;
    tracing::info!(user = %username, issuer = %login.issuer, version, refresh_token = login.tokens.refresh_token.is_some(), "login stored");
    app.audit.record("login", Some(&username), Some(version), Some("upstream login stored"));
    app.vault.record_refresh_expiry(&username, &login.issuer, version, login.refresh_expires_in).await;
    let jar = jar.clone().remove(login_cookie(app, state));
    let jar = session::start(app, jar, &username);

    let hub = match pending.purpose {
        Purpose::Hub(hub) => hub,
        Purpose::Refresh => return Ok((jar, crate::web::renewed::renewed(app, &username).await?).into_response()),
        Purpose::Page => return Ok((jar, Redirect::to(app.url("/").as_str())).into_response()),
    };
    let code = random_token();
    app.vault
        .store()
        .insert_hub_code(&HubCodeRow {
            code_hash: digest_hex(&code),
            username,
            issuer: login.issuer,
            client_id: hub.client_id,
            redirect_uri: hub.redirect_uri.clone(),
            code_challenge: hub.code_challenge,
            scope: hub.scope,
            expires_at: now() + CODE_TTL_SECS,
        })
        .await?;

    let mut back = url::Url::parse(&hub.redirect_uri).expect("redirect URI was checked at authorize");
    back.query_pairs_mut().append_pair("code", &code);
    if let Some(hub_state) = &hub.state {
        back.query_pairs_mut().append_pair("state", hub_state);
    }
    Ok((jar, Redirect::to(back.as_str())).into_response())
}
