//! The operator's view: every user's lineage, for hub admins, as JSON
//! (`GET /api/v1/admin/lineages`, [`api`]) and as a page with a revoke
//! button per user (`GET /admin`, `POST /admin/revoke`, [`page`]).
//!
//! Who is an operator is the hub's answer, never tokenhub's own list:
//! - the JSON API takes a hub token that may call tokenhub (as
//!   [`crate::auth::caller`] checks) whose `/hub/api/user` answer says
//!   `"admin": true` or lists the custom scope [`crate::hub::ADMIN_SCOPE`];
//! - the page takes the signed-in tokenhub session's user, if the hub says
//!   (`GET /hub/api/users/{name}`) that user is an admin.
//!
//! The listing reads only the plain columns of the vault
//! ([`crate::vault::store::LineageSummary`]): token values are never selected, so
//! neither the JSON nor the page can hold one.

pub mod api;
pub mod names;
pub mod page;

use std::collections::HashMap;

use serde::Serialize;

use crate::config::KeepaliveConfig;
use crate::state::AppState;
use crate::vault::store::{LineageFilter, LineageSort, LineageSummary};

/// Most rows one request may ask for.
pub const MAX_LIMIT: i64 = 500;
/// Rows per page when the request does not say.
pub const DEFAULT_LIMIT: i64 = 50;

/// What a dead lineage died of when no reason was stored (lineages marked
/// dead before reasons were kept). tokenhub marks a lineage dead only when
/// the IdP refuses a refresh (see [`crate::tokens::refresh`]).
pub const DEAD_REASON: &str = "the identity provider refused a refresh (invalid_grant)";

/// A listing request, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// `active`, `dead`, or both.
    pub state: Option<String>,
    /// User-name prefix.
    pub user: Option<String>,
    /// Sort key.
    pub sort: LineageSort,
    /// Descending order.
    pub descending: bool,
    /// Rows per page (1..=[`MAX_LIMIT`]).
    pub limit: i64,
    /// Rows skipped.
    pub offset: i64,
}

impl Listing {
    /// Reads `state`, `user`, `sort`, `order`, `limit` and `offset`; the
    /// error text says which parameter is wrong and what it may be.
    pub fn parse(params: &HashMap<String, String>) -> Result<Self, String> {
        let state = match params.get("state").map(String::as_str) {
            None | Some("") | Some("all") => None,
            Some(s @ ("active" | "dead")) => Some(s.to_string()),
            Some(other) => return Err(format!("unknown state {other:?} (use active, dead or all)")),
        };
        let user = params.get("user").filter(|u| !u.is_empty()).cloned();
        if user.as_ref().is_some_and(|u| u.len() > 255) {
            return Err("user must be at most 255 bytes".into());
        }
        let sort = match params.get("sort").map(String::as_str) {
            None | Some("") | Some("user") => LineageSort::User,
            Some("last_refresh") => LineageSort::LastRefresh,
            Some("access_expires") => LineageSort::AccessExpires,
            Some(other) => return Err(format!("unknown sort {other:?} (use user, last_refresh or access_expires)")),
        };
        let descending = match params.get("order").map(String::as_str) {
            None | Some("") | Some("asc") => false,
            Some("desc") => true,
            Some(other) => return Err(format!("unknown order {other:?} (use asc or desc)")),
        };
        let number = |name: &str, default: i64| -> Result<i64, String> {
            match params.get(name).filter(|v| !v.is_empty()) {
                None => Ok(default),
                Some(v) => v.parse::<u32>().map(i64::from).map_err(|_| format!("{name} must be a whole number ≥ 0")),
            }
        };
        let limit = number("limit", DEFAULT_LIMIT)?;
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(format!("limit must be between 1 and {MAX_LIMIT}"));
        }
        let offset = number("offset", 0)?;
        Ok(Self { state, user, sort, descending, limit, offset })
    }

    /// The query string that asks for this listing (links of the page).
    pub fn query(&self) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        if let Some(s) = &self.state {
            q.append_pair("state", s);
        }
        if let Some(u) = &self.user {
            q.append_pair("user", u);
        }
        q.append_pair("sort", sort_name(self.sort));
        q.append_pair("order", if self.descending { "desc" } else { "asc" });
        q.append_pair("limit", &self.limit.to_string());
        q.append_pair("offset", &self.offset.to_string());
        q.finish()
    }
}

