//! tokenhub's own browser session: a sealed, HttpOnly, SameSite=Lax cookie
//! naming the user (`__Host-tokenhub_session` over https, see [`cookie_name`]), set when a login passes through tokenhub. It lets the
//! token page and `/refresh` know who is there without asking the hub.

use axum_extra::extract::CookieJar;
use axum_extra::extract::cookie::{Cookie, SameSite};
use serde::{Deserialize, Serialize};

use crate::state::App;
use crate::time::now;
use crate::vault::crypto::random_token;

const COOKIE: &str = "tokenhub_session";
const AAD: &[u8] = b"tokenhub session";
/// How long a session lasts.
pub const SESSION_SECS: i64 = 8 * 3600;

/// Who is signed in to tokenhub in this browser.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    /// The user.
    pub username: String,
    /// Anti-forgery value for the page's forms.
    pub csrf: String,
    /// Expiry (unix seconds).
    pub expires_at: i64,
}

/// The name tokenhub gives its cookie `name`. Over https the browser
/// holds a prefixed name to rules: `__Host-` when tokenhub is at the root
/// of its host (its own host name, as recommended): Secure, `Path=/`, no
/// `Domain`, so no other host (a sibling subdomain) can set or shadow it;
/// `__Secure-` under a path prefix (`__Host-` needs `Path=/`): Secure, so
/// at least no plain-http page can set it. Over http, the plain name.
/// Readers and writers both go through here.
pub(crate) fn cookie_name(app: &App, name: &str) -> String {
    let http = &app.config.http;
    match (http.secure_cookies, http.base_path.is_empty()) {
        (true, true) => format!("__Host-{name}"),
        (true, false) => format!("__Secure-{name}"),
        (false, _) => name.to_string(),
    }
}

/// The path of tokenhub's cookies: `/` at the root of the host, else the
/// prefix every route lives under.
pub(crate) fn cookie_path(app: &App) -> String {
    if app.config.http.base_path.is_empty() { "/".into() } else { app.config.http.base_path.clone() }
}

/// Starts a session for `username`.
pub fn start(app: &App, jar: CookieJar, username: &str) -> CookieJar {
    let session = Session { username: username.into(), csrf: random_token(), expires_at: now() + SESSION_SECS };
    let sealed = app.keys.seal_text(&serde_json::to_string(&session).expect("session serializes"), AAD);
    jar.add(
        Cookie::build((cookie_name(app, COOKIE), sealed))
            .path(cookie_path(app))
            .http_only(true)
            .secure(app.config.http.secure_cookies)
            .same_site(SameSite::Lax)
            .max_age(time::Duration::seconds(SESSION_SECS)),
    )
}

/// The session in this browser, if any and not expired.
pub fn current(app: &App, jar: &CookieJar) -> Option<Session> {
    let cookie = jar.get(&cookie_name(app, COOKIE))?;
    let json = app.keys.open_text(cookie.value(), AAD).ok()?;
    let session: Session = serde_json::from_str(&json).ok()?;
    (session.expires_at > now()).then_some(session)
}

/// Ends the session.
pub fn end(app: &App, jar: CookieJar) -> CookieJar {
    // Secure like the cookie it removes: browsers refuse a `__Host-` or
    // `__Secure-` cookie without it, removals too.
    jar.remove(Cookie::build(cookie_name(app, COOKIE)).path(cookie_path(app)).secure(app.config.http.secure_cookies))
}

impl Session {
    /// Checks a posted form's `csrf` value against this session's; a form
    /// that fails gets a 403 page sending the user back to `page` (`label`)
    /// to reload it.
    pub fn check_csrf(
        &self,
        form: &std::collections::HashMap<String, String>,
        label: &str,
        page: String,
    ) -> Result<(), crate::errors::PageError> {
        if form.get("csrf").is_some_and(|c| crate::vault::crypto::constant_time_eq(c, &self.csrf)) {
            return Ok(());
        }
        Err(crate::errors::PageError::new(
            axum::http::StatusCode::FORBIDDEN,
            "Request not accepted",
            format!("This form is out of date. Reload the {} and try again.", label.to_lowercase()),
        )
        .with_action(label.to_string(), page))
    }
}
