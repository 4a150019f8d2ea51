//! The upstream relying party: discovery, the authorization URL (PKCE S256,
//! state, nonce), the code exchange, ID-token verification (signature, iss,
//! aud, exp, nonce, at_hash) with a rate-limited JWKS re-fetch when a token
//! names an unknown key, and userinfo.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use openidconnect::core::{
    CoreClient, CoreErrorResponseType, CoreJsonWebKeySet, CoreProviderMetadata, CoreResponseType,
};
use openidconnect::{
    AccessTokenHash, AuthenticationFlow, AuthorizationCode, ClaimsVerificationError, ClientId,
    ClientSecret, CsrfToken, EndpointMaybeSet, EndpointNotSet, EndpointSet, IssuerUrl, Nonce,
    OAuth2TokenResponse, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RefreshToken, RequestTokenError,
    Scope, SignatureVerificationError, TokenResponse,
};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};
use tokio::sync::{Mutex, RwLock};

use crate::config::UpstreamConfig;
use crate::time::now;
use crate::vault::TokenSet;

type Client = CoreClient<
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// How soon after one JWKS re-fetch another may happen.
const JWKS_REFETCH_INTERVAL: Duration = Duration::from_secs(30);
/// How long a failed discovery is remembered before trying again.
const DISCOVERY_RETRY: Duration = Duration::from_secs(5);

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
    /// The IdP answered with another OAuth error.
    #[error("the identity provider returned an error: {0}")]
    Refused(String),
    /// The ID token failed verification.
    #[error("the ID token is not valid: {0}")]
    BadIdToken(String),
    /// The IdP's answer was not what the protocol requires.
    #[error("the identity provider's response is not valid: {0}")]
    BadResponse(String),
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
    refetch_lock: Mutex<()>,
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
            refetch_lock: Mutex::new(()),
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

    fn client(&self, metadata: &CoreProviderMetadata) -> Result<Client, UpstreamError> {
        let redirect = RedirectUrl::from_url(self.config.redirect_uri.clone());
        Ok(CoreClient::from_provider_metadata(
            metadata.clone(),
            ClientId::new(self.config.client_id.clone()),
            Some(ClientSecret::new(self.config.client_secret.expose_secret().to_string())),
        )
        .set_redirect_uri(redirect))
    }

    /// Builds the authorization URL for a new login.
    pub async fn authorization_request(&self) -> Result<AuthorizationRequest, UpstreamError> {
        let discovered = self.discovered().await?;
        let client = self.client(&discovered.metadata)?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut request = client
            .authorize_url(
                AuthenticationFlow::<CoreResponseType>::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .set_pkce_challenge(challenge);
        for scope in self.config.scopes.iter().filter(|s| *s != "openid") {
            request = request.add_scope(Scope::new(scope.clone()));
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
        let client = self.client(&discovered.metadata)?;
        let response = client
            .exchange_code(AuthorizationCode::new(code.to_string()))
            .map_err(|e| UpstreamError::BadResponse(e.to_string()))?
            .set_pkce_verifier(PkceCodeVerifier::new(pkce_verifier.expose_secret().to_string()))
            .request_async(&self.http)
            .await
            .map_err(token_error)?;
        let id_token = response
            .id_token()
            .ok_or_else(|| UpstreamError::BadResponse("no id_token in the token response".into()))?
            .clone();
        let nonce = Nonce::new(nonce.to_string());
        let claims = self
            .verify_with_refetch(&discovered, &id_token, Some(&nonce), response.access_token())
            .await?;

        let access_token = response.access_token().secret().clone();
        let mut all_claims = claims;
        let subject = string_claim(&all_claims, "sub")
            .ok_or_else(|| UpstreamError::BadIdToken("no sub claim".into()))?;
        let issuer = string_claim(&all_claims, "iss")
            .ok_or_else(|| UpstreamError::BadIdToken("no iss claim".into()))?;
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
        let scope = response
            .scopes()
            .map(|s| s.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| self.config.scopes.join(" "));
        Ok(UpstreamLogin {
            issuer,
            subject,
            tokens: TokenSet {
                access_token: access_token.into(),
                id_token: id_token.to_string().into(),
                refresh_token: response.refresh_token().map(|t| t.secret().clone().into()),
                access_expires_at: response.expires_in().map(|d| now() + d.as_secs() as i64),
                scope,
            },
            claims: all_claims,
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

    /// Refreshes the token set with its refresh token. Values the IdP does
    /// not send again (a refresh token without rotation, an ID token) are kept.
    pub async fn refresh(&self, current: &TokenSet, subject: &str) -> Result<TokenSet, UpstreamError> {
        let refresh_token = current
            .refresh_token
            .as_ref()
            .ok_or_else(|| UpstreamError::InvalidGrant("the lineage has no refresh token".into()))?;
        let discovered = self.discovered().await?;
        let client = self.client(&discovered.metadata)?;
        let response = client
            .exchange_refresh_token(&RefreshToken::new(refresh_token.expose_secret().to_string()))
            .map_err(|e| UpstreamError::BadResponse(e.to_string()))?
            .request_async(&self.http)
            .await
            .map_err(token_error)?;
        let id_token = match response.id_token() {
            Some(id_token) => {
                let claims = self
                    .verify_with_refetch(&discovered, id_token, None, response.access_token())
                    .await?;
                if claims.get("sub").and_then(Value::as_str) != Some(subject) {
                    return Err(UpstreamError::BadIdToken("the refreshed ID token names another subject".into()));
                }
                id_token.to_string()
            }
            None => current.id_token.expose_secret().to_string(),
        };
        Ok(TokenSet {
            access_token: response.access_token().secret().clone().into(),
            id_token: id_token.into(),
            refresh_token: Some(
                response
                    .refresh_token()
                    .map(|t| t.secret().clone().into())
                    .unwrap_or_else(|| refresh_token.clone()),
            ),
            access_expires_at: response.expires_in().map(|d| now() + d.as_secs() as i64),
            scope: response
                .scopes()
                .map(|s| s.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" "))
                .unwrap_or_else(|| current.scope.clone()),
        })
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
        let response = self
            .http
            .post(endpoint)
            .basic_auth(&self.config.client_id, Some(self.config.client_secret.expose_secret()))
            .form(&[("token", refresh_token), ("token_type_hint", "refresh_token")])
            .send()
            .await
            .map_err(|e| unreachable(e.without_url()))?;
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
        let _guard = self.refetch_lock.lock().await;
        let latest = self.discovered().await?;
        if !Arc::ptr_eq(&latest, current) {
            return Ok(latest); // someone else re-fetched while we waited
        }
        if latest.last_refetch.is_some_and(|t| t.elapsed() < JWKS_REFETCH_INTERVAL) {
            return Err(UpstreamError::BadIdToken(
                "the ID token is signed with an unknown key (key set re-fetched moments ago)".into(),
            ));
        }
        tracing::info!("ID token names an unknown key id: fetching the key set again");
        let jwks = CoreJsonWebKeySet::fetch_async(latest.metadata.jwks_uri(), &self.http)
            .await
            .map_err(unreachable)?;
        let fresh = Arc::new(Discovered {
            metadata: latest.metadata.clone().set_jwks(jwks),
            last_refetch: Some(Instant::now()),
        });
        *self.discovered.write().await = Some(fresh.clone());
        Ok(fresh)
    }

    async fn userinfo(
        &self,
        discovered: &Discovered,
        access_token: &str,
    ) -> Result<Option<Map<String, Value>>, UpstreamError> {
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
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|_| UpstreamError::BadResponse("userinfo is not a JSON object".into()))
    }
}

/// Verifies the ID token's signature and claims, then its `at_hash` against
/// the access token when the claim is present (OIDC Core 3.1.3.8).
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
        (Some(e), Some(g)) if crate::crypto::constant_time_eq(e.secret(), g.secret()) => Ok(()),
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

fn token_error<RE: std::error::Error + 'static>(
    e: RequestTokenError<RE, oauth2::StandardErrorResponse<CoreErrorResponseType>>,
) -> UpstreamError {
    match e {
        RequestTokenError::ServerResponse(err) => {
            let text = match err.error_description() {
                Some(d) => format!("{}: {d}", err.error().as_ref()),
                None => err.error().as_ref().to_string(),
            };
            if *err.error() == CoreErrorResponseType::InvalidGrant {
                UpstreamError::InvalidGrant(text)
            } else {
                UpstreamError::Refused(text)
            }
        }
        RequestTokenError::Request(e) => unreachable(e),
        RequestTokenError::Parse(e, _body) => UpstreamError::BadResponse(e.to_string()),
        RequestTokenError::Other(e) => UpstreamError::BadResponse(e),
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