/// The name of a sort key in query strings.
pub fn sort_name(sort: LineageSort) -> &'static str {
    match sort {
        LineageSort::User => "user",
        LineageSort::LastRefresh => "last_refresh",
        LineageSort::AccessExpires => "access_expires",
    }
}

/// A server that got the token file (from this replica's memory).
#[derive(Debug, Clone, Serialize)]
pub struct ServerFile {
    /// Server name (`""`: the default server).
    pub server: String,
    /// Lineage version written.
    pub version: i64,
    /// When (unix seconds).
    pub at: i64,
}

/// One row of the listing: what the JSON gives and the page shows.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// JupyterHub user.
    pub user: String,
    /// Upstream issuer.
    pub issuer: String,
    /// Upstream subject.
    pub subject: String,
    /// `active` or `dead`.
    pub state: String,
    /// Why a dead lineage died: the IdP's error and description.
    pub dead_reason: Option<String>,
    /// Whether a refresh token is held (never its value).
    pub has_refresh_token: bool,
    /// Granted scopes.
    pub scope: String,
    /// Access-token expiry (unix seconds).
    pub access_expires_at: Option<i64>,
    /// Refresh-token expiry when unused (unix seconds), if the IdP said.
    pub refresh_expires_at: Option<i64>,
    /// Last upstream refresh (unix seconds).
    pub last_refresh: Option<i64>,
    /// Lineage version.
    pub version: i64,
    /// Login (unix seconds).
    pub created_at: i64,
    /// Last change (unix seconds).
    pub updated_at: i64,
    /// When the refresh token dies unless used: the IdP's word, else the
    /// last refresh plus the configured idle timeout; `None` if unknown.
    pub refresh_dies_at: Option<i64>,
    /// Keep-alive's view of the lineage, in words.
    pub keepalive: String,
    /// Servers this replica wrote the token file into, and when.
    pub servers: Vec<ServerFile>,
}

/// One page of rows and the number of all matching ones.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    /// Lineages matching the filter.
    pub total: i64,
    /// Rows skipped.
    pub offset: i64,
    /// Rows asked for.
    pub limit: i64,
    /// The offset of the next page, if there is one.
    pub next_offset: Option<i64>,
    /// The rows.
    pub lineages: Vec<Row>,
}

/// Reads one page of the listing from the vault's plain columns.
pub async fn list(app: &AppState, listing: &Listing) -> Result<Page, crate::vault::store::StoreError> {
    let filter = LineageFilter { status: listing.state.clone(), user_prefix: listing.user.clone() };
    let (summaries, total) =
        app.vault.store().list_lineages(&filter, listing.sort, listing.descending, listing.limit, listing.offset).await?;
    let mut lineages = Vec::with_capacity(summaries.len());
    for s in summaries {
        lineages.push(row(app, s).await);
    }
    let end = listing.offset + lineages.len() as i64;
    Ok(Page {
        total,
        offset: listing.offset,
        limit: listing.limit,
        next_offset: (end < total && !lineages.is_empty()).then_some(end),
        lineages,
    })
}

async fn row(app: &AppState, s: LineageSummary) -> Row {
    let servers = app
        .deliveries
        .of(&s.username)
        .await
        .into_iter()
        .map(|d| ServerFile { server: d.server, version: d.version, at: d.at })
        .collect();
    let dead = s.status != "active";
    let (refresh_dies_at, keepalive) = keepalive_status(&app.config.keepalive, &s, crate::time::now());
    Row {
        refresh_dies_at,
        keepalive,
        user: s.username,
        issuer: s.issuer,
        subject: s.subject,
        state: if dead { "dead".into() } else { "active".into() },
        dead_reason: dead.then(|| {
            let reason = s.dead_reason.as_deref().unwrap_or(DEAD_REASON);
            format!("{reason}: the user must sign in again")
        }),
        has_refresh_token: s.has_refresh_token,
        scope: s.scope,
        access_expires_at: s.access_expires_at,
        refresh_expires_at: s.refresh_expires_at,
        last_refresh: s.refreshed_at,
        version: s.version,
        created_at: s.created_at,
        updated_at: s.updated_at,
        servers,
    }
}

