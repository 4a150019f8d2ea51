//! The upstream relying party: discovery, the authorization URL (PKCE S256,
//! state, nonce), the code exchange, ID-token verification (signature, iss,
//! aud, exp, nonce, at_hash) with a rate-limited JWKS re-fetch when a token
//! names an unknown key, and userinfo.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use openidconnect::core::{CoreClient, CoreJsonWebKeySet, CoreProviderMetadata, CoreResponseType};
use openidconnect::{
    AccessTokenHash, AuthenticationFlow, ClaimsVerificationError, ClientId, ClientSecret, CsrfToken, EndpointMaybeSet,
    EndpointNotSet, EndpointSet, IssuerUrl, Nonce, PkceCodeChallenge, RedirectUrl, Scope, SignatureVerificationError,
};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::sync::{Mutex, RwLock};

use crate::config::{ClientAuthMethod, UpstreamConfig};
use crate::time::now;
use crate::vault::TokenSet;

type Client = CoreClient<EndpointSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointMaybeSet, EndpointMaybeSet>;

/// The RFC 8693 token-exchange grant type.
const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// How soon after one JWKS re-fetch another may happen.
const JWKS_REFETCH_INTERVAL: Duration = Duration::from_secs(30);
/// How long a failed discovery is remembered before trying again.
const DISCOVERY_RETRY: Duration = Duration::from_secs(5);
/// How long a failed key-set fetch is remembered before trying again (or
/// the key set's `Retry-After`, up to the setting's bound): while the key
/// set fails, callers learn "not yet" at once instead of each fetching it
/// (and each waiting out a key set that hangs).
const JWKS_RETRY: Duration = Duration::from_secs(5);
/// The longest a key-set fetch may take: it runs while callers wait.
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);

/// Why talking to the upstream IdP failed. Texts never hold token values.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Discovery, JWKS or the token endpoint could not be reached or answered
    /// with a server error.
    #[error("the identity provider could not be reached: {0}")]
    Unreachable(String),
    /// The IdP refused the code or refresh token (`invalid_grant`).
    #[error("the identity provider rejected the grant: {0}")]
    InvalidGrant(String),
    /// The IdP answered with another OAuth error (`invalid_request`,
    /// `invalid_scope`, ...): it refuses this request.
    #[error("the identity provider returned an error: {0}")]
    Refused(String),
    /// The FABRIC Credential Manager refreshed at the IdP but failed after
    /// (it could not make its FABRIC token); its error carried the new
    /// refresh token, which must be kept: the old one is spent.
    #[error("the Credential Manager refreshed, then failed: {why}")]
    RotatedOnly {
        /// The new refresh token.
        refresh_token: SecretString,
        /// The CM's error, without the token.
        why: String,
    },
    /// The IdP refused tokenhub's own client (`invalid_client`,
    /// `unauthorized_client`): a configuration error for the operators.
    #[error("the identity provider refused tokenhub's client: {0}")]
    Misconfigured(String),
    /// The ID token failed verification.
    #[error("the ID token is not valid: {0}")]
    BadIdToken(String),
    /// The IdP's answer was not what the protocol requires.
    #[error("the identity provider's response is not valid: {0}")]
    BadResponse(String),
    /// The token endpoint answered 2xx but its answer could not be read or
    /// used: the grant it was sent may be spent, so it is not sent again at
    /// once (the next refresh may try it).
    #[error("the identity provider's answer was lost: {0}")]
    AnswerLost(String),
    /// The ID token cannot be verified yet: its key set is unreachable, or
    /// names a key the key set, fetched moments ago, does not hold yet.
    #[error("the ID token cannot be verified yet: {0}")]
    KeysUnavailable(String),
}

/// A token endpoint's answer as received: nothing in it verified yet.
/// (No `Debug`: it holds token values.)
pub struct TokenReply {
    /// The access token.
    pub access_token: SecretString,
    /// A new refresh token, when the IdP sent one (it rotates).
    pub refresh_token: Option<SecretString>,
    /// An ID token, when the IdP sent one.
    pub id_token: Option<SecretString>,
    /// Access-token lifetime in seconds.
    pub expires_in: Option<i64>,
    /// Granted scopes, when the IdP said.
    pub scope: Option<String>,
    /// Seconds the refresh token lives unused, when the IdP said
    /// (`refresh_expires_in`, e.g. Keycloak): keep-alive goes by it.
    pub refresh_expires_in: Option<i64>,
    /// The FABRIC Credential Manager's answer, when the refresh went
    /// through it.
    pub fabric: Option<crate::vault::fabric::FabricToken>,
}

