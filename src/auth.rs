//! Who is calling tokenhub: the credentials presented (the hub's client
//! credentials, Basic or form fields; bearer-style tokens, `Bearer …` or
//! JupyterHub's `token …`) and the checks every machine endpoint makes with
//! them ([`hub_client`] for the hub itself, [`caller`] for a user's server
//! or an admin's token), behind the failure limiter and audited. Shared by
//! the JSON API, the OAuth token endpoint and the admin API.

use axum::http::{HeaderMap, HeaderValue, header};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use secrecy::ExposeSecret;

use crate::config::HubClientConfig;
use crate::errors::ApiError;
use crate::hub::Verdict;
use crate::state::AppState;
use crate::vault::crypto::{constant_time_eq, digest_hex};

/// Checks the hub's client credentials, from the Basic header or, failing
/// that, from `form_id`/`form_secret` (client_secret_post).
pub fn authenticate_hub_client(
    hub: &HubClientConfig,
    headers: &HeaderMap,
    form_id: Option<&str>,
    form_secret: Option<&str>,
) -> Result<(), ApiError> {
    let (id, secret) = match headers.get(header::AUTHORIZATION) {
        Some(value) => {
            basic_credentials(value).ok_or_else(|| ApiError::invalid_client("malformed Basic authorization header"))?
        }
        None => match (form_id, form_secret) {
            (Some(id), Some(secret)) => (id.to_string(), secret.to_string()),
            _ => return Err(ApiError::invalid_client("client authentication is required")),
        },
    };
    // Evaluate both comparisons so timing does not tell which one failed.
    let id_ok = constant_time_eq(&id, &hub.client_id);
    let secret_ok = constant_time_eq(&secret, hub.client_secret.expose_secret());
    if !(id_ok && secret_ok) {
        return Err(ApiError::invalid_client("client authentication failed"));
    }
    if form_id.is_some_and(|form_id| form_id != id) {
        return Err(ApiError::invalid_request("client_id in the form differs from the authenticated client"));
    }
    Ok(())
}

/// Decodes `Basic base64(urlencode(id):urlencode(secret))` (RFC 6749 2.3.1).
fn basic_credentials(value: &HeaderValue) -> Option<(String, String)> {
    let encoded = value.to_str().ok()?.strip_prefix("Basic ")?;
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    let unescape = |s: &str| url::form_urlencoded::parse(format!("x={s}").as_bytes()).next().map(|(_, v)| v.into_owned());
    Some((unescape(id)?, unescape(secret)?))
}

/// The token in `Authorization: Bearer …` or `Authorization: token …`.
pub fn presented_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    let known = scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token");
    (known && !token.is_empty()).then_some(token)
}

/// Checks the hub's client credentials (spawn hook, token endpoint), after
/// the failure limiter: a client that keeps failing gets 429 first.
pub fn hub_client(app: &AppState, headers: &HeaderMap, form_id: Option<&str>, form_secret: Option<&str>) -> Result<(), ApiError> {
    let client = crate::audit::client();
    app.limiter.check(client.as_deref())?;
    authenticate_hub_client(&app.config.hub, headers, form_id, form_secret).inspect_err(|e| {
        if e.error == "invalid_client" {
            app.limiter.failed(client.as_deref());
            app.audit.record("refused", None, None, Some("bad hub client credentials"));
        }
    })
}

/// A caller the hub vouched for.
#[derive(Debug)]
pub struct Caller {
    /// The hub user the token belongs to.
    pub username: String,
    /// Whether the hub says the token may use the operator's view (see
    /// [`crate::hub::Identity::admin`]).
    pub admin: bool,
    /// SHA-256 (hex) of the token presented: what tokenhub's caches and
    /// tables know a token by.
    pub token_digest: String,
}

impl Caller {
    fn vouched(identity: crate::hub::Identity, token_digest: String) -> Self {
        Self { username: identity.username, admin: identity.admin, token_digest }
    }
}

/// Identifies the caller of a notebook endpoint through the hub. A token
/// the hub vouched for in the last minute passes without the limiter (a
/// server known to be good is not slowed down by others failing behind the
/// same address); anything else meets the limiter first, then the hub (or
/// the cache of refused tokens). Every refusal counts as a failure of the
/// client and is audited with its reason.
pub async fn caller(app: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let (verdict, token_digest) = verdict_of(app, headers).await?;
    let (error, reason) = match verdict {
        Verdict::User(identity) => return Ok(Caller::vouched(identity, token_digest)),
        Verdict::Unknown => (ApiError::invalid_token("the hub does not know this token"), "unknown token"),
        Verdict::NotAUser | Verdict::Service(_) => {
            (ApiError::invalid_token("this token belongs to a service, not to a user"), "token of a service")
        }
        Verdict::MissingScope(scope) => (
            ApiError::insufficient_scope(format!(
                "this token may not call tokenhub: it needs the scope {scope} (a server's own JUPYTERHUB_API_TOKEN has it; \
                 a personal token must be created with it)"
            )),
            "token lacks the access:services scope",
        ),
    };
    Err(refuse(app, error, reason))
}

