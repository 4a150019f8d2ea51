//! `App`: everything a request handler needs, built once at start-up and
//! shared. Tests build their own with [`App::new`], so nothing is global.

use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;

use crate::config::Config;
use crate::hub::HubApi;
use crate::metrics::Metrics;
use crate::oauth::upstream::Upstream;
use crate::tokens::deliveries::Deliveries;
use crate::tokens::refresher::Refresher;
use crate::vault::Vault;
use crate::vault::crypto::KeyRing;
use crate::vault::store::Store;

/// Shared application state.
#[derive(Debug)]
pub struct App {
    /// The checked configuration.
    pub config: Config,
    /// Encryption keys.
    pub keys: Arc<KeyRing>,
    /// The token vault.
    pub vault: Vault,
    /// The upstream OpenID provider.
    pub upstream: Upstream,
    /// The FABRIC Credential Manager, in a FABRIC deployment.
    pub credmgr: Option<crate::oauth::credmgr::CredMgr>,
    /// What `/metrics` shows.
    pub metrics: Metrics,
    /// The hub's API and users' servers.
    pub hub: HubApi,
    /// Token files written to servers.
    pub deliveries: Deliveries,
    /// The single-flight refresher.
    pub refresher: Refresher,
    /// `/refresh` as users open it (named in every token answer).
    pub reauth_url: String,
    /// The audit log.
    pub audit: crate::audit::Audit,
    /// Slows down clients that fail authentication repeatedly.
    pub limiter: crate::security::FailureLimiter,
    /// tokenhub's own origin (`scheme://host[:port]`), for `Origin` checks.
    pub origin: String,
}

/// What handlers receive.
pub type AppState = Arc<App>;

/// Why the app could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The key list is invalid.
    #[error(transparent)]
    Keys(#[from] crate::vault::crypto::CryptoError),
    /// The database could not be opened.
    #[error(transparent)]
    Store(#[from] crate::vault::store::StoreError),
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    /// The audit log could not be opened.
    #[error("audit log (TOKENHUB_AUDIT_LOG): {0}")]
    Audit(#[from] std::io::Error),
}

/// The HTTP client for talking to the IdP: no redirects (OAuth endpoints must
/// not be followed elsewhere), bounded time.
pub fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(15))
        .user_agent(concat!("tokenhub/", env!("CARGO_PKG_VERSION")))
        .build()
}

impl App {
    /// Opens the vault and prepares the upstream client.
    pub async fn new(config: Config) -> Result<AppState, StartError> {
        Self::with_log(config, None).await
    }

    /// [`App::new`], the audit writing its lines for the normal log into
    /// `log` (the log's own writer) rather than through tracing.
    pub async fn with_log(config: Config, log: Option<crate::audit::LogWriter>) -> Result<AppState, StartError> {
        let keys = Arc::new(KeyRing::parse(config.vault.crypt_key.expose_secret())?);
        let store = Store::open(&config.vault.database_url, true, &config.vault.database).await?;
        let http = http_client()?;
        let upstream = Upstream::new(config.upstream.clone(), http.clone());
        let credmgr = config.fabric.as_ref().map(|f| crate::oauth::credmgr::CredMgr::new(&f.credmgr_url, http.clone()));
        let metrics = Metrics::new();
        let app = Arc::new(App {
            vault: Vault::new(store, keys.clone()),
            keys,
            upstream,
            credmgr,
            hub: HubApi::new(&config.hub, http, metrics.hub_calls.clone()),
            metrics,
            deliveries: Deliveries::default(),
            refresher: Refresher::default(),
            reauth_url: crate::config::join(&config.http.public_url, "/refresh").to_string(),
            audit: crate::audit::Audit::open(&config.log.audit, log)?,
            limiter: Default::default(),
            origin: config.http.public_url.origin().ascii_serialization(),
            config,
        });
        housekeeping(Arc::downgrade(&app));
        Ok(app)
    }

    /// Whether servers get no refresh token (FABRIC custody mode).
    pub fn custody(&self) -> bool {
        self.config.fabric.as_ref().is_some_and(|f| f.custody)
    }

    /// A URL of tokenhub's own, from a path like `/callback`.
    pub fn url(&self, path: &str) -> url::Url {
        crate::config::join(&self.config.http.public_url, path)
    }

    /// Where a user goes to start again: the hub's home (derived from its
    /// OAuth callback, `…/hub/oauth_callback` → `…/hub/`).
    pub fn hub_home(&self) -> String {
        let callback = self.config.hub.redirect_uri.as_str();
        match callback.rsplit_once('/') {
            Some((base, _)) => format!("{base}/"),
            None => callback.to_string(),
        }
    }
}

/// Once a second, lets the caches drop what has expired: opened lineages
/// (decrypted tokens) must leave memory when their second is up, not when
/// the next request happens to touch the cache. Stops with the app.
fn housekeeping(app: std::sync::Weak<App>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Some(app) = app.upgrade() else { return };
            app.vault.sweep();
            app.hub.sweep();
            app.refresher.sweep();
            app.limiter.sweep();
        }
    });
}
