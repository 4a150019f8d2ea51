//! Defences that do not belong to one endpoint:
//!
//! - who the client is ([`client_of`]): the address failures are counted by;
//! - [`FailureLimiter`]: callers that fail authentication repeatedly get 429
//!   before any hub call;
//! - [`security_headers`]: CSP, framing, sniffing and referrer headers on
//!   every response;
//! - [`top_level_navigation`] and [`same_origin_post`]: behind the hub's
//!   proxy tokenhub shares its origin with every user's server, so script on
//!   any page under `/user/…` could `fetch` tokenhub with the user's cookie.
//!   Token-bearing pages go only to a top-level navigation of the user's own
//!   browser, and state-changing forms must come from tokenhub's own origin.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::Response;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::errors::{ApiError, PageError};

/// The client address a request is counted under.
///
/// Behind the hub's proxy every request comes from the proxy, so the peer
/// address says nothing; configurable-http-proxy appends the address it saw
/// to `X-Forwarded-For`. The rightmost entry is the one the last hop (the
/// proxy) added: entries further left were written by the client and can be
/// anything. Without the header the peer address counts. A caller that
/// reaches tokenhub directly could send its own `X-Forwarded-For`, so
/// tokenhub should be reachable only through the proxy and by the hub (as in
/// Zero to JupyterHub, where the service sits behind the proxy in the
/// cluster). An entry that is not an IP address is ignored, so no header can
/// make up arbitrary keys.
pub fn client_of(headers: &HeaderMap, peer: Option<SocketAddr>) -> Option<String> {
    let forwarded = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .rfind(|v| !v.is_empty())
        .and_then(|v| v.parse::<IpAddr>().ok());
    forwarded.or(peer.map(|p| p.ip())).map(|ip| ip.to_string())
}

/// The client of a request (peer from `ConnectInfo` when the server was
/// started with it; tests driving the router directly have none).
pub fn client_of_request<B>(request: &Request<B>) -> Option<String> {
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    client_of(request.headers(), peer)
}

/// Failures allowed in a row before a client is slowed down.
const FAILURE_BURST: u32 = 10;
/// Then one more failure is allowed every this often.
const FAILURE_REFILL: Duration = Duration::from_secs(3);
/// Most clients tracked at once (blocked clients and limiter cells).
const MAX_CLIENTS: u64 = 100_000;

/// Counts authentication failures per client address and slows down the
/// clients that fail too often: after [`FAILURE_BURST`] failures a client
/// gets 429 with `Retry-After` until its next failure would be allowed.
pub struct FailureLimiter {
    failures: DefaultKeyedRateLimiter<String>,
    /// Clients currently slowed down, and until when. Bounded and expiring,
    /// so a flood from many addresses does not grow memory without end.
    blocked: moka::sync::Cache<String, Instant>,
}

impl std::fmt::Debug for FailureLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailureLimiter").field("blocked", &self.blocked.entry_count()).finish()
    }
}

impl Default for FailureLimiter {
    fn default() -> Self {
        let burst = NonZeroU32::new(FAILURE_BURST).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(FAILURE_REFILL).map_or_else(|| Quota::per_second(burst), |q| q.allow_burst(burst));
        Self {
            failures: RateLimiter::keyed(quota),
            blocked: moka::sync::Cache::builder().max_capacity(MAX_CLIENTS).time_to_live(FAILURE_REFILL * FAILURE_BURST).build(),
        }
    }
}

impl FailureLimiter {
    /// `Err(429)` while `client` is slowed down.
    pub fn check(&self, client: Option<&str>) -> Result<(), ApiError> {
        let Some(client) = client else { return Ok(()) };
        match self.blocked.get(client) {
            Some(until) if until > Instant::now() => {
                let wait = until.saturating_duration_since(Instant::now()).as_secs() + 1;
                Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_requests",
                    format!("too many failed authentication attempts from this address; try again in {wait} s"),
                )
                .with_retry_after(wait))
            }
            _ => Ok(()),
        }
    }

    /// Books one failed authentication of `client`.
    pub fn failed(&self, client: Option<&str>) {
        let Some(client) = client else { return };
        let key = client.to_string();
        if let Err(not_until) = self.failures.check_key(&key) {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(self.failures.clock()));
            self.blocked.insert(key, Instant::now() + wait);
            tracing::info!(client, "client slowed down after repeated authentication failures");
        }
        if self.failures.len() as u64 > MAX_CLIENTS {
            self.sweep();
        }
    }

    /// Forgets clients whose failures are forgotten anyway.
    pub fn sweep(&self) {
        self.failures.retain_recent();
        self.failures.shrink_to_fit();
        self.blocked.run_pending_tasks();
    }
}

/// The policy for every response: nothing loads but the pages' own inline
/// styles, forms go only to tokenhub, nobody may frame tokenhub.
pub const CONTENT_SECURITY_POLICY: &str =
    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// Adds the security headers to a response (one `map_response` layer).
pub async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    // A page with a form sets its own policy (see [`FORM_REFERRER_POLICY`]).
    headers.entry(header::REFERRER_POLICY).or_insert(HeaderValue::from_static("no-referrer"));
    response
}

/// The referrer policy of a page whose form posts back to tokenhub: with
/// `no-referrer` browsers send `Origin: null` on the post, and
/// [`same_origin_post`] could not tell tokenhub's own form from a forged
/// one. `same-origin` still sends nothing to other origins.
pub const FORM_REFERRER_POLICY: &str = "same-origin";

fn header_is(headers: &HeaderMap, name: &str, allowed: &[&str]) -> bool {
    headers.get(name).and_then(|v| v.to_str().ok()).is_some_and(|v| allowed.iter().any(|a| v.eq_ignore_ascii_case(a)))
}

