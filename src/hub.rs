//! Talking to JupyterHub as a service: who owns an API token
//! (`GET /hub/api/user`, cached briefly), which servers a user runs, and
//! writing a file into a running server through its Contents API with that
//! server's own hub token.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::json;
use url::Url;

use crate::config::{HubClientConfig, join};
use crate::metrics::{HubCall, HubTimings};
use crate::vault::crypto::digest_hex;

/// How long the owner of a token is remembered.
const IDENTITY_TTL: Duration = Duration::from_secs(60);
/// How long a token the hub does not know, or that may not call tokenhub,
/// is remembered: a flood of one made-up token is not a flood of hub calls,
/// and a token the hub learns about (or is granted the scope) soon works.
const REFUSED_TTL: Duration = Duration::from_secs(10);
/// Most tokens remembered at once, in each cache (least used go first).
const CACHE_MAX: u64 = 100_000;

/// Why a call to the hub failed. Texts hold no token values.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// tokenhub was not given `JUPYTERHUB_API_URL` and `JUPYTERHUB_API_TOKEN`.
    #[error("the hub API is not configured (JUPYTERHUB_API_URL, JUPYTERHUB_API_TOKEN)")]
    NotConfigured,
    /// The hub or the server could not be reached.
    #[error("the hub could not be reached: {0}")]
    Unreachable(String),
    /// The hub or the server answered with an unexpected status.
    #[error("{what} answered {status}")]
    Status {
        /// Which call.
        what: &'static str,
        /// The HTTP status.
        status: u16,
    },
    /// The answer was not the expected JSON.
    #[error("the hub's answer is not valid: {0}")]
    BadResponse(String),
}

/// Who a hub API token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user's name.
    pub username: String,
    /// Whether the hub says the token may use tokenhub's operator's view: the
    /// user is a hub admin, or the token holds [`ADMIN_SCOPE`].
    pub admin: bool,
}

/// A hub service, as the hub reports its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceIdentity {
    /// The service's name.
    pub name: String,
    /// The token's scopes, as the hub expands them (with their filters).
    pub scopes: Vec<String>,
}

/// The JupyterHub custom scope that makes a token a tokenhub operator
/// without making its user a hub admin (defined by the hub's config block).
pub const ADMIN_SCOPE: &str = "custom:tokenhub:admin";

/// What the hub says about a token presented to tokenhub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A user's token that may call tokenhub.
    User(Identity),
    /// The hub does not know the token.
    Unknown,
    /// The token belongs to something other than a user or a service.
    NotAUser,
    /// The token belongs to a hub service: its name and the token's scopes
    /// (a service may fetch users' narrower tokens by delegation, never
    /// call the user API).
    Service(ServiceIdentity),
    /// A user's token without the scope that lets it call tokenhub (a narrow
    /// personal token, or one the hub issued to another service or to
    /// another user's server). Holds the scope it lacks.
    MissingScope(String),
}

/// One of a user's servers, as the hub reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct ServerInfo {
    /// The server's name (`""` for the default server).
    #[serde(default)]
    pub name: String,
    /// Whether it is up and answering.
    #[serde(default)]
    pub ready: bool,
    /// Its path behind the proxy, e.g. `/user/alice/`.
    pub url: String,
}

#[derive(Deserialize)]
struct UserModel {
    name: String,
    #[serde(default)]
    kind: Option<String>,
    /// Visible with `read:users:name` (JupyterHub 5 and 6).
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    servers: HashMap<String, ServerInfo>,
    /// Visible with `read:users:groups`.
    #[serde(default)]
    groups: Vec<String>,
    /// The scopes of the token the request was made with (JupyterHub ≥ 2).
    #[serde(default)]
    scopes: Vec<String>,
    /// The id of the token the request was made with (JupyterHub ≥ 5).
    #[serde(default)]
    token_id: Option<String>,
}

/// A page of the hub's share or share-code list (only what tokenhub reads).
#[derive(Deserialize)]
struct ShareList {
    #[serde(default)]
    items: Vec<ShareItem>,
}

