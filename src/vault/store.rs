//! The database: rows as they are stored, behind one small interface that
//! works on SQLite (the embedded default) and PostgreSQL (several replicas).
//!
//! Queries are written once, in the SQL both backends accept (`$n`
//! placeholders, `ON CONFLICT`, `RETURNING`), and run through sqlx's `Any`
//! driver. Each backend has its own migrations folder. This module knows
//! nothing of encryption: the [`crate::vault`] seals values before they get here.
//!
//! A write with `RETURNING` is always read with `fetch_all`, never
//! `fetch_one`/`fetch_optional`: sqlx's SQLite driver stops stepping a
//! statement once it has the one row asked for, and the error of the
//! statement's implicit COMMIT (a full disk) is then lost while SQLite rolls
//! the write back, so the caller would believe a write that never happened.

use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

use super::predecessors::{Replaced, note_replaced};

/// A database failure. Callers turn it into a 500/503; the text never holds
/// token values because no query binds plaintext secrets.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database URL names a backend tokenhub does not support.
    #[error("unsupported database URL scheme (use sqlite:// or postgres://)")]
    UnsupportedUrl,
    /// Any error from the driver.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A newer tokenhub migrated the database: this one would misread it.
    #[error(
        "the database's schema is at migration {database}, newer than this tokenhub knows ({binary}): \
         run a tokenhub at least as new as the one that migrated it"
    )]
    SchemaNewer {
        /// The newest migration applied to the database.
        database: i64,
        /// The newest migration this build has.
        binary: i64,
    },
    /// The database lacks migrations this build has (for the commands that
    /// do not migrate).
    #[error(
        "the database's schema is at migration {database}, older than this tokenhub's ({binary}): run `tokenhub migrate` first"
    )]
    SchemaOlder {
        /// The newest migration applied to the database (0: none).
        database: i64,
        /// The newest migration this build has.
        binary: i64,
    },
}

/// How the pool connects: its size and timeouts.
#[derive(Debug, Clone)]
pub struct DatabaseOptions {
    /// Connections kept (`None`: 10 for PostgreSQL, 4 for SQLite).
    pub pool_size: Option<u32>,
    /// How long a caller waits for a connection, connecting included:
    /// while the database is away, requests fail after this (503), they do
    /// not pile up.
    pub connect_timeout: Duration,
    /// How long one statement may run (PostgreSQL `statement_timeout`,
    /// SQLite `busy_timeout`).
    pub statement_timeout: Duration,
}

impl Default for DatabaseOptions {
    fn default() -> Self {
        Self { pool_size: None, connect_timeout: Duration::from_secs(5), statement_timeout: Duration::from_secs(10) }
    }
}

/// A column's type, for copying rows between backends.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Text,
    Int,
    Blob,
}

/// A table `import_from` copies: its columns and primary key.
struct Imported {
    name: &'static str,
    columns: &'static [(&'static str, Kind)],
    key: &'static [&'static str],
}

/// What moves from one database to another; hub codes (a minute long) and
/// leases do not.
const IMPORTED: [Imported; 6] = [
    Imported {
        name: "lineages",
        columns: &[
            ("username", Kind::Text),
            ("issuer", Kind::Text),
            ("subject", Kind::Text),
            ("access_token", Kind::Blob),
            ("id_token", Kind::Blob),
            ("refresh_token", Kind::Blob),
            ("claims", Kind::Blob),
            ("scope", Kind::Text),
            ("access_expires_at", Kind::Int),
            ("version", Kind::Int),
            ("status", Kind::Text),
            ("created_at", Kind::Int),
            ("updated_at", Kind::Int),
            ("refreshed_at", Kind::Int),
            ("previous_refresh_hash", Kind::Text),
            ("rotated_at", Kind::Int),
            ("pending_id_token", Kind::Blob),
            ("login_nonce", Kind::Text),
            ("refresh_expires_at", Kind::Int),
            ("dead_reason", Kind::Text),
            ("refresh_hash", Kind::Text),
            ("fabric_token", Kind::Blob),
        ],
        key: &["username", "issuer"],
    },
    Imported {
        name: "name_bindings",
        columns: &[
            ("username", Kind::Text),
            ("issuer", Kind::Text),
            ("subject", Kind::Text),
            ("created_at", Kind::Int),
            ("moved_by", Kind::Text),
        ],
        key: &["username", "issuer"],
    },
    Imported {
        name: "hub_tokens",
        columns: &[
            ("token_hash", Kind::Text),
            ("kind", Kind::Text),
            ("username", Kind::Text),
            ("issuer", Kind::Text),
            ("client_id", Kind::Text),
            ("scope", Kind::Text),
            ("expires_at", Kind::Int),
            ("created_at", Kind::Int),
        ],
        key: &["token_hash"],
    },
    Imported {
        name: "server_credentials",
        columns: &[
            ("username", Kind::Text),
            ("server_name", Kind::Text),
            ("token_hash", Kind::Text),
            ("token", Kind::Blob),
            ("created_at", Kind::Int),
        ],
        key: &["username", "server_name"],
    },
    // The FABRIC broker's digests of replaced refresh tokens: without them
    // a kernel's replaced token would be passed to the CM spent.
    Imported {
        name: "refresh_predecessors",
        columns: &[("refresh_hash", Kind::Text), ("username", Kind::Text), ("issuer", Kind::Text), ("rotated_at", Kind::Int)],
        key: &["refresh_hash"],
    },
    Imported {
        name: "retired_refresh_tokens",
        columns: &[("refresh_hash", Kind::Text), ("username", Kind::Text), ("issuer", Kind::Text), ("retired_at", Kind::Int)],
        key: &["refresh_hash"],
    },
];

