//! Errors and how they become responses. Which to use:
//!
//! - [`ApiError`] on machine endpoints (`/oauth2/token`, `/oauth2/userinfo`,
//!   `/api/*`, `/healthz`): JSON `{"error", "error_description"}` with the
//!   OAuth error code that fits, never HTML.
//! - [`PageError`] on endpoints a browser opens (`/oauth2/authorize`,
//!   `/callback`, `/refresh`): a readable page saying what happened and what
//!   to do next.
//!
//! Internal failures (database, keys) convert into either with `?`; they are
//! logged here, once, and answered without detail. No text that reaches a
//! response or a log holds a token value: the error types never carry one.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde_json::json;

use crate::hub::HubError;
use crate::oauth::upstream::UpstreamError;
use crate::vault::VaultError;
use crate::vault::store::StoreError;
use crate::web::views;

/// An error answered as OAuth-style JSON.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// OAuth error code (`invalid_request`, `invalid_grant`, …).
    pub error: &'static str,
    /// Human-readable detail.
    pub description: String,
    /// Where a person renews the login, when that is the way out.
    pub reauth_url: Option<String>,
    /// Seconds to wait before trying again (`Retry-After`), when known.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// Any status and code.
    pub fn new(status: StatusCode, error: &'static str, description: impl Into<String>) -> Self {
        Self { status, error, description: description.into(), reauth_url: None, retry_after: None }
    }
    /// Names the URL that renews the login (`/refresh`).
    pub fn with_reauth(mut self, url: impl Into<String>) -> Self {
        self.reauth_url = Some(url.into());
        self
    }
    /// Says when to try again (`Retry-After`).
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }
    /// 403 `insufficient_scope`: the token is valid but does not allow this.
    pub fn insufficient_scope(description: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "insufficient_scope", description)
    }
    /// 400 `invalid_scope`: a narrower token wider than the login, or one
    /// the IdP would not give.
    pub fn invalid_scope(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_scope", description)
    }
    /// 403 `access_denied`: the operator's rules do not allow the request
    /// (the description names the rule).
    pub fn access_denied(description: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "access_denied", description)
    }
    /// 400 `invalid_request`: a parameter is missing or malformed.
    pub fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }
    /// 400 `invalid_grant`: a code or refresh token is unknown, used, expired or mismatched.
    pub fn invalid_grant(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_grant", description)
    }
    /// 401 `invalid_client`: client authentication failed.
    pub fn invalid_client(description: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_client", description)
    }
    /// 401 `invalid_token`: the bearer token is missing, unknown or expired.
    pub fn invalid_token(description: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_token", description)
    }
    /// 404 `not_found`.
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
    }
    /// 503 `temporarily_unavailable`: a dependency is down; try again.
    pub fn unavailable(description: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", description)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.error, "error_description": self.description });
        if let Some(url) = &self.reauth_url {
            body["reauth_url"] = json!(url);
        }
        let mut response = crate::no_store((self.status, axum::Json(body)).into_response());
        let headers = response.headers_mut();
        let challenge = match self.error {
            "invalid_client" => Some("Basic realm=\"tokenhub\""),
            "invalid_token" => Some("Bearer realm=\"tokenhub\", error=\"invalid_token\""),
            _ => None,
        };
        if let (Some(c), StatusCode::UNAUTHORIZED) = (challenge, self.status) {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(c));
        }
        if self.error == "insufficient_scope" {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tokenhub\", error=\"insufficient_scope\""),
            );
        }
        match (self.retry_after, self.status) {
            (Some(seconds), _) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            }
            (None, StatusCode::SERVICE_UNAVAILABLE) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            _ => {}
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "database failure");
        Self::unavailable("the token store is unavailable")
    }
}

impl From<VaultError> for ApiError {
    fn from(e: VaultError) -> Self {
        match e {
            VaultError::Store(e) => e.into(),
            e @ VaultError::Crypto { .. } => {
                tracing::error!(error = %e, "vault entry does not decrypt: check TOKENHUB_CRYPT_KEY");
                Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "stored tokens cannot be decrypted")
            }
        }
    }
}

