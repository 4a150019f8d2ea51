//! Narrower tokens held for a lineage: an access token for fewer scopes or
//! another audience ([`crate::tokens::narrow`] obtains them), sealed like
//! the lineage, one per (user, issuer, request). A row answers only the
//! lineage it was obtained from: the same subject and the same login.

use secrecy::{ExposeSecret, SecretString};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::store::{Store, StoreError};
use super::{Lineage, Vault, VaultError};

/// A narrower token, opened. (No `Debug` of the value: it is a secret.)
#[derive(Debug, Clone)]
pub struct NarrowToken {
    /// The access token.
    pub access_token: SecretString,
    /// Its scopes, sorted and space-separated (as asked; the IdP's answer
    /// when it said).
    pub scopes: String,
    /// Its audience or resource, if one was asked for.
    pub audience: Option<String>,
    /// When it expires (unix seconds), if the IdP said.
    pub expires_at: Option<i64>,
    /// When tokenhub obtained it.
    pub obtained_at: i64,
}

/// What is held for one request, without the value (the token page lists these).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarrowHeld {
    /// The request key (see [`crate::tokens::narrow::NarrowRequest::key`]).
    pub request_key: String,
    /// Scopes, space-separated.
    pub scopes: String,
    /// Audience, if any.
    pub audience: Option<String>,
    /// Expiry, if known.
    pub expires_at: Option<i64>,
    /// When obtained.
    pub obtained_at: i64,
}

/// A narrower token as stored: the value sealed.
#[derive(Debug, Clone)]
pub struct NarrowRow {
    /// User.
    pub username: String,
    /// Issuer.
    pub issuer: String,
    /// Sorted scopes and audience, the row's key.
    pub request_key: String,
    /// Scopes, space-separated.
    pub scopes: String,
    /// Audience, if any.
    pub audience: Option<String>,
    /// The lineage's subject when obtained.
    pub subject: String,
    /// The lineage's login time (its `created_at`) when obtained.
    pub login_at: i64,
    /// The sealed access token.
    pub access_token: Vec<u8>,
    /// Expiry, if known.
    pub expires_at: Option<i64>,
    /// When obtained.
    pub obtained_at: i64,
}

const NARROW_COLUMNS: &str =
    "username, issuer, request_key, scopes, audience, subject, login_at, access_token, expires_at, obtained_at";

fn narrow_from_row(row: &AnyRow) -> Result<NarrowRow, sqlx::Error> {
    Ok(NarrowRow {
        username: row.try_get("username")?,
        issuer: row.try_get("issuer")?,
        request_key: row.try_get("request_key")?,
        scopes: row.try_get("scopes")?,
        audience: row.try_get("audience")?,
        subject: row.try_get("subject")?,
        login_at: row.try_get("login_at")?,
        access_token: row.try_get("access_token")?,
        expires_at: row.try_get("expires_at")?,
        obtained_at: row.try_get("obtained_at")?,
    })
}

/// The associated data of a narrower token: bound to its user, issuer and
/// request, so a value copied to another row does not open.
pub(super) fn narrow_aad(username: &str, issuer: &str, request_key: &str) -> Vec<u8> {
    format!("tokenhub narrow token\0{username}\0{issuer}\0{request_key}").into_bytes()
}

impl Store {
    /// The narrower token held for one request, if any.
    pub async fn narrow_token(&self, username: &str, issuer: &str, request_key: &str) -> Result<Option<NarrowRow>, StoreError> {
        let sql = format!("SELECT {NARROW_COLUMNS} FROM narrow_tokens WHERE username = $1 AND issuer = $2 AND request_key = $3");
        let row = sqlx::query(&sql).bind(username).bind(issuer).bind(request_key).fetch_optional(&self.pool).await?;
        Ok(row.as_ref().map(narrow_from_row).transpose()?)
    }