/// What keep-alive does for a lineage (see [`crate::tokens::keepalive::plan`]),
/// and when its refresh token dies unused, if known.
pub fn keepalive_status(config: &KeepaliveConfig, s: &LineageSummary, now: i64) -> (Option<i64>, String) {
    let last = s.refreshed_at.unwrap_or(s.created_at);
    let dies = s.refresh_expires_at.or(config.idle_timeout.map(|idle| last + idle));
    let status = if s.status != "active" {
        "none: the lineage is dead"
    } else if !s.has_refresh_token {
        "none: no refresh token to keep alive"
    } else if config.interval.is_none() {
        "off (TOKENHUB_KEEPALIVE_INTERVAL=0)"
    } else if dies.is_some_and(|end| end <= now) {
        "lapsed: the refresh token has most likely died unused"
    } else if dies.is_some() {
        "on: refreshed before the refresh token dies while the user runs a server"
    } else if config.fresh_access {
        "on: keeps the access token fresh while the user runs a server"
    } else {
        "idle: the refresh token's lifetime is unknown (no refresh_expires_in, no TOKENHUB_KEEPALIVE_IDLE_TIMEOUT)"
    };
    (dies, status.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn listing_defaults_and_limits() {
        let l = Listing::parse(&params(&[])).unwrap();
        assert_eq!((l.limit, l.offset, l.sort, l.descending, l.state), (DEFAULT_LIMIT, 0, LineageSort::User, false, None));
        let l = Listing::parse(&params(&[
            ("state", "dead"),
            ("sort", "last_refresh"),
            ("order", "desc"),
            ("limit", "500"),
            ("offset", "20"),
        ]))
        .unwrap();
        assert_eq!(
            (l.limit, l.offset, l.sort, l.descending, l.state.as_deref()),
            (500, 20, LineageSort::LastRefresh, true, Some("dead"))
        );
        for bad in [
            ("limit", "0"),
            ("limit", "501"),
            ("limit", "x"),
            ("offset", "-1"),
            ("state", "zombie"),
            ("sort", "subject"),
            ("order", "up"),
        ] {
            assert!(Listing::parse(&params(&[bad])).is_err(), "{bad:?}");
        }
        // The query string reads back to the same listing.
        let l = Listing::parse(&params(&[("user", "a&b"), ("sort", "access_expires"), ("limit", "7")])).unwrap();
        let back: HashMap<String, String> = url::form_urlencoded::parse(l.query().as_bytes()).into_owned().collect();
        assert_eq!(Listing::parse(&back).unwrap(), l);
    }

    #[test]
    fn keepalive_status_follows_the_lineage_and_the_settings() {
        let config = KeepaliveConfig {
            interval: Some(std::time::Duration::from_secs(60)),
            idle_timeout: Some(1800),
            margin: 1200,
            grace: 0,
            fresh_access: false,
        };
        let summary = LineageSummary {
            username: "u".into(),
            issuer: "i".into(),
            subject: "s".into(),
            status: "active".into(),
            has_refresh_token: true,
            scope: String::new(),
            access_expires_at: None,
            refresh_expires_at: None,
            refreshed_at: Some(1000),
            version: 2,
            created_at: 500,
            updated_at: 1000,
            dead_reason: None,
        };
        let (dies, status) = keepalive_status(&config, &summary, 1100);
        assert_eq!(dies, Some(2800));
        assert!(status.starts_with("on:"), "{status}");
        assert!(keepalive_status(&config, &summary, 2800).1.starts_with("lapsed"));
        // The IdP's word wins over the setting.
        let said = LineageSummary { refresh_expires_at: Some(5000), ..summary.clone() };
        assert_eq!(keepalive_status(&config, &said, 1100).0, Some(5000));
        let dead = LineageSummary { status: "dead".into(), ..summary.clone() };
        assert!(keepalive_status(&config, &dead, 1100).1.starts_with("none"));
        let bare = LineageSummary { has_refresh_token: false, ..summary.clone() };
        assert!(keepalive_status(&config, &bare, 1100).1.starts_with("none"));
        let off = KeepaliveConfig { interval: None, ..config.clone() };
        assert!(keepalive_status(&off, &summary, 1100).1.starts_with("off"));
        let unknown = KeepaliveConfig { idle_timeout: None, ..config.clone() };
        assert_eq!(keepalive_status(&unknown, &summary, 1100).0, None);
        assert!(keepalive_status(&unknown, &summary, 1100).1.starts_with("idle"));
    }
}
