//! The JSON API as an OpenAPI 3 document, generated from the types below
//! with `utoipa` and served at `/api/v1/openapi.json`. The handlers build
//! their answers with `serde_json`, so the schemas here are what they send;
//! `tests/integration/security.rs` checks the document's shape, and the
//! end-to-end suite runs schemathesis against a running tokenhub, which
//! checks real answers against the schemas.
//!
//! The functions annotated with `#[utoipa::path]` are descriptions only
//! (the routes live in `lib.rs`), so handlers stay free of documentation
//! attributes.

#![allow(dead_code)]

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::server::Server;
use utoipa::{Modify, OpenApi, ToSchema};

use crate::state::AppState;

/// Every JSON error: an OAuth error code and a readable description.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// `invalid_request`, `invalid_token`, `insufficient_scope`, `invalid_grant`,
    /// `invalid_client`, `too_many_requests`, `temporarily_unavailable`, …
    pub error: String,
    /// What went wrong, for a person.
    pub error_description: String,
    /// Where the user renews the login (with `invalid_grant`).
    pub reauth_url: Option<String>,
}

/// The caller's tokens (`GET /api/v1/tokens`, `POST /api/v1/tokens/refresh`).
#[derive(Serialize, Deserialize, ToSchema)]
pub struct TokensResponse {
    /// Whether an upstream refresh happened for this call.
    pub refreshed: bool,
    /// The `min_valid` honoured, when the one asked exceeds 90% of the lifetime the IdP issues.
    pub min_valid_capped_to: Option<i64>,
    /// JupyterHub user name.
    pub user: String,
    /// Upstream issuer.
    pub issuer: String,
    /// Upstream subject.
    pub subject: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Upstream access token.
    pub access_token: String,
    /// Upstream ID token.
    pub id_token: String,
    /// Upstream refresh token.
    pub refresh_token: Option<String>,
    /// Access token expiry, unix seconds.
    pub expires_at: Option<i64>,
    /// Seconds the access token stays valid.
    pub expires_in: Option<i64>,
    /// Granted scopes, space-separated.
    pub scope: String,
    /// Lineage version.
    pub version: i64,
    /// Last upstream refresh, unix seconds.
    pub refreshed_at: Option<i64>,
    /// Where the user renews the login.
    pub reauth_url: String,
}

/// The FABRIC token document (`?format=fabric`), as in `~/.tokens.json`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct FabricDocument {
    /// Upstream ID token.
    pub id_token: String,
    /// Upstream refresh token.
    pub refresh_token: Option<String>,
    /// Upstream access token.
    pub access_token: String,
    /// `%Y-%m-%d %H:%M:%S %z`.
    pub created_at: String,
    /// `%Y-%m-%d %H:%M:%S %z`.
    pub expires_at: String,
    /// `Valid` or `Refreshed`.
    pub state: String,
    /// SHA-256 of the ID token.
    pub token_hash: String,
    /// Free text.
    pub comment: String,
    /// `tokenhub`.
    pub created_from: String,
}

/// `GET /api/v1/tokens` answers one of these, by `format`.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum TokensAnswer {
    /// `format=json` (default).
    Tokens(TokensResponse),
    /// `format=fabric`.
    Fabric(FabricDocument),
    /// With `scope` or `audience`: a narrower token.
    Narrow(NarrowAnswer),
}

/// A narrower token (`GET /api/v1/tokens?scope=…&audience=…`): an access
/// token alone, never a refresh token.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)] // so the lineage's own answer never reads as one
pub struct NarrowAnswer {
    /// The access token.
    pub access_token: String,
    /// `Bearer`.
    pub token_type: String,
    /// When it expires (unix seconds), if the IdP said.
    pub expires_at: Option<i64>,
    /// Seconds it stays valid, if the IdP said.
    pub expires_in: Option<i64>,
    /// Its scopes, space-separated.
    pub scope: String,
    /// The audience asked for, if any.
    pub audience: Option<String>,
    /// The IdP that issued it.
    pub issuer: String,
}

/// Body of `POST /api/v1/tokens/refresh` (optional; JSON or form).
#[derive(Serialize, Deserialize, ToSchema)]
pub struct RefreshBody {
    /// The refresh token the caller holds.
    pub refresh_token: Option<String>,
}