    /// Stores a narrower token, replacing the one held for the same request.
    pub async fn put_narrow_token(&self, row: &NarrowRow) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO narrow_tokens ({NARROW_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (username, issuer, request_key) DO UPDATE SET scopes = excluded.scopes, \
             audience = excluded.audience, subject = excluded.subject, login_at = excluded.login_at, \
             access_token = excluded.access_token, expires_at = excluded.expires_at, obtained_at = excluded.obtained_at"
        );
        sqlx::query(&sql)
            .bind(&row.username)
            .bind(&row.issuer)
            .bind(&row.request_key)
            .bind(&row.scopes)
            .bind(&row.audience)
            .bind(&row.subject)
            .bind(row.login_at)
            .bind(&row.access_token)
            .bind(row.expires_at)
            .bind(row.obtained_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Every narrower token held for the user at `issuer`, by request key.
    pub async fn narrow_tokens(&self, username: &str, issuer: &str) -> Result<Vec<NarrowRow>, StoreError> {
        let sql = format!("SELECT {NARROW_COLUMNS} FROM narrow_tokens WHERE username = $1 AND issuer = $2 ORDER BY request_key");
        let rows = sqlx::query(&sql).bind(username).bind(issuer).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(narrow_from_row).collect::<Result<_, _>>()?)
    }

    /// Drops the user's narrower tokens at `issuer` (all, or one request's).
    pub async fn delete_narrow_tokens(&self, username: &str, issuer: &str, request_key: Option<&str>) -> Result<u64, StoreError> {
        // Two statements: PostgreSQL cannot type a parameter only tested for NULL.
        let done = match request_key {
            Some(key) => {
                sqlx::query("DELETE FROM narrow_tokens WHERE username = $1 AND issuer = $2 AND request_key = $3")
                    .bind(username)
                    .bind(issuer)
                    .bind(key)
                    .execute(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("DELETE FROM narrow_tokens WHERE username = $1 AND issuer = $2")
                    .bind(username)
                    .bind(issuer)
                    .execute(&self.pool)
                    .await?
            }
        };
        Ok(done.rows_affected())
    }

    /// One page of every narrower token, after `after` (user, issuer, key), for the rekey.
    pub async fn sealed_narrow_tokens(&self, after: &(String, String, String), limit: i64) -> Result<Vec<NarrowRow>, StoreError> {
        let sql = format!(
            "SELECT {NARROW_COLUMNS} FROM narrow_tokens WHERE username > $1 OR (username = $1 AND issuer > $2) \
             OR (username = $1 AND issuer = $2 AND request_key > $3) ORDER BY username, issuer, request_key LIMIT $4"
        );
        let rows = sqlx::query(&sql).bind(&after.0).bind(&after.1).bind(&after.2).bind(limit).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(narrow_from_row).collect::<Result<_, _>>()?)
    }

    /// One page of the users who have servers tokenhub holds the hub token
    /// of (started through the spawn hook), after `after`, whose files may
    /// need a token: no narrower token held yet, or one
    /// with less than `renew` seconds (or half its lifetime) left at `now`.
    pub async fn users_to_renew(&self, now: i64, renew: i64, after: &str, limit: i64) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT s.username FROM server_credentials s WHERE s.username > $1 AND ( \
               NOT EXISTS (SELECT 1 FROM narrow_tokens n WHERE n.username = s.username) \
               OR EXISTS (SELECT 1 FROM narrow_tokens n WHERE n.username = s.username AND n.expires_at IS NOT NULL \
                 AND n.expires_at - $2 <= CASE WHEN (n.expires_at - n.obtained_at) / 2 < $3 \
                   THEN (n.expires_at - n.obtained_at) / 2 ELSE $3 END)) \
             ORDER BY s.username LIMIT $4",
        )
        .bind(after)
        .bind(now)
        .bind(renew)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Replaces a narrower token's sealed value if it is still `old`.
    pub async fn reseal_narrow_token(&self, row: &NarrowRow, old: &[u8], new: &[u8]) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE narrow_tokens SET access_token = $5 \
             WHERE username = $1 AND issuer = $2 AND request_key = $3 AND access_token = $4",
        )
        .bind(&row.username)
        .bind(&row.issuer)
        .bind(&row.request_key)
        .bind(old)
        .bind(new)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

