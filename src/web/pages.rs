//! Pages for a person in the browser: the token page (`/`), `/refresh` (the
//! URL to open after "invalid_grant"), signing in to tokenhub (`/login`), the
//! `.tokens.json` download and revocation. Token values never appear in a
//! page; the download is the one place they leave as a file.

use std::collections::HashMap;

use axum::extract::{Form, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum_extra::extract::CookieJar;

use crate::errors::PageError;
use crate::no_store;
use crate::oauth::login::{Purpose, start_login};
use crate::state::AppState;
use crate::tokens::fabric::{self, timestamp};
use crate::tokens::refresh::{RefreshError, Want};
use crate::tokens::revoke::IdpRevocation;
use crate::vault::Lineage;
use crate::web::renewed::renewed;
use crate::web::session::{self, Session};
use crate::web::views::{self, DeliveryRow, InfoPage, TokenPage, relative};

fn page(html: String) -> Response {
    no_store(Html(html).into_response())
}

async fn lineage_of(app: &AppState, username: &str) -> Result<Option<Lineage>, PageError> {
    Ok(app.vault.load(username, app.upstream.issuer()).await?)
}

/// `GET /`: what tokenhub holds for the signed-in user. It carries the
/// CSRF value of the revoke form, so it goes only to a top-level navigation.
pub async fn token_page(State(app): State<AppState>, headers: HeaderMap, jar: CookieJar) -> Result<Response, PageError> {
    crate::security::top_level_navigation(&headers)?;
    let Some(session) = session::current(&app, &jar) else {
        let info = InfoPage {
            title: "tokenhub",
            message: "tokenhub keeps the tokens your identity provider issued when you signed in to JupyterHub, and hands them to your notebook servers.",
            links: vec![("Sign in to see your tokens", app.url("/login").to_string())],
        };
        return Ok(page(views::render(&info)));
    };
    let lineage = lineage_of(&app, &session.username).await?;
    let deliveries = app.deliveries.of(&session.username).await;
    let withheld = app.deliveries.withheld(&session.username).await;
    let narrow = app.vault.narrow_held(&session.username, app.upstream.issuer()).await?;
    // Only to say which files hold a token: a hub that does not answer shows none.
    let groups = if narrow.is_empty() { vec![] } else { app.hub.groups(&session.username).await.unwrap_or_default() };
    let delegations = app.vault.store().delegations(&session.username, app.upstream.issuer()).await?;
    let view = TokenPage {
        username: &session.username,
        lineage: lineage.as_ref().map(|l| views::LineageView {
            issuer: l.issuer.clone(),
            subject: l.subject.clone(),
            scopes: l.tokens.scope.split_whitespace().map(str::to_string).collect(),
            active: l.active,
            dead_reason: l.dead_reason.clone(),
            access_expires: l.tokens.access_expires_at.map(|t| format!("{} ({})", timestamp(t), relative(t))),
            id_token_expires: fabric::id_token_expiry(l).map(|t| format!("{} ({})", timestamp(t), relative(t))),
            started: format!("{} ({})", timestamp(l.created_at), relative(l.created_at)),
            last_refresh: l.refreshed_at.map(|t| format!("{} ({})", timestamp(t), relative(t))),
            version: l.version,
            has_refresh_token: l.tokens.refresh_token.is_some(),
        }),
        deliveries: deliveries
            .iter()
            .map(|d| DeliveryRow {
                server: if d.server.is_empty() { "default server".into() } else { d.server.clone() },
                version: d.version,
                at: format!("{} ({})", timestamp(d.at), relative(d.at)),
            })
            .collect(),
        fabric_broker: app.config.fabric.as_ref().and_then(|f| f.broker_host.clone()),
        rc_changes: app
            .deliveries
            .rc_changes(&session.username)
            .await
            .into_iter()
            .map(|(s, named)| (if s.is_empty() { "default server".into() } else { s }, named))
            .collect(),
        withheld: withheld.into_iter().map(|s| if s.is_empty() { "default server".into() } else { s }).collect(),
        narrow: narrow
            .into_iter()
            .map(|n| views::NarrowRow {
                files: files_of(&app, &groups, &n.request_key),
                key: n.request_key,
                scopes: if n.scopes.is_empty() { "the identity provider's default".into() } else { n.scopes },
                audience: n.audience.unwrap_or_else(|| "none".into()),
                expires: n.expires_at.map_or_else(|| "not said".into(), |t| format!("{} ({})", timestamp(t), relative(t))),
                obtained: format!("{} ({})", timestamp(n.obtained_at), relative(n.obtained_at)),
            })
            .collect(),
        narrow_drop_url: app.url("/narrow/drop").to_string(),
        delegations: delegations
            .into_iter()
            .map(|d| (d.service, d.fetches, format!("{} ({})", timestamp(d.last_at), relative(d.last_at))))
            .collect(),
        csrf: &session.csrf,
        refresh_url: app.url("/refresh").to_string(),
        download_url: app.url("/tokens.json").to_string(),
        revoke_url: app.url("/revoke").to_string(),
        hub_url: app.hub_home(),
    };
    let referrer = (header::REFERRER_POLICY, crate::security::FORM_REFERRER_POLICY);
    Ok(([referrer], page(views::render(&view))).into_response())
}

/// The files of `TOKENHUB_TOKEN_FILES` (and the bearer-token file) that
/// hold the narrower token of `request_key`.
fn files_of(app: &AppState, groups: &[String], request_key: &str) -> String {
    let paths: Vec<&str> = crate::tokens::files::files_for(app, groups)
        .into_iter()
        .filter(|(_, request)| request.key() == request_key)
        .map(|(spec, _)| spec.path.as_str())
        .collect();
    if paths.is_empty() { "none".into() } else { paths.join(", ") }
}

/// `GET /login`: sign in to tokenhub's token page through the IdP.
pub async fn login(State(app): State<AppState>, jar: CookieJar) -> Result<Response, PageError> {
    start_login(&app, jar, Purpose::Page).await
}

/// `GET /refresh`: renew the user's tokens. With a working lineage this is a
/// refresh; otherwise (or without a tokenhub session) a new upstream login,
/// silent while the IdP's own session lasts. Either way the token files of
/// the user's running servers are rewritten.
pub async fn refresh(State(app): State<AppState>, jar: CookieJar) -> Result<Response, PageError> {
    if let Some(session) = session::current(&app, &jar) {
        match app.refresher.fresh(&app, &session.username, Want { min_valid: None, force: true }).await {
            Ok(_) => return renewed(&app, &session.username).await,
            Err(e) if e.is_temporary() => {
                return Err(PageError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Identity provider not answering",
                    "Your identity provider did not answer. Your tokens are kept as they are; please try again in a minute.",
                )
                .with_action("Try again", app.url("/refresh").to_string()));
            }
            Err(RefreshError::Vault(e)) => return Err(e.into()),
            Err(_) => {} // dead or none: a new login renews it
        }
    }
    start_login(&app, jar, Purpose::Refresh).await
}