impl TokenReply {
    /// A Credential Manager's refresh as a token answer: its FABRIC JWT as
    /// the access token (valid until its `exp`), the new refresh token.
    pub fn from_cm(token: crate::vault::fabric::FabricToken) -> TokenReply {
        TokenReply {
            access_token: token.field("id_token").unwrap_or_default().into(),
            refresh_token: token.field("refresh_token").map(SecretString::from),
            id_token: None,
            expires_in: Some(token.expires_at - crate::time::now()),
            scope: None,
            refresh_expires_in: None,
            fabric: Some(token),
        }
    }
}

/// The token endpoint's JSON, leniently read: `expires_in` as number or
/// string, an ID token kept as text so a malformed one cannot cost us the
/// refresh token beside it.
#[derive(Deserialize)]
struct RawTokenReply {
    access_token: String,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    id_token: Option<String>,
    #[serde(default)]
    expires_in: Option<Value>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    refresh_expires_in: Option<Value>,
}

/// An OAuth error answer (RFC 6749 §5.2).
#[derive(Deserialize)]
struct OAuthErrorReply {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// What a login needs to remember between the redirect and the callback.
#[derive(Debug)]
pub struct AuthorizationRequest {
    /// Where to send the browser.
    pub url: url::Url,
    /// The `state` sent.
    pub state: String,
    /// The `nonce` sent.
    pub nonce: String,
    /// The PKCE verifier.
    pub pkce_verifier: SecretString,
}

/// The verified result of a login at the IdP.
#[derive(Debug)]
pub struct UpstreamLogin {
    /// Issuer of the ID token.
    pub issuer: String,
    /// Subject of the ID token.
    pub subject: String,
    /// The tokens.
    pub tokens: TokenSet,
    /// ID-token claims with userinfo merged over them.
    pub claims: Map<String, Value>,
    /// Seconds the refresh token lives unused, when the IdP said.
    pub refresh_expires_in: Option<i64>,
}

struct Discovered {
    metadata: CoreProviderMetadata,
    last_refetch: Option<Instant>,
}

/// The upstream provider, discovered on first use and cached.
pub struct Upstream {
    config: UpstreamConfig,
    http: reqwest::Client,
    discovered: RwLock<Option<Arc<Discovered>>>,
    last_failure: Mutex<Option<Instant>>,
    /// Held while the key set is fetched again; holds when the next fetch
    /// may be tried after a failed one.
    refetch_lock: Mutex<Option<Instant>>,
    /// The earliest next refresh at the token endpoint, when the IdP asked
    /// to wait (`Retry-After` with a 5xx or 429).
    token_not_before: std::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").field("issuer", &self.config.issuer).finish()
    }
}

fn unreachable(e: impl std::fmt::Display) -> UpstreamError {
    UpstreamError::Unreachable(e.to_string())
}

impl Upstream {
    /// A relying party for `config`, using `http` (which must not follow redirects).
    pub fn new(config: UpstreamConfig, http: reqwest::Client) -> Self {
        Self {
            config,
            http,
            discovered: RwLock::new(None),
            last_failure: Mutex::new(None),
            refetch_lock: Mutex::new(None),
            token_not_before: std::sync::Mutex::new(None),
        }
    }

    /// The configured issuer.
    pub fn issuer(&self) -> &str {
        &self.config.issuer
    }

    /// The settings this party was made with.
    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    async fn discovered(&self) -> Result<Arc<Discovered>, UpstreamError> {
        if let Some(d) = self.discovered.read().await.clone() {
            return Ok(d);
        }
        let mut failure = self.last_failure.lock().await;
        if let Some(d) = self.discovered.read().await.clone() {
            return Ok(d);
        }
        if failure.is_some_and(|t| t.elapsed() < DISCOVERY_RETRY) {
            return Err(UpstreamError::Unreachable("discovery failed moments ago".into()));
        }
        let issuer = IssuerUrl::new(self.config.issuer.clone()).map_err(unreachable)?;
        match CoreProviderMetadata::discover_async(issuer, &self.http).await {
            Ok(metadata) => {
                let d = Arc::new(Discovered { metadata, last_refetch: None });
                *self.discovered.write().await = Some(d.clone());
                *failure = None;
                Ok(d)
            }
            Err(e) => {
                *failure = Some(Instant::now());
                tracing::warn!(error = %e, issuer = %self.config.issuer, "OpenID discovery failed");
                Err(unreachable(e))
            }
        }
    }

