//! HTML pages (askama templates in `templates/`). Values are escaped by askama.

use askama::Template;

use crate::time::now;

/// The page shown for any failure in the browser flow.
#[derive(Template)]
#[template(path = "error.html")]
pub struct ErrorPage<'a> {
    /// Headline.
    pub title: &'a str,
    /// What happened.
    pub message: &'a str,
    /// What to do next (link text, target).
    pub action: Option<(&'a str, &'a str)>,
    /// HTTP status, shown small for support requests.
    pub status: u16,
}

/// Renders a page; a template that fails to render becomes a plain message
/// rather than a panic.
pub fn render(page: &impl Template) -> String {
    page.render().unwrap_or_else(|e| {
        tracing::error!(error = %e, "template failed to render");
        "<!doctype html><title>tokenhub</title><p>This page could not be shown.</p>".into()
    })
}

/// A short page with a message and links.
#[derive(Template)]
#[template(path = "info.html")]
pub struct InfoPage<'a> {
    /// Headline.
    pub title: &'a str,
    /// Text.
    pub message: &'a str,
    /// (label, href) pairs.
    pub links: Vec<(&'a str, String)>,
}

/// A lineage as the token page shows it: no token values.
pub struct LineageView {
    /// Upstream issuer.
    pub issuer: String,
    /// Upstream subject.
    pub subject: String,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// False once the IdP refused a refresh.
    pub active: bool,
    /// Why the IdP refused it, when it said.
    pub dead_reason: Option<String>,
    /// Access-token expiry, formatted.
    pub access_expires: Option<String>,
    /// ID-token expiry, formatted.
    pub id_token_expires: Option<String>,
    /// Start of the lineage, formatted.
    pub started: String,
    /// Last refresh, formatted.
    pub last_refresh: Option<String>,
    /// Lineage version.
    pub version: i64,
    /// Whether there is a refresh token.
    pub has_refresh_token: bool,
}

/// A server that got the token file.
pub struct DeliveryRow {
    /// Server name.
    pub server: String,
    /// Lineage version written.
    pub version: i64,
    /// When, formatted.
    pub at: String,
}

/// A narrower token held for the user (never its value).
pub struct NarrowRow {
    /// Its request key (what the drop form names).
    pub key: String,
    /// Scopes, space-separated (or "the IdP's default").
    pub scopes: String,
    /// Audience, or "none".
    pub audience: String,
    /// Expiry, formatted.
    pub expires: String,
    /// When obtained, formatted.
    pub obtained: String,
    /// The files in servers that hold it (`TOKENHUB_TOKEN_FILES`), or "none".
    pub files: String,
}

/// The signed-in user's token page.
#[derive(Template)]
#[template(path = "tokens.html")]
pub struct TokenPage<'a> {
    /// The user.
    pub username: &'a str,
    /// Their lineage, if any.
    pub lineage: Option<LineageView>,
    /// Servers that got the file.
    pub deliveries: Vec<DeliveryRow>,
    /// Servers whose tokens are withheld because they are shared.
    pub withheld: Vec<String>,
    /// The FABRIC broker's host, when servers are pointed at it.
    pub fabric_broker: Option<String>,
    /// Servers whose `fabric_rc` tokenhub pointed at the broker, with the
    /// host each named before.
    pub rc_changes: Vec<(String, String)>,
    /// Narrower tokens held.
    pub narrow: Vec<NarrowRow>,
    /// `/narrow/drop`.
    pub narrow_drop_url: String,
    /// Hub services that fetched the user's tokens by delegation:
    /// name, fetches, last fetch (formatted).
    pub delegations: Vec<(String, i64, String)>,
    /// Anti-forgery value for the revoke form.
    pub csrf: &'a str,
    /// `/refresh`.
    pub refresh_url: String,
    /// `/tokens.json`.
    pub download_url: String,
    /// `/revoke`.
    pub revoke_url: String,
    /// The hub.
    pub hub_url: String,
}

/// The page after `/refresh`.
#[derive(Template)]
#[template(path = "renewed.html")]
pub struct RenewedPage<'a> {
    /// The user.
    pub username: &'a str,
    /// True for a refresh, false for a new login.
    pub refreshed: bool,
    /// Access-token expiry, formatted.
    pub access_expires: Option<String>,
    /// Servers whose token file was rewritten.
    pub servers: Vec<String>,
    /// A new ID token came but is not verified yet (the previous one is served).
    pub id_token_pending: bool,
    /// The token page.
    pub token_page_url: String,
    /// The hub.
    pub hub_url: String,
}

/// "in 5 min", "3 h ago": how far `at` is from now.
pub fn relative(at: i64) -> String {
    let delta = at - now();
    let span = delta.unsigned_abs();
    let text = match span {
        0..=59 => format!("{span} s"),
        60..=5999 => format!("{} min", span / 60),
        6000..=172_799 => format!("{} h", span / 3600),
        _ => format!("{} days", span / 86_400),
    };
    if delta >= 0 { format!("in {text}") } else { format!("{text} ago") }
}