/// Passes only a top-level navigation in the user's browser: the address
/// bar, a bookmark, a link, a redirect (a sign-in ends with one from the
/// IdP, a cross-site chain). Such a page is shown to the user alone: no
/// script of another page can read it. `fetch`, XHR, frames, objects and
/// requests without `Sec-Fetch-*` headers (a script, an old browser) get a
/// 403 page without secrets: these pages are for people.
pub fn top_level_navigation(headers: &HeaderMap) -> Result<(), PageError> {
    let navigation = header_is(headers, "sec-fetch-mode", &["navigate"])
        && header_is(headers, "sec-fetch-dest", &["document"])
        && header_is(headers, "sec-fetch-site", &["same-origin", "same-site", "cross-site", "none"]);
    if navigation { Ok(()) } else { Err(open_directly()) }
}

/// [`top_level_navigation`] that the user started on tokenhub's own pages
/// or in the address bar (`Sec-Fetch-Site` `same-origin` or `none`): for
/// responses that carry token values, which another site must not make the
/// browser download.
pub fn own_top_level_navigation(headers: &HeaderMap) -> Result<(), PageError> {
    top_level_navigation(headers)?;
    if header_is(headers, "sec-fetch-site", &["same-origin", "none"]) { Ok(()) } else { Err(open_directly()) }
}

fn open_directly() -> PageError {
    PageError::new(
        StatusCode::FORBIDDEN,
        "Open this page directly",
        "This page holds your tokens, so tokenhub shows it only when you open it yourself in your browser, \
         not to scripts, frames or other sites. Open tokenhub's address in the address bar or follow a link to it.",
    )
}

/// Passes a form post only when the browser says it comes from tokenhub's
/// own origin (`Origin` equals `origin`). Browsers send `Origin` with every
/// POST; a missing one is refused.
pub fn same_origin_post(headers: &HeaderMap, origin: &str) -> Result<(), PageError> {
    let sent = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    if sent.is_some_and(|sent| sent.trim_end_matches('/') == origin) {
        Ok(())
    } else {
        Err(PageError::new(
            StatusCode::FORBIDDEN,
            "Request not accepted",
            "This form was not sent from tokenhub's own page. Open the token page and use its button.",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn client_is_the_rightmost_forwarded_address_or_the_peer() {
        let peer: SocketAddr = "10.0.0.9:5555".parse().unwrap();
        assert_eq!(client_of(&headers(&[]), Some(peer)).as_deref(), Some("10.0.0.9"));
        let h = headers(&[("x-forwarded-for", "1.2.3.4, 5.6.7.8")]);
        assert_eq!(client_of(&h, Some(peer)).as_deref(), Some("5.6.7.8"));
        let h = headers(&[("x-forwarded-for", "1.2.3.4"), ("x-forwarded-for", "::1")]);
        assert_eq!(client_of(&h, None).as_deref(), Some("::1"));
        // Not an address: ignored, the peer counts.
        let h = headers(&[("x-forwarded-for", "1.2.3.4, made-up")]);
        assert_eq!(client_of(&h, Some(peer)).as_deref(), Some("10.0.0.9"));
        assert_eq!(client_of(&headers(&[]), None), None);
    }

    #[test]
    fn limiter_blocks_after_the_burst_and_per_client() {
        let limiter = FailureLimiter::default();
        for _ in 0..FAILURE_BURST {
            assert!(limiter.check(Some("a")).is_ok());
            limiter.failed(Some("a"));
        }
        assert!(limiter.check(Some("a")).is_ok(), "the burst itself is allowed");
        limiter.failed(Some("a"));
        let e = limiter.check(Some("a")).unwrap_err();
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(e.retry_after.is_some_and(|s| (1..=4).contains(&s)), "{:?}", e.retry_after);
        assert!(limiter.check(Some("b")).is_ok(), "other clients are not slowed");
        assert!(limiter.check(None).is_ok());
    }

    #[test]
    fn navigation_rules() {
        let nav = |mode: &str, dest: &str, site: &str| {
            top_level_navigation(&headers(&[("sec-fetch-mode", mode), ("sec-fetch-dest", dest), ("sec-fetch-site", site)]))
        };
        assert!(nav("navigate", "document", "none").is_ok());
        assert!(nav("navigate", "document", "same-origin").is_ok());
        assert!(nav("cors", "empty", "same-origin").is_err());
        assert!(nav("navigate", "iframe", "same-origin").is_err());
        assert!(nav("navigate", "document", "cross-site").is_ok(), "the end of a sign-in through the IdP");
        assert!(nav("navigate", "document", "bogus").is_err());
        let own = |site: &str| {
            own_top_level_navigation(&headers(&[
                ("sec-fetch-mode", "navigate"),
                ("sec-fetch-dest", "document"),
                ("sec-fetch-site", site),
            ]))
        };
        assert!(own("same-origin").is_ok() && own("none").is_ok());
        assert!(own("cross-site").is_err() && own("same-site").is_err());
        assert!(nav("navigate", "document", "same-site").is_ok());
        assert!(top_level_navigation(&headers(&[])).is_err());
    }

    #[test]
    fn origin_rules() {
        let o = "http://127.0.0.1:8000";
        assert!(same_origin_post(&headers(&[("origin", o)]), o).is_ok());
        assert!(same_origin_post(&headers(&[("origin", "http://evil.example")]), o).is_err());
        assert!(same_origin_post(&headers(&[("origin", "null")]), o).is_err());
        assert!(same_origin_post(&headers(&[]), o).is_err());
    }
}