    /// Tries discovery now (at start-up), so the first login does not wait.
    pub async fn warm_up(&self) {
        let _ = self.discovered().await;
    }

    /// The client authentication in use: the setting, else the first of
    /// Basic and post the discovery document offers (Basic when it says nothing,
    /// as RFC 8414 defaults).
    fn client_auth(&self, metadata: &CoreProviderMetadata) -> ClientAuthMethod {
        if let Some(method) = self.config.client_auth {
            return method;
        }
        let offered: Vec<String> = metadata
            .token_endpoint_auth_methods_supported()
            .map(|methods| methods.iter().map(|m| m.as_ref().to_string()).collect())
            .unwrap_or_default();
        if offered.is_empty() || offered.iter().any(|m| m == "client_secret_basic") {
            ClientAuthMethod::ClientSecretBasic
        } else if offered.iter().any(|m| m == "client_secret_post") {
            ClientAuthMethod::ClientSecretPost
        } else {
            ClientAuthMethod::ClientSecretBasic
        }
    }

    /// A POST to one of the IdP's endpoints, authenticated as our client.
    fn client_post(
        &self,
        metadata: &CoreProviderMetadata,
        url: &str,
        mut form: Vec<(&'static str, String)>,
    ) -> reqwest::RequestBuilder {
        let mut request = self.http.post(url).header("accept", "application/json");
        match self.client_auth(metadata) {
            ClientAuthMethod::ClientSecretBasic => {
                request = request.header(
                    "authorization",
                    basic_authorization(&self.config.client_id, self.config.client_secret.expose_secret()),
                );
            }
            ClientAuthMethod::ClientSecretPost => {
                form.push(("client_id", self.config.client_id.clone()));
                form.push(("client_secret", self.config.client_secret.expose_secret().to_string()));
            }
        }
        request.form(&form)
    }

    /// One request to the token endpoint. Errors before a 2xx are
    /// `Unreachable` (worth retrying), `InvalidGrant` or `Refused`; a 2xx
    /// whose body cannot be read or used is `AnswerLost`, never retried here.
    async fn token_call(&self, discovered: &Discovered, form: Vec<(&'static str, String)>) -> Result<TokenReply, UpstreamError> {
        let endpoint = discovered
            .metadata
            .token_endpoint()
            .ok_or_else(|| UpstreamError::BadResponse("the discovery document names no token endpoint".into()))?;
        let response = self
            .client_post(&discovered.metadata, endpoint.url().as_str(), form)
            .send()
            .await
            .map_err(|e| unreachable(e.without_url()))?;
        let status = response.status();
        if !status.is_success() {
            let wait = retry_after(response.headers());
            let body = response.bytes().await.unwrap_or_default();
            let error: Option<OAuthErrorReply> = serde_json::from_slice(&body).ok();
            return Err(classify(status, error.as_ref(), wait, |wait| self.asked_to_wait(wait)));
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| UpstreamError::AnswerLost(format!("reading its {status} answer failed: {}", e.without_url())))?;
        let raw: RawTokenReply = serde_json::from_slice(&body)
            .map_err(|_| UpstreamError::AnswerLost(format!("its {status} answer is not a token response")))?;
        let seconds = |v: Option<Value>| match v {
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        };
        let expires_in = seconds(raw.expires_in);
        // 0 means "no idle limit" at Keycloak (offline tokens): nothing to keep alive for.
        let refresh_expires_in = seconds(raw.refresh_expires_in).filter(|s| *s > 0);
        Ok(TokenReply {
            access_token: raw.access_token.into(),
            refresh_token: raw.refresh_token.filter(|t| !t.is_empty()).map(SecretString::from),
            id_token: raw.id_token.filter(|t| !t.is_empty()).map(SecretString::from),
            expires_in,
            scope: raw.scope,
            refresh_expires_in,
            fabric: None,
        })
    }

    fn client(&self, metadata: &CoreProviderMetadata) -> Result<Client, UpstreamError> {
        let redirect = RedirectUrl::from_url(self.config.redirect_uri.clone());
        Ok(CoreClient::from_provider_metadata(
            metadata.clone(),
            ClientId::new(self.config.client_id.clone()),
            Some(ClientSecret::new(self.config.client_secret.expose_secret().to_string())),
        )
        .set_redirect_uri(redirect))
    }

    /// Builds the authorization URL for a new login. `ask_consent` adds
    /// `prompt=consent` (unless the operator's parameters set a `prompt`):
    /// strict providers grant `offline_access` only with it (OIDC Core §11).
    pub async fn authorization_request(&self, ask_consent: bool) -> Result<AuthorizationRequest, UpstreamError> {
        let discovered = self.discovered().await?;
        let client = self.client(&discovered.metadata)?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut request = client
            .authorize_url(AuthenticationFlow::<CoreResponseType>::AuthorizationCode, CsrfToken::new_random, Nonce::new_random)
            .set_pkce_challenge(challenge);
        for scope in self.config.scopes.iter().filter(|s| *s != "openid") {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        for (name, value) in &self.config.auth_params {
            request = request.add_extra_param(name.clone(), value.clone());
        }
        if ask_consent && !self.config.auth_params.iter().any(|(name, _)| name == "prompt") {
            request = request.add_extra_param("prompt", "consent");
        }
        let (url, state, nonce) = request.url();
        Ok(AuthorizationRequest {
            url,
            state: state.secret().clone(),
            nonce: nonce.secret().clone(),
            pkce_verifier: verifier.into_secret().into(),
        })
    }

    /// Exchanges the code from the callback and verifies everything that came back.
    pub async fn finish_login(
        &self,
        code: &str,
        pkce_verifier: &SecretString,
        nonce: &str,
    ) -> Result<UpstreamLogin, UpstreamError> {
        let discovered = self.discovered().await?;
        let reply = self
            .token_call(
                &discovered,
                vec![
                    ("grant_type", "authorization_code".into()),
                    ("code", code.to_string()),
                    ("redirect_uri", self.config.redirect_uri.to_string()),
                    ("code_verifier", pkce_verifier.expose_secret().to_string()),
                ],
            )
            .await?;
        let id_token_text =
            reply.id_token.as_ref().ok_or_else(|| UpstreamError::BadResponse("no id_token in the token response".into()))?;
        let id_token = parse_id_token(id_token_text.expose_secret())?;
        let nonce = Nonce::new(nonce.to_string());
        let access = openidconnect::AccessToken::new(reply.access_token.expose_secret().to_string());
        let claims = self.verify_with_refetch(&discovered, &id_token, Some(&nonce), &access).await?;

        let access_token = reply.access_token.expose_secret().to_string();
        let mut all_claims = claims;
        let subject = string_claim(&all_claims, "sub").ok_or_else(|| UpstreamError::BadIdToken("no sub claim".into()))?;
        let issuer = string_claim(&all_claims, "iss").ok_or_else(|| UpstreamError::BadIdToken("no iss claim".into()))?;
        if let Some(userinfo) = self.userinfo(&discovered, &access_token).await? {
            if userinfo.get("sub").and_then(Value::as_str) != Some(subject.as_str()) {
                return Err(UpstreamError::BadResponse("userinfo sub differs from the ID token's".into()));
            }
            for (k, v) in userinfo {
                if !matches!(k.as_str(), "iss" | "aud" | "exp" | "iat" | "nonce" | "sub") {
                    all_claims.insert(k, v);
                }
            }
        }
        normalize_booleans(&mut all_claims);
        let scope = reply.scope.clone().unwrap_or_else(|| self.config.scopes.join(" "));
        Ok(UpstreamLogin {
            issuer,
            subject,
            tokens: TokenSet {
                access_token: access_token.into(),
                id_token: id_token_text.clone(),
                refresh_token: reply.refresh_token,
                access_expires_at: reply.expires_in.map(|d| now() + d),
                scope,
                fabric: None,
            },
            claims: all_claims,
            refresh_expires_in: reply.refresh_expires_in,
        })
    }

    /// Verifies an ID token, fetching the key set again (rate-limited) when
    /// it names a key we do not have; returns its claims as JSON. `nonce` is
    /// `None` for ID tokens from a refresh, which carry none to check.
    async fn verify_with_refetch(
        &self,
        discovered: &Arc<Discovered>,
        id_token: &openidconnect::core::CoreIdToken,
        nonce: Option<&Nonce>,
        access_token: &openidconnect::AccessToken,
    ) -> Result<Map<String, Value>, UpstreamError> {
        let client = self.client(&discovered.metadata)?;
        match self.verify(&client, id_token, nonce, access_token) {
            Err(UpstreamError::BadIdToken(_)) if names_unknown_key(&client, id_token, nonce) => {
                let refreshed = self.refetch_jwks(discovered).await?;
                let client = self.client(&refreshed.metadata)?;
                self.verify(&client, id_token, nonce, access_token)
            }
            other => other,
        }
    }

    /// One refresh at the token endpoint, nothing verified: see
    /// [`Upstream::token_call`] for what its errors mean. The caller stores
    /// the answer before anything else can fail, then verifies the ID token
    /// with [`Upstream::check_refreshed_id_token`].
    pub async fn refresh_grant(&self, refresh_token: &SecretString) -> Result<TokenReply, UpstreamError> {
        self.narrow_refresh_grant(refresh_token, &[], None).await
    }

    /// A refresh grant asking for a narrower token: fewer `scopes` and/or
    /// an `audience` (sent as the parameter `audience_param` names). The
    /// refresh token rotates as on any refresh; see [`Upstream::token_call`]
    /// for what its errors mean.
    pub async fn narrow_refresh_grant(
        &self,
        refresh_token: &SecretString,
        scopes: &[String],
        audience: Option<(&'static str, &str)>,
    ) -> Result<TokenReply, UpstreamError> {
        if let Some(wait) = self.wait_asked() {
            return Err(UpstreamError::Unreachable(format!(
                "the identity provider asked to wait {} s more before the next refresh",
                wait.as_secs_f64().ceil()
            )));
        }
        let discovered = self.discovered().await?;
        let form = vec![("grant_type", "refresh_token".into()), ("refresh_token", refresh_token.expose_secret().to_string())];
        self.token_call(&discovered, narrowed(form, scopes, audience)).await
    }

    /// An RFC 8693 token exchange of the lineage's `access_token` for one
    /// with `scopes` and/or for `audience`.
    pub async fn exchange_grant(
        &self,
        access_token: &SecretString,
        scopes: &[String],
        audience: Option<(&'static str, &str)>,
    ) -> Result<TokenReply, UpstreamError> {
        let discovered = self.discovered().await?;
        let form = vec![
            ("grant_type", TOKEN_EXCHANGE.into()),
            ("subject_token", access_token.expose_secret().to_string()),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:access_token".into()),
            ("requested_token_type", "urn:ietf:params:oauth:token-type:access_token".into()),
        ];
        self.token_call(&discovered, narrowed(form, scopes, audience)).await
    }

    /// Whether the discovery document lists the RFC 8693 token-exchange grant.
    pub async fn offers_token_exchange(&self) -> Result<bool, UpstreamError> {
        let discovered = self.discovered().await?;
        Ok(discovered.metadata.grant_types_supported().is_some_and(|g| g.iter().any(|g| g.as_ref() == TOKEN_EXCHANGE)))
    }

    /// How long the IdP asked to wait before the next refresh (its
    /// `Retry-After`, bounded by `TOKENHUB_OIDC_MAX_RETRY_AFTER`), if that
    /// time is not over: refreshes are not sent meanwhile, and callers are
    /// told to come back then.
    pub fn wait_asked(&self) -> Option<Duration> {
        let not_before = (*self.token_not_before.lock().unwrap_or_else(|p| p.into_inner()))?;
        not_before.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
    }

    fn asked_to_wait(&self, wait: Duration) {
        let until = Instant::now() + wait.min(self.config.max_retry_after);
        let mut not_before = self.token_not_before.lock().unwrap_or_else(|p| p.into_inner());
        if not_before.is_none_or(|current| current < until) {
            *not_before = Some(until);
        }
    }

    /// Verifies an ID token that came with a refresh (OIDC Core §12.2):
    /// signature, issuer, audience, expiry, `at_hash` against the access
    /// token that came with it, the same subject as the lineage's, and the
    /// login's nonce when it carries one. `KeysUnavailable` means "not yet";
    /// any other error means the token is not valid.
    ///
    /// The signature is checked although OIDC Core §3.1.3.7 would let a
    /// client trust TLS for ID tokens from the token endpoint: tokenhub hands
    /// the ID token on (token file, API) to services that check it against
    /// the IdP's published keys, so one tokenhub has not matched to those
    /// keys is not worth handing on.
    pub async fn check_refreshed_id_token(
        &self,
        id_token: &SecretString,
        access_token: &SecretString,
        subject: &str,
        login_nonce: Option<&str>,
    ) -> Result<(), UpstreamError> {
        let discovered = self.discovered().await?;
        let id_token = parse_id_token(id_token.expose_secret())?;
        let access = openidconnect::AccessToken::new(access_token.expose_secret().to_string());
        let claims = self.verify_with_refetch(&discovered, &id_token, None, &access).await?;
        if claims.get("sub").and_then(Value::as_str) != Some(subject) {
            return Err(UpstreamError::BadIdToken("the refreshed ID token names another subject".into()));
        }
        if let (Some(got), Some(expected)) = (claims.get("nonce"), login_nonce)
            && !got.as_str().is_some_and(|got| crate::vault::crypto::constant_time_eq(got, expected))
        {
            return Err(UpstreamError::BadIdToken("the refreshed ID token carries another nonce than the login's".into()));
        }
        Ok(())
    }

    /// Revokes a refresh token at the IdP (RFC 7009). `Ok(false)` when the
    /// IdP advertises no revocation endpoint.
    pub async fn revoke(&self, refresh_token: &str) -> Result<bool, UpstreamError> {
        // The typed metadata drops `revocation_endpoint`: read the document itself.
        let discovery = format!("{}/.well-known/openid-configuration", self.config.issuer.trim_end_matches('/'));
        let document: Value = self
            .http
            .get(discovery)
            .send()
            .await
            .map_err(|e| unreachable(e.without_url()))?
            .json()
            .await
            .map_err(|e| UpstreamError::BadResponse(e.without_url().to_string()))?;
        let Some(endpoint) = document.get("revocation_endpoint").and_then(Value::as_str) else {
            return Ok(false);
        };
        let discovered = self.discovered().await?;
        let form = vec![("token", refresh_token.to_string()), ("token_type_hint", "refresh_token".to_string())];
        let response =
            self.client_post(&discovered.metadata, endpoint, form).send().await.map_err(|e| unreachable(e.without_url()))?;
        if response.status().is_success() {
            Ok(true)
        } else {
            Err(UpstreamError::Refused(format!("revocation answered {}", response.status())))
        }
    }

    /// Verifies the ID token (and its `at_hash`) with the keys we have and
    /// returns its claims as JSON.
    fn verify(
        &self,
        client: &Client,
        id_token: &openidconnect::core::CoreIdToken,
        nonce: Option<&Nonce>,
        access_token: &openidconnect::AccessToken,
    ) -> Result<Map<String, Value>, UpstreamError> {
        check_at_hash(client, id_token, nonce, access_token)?;
        // The signature is verified: now read every claim, standard or not,
        // from the payload (the username and groups claims are configurable).
        jwt_claims(&id_token.to_string())
    }

    async fn refetch_jwks(&self, current: &Arc<Discovered>) -> Result<Arc<Discovered>, UpstreamError> {
        let mut not_before = self.refetch_lock.lock().await;
        let latest = self.discovered().await?;
        if !Arc::ptr_eq(&latest, current) {
            return Ok(latest); // someone else re-fetched while we waited
        }
        if latest.last_refetch.is_some_and(|t| t.elapsed() < JWKS_REFETCH_INTERVAL) {
            return Err(UpstreamError::KeysUnavailable(
                "the ID token is signed with a key the key set, fetched moments ago, does not hold".into(),
            ));
        }
        if not_before.is_some_and(|t| Instant::now() < t) {
            return Err(UpstreamError::KeysUnavailable("the key set failed moments ago".into()));
        }
        tracing::info!("ID token names an unknown key id: fetching the key set again");
        let fetched = tokio::time::timeout(JWKS_TIMEOUT, self.fetch_jwks(latest.metadata.jwks_uri().url().clone()))
            .await
            .unwrap_or_else(|_| Err((format!("no answer in {} s", JWKS_TIMEOUT.as_secs()), None)));
        let jwks = match fetched {
            Ok(jwks) => jwks,
            Err((e, wait)) => {
                let wait = wait.unwrap_or(JWKS_RETRY).clamp(JWKS_RETRY, self.config.max_retry_after.max(JWKS_RETRY));
                *not_before = Some(Instant::now() + wait);
                tracing::warn!(error = %e, retry_in_secs = wait.as_secs(), "the key set could not be fetched");
                return Err(UpstreamError::KeysUnavailable(format!("the key set could not be fetched: {e}")));
            }
        };
        *not_before = None;
        let fresh = Arc::new(Discovered { metadata: latest.metadata.clone().set_jwks(jwks), last_refetch: Some(Instant::now()) });
        *self.discovered.write().await = Some(fresh.clone());
        Ok(fresh)
    }

    /// The key set, read as it is served; an error says why, with the wait
    /// its `Retry-After` asked for.
    async fn fetch_jwks(&self, url: url::Url) -> Result<CoreJsonWebKeySet, (String, Option<Duration>)> {
        let response = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| (e.without_url().to_string(), None))?;
        let status = response.status();
        if !status.is_success() {
            return Err((format!("the key set answered {status}"), retry_after(response.headers())));
        }
        let body = response.bytes().await.map_err(|e| (e.without_url().to_string(), None))?;
        serde_json::from_slice(&body).map_err(|e| (format!("the key set is not a JSON Web Key Set: {e}"), None))
    }

    async fn userinfo(&self, discovered: &Discovered, access_token: &str) -> Result<Option<Map<String, Value>>, UpstreamError> {
        let Some(endpoint) = discovered.metadata.userinfo_endpoint() else {
            return Ok(None);
        };
        let response = self
            .http
            .get(endpoint.url().clone())
            .bearer_auth(access_token)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| unreachable(e.without_url()))?;
        if !response.status().is_success() {
            return Err(UpstreamError::BadResponse(format!("userinfo answered {}", response.status())));
        }
        let is_json = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if !is_json {
            return Ok(None); // a signed or encrypted userinfo JWT: the ID token's claims suffice
        }
        let body = response.bytes().await.map_err(|e| unreachable(e.without_url()))?;
        serde_json::from_slice(&body).map(Some).map_err(|_| UpstreamError::BadResponse("userinfo is not a JSON object".into()))
    }
}

/// Verifies the ID token's signature and claims, then its `at_hash` against
/// the access token when the claim is present (OIDC Core 3.1.3.8).
/// A token request's form with the narrowing asked for: `scope`, and the
/// audience under its parameter's name.
fn narrowed(
    mut form: Vec<(&'static str, String)>,
    scopes: &[String],
    audience: Option<(&'static str, &str)>,
) -> Vec<(&'static str, String)> {
    if !scopes.is_empty() {
        form.push(("scope", scopes.join(" ")));
    }
    if let Some((param, audience)) = audience {
        form.push((param, audience.to_string()));
    }
    form
}

/// What a token endpoint's error answer means (RFC 6749 §5.2): the IdP is
/// down or asks to wait (5xx, 429, `temporarily_unavailable`: `wait` is its
/// `Retry-After`, handed to `asked_to_wait`), refuses the grant
/// (`invalid_grant`) or the request (any other OAuth error), or refuses
/// tokenhub's client (`invalid_client`, `unauthorized_client`). A 4xx that
/// is no OAuth error says nothing about the grant: a broken answer.
fn classify(
    status: reqwest::StatusCode,
    error: Option<&OAuthErrorReply>,
    wait: Option<Duration>,
    asked_to_wait: impl FnOnce(Duration),
) -> UpstreamError {
    let code = error.map(|e| e.error.as_str());
    if status.is_server_error() || status.as_u16() == 429 || code == Some("temporarily_unavailable") {
        if let Some(wait) = wait {
            asked_to_wait(wait);
        }
        let detail = error.map(describe_oauth_error).map(|d| format!(": {d}")).unwrap_or_default();
        return UpstreamError::Unreachable(format!("the token endpoint answered {status}{detail}"));
    }
    match (code, error) {
        (Some("invalid_grant"), Some(e)) => UpstreamError::InvalidGrant(describe_oauth_error(e)),
        (Some("invalid_client" | "unauthorized_client"), Some(e)) => UpstreamError::Misconfigured(describe_oauth_error(e)),
        (Some(_), Some(e)) => UpstreamError::Refused(describe_oauth_error(e)),
        _ => UpstreamError::BadResponse(format!("the token endpoint answered {status} without an OAuth error")),
    }
}

/// A `Retry-After` header (RFC 9110 §10.2.3: seconds, or an HTTP date) as a
/// wait from now.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(std::time::SystemTime::now()).unwrap_or_default())
}

fn check_at_hash(
    client: &Client,
    id_token: &openidconnect::core::CoreIdToken,
    nonce: Option<&Nonce>,
    access_token: &openidconnect::AccessToken,
) -> Result<(), UpstreamError> {
    let bad = |e: &dyn std::fmt::Display| UpstreamError::BadIdToken(e.to_string());
    let verifier = client.id_token_verifier();
    let claims = id_token.claims(&verifier, nonce_check(nonce)).map_err(|e| bad(&e))?;
    let Some(expected) = claims.access_token_hash() else {
        return Ok(());
    };
    let alg = id_token.signing_alg().map_err(|e| bad(&e))?;
    let key = id_token.signing_key(&verifier).map_err(|e| bad(&e))?;
    let actual = AccessTokenHash::from_token(access_token, alg, key).map_err(|e| bad(&e))?;
    if actual != *expected {
        return Err(UpstreamError::BadIdToken("at_hash does not match the access token".into()));
    }
    Ok(())
}

/// The nonce check: the expected nonce must match; without one (refresh)
/// any or none is accepted.
fn nonce_check(expected: Option<&Nonce>) -> impl FnOnce(Option<&Nonce>) -> Result<(), String> + '_ {
    move |got: Option<&Nonce>| match (expected, got) {
        (None, _) => Ok(()),
        (Some(e), Some(g)) if crate::vault::crypto::constant_time_eq(e.secret(), g.secret()) => Ok(()),
        _ => Err("nonce mismatch".into()),
    }
}

/// Whether verification failed only because no key matched the token's `kid`.
fn names_unknown_key(client: &Client, id_token: &openidconnect::core::CoreIdToken, nonce: Option<&Nonce>) -> bool {
    matches!(
        id_token.claims(&client.id_token_verifier(), nonce_check(nonce)),
        Err(ClaimsVerificationError::SignatureVerification(SignatureVerificationError::NoMatchingKey))
    )
}

/// `Basic base64(urlencode(id):urlencode(secret))`, the form-encoding
/// RFC 6749 §2.3.1 asks for (so `+`, `/`, `=`, `:` in a secret survive).
pub fn basic_authorization(client_id: &str, secret: &str) -> String {
    let encode = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", encode(client_id), encode(secret))))
}

fn describe_oauth_error(e: &OAuthErrorReply) -> String {
    // The description is the IdP's text: keep it short and printable.
    match &e.error_description {
        Some(d) => format!("{}: {}", e.error, d.chars().filter(|c| !c.is_control()).take(200).collect::<String>()),
        None => e.error.clone(),
    }
}

fn parse_id_token(text: &str) -> Result<openidconnect::core::CoreIdToken, UpstreamError> {
    text.parse().map_err(|_| UpstreamError::BadIdToken("the id_token is not a well-formed JWT".into()))
}

/// `"true"`/`"false"` as booleans in the claims that are booleans by the
/// spec (Cognito sends them as strings in userinfo, Apple in ID tokens), so
/// the hub sees `true`, not `"true"`.
pub fn normalize_booleans(claims: &mut Map<String, Value>) {
    for name in ["email_verified", "phone_number_verified"] {
        if let Some(Value::String(s)) = claims.get(name) {
            match s.as_str() {
                "true" => claims.insert(name.into(), Value::Bool(true)),
                "false" => claims.insert(name.into(), Value::Bool(false)),
                _ => None,
            };
        }
    }
}

fn string_claim(claims: &Map<String, Value>, name: &str) -> Option<String> {
    claims.get(name).and_then(Value::as_str).map(str::to_string)
}

/// The payload of a JWT as a JSON object. Only for tokens already verified.
pub fn jwt_claims(jwt: &str) -> Result<Map<String, Value>, UpstreamError> {
    let payload = jwt
        .split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
        .ok_or_else(|| UpstreamError::BadIdToken("not a JWS".into()))?;
    serde_json::from_slice(&payload).map_err(|_| UpstreamError::BadIdToken("payload is not JSON".into()))
}