impl Vault {
    /// The narrower token held for `request_key`, if it belongs to this
    /// lineage (same subject, same login); one of an earlier login is dropped.
    pub async fn narrow_token(&self, lineage: &Lineage, request_key: &str) -> Result<Option<NarrowToken>, VaultError> {
        let (username, issuer) = (&lineage.username, &lineage.issuer);
        let Some(row) = self.store.narrow_token(username, issuer, request_key).await? else {
            return Ok(None);
        };
        if row.subject != lineage.subject || row.login_at != lineage.created_at {
            self.store.delete_narrow_tokens(username, issuer, Some(request_key)).await?;
            return Ok(None);
        }
        let sealed = self
            .keys
            .open(&row.access_token, &narrow_aad(username, issuer, request_key))
            .map_err(|source| VaultError::Crypto { username: username.clone(), source })?;
        let access_token = String::from_utf8(sealed)
            .map_err(|_| VaultError::Crypto { username: username.clone(), source: super::crypto::CryptoError::Malformed })?;
        Ok(Some(NarrowToken {
            access_token: access_token.into(),
            scopes: row.scopes,
            audience: row.audience,
            expires_at: row.expires_at,
            obtained_at: row.obtained_at,
        }))
    }

    /// Stores a narrower token obtained from `lineage`, sealed.
    pub async fn save_narrow_token(&self, lineage: &Lineage, request_key: &str, token: &NarrowToken) -> Result<(), VaultError> {
        let (username, issuer) = (&lineage.username, &lineage.issuer);
        let row = NarrowRow {
            username: username.clone(),
            issuer: issuer.clone(),
            request_key: request_key.to_string(),
            scopes: token.scopes.clone(),
            audience: token.audience.clone(),
            subject: lineage.subject.clone(),
            login_at: lineage.created_at,
            access_token: self
                .keys
                .seal(token.access_token.expose_secret().as_bytes(), &narrow_aad(username, issuer, request_key)),
            expires_at: token.expires_at,
            obtained_at: token.obtained_at,
        };
        Ok(self.store.put_narrow_token(&row).await?)
    }

    /// What is held for the user (no values), by request key.
    pub async fn narrow_held(&self, username: &str, issuer: &str) -> Result<Vec<NarrowHeld>, VaultError> {
        let rows = self.store.narrow_tokens(username, issuer).await?;
        Ok(rows
            .into_iter()
            .map(|r| NarrowHeld {
                request_key: r.request_key,
                scopes: r.scopes,
                audience: r.audience,
                expires_at: r.expires_at,
                obtained_at: r.obtained_at,
            })
            .collect())
    }

    /// Drops the user's narrower tokens (all, or one request's); returns how many.
    pub async fn drop_narrow(&self, username: &str, issuer: &str, request_key: Option<&str>) -> Result<u64, VaultError> {
        Ok(self.store.delete_narrow_tokens(username, issuer, request_key).await?)
    }
}

/// A hub service that fetched the user's narrower tokens by delegation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelegationSeen {
    /// The service's name.
    pub service: String,
    /// Its first fetch (unix seconds).
    pub first_at: i64,
    /// Its last fetch.
    pub last_at: i64,
    /// How many fetches.
    pub fetches: i64,
}

impl Store {
    /// Counts one delegated fetch of the user's tokens by `service`.
    pub async fn record_delegation(&self, username: &str, issuer: &str, service: &str, now: i64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO delegations (username, issuer, service, first_at, last_at, fetches) VALUES ($1, $2, $3, $4, $4, 1) \
             ON CONFLICT (username, issuer, service) DO UPDATE SET last_at = excluded.last_at, \
             fetches = delegations.fetches + 1",
        )
        .bind(username)
        .bind(issuer)
        .bind(service)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The services that fetched the user's tokens, most recent first.
    pub async fn delegations(&self, username: &str, issuer: &str) -> Result<Vec<DelegationSeen>, StoreError> {
        let rows = sqlx::query(
            "SELECT service, first_at, last_at, fetches FROM delegations WHERE username = $1 AND issuer = $2 \
             ORDER BY last_at DESC, service",
        )
        .bind(username)
        .bind(issuer)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DelegationSeen {
                    service: r.try_get("service")?,
                    first_at: r.try_get("first_at")?,
                    last_at: r.try_get("last_at")?,
                    fetches: r.try_get("fetches")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }
}