/// Which database is behind the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// A lineage row: sealed token values and their plain metadata.
#[derive(Debug, Clone)]
pub struct LineageRow {
    /// JupyterHub user name.
    pub username: String,
    /// Upstream issuer.
    pub issuer: String,
    /// Upstream subject.
    pub subject: String,
    /// Sealed access token.
    pub access_token: Vec<u8>,
    /// Sealed ID token.
    pub id_token: Vec<u8>,
    /// Sealed refresh token, if the IdP issued one.
    pub refresh_token: Option<Vec<u8>>,
    /// Sealed JSON object of the user's claims.
    pub claims: Vec<u8>,
    /// Granted scopes, space-separated.
    pub scope: String,
    /// When the access token expires (unix seconds).
    pub access_expires_at: Option<i64>,
    /// Incremented on every change of the token set.
    pub version: i64,
    /// `active` or `dead` (the upstream grant is gone).
    pub status: String,
    /// When this lineage began (the login).
    pub created_at: i64,
    /// Last change.
    pub updated_at: i64,
    /// Last upstream refresh.
    pub refreshed_at: Option<i64>,
    /// SHA-256 of the refresh token the last refresh rotated away.
    pub previous_refresh_hash: Option<String>,
    /// When that rotation happened.
    pub rotated_at: Option<i64>,
    /// Sealed ID token from a refresh that is not verified yet.
    pub pending_id_token: Option<Vec<u8>>,
    /// The nonce of the login that began the lineage.
    pub login_nonce: Option<String>,
    /// Why the IdP refused the last refresh, when the lineage is dead (set
    /// by [`Store::mark_dead`] only).
    pub dead_reason: Option<String>,
    /// SHA-256 of the current refresh token (the broker finds lineages by it).
    pub refresh_hash: Option<String>,
    /// Sealed answer of the FABRIC Credential Manager's last refresh.
    pub fabric_token: Option<Vec<u8>>,
}

/// An authorization code issued to the hub (stored by hash).
#[derive(Debug, Clone)]
pub struct HubCodeRow {
    /// SHA-256 of the code, hex.
    pub code_hash: String,
    /// The user the code logs in.
    pub username: String,
    /// The lineage's issuer.
    pub issuer: String,
    /// The client it was issued to.
    pub client_id: String,
    /// The redirect URI it was issued for.
    pub redirect_uri: String,
    /// The client's PKCE S256 challenge, if it sent one.
    pub code_challenge: Option<String>,
    /// Scope the client asked for.
    pub scope: String,
    /// Expiry (unix seconds).
    pub expires_at: i64,
}

/// The upstream identity a hub name belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameBinding {
    /// The upstream subject (`sub`).
    pub subject: String,
    /// When the name was bound (first login, or the last move).
    pub created_at: i64,
    /// The operator who moved the name here, if one did.
    pub moved_by: Option<String>,
}

/// Whether a hub token is an access or a refresh token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubTokenKind {
    /// Bearer token for userinfo.
    Access,
    /// Token for the refresh_token grant.
    Refresh,
}

impl HubTokenKind {
    fn as_str(self) -> &'static str {
        match self {
            HubTokenKind::Access => "access",
            HubTokenKind::Refresh => "refresh",
        }
    }
}

/// A token issued to the hub (stored by hash).
#[derive(Debug, Clone)]
pub struct HubTokenRow {
    /// SHA-256 of the token, hex.
    pub token_hash: String,
    /// Access or refresh.
    pub kind: HubTokenKind,
    /// The user.
    pub username: String,
    /// The lineage's issuer.
    pub issuer: String,
    /// The client.
    pub client_id: String,
    /// Granted scope.
    pub scope: String,
    /// Expiry (unix seconds).
    pub expires_at: i64,
    /// Issue time (unix seconds).
    pub created_at: i64,
}

/// The connection pool and the backend behind it.
#[derive(Debug, Clone)]
pub struct Store {
    pub(super) pool: AnyPool,
    backend: Backend,
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

const LINEAGE_COLUMNS: &str = "username, issuer, subject, access_token, id_token, refresh_token, \
     claims, scope, access_expires_at, version, status, created_at, updated_at, refreshed_at, \
     previous_refresh_hash, rotated_at, pending_id_token, login_nonce, refresh_hash, fabric_token";

fn lineage_from_row(row: &AnyRow) -> Result<LineageRow, sqlx::Error> {
    Ok(LineageRow {
        username: row.try_get("username")?,
        issuer: row.try_get("issuer")?,
        subject: row.try_get("subject")?,
        access_token: row.try_get("access_token")?,
        id_token: row.try_get("id_token")?,
        refresh_token: row.try_get("refresh_token")?,
        claims: row.try_get("claims")?,
        scope: row.try_get("scope")?,
        access_expires_at: row.try_get("access_expires_at")?,
        version: row.try_get("version")?,
        status: row.try_get("status")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        refreshed_at: row.try_get("refreshed_at")?,
        previous_refresh_hash: row.try_get("previous_refresh_hash")?,
        rotated_at: row.try_get("rotated_at")?,
        pending_id_token: row.try_get("pending_id_token")?,
        login_nonce: row.try_get("login_nonce")?,
        dead_reason: row.try_get("dead_reason")?,
        refresh_hash: row.try_get("refresh_hash")?,
        fabric_token: row.try_get("fabric_token")?,
    })
}

fn hub_code_from_row(row: &AnyRow) -> Result<HubCodeRow, sqlx::Error> {
    Ok(HubCodeRow {
        code_hash: row.try_get("code_hash")?,
        username: row.try_get("username")?,
        issuer: row.try_get("issuer")?,
        client_id: row.try_get("client_id")?,
        redirect_uri: row.try_get("redirect_uri")?,
        code_challenge: row.try_get("code_challenge")?,
        scope: row.try_get("scope")?,
        expires_at: row.try_get("expires_at")?,
    })
}

fn hub_token_from_row(row: &AnyRow, kind: HubTokenKind) -> Result<HubTokenRow, sqlx::Error> {
    Ok(HubTokenRow {
        token_hash: row.try_get("token_hash")?,
        kind,
        username: row.try_get("username")?,
        issuer: row.try_get("issuer")?,
        client_id: row.try_get("client_id")?,
        scope: row.try_get("scope")?,
        expires_at: row.try_get("expires_at")?,
        created_at: row.try_get("created_at")?,
    })
}

impl Store {
    /// Connects, creating an SQLite file if needed, and runs the migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::open(url, true, &DatabaseOptions::default()).await
    }

