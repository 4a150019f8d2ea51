//! Configuration: settings from the command line, `TOKENHUB_*` environment
//! variables and an optional TOML file (in that order of precedence), turned
//! into one checked [`Config`] split per concern.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use secrecy::SecretString;
use serde::Deserialize;
use url::Url;

use crate::security::TrustedProxies;

/// Every setting of `tokenhub serve`. Each is a flag, an environment variable
/// and a key of the TOML file (the field name).
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// TOML file with any of these settings (keys are the flag names with `_`);
    /// the environment and flags override it.
    #[arg(long, env = "TOKENHUB_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Address to listen on.
    #[arg(long, env = "TOKENHUB_BIND", help_heading = "HTTP")]
    pub bind: Option<SocketAddr>,

    /// Public base URL of tokenhub as browsers and the hub reach it, e.g.
    /// `https://hub.example.org/services/tokenhub`. Default: `http://<bind>`,
    /// or the hub's proxy prefix when JupyterHub runs tokenhub as a service.
    #[arg(long, env = "TOKENHUB_PUBLIC_URL", help_heading = "HTTP")]
    pub public_url: Option<Url>,

    /// Path prefix that JupyterHub gives a managed service (set by the hub).
    #[arg(long, env = "JUPYTERHUB_SERVICE_PREFIX", help_heading = "HTTP")]
    pub service_prefix: Option<String>,

    /// Proxies in front of tokenhub whose `X-Forwarded-For` is believed:
    /// IP addresses and CIDR blocks, comma-separated, e.g. the pod network
    /// of the hub's proxy or the ingress controller's addresses. Empty
    /// (default): the TCP peer is the client, whatever the header says.
    #[arg(long, env = "TOKENHUB_TRUSTED_PROXIES", help_heading = "HTTP")]
    pub trusted_proxies: Option<String>,

    /// Seconds a client has to send a complete request head (request line
    /// and headers), counted from when the connection opens or the previous
    /// response was sent: a kept-alive connection left idle this long is
    /// closed too. Default: 10.
    #[arg(long, env = "TOKENHUB_HEADER_READ_TIMEOUT", help_heading = "HTTP")]
    pub header_read_timeout: Option<u64>,

    /// Seconds a request body may go without sending anything before the
    /// request is refused and its connection closed. Default: 30.
    #[arg(long, env = "TOKENHUB_BODY_READ_TIMEOUT", help_heading = "HTTP")]
    pub body_read_timeout: Option<u64>,

    /// Most connections served at once; further ones wait to be accepted
    /// until one closes. Default: 1024.
    #[arg(long, env = "TOKENHUB_MAX_CONNECTIONS", help_heading = "HTTP")]
    pub max_connections: Option<u64>,

    /// Largest request head (request line and headers) in bytes, 1024 to
    /// 1048576; a larger one gets 431 and its connection is closed.
    /// Default: 16384.
    #[arg(long, env = "TOKENHUB_MAX_HEADER_BYTES", help_heading = "HTTP")]
    pub max_header_bytes: Option<u64>,

    /// Issuer URL of the upstream OpenID provider (discovery is read from
    /// `<issuer>/.well-known/openid-configuration`).
    /// Written exactly as the provider's discovery document states it.
    #[arg(long, env = "TOKENHUB_OIDC_ISSUER", help_heading = "Upstream OpenID provider")]
    pub oidc_issuer: Option<String>,

    /// Client id registered at the upstream provider.
    #[arg(long, env = "TOKENHUB_OIDC_CLIENT_ID", help_heading = "Upstream OpenID provider")]
    pub oidc_client_id: Option<String>,

    /// Client secret registered at the upstream provider.
    #[arg(long, env = "TOKENHUB_OIDC_CLIENT_SECRET", hide_env_values = true, help_heading = "Upstream OpenID provider")]
    pub oidc_client_secret: Option<SecretString>,

    /// Space-separated scopes to request upstream. `openid` is always added.
    #[arg(long, env = "TOKENHUB_OIDC_SCOPES", help_heading = "Upstream OpenID provider", default_value = None)]
    pub oidc_scopes: Option<String>,

    /// Redirect URI registered upstream. Default: `<public_url>/callback`.
    #[arg(long, env = "TOKENHUB_OIDC_REDIRECT_URI", help_heading = "Upstream OpenID provider")]
    pub oidc_redirect_uri: Option<Url>,

    /// How tokenhub authenticates at the provider's token and revocation
    /// endpoints: `client_secret_basic` (RFC 6749 §2.3.1, id and secret
    /// form-encoded) or `client_secret_post`. Default: what the discovery
    /// document's `token_endpoint_auth_methods_supported` offers, Basic first.
    #[arg(long, env = "TOKENHUB_OIDC_CLIENT_AUTH_METHOD", help_heading = "Upstream OpenID provider")]
    pub oidc_client_auth_method: Option<ClientAuthMethod>,

    /// Extra parameters for the provider's authorization request, form-encoded,
    /// e.g. `prompt=consent` or `access_type=offline` (Google). Without
    /// `prompt` here, tokenhub asks for consent by itself once when a first
    /// login brings no refresh token.
    #[arg(long, env = "TOKENHUB_OIDC_AUTH_PARAMS", help_heading = "Upstream OpenID provider")]
    pub oidc_auth_params: Option<String>,

    /// The longest wait, in seconds, that a `Retry-After` from the provider's
    /// token endpoint or key set may impose before tokenhub asks again
    /// (default 60). Meanwhile refreshes are answered 503 with that
    /// `Retry-After` at once.
    #[arg(long, env = "TOKENHUB_OIDC_MAX_RETRY_AFTER", help_heading = "Upstream OpenID provider")]
    pub oidc_max_retry_after: Option<u64>,

    /// Upstream claim that becomes the JupyterHub user name.
    #[arg(long, env = "TOKENHUB_USERNAME_CLAIM", help_heading = "Upstream OpenID provider")]
    pub username_claim: Option<String>,

    /// Upstream claim that holds the user's groups.
    #[arg(long, env = "TOKENHUB_GROUPS_CLAIM", help_heading = "Upstream OpenID provider")]
    pub groups_claim: Option<String>,

    /// How a narrower token (`GET /api/v1/tokens?scope=…&audience=…`) is
    /// had from the provider: `refresh` (a refresh grant with `scope` and
    /// the audience parameter; the lineage's refresh token rotates as on
    /// every refresh) or `exchange` (an RFC 8693 token exchange of the
    /// lineage's access token). Default: `exchange` when the discovery
    /// document lists the token-exchange grant, else `refresh`.
    #[arg(long, env = "TOKENHUB_NARROW_MECHANISM", help_heading = "Narrower tokens")]
    pub narrow_mechanism: Option<NarrowMechanism>,

    /// The request parameter that names the audience asked for: `resource`
    /// (RFC 8707: oidc-provider, CILogon's OA4MP) or `audience` (Auth0;
    /// Keycloak's token exchange). Default: `resource` on a refresh grant,
    /// `audience` in an exchange.
    #[arg(long, env = "TOKENHUB_NARROW_AUDIENCE_PARAM", help_heading = "Narrower tokens")]
    pub narrow_audience_param: Option<AudienceParam>,

    /// Which scopes and audiences users may ask narrower tokens for, by hub
    /// group: a JSON list of rules, each
    /// `{"name": "…", "groups": ["…" or "*"], "scopes": ["…"], "audiences": ["…"]}`.
    /// A request is allowed when one rule naming one of the user's hub
    /// groups (or `*`) holds all its scopes and its audience. Empty
    /// (default): no narrower tokens.
    #[arg(long, env = "TOKENHUB_TOKEN_RULES", help_heading = "Narrower tokens")]
    pub token_rules: Option<String>,

    /// Hub services that may fetch a named user's narrower tokens
    /// (`GET /api/v1/users/{name}/tokens?scope=…&audience=…`), each with its
    /// cap: a JSON list of `{"service": "…", "scopes": ["…"], "audiences": ["…"]}`.
    /// The service's hub token must also hold the custom scope
    /// `custom:<TOKENHUB_SERVICE_NAME>:delegate` (the hub's `!user=` and
    /// `!group=` filters say for whom), and the user's rules apply too.
    /// Default: no service may.
    #[arg(long, env = "TOKENHUB_DELEGATION", help_heading = "Narrower tokens")]
    pub delegation: Option<String>,

    /// Files kept fresh in every server besides the token file, each with
    /// a narrower token: a JSON list of
    /// `{"path": "…", "scope": "…", "audience": "…", "format": "bare" | "json" | "template", "template": "…", "env": "…"}`.
    /// `path` is relative to the server's root (`{server}` in it is the
    /// server's name, `default` for the default server); a template names
    /// `{access_token}`, `{issuer}`, `{scope}`, `{audience}`, `{expires_at}`
    /// (EOS: `oauth2:{access_token}:{issuer}/userinfo`); `env` is set in the
    /// server's environment to the file's absolute path. The user's rules
    /// apply. Default: none.
    #[arg(long, env = "TOKENHUB_TOKEN_FILES", help_heading = "Narrower tokens")]
    pub token_files: Option<String>,

    /// WLCG Bearer Token Discovery: a token for this audience in a file of
    /// each server (`.tokenhub/bt_{server}`), kept fresh, whose absolute
    /// path the server gets as `BEARER_TOKEN_FILE` (read by XRootD, Rucio,
    /// HTCondor, PelicanFS, DIRAC and scitokens). `BEARER_TOKEN` is never set.
    #[arg(long, env = "TOKENHUB_BEARER_TOKEN_AUDIENCE", help_heading = "Narrower tokens")]
    pub bearer_token_audience: Option<String>,

    /// The scopes of that token, space-separated (default: the IdP's
    /// default for the audience).
    #[arg(long, env = "TOKENHUB_BEARER_TOKEN_SCOPE", help_heading = "Narrower tokens")]
    pub bearer_token_scope: Option<String>,

    /// The FABRIC Credential Manager, e.g. `https://cm.fabric-testbed.net`.
    /// Set it for a FABRIC deployment (tokenhub registered at CILogon with
    /// the CM's client): tokenhub's refreshes then go through the CM, and
    /// tokenhub answers FABlib's CM calls as a broker (docs/fabric.md).
    #[arg(long, env = "TOKENHUB_FABRIC_CREDMGR_URL", help_heading = "FABRIC broker")]
    pub fabric_credmgr_url: Option<Url>,

    /// The broker's host name as servers reach it (the chart's Ingress
    /// host, or this host's name for `TOKENHUB_BROKER_BIND`): servers get
    /// `FABRIC_CREDMGR_HOST` set to it, and their `fabric_rc` is pointed at it.
    #[arg(long, env = "TOKENHUB_FABRIC_BROKER_HOST", help_heading = "FABRIC broker")]
    pub fabric_broker_host: Option<String>,

    /// What the broker does with a refresh token it does not hold: `pass`
    /// (default: sent to the CM unchanged, nothing kept) or `refuse`.
    #[arg(long, env = "TOKENHUB_FABRIC_UNKNOWN_TOKENS", help_heading = "FABRIC broker")]
    pub fabric_unknown_tokens: Option<UnknownTokens>,

    /// Custody: servers get no refresh token (`.tokens.json` carries the
    /// FABRIC JWT alone, `CILOGON_REFRESH_TOKEN` is not set); tokenhub keeps
    /// the JWT fresh. Default false.
    #[arg(long, env = "TOKENHUB_FABRIC_CUSTODY", help_heading = "FABRIC broker")]
    pub fabric_custody: Option<bool>,

    /// Point the line `FABRIC_CREDMGR_HOST=…` of the user's
    /// `work/fabric_config/fabric_rc` at the broker when a server starts
    /// (default true; the rest of the file is left alone).
    #[arg(long, env = "TOKENHUB_FABRIC_EDIT_RC", help_heading = "FABRIC broker")]
    pub fabric_edit_rc: Option<bool>,

    /// Seconds a FABRIC JWT must still be valid to be answered from the
    /// vault without asking the CM (default 2100: FABlib refreshes 30
    /// minutes before expiry).
    #[arg(long, env = "TOKENHUB_FABRIC_MIN_VALID", help_heading = "FABRIC broker")]
    pub fabric_min_valid: Option<u64>,

    /// Seconds a replaced refresh token is still answered with the current
    /// tokens (default 86400; the 16 newest per lineage are kept).
    #[arg(long, env = "TOKENHUB_FABRIC_GRACE", help_heading = "FABRIC broker")]
    pub fabric_grace: Option<u64>,

    /// Address of the broker's own TLS listener (for deployments without
    /// an Ingress), e.g. `0.0.0.0:443`; needs the certificate and key.
    #[arg(long, env = "TOKENHUB_BROKER_BIND", help_heading = "FABRIC broker")]
    pub broker_bind: Option<SocketAddr>,

    /// PEM file with the broker's certificate chain.
    #[arg(long, env = "TOKENHUB_BROKER_TLS_CERT", help_heading = "FABRIC broker")]
    pub broker_tls_cert: Option<PathBuf>,

    /// PEM file with the broker's private key.
    #[arg(long, env = "TOKENHUB_BROKER_TLS_KEY", help_heading = "FABRIC broker")]
    pub broker_tls_key: Option<PathBuf>,

    /// Client id of the one registered client, JupyterHub.
    #[arg(long, env = "TOKENHUB_HUB_CLIENT_ID", help_heading = "JupyterHub as OAuth client")]
    pub hub_client_id: Option<String>,

    /// Client secret of JupyterHub.
    #[arg(long, env = "TOKENHUB_HUB_CLIENT_SECRET", hide_env_values = true, help_heading = "JupyterHub as OAuth client")]
    pub hub_client_secret: Option<SecretString>,

    /// JupyterHub's OAuth callback URL, e.g. `https://hub.example.org/hub/oauth_callback`.
    #[arg(long, env = "TOKENHUB_HUB_REDIRECT_URI", help_heading = "JupyterHub as OAuth client")]
    pub hub_redirect_uri: Option<Url>,

    /// Lifetime in seconds of the access tokens tokenhub issues to the hub.
    #[arg(long, env = "TOKENHUB_HUB_TOKEN_TTL", help_heading = "JupyterHub as OAuth client")]
    pub hub_token_ttl: Option<u64>,

    /// The hub's REST API, e.g. `http://127.0.0.1:8081/hub/api` (set by the
    /// hub for a managed service). Needed to identify notebook callers and to
    /// write the token file into running servers.
    #[arg(long, env = "JUPYTERHUB_API_URL", help_heading = "JupyterHub as OAuth client")]
    pub hub_api_url: Option<Url>,

    /// tokenhub's own API token at the hub (set by the hub for a managed
    /// service); its role needs `read:users:name`, `read:users:groups` and `read:servers`.
    #[arg(long, env = "JUPYTERHUB_API_TOKEN", hide_env_values = true, help_heading = "JupyterHub as OAuth client")]
    pub hub_api_token: Option<SecretString>,

    /// Where tokenhub reaches users' servers through the hub's proxy, e.g.
    /// `http://proxy-public`. Default: the origin of TOKENHUB_HUB_REDIRECT_URI.
    #[arg(long, env = "TOKENHUB_HUB_URL", help_heading = "JupyterHub as OAuth client")]
    pub hub_url: Option<Url>,

    /// Path of the token file inside each server, relative to the server's
    /// root directory (what FABRIC_TOKEN_LOCATION points at).
    #[arg(long, env = "TOKENHUB_TOKEN_FILE", help_heading = "JupyterHub as OAuth client")]
    pub token_file: Option<String>,

    /// Owners in these IdP groups (comma-separated) keep their tokens in
    /// servers they share; every other shared server gets none. Default: none.
    #[arg(long, env = "TOKENHUB_SHARED_SERVER_GROUPS", help_heading = "JupyterHub as OAuth client")]
    pub shared_server_groups: Option<String>,

    /// How often (seconds) running servers are checked for new or removed
    /// shares, to withhold or restore their token files. Default 15; 0: never.
    #[arg(long, env = "TOKENHUB_SHARE_CHECK_INTERVAL", help_heading = "JupyterHub as OAuth client")]
    pub share_check_interval: Option<u64>,

    /// The address a hub-managed service should listen on (set by the hub);
    /// used when TOKENHUB_BIND is not given.
    #[arg(long, env = "JUPYTERHUB_SERVICE_URL", help_heading = "HTTP")]
    pub service_url: Option<Url>,

    /// Database URL: `sqlite://path?mode=rwc` or `postgres://…`.
    #[arg(long, env = "TOKENHUB_DATABASE_URL", help_heading = "Vault")]
    pub database_url: Option<String>,

    /// Database connections kept open (default 10 for PostgreSQL, 4 for SQLite).
    #[arg(long, env = "TOKENHUB_DATABASE_POOL_SIZE", help_heading = "Vault")]
    pub database_pool_size: Option<u32>,

    /// Seconds a request waits for a database connection, connecting
    /// included, before it is answered 503 (default 5).
    #[arg(long, env = "TOKENHUB_DATABASE_CONNECT_TIMEOUT", help_heading = "Vault")]
    pub database_connect_timeout: Option<u64>,

    /// Seconds one statement may run (PostgreSQL's statement_timeout;
    /// SQLite's wait for a busy writer), default 10.
    #[arg(long, env = "TOKENHUB_DATABASE_STATEMENT_TIMEOUT", help_heading = "Vault")]
    pub database_statement_timeout: Option<u64>,

    /// Encryption keys, `;`-separated, 32 bytes each as hex or base64; the first
    /// encrypts, all decrypt. Falls back to JUPYTERHUB_CRYPT_KEY.
    #[arg(long, env = "TOKENHUB_CRYPT_KEY", hide_env_values = true, help_heading = "Vault")]
    pub crypt_key: Option<SecretString>,

    /// Seconds between keep-alive rounds, which refresh the tokens of users
    /// with a running server before the refresh token would die unused.
    /// 0 turns keep-alive off. Default: 60.
    #[arg(long, env = "TOKENHUB_KEEPALIVE_INTERVAL", help_heading = "Keep-alive")]
    pub keepalive_interval: Option<u64>,

    /// The IdP's refresh-token idle timeout in seconds (e.g. Keycloak's SSO
    /// session idle, 1800), used when the IdP sends no `refresh_expires_in`.
    /// Unset: only lineages whose IdP sent one are kept alive.
    #[arg(long, env = "TOKENHUB_KEEPALIVE_IDLE_TIMEOUT", help_heading = "Keep-alive")]
    pub keepalive_idle_timeout: Option<u64>,

    /// Seconds before the refresh token (or, with
    /// TOKENHUB_KEEPALIVE_FRESH_ACCESS, the access token) would die that
    /// keep-alive refreshes; at most half the token's lifetime. Default: 1200.
    #[arg(long, env = "TOKENHUB_KEEPALIVE_MARGIN", help_heading = "Keep-alive")]
    pub keepalive_margin: Option<u64>,

    /// Seconds keep-alive goes on after it last saw a running server of the
    /// user. Default: 0.
    #[arg(long, env = "TOKENHUB_KEEPALIVE_GRACE", help_heading = "Keep-alive")]
    pub keepalive_grace: Option<u64>,

    /// `true`: keep-alive also refreshes before the access token expires, so
    /// token files in running servers always hold a valid access token.
    #[arg(long, env = "TOKENHUB_KEEPALIVE_FRESH_ACCESS", help_heading = "Keep-alive")]
    pub keepalive_fresh_access: Option<bool>,

    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `tokenhub=debug`.
    #[arg(long, env = "TOKENHUB_LOG", help_heading = "Logging")]
    pub log: Option<String>,

    /// Log format: `text` or `json`.
    #[arg(long, env = "TOKENHUB_LOG_FORMAT", help_heading = "Logging")]
    pub log_format: Option<LogFormat>,

    /// tokenhub's service name at the hub: notebook callers' tokens must hold
    /// `access:services!service=<name>`. Default: JUPYTERHUB_SERVICE_NAME, else `tokenhub`.
    #[arg(long, env = "TOKENHUB_SERVICE_NAME", help_heading = "JupyterHub as OAuth client")]
    pub service_name: Option<String>,

    /// The service name the hub gives a managed service (set by the hub).
    #[arg(long, env = "JUPYTERHUB_SERVICE_NAME", hide = true)]
    pub hub_service_name: Option<String>,

    /// Where the audit log goes: unset (the normal log, target `audit`),
    /// `stdout`, or a file path (JSON lines, appended).
    #[arg(long, env = "TOKENHUB_AUDIT_LOG", help_heading = "Logging")]
    pub audit_log: Option<String>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Client authentication at the upstream provider's token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "snake_case")]
