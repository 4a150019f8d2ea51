//! HTML pages (askama templates in `templates/`). Values are escaped by askama.

use askama::Template;

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