    /// Opens the database at `url`; with `migrate`, runs the migrations it
    /// lacks (as [`Store::connect`]), else requires its schema to be this
    /// build's (for the commands that only read or reseal rows).
    pub async fn open(url: &str, migrate: bool, options: &DatabaseOptions) -> Result<Self, StoreError> {
        /// The vault file holds sealed tokens: when the URL lets SQLite
        /// create it (`mode=rwc`) and it is missing, it is created here,
        /// readable and writable by tokenhub's user only (0600). SQLite gives
        /// the `-wal` and `-shm` files it makes beside it the database
        /// file's permissions. An existing file that any user may read is
        /// left as it is, and said.
        fn create_private_file(url: &str) -> std::io::Result<()> {
            use std::str::FromStr as _;
            let (path, query) = url.split_once('?').unwrap_or((url, ""));
            let mode = url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "mode").map(|(_, v)| v.into_owned());
            if path.ends_with(":memory:") || mode.as_deref() == Some("memory") {
                return Ok(());
            }
            // The file SQLite will open, decoded as sqlx decodes it.
            let Ok(options) = sqlx::sqlite::SqliteConnectOptions::from_str(url) else { return Ok(()) };
            let file = options.get_filename();
            if mode.as_deref() == Some("rwc") {
                let mut open = std::fs::OpenOptions::new();
                open.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut open, 0o600);
                match open.open(file) {
                    Ok(_) => tracing::info!(file = %file.display(), "created the vault's SQLite file, mode 0600"),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(std::io::Error::new(e.kind(), format!("creating {}: {e}", file.display()))),
                }
            }
            #[cfg(unix)]
            if let Ok(metadata) = std::fs::metadata(file) {
                use std::os::unix::fs::PermissionsExt as _;
                let mode = metadata.permissions().mode() & 0o777;
                if mode & 0o007 != 0 {
                    tracing::warn!(
                        file = %file.display(),
                        mode = %format!("{mode:o}"),
                        "any user may read the vault's SQLite file: chmod 600 it (and its -wal and -shm files)"
                    );
                }
            }
            Ok(())
        }
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(StoreError::UnsupportedUrl);
        };
        if backend == Backend::Sqlite {
            create_private_file(url).map_err(sqlx::Error::Io)?;
        }
        let statement_ms = options.statement_timeout.as_millis() as u64;
        let pool = AnyPoolOptions::new()
            .max_connections(options.pool_size.unwrap_or(if backend == Backend::Sqlite { 4 } else { 10 }))
            .acquire_timeout(options.connect_timeout)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets readers run beside the writer; wait for a
                        // busy writer rather than fail.
                        sqlx::query("PRAGMA journal_mode = WAL").execute(&mut *conn).await?;
                        sqlx::query(&format!("PRAGMA busy_timeout = {statement_ms}")).execute(&mut *conn).await?;
                    } else {
                        sqlx::query(&format!("SET statement_timeout = {statement_ms}")).execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        let store = Self { pool, backend };
        let (database, binary) = store.schema_versions().await?;
        if database.is_some_and(|d| d > binary) {
            return Err(StoreError::SchemaNewer { database: database.unwrap_or(0), binary });
        }
        if !migrate {
            return match database {
                Some(d) if d == binary => Ok(store),
                _ => Err(StoreError::SchemaOlder { database: database.unwrap_or(0), binary }),
            };
        }
        match backend {
            Backend::Sqlite => SQLITE_MIGRATIONS.run(&store.pool).await?,
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&store.pool).await?,
        }
        Ok(store)
    }

    /// The newest migration applied to the database (`None` before the
    /// first), and the newest this build has.
    pub async fn schema_versions(&self) -> Result<(Option<i64>, i64), StoreError> {
        let migrator = match self.backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        let binary = migrator.iter().map(|m| m.version).max().unwrap_or(0);
        // sqlx's own table; absent until the first migration ran.
        let applied: Result<Option<i64>, sqlx::Error> =
            sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success").fetch_one(&self.pool).await;
        let database = match applied {
            Ok(version) => version,
            Err(sqlx::Error::Database(_)) => None,
            Err(e) => return Err(e.into()),
        };
        Ok((database, binary))
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Stores `row` as the user's lineage for its issuer, replacing any
    /// earlier one. The stored version is one more than the replaced row's
    /// (1 for a first login); it is returned. `replaced` is applied to the
    /// lineage's replaced refresh tokens in the same transaction.
    pub async fn replace_lineage(&self, row: &LineageRow, replaced: Replaced<'_>) -> Result<i64, StoreError> {
        let sql = format!(
            "INSERT INTO lineages ({LINEAGE_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 1, $10, $11, $12, $13, NULL, NULL, NULL, $14, $15, NULL) \
             ON CONFLICT (username, issuer) DO UPDATE SET \
               subject = excluded.subject, access_token = excluded.access_token, \
               id_token = excluded.id_token, refresh_token = excluded.refresh_token, \
               claims = excluded.claims, scope = excluded.scope, \
               access_expires_at = excluded.access_expires_at, \
               version = lineages.version + 1, status = excluded.status, \
               created_at = excluded.created_at, updated_at = excluded.updated_at, \
               refreshed_at = excluded.refreshed_at, previous_refresh_hash = NULL, \
               rotated_at = NULL, lease_holder = NULL, lease_until = NULL, \
               pending_id_token = NULL, login_nonce = excluded.login_nonce, dead_reason = NULL, \
               refresh_hash = excluded.refresh_hash, fabric_token = NULL \
             RETURNING version"
        );
        let mut tx = self.pool.begin().await?;
        let version: i64 = sqlx::query_scalar(&sql)
            .bind(&row.username)
            .bind(&row.issuer)
            .bind(&row.subject)
            .bind(&row.access_token)
            .bind(&row.id_token)
            .bind(&row.refresh_token)
            .bind(&row.claims)
            .bind(&row.scope)
            .bind(row.access_expires_at)
            .bind(&row.status)
            .bind(row.created_at)
            .bind(row.updated_at)
            .bind(row.refreshed_at)
            .bind(&row.login_nonce)
            .bind(&row.refresh_hash)
            .fetch_all(&mut *tx)
            .await?
            .pop()
            .ok_or(sqlx::Error::RowNotFound)?;
        note_replaced(&mut tx, &row.username, &row.issuer, replaced).await?;
        tx.commit().await?;
        Ok(version)
    }

    /// The user's lineage for `issuer`, if there is one.
    pub async fn lineage(&self, username: &str, issuer: &str) -> Result<Option<LineageRow>, StoreError> {
        let sql = format!("SELECT {LINEAGE_COLUMNS}, dead_reason FROM lineages WHERE username = $1 AND issuer = $2");
        let row = sqlx::query(&sql).bind(username).bind(issuer).fetch_optional(&self.pool).await?;
        Ok(row.as_ref().map(lineage_from_row).transpose()?)
    }

    /// Stores the result of a refresh, only if the lineage is still at
    /// `row.version` (a lost race changes nothing and returns `None`). The new
    /// version is returned; the refresh lease is released; `replaced` is
    /// applied to the lineage's replaced refresh tokens in the same transaction.
    pub async fn store_refresh(&self, row: &LineageRow, replaced: Replaced<'_>) -> Result<Option<i64>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let version: Option<i64> = sqlx::query_scalar(
            "UPDATE lineages SET access_token = $3, id_token = $4, refresh_token = $5, scope = $6, \
             access_expires_at = $7, version = version + 1, updated_at = $8, refreshed_at = $9, \
             previous_refresh_hash = $10, rotated_at = $11, pending_id_token = $13, \
             refresh_hash = $14, fabric_token = $15, lease_holder = NULL, lease_until = NULL \
             WHERE username = $1 AND issuer = $2 AND version = $12 AND status = 'active' \
             RETURNING version",
        )
        .bind(&row.username)
        .bind(&row.issuer)
        .bind(&row.access_token)
        .bind(&row.id_token)
        .bind(&row.refresh_token)
        .bind(&row.scope)
        .bind(row.access_expires_at)
        .bind(row.updated_at)
        .bind(row.refreshed_at)
        .bind(&row.previous_refresh_hash)
        .bind(row.rotated_at)
        .bind(row.version)
        .bind(&row.pending_id_token)
        .bind(&row.refresh_hash)
        .bind(&row.fabric_token)
        .fetch_all(&mut *tx)
        .await?
        .pop();
        if version.is_some() {
            note_replaced(&mut tx, &row.username, &row.issuer, replaced).await?;
        }
        tx.commit().await?;
        Ok(version)
    }

    /// Settles a pending ID token, if the lineage is still at `version`:
    /// `Some(sealed)` makes it the lineage's ID token (it was verified),
    /// `None` drops it (it was refused). The version stays: every refresh
    /// bumps it, so version and "a pending token is there" name exactly the
    /// token that was checked. Returns the version, `None` after a lost race.
    pub async fn settle_pending_id_token(
        &self,
        username: &str,
        issuer: &str,
        version: i64,
        verified: Option<Vec<u8>>,
        now: i64,
    ) -> Result<Option<i64>, StoreError> {
        let version: Option<i64> = sqlx::query_scalar(
            "UPDATE lineages SET id_token = COALESCE($4, id_token), pending_id_token = NULL, updated_at = $5 \
             WHERE username = $1 AND issuer = $2 AND version = $3 AND pending_id_token IS NOT NULL \
             RETURNING version",
        )
        .bind(username)
        .bind(issuer)
        .bind(version)
        .bind(verified)
        .bind(now)
        .fetch_all(&self.pool)
        .await?
        .pop();
        Ok(version)
    }

    /// Marks the lineage dead (the IdP said `invalid_grant`), if still at `version`.
    pub async fn mark_dead(
        &self,
        username: &str,
        issuer: &str,
        version: i64,
        now: i64,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE lineages SET status = 'dead', version = version + 1, updated_at = $4, \
             lease_holder = NULL, lease_until = NULL, dead_reason = $5 \
             WHERE username = $1 AND issuer = $2 AND version = $3",
        )
        .bind(username)
        .bind(issuer)
        .bind(version)
        .bind(now)
        .bind(reason)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Takes the refresh lease of a lineage at `version` until `until`,
    /// unless another holder's lease is still running. Works across
    /// replicas. A lineage that moved past `version` (another replica
    /// refreshed it and gave the lease back) is not leased: refreshing it
    /// would send the refresh token that refresh spent.
    pub async fn try_lease(
        &self,
        username: &str,
        issuer: &str,
        version: i64,
        holder: &str,
        now: i64,
        until: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE lineages SET lease_holder = $3, lease_until = $5 \
             WHERE username = $1 AND issuer = $2 AND version = $6 \
               AND (lease_until IS NULL OR lease_until < $4 OR lease_holder = $3)",
        )
        .bind(username)
        .bind(issuer)
        .bind(holder)
        .bind(now)
        .bind(until)
        .bind(version)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives the lease back (after a failed refresh).
    pub async fn release_lease(&self, username: &str, issuer: &str, holder: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE lineages SET lease_holder = NULL, lease_until = NULL \
             WHERE username = $1 AND issuer = $2 AND lease_holder = $3",
        )
        .bind(username)
        .bind(issuer)
        .bind(holder)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Deletes the user's lineage and every token issued to the hub for it.
    pub async fn delete_lineage(&self, username: &str, issuer: &str) -> Result<bool, StoreError> {
        for table in ["hub_tokens", "narrow_tokens", "refresh_predecessors", "retired_refresh_tokens"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE username = $1 AND issuer = $2"))
                .bind(username)
                .bind(issuer)
                .execute(&self.pool)
                .await?;
        }
        let done = sqlx::query("DELETE FROM lineages WHERE username = $1 AND issuer = $2")
            .bind(username)
            .bind(issuer)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Stores a server's sealed hub API token, replacing the one of an
    /// earlier start of that server.
    pub async fn put_server_credential(
        &self,
        username: &str,
        server: &str,
        token_hash: &str,
        sealed: &[u8],
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO server_credentials (username, server_name, token_hash, token, created_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (username, server_name) DO UPDATE SET token_hash = excluded.token_hash, token = excluded.token, \
               created_at = excluded.created_at",
        )
        .bind(username)
        .bind(server)
        .bind(token_hash)
        .bind(sealed)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The sealed hub API token of one of the user's servers, if the spawn
    /// hook handed one over.
    pub async fn server_credential(&self, username: &str, server: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(sqlx::query_scalar("SELECT token FROM server_credentials WHERE username = $1 AND server_name = $2")
            .bind(username)
            .bind(server)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Which of the user's servers a hub token (by its SHA-256) is the own
    /// token of, if any.
    pub async fn server_of_token(&self, username: &str, token_hash: &str) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar("SELECT server_name FROM server_credentials WHERE token_hash = $1 AND username = $2")
            .bind(token_hash)
            .bind(username)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Forgets a server's token (the hub no longer knows it).
    pub async fn delete_server_credential(&self, username: &str, server: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM server_credentials WHERE username = $1 AND server_name = $2")
            .bind(username)
            .bind(server)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The subject a hub name is bound to at `issuer`, if any.
    pub async fn name_binding(&self, username: &str, issuer: &str) -> Result<Option<NameBinding>, StoreError> {
        let row = sqlx::query("SELECT subject, created_at, moved_by FROM name_bindings WHERE username = $1 AND issuer = $2")
            .bind(username)
            .bind(issuer)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row
            .map(|row| -> Result<NameBinding, sqlx::Error> {
                Ok(NameBinding {
                    subject: row.try_get("subject")?,
                    created_at: row.try_get("created_at")?,
                    moved_by: row.try_get("moved_by")?,
                })
            })
            .transpose()?)
    }

    /// Binds a hub name to `subject` unless it is bound already (the first
    /// login wins, on every replica); returns the binding in force.
    pub async fn bind_name(&self, username: &str, issuer: &str, subject: &str, now: i64) -> Result<NameBinding, StoreError> {
        sqlx::query(
            "INSERT INTO name_bindings (username, issuer, subject, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (username, issuer) DO NOTHING",
        )
        .bind(username)
        .bind(issuer)
        .bind(subject)
        .bind(now)
        .execute(&self.pool)
        .await?;
        self.name_binding(username, issuer).await?.ok_or(StoreError::Db(sqlx::Error::RowNotFound))
    }

    /// Moves a hub name to another subject (an operator's decision, named
    /// in `by`), dropping the lineage of the subject it leaves.
    pub async fn move_name(&self, username: &str, issuer: &str, subject: &str, by: &str, now: i64) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO name_bindings (username, issuer, subject, created_at, moved_by) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (username, issuer) DO UPDATE SET subject = excluded.subject, \
               created_at = excluded.created_at, moved_by = excluded.moved_by",
        )
        .bind(username)
        .bind(issuer)
        .bind(subject)
        .bind(now)
        .bind(by)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM hub_tokens WHERE username = $1 AND issuer = $2")
            .bind(username)
            .bind(issuer)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM lineages WHERE username = $1 AND issuer = $2 AND subject <> $3")
            .bind(username)
            .bind(issuer)
            .bind(subject)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Stores a new authorization code.
    pub async fn insert_hub_code(&self, code: &HubCodeRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO hub_codes (code_hash, username, issuer, client_id, redirect_uri, \
             code_challenge, scope, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&code.code_hash)
        .bind(&code.username)
        .bind(&code.issuer)
        .bind(&code.client_id)
        .bind(&code.redirect_uri)
        .bind(&code.code_challenge)
        .bind(&code.scope)
        .bind(code.expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes and returns the code: a code can be taken once, by one caller,
    /// even with several replicas.
    pub async fn take_hub_code(&self, code_hash: &str) -> Result<Option<HubCodeRow>, StoreError> {
        let row = sqlx::query(
            "DELETE FROM hub_codes WHERE code_hash = $1 RETURNING code_hash, username, issuer, \
             client_id, redirect_uri, code_challenge, scope, expires_at",
        )
        .bind(code_hash)
        .fetch_all(&self.pool)
        .await?
        .pop();
        Ok(row.as_ref().map(hub_code_from_row).transpose()?)
    }

    /// Stores a token issued to the hub.
    pub async fn insert_hub_token(&self, token: &HubTokenRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO hub_tokens (token_hash, kind, username, issuer, client_id, scope, \
             expires_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&token.token_hash)
        .bind(token.kind.as_str())
        .bind(&token.username)
        .bind(&token.issuer)
        .bind(&token.client_id)
        .bind(&token.scope)
        .bind(token.expires_at)
        .bind(token.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Looks a hub token up (`take` removes it: refresh tokens are single use).
    pub async fn hub_token(&self, token_hash: &str, kind: HubTokenKind, take: bool) -> Result<Option<HubTokenRow>, StoreError> {
        let verb = if take { "DELETE FROM hub_tokens" } else { "SELECT * FROM hub_tokens" };
        let returning = if take { " RETURNING *" } else { "" };
        let sql = format!("{verb} WHERE token_hash = $1 AND kind = $2{returning}");
        let row = sqlx::query(&sql).bind(token_hash).bind(kind.as_str()).fetch_all(&self.pool).await?.pop();
        Ok(row.as_ref().map(|r| hub_token_from_row(r, kind)).transpose()?)
    }

    /// Deletes codes and hub tokens that expired before `now`.
    pub async fn purge_expired(&self, now: i64) -> Result<u64, StoreError> {
        let codes = sqlx::query("DELETE FROM hub_codes WHERE expires_at < $1").bind(now).execute(&self.pool).await?;
        let tokens = sqlx::query("DELETE FROM hub_tokens WHERE expires_at < $1").bind(now).execute(&self.pool).await?;
        Ok(codes.rows_affected() + tokens.rows_affected())
    }

    /// Active lineages of `issuer` with a user name after `after`, in name
    /// order, at most `limit`: keep-alive pages through them (no token values).
    pub async fn active_lineages(&self, issuer: &str, after: &str, limit: i64) -> Result<Vec<LineageTimes>, StoreError> {
        let sql = format!(
            "SELECT {TIMES_COLUMNS} FROM lineages WHERE issuer = $1 AND status = 'active' AND username > $2 \
             ORDER BY username LIMIT $3"
        );
        let rows = sqlx::query(&sql).bind(issuer).bind(after).bind(limit).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(times_from_row).collect::<Result<_, _>>()?)
    }

    /// One active lineage's times, read now (keep-alive decides on these, so that a
    /// refresh another replica just made is seen).
    pub async fn active_lineage_times(&self, username: &str, issuer: &str) -> Result<Option<LineageTimes>, StoreError> {
        let sql = format!("SELECT {TIMES_COLUMNS} FROM lineages WHERE username = $1 AND issuer = $2 AND status = 'active'");
        let row = sqlx::query(&sql).bind(username).bind(issuer).fetch_optional(&self.pool).await?;
        Ok(row.as_ref().map(times_from_row).transpose()?)
    }

    /// How many lineages each status (`active`, `dead`) holds, over all
    /// issuers: one grouped count for `/metrics`, no token values.
    pub async fn count_lineages_by_status(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM lineages GROUP BY status").fetch_all(&self.pool).await?;
        Ok(rows.iter().map(|row| Ok((row.try_get("status")?, row.try_get("n")?))).collect::<Result<_, sqlx::Error>>()?)
    }

    /// Records when the refresh token of the lineage at `version` dies
    /// (`None`: the IdP did not say). Leaves the version alone.
    pub async fn set_refresh_expiry(
        &self,
        username: &str,
        issuer: &str,
        version: i64,
        at: Option<i64>,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE lineages SET refresh_expires_at = $4 WHERE username = $1 AND issuer = $2 AND version = $3")
            .bind(username)
            .bind(issuer)
            .bind(version)
            .bind(at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// What keep-alive reads of a lineage: its times, never its tokens.
#[derive(Debug, Clone)]
pub struct LineageTimes {
    /// JupyterHub user name.
    pub username: String,
    /// The lineage's version.
    pub version: i64,
    /// Whether it holds a refresh token at all.
    pub has_refresh_token: bool,
    /// Login time.
    pub created_at: i64,
    /// Last upstream refresh.
    pub refreshed_at: Option<i64>,
    /// When the access token expires.
    pub access_expires_at: Option<i64>,
    /// When the refresh token dies unused, if the IdP said.
    pub refresh_expires_at: Option<i64>,
}

const TIMES_COLUMNS: &str = "username, version, refresh_token IS NOT NULL AS has_refresh, created_at, \
     refreshed_at, access_expires_at, refresh_expires_at";

fn times_from_row(row: &AnyRow) -> Result<LineageTimes, sqlx::Error> {
    // SQLite answers the boolean as an integer, PostgreSQL as a boolean.
    let has_refresh_token = match row.try_get::<bool, _>("has_refresh") {
        Ok(b) => b,
        Err(_) => row.try_get::<i64, _>("has_refresh")? != 0,
    };
    Ok(LineageTimes {
        username: row.try_get("username")?,
        version: row.try_get("version")?,
        has_refresh_token,
        created_at: row.try_get("created_at")?,
        refreshed_at: row.try_get("refreshed_at")?,
        access_expires_at: row.try_get("access_expires_at")?,
        refresh_expires_at: row.try_get("refresh_expires_at")?,
    })
}

/// Which lineages the operator's listing asks for (see [`Store::list_lineages`]).
#[derive(Debug, Clone, Default)]
pub struct LineageFilter {
    /// `Some("active")` or `Some("dead")`; `None` for both.
    pub status: Option<String>,
    /// Only users whose name starts with this.
    pub user_prefix: Option<String>,
}

/// The order of the operator's listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LineageSort {
    /// By user name.
    #[default]
    User,
    /// By the last upstream refresh (never-refreshed last).
    LastRefresh,
    /// By the access token's expiry (unknown last).
    AccessExpires,
}

/// One lineage as the operator sees it: the plain columns only. The sealed
/// token values are never selected, so listing 10,000 users opens nothing.
#[derive(Debug, Clone)]
pub struct LineageSummary {
    /// JupyterHub user name.
    pub username: String,
    /// Upstream issuer.
    pub issuer: String,
    /// Upstream subject.
    pub subject: String,
    /// `active` or `dead`.
    pub status: String,
    /// Whether a refresh token is held.
    pub has_refresh_token: bool,
    /// Granted scopes, space-separated.
    pub scope: String,
    /// When the access token expires.
    pub access_expires_at: Option<i64>,
    /// When the refresh token dies unused, if the IdP said.
    pub refresh_expires_at: Option<i64>,
    /// Last upstream refresh.
    pub refreshed_at: Option<i64>,
    /// Lineage version.
    pub version: i64,
    /// Login time.
    pub created_at: i64,
    /// Last change.
    pub updated_at: i64,
    /// Why the IdP refused the last refresh, when dead.
    pub dead_reason: Option<String>,
}

const SUMMARY_COLUMNS: &str = "username, issuer, subject, status, refresh_token IS NOT NULL AS has_refresh, scope, \
     access_expires_at, refresh_expires_at, refreshed_at, version, created_at, updated_at, dead_reason";

fn summary_from_row(row: &AnyRow) -> Result<LineageSummary, sqlx::Error> {
    let has_refresh_token = match row.try_get::<bool, _>("has_refresh") {
        Ok(b) => b,
        Err(_) => row.try_get::<i64, _>("has_refresh")? != 0,
    };
    Ok(LineageSummary {
        username: row.try_get("username")?,
        issuer: row.try_get("issuer")?,
        subject: row.try_get("subject")?,
        status: row.try_get("status")?,
        has_refresh_token,
        scope: row.try_get("scope")?,
        access_expires_at: row.try_get("access_expires_at")?,
        refresh_expires_at: row.try_get("refresh_expires_at")?,
        refreshed_at: row.try_get("refreshed_at")?,
        version: row.try_get("version")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        dead_reason: row.try_get("dead_reason")?,
    })
}

impl LineageFilter {
    /// The WHERE clause with `$1`/`$2` placeholders, and its values. Both
    /// conditions are always present (a NULL value switches one off), so the
    /// placeholders are the same for every filter.
    const WHERE: &'static str = "WHERE ($1 = '' OR status = $1) \
         AND ($2 = '' OR substr(username, 1, length($2)) = $2)";

    fn values(&self) -> (String, String) {
        (self.status.clone().unwrap_or_default(), self.user_prefix.clone().unwrap_or_default())
    }
}

impl Store {
    /// Copies every lineage, hub token, server token, name binding and the
    /// broker's refresh-token digests of `source` into this database, as stored (sealed values stay sealed:
    /// they are bound to user and issuer, not to a database), in batches; a
    /// row already here is kept. Leases are not copied. Returns the rows
    /// copied per table. For `tokenhub import-sqlite`.
    pub async fn import_from(&self, source: &Store) -> Result<Vec<(&'static str, u64)>, StoreError> {
        let mut copied = Vec::new();
        for table in IMPORTED {
            let columns: Vec<&str> = table.columns.iter().map(|(name, _)| *name).collect();
            let (list, order) = (columns.join(", "), table.key.join(", "));
            let placeholders: Vec<String> = (1..=columns.len()).map(|i| format!("${i}")).collect();
            let insert = format!(
                "INSERT INTO {} ({list}) VALUES ({}) ON CONFLICT ({order}) DO NOTHING",
                table.name,
                placeholders.join(", ")
            );
            let mut n = 0;
            let mut offset = 0i64;
            loop {
                let select = format!("SELECT {list} FROM {} ORDER BY {order} LIMIT 500 OFFSET $1", table.name);
                let rows = sqlx::query(&select).bind(offset).fetch_all(&source.pool).await?;
                let mut tx = self.pool.begin().await?;
                for row in &rows {
                    let mut query = sqlx::query(&insert);
                    for (i, (_, kind)) in table.columns.iter().enumerate() {
                        query = match kind {
                            Kind::Text => query.bind(row.try_get::<Option<String>, _>(i)?),
                            Kind::Int => query.bind(row.try_get::<Option<i64>, _>(i)?),
                            Kind::Blob => query.bind(row.try_get::<Option<Vec<u8>>, _>(i)?),
                        };
                    }
                    n += query.execute(&mut *tx).await?.rows_affected();
                }
                tx.commit().await?;
                if rows.len() < 500 {
                    break;
                }
                offset += 500;
            }
            copied.push((table.name, n));
        }
        Ok(copied)
    }

    /// One page of lineage rows as stored (sealed), after `(username,
    /// issuer)` in that order; for `tokenhub rekey` and `tokenhub keys`.
    pub async fn sealed_lineages(&self, after: &(String, String), limit: i64) -> Result<Vec<LineageRow>, StoreError> {
        let sql = format!(
            "SELECT {LINEAGE_COLUMNS}, dead_reason FROM lineages \
             WHERE username > $1 OR (username = $1 AND issuer > $2) ORDER BY username, issuer LIMIT $3"
        );
        let rows = sqlx::query(&sql).bind(&after.0).bind(&after.1).bind(limit).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(lineage_from_row).collect::<Result<_, _>>()?)
    }

    /// Replaces a lineage's sealed values with the same values sealed
    /// again, if the lineage is still at `row.version` (the version is
    /// kept: nothing in the tokens changed). False when it moved on.
    pub async fn reseal_lineage(&self, row: &LineageRow) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE lineages SET access_token = $4, id_token = $5, refresh_token = $6, claims = $7, pending_id_token = $8, \
             fabric_token = $9 WHERE username = $1 AND issuer = $2 AND version = $3",
        )
        .bind(&row.username)
        .bind(&row.issuer)
        .bind(row.version)
        .bind(&row.access_token)
        .bind(&row.id_token)
        .bind(&row.refresh_token)
        .bind(&row.claims)
        .bind(&row.pending_id_token)
        .bind(&row.fabric_token)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// One page of servers' sealed hub tokens `(user, server, sealed)`,
    /// after `(user, server)`.
    pub async fn sealed_server_credentials(
        &self,
        after: &(String, String),
        limit: i64,
    ) -> Result<Vec<(String, String, Vec<u8>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT username, server_name, token FROM server_credentials \
             WHERE username > $1 OR (username = $1 AND server_name > $2) ORDER BY username, server_name LIMIT $3",
        )
        .bind(&after.0)
        .bind(&after.1)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("username")?, r.try_get("server_name")?, r.try_get("token")?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Replaces a server's sealed token with `new` if it still is `old`.
    pub async fn reseal_server_credential(
        &self,
        username: &str,
        server: &str,
        old: &[u8],
        new: &[u8],
    ) -> Result<bool, StoreError> {
        let done =
            sqlx::query("UPDATE server_credentials SET token = $4 WHERE username = $1 AND server_name = $2 AND token = $3")
                .bind(username)
                .bind(server)
                .bind(old)
                .bind(new)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    /// One page of every user's lineages for the operator, with the number
    /// matching the filter. Paged in the database (LIMIT/OFFSET, ties broken
    /// by user and issuer so pages neither overlap nor skip).
    pub async fn list_lineages(
        &self,
        filter: &LineageFilter,
        sort: LineageSort,
        descending: bool,
        limit: i64,
        offset: i64,
    ) -> Result<(Vec<LineageSummary>, i64), StoreError> {
        let direction = if descending { "DESC" } else { "ASC" };
        // Unknown times sort last either way: `(x IS NULL)` first is the
        // same on SQLite and PostgreSQL, whose NULL orders differ.
        let order = match sort {
            LineageSort::User => format!("username {direction}, issuer {direction}"),
            LineageSort::LastRefresh => {
                format!("(refreshed_at IS NULL), refreshed_at {direction}, username, issuer")
            }
            LineageSort::AccessExpires => {
                format!("(access_expires_at IS NULL), access_expires_at {direction}, username, issuer")
            }
        };
        let (status, prefix) = filter.values();
        let sql = format!("SELECT {SUMMARY_COLUMNS} FROM lineages {} ORDER BY {order} LIMIT $3 OFFSET $4", LineageFilter::WHERE);
        let rows = sqlx::query(&sql).bind(&status).bind(&prefix).bind(limit).bind(offset).fetch_all(&self.pool).await?;
        let count_sql = format!("SELECT COUNT(*) AS n FROM lineages {}", LineageFilter::WHERE);
        let total: i64 = sqlx::query_scalar(&count_sql).bind(&status).bind(&prefix).fetch_one(&self.pool).await?;
        Ok((rows.iter().map(summary_from_row).collect::<Result<_, _>>()?, total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `import_from` copies every column of the tables it moves (but the
    /// refresh lease): a migration that adds a column must add it there too.
    #[tokio::test]
    async fn the_import_names_every_column_of_its_tables() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(&format!("sqlite://{}?mode=rwc", dir.path().join("s.sqlite").display())).await.unwrap();
        for table in &IMPORTED {
            let rows = sqlx::query(&format!("SELECT name FROM pragma_table_info('{}')", table.name))
                .fetch_all(&store.pool)
                .await
                .unwrap();
            let mut columns: Vec<String> = rows.iter().map(|r| r.try_get("name").unwrap()).collect();
            columns.retain(|c| !c.starts_with("lease_"));
            columns.sort();
            let mut imported: Vec<String> = table.columns.iter().map(|(name, _)| name.to_string()).collect();
            imported.sort();
            assert_eq!(imported, columns, "{}", table.name);
        }
    }
}
