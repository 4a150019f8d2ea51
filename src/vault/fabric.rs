//! What the FABRIC broker ([`crate::fabric`]) keeps in the vault: the
//! Credential Manager's last answer for a lineage (sealed in the lineage's
//! row, [`FabricToken`]), and the digests of refresh tokens, current and
//! recently replaced, by which a refresh token a client presents is found
//! without any other credential.

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sqlx::Row;
use sqlx::any::AnyRow;

pub use super::predecessors::{PREDECESSORS_KEPT, RETIRED_FOR};
use super::store::{Store, StoreError};
use super::{Vault, VaultError};

/// The Credential Manager's answer to a refresh, opened: its token object
/// (`id_token` is the FABRIC JWT) and what it was asked for.
#[derive(Clone)]
pub struct FabricToken {
    /// `project_id` of the request, if it named one.
    pub project_id: Option<String>,
    /// `project_name` of the request, if it named one.
    pub project_name: Option<String>,
    /// `scope` of the request.
    pub scope: String,
    /// When the FABRIC JWT expires (unix seconds).
    pub expires_at: i64,
    /// The CM's token object as JSON text (`id_token`, `refresh_token`,
    /// `created_at`, `expires_at`, `state`, …).
    pub token: SecretString,
}

impl std::fmt::Debug for FabricToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FabricToken")
            .field("project_id", &self.project_id)
            .field("project_name", &self.project_name)
            .field("scope", &self.scope)
            .field("expires_at", &self.expires_at)
            .field("token", &"[redacted]")
            .finish()
    }
}

#[derive(Serialize, Deserialize)]
struct Sealed {
    project_id: Option<String>,
    project_name: Option<String>,
    scope: String,
    expires_at: i64,
    token: Map<String, Value>,
}

impl FabricToken {
    /// Whether it answers a request for this project and scope. A project
    /// is named by its id, or by its name when no id is given (FABlib sends
    /// both once it has read them from a token).
    pub fn answers(&self, project_id: Option<&str>, project_name: Option<&str>, scope: &str) -> bool {
        let asked = project_id.or(project_name);
        let held = self.project_id.as_deref().or(self.project_name.as_deref());
        asked == held && self.scope == scope
    }

    /// The token object, with the lineage's current refresh token (a
    /// refresh tokenhub made elsewhere may have rotated it since), or
    /// without one.
    pub fn object(&self, refresh_token: Option<&SecretString>) -> Map<String, Value> {
        let mut object: Map<String, Value> = serde_json::from_str(self.token.expose_secret()).unwrap_or_default();
        match refresh_token {
            Some(t) => object.insert("refresh_token".into(), Value::String(t.expose_secret().to_string())),
            None => object.remove("refresh_token"),
        };
        object
    }

    /// One text field of the token object (`id_token`, `refresh_token`, …).
    pub fn field(&self, name: &str) -> Option<String> {
        let object: Map<String, Value> = serde_json::from_str(self.token.expose_secret()).ok()?;
        object.get(name).and_then(Value::as_str).map(str::to_string)
    }

    pub(super) fn to_plain(&self) -> Vec<u8> {
        let sealed = Sealed {
            project_id: self.project_id.clone(),
            project_name: self.project_name.clone(),
            scope: self.scope.clone(),
            expires_at: self.expires_at,
            token: serde_json::from_str(self.token.expose_secret()).unwrap_or_default(),
        };
        serde_json::to_vec(&sealed).expect("a JSON object serializes")
    }

    pub(super) fn from_plain(plain: &[u8]) -> Option<FabricToken> {
        let sealed: Sealed = serde_json::from_slice(plain).ok()?;
        Some(FabricToken {
            project_id: sealed.project_id,
            project_name: sealed.project_name,
            scope: sealed.scope,
            expires_at: sealed.expires_at,
            token: serde_json::to_string(&sealed.token).ok()?.into(),
        })
    }
}

/// Whose refresh token a digest is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshOwner {
    /// The lineage's user.
    pub username: String,
    /// Its issuer.
    pub issuer: String,
    /// `None` for the lineage's current refresh token; for one it replaced,
    /// when that happened.
    pub replaced_at: Option<i64>,
    /// A token the lineage replaced longer ago than the broker answers for
    /// (past the grace period, or out of the newest few): spent, refused.
    pub retired: bool,
}

impl Store {
    /// The lineage whose current refresh token, or one it replaced, has
    /// this digest; one replaced before `replaced_since`, or retired, is
    /// said to be retired.
    pub async fn refresh_owner(&self, hash: &str, replaced_since: i64) -> Result<Option<RefreshOwner>, StoreError> {
        let owner = |row: &AnyRow, replaced_at: Option<i64>, retired: bool| -> Result<RefreshOwner, sqlx::Error> {
            Ok(RefreshOwner { username: row.try_get(0)?, issuer: row.try_get(1)?, replaced_at, retired })
        };
        // In the order a token moves (each move is one transaction with
        // the write that makes it), so a token is never missed between two.
        let current =
            sqlx::query("SELECT username, issuer FROM lineages WHERE refresh_hash = $1").bind(hash).fetch_all(&self.pool).await?;
        if let Some(row) = current.first() {
            return Ok(Some(owner(row, None, false)?));
        }
        let replaced = sqlx::query("SELECT username, issuer, rotated_at FROM refresh_predecessors WHERE refresh_hash = $1")
            .bind(hash)
            .fetch_all(&self.pool)
            .await?;
        if let Some(row) = replaced.first() {
            let at: i64 = row.try_get(2)?;
            return Ok(Some(owner(row, Some(at), at < replaced_since)?));
        }
        let retired = sqlx::query("SELECT username, issuer, retired_at FROM retired_refresh_tokens WHERE refresh_hash = $1")
            .bind(hash)
            .fetch_all(&self.pool)
            .await?;
        Ok(match retired.first() {
            Some(row) => Some(owner(row, Some(row.try_get(2)?), true)?),
            None => None,
        })
    }