/// Body of `POST /api/v1/hub/spawn`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct SpawnBody {
    /// The user whose server is spawning.
    pub user: String,
    /// The server's name (`""` for the default server).
    pub server: Option<String>,
    /// The server's own hub API token: tokenhub writes the token file with
    /// it (and with nothing else). Without it the server gets no file.
    pub server_token: Option<String>,
}

/// Body of `POST /api/v1/admin/names/{name}`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct MoveNameBody {
    /// The IdP subject the name belongs to from now on.
    pub subject: String,
}

/// Answer of `POST /api/v1/admin/names/{name}`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct MoveNameResponse {
    /// The name.
    pub user: String,
    /// Its subject now.
    pub subject: String,
    /// The subject it had (none if it was unbound).
    pub previous_subject: Option<String>,
}

/// Answer of `POST /api/v1/hub/spawn`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct SpawnResponse {
    /// Environment variables for the server.
    pub env: BTreeMap<String, String>,
    /// The token file's path inside the server.
    pub token_file: String,
    /// The narrower-token files tokenhub keeps in the server.
    pub files: Vec<SpawnFile>,
    /// Lineage version.
    pub version: i64,
    /// False once the upstream grant is dead.
    pub active: bool,
    /// True for a shared server: it gets no tokens.
    pub withheld: bool,
}

/// A narrower-token file of a spawning server.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct SpawnFile {
    /// Its path relative to the server's root.
    pub path: String,
    /// The environment variable that gets its absolute path, if any.
    pub env: Option<String>,
}

/// Form of `POST /oauth2/token` (RFC 6749).
#[derive(Serialize, Deserialize, ToSchema)]
pub struct TokenRequest {
    /// `authorization_code` or `refresh_token`.
    pub grant_type: Option<String>,
    /// The code (authorization_code grant).
    pub code: Option<String>,
    /// The redirect URI of the authorization request.
    pub redirect_uri: Option<String>,
    /// PKCE verifier.
    pub code_verifier: Option<String>,
    /// The refresh token (refresh_token grant).
    pub refresh_token: Option<String>,
    /// client_secret_post.
    pub client_id: Option<String>,
    /// client_secret_post.
    pub client_secret: Option<String>,
}

/// Answer of `POST /oauth2/token`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct TokenResponse {
    /// Access token for `/oauth2/userinfo`.
    pub access_token: String,
    /// `Bearer`.
    pub token_type: String,
    /// Lifetime in seconds.
    pub expires_in: i64,
    /// Refresh token.
    pub refresh_token: String,
    /// Granted scopes.
    pub scope: String,
}

/// Answer of `/oauth2/userinfo`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct UserInfo {
    /// The JupyterHub user name.
    pub sub: String,
    /// The same.
    pub username: String,
    /// The same.
    pub preferred_username: String,
    /// Display name (upstream's `name`, else the user name).
    pub name: serde_json::Value,
    /// Groups from the IdP.
    pub groups: Vec<String>,
    /// Upstream issuer.
    pub upstream_issuer: String,
    /// Upstream subject.
    pub upstream_subject: String,
}

/// Answer of `/healthz`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok`: the process serves.
    pub status: String,
    /// `ok` or `unavailable`: whether the database answers.
    pub database: String,
}

/// Answer of `/readyz`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct Ready {
    /// `ok`.
    pub status: String,
}

#[utoipa::path(
    get, path = "/api/v1/tokens", tag = "notebook",
    params(
        ("min_valid" = Option<u32>, Query, description = "seconds the access token must stay valid (refreshes when needed)"),
        ("format" = Option<String>, Query, description = "`json` (default) or `fabric`"),
        ("scope" = Option<String>, Query, description = "space-separated scopes: a narrower token with these (never wider than the login's)"),
        ("audience" = Option<String>, Query, description = "a narrower token for this audience or resource"),
    ),
    responses(
        (status = 200, description = "the caller's tokens, or with `scope` or `audience` a narrower token", body = TokensAnswer),
        (status = 400, description = "bad parameter, or a scope the login does not hold or the IdP will not give (`invalid_scope`)", body = ErrorBody),
        (status = 401, description = "no or unknown token (`invalid_token`), or the login is dead (`invalid_grant`)", body = ErrorBody),
        (status = 403, description = "the token lacks `access:services!service=<name>` (`insufficient_scope`), is the own token of a shared server, or asks for a narrower token outside the operator's rules (`access_denied`, naming the rule)", body = ErrorBody),
        (status = 429, description = "too many failed attempts from this address", body = ErrorBody),
        (status = 503, description = "the hub or the IdP is not answering", body = ErrorBody),
    ),
    security(("hub_token" = []))
)]
fn tokens() {}

