//! The token vault: a user's current lineage, sealed before it reaches the
//! [`Store`] and opened after it leaves. Associated data binds every sealed
//! value to its user, issuer and field, so a value copied to another row or
//! column does not open.
//!
//! The folder holds what the vault is made of: [`crypto`] (the key list and
//! the sealed envelope) and [`store`] (the rows in SQLite or PostgreSQL).

pub mod crypto;
pub mod fabric;
pub mod narrow;
pub mod predecessors;
pub mod rekey;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};

use crate::time::now;
use crypto::{CryptoError, KeyRing};
use predecessors::Replaced;
use store::{LineageRow, Store, StoreError};

/// The tokens the upstream IdP issued at login or at the last refresh.
#[derive(Debug, Clone)]
pub struct TokenSet {
    /// Access token.
    pub access_token: SecretString,
    /// ID token (a JWT).
    pub id_token: SecretString,
    /// Refresh token, when the IdP issued one.
    pub refresh_token: Option<SecretString>,
    /// When the access token expires (unix seconds), if the IdP said.
    pub access_expires_at: Option<i64>,
    /// Granted scopes, space-separated.
    pub scope: String,
    /// The FABRIC Credential Manager's answer, when the tokens came from a
    /// refresh through it (the access and ID tokens are then its FABRIC JWT).
    pub fabric: Option<fabric::FabricToken>,
}

/// A user's lineage, opened.
#[derive(Debug, Clone)]
pub struct Lineage {
    /// JupyterHub user name.
    pub username: String,
    /// Upstream issuer.
    pub issuer: String,
    /// Upstream subject.
    pub subject: String,
    /// The tokens.
    pub tokens: TokenSet,
    /// Claims from the ID token and userinfo.
    pub claims: Map<String, Value>,
    /// Incremented on every change.
    pub version: i64,
    /// False once the upstream grant is known to be dead.
    pub active: bool,
    /// Start of the lineage (login time).
    pub created_at: i64,
    /// Last change.
    pub updated_at: i64,
    /// Last upstream refresh.
    pub refreshed_at: Option<i64>,
    /// SHA-256 of the refresh token the last refresh rotated away.
    pub previous_refresh_hash: Option<String>,
    /// When that rotation happened.
    pub rotated_at: Option<i64>,
    /// An ID token from a refresh that could not be verified yet: never
    /// handed out until it is (see [`crate::tokens::refresh`]).
    pub pending_id_token: Option<SecretString>,
    /// The nonce of the login that began the lineage.
    pub login_nonce: Option<String>,
    /// Why the IdP refused the last refresh, when the lineage is dead.
    pub dead_reason: Option<String>,
}

/// Why the vault failed.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored value did not open (wrong key list or tampering).
    #[error("stored tokens for user {username:?} do not decrypt: {source}")]
    Crypto {
        /// The row's user.
        username: String,
        /// Why.
        source: CryptoError,
    },
}

/// How long an opened lineage may be served from memory on the hot path.
/// Writes through this vault drop the entry at once; the time bounds how
/// long a change made by another replica takes to be seen.
const CACHE_TTL: Duration = Duration::from_secs(1);
/// Most opened lineages held at once.
const CACHE_MAX: u64 = 10_000;

/// A cached lineage's key: user and issuer in one string (one allocation
/// per look-up on the hot path, where a pair costs two).
type CacheKey = String;

/// Sealed storage of lineages, with a short-lived cache of opened ones
/// (bounded in time and size; expired entries are dropped by [`Vault::sweep`]
/// every second, so decrypted tokens do not linger in memory).
#[derive(Debug, Clone)]
pub struct Vault {
    store: Store,
    keys: Arc<KeyRing>,
    cache: moka::sync::Cache<CacheKey, Arc<Lineage>>,
}

fn aad(username: &str, issuer: &str, field: &str) -> Vec<u8> {
    format!("tokenhub lineage\0{username}\0{issuer}\0{field}").into_bytes()
}

fn server_aad(username: &str, server: &str) -> Vec<u8> {
    format!("tokenhub server credential\0{username}\0{server}").into_bytes()
}