fn signed_in(app: &AppState, jar: &CookieJar) -> Result<Session, PageError> {
    session::current(app, jar).ok_or_else(|| {
        PageError::new(StatusCode::UNAUTHORIZED, "Not signed in", "Sign in to tokenhub first.")
            .with_action("Sign in", app.url("/login").to_string())
    })
}

/// `GET /tokens.json`: the token file, for a server that has none yet or for
/// use elsewhere. Only to a top-level navigation: script on another page of
/// the hub's origin must not read it with the user's cookie.
pub async fn download(State(app): State<AppState>, headers: HeaderMap, jar: CookieJar) -> Result<Response, PageError> {
    crate::security::own_top_level_navigation(&headers)?;
    let session = signed_in(&app, &jar)?;
    let lineage = lineage_of(&app, &session.username).await?.ok_or_else(|| {
        PageError::new(StatusCode::NOT_FOUND, "No tokens", "tokenhub holds no tokens for you.")
            .with_action("Renew", app.url("/refresh").to_string())
    })?;
    let body = serde_json::to_string_pretty(&fabric::document(&lineage, app.custody())).unwrap_or_default();
    app.audit.record("download", Some(&session.username), Some(lineage.version), Some("token file downloaded"));
    Ok(no_store(
        (
            [(header::CONTENT_TYPE, "application/json"), (header::CONTENT_DISPOSITION, "attachment; filename=\".tokens.json\"")],
            body,
        )
            .into_response(),
    ))
}