/// Identifies a hub service calling the delegation endpoint, refused (and
/// counted, and audited) like [`caller`] otherwise; a user's token is
/// refused there whatever its scopes.
pub async fn service_caller(app: &AppState, headers: &HeaderMap) -> Result<crate::hub::ServiceIdentity, ApiError> {
    let (verdict, _) = verdict_of(app, headers).await?;
    let (error, reason) = match verdict {
        Verdict::Service(service) => return Ok(service),
        Verdict::Unknown => (ApiError::invalid_token("the hub does not know this token"), "unknown token"),
        Verdict::NotAUser => (ApiError::invalid_token("this token belongs to neither a service nor a user"), "unknown kind"),
        Verdict::User(_) | Verdict::MissingScope(_) => (
            ApiError::access_denied(
                "only a hub service's token may fetch another user's tokens; a user's own are at /api/v1/tokens",
            ),
            "a user's token at the delegation endpoint",
        ),
    };
    Err(refuse(app, error, reason))
}

/// What the hub says about the request's token, and the token's digest. A
/// token the hub vouched for in the last minute passes without the limiter;
/// anything else meets the limiter first, then the hub (or the cache of
/// refused tokens).
async fn verdict_of(app: &AppState, headers: &HeaderMap) -> Result<(Verdict, String), ApiError> {
    // The client's address as text only where the limiter needs it: a token
    // the hub vouched for passes without it.
    let Some(token) = presented_token(headers) else {
        app.limiter.check(crate::audit::client().as_deref())?;
        return Err(refuse(
            app,
            ApiError::invalid_token("send the server's JUPYTERHUB_API_TOKEN as `Authorization: token …`"),
            "no token",
        ));
    };
    let token_digest = digest_hex(token);
    if let Some(verdict @ Verdict::User(_)) = app.hub.cached(&token_digest) {
        return Ok((verdict, token_digest));
    }
    app.limiter.check(crate::audit::client().as_deref())?;
    let verdict = app.hub.identify(token, &token_digest).await?;
    Ok((verdict, token_digest))
}

/// Counts a refusal against the client and audits it with its reason.
fn refuse(app: &AppState, error: ApiError, reason: &str) -> ApiError {
    app.limiter.failed(crate::audit::client().as_deref());
    app.audit.record("refused", None, None, Some(reason));
    error
}

/// Property tests of credential parsing.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    /// RFC 6749 2.3.1: id and secret are form-encoded before Basic.
    fn basic(id: &str, secret: &str) -> HeaderValue {
        let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        HeaderValue::from_str(&format!("Basic {}", STANDARD.encode(format!("{}:{}", enc(id), enc(secret))))).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Any id and secret (including `+~/=:%`, spaces and non-ASCII)
        /// come back exactly as the client had them.
        #[test]
        fn basic_credentials_round_trip(id in "[a-zA-Z0-9+~/=:% ._-]{0,40}|\\PC{0,20}", secret in "[a-zA-Z0-9+~/=:% ._-]{0,60}|\\PC{0,20}") {
            prop_assert_eq!(basic_credentials(&basic(&id, &secret)), Some((id, secret)));
        }

        /// Any header value: parsed or refused, never a panic.
        #[test]
        fn basic_credentials_never_panic(text in "\\PC{0,200}") {
            if let Ok(value) = HeaderValue::from_str(&text) {
                let _ = basic_credentials(&value);
            }
            if let Ok(value) = HeaderValue::from_str(&format!("Basic {text}")) {
                let _ = basic_credentials(&value);
            }
        }

        /// `token X` and `Bearer X` give X (trimmed); other schemes nothing.
        #[test]
        fn presented_token_schemes(token in "[A-Za-z0-9._~+/=-]{1,80}", scheme in "token|Token|bearer|Bearer|Basic|Digest") {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("{scheme} {token}")).unwrap());
            let expected = matches!(scheme.to_ascii_lowercase().as_str(), "token" | "bearer").then_some(token.as_str());
            prop_assert_eq!(presented_token(&headers), expected);
        }
    }
}