#[clap(rename_all = "snake_case")]
pub enum ClientAuthMethod {
    /// HTTP Basic with the id and secret form-encoded first (RFC 6749 §2.3.1).
    ClientSecretBasic,
    /// `client_id` and `client_secret` in the form body.
    ClientSecretPost,
}

/// How a narrower token is had from the provider (`TOKENHUB_NARROW_MECHANISM`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "snake_case")]
#[clap(rename_all = "snake_case")]
pub enum NarrowMechanism {
    /// A refresh grant asking for fewer scopes and/or an audience.
    Refresh,
    /// An RFC 8693 token exchange of the lineage's access token.
    Exchange,
}

/// The parameter naming the audience asked for (`TOKENHUB_NARROW_AUDIENCE_PARAM`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "snake_case")]
#[clap(rename_all = "snake_case")]
pub enum AudienceParam {
    /// RFC 8707 `resource`.
    Resource,
    /// `audience` (Auth0, RFC 8693).
    Audience,
}

impl AudienceParam {
    /// The parameter's name in a token request.
    pub fn name(self) -> &'static str {
        match self {
            Self::Resource => "resource",
            Self::Audience => "audience",
        }
    }
}

/// One of the operator's rules for narrower tokens (`TOKENHUB_TOKEN_RULES`):
/// members of `groups` may ask for any of `scopes`, for any of `audiences`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRule {
    /// The rule's name, said in a refusal.
    pub name: String,
    /// Hub groups it is for; `*` is everyone.
    pub groups: Vec<String>,
    /// Scopes that may be asked for.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Audiences (or resources) that may be asked for.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// The bearer-token file's token for members of `groups` (instead of
    /// `TOKENHUB_BEARER_TOKEN_AUDIENCE`'s): `{"audience": "…", "scope": "…"}`,
    /// within the rule's own scopes and audiences.
    #[serde(default)]
    pub bearer: Option<BearerDefault>,
}