    /// Retires replaced refresh tokens older than `before` and forgets
    /// retired ones older than [`RETIRED_FOR`]; returns how many were forgotten.
    pub async fn purge_predecessors(&self, before: i64, now: i64) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO retired_refresh_tokens (refresh_hash, username, issuer, retired_at) \
             SELECT refresh_hash, username, issuer, CAST($2 AS BIGINT) FROM refresh_predecessors WHERE rotated_at < $1 \
             ON CONFLICT (refresh_hash) DO NOTHING",
        )
        .bind(before)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM refresh_predecessors WHERE rotated_at < $1").bind(before).execute(&mut *tx).await?;
        let forgotten = sqlx::query("DELETE FROM retired_refresh_tokens WHERE retired_at < $1")
            .bind(now - RETIRED_FOR)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(forgotten)
    }

    /// Lineages with a refresh token but no digest of it (written by a
    /// version before the broker), at most `limit`.
    async fn lineages_without_refresh_hash(&self, limit: i64) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT username, issuer FROM lineages WHERE refresh_hash IS NULL AND refresh_token IS NOT NULL LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect::<Result<_, sqlx::Error>>().map_err(Into::into)
    }

    async fn set_refresh_hash(&self, username: &str, issuer: &str, version: i64, hash: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE lineages SET refresh_hash = $4 WHERE username = $1 AND issuer = $2 AND version = $3")
            .bind(username)
            .bind(issuer)
            .bind(version)
            .bind(hash)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }
}

impl Vault {
    /// Fills in the refresh-token digest of lineages stored before the
    /// broker (run at start when the broker is on); returns how many.
    /// A lineage that cannot be opened is skipped (and logged).
    pub async fn backfill_refresh_hashes(&self) -> Result<u64, VaultError> {
        let mut done = 0;
        let mut skipped = std::collections::HashSet::new();
        loop {
            let page = self.store.lineages_without_refresh_hash(200 + skipped.len() as i64).await?;
            let todo: Vec<_> = page.into_iter().filter(|k| !skipped.contains(k)).collect();
            if todo.is_empty() {
                return Ok(done);
            }
            for (username, issuer) in todo {
                let opened = self.load(&username, &issuer).await;
                let hashed = match &opened {
                    Ok(Some(l)) => {
                        l.tokens.refresh_token.as_ref().map(|t| (l.version, super::crypto::digest_hex(t.expose_secret())))
                    }
                    _ => None,
                };
                match hashed {
                    Some((version, hash)) if self.store.set_refresh_hash(&username, &issuer, version, &hash).await? => done += 1,
                    // Moved meanwhile: its next write set the digest, or the next pass does.
                    Some(_) => {}
                    None => {
                        if let Err(e) = opened {
                            tracing::warn!(user = %username, error = %e, "a lineage without a refresh-token digest does not open; skipped");
                        }
                        skipped.insert((username, issuer));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(project_id: Option<&str>, project_name: Option<&str>) -> FabricToken {
        FabricToken {
            project_id: project_id.map(str::to_string),
            project_name: project_name.map(str::to_string),
            scope: "all".into(),
            expires_at: 0,
            token: r#"{"id_token":"j","refresh_token":"old","state":"Valid"}"#.to_string().into(),
        }
    }

    #[test]
    fn a_project_is_named_by_its_id_else_its_name() {
        let by_id = held(Some("p-1"), None);
        assert!(by_id.answers(Some("p-1"), None, "all"));
        assert!(by_id.answers(Some("p-1"), Some("My project"), "all"), "FABlib adds the name it read");
        assert!(!by_id.answers(Some("p-2"), None, "all"));
        assert!(!by_id.answers(Some("p-1"), None, "compute"));
        let by_name = held(None, Some("My project"));
        assert!(by_name.answers(None, Some("My project"), "all"));
        assert!(!by_name.answers(None, None, "all"));
    }

    #[test]
    fn the_object_carries_the_current_refresh_token_or_none() {
        let token = held(None, None);
        let current: SecretString = "new".to_string().into();
        assert_eq!(token.object(Some(&current))["refresh_token"], "new");
        assert!(!token.object(None).contains_key("refresh_token"));
        let back = FabricToken::from_plain(&token.to_plain()).unwrap();
        assert_eq!(back.field("id_token").as_deref(), Some("j"));
        assert!(!format!("{back:?}").contains("old"));
    }
}