impl Vault {
    /// A vault over `store`, sealing with `keys`.
    pub fn new(store: Store, keys: Arc<KeyRing>) -> Self {
        let cache = moka::sync::Cache::builder().max_capacity(CACHE_MAX).time_to_live(CACHE_TTL).build();
        Self { store, keys, cache }
    }

    fn key(username: &str, issuer: &str) -> CacheKey {
        let mut key = String::with_capacity(username.len() + issuer.len() + 1);
        key.push_str(username);
        key.push('\0');
        key.push_str(issuer);
        key
    }

    /// Drops the cached copy of a lineage (after any write to it).
    pub fn forget(&self, username: &str, issuer: &str) {
        self.cache.invalidate(&Self::key(username, issuer));
    }

    /// Drops expired opened lineages now.
    pub fn sweep(&self) {
        self.cache.run_pending_tasks();
    }

    /// How many opened lineages are held (after a [`Vault::sweep`]).
    pub fn cached_count(&self) -> u64 {
        self.cache.entry_count()
    }

    /// The lineage as of at most a second ago: the hot path. Decisions that
    /// must see the latest version (refreshing, comparing refresh tokens)
    /// use [`Vault::load`].
    pub async fn load_cached(&self, username: &str, issuer: &str) -> Result<Option<Arc<Lineage>>, VaultError> {
        let key = Self::key(username, issuer);
        if let Some(lineage) = self.cache.get(&key) {
            return Ok(Some(lineage));
        }
        let lineage = self.load(username, issuer).await?.map(Arc::new);
        if let Some(lineage) = &lineage {
            self.cache.insert(key, lineage.clone());
        }
        Ok(lineage)
    }

    /// Marks the lineage dead if it is still at `version`, saying why (no
    /// token value may be in `reason`: it is shown).
    pub async fn mark_dead(&self, username: &str, issuer: &str, version: i64, reason: &str) -> Result<bool, VaultError> {
        self.forget(username, issuer);
        Ok(self.store.mark_dead(username, issuer, version, now(), reason).await?)
    }

    /// Deletes the lineage (and the hub's tokens for it).
    pub async fn delete(&self, username: &str, issuer: &str) -> Result<bool, VaultError> {
        self.forget(username, issuer);
        Ok(self.store.delete_lineage(username, issuer).await?)
    }

    /// The underlying store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Stores a new lineage from a login, replacing the user's previous one for
    /// that issuer. Returns its version.
    pub async fn save_login(
        &self,
        username: &str,
        issuer: &str,
        subject: &str,
        tokens: &TokenSet,
        claims: &Map<String, Value>,
        nonce: &str,
    ) -> Result<i64, VaultError> {
        let seal = |field: &str, value: &[u8]| self.keys.seal(value, &aad(username, issuer, field));
        let now = now();
        // The refresh token of the login this one replaces: a kernel still
        // holding it is the same person's (same subject) and may be given
        // the new tokens by the broker for a while; another's is forgotten.
        let replaced = self.store.lineage(username, issuer).await?;
        let row = LineageRow {
            username: username.into(),
            issuer: issuer.into(),
            subject: subject.into(),
            access_token: seal("access_token", tokens.access_token.expose_secret().as_bytes()),
            id_token: seal("id_token", tokens.id_token.expose_secret().as_bytes()),
            refresh_token: tokens.refresh_token.as_ref().map(|t| seal("refresh_token", t.expose_secret().as_bytes())),
            claims: seal("claims", &serde_json::to_vec(claims).expect("a JSON map serializes")),
            scope: tokens.scope.clone(),
            access_expires_at: tokens.access_expires_at,
            version: 1,
            status: "active".into(),
            created_at: now,
            updated_at: now,
            refreshed_at: None,
            previous_refresh_hash: None,
            rotated_at: None,
            pending_id_token: None,
            login_nonce: Some(nonce.to_string()),
            dead_reason: None,
            refresh_hash: tokens.refresh_token.as_ref().map(|t| crypto::digest_hex(t.expose_secret())),
            fabric_token: None,
        };
        let predecessors = match &replaced {
            Some(old) if old.subject != subject => Replaced::Forget,
            Some(old) => old
                .refresh_hash
                .as_deref()
                .filter(|hash| Some(*hash) != row.refresh_hash.as_deref())
                .map_or(Replaced::Keep, |hash| Replaced::Add { hash, at: now }),
            None => Replaced::Keep,
        };
        self.forget(username, issuer);
        let version = self.store.replace_lineage(&row, predecessors).await?;
        self.forget(username, issuer);
        Ok(version)
    }