/// A rule's bearer-token file: its audience and scopes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BearerDefault {
    /// The audience.
    pub audience: String,
    /// Scopes, space-separated (default: the IdP's default for the audience).
    #[serde(default)]
    pub scope: Option<String>,
}

/// What the broker does with a refresh token it does not hold
/// (`TOKENHUB_FABRIC_UNKNOWN_TOKENS`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownTokens {
    /// Sent to the Credential Manager unchanged; nothing of it is kept.
    #[default]
    Pass,
    /// Refused with 401.
    Refuse,
}

/// The FABRIC broker and refreshes through the Credential Manager.
#[derive(Debug, Clone)]
pub struct FabricConfig {
    /// The Credential Manager's base URL (without `/credmgr`).
    pub credmgr_url: Url,
    /// The broker's host name as servers reach it.
    pub broker_host: Option<String>,
    /// What happens to a refresh token tokenhub does not hold.
    pub unknown_tokens: UnknownTokens,
    /// No refresh token in servers.
    pub custody: bool,
    /// Point `fabric_rc` at the broker at spawn.
    pub edit_rc: bool,
    /// Seconds a JWT must have left to be answered from the vault.
    pub min_valid: i64,
    /// Seconds a replaced refresh token is answered.
    pub grace: i64,
    /// The broker's own TLS listener, if any.
    pub listener: Option<BrokerListener>,
}

/// The broker's TLS listener (`TOKENHUB_BROKER_BIND` and its PEM files).
#[derive(Debug, Clone)]
pub struct BrokerListener {
    /// Address.
    pub bind: SocketAddr,
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
}

