//! `GET /admin`: the operator's page, and `POST /admin/revoke`, its revoke
//! button. The page carries the session's CSRF value, so like the token
//! page it goes only to a top-level navigation; the revoke post must come
//! from tokenhub's own origin with that value.

use std::collections::HashMap;

use askama::Template;
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum_extra::extract::CookieJar;

use super::{Listing, Row, sort_name};
use crate::errors::PageError;
use crate::state::AppState;
use crate::tokens::fabric::timestamp;
use crate::tokens::revoke::{IdpRevocation, Revoked};
use crate::vault::store::LineageSort;
use crate::web::session::{self, Session};
use crate::web::views::{self, InfoPage};

/// A row as the page shows it.
pub struct RowView {
    /// The row.
    pub row: Row,
    /// Access-token expiry, formatted.
    pub access_expires: String,
    /// When the refresh token dies unused, formatted.
    pub refresh_expires: String,
    /// Last refresh, formatted.
    pub last_refresh: String,
    /// Login, formatted.
    pub created: String,
    /// Servers with the file: "name v3 at …".
    pub servers: Vec<String>,
}

/// A column heading that sorts: its label and link.
pub struct SortLink {
    /// Label.
    pub label: &'static str,
    /// The page sorted by this column (the other direction if it is the current one).
    pub href: String,
    /// "▲"/"▼" on the current sort column.
    pub mark: &'static str,
}

/// The operator's page.
#[derive(Template)]
#[template(path = "admin.html")]
pub struct AdminPage<'a> {
    /// The signed-in admin.
    pub admin: &'a str,
    /// The rows of this page.
    pub rows: Vec<RowView>,
    /// Matching lineages in all.
    pub total: i64,
    /// First row number shown (1-based), last row number.
    pub first: i64,
    /// Last row number shown.
    pub last: i64,
    /// The state filter (`""`: all).
    pub state: String,
    /// The user-prefix filter.
    pub user: String,
    /// Sortable headings: user, last refresh, access expiry.
    pub sorts: Vec<SortLink>,
    /// Current sort and order, kept by the filter form.
    pub sort: &'static str,
    /// `asc` or `desc`.
    pub order: &'static str,
    /// Rows per page.
    pub limit: i64,
    /// Previous and next pages.
    pub previous: Option<String>,
    /// Next page.
    pub next: Option<String>,
    /// `/admin`.
    pub admin_url: String,
    /// `/admin/revoke`.
    pub revoke_url: String,
    /// `/admin/names`: the form that moves a name to another subject.
    pub move_name_url: String,
    /// Anti-forgery value of the revoke forms.
    pub csrf: &'a str,
    /// What keep-alive did on this replica, in words.
    pub keepalive: String,
}

fn page(html: String) -> Response {
    crate::no_store(Html(html).into_response())
}

/// Keep-alive's figures on this replica (as in `/metrics`), in words.
fn keepalive_summary(app: &AppState) -> String {
    if app.config.keepalive.interval.is_none() {
        return "Keep-alive is off.".into();
    }
    let k = &app.metrics.keepalive;
    let last = match k.last_round_at.get() {
        0 => "no round has ended yet".to_string(),
        at => {
            let closest = match k.last_round_closest.get() {
                -1 => String::new(),
                s => format!(", the closest to its end had {s} s left"),
            };
            format!(
                "the last round ended {}: {} lineages due, {} refreshed{closest}",
                timestamp(at),
                k.last_round_due.get(),
                k.last_round_refreshed.get()
            )
        }
    };
    let failures: Vec<String> =
        k.failures().into_iter().filter(|(_, n)| *n > 0).map(|(cause, n)| format!("{n} {}", cause.replace('_', " "))).collect();
    let failures = if failures.is_empty() { "none".to_string() } else { failures.join(", ") };
    format!(
        "Keep-alive on this replica: {} rounds, {} refreshes, failed refreshes: {failures}; {last}.",
        k.rounds.get(),
        k.refreshes.get()
    )
}

fn when(at: Option<i64>, none: &str) -> String {
    at.map_or_else(|| none.to_string(), timestamp)
}

/// The signed-in session's user, if the hub says they are an admin.
async fn operator(app: &AppState, jar: &CookieJar) -> Result<Session, PageError> {
    let session = session::current(app, jar).ok_or_else(|| {
        PageError::new(
            StatusCode::UNAUTHORIZED,
            "Not signed in",
            "Sign in to tokenhub first; the operator's view is for hub admins.",
        )
        .with_action("Sign in", app.url("/login").to_string())
    })?;
    match app.hub.is_admin(&session.username).await {
        Ok(true) => Ok(session),
        Ok(false) => {
            app.audit.record("refused", Some(&session.username), None, Some("admin page opened by a non-admin"));
            Err(PageError::new(
                StatusCode::FORBIDDEN,
                "Operators only",
                "This page lists every user's tokens and is only for the hub's admins.",
            ))
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not ask the hub whether the user is an admin");
            Err(PageError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Hub not answering",
                "tokenhub could not ask the hub whether you are an admin. Please try again in a minute.",
            ))
        }
    }
}