#[utoipa::path(
    get, path = "/api/v1/users/{name}/tokens", tag = "delegation",
    params(
        ("name" = String, Path, description = "the hub user whose token the service fetches"),
        ("scope" = Option<String>, Query, description = "space-separated scopes (scope or audience is required)"),
        ("audience" = Option<String>, Query, description = "the audience or resource"),
        ("min_valid" = Option<u32>, Query, description = "seconds the token must stay valid"),
    ),
    responses(
        (status = 200, description = "the user's narrower token", body = NarrowAnswer),
        (status = 400, description = "bad parameter, no scope or audience, or a scope the user's login does not hold (`invalid_scope`)", body = ErrorBody),
        (status = 401, description = "no or unknown token (`invalid_token`)", body = ErrorBody),
        (status = 403, description = "not a service's token, no `custom:tokenhub:delegate` for this user, beyond the service's cap or the user's rules (`access_denied`)", body = ErrorBody),
        (status = 404, description = "tokenhub holds no tokens for the user (`unknown_user`)", body = ErrorBody),
        (status = 409, description = "the user's login is dead (`invalid_grant`): they must renew it", body = ErrorBody),
        (status = 429, description = "too many failed attempts from this address", body = ErrorBody),
        (status = 503, description = "the hub or the IdP is not answering", body = ErrorBody),
    ),
    security(("hub_token" = []))
)]
fn user_tokens() {}

#[utoipa::path(
    post, path = "/api/v1/tokens/refresh", tag = "notebook",
    request_body(content = Option<RefreshBody>, content_type = "application/json"),
    responses(
        (status = 200, description = "refreshed tokens", body = TokensResponse),
        (status = 400, description = "bad body, or a refresh token that is not the current one (`invalid_grant`)", body = ErrorBody),
        (status = 401, description = "no or unknown token, or the login is dead", body = ErrorBody),
        (status = 403, description = "the token lacks the scope, or is a shared server's", body = ErrorBody),
        (status = 413, description = "body too large", body = ErrorBody),
        (status = 429, description = "too many failed attempts", body = ErrorBody),
        (status = 503, description = "the hub or the IdP is not answering", body = ErrorBody),
    ),
    security(("hub_token" = []))
)]
fn force_refresh() {}

#[utoipa::path(
    post, path = "/api/v1/hub/spawn", tag = "hub",
    request_body(content = SpawnBody, content_type = "application/json"),
    responses(
        (status = 200, description = "the environment for the server", body = SpawnResponse),
        (status = 400, description = "malformed JSON", body = ErrorBody),
        (status = 401, description = "bad client credentials", body = ErrorBody),
        (status = 404, description = "no tokens for this user", body = ErrorBody),
        (status = 413, description = "body too large", body = ErrorBody),
        (status = 415, description = "not JSON", body = ErrorBody),
        (status = 422, description = "JSON of the wrong shape", body = ErrorBody),
        (status = 429, description = "too many failed attempts", body = ErrorBody),
        (status = 503, description = "the store is unavailable", body = ErrorBody),
    ),
    security(("hub_client" = []))
)]
fn spawn() {}

#[utoipa::path(
    post, path = "/oauth2/token", tag = "oauth",
    request_body(content = TokenRequest, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "tokens for the hub", body = TokenResponse),
        (status = 400, description = "`invalid_request`, `invalid_grant`, `unsupported_grant_type`", body = ErrorBody),
        (status = 401, description = "`invalid_client`", body = ErrorBody),
        (status = 413, description = "body too large", body = ErrorBody),
        (status = 415, description = "not a form", body = ErrorBody),
        (status = 422, description = "a form of the wrong shape", body = ErrorBody),
        (status = 429, description = "too many failed attempts", body = ErrorBody),
        (status = 503, description = "the store is unavailable", body = ErrorBody),
    ),
    security(("hub_client" = []), ())
)]
fn token() {}