#[allow(clippy::too_many_arguments)]
fn fabric_config(
    credmgr_url: Option<Url>,
    broker_host: Option<String>,
    unknown_tokens: Option<UnknownTokens>,
    custody: Option<bool>,
    edit_rc: Option<bool>,
    min_valid: Option<u64>,
    grace: Option<u64>,
    listener: (Option<SocketAddr>, Option<PathBuf>, Option<PathBuf>),
) -> Result<Option<FabricConfig>, ConfigError> {
    let Some(credmgr_url) = credmgr_url else {
        if broker_host.is_some() || listener.0.is_some() {
            return Err(ConfigError::Missing("TOKENHUB_FABRIC_CREDMGR_URL (the broker needs the Credential Manager)"));
        }
        return Ok(None);
    };
    if !matches!(credmgr_url.scheme(), "http" | "https") || credmgr_url.host().is_none() {
        return Err(ConfigError::Invalid { name: "TOKENHUB_FABRIC_CREDMGR_URL", reason: "must be an http or https URL".into() });
    }
    let credmgr_url = trim_slash(credmgr_url);
    if let Some(host) = &broker_host
        && (host.is_empty() || host.contains(['/', ' ', '@']))
    {
        return Err(ConfigError::Invalid {
            name: "TOKENHUB_FABRIC_BROKER_HOST",
            reason: "must be a host name (with a port if not 443), as FABlib's FABRIC_CREDMGR_HOST".into(),
        });
    }
    let listener = match listener {
        (None, None, None) => None,
        (Some(bind), Some(cert), Some(key)) => Some(BrokerListener { bind, cert, key }),
        _ => {
            return Err(ConfigError::Missing(
                "TOKENHUB_BROKER_BIND with TOKENHUB_BROKER_TLS_CERT and TOKENHUB_BROKER_TLS_KEY (all three)",
            ));
        }
    };
    Ok(Some(FabricConfig {
        credmgr_url,
        broker_host,
        unknown_tokens: unknown_tokens.unwrap_or_default(),
        custody: custody.unwrap_or(false),
        edit_rc: edit_rc.unwrap_or(true),
        min_valid: min_valid.unwrap_or(2100).min(86_400) as i64,
        grace: grace.unwrap_or(86_400).min(i64::MAX as u64) as i64,
        listener,
    }))
}

/// Narrower tokens: how they are had and who may ask for what.
#[derive(Debug, Clone, Default)]
pub struct NarrowConfig {
    /// The mechanism, `None`: from discovery.
    pub mechanism: Option<NarrowMechanism>,
    /// The audience parameter, `None`: by mechanism.
    pub audience_param: Option<AudienceParam>,
    /// The operator's rules; none: no narrower tokens.
    pub rules: Vec<TokenRule>,
    /// Services that may fetch users' narrower tokens, with their caps.
    pub delegation: Vec<DelegationCap>,
    /// Files kept fresh in every server (the bearer-token file among them).
    pub files: Vec<TokenFileSpec>,
}

/// How a token file is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileFormat {
    /// The access token alone (at most 4 KiB, as XRootD reads it).
    Bare,
    /// A JSON document: access_token, token_type, expires_at, scope, audience, issuer.
    Json,
    /// A text with `{access_token}`, `{issuer}`, `{scope}`, `{audience}`, `{expires_at}`.
    Template(String),
}

/// The bearer-token file's path in a server's root (WLCG Bearer Token Discovery).
pub const BEARER_TOKEN_PATH: &str = ".tokenhub/bt_{server}";

/// One file kept fresh in every server (`TOKENHUB_TOKEN_FILES`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFileSpec {
    /// Path relative to the server's root; `{server}` is the server's name.
    pub path: String,
    /// Scopes of its token, sorted.
    pub scopes: Vec<String>,
    /// Audience of its token (none for a bearer-token file only the rules give).
    pub audience: Option<String>,
    /// How it is written.
    pub format: FileFormat,
    /// The environment variable that names its absolute path in the server.
    pub env: Option<String>,
}

/// A `TOKENHUB_TOKEN_FILES` entry as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFileSetting {
    path: String,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    audience: Option<String>,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    env: Option<String>,
}

/// The files of `TOKENHUB_TOKEN_FILES`, and the bearer-token file, checked.
fn parse_token_files(
    text: Option<&str>,
    bearer_audience: Option<&str>,
    bearer_scope: Option<&str>,
    rules_give_bearer: bool,
) -> Result<Vec<TokenFileSpec>, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid { name: "TOKENHUB_TOKEN_FILES", reason };
    let scopes_of = |scope: Option<&str>| {
        let mut scopes: Vec<String> = scope.unwrap_or("").split_whitespace().map(str::to_string).collect();
        scopes.sort();
        scopes.dedup();
        scopes
    };
    let mut files = Vec::new();
    for entry in parse_json_list::<TokenFileSetting>(text, "TOKENHUB_TOKEN_FILES")? {
        let path = entry.path.trim().to_string();
        let parts: Vec<&str> = path.split('/').collect();
        if path.is_empty() || path.starts_with('/') || parts.iter().any(|p| p.is_empty() || *p == "." || *p == "..") {
            return Err(invalid(format!("{path:?}: a path relative to the server's root, without . or .. parts")));
        }
        let audience = entry.audience.map(|a| a.trim().to_string()).filter(|a| !a.is_empty());
        let scopes = scopes_of(entry.scope.as_deref());
        if scopes.is_empty() && audience.is_none() {
            return Err(invalid(format!("{path:?}: give a scope or an audience")));
        }
        let format = match (entry.format.as_deref().unwrap_or("bare"), entry.template) {
            ("bare", None) => FileFormat::Bare,
            ("json", None) => FileFormat::Json,
            ("template", Some(t)) if t.contains("{access_token}") => FileFormat::Template(t),
            ("template", _) => return Err(invalid(format!("{path:?}: a template names {{access_token}}"))),
            (other, _) => return Err(invalid(format!("{path:?}: format {other:?} (bare, json, or template with a template)"))),
        };
        if let Some(env) = &entry.env
            && (env.is_empty() || env == "BEARER_TOKEN" || !env.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        {
            return Err(invalid(format!("{path:?}: env {env:?} is not a variable name tokenhub may set")));
        }
        files.push(TokenFileSpec { path, scopes, audience, format, env: entry.env });
    }
    let bearer_audience = bearer_audience.map(str::trim).filter(|a| !a.is_empty());
    if bearer_audience.is_some() || rules_give_bearer {
        files.push(TokenFileSpec {
            path: BEARER_TOKEN_PATH.into(),
            scopes: scopes_of(bearer_scope),
            audience: bearer_audience.map(str::to_string),
            format: FileFormat::Bare,
            env: Some("BEARER_TOKEN_FILE".into()),
        });
    }
    let mut paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
    paths.sort();
    if let Some(twice) = paths.windows(2).find(|w| w[0] == w[1]) {
        return Err(invalid(format!("{:?} is named twice", twice[0])));
    }
    Ok(files)
}

/// What one hub service may fetch for users (`TOKENHUB_DELEGATION`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelegationCap {
    /// The hub service's name.
    pub service: String,
    /// Scopes it may ask for.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Audiences it may ask for.
    #[serde(default)]
    pub audiences: Vec<String>,
}

/// A setting that is missing or wrong, named by its environment variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required setting is not given.
    #[error("{0} is required")]
    Missing(&'static str),
    /// A setting has a value that cannot work.
    #[error("{name}: {reason}")]
    Invalid {
        /// The environment variable.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The TOML file could not be read or parsed.
    #[error("config file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// Where tokenhub listens and how it is reached.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Listening address.
    pub bind: SocketAddr,
    /// Public base URL, without a trailing slash.
    pub public_url: Url,
    /// Path prefix every route lives under (`""` for the root).
    pub base_path: String,
    /// Whether cookies get the `Secure` attribute (public URL is https).
    pub secure_cookies: bool,
    /// Bounds on connections and request heads ([`crate::server::serve`]).
    pub limits: ConnectionLimits,
    /// Peers whose `X-Forwarded-For` names the client ([`crate::security::client_of`]).
    pub trusted_proxies: TrustedProxies,
}

/// What one client connection may hold, and how many there may be
/// (`TOKENHUB_HEADER_READ_TIMEOUT`, `TOKENHUB_BODY_READ_TIMEOUT`,
/// `TOKENHUB_MAX_CONNECTIONS`, `TOKENHUB_MAX_HEADER_BYTES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Time to send a whole request head, from the connection's start or
    /// the previous response (so also the keep-alive idle time).
    pub header_read_timeout: Duration,
    /// Longest pause within a request body.
    pub body_read_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Largest request head in bytes.
    pub max_header_bytes: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 1024,
            max_header_bytes: 16 * 1024,
        }
    }
}