    /// Stores the tokens a refresh of `lineage` returned, if nobody changed
    /// the lineage meanwhile; returns the stored lineage, or `None` after a
    /// lost race (the caller re-reads). `pending_id_token` is a new ID token
    /// not verified yet; `tokens.id_token` stays the last verified one.
    pub async fn save_refresh(
        &self,
        lineage: &Lineage,
        tokens: &TokenSet,
        pending_id_token: Option<&SecretString>,
    ) -> Result<Option<Lineage>, VaultError> {
        let (username, issuer) = (&lineage.username, &lineage.issuer);
        let seal = |field: &str, value: &str| self.keys.seal(value.as_bytes(), &aad(username, issuer, field));
        let now = now();
        let old_refresh = lineage.tokens.refresh_token.as_ref().map(|t| t.expose_secret().to_string());
        let new_refresh = tokens.refresh_token.as_ref().map(|t| t.expose_secret().to_string());
        let rotated = old_refresh.is_some() && old_refresh != new_refresh;
        let row = LineageRow {
            username: username.clone(),
            issuer: issuer.clone(),
            subject: lineage.subject.clone(),
            access_token: seal("access_token", tokens.access_token.expose_secret()),
            id_token: seal("id_token", tokens.id_token.expose_secret()),
            refresh_token: new_refresh.as_deref().map(|t| seal("refresh_token", t)),
            claims: Vec::new(),
            scope: tokens.scope.clone(),
            access_expires_at: tokens.access_expires_at,
            version: lineage.version,
            status: "active".into(),
            created_at: lineage.created_at,
            updated_at: now,
            // When the access token was issued: a grant that only rotated the
            // refresh token (a narrower token's) keeps it.
            refreshed_at: if tokens.access_token.expose_secret() == lineage.tokens.access_token.expose_secret() {
                lineage.refreshed_at
            } else {
                Some(now)
            },
            previous_refresh_hash: if rotated {
                old_refresh.as_deref().map(crypto::digest_hex)
            } else {
                lineage.previous_refresh_hash.clone()
            },
            rotated_at: if rotated { Some(now) } else { lineage.rotated_at },
            pending_id_token: pending_id_token.map(|t| seal("pending_id_token", t.expose_secret())),
            login_nonce: lineage.login_nonce.clone(),
            dead_reason: None,
            refresh_hash: new_refresh.as_deref().map(crypto::digest_hex),
            fabric_token: tokens.fabric.as_ref().map(|f| self.keys.seal(&f.to_plain(), &aad(username, issuer, "fabric_token"))),
        };
        let old_hash = old_refresh.as_deref().filter(|_| rotated).map(crypto::digest_hex);
        let predecessors = old_hash.as_deref().map_or(Replaced::Keep, |hash| Replaced::Add { hash, at: now });
        self.forget(username, issuer);
        let stored = self.store.store_refresh(&row, predecessors).await?;
        // Also after the write: a reader between the first forget and the
        // commit may have cached the row it replaced.
        self.forget(username, issuer);
        match stored {
            Some(_) => self.load(username, issuer).await,
            None => Ok(None),
        }
    }

    /// Stores when the refresh token of a lineage at `version` dies, from the
    /// IdP's `refresh_expires_in` (`None` clears it). A failure is logged only:
    /// keep-alive then goes by its setting. Login and refresh both record it,
    /// so it lives here rather than in keep-alive, which only reads it.
    pub async fn record_refresh_expiry(&self, username: &str, issuer: &str, version: i64, refresh_expires_in: Option<i64>) {
        let at = refresh_expires_in.map(|secs| now() + secs);
        if let Err(e) = self.store.set_refresh_expiry(username, issuer, version, at).await {
            tracing::warn!(user = %username, error = %e, "the refresh token's lifetime was not stored");
        }
    }

