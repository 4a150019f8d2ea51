//! The digests of the refresh tokens a lineage replaced (the FABRIC
//! broker's grace, [`super::fabric`]), as written together with the
//! lineage itself: one transaction for both, so that a lookup never finds
//! a token neither current nor replaced.
//!
//! Two sets: the newest [`PREDECESSORS_KEPT`] replaced tokens, which the
//! broker answers with the current tokens (within the grace period); and
//! older ones, retired, which it refuses instead of passing them to the
//! Credential Manager (an identity provider that sees a spent refresh
//! token may end the whole login): the newest [`RETIRED_KEPT`] of a
//! lineage, for [`RETIRED_FOR`] seconds.

/// Replaced refresh tokens remembered per lineage, newest first: a kernel
/// or a retry holding one of them is answered with the current tokens
/// (while the age setting allows).
pub const PREDECESSORS_KEPT: i64 = 16;

/// Retired refresh tokens remembered per lineage (refused, never passed on).
pub const RETIRED_KEPT: i64 = 256;

/// How long a retired refresh token is remembered, in seconds (30 days).
pub const RETIRED_FOR: i64 = 30 * 24 * 3600;

/// What a write of a lineage does to the refresh tokens it replaced. It
/// happens in the write's own transaction: a broker lookup in between must
/// find a token either as the current one or as replaced, never as neither
/// (it would be passed to the CM, and a rotating IdP ends the whole grant
/// when it sees a spent token); and a login of another subject must never
/// leave the previous person's tokens pointing at the new lineage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replaced<'a> {
    /// Nothing changes.
    Keep,
    /// The token with this digest was replaced at `at`: kept, with the
    /// newest [`PREDECESSORS_KEPT`] of the lineage.
    Add {
        /// The replaced token's digest.
        hash: &'a str,
        /// When (unix seconds).
        at: i64,
    },
    /// The lineage now belongs to another subject: its replaced tokens,
    /// answered or retired, are forgotten.
    Forget,
}

/// Applies `replaced` to the lineage's replaced tokens, on the write's connection.
pub(super) async fn note_replaced(
    conn: &mut sqlx::AnyConnection,
    username: &str,
    issuer: &str,
    replaced: Replaced<'_>,
) -> Result<(), sqlx::Error> {
    match replaced {
        Replaced::Keep => {}
        Replaced::Forget => {
            for table in ["refresh_predecessors", "retired_refresh_tokens"] {
                sqlx::query(&format!("DELETE FROM {table} WHERE username = $1 AND issuer = $2"))
                    .bind(username)
                    .bind(issuer)
                    .execute(&mut *conn)
                    .await?;
            }
        }
        Replaced::Add { hash, at } => {
            sqlx::query(
                "INSERT INTO refresh_predecessors (refresh_hash, username, issuer, rotated_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (refresh_hash) DO UPDATE SET username = excluded.username, issuer = excluded.issuer, \
                 rotated_at = excluded.rotated_at",
            )
            .bind(hash)
            .bind(username)
            .bind(issuer)
            .bind(at)
            .execute(&mut *conn)
            .await?;
            // Those beyond the newest few retire.
            let beyond: Vec<String> = sqlx::query_scalar(
                "DELETE FROM refresh_predecessors WHERE username = $1 AND issuer = $2 AND refresh_hash NOT IN \
                 (SELECT refresh_hash FROM refresh_predecessors WHERE username = $1 AND issuer = $2 \
                  ORDER BY rotated_at DESC LIMIT $3) RETURNING refresh_hash",
            )
            .bind(username)
            .bind(issuer)
            .bind(PREDECESSORS_KEPT)
            .fetch_all(&mut *conn)
            .await?;
            for retired in &beyond {
                sqlx::query(
                    "INSERT INTO retired_refresh_tokens (refresh_hash, username, issuer, retired_at) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (refresh_hash) DO NOTHING",
                )
                .bind(retired)
                .bind(username)
                .bind(issuer)
                .bind(at)
                .execute(&mut *conn)
                .await?;
            }
            if !beyond.is_empty() {
                sqlx::query(
                    "DELETE FROM retired_refresh_tokens WHERE username = $1 AND issuer = $2 AND refresh_hash NOT IN \
                     (SELECT refresh_hash FROM retired_refresh_tokens WHERE username = $1 AND issuer = $2 \
                      ORDER BY retired_at DESC, refresh_hash DESC LIMIT $3)",
                )
                .bind(username)
                .bind(issuer)
                .bind(RETIRED_KEPT)
                .execute(&mut *conn)
                .await?;
            }
        }
    }
    Ok(())
}