impl ConnectionLimits {
    /// The limits from the settings, each checked, defaults for the unset.
    fn from_settings(s: &Settings) -> Result<Self, ConfigError> {
        let default = Self::default();
        let seconds = |value: Option<u64>, name: &'static str, default: Duration| match value {
            None => Ok(default),
            Some(0) => Err(ConfigError::Invalid { name, reason: "must be a positive number of seconds".into() }),
            Some(secs) => Ok(Duration::from_secs(secs)),
        };
        let max_connections = match s.max_connections {
            None => default.max_connections,
            Some(n @ 1..=MAX_CONNECTIONS_LIMIT) => n as usize,
            Some(_) => {
                return Err(ConfigError::Invalid {
                    name: "TOKENHUB_MAX_CONNECTIONS",
                    reason: format!("must be between 1 and {MAX_CONNECTIONS_LIMIT}"),
                });
            }
        };
        let max_header_bytes = match s.max_header_bytes {
            None => default.max_header_bytes,
            Some(n @ 1024..=1_048_576) => n as usize,
            Some(_) => {
                return Err(ConfigError::Invalid {
                    name: "TOKENHUB_MAX_HEADER_BYTES",
                    reason: "must be between 1024 and 1048576 bytes".into(),
                });
            }
        };
        Ok(Self {
            header_read_timeout: seconds(s.header_read_timeout, "TOKENHUB_HEADER_READ_TIMEOUT", default.header_read_timeout)?,
            body_read_timeout: seconds(s.body_read_timeout, "TOKENHUB_BODY_READ_TIMEOUT", default.body_read_timeout)?,
            max_connections,
            max_header_bytes,
        })
    }
}

/// Most connections TOKENHUB_MAX_CONNECTIONS may allow (file descriptors
/// run out long before).
const MAX_CONNECTIONS_LIMIT: u64 = 1 << 20;

/// The upstream OpenID provider.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Issuer URL, exactly as configured (discovery compares it verbatim).
    pub issuer: String,
    /// Our client id there.
    pub client_id: String,
    /// Our client secret there.
    pub client_secret: SecretString,
    /// Scopes to request (always includes `openid`).
    pub scopes: Vec<String>,
    /// Our redirect URI there.
    pub redirect_uri: Url,
    /// Client authentication at the token endpoint (`None`: from discovery).
    pub client_auth: Option<ClientAuthMethod>,
    /// Extra authorization request parameters.
    pub auth_params: Vec<(String, String)>,
    /// The longest `Retry-After` from the provider that is honoured.
    pub max_retry_after: std::time::Duration,
    /// Claim that names the user.
    pub username_claim: String,
    /// Claim that lists the user's groups.
    pub groups_claim: String,
}

/// JupyterHub, the one client of tokenhub's own OAuth provider.
#[derive(Debug, Clone)]
pub struct HubClientConfig {
    /// Client id.
    pub client_id: String,
    /// Client secret.
    pub client_secret: SecretString,
    /// The only redirect URI accepted.
    pub redirect_uri: Url,
    /// Lifetime of access tokens issued to the hub, in seconds.
    pub token_ttl: u64,
    /// The hub's REST API, if tokenhub may call it.
    pub api_url: Option<Url>,
    /// tokenhub's API token at the hub.
    pub api_token: Option<SecretString>,
    /// Base URL of the hub's proxy, for users' servers.
    pub proxy_url: Url,
    /// The token file's path inside a server's root directory.
    pub token_file: String,
    /// tokenhub's service name at the hub (the scope callers need names it).
    pub service_name: String,
    /// IdP groups whose members keep their tokens in servers they share.
    pub shared_server_groups: Vec<String>,
    /// How often running servers are checked for shares (`None`: never).
    pub share_check_interval: Option<std::time::Duration>,
}

/// The vault: database and keys.
#[derive(Debug, Clone)]
pub struct VaultConfig {
    /// Database URL.
    pub database_url: String,
    /// Pool size and timeouts.
    pub database: crate::vault::store::DatabaseOptions,
    /// The key list, unparsed.
    pub crypt_key: SecretString,
}

/// Keep-alive of users' lineages (see [`crate::tokens::keepalive`]).
#[derive(Debug, Clone)]
pub struct KeepaliveConfig {
    /// Time between rounds; `None`: keep-alive is off.
    pub interval: Option<std::time::Duration>,
    /// The IdP's refresh-token idle timeout, seconds, if the operator named it.
    pub idle_timeout: Option<i64>,
    /// Seconds before a token dies that it is refreshed.
    pub margin: i64,
    /// Seconds keep-alive goes on after the user's last server was seen.
    pub grace: i64,
    /// Also keep access tokens fresh.
    pub fresh_access: bool,
}

/// Logging.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// `EnvFilter` directive.
    pub filter: String,
    /// Output format.
    pub format: LogFormat,
    /// Where audit lines go.
    pub audit: AuditTarget,
}

/// Where audit lines go (`TOKENHUB_AUDIT_LOG`); [`crate::audit`] opens it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AuditTarget {
    /// The normal log, target `audit`.
    #[default]
    Log,
    /// Standard output, JSON lines.
    Stdout,
    /// A file, JSON lines appended.
    File(PathBuf),
}

impl AuditTarget {
    /// From the setting's value.
    pub fn parse(value: Option<&str>) -> Self {
        match value.map(str::trim) {
            None | Some("") => Self::Log,
            Some("stdout") | Some("-") => Self::Stdout,
            Some(path) => Self::File(path.into()),
        }
    }
}

/// The whole checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// HTTP.
    pub http: HttpConfig,
    /// Upstream provider.
    pub upstream: UpstreamConfig,
    /// JupyterHub as client.
    pub hub: HubClientConfig,
    /// Vault.
    pub vault: VaultConfig,
    /// Keep-alive.
    pub keepalive: KeepaliveConfig,
    /// Narrower tokens.
    pub narrow: NarrowConfig,
    /// The FABRIC broker, when a Credential Manager is set.
    pub fabric: Option<FabricConfig>,
    /// Logging.
    pub log: LogConfig,
}

const DEFAULT_SCOPES: &str = "openid email profile offline_access";
/// The vault's database when none is set.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://tokenhub.sqlite?mode=rwc";

impl Settings {
    /// Fills every unset field from `file` (lower precedence).
    fn or(self, file: Settings) -> Settings {
        macro_rules! pick {
            ($($f:ident),*) => { Settings { config: self.config, $($f: self.$f.or(file.$f)),* } };
        }
        pick!(
            bind,
            public_url,
            service_prefix,
            trusted_proxies,
            header_read_timeout,
            body_read_timeout,
            max_connections,
            max_header_bytes,
            oidc_issuer,
            oidc_client_id,
            oidc_client_secret,
            oidc_scopes,
            oidc_redirect_uri,
            oidc_client_auth_method,
            oidc_auth_params,
            oidc_max_retry_after,
            username_claim,
            groups_claim,
            narrow_mechanism,
            narrow_audience_param,
            token_rules,
            delegation,
            token_files,
            bearer_token_audience,
            bearer_token_scope,
            fabric_credmgr_url,
            fabric_broker_host,
            fabric_unknown_tokens,
            fabric_custody,
            fabric_edit_rc,
            fabric_min_valid,
            fabric_grace,
            broker_bind,
            broker_tls_cert,
            broker_tls_key,
            hub_client_id,
            hub_client_secret,
            hub_redirect_uri,
            hub_token_ttl,
            hub_api_url,
            hub_api_token,
            hub_url,
            token_file,
            shared_server_groups,
            share_check_interval,
            service_url,
            database_url,
            database_pool_size,
            database_connect_timeout,
            database_statement_timeout,
            crypt_key,
            keepalive_interval,
            keepalive_idle_timeout,
            keepalive_margin,
            keepalive_grace,
            keepalive_fresh_access,
            log,
            log_format,
            service_name,
            hub_service_name,
            audit_log
        )
    }