/// The hub could not be asked who is calling: the caller may retry.
impl From<HubError> for ApiError {
    fn from(e: HubError) -> Self {
        tracing::warn!(error = %e, "hub API call failed");
        match e {
            HubError::NotConfigured => ApiError::unavailable("tokenhub is not connected to the hub's API"),
            _ => ApiError::unavailable("the hub could not confirm who is calling; try again"),
        }
    }
}

/// An error shown to a person in the browser.
#[derive(Debug)]
pub struct PageError {
    /// HTTP status.
    pub status: StatusCode,
    /// Short headline.
    pub title: String,
    /// What happened.
    pub message: String,
    /// What to do next: link text and target.
    pub action: Option<(String, String)>,
}

impl PageError {
    /// A page with a status, headline and explanation.
    pub fn new(status: StatusCode, title: impl Into<String>, message: impl Into<String>) -> Self {
        Self { status, title: title.into(), message: message.into(), action: None }
    }
    /// Adds the link that lets the user go on.
    pub fn with_action(mut self, label: impl Into<String>, href: impl Into<String>) -> Self {
        self.action = Some((label.into(), href.into()));
        self
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let page = views::ErrorPage {
            title: &self.title,
            message: &self.message,
            action: self.action.as_ref().map(|(l, h)| (l.as_str(), h.as_str())),
            status: self.status.as_u16(),
        };
        crate::no_store((self.status, Html(views::render(&page))).into_response())
    }
}

impl From<StoreError> for PageError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "database failure");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Service temporarily unavailable",
            "tokenhub cannot reach its token store right now. Please try again in a minute.",
        )
    }
}

impl From<VaultError> for PageError {
    fn from(e: VaultError) -> Self {
        match e {
            VaultError::Store(e) => e.into(),
            e @ VaultError::Crypto { .. } => {
                tracing::error!(error = %e, "vault entry does not decrypt: check TOKENHUB_CRYPT_KEY");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Stored tokens cannot be read",
                    "tokenhub's encryption keys do not match its stored tokens. Please tell the operators of this service.",
                )
            }
        }
    }
}

impl From<UpstreamError> for PageError {
    fn from(e: UpstreamError) -> Self {
        tracing::warn!(error = %e, "upstream login failed");
        match e {
            UpstreamError::KeysUnavailable(d) => Self::new(
                StatusCode::UNAUTHORIZED,
                "Sign-in could not be verified",
                format!(
                    "tokenhub could not check the identity token against your identity provider's keys yet ({d}). Please sign in again in a moment; if it keeps happening, tell the operators."
                ),
            ),
            UpstreamError::Unreachable(_) => Self::new(
                StatusCode::BAD_GATEWAY,
                "Identity provider unreachable",
                "tokenhub could not reach your identity provider. It may be down for a moment: please try signing in again shortly.",
            ),
            UpstreamError::InvalidGrant(d) => Self::new(
                StatusCode::BAD_REQUEST,
                "Sign-in expired",
                format!(
                    "The identity provider did not accept this sign-in ({d}). Sign-in links work once and only for a short time: please sign in again."
                ),
            ),
            UpstreamError::BadIdToken(d) => Self::new(
                StatusCode::UNAUTHORIZED,
                "Sign-in could not be verified",
                format!(
                    "The identity token from your identity provider failed verification ({d}). Please sign in again; if it keeps happening, tell the operators."
                ),
            ),
            UpstreamError::Misconfigured(d) => {
                tracing::error!(reason = %d, "the identity provider refused tokenhub's client: check its client id, secret and authentication method");
                Self::new(
                    StatusCode::BAD_GATEWAY,
                    "Sign-in is misconfigured",
                    "Your identity provider refuses this service's registration there. Please tell the operators of this service.",
                )
            }
            UpstreamError::Refused(d)
            | UpstreamError::BadResponse(d)
            | UpstreamError::AnswerLost(d)
            | UpstreamError::RotatedOnly { why: d, .. } => Self::new(
                StatusCode::BAD_GATEWAY,
                "Identity provider error",
                format!(
                    "The identity provider's answer could not be used ({d}). Please try again; if it keeps happening, tell the operators."
                ),
            ),
        }
    }
}
