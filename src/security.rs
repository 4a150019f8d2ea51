//! Defences that do not belong to one endpoint:
//!
//! - who the client is ([`client_of`]): the address failures are counted by,
//!   the peer's unless the peer is one of the [`TrustedProxies`];
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
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;

use crate::errors::{ApiError, PageError};

/// The proxies in front of tokenhub whose `X-Forwarded-For` is believed
/// (`TOKENHUB_TRUSTED_PROXIES`): addresses and CIDR blocks. Empty by
/// default: then nobody's header is believed and the peer is the client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Arc<[IpNet]>);

impl TrustedProxies {
    /// Parses addresses and CIDR blocks separated by commas (or white
    /// space), e.g. `10.244.0.0/16, 192.168.1.5, fd00::/8`. `Err` names the
    /// first entry that is neither.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut nets = Vec::new();
        for entry in text.split(|c: char| c == ',' || c.is_whitespace()).filter(|e| !e.is_empty()) {
            let net = match entry.parse::<IpNet>() {
                Ok(net) => net.trunc(),
                Err(_) => entry
                    .parse::<IpAddr>()
                    .map(|ip| IpNet::from(ip.to_canonical()))
                    .map_err(|_| format!("{entry:?} is not an IP address or a CIDR block (such as 10.0.0.7 or 10.244.0.0/16)"))?,
            };
            nets.push(net);
        }
        Ok(Self(nets.into()))
    }

    /// Whether no proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `ip` is a trusted proxy (an IPv4 address mapped into IPv6,
    /// as a dual-stack listener sees IPv4 peers, counts as the IPv4 one).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }
}

impl std::fmt::Display for TrustedProxies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, net) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{net}")?;
        }
        Ok(())
    }
}

/// The client address a request is counted under: the failure limiter's
/// key and the audit log's `client`.
///
/// The peer address, unless the peer is a trusted proxy. A proxy appends
/// the address it saw to `X-Forwarded-For`, so behind trusted proxies the
/// header is walked from the right, past the addresses of trusted proxies,
/// and the first other address is the client; entries further left were
/// written by the client and can be anything. An entry that is not an IP
/// address stops the walk (the last trusted hop counts), so no header can
/// make up arbitrary keys; if every entry is a trusted proxy, the leftmost
/// one counts. From any other peer the header is ignored: a caller that
/// reaches tokenhub directly (in Zero to JupyterHub every user's server can)
/// cannot pass for the hub, nor escape the limiter by changing the header.
/// Without a peer (a router driven in-process) there is no client.
pub fn client_of(headers: &HeaderMap, peer: Option<SocketAddr>, trusted: &TrustedProxies) -> Option<IpAddr> {
    let mut client = peer?.ip().to_canonical();
    if trusted.contains(client) {
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|v| !v.is_empty());
        for entry in forwarded.rev() {
            let Some(ip) = forwarded_address(entry) else { break };
            client = ip;
            if !trusted.contains(ip) {
                break;
            }
        }
    }
    Some(client)
}

/// An `X-Forwarded-For` entry's address: `10.0.0.1`, `2001:db8::1`, and,
/// as some proxies write them, with a port (`10.0.0.1:5555`, `[2001:db8::1]:5555`).
fn forwarded_address(entry: &str) -> Option<IpAddr> {
    let ip = entry.parse::<IpAddr>().or_else(|_| entry.parse::<SocketAddr>().map(|s| s.ip())).ok()?;
    Some(ip.to_canonical())
}

/// A request's client, told by [`crate::server::serve`] from the peer and
/// the trusted proxies ([`client_of`]) and put among its extensions.
#[derive(Debug, Clone, Copy)]
pub struct Client(pub IpAddr);