    /// Reads the TOML file, if one is named, under the environment and flags.
    pub fn with_file(self) -> Result<Settings, ConfigError> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::File { path: path.clone(), reason: e.to_string() })?;
        let file: Settings =
            toml::from_str(&text).map_err(|e| ConfigError::File { path: path.clone(), reason: e.to_string() })?;
        Ok(self.or(file))
    }

    /// Checks the settings and applies defaults. `jupyterhub_crypt_key` is the
    /// fallback key list (the hub's own variable).
    pub fn into_config(self, jupyterhub_crypt_key: Option<SecretString>) -> Result<Config, ConfigError> {
        let limits = ConnectionLimits::from_settings(&self)?;
        let trusted_proxies = TrustedProxies::parse(self.trusted_proxies.as_deref().unwrap_or(""))
            .map_err(|reason| ConfigError::Invalid { name: "TOKENHUB_TRUSTED_PROXIES", reason })?;
        let from_service_url = self.service_url.as_ref().and_then(|u| {
            let host = u.host_str()?.trim_start_matches('[').trim_end_matches(']');
            Some(SocketAddr::new(host.parse().ok()?, u.port_or_known_default()?))
        });
        let bind = self.bind.or(from_service_url).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8000)));
        let public_url = match self.public_url {
            Some(url) => url,
            None => {
                let prefix = self.service_prefix.as_deref().unwrap_or("/");
                Url::parse(&format!("http://{bind}{prefix}"))
                    .map_err(|e| ConfigError::Invalid { name: "TOKENHUB_PUBLIC_URL", reason: e.to_string() })?
            }
        };
        if !matches!(public_url.scheme(), "http" | "https") {
            return Err(ConfigError::Invalid { name: "TOKENHUB_PUBLIC_URL", reason: "must be an http or https URL".into() });
        }
        let base_path = public_url.path().trim_end_matches('/').to_string();
        let public_url = trim_slash(public_url);
        let redirect_uri = match self.oidc_redirect_uri {
            Some(url) => url,
            None => join(&public_url, "/callback"),
        };
        let mut scopes: Vec<String> =
            self.oidc_scopes.as_deref().unwrap_or(DEFAULT_SCOPES).split_whitespace().map(str::to_string).collect();
        if !scopes.iter().any(|s| s == "openid") {
            scopes.insert(0, "openid".into());
        }
        let crypt_key = self
            .crypt_key
            .or(jupyterhub_crypt_key)
            .ok_or(ConfigError::Missing("TOKENHUB_CRYPT_KEY (or JUPYTERHUB_CRYPT_KEY)"))?;
        Ok(Config {
            http: HttpConfig {
                bind,
                secure_cookies: public_url.scheme() == "https",
                public_url,
                base_path,
                limits,
                trusted_proxies,
            },
            upstream: UpstreamConfig {
                issuer: check_issuer(self.oidc_issuer.ok_or(ConfigError::Missing("TOKENHUB_OIDC_ISSUER"))?)?,
                client_id: self.oidc_client_id.ok_or(ConfigError::Missing("TOKENHUB_OIDC_CLIENT_ID"))?,
                client_secret: self.oidc_client_secret.ok_or(ConfigError::Missing("TOKENHUB_OIDC_CLIENT_SECRET"))?,
                scopes,
                redirect_uri,
                client_auth: self.oidc_client_auth_method,
                auth_params: parse_auth_params(self.oidc_auth_params.as_deref())?,
                max_retry_after: std::time::Duration::from_secs(self.oidc_max_retry_after.unwrap_or(60)),
                username_claim: self.username_claim.unwrap_or_else(|| "preferred_username".into()),
                groups_claim: self.groups_claim.unwrap_or_else(|| "groups".into()),
            },
            hub: HubClientConfig {
                proxy_url: match (self.hub_url, &self.hub_redirect_uri) {
                    (Some(url), _) => trim_slash(url),
                    (None, Some(redirect)) => trim_slash(
                        Url::parse(&redirect.origin().ascii_serialization())
                            .map_err(|e| ConfigError::Invalid { name: "TOKENHUB_HUB_REDIRECT_URI", reason: e.to_string() })?,
                    ),
                    (None, None) => return Err(ConfigError::Missing("TOKENHUB_HUB_REDIRECT_URI")),
                },
                api_url: self.hub_api_url,
                api_token: self.hub_api_token,
                token_file: self.token_file.unwrap_or_else(|| ".tokens.json".into()),
                shared_server_groups: self
                    .shared_server_groups
                    .unwrap_or_default()
                    .split(',')
                    .map(str::trim)
                    .filter(|g| !g.is_empty())
                    .map(str::to_string)
                    .collect(),
                share_check_interval: Some(self.share_check_interval.unwrap_or(15))
                    .filter(|&s| s > 0)
                    .map(std::time::Duration::from_secs),
                service_name: self
                    .service_name
                    .or(self.hub_service_name)
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| "tokenhub".into()),
                client_id: self.hub_client_id.ok_or(ConfigError::Missing("TOKENHUB_HUB_CLIENT_ID"))?,
                client_secret: self.hub_client_secret.ok_or(ConfigError::Missing("TOKENHUB_HUB_CLIENT_SECRET"))?,
                redirect_uri: self.hub_redirect_uri.ok_or(ConfigError::Missing("TOKENHUB_HUB_REDIRECT_URI"))?,
                token_ttl: self.hub_token_ttl.unwrap_or(3600),
            },
            vault: VaultConfig {
                database_url: self.database_url.unwrap_or_else(|| DEFAULT_DATABASE_URL.into()),
                database: crate::vault::store::DatabaseOptions {
                    pool_size: self.database_pool_size.filter(|n| *n > 0),
                    connect_timeout: std::time::Duration::from_secs(self.database_connect_timeout.unwrap_or(5).max(1)),
                    statement_timeout: std::time::Duration::from_secs(self.database_statement_timeout.unwrap_or(10).max(1)),
                },
                crypt_key,
            },
            keepalive: KeepaliveConfig {
                interval: match self.keepalive_interval.unwrap_or(60) {
                    0 => None,
                    secs => Some(std::time::Duration::from_secs(secs)),
                },
                idle_timeout: match self.keepalive_idle_timeout {
                    Some(0) => {
                        return Err(ConfigError::Invalid {
                            name: "TOKENHUB_KEEPALIVE_IDLE_TIMEOUT",
                            reason: "must be a positive number of seconds".into(),
                        });
                    }
                    t => t.map(|t| t.min(i64::MAX as u64) as i64),
                },
                margin: self.keepalive_margin.unwrap_or(1200).min(i64::MAX as u64) as i64,
                grace: self.keepalive_grace.unwrap_or(0).min(i64::MAX as u64) as i64,
                fresh_access: self.keepalive_fresh_access.unwrap_or(false),
            },
            narrow: {
                let rules = parse_token_rules(self.token_rules.as_deref())?;
                let rules_give_bearer = rules.iter().any(|r| r.bearer.is_some());
                NarrowConfig {
                    mechanism: self.narrow_mechanism,
                    audience_param: self.narrow_audience_param,
                    delegation: parse_json_list(self.delegation.as_deref(), "TOKENHUB_DELEGATION")?,
                    files: parse_token_files(
                        self.token_files.as_deref(),
                        self.bearer_token_audience.as_deref(),
                        self.bearer_token_scope.as_deref(),
                        rules_give_bearer,
                    )?,
                    rules,
                }
            },
            fabric: fabric_config(
                self.fabric_credmgr_url,
                self.fabric_broker_host,
                self.fabric_unknown_tokens,
                self.fabric_custody,
                self.fabric_edit_rc,
                self.fabric_min_valid,
                self.fabric_grace,
                (self.broker_bind, self.broker_tls_cert, self.broker_tls_key),
            )?,
            log: LogConfig {
                filter: self.log.unwrap_or_else(|| "info".into()),
                format: self.log_format.unwrap_or_default(),
                audit: AuditTarget::parse(self.audit_log.as_deref()),
            },
        })
    }
}