/// The checks of a form posted from the operator's page: from tokenhub's
/// own origin (else audited as `refused_why`), by a hub admin's session,
/// with that session's CSRF value. Returns the admin's session.
pub(super) async fn operator_form(
    app: &AppState,
    headers: &HeaderMap,
    jar: &CookieJar,
    form: &HashMap<String, String>,
    refused_why: &str,
) -> Result<Session, PageError> {
    crate::security::same_origin_post(headers, &app.origin)
        .inspect_err(|_| app.audit.record("refused", None, None, Some(refused_why)))?;
    let session = operator(app, jar).await?;
    session.check_csrf(form, "Operator's page", app.url("/admin").to_string())?;
    Ok(session)
}

pub(super) fn bad_request(message: String) -> PageError {
    PageError::new(StatusCode::BAD_REQUEST, "Bad listing request", message)
}

/// `GET /admin`: every user's lineage, sortable, filterable, paged.
pub async fn admin_page(
    State(app): State<AppState>,
    headers: HeaderMap,
    jar: CookieJar,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, PageError> {
    crate::security::top_level_navigation(&headers)?;
    let session = operator(&app, &jar).await?;
    let listing = Listing::parse(&params).map_err(bad_request)?;
    let listed = super::list(&app, &listing).await?;
    let admin_url = app.url("/admin").to_string();
    let link = |l: &Listing| format!("{admin_url}?{}", l.query());
    let sorts = [
        ("User", LineageSort::User),
        ("Last refresh", LineageSort::LastRefresh),
        ("Access token expires", LineageSort::AccessExpires),
    ]
    .into_iter()
    .map(|(label, sort)| {
        let current = listing.sort == sort;
        let descending = current && !listing.descending;
        SortLink {
            label,
            href: link(&Listing { sort, descending, offset: 0, ..listing.clone() }),
            mark: match (current, listing.descending) {
                (false, _) => "",
                (true, false) => " ▲",
                (true, true) => " ▼",
            },
        }
    })
    .collect();
    let previous =
        (listing.offset > 0).then(|| link(&Listing { offset: (listing.offset - listing.limit).max(0), ..listing.clone() }));
    let next = listed.next_offset.map(|offset| link(&Listing { offset, ..listing.clone() }));
    let rows: Vec<RowView> = listed
        .lineages
        .into_iter()
        .map(|row| RowView {
            access_expires: when(row.access_expires_at, "not said"),
            refresh_expires: when(row.refresh_dies_at, "unknown"),
            last_refresh: when(row.last_refresh, "never"),
            created: timestamp(row.created_at),
            servers: row
                .servers
                .iter()
                .map(|s| {
                    let name = if s.server.is_empty() { "default server" } else { s.server.as_str() };
                    format!("{name}: v{} at {}", s.version, timestamp(s.at))
                })
                .collect(),
            row,
        })
        .collect();
    let view = AdminPage {
        admin: &session.username,
        first: if rows.is_empty() { 0 } else { listing.offset + 1 },
        last: listing.offset + rows.len() as i64,
        rows,
        total: listed.total,
        state: listing.state.clone().unwrap_or_default(),
        user: listing.user.clone().unwrap_or_default(),
        sorts,
        sort: sort_name(listing.sort),
        order: if listing.descending { "desc" } else { "asc" },
        limit: listing.limit,
        previous,
        next,
        revoke_url: app.url("/admin/revoke").to_string(),
        move_name_url: app.url("/admin/names").to_string(),
        admin_url,
        csrf: &session.csrf,
        keepalive: keepalive_summary(&app),
    };
    let referrer = (header::REFERRER_POLICY, crate::security::FORM_REFERRER_POLICY);
    Ok(([referrer], page(views::render(&view))).into_response())
}

/// `POST /admin/revoke` (`user`, `csrf`): revokes the user's refresh token
/// at the IdP where it offers revocation, then deletes the lineage, and
/// audits it naming the admin. The user's notebooks then get
/// `invalid_grant` with `reauth_url` until the user signs in again.
pub async fn revoke(
    State(app): State<AppState>,
    headers: HeaderMap,
    jar: CookieJar,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, PageError> {
    let session = operator_form(&app, &headers, &jar, &form, "admin revoke form from another origin").await?;
    let user = form.get("user").map(String::as_str).unwrap_or_default();
    if user.is_empty() {
        return Err(bad_request("The form names no user.".into()));
    }
    let revoked = app.refresher.revoke(&app, user).await.map_err(crate::web::pages::revoke_failed)?;
    let Some(Revoked { idp: outcome, version }) = revoked else {
        return Err(PageError::new(StatusCode::NOT_FOUND, "No tokens", format!("tokenhub holds no tokens for {user}."))
            .with_action("Operator's page", app.url("/admin").to_string()));
    };
    let idp = match outcome {
        IdpRevocation::NoRefreshToken => "no refresh token was held",
        IdpRevocation::Revoked => "the identity provider revoked the refresh token",
        IdpRevocation::NotOffered => "the identity provider offers no revocation",
        IdpRevocation::Unreachable => "the identity provider could not be reached to revoke the refresh token",
    };
    tracing::info!(user = %user, admin = %session.username, "lineage revoked and deleted by an admin");
    let detail = format!("revoked by admin {}; {idp}", session.username);
    app.audit.record("admin_revoke", Some(user), Some(version), Some(&detail));
    let message =
        format!("tokenhub deleted the tokens of {user}; {idp}. Their notebooks get invalid_grant until they sign in again.");
    let info = InfoPage {
        title: "Tokens revoked",
        message: &message,
        links: vec![("Back to the operator's page", app.url("/admin").to_string())],
    };
    Ok(page(views::render(&info)))
}