/// The client of a request ([`Client`]; tests driving the router directly
/// have none).
pub fn client_of_request<B>(request: &Request<B>) -> Option<IpAddr> {
    request.extensions().get::<Client>().map(|c| c.0)
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

/// Adds the security headers to an answer (every answer gets them, in
/// [`crate::request_frame`]).
pub fn add_security_headers(headers: &mut axum::http::HeaderMap) {
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    // A page with a form sets its own policy (see [`FORM_REFERRER_POLICY`]).
    headers.entry(header::REFERRER_POLICY).or_insert(HeaderValue::from_static("no-referrer"));
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

    fn trusted(text: &str) -> TrustedProxies {
        TrustedProxies::parse(text).unwrap()
    }

    #[test]
    fn trusted_proxies_parse_addresses_and_blocks() {
        let t = trusted("10.244.0.0/16, 192.168.1.5 fd00::/8,,::1");
        assert_eq!(t.to_string(), "10.244.0.0/16,192.168.1.5/32,fd00::/8,::1/128");
        assert!(t.contains("10.244.3.4".parse().unwrap()));
        assert!(!t.contains("10.245.0.1".parse().unwrap()));
        assert!(t.contains("192.168.1.5".parse().unwrap()) && !t.contains("192.168.1.6".parse().unwrap()));
        assert!(t.contains("fd12::7".parse().unwrap()) && t.contains("::1".parse().unwrap()));
        // A dual-stack listener sees IPv4 peers as mapped IPv6 addresses.
        assert!(t.contains("::ffff:10.244.0.9".parse().unwrap()));
        // Host bits in a block are dropped; a mapped address is its IPv4 one.
        assert_eq!(trusted("10.1.2.3/8 ::ffff:10.0.0.1").to_string(), "10.0.0.0/8,10.0.0.1/32");
        assert!(trusted("").is_empty() && trusted(" , ").is_empty());
        for bad in ["10.0.0.0/33", "example.org", "10.0.0", "10.0.0.0/8/8", "*"] {
            let e = TrustedProxies::parse(&format!("10.0.0.1,{bad}")).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn without_trusted_proxies_the_peer_is_the_client() {
        let none = TrustedProxies::default();
        let peer: SocketAddr = "10.0.0.9:5555".parse().unwrap();
        assert_eq!(client_of(&headers(&[]), Some(peer), &none).map(|ip| ip.to_string()).as_deref(), Some("10.0.0.9"));
        // A forged header changes nothing.
        let h = headers(&[("x-forwarded-for", "1.2.3.4, 5.6.7.8")]);
        assert_eq!(client_of(&h, Some(peer), &none).map(|ip| ip.to_string()).as_deref(), Some("10.0.0.9"));
        // Nor from a peer that is not among the trusted.
        assert_eq!(client_of(&h, Some(peer), &trusted("10.0.1.0/24")).map(|ip| ip.to_string()).as_deref(), Some("10.0.0.9"));
        // No peer, no client, whatever the header says.
        assert_eq!(client_of(&h, None, &trusted("10.0.0.0/8")), None);
        assert_eq!(client_of(&headers(&[]), None, &none), None);
        let mapped: SocketAddr = "[::ffff:10.0.0.9]:5555".parse().unwrap();
        assert_eq!(client_of(&headers(&[]), Some(mapped), &none).map(|ip| ip.to_string()).as_deref(), Some("10.0.0.9"));
    }

    #[test]
    fn behind_trusted_proxies_the_first_untrusted_forwarded_address_is_the_client() {
        let t = trusted("10.0.0.0/8");
        let proxy: SocketAddr = "10.0.0.2:5555".parse().unwrap();
        let client = |xff: &[&str]| {
            let pairs: Vec<(&'static str, &str)> = xff.iter().map(|v| ("x-forwarded-for", *v)).collect();
            client_of(&headers(&pairs), Some(proxy), &t).map(|ip| ip.to_string())
        };
        assert_eq!(client(&["203.0.113.7"]).as_deref(), Some("203.0.113.7"));
        // What the client wrote itself (left) does not count.
        assert_eq!(client(&["1.2.3.4, 203.0.113.7"]).as_deref(), Some("203.0.113.7"));
        // Trusted hops (an ingress behind the proxy) are skipped, across headers.
        assert_eq!(client(&["1.2.3.4, 203.0.113.7, 10.1.1.1", "10.2.2.2"]).as_deref(), Some("203.0.113.7"));
        // With ports, bracketed IPv6, mapped IPv4.
        assert_eq!(client(&["203.0.113.7:4444"]).as_deref(), Some("203.0.113.7"));
        assert_eq!(client(&["[2001:db8::1]:4444"]).as_deref(), Some("2001:db8::1"));
        assert_eq!(client(&["::ffff:203.0.113.7"]).as_deref(), Some("203.0.113.7"));
        // No header: the proxy itself (its own requests, probes).
        assert_eq!(client(&[]).as_deref(), Some("10.0.0.2"));
        // Not an address: the walk stops at the last trusted hop.
        assert_eq!(client(&["203.0.113.7, made-up"]).as_deref(), Some("10.0.0.2"));
        assert_eq!(client(&["made-up, 10.3.3.3"]).as_deref(), Some("10.3.3.3"));
        assert_eq!(client(&["unknown"]).as_deref(), Some("10.0.0.2"));
        // Every entry trusted: the leftmost.
        assert_eq!(client(&["10.3.3.3, 10.4.4.4"]).as_deref(), Some("10.3.3.3"));
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