/// The JSON list of `TOKENHUB_TOKEN_RULES`; each rule names at least one
/// group and asks for something.
fn parse_token_rules(text: Option<&str>) -> Result<Vec<TokenRule>, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid { name: "TOKENHUB_TOKEN_RULES", reason };
    let rules: Vec<TokenRule> = parse_json_list(text, "TOKENHUB_TOKEN_RULES")?;
    for rule in &rules {
        if rule.groups.is_empty() || (rule.scopes.is_empty() && rule.audiences.is_empty()) {
            return Err(invalid(format!("rule {:?} needs groups, and scopes or audiences", rule.name)));
        }
        if let Some(bearer) = &rule.bearer {
            let scopes = bearer.scope.as_deref().unwrap_or("");
            if !rule.audiences.contains(&bearer.audience)
                || scopes.split_whitespace().any(|s| !rule.scopes.iter().any(|r| r == s))
            {
                return Err(invalid(format!(
                    "rule {:?}: its bearer token must be within its own scopes and audiences",
                    rule.name
                )));
            }
        }
    }
    Ok(rules)
}

/// A JSON list setting (empty: none).
fn parse_json_list<T: serde::de::DeserializeOwned>(text: Option<&str>, name: &'static str) -> Result<Vec<T>, ConfigError> {
    let text = text.unwrap_or("").trim();
    if text.is_empty() {
        return Ok(vec![]);
    }
    serde_json::from_str(text).map_err(|e| ConfigError::Invalid { name, reason: format!("not a JSON list as documented: {e}") })
}