/// The session of a form posted from the token page: from tokenhub's own
/// origin (a post from elsewhere is audited as refused, naming `what`),
/// signed in, with the page's CSRF value.
fn token_page_form(
    app: &AppState,
    headers: &HeaderMap,
    jar: &CookieJar,
    form: &HashMap<String, String>,
    what: &str,
) -> Result<Session, PageError> {
    crate::security::same_origin_post(headers, &app.origin).inspect_err(|_| {
        app.audit.record("refused", None, None, Some(&format!("{what} form from another origin")));
    })?;
    let session = signed_in(app, jar)?;
    session.check_csrf(form, "Token page", app.url("/").to_string())?;
    Ok(session)
}

/// `POST /revoke`: revoke the refresh token at the IdP (RFC 7009, when it
/// offers revocation) and delete the lineage from the vault.
pub async fn revoke(
    State(app): State<AppState>,
    headers: HeaderMap,
    jar: CookieJar,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, PageError> {
    let session = token_page_form(&app, &headers, &jar, &form, "revoke")?;
    let revoked = app.refresher.revoke(&app, &session.username).await.map_err(revoke_failed)?;
    let idp_note = match revoked.map(|r| r.idp) {
        Some(IdpRevocation::Revoked) => "Your identity provider revoked the refresh token.",
        Some(IdpRevocation::Unreachable) => {
            "Your identity provider could not be reached to revoke the refresh token; it stays valid there until it expires."
        }
        Some(IdpRevocation::NotOffered) => {
            "Your identity provider does not offer revocation; the refresh token stays valid there until it expires."
        }
        Some(IdpRevocation::NoRefreshToken) => "tokenhub held no refresh token, so there was none to revoke.",
        None => "tokenhub held no tokens for you.",
    };
    tracing::info!(user = %session.username, "lineage revoked and deleted");
    let version = revoked.map(|r| r.version);
    app.audit.record("revoke", Some(&session.username), version, Some("lineage revoked and deleted"));
    let message = format!("tokenhub deleted your tokens. {idp_note} Signing in again starts a new lineage.");
    let info = InfoPage { title: "Tokens revoked", message: &message, links: vec![("Back to JupyterHub", app.hub_home())] };
    Ok((session::end(&app, jar), page(views::render(&info))).into_response())
}

/// `POST /narrow/drop`: drops the user's narrower tokens (one, by `key`,
/// or all); the next request for one obtains it again.
pub async fn drop_narrow(
    State(app): State<AppState>,
    headers: HeaderMap,
    jar: CookieJar,
    Form(form): Form<HashMap<String, String>>,
) -> Result<Response, PageError> {
    let session = token_page_form(&app, &headers, &jar, &form, "drop")?;
    let key = form.get("key").map(String::as_str).filter(|k| !k.is_empty());
    let dropped = app.vault.drop_narrow(&session.username, app.upstream.issuer(), key).await?;
    app.audit.record("narrow_dropped", Some(&session.username), None, Some(&format!("{dropped} narrower token(s) dropped")));
    Ok(Redirect::to(app.url("/").as_str()).into_response())
}

/// The page for a revoke that could not run: the vault failed, or another
/// replica's refresh of the lineage did not finish in time.
pub fn revoke_failed(e: RefreshError) -> PageError {
    match e {
        RefreshError::Vault(e) => e.into(),
        e => {
            tracing::warn!(error = %e, "revoke could not run");
            PageError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Please try again",
                "A refresh of these tokens was still running. Please try again in a minute.",
            )
        }
    }
}

/// `GET /logout`: ends tokenhub's own session (the hub's is separate).
pub async fn logout(State(app): State<AppState>, jar: CookieJar) -> Response {
    (session::end(&app, jar), Redirect::to(app.url("/").as_str())).into_response()
}