#[utoipa::path(
    get, path = "/oauth2/userinfo", tag = "oauth",
    responses(
        (status = 200, description = "who the access token belongs to", body = UserInfo),
        (status = 401, description = "no, unknown or expired access token", body = ErrorBody),
        (status = 503, description = "the store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
fn userinfo() {}

#[utoipa::path(
    post, path = "/oauth2/userinfo", tag = "oauth",
    operation_id = "userinfo_post",
    responses(
        (status = 200, description = "who the access token belongs to", body = UserInfo),
        (status = 401, description = "no, unknown or expired access token", body = ErrorBody),
        (status = 503, description = "the store is unavailable", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
fn userinfo_post() {}

#[utoipa::path(
    get, path = "/.well-known/openid-configuration", tag = "oauth",
    responses((status = 200, description = "discovery document", body = Object)),
)]
fn discovery() {}

#[utoipa::path(
    get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "the process serves (liveness); says whether the database answers", body = Health)),
)]
fn healthz() {}

#[utoipa::path(
    get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "the database answers (readiness)", body = Ready),
        (status = 503, description = "the database does not answer", body = ErrorBody),
    ),
)]
fn readyz() {}

#[utoipa::path(
    get, path = "/api/v1/openapi.json", tag = "operations",
    responses((status = 200, description = "this document", body = Object)),
)]
fn openapi_json() {}

#[utoipa::path(
    get, path = "/api/v1/admin/lineages", tag = "operators",
    params(
        ("state" = Option<String>, Query, description = "`active`, `dead` or `all` (default)"),
        ("user" = Option<String>, Query, description = "user names starting with this"),
        ("sort" = Option<String>, Query, description = "`user` (default), `last_refresh` or `access_expires`"),
        ("order" = Option<String>, Query, description = "`asc` (default) or `desc`"),
        ("limit" = Option<u32>, Query, description = "rows per page, 1 to 500 (default 50)"),
        ("offset" = Option<u32>, Query, description = "rows to skip"),
    ),
    responses(
        (status = 200, description = "one page of every user's lineage (never a token value)", body = Object),
        (status = 400, description = "bad parameter", body = ErrorBody),
        (status = 401, description = "no or unknown token", body = ErrorBody),
        (status = 403, description = "not a hub admin and no `custom:tokenhub:admin`, or the token lacks the access scope", body = ErrorBody),
        (status = 429, description = "too many failed attempts from this address", body = ErrorBody),
        (status = 503, description = "the hub or the store is not answering", body = ErrorBody),
    ),
    security(("hub_token" = []))
)]
fn admin_lineages() {}

#[utoipa::path(
    post, path = "/api/v1/admin/names/{name}", tag = "operators",
    params(("name" = String, Path, description = "the (canonical) hub user name")),
    request_body(content = MoveNameBody, content_type = "application/json"),
    responses(
        (status = 200, description = "the name belongs to the subject now; the old subject's lineage is gone", body = MoveNameResponse),
        (status = 400, description = "not a canonical name, or a bad subject", body = ErrorBody),
        (status = 401, description = "no or unknown token", body = ErrorBody),
        (status = 403, description = "not a hub admin and no `custom:tokenhub:admin`", body = ErrorBody),
        (status = 413, description = "body too large", body = ErrorBody),
        (status = 415, description = "not JSON", body = ErrorBody),
        (status = 422, description = "JSON of the wrong shape", body = ErrorBody),
        (status = 429, description = "too many failed attempts from this address", body = ErrorBody),
        (status = 503, description = "the hub or the store is not answering", body = ErrorBody),
    ),
    security(("hub_token" = []))
)]
fn admin_move_name() {}

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "hub_token",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "Authorization",
                "`token <JUPYTERHUB_API_TOKEN>` (or `Bearer …`); needs the scope access:services!service=<tokenhub's name>",
            ))),
        );
        components
            .add_security_scheme("hub_client", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Basic).build()));
        components.add_security_scheme("bearer", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()));
    }
}

/// The document's source.
#[derive(OpenApi)]
#[openapi(
    info(title = "tokenhub", description = "Upstream tokens for JupyterHub users' notebooks, and tokenhub's OAuth provider for the hub."),
    paths(tokens, force_refresh, user_tokens, spawn, admin_lineages, admin_move_name, token, userinfo, userinfo_post, discovery, healthz, readyz, openapi_json),
    modifiers(&Security)
)]
pub struct ApiDoc;

/// The document, with tokenhub's public URL as its server.
pub fn document(public_url: &str) -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").into();
    doc.servers = Some(vec![Server::new(public_url.trim_end_matches('/'))]);
    doc
}

/// `GET /api/v1/openapi.json`.
pub async fn serve(State(app): State<AppState>) -> Response {
    Json(document(app.config.http.public_url.as_str())).into_response()
}