    /// Settles the lineage's pending ID token: `verified` makes it the
    /// lineage's ID token, otherwise it is dropped. `None` after a lost race.
    pub async fn settle_pending_id_token(&self, lineage: &Lineage, verified: bool) -> Result<Option<Lineage>, VaultError> {
        let (username, issuer) = (&lineage.username, &lineage.issuer);
        let sealed = match (&lineage.pending_id_token, verified) {
            (Some(token), true) => Some(self.keys.seal(token.expose_secret().as_bytes(), &aad(username, issuer, "id_token"))),
            _ => None,
        };
        self.forget(username, issuer);
        match self.store.settle_pending_id_token(username, issuer, lineage.version, sealed, now()).await? {
            Some(_) => self.load(username, issuer).await,
            None => Ok(None),
        }
    }

    /// Keeps a server's own hub API token (sealed, bound to the user and the
    /// server), handed over by the spawn hook.
    pub async fn save_server_credential(&self, username: &str, server: &str, token: &SecretString) -> Result<(), VaultError> {
        let sealed = self.keys.seal(token.expose_secret().as_bytes(), &server_aad(username, server));
        let hash = crypto::digest_hex(token.expose_secret());
        Ok(self.store.put_server_credential(username, server, &hash, &sealed, now()).await?)
    }

    /// The hub API token of one of the user's servers, if the spawn hook
    /// handed one over.
    pub async fn server_credential(&self, username: &str, server: &str) -> Result<Option<SecretString>, VaultError> {
        let Some(sealed) = self.store.server_credential(username, server).await? else {
            return Ok(None);
        };
        let crypto = |source| VaultError::Crypto { username: username.to_string(), source };
        let plain = self.keys.open(&sealed, &server_aad(username, server)).map_err(crypto)?;
        Ok(Some(String::from_utf8(plain).map_err(|_| crypto(CryptoError::Malformed))?.into()))
    }

    /// Forgets a server's hub API token.
    pub async fn forget_server_credential(&self, username: &str, server: &str) -> Result<(), VaultError> {
        Ok(self.store.delete_server_credential(username, server).await?)
    }

    /// The user's current lineage for `issuer`, opened.
    pub async fn load(&self, username: &str, issuer: &str) -> Result<Option<Lineage>, VaultError> {
        let Some(row) = self.store.lineage(username, issuer).await? else {
            return Ok(None);
        };
        self.open_row(row).map(Some)
    }

    fn open_row(&self, row: LineageRow) -> Result<Lineage, VaultError> {
        let crypto = |source| VaultError::Crypto { username: row.username.clone(), source };
        let open = |field: &str, sealed: &[u8]| -> Result<String, VaultError> {
            let plain = self.keys.open(sealed, &aad(&row.username, &row.issuer, field)).map_err(crypto)?;
            String::from_utf8(plain).map_err(|_| crypto(CryptoError::Malformed))
        };
        let claims: Map<String, Value> =
            serde_json::from_str(&open("claims", &row.claims)?).map_err(|_| crypto(CryptoError::Malformed))?;
        Ok(Lineage {
            tokens: TokenSet {
                access_token: open("access_token", &row.access_token)?.into(),
                id_token: open("id_token", &row.id_token)?.into(),
                refresh_token: row
                    .refresh_token
                    .as_deref()
                    .map(|t| open("refresh_token", t).map(SecretString::from))
                    .transpose()?,
                access_expires_at: row.access_expires_at,
                scope: row.scope.clone(),
                fabric: match row.fabric_token.as_deref() {
                    Some(sealed) => {
                        let plain = self.keys.open(sealed, &aad(&row.username, &row.issuer, "fabric_token")).map_err(crypto)?;
                        Some(fabric::FabricToken::from_plain(&plain).ok_or_else(|| crypto(CryptoError::Malformed))?)
                    }
                    None => None,
                },
            },
            claims,
            version: row.version,
            active: row.status == "active",
            created_at: row.created_at,
            updated_at: row.updated_at,
            refreshed_at: row.refreshed_at,
            previous_refresh_hash: row.previous_refresh_hash,
            rotated_at: row.rotated_at,
            pending_id_token: row
                .pending_id_token
                .as_deref()
                .map(|t| open("pending_id_token", t).map(SecretString::from))
                .transpose()?,
            login_nonce: row.login_nonce,
            dead_reason: row.dead_reason,
            username: row.username,
            issuer: row.issuer,
            subject: row.subject,
        })
    }
}