#[derive(Deserialize)]
struct ShareItem {
    server: SharedServer,
}

#[derive(Deserialize)]
struct SharedServer {
    #[serde(default)]
    name: String,
    user: NameOnly,
}

#[derive(Deserialize)]
struct NameOnly {
    name: String,
}

/// How long a user's shared servers are remembered: a share added to a
/// running server withholds its tokens within this time (plus the sweep's).
pub const SHARES_TTL: Duration = Duration::from_secs(5);

/// How long a user's hub groups are remembered (the rules for narrower
/// tokens go by them).
pub const GROUPS_TTL: Duration = Duration::from_secs(30);

/// A client of the hub's API and of users' servers.
pub struct HubApi {
    api_url: Option<Url>,
    api_token: Option<SecretString>,
    proxy_url: Url,
    token_file: String,
    http: reqwest::Client,
    /// The scope a token needs to call tokenhub.
    required_scope: String,
    /// Tokens that may call tokenhub, by SHA-256 digest (never the token).
    identities: moka::sync::Cache<String, Identity>,
    /// Tokens refused recently, by digest.
    refused: moka::sync::Cache<String, Verdict>,
    /// Servers' own tokens checked recently (digest, user, server): the
    /// token's id, or why it may not be presented.
    server_credentials: moka::sync::Cache<String, Result<String, String>>,
    /// Users' shared servers, by user (see [`HubApi::shared_servers`]).
    shares: moka::sync::Cache<String, HashSet<String>>,
    /// Users' hub groups, by user (see [`HubApi::groups`]).
    groups: moka::sync::Cache<String, Vec<String>>,
    /// How long calls take (for `/metrics`).
    timings: HubTimings,
}

impl std::fmt::Debug for HubApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubApi")
            .field("api_url", &self.api_url.as_ref().map(Url::as_str))
            .field("proxy_url", &self.proxy_url.as_str())
            .finish()
    }
}

fn unreachable(e: reqwest::Error) -> HubError {
    HubError::Unreachable(e.without_url().to_string())
}

impl HubApi {
    /// A client for the hub described by `config`.
    pub fn new(config: &HubClientConfig, http: reqwest::Client, timings: HubTimings) -> Self {
        Self {
            api_url: config.api_url.clone(),
            api_token: config.api_token.clone(),
            proxy_url: config.proxy_url.clone(),
            token_file: config.token_file.clone(),
            http,
            required_scope: format!("access:services!service={}", config.service_name),
            identities: moka::sync::Cache::builder().max_capacity(CACHE_MAX).time_to_live(IDENTITY_TTL).build(),
            refused: moka::sync::Cache::builder().max_capacity(CACHE_MAX).time_to_live(REFUSED_TTL).build(),
            server_credentials: moka::sync::Cache::builder().max_capacity(CACHE_MAX).time_to_live(IDENTITY_TTL).build(),
            shares: moka::sync::Cache::builder().max_capacity(CACHE_MAX).time_to_live(SHARES_TTL).build(),
            groups: moka::sync::Cache::builder().max_capacity(CACHE_MAX).time_to_live(GROUPS_TTL).build(),
            timings,
        }
    }

    /// Whether tokenhub can call the hub at all.
    pub fn configured(&self) -> bool {
        self.api_url.is_some() && self.api_token.is_some()
    }

    /// The token file's path inside a server.
    pub fn token_file(&self) -> &str {
        &self.token_file
    }

    fn api(&self, path: &str) -> Result<(Url, &SecretString), HubError> {
        match (&self.api_url, &self.api_token) {
            (Some(url), Some(token)) => Ok((join(url, path), token)),
            _ => Err(HubError::NotConfigured),
        }
    }

    /// The scope a caller's token must hold (`access:services!service=<name>`).
    pub fn required_scope(&self) -> &str {
        &self.required_scope
    }