/// `prompt=consent&access_type=offline` as pairs; the parameters tokenhub
/// sets itself (PKCE, state, nonce, scope, redirect) cannot be overridden.
fn parse_auth_params(text: Option<&str>) -> Result<Vec<(String, String)>, ConfigError> {
    const OURS: [&str; 8] =
        ["client_id", "redirect_uri", "response_type", "scope", "state", "nonce", "code_challenge", "code_challenge_method"];
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(text.unwrap_or("").trim().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if let Some((k, _)) = pairs.iter().find(|(k, _)| k.is_empty() || OURS.contains(&k.as_str())) {
        return Err(ConfigError::Invalid {
            name: "TOKENHUB_OIDC_AUTH_PARAMS",
            reason: format!("{k:?} cannot be set here (tokenhub sets it itself)"),
        });
    }
    Ok(pairs)
}

fn check_issuer(issuer: String) -> Result<String, ConfigError> {
    let invalid = |reason: &str| ConfigError::Invalid { name: "TOKENHUB_OIDC_ISSUER", reason: reason.into() };
    let url = Url::parse(&issuer).map_err(|e| invalid(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") || url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("must be an http(s) URL without query or fragment"));
    }
    Ok(issuer)
}

fn trim_slash(mut url: Url) -> Url {
    let path = url.path().trim_end_matches('/').to_string();
    url.set_path(&path);
    url
}

/// `base` (no trailing slash) with `path` appended.
pub fn join(base: &Url, path: &str) -> Url {
    let mut url = base.clone();
    let joined = format!("{}{}", base.path().trim_end_matches('/'), path);
    url.set_path(&joined);
    url
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn audit_targets_parse() {
        assert_eq!(AuditTarget::parse(None), AuditTarget::Log);
        assert_eq!(AuditTarget::parse(Some("")), AuditTarget::Log);
        assert_eq!(AuditTarget::parse(Some("stdout")), AuditTarget::Stdout);
        assert_eq!(AuditTarget::parse(Some("/var/log/th.jsonl")), AuditTarget::File("/var/log/th.jsonl".into()));
    }

    fn minimal() -> Settings {
        Settings {
            oidc_issuer: Some("https://idp.example.org".into()),
            oidc_client_id: Some("c".into()),
            oidc_client_secret: Some("s".into()),
            hub_client_id: Some("hub".into()),
            hub_client_secret: Some("hs".into()),
            hub_redirect_uri: Some(Url::parse("http://127.0.0.1:8081/hub/oauth_callback").unwrap()),
            crypt_key: Some("k".into()),
            ..Default::default()
        }
    }

    #[test]
    fn fabric_broker_settings_are_checked() {
        let cm = || Some(Url::parse("https://cm.example.org/").unwrap());
        assert!(minimal().into_config(None).unwrap().fabric.is_none(), "off unless a Credential Manager is set");
        let config = Settings { fabric_credmgr_url: cm(), fabric_broker_host: Some("broker.example.org".into()), ..minimal() }
            .into_config(None)
            .unwrap();
        let fabric = config.fabric.unwrap();
        assert_eq!(fabric.credmgr_url.as_str(), "https://cm.example.org/");
        assert_eq!((fabric.min_valid, fabric.grace, fabric.custody, fabric.edit_rc), (2100, 86_400, false, true));
        assert_eq!(fabric.unknown_tokens, UnknownTokens::Pass);
        assert!(fabric.listener.is_none());
        let refused = |settings: Settings, says: &str| {
            let err = settings.into_config(None).unwrap_err().to_string();
            assert!(err.contains(says), "{err}");
        };
        refused(Settings { fabric_broker_host: Some("b".into()), ..minimal() }, "TOKENHUB_FABRIC_CREDMGR_URL");
        refused(
            Settings { fabric_credmgr_url: cm(), fabric_broker_host: Some("https://b/".into()), ..minimal() },
            "TOKENHUB_FABRIC_BROKER_HOST",
        );
        refused(
            Settings { fabric_credmgr_url: cm(), broker_bind: Some(([127, 0, 0, 1], 443).into()), ..minimal() },
            "TOKENHUB_BROKER_TLS_CERT",
        );
        refused(
            Settings { fabric_credmgr_url: Some(Url::parse("ftp://cm.example.org/").unwrap()), ..minimal() },
            "TOKENHUB_FABRIC_CREDMGR_URL",
        );
    }

    #[test]
    fn narrower_token_settings_are_checked() {
        let with = |rules: &str, files: &str| {
            Settings { token_rules: Some(rules.into()), token_files: Some(files.into()), ..minimal() }.into_config(None)
        };
        let refused = |rules: &str, files: &str, says: &str| {
            let err = with(rules, files).unwrap_err().to_string();
            assert!(err.contains(says), "{err}");
        };
        let rule = r#"[{"name": "s", "groups": ["*"], "scopes": ["a"], "audiences": ["https://s.example"]}]"#;
        let config = with(rule, r#"[{"path": ".t/x_{server}", "scope": "a", "format": "json", "env": "X_FILE"}]"#).unwrap();
        assert_eq!(config.narrow.files.len(), 1);
        assert_eq!(config.narrow.files[0].format, FileFormat::Json);
        refused("not json", "", "TOKENHUB_TOKEN_RULES");
        refused(r#"[{"name": "s", "groups": []}]"#, "", "needs groups");
        refused(
            r#"[{"name": "s", "groups": ["*"], "scopes": ["a"], "audiences": ["x"], "bearer": {"audience": "y"}}]"#,
            "",
            "within its own scopes",
        );
        for (files, says) in [
            (r#"[{"path": "/etc/x", "scope": "a"}]"#, "relative"),
            (r#"[{"path": "a/../b", "scope": "a"}]"#, "relative"),
            (r#"[{"path": "x"}]"#, "scope or an audience"),
            (r#"[{"path": "x", "scope": "a", "format": "template"}]"#, "{access_token}"),
            (r#"[{"path": "x", "scope": "a", "env": "BEARER_TOKEN"}]"#, "may set"),
            (r#"[{"path": "x", "scope": "a"}, {"path": "x", "scope": "b"}]"#, "twice"),
        ] {
            refused(rule, files, says);
        }
        // A rule's bearer default alone turns the bearer-token file on.
        let bearer = r#"[{"name": "s", "groups": ["*"], "scopes": ["a"], "audiences": ["x"], "bearer": {"audience": "x"}}]"#;
        let config = with(bearer, "").unwrap();
        assert_eq!(config.narrow.files[0].path, BEARER_TOKEN_PATH);
        assert_eq!(config.narrow.files[0].env.as_deref(), Some("BEARER_TOKEN_FILE"));
    }

    #[test]
    fn defaults_follow_the_service_prefix() {
        let config = Settings { service_prefix: Some("/services/tokenhub/".into()), ..minimal() }.into_config(None).unwrap();
        assert_eq!(config.http.base_path, "/services/tokenhub");
        assert_eq!(config.http.public_url.as_str(), "http://127.0.0.1:8000/services/tokenhub");
        assert_eq!(config.upstream.redirect_uri.as_str(), "http://127.0.0.1:8000/services/tokenhub/callback");
        assert_eq!(config.upstream.scopes, ["openid", "email", "profile", "offline_access"]);
        assert!(!config.http.secure_cookies);
        assert_eq!(config.hub.proxy_url.as_str(), "http://127.0.0.1:8081/");
        assert_eq!(config.hub.token_file, ".tokens.json");
    }

    #[test]
    fn a_managed_service_listens_where_the_hub_says() {
        let config = Settings {
            service_url: Some(Url::parse("http://127.0.0.1:10101").unwrap()),
            service_prefix: Some("/services/tokenhub/".into()),
            ..minimal()
        }
        .into_config(None)
        .unwrap();
        assert_eq!(config.http.bind.to_string(), "127.0.0.1:10101");
        assert_eq!(config.http.public_url.as_str(), "http://127.0.0.1:10101/services/tokenhub");
    }

    #[test]
    fn public_url_root_has_empty_base_path() {
        let config = Settings {
            public_url: Some(Url::parse("https://th.example.org/").unwrap()),
            oidc_scopes: Some("email offline_access".into()),
            ..minimal()
        }
        .into_config(None)
        .unwrap();
        assert_eq!(config.http.base_path, "");
        assert!(config.http.secure_cookies);
        assert_eq!(config.upstream.redirect_uri.as_str(), "https://th.example.org/callback");
        assert_eq!(config.upstream.scopes, ["openid", "email", "offline_access"]);
    }

    #[test]
    fn crypt_key_falls_back_to_jupyterhub_and_is_required() {
        let mut s = minimal();
        s.crypt_key = None;
        let err = s.clone().into_config(None).unwrap_err();
        assert!(err.to_string().contains("TOKENHUB_CRYPT_KEY"));
        let config = s.into_config(Some("hubkey".into())).unwrap();
        assert_eq!(config.vault.crypt_key.expose_secret(), "hubkey");
    }

    #[test]
    fn missing_or_bad_issuer_is_named() {
        let mut s = minimal();
        s.oidc_issuer = None;
        assert_eq!(s.clone().into_config(None).unwrap_err().to_string(), "TOKENHUB_OIDC_ISSUER is required");
        s.oidc_issuer = Some("ftp://idp".into());
        assert!(s.clone().into_config(None).unwrap_err().to_string().starts_with("TOKENHUB_OIDC_ISSUER"));
        s.oidc_issuer = Some("https://cilogon.org".into());
        assert_eq!(s.into_config(None).unwrap().upstream.issuer, "https://cilogon.org", "kept verbatim");
    }

    #[test]
    fn auth_params_are_parsed_and_ours_are_refused() {
        let mut s = minimal();
        s.oidc_auth_params = Some("prompt=consent&access_type=offline".into());
        let c = s.into_config(None).unwrap();
        assert_eq!(c.upstream.auth_params, vec![("prompt".into(), "consent".into()), ("access_type".into(), "offline".into())]);
        let mut s = minimal();
        s.oidc_auth_params = Some("prompt=login&nonce=x".into());
        let e = s.into_config(None).unwrap_err().to_string();
        assert!(e.contains("TOKENHUB_OIDC_AUTH_PARAMS") && e.contains("nonce"), "{e}");
    }

    #[test]
    fn keepalive_defaults_and_checks() {
        let c = minimal().into_config(None).unwrap().keepalive;
        assert_eq!(c.interval, Some(std::time::Duration::from_secs(60)));
        assert_eq!((c.idle_timeout, c.margin, c.grace, c.fresh_access), (None, 1200, 0, false));
        let mut s = minimal();
        s.keepalive_interval = Some(0);
        assert_eq!(s.into_config(None).unwrap().keepalive.interval, None, "0 turns keep-alive off");
        let mut s = minimal();
        s.keepalive_idle_timeout = Some(0);
        assert!(s.into_config(None).unwrap_err().to_string().starts_with("TOKENHUB_KEEPALIVE_IDLE_TIMEOUT"));
    }

    #[test]
    fn trusted_proxies_are_checked() {
        assert!(minimal().into_config(None).unwrap().http.trusted_proxies.is_empty(), "none by default");
        let s = Settings { trusted_proxies: Some("10.244.0.0/16, 192.168.1.5".into()), ..minimal() };
        let t = s.into_config(None).unwrap().http.trusted_proxies;
        assert!(t.contains("10.244.1.1".parse().unwrap()) && t.contains("192.168.1.5".parse().unwrap()));
        let s = Settings { trusted_proxies: Some("10.244.0.0/16,proxy-public".into()), ..minimal() };
        let e = s.into_config(None).unwrap_err().to_string();
        assert!(e.starts_with("TOKENHUB_TRUSTED_PROXIES: \"proxy-public\" is not an IP address"), "{e}");
    }

    #[test]
    fn connection_limits_defaults_and_checks() {
        let limits = minimal().into_config(None).unwrap().http.limits;
        assert_eq!(limits, ConnectionLimits::default());
        assert_eq!(limits.header_read_timeout, Duration::from_secs(10));
        assert_eq!(limits.body_read_timeout, Duration::from_secs(30));
        assert_eq!((limits.max_connections, limits.max_header_bytes), (1024, 16384));
        let s = Settings {
            header_read_timeout: Some(3),
            body_read_timeout: Some(4),
            max_connections: Some(5),
            max_header_bytes: Some(8192),
            ..minimal()
        };
        let limits = s.into_config(None).unwrap().http.limits;
        assert_eq!(limits.header_read_timeout, Duration::from_secs(3));
        assert_eq!(limits.body_read_timeout, Duration::from_secs(4));
        assert_eq!((limits.max_connections, limits.max_header_bytes), (5, 8192));
        for (s, name) in [
            (Settings { header_read_timeout: Some(0), ..minimal() }, "TOKENHUB_HEADER_READ_TIMEOUT"),
            (Settings { body_read_timeout: Some(0), ..minimal() }, "TOKENHUB_BODY_READ_TIMEOUT"),
            (Settings { max_connections: Some(0), ..minimal() }, "TOKENHUB_MAX_CONNECTIONS"),
            (Settings { max_header_bytes: Some(512), ..minimal() }, "TOKENHUB_MAX_HEADER_BYTES"),
            (Settings { max_header_bytes: Some(2 << 20), ..minimal() }, "TOKENHUB_MAX_HEADER_BYTES"),
        ] {
            let e = s.into_config(None).unwrap_err().to_string();
            assert!(e.starts_with(name), "{e}");
        }
    }

    #[test]
    fn toml_file_fills_what_the_environment_leaves_unset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenhub.toml");
        std::fs::write(&path, "oidc_client_id = \"from-file\"\nusername_claim = \"email\"\nbind = \"127.0.0.1:9999\"\n").unwrap();
        let s = Settings { config: Some(path.clone()), username_claim: Some("sub".into()), ..minimal() };
        let config = s.with_file().unwrap().into_config(None).unwrap();
        assert_eq!(config.upstream.client_id, "c", "environment wins over the file");
        assert_eq!(config.upstream.username_claim, "sub");
        assert_eq!(config.http.bind.port(), 9999, "file fills unset values");
        std::fs::write(&path, "no_such_setting = 1\n").unwrap();
        let err = Settings { config: Some(path), ..minimal() }.with_file().unwrap_err();
        assert!(err.to_string().contains("no_such_setting"));
    }
}