    /// What the hub's cache already knows about the token whose digest
    /// ([`digest_hex`]) is `token_digest`, without calling the hub (lets a
    /// known caller through while its address is slowed down).
    pub fn cached(&self, token_digest: &str) -> Option<Verdict> {
        self.identities.get(token_digest).map(Verdict::User).or_else(|| self.refused.get(token_digest))
    }

    /// Who a hub API token (a server's `JUPYTERHUB_API_TOKEN`, or any user
    /// token) belongs to, and whether it may call tokenhub: like JupyterHub's
    /// `HubAuth`, a token is accepted only if its scopes include
    /// `access:services!service=<tokenhub's name>` or `access:services`.
    /// Without that check, any token naming a user (a narrow personal token,
    /// a token issued for the user to another service or to another user's
    /// server) would read that user's upstream tokens.
    /// `token_digest` is the token's [`digest_hex`], its key in the caches.
    pub async fn identify(&self, token: &str, token_digest: &str) -> Result<Verdict, HubError> {
        if let Some(verdict) = self.cached(token_digest) {
            return Ok(verdict);
        }
        let key = token_digest.to_string();
        let verdict = match self.whoami(token, HubCall::Identify).await? {
            Some(user) => self.judge(user),
            None => Verdict::Unknown,
        };
        match &verdict {
            Verdict::User(identity) => self.identities.insert(key, identity.clone()),
            refused => self.refused.insert(key, refused.clone()),
        }
        Ok(verdict)
    }

    /// `GET /hub/api/user` with `token`: the model of its owner with the
    /// token's scopes, or `None` when the hub does not know it (401, 403, 404).
    async fn whoami(&self, token: &str, call: HubCall) -> Result<Option<UserModel>, HubError> {
        let (url, _) = self.api("/user")?;
        let _timer = self.timings.start(call);
        let response = self.http.get(url).header("authorization", format!("token {token}")).send().await.map_err(unreachable)?;
        match response.status().as_u16() {
            200 => Ok(Some(response.json().await.map_err(|e| HubError::BadResponse(e.without_url().to_string()))?)),
            401 | 403 | 404 => Ok(None),
            status => Err(HubError::Status { what: "the hub's /user", status }),
        }
    }

    fn judge(&self, user: UserModel) -> Verdict {
        match user.kind.as_deref() {
            Some("service") => return Verdict::Service(ServiceIdentity { name: user.name, scopes: user.scopes }),
            Some(kind) if kind != "user" => return Verdict::NotAUser,
            _ => {}
        }
        let allowed = user.scopes.iter().any(|s| s == "access:services" || *s == self.required_scope);
        if allowed {
            let admin = user.admin || user.scopes.iter().any(|s| s == ADMIN_SCOPE);
            Verdict::User(Identity { username: user.name, admin })
        } else {
            Verdict::MissingScope(self.required_scope.clone())
        }
    }

    /// Lets the caches drop expired entries now (they hold no token values,
    /// only digests, but should not outlive their time).
    pub fn sweep(&self) {
        self.identities.run_pending_tasks();
        self.refused.run_pending_tasks();
        self.server_credentials.run_pending_tasks();
        self.shares.run_pending_tasks();
        self.groups.run_pending_tasks();
    }

    /// `GET` a hub API path with tokenhub's own token: the JSON answer, or
    /// `None` for 404 (`what` names the call in errors).
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        call: HubCall,
        what: &'static str,
    ) -> Result<Option<T>, HubError> {
        let (url, token) = self.api(path)?;
        let _timer = self.timings.start(call);
        let response = self
            .http
            .get(url)
            .header("authorization", format!("token {}", token.expose_secret()))
            .send()
            .await
            .map_err(unreachable)?;
        match response.status().as_u16() {
            200 => Ok(Some(response.json().await.map_err(|e| HubError::BadResponse(e.without_url().to_string()))?)),
            404 => Ok(None),
            status => Err(HubError::Status { what, status }),
        }
    }

    /// The hub's model of `username` (`GET /users/{name}` with tokenhub's
    /// own token); `None` when the hub does not know the user.
    async fn user_model(&self, username: &str, call: HubCall) -> Result<Option<UserModel>, HubError> {
        let Some(user) =
            self.get_json::<UserModel>(&format!("/users/{}", path_segment(username)), call, "the hub's /users").await?
        else {
            return Ok(None);
        };
        if user.name != username {
            return Err(HubError::BadResponse("the hub answered about another user".into()));
        }
        Ok(Some(user))
    }

    /// The user's servers (ready or not).
    pub async fn servers(&self, username: &str) -> Result<Vec<ServerInfo>, HubError> {
        let Some(user) = self.user_model(username, HubCall::Servers).await? else {
            return Ok(vec![]);
        };
        Ok(user
            .servers
            .into_iter()
            .map(|(name, mut server)| {
                server.name = name;
                server
            })
            .collect())
    }

    /// The user's hub groups (`GET /users/{name}` with tokenhub's own
    /// token and its `read:users:groups`), remembered for [`GROUPS_TTL`]; a
    /// user the hub does not know, or a hub tokenhub cannot ask, has none.
    pub async fn groups(&self, username: &str) -> Result<Vec<String>, HubError> {
        if !self.configured() {
            return Ok(vec![]);
        }
        if let Some(groups) = self.groups.get(username) {
            return Ok(groups);
        }
        let groups = self.user_model(username, HubCall::Groups).await?.map(|u| u.groups).unwrap_or_default();
        self.groups.insert(username.to_string(), groups.clone());
        Ok(groups)
    }

    /// Whether the hub says `username` is an admin (`GET /users/{name}` with
    /// tokenhub's own token; its `read:users:name` shows the `admin` field).
    /// A user the hub does not know is not an admin.
    pub async fn is_admin(&self, username: &str) -> Result<bool, HubError> {
        let user = self.user_model(username, HubCall::IsAdmin).await?;
        Ok(user.is_some_and(|user| user.admin && user.name == username))
    }

    /// The names of the user's servers that are shared with someone or
    /// have share codes out (JupyterHub 5's sharing: `GET /shares/{name}`
    /// and `GET /share-codes/{name}`, tokenhub's `read:shares`). Remembered
    /// for [`SHARES_TTL`]. A hub without sharing (404 on both) shares nothing.
    pub async fn shared_servers(&self, username: &str) -> Result<HashSet<String>, HubError> {
        if let Some(shared) = self.shares.get(username) {
            return Ok(shared);
        }
        let mut shared = HashSet::new();
        for kind in ["shares", "share-codes"] {
            let path = format!("/{kind}/{}", path_segment(username));
            let Some(list) = self.get_json::<ShareList>(&path, HubCall::Shares, "the hub's sharing API").await? else {
                continue;
            };
            for item in list.items {
                if item.server.user.name != username {
                    return Err(HubError::BadResponse("the hub listed another user's shares".into()));
                }
                shared.insert(item.server.name);
            }
        }
        self.shares.insert(username.to_string(), shared.clone());
        Ok(shared)
    }

    /// Checks a server's own hub API token before tokenhub presents it to
    /// that server: the hub must say it belongs to `username` and reaches
    /// that server. Returns the token's id (for the audit log), or why it
    /// is refused. Answers are remembered for [`IDENTITY_TTL`].
    pub async fn check_server_credential(
        &self,
        credential: &SecretString,
        username: &str,
        server: &str,
    ) -> Result<Result<String, String>, HubError> {
        let key = format!("{}\0{username}\0{server}", digest_hex(credential.expose_secret()));
        if let Some(verdict) = self.server_credentials.get(&key) {
            return Ok(verdict);
        }
        let verdict = match self.whoami(credential.expose_secret(), HubCall::ServerToken).await? {
            Some(model) => {
                let reaches = [format!("access:servers!server={username}/{server}"), format!("access:servers!user={username}")];
                if model.kind.as_deref().is_some_and(|k| k != "user") || model.name != username {
                    Err("the hub says the token belongs to someone else".to_string())
                } else if !model.scopes.iter().any(|s| s == "access:servers" || reaches.contains(s)) {
                    Err("the token does not reach the server".to_string())
                } else {
                    Ok(model.token_id.unwrap_or_else(|| "(unknown)".into()))
                }
            }
            None => Err("the hub does not know the token (the server stopped?)".to_string()),
        };
        self.server_credentials.insert(key, verdict.clone());
        Ok(verdict)
    }

    /// Writes `content` whole as the file at `path` (relative to the
    /// server's root; the token file is [`HubApi::token_file`]) of a running
    /// server, through the server's Contents API behind the proxy,
    /// presenting the server's own hub API token (`credential`): never
    /// tokenhub's, which would reach every server, and the server's owner
    /// sees all that reaches it.
    pub async fn write_file(
        &self,
        server: &ServerInfo,
        path: &str,
        content: &str,
        credential: &SecretString,
    ) -> Result<(), HubError> {
        let body = json!({ "type": "file", "format": "text", "content": content });
        self.put_contents(server, path, &body, credential).await
    }

    /// Reads the text file `path` of a running server through its Contents
    /// API with the server's own token; `None` when there is no such file.
    pub async fn read_file(
        &self,
        server: &ServerInfo,
        path: &str,
        credential: &SecretString,
    ) -> Result<Option<String>, HubError> {
        let mut url = self.contents_url(server, path);
        url.set_query(Some("type=file&format=text&content=1"));
        let _timer = self.timings.start(HubCall::WriteTokenFile);
        let response = self
            .http
            .get(url)
            .header("authorization", format!("token {}", credential.expose_secret()))
            .send()
            .await
            .map_err(unreachable)?;
        match response.status().as_u16() {
            404 => Ok(None),
            s if !(200..300).contains(&s) => Err(HubError::Status { what: "the server's Contents API", status: s }),
            _ => {
                let model: serde_json::Value =
                    response.json().await.map_err(|e| HubError::BadResponse(e.without_url().to_string()))?;
                Ok(model.get("content").and_then(serde_json::Value::as_str).map(str::to_string))
            }
        }
    }

    /// Makes the directory `path` of a running server (one that is there is kept).
    pub async fn make_directory(&self, server: &ServerInfo, path: &str, credential: &SecretString) -> Result<(), HubError> {
        self.put_contents(server, path, &json!({ "type": "directory" }), credential).await
    }

    /// The Contents API URL of `path` in a server, behind the proxy.
    fn contents_url(&self, server: &ServerInfo, path: &str) -> Url {
        let segments: Vec<String> = path.trim_start_matches('/').split('/').map(path_segment).collect();
        join(&self.proxy_url, &format!("{}api/contents/{}", ensure_slash(&server.url), segments.join("/")))
    }

    /// One `PUT` to the server's Contents API with the server's own token.
    async fn put_contents(
        &self,
        server: &ServerInfo,
        path: &str,
        body: &serde_json::Value,
        credential: &SecretString,
    ) -> Result<(), HubError> {
        let url = self.contents_url(server, path);
        let _timer = self.timings.start(HubCall::WriteTokenFile);
        let response = self
            .http
            .put(url)
            .header("authorization", format!("token {}", credential.expose_secret()))
            .json(body)
            .send()
            .await
            .map_err(unreachable)?;
        if !response.status().is_success() {
            return Err(HubError::Status { what: "the server's Contents API", status: response.status().as_u16() });
        }
        Ok(())
    }
}

fn ensure_slash(path: &str) -> String {
    if path.ends_with('/') { path.to_string() } else { format!("{path}/") }
}

/// Everything but RFC 3986's unreserved characters is escaped: the hub
/// (Tornado) percent-decodes path segments and takes `+` as itself, so a
/// form-encoded `a b` (`a+b`) would name another user.
const SEGMENT: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// One path segment of a hub API URL, percent-encoded.
pub fn path_segment(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, SEGMENT).to_string()
}
